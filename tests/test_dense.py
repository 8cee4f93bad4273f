"""Dense students: parity with transformers' Llama / Qwen2 both ways, config round trips and errors,
the engine on a student's key/value cache, and the student preset's size against the teacher's."""

import json

import pytest
import torch
from decoding_checks import reference_greedy

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.config import preset
from nanoseek.errors import ConfigError
from nanoseek.info import model_stats
from nanoseek.model.dense import DenseConfig, DenseTransformer, dense_preset, rope_inv_freq

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0)
VARIANTS = {
    "llama_gqa": dict(model_type="llama"),
    "llama_tied_bias_mha": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                                num_key_value_heads=4),
    "qwen2_gqa": dict(model_type="qwen2"),
    "qwen2_tied_mqa": dict(model_type="qwen2", tie_word_embeddings=True, num_key_value_heads=1),
    # R1-Distill-Llama's Llama 3.1 scaling; with head_dim 16 and theta 500 the wavelengths (6 to
    # 1,440 positions) fall in all three bands around 64 / 4 and 64 / 1
    "llama3_rope_scaling": dict(model_type="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


pytestmark = pytest.mark.usefixtures("one_thread")


def student(**kw) -> DenseTransformer:
    model = DenseTransformer(DenseConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_loads_student_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    ours = student(**VARIANTS[name])
    nanoseek.save_model(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == VARIANTS[name]["model_type"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == HF_CLASSES[VARIANTS[name]["model_type"]]
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_checkpoint_loads_as_student_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    kw = {**SMALL, **VARIANTS[name]}
    model_type = kw.pop("model_type")
    hf_config = getattr(transformers, HF_CLASSES[model_type].replace("ForCausalLM", "Config"))(**kw)
    hf = getattr(transformers, HF_CLASSES[model_type])(hf_config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    assert isinstance(ours, DenseTransformer) and ours.config.model_type == model_type
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_loaded_tied_student_shares_one_embedding_parameter(tmp_path):
    """The optimizer must see one tensor for a tied embedding and head, not two sharing memory."""
    model = student(tie_word_embeddings=True)
    nanoseek.save_model(model, tmp_path)
    loaded = nanoseek.load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.num_parameters() == model.num_parameters()


def test_labels_give_the_next_token_loss():
    torch.manual_seed(0)
    model = student()
    ids = torch.randint(0, 256, (2, 16))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    assert out.mtp_loss is None and out.aux_loss is None and model.config.num_nextn_predict_layers == 0


def test_config_round_trip_and_errors():
    cfg = DenseConfig(**SMALL, model_type="qwen2")
    assert DenseConfig.from_dict(cfg.to_dict()) == cfg
    hf5 = {**cfg.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    del hf5["rope_theta"]
    assert DenseConfig.from_dict(hf5).rope_theta == 1234.0
    with pytest.raises(ConfigError, match="hidden_dims"):
        DenseConfig.from_dict({**cfg.to_dict(), "hidden_dims": 3})
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        DenseConfig.from_dict({**cfg.to_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="needs numbers for .'low_freq_factor'"):
        DenseConfig.from_dict({**cfg.to_dict(), "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                  "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 64}})
    with pytest.raises(ConfigError, match="use_mrope"):
        DenseConfig.from_dict({**cfg.to_dict(), "use_mrope": True})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        DenseConfig(**{**SMALL, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="attention_bias"):
        DenseConfig(**SMALL, model_type="qwen2", attention_bias=True)
    # head_dim was derived before validation: a TypeError / ZeroDivisionError traceback
    for field, value in [("hidden_size", None), ("num_attention_heads", 0), ("num_attention_heads", "4")]:
        with pytest.raises(ConfigError, match=f"invalid config field {field}={value!r}: must be a positive integer"):
            DenseConfig.from_dict({**cfg.to_dict(), "head_dim": None, field: value})
    with pytest.raises(ConfigError, match="invalid config field max_position_embeddings=None: must be an integer"):
        DenseConfig.from_dict({**cfg.to_dict(), "max_position_embeddings": None})


# config.json of DeepSeek-R1-Distill-Qwen-7B and -Llama-8B as released (written by transformers
# 4.44 / 4.43: use_mrope, an unused sliding window, Llama 3.1's rope_scaling)
R1_DISTILL_QWEN_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 152064,
}
R1_DISTILL_LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


@pytest.mark.parametrize("released", [R1_DISTILL_QWEN_7B, R1_DISTILL_LLAMA_8B], ids=["qwen-7b", "llama-8b"])
def test_released_r1_distill_configs_read_like_transformers(released):
    """The released config.json files parse, and to the rotary frequencies transformers computes."""
    ours = DenseConfig.from_dict(released)
    hf = transformers.AutoConfig.for_model(**released)
    assert (ours.hidden_size, ours.num_key_value_heads, ours.rope_theta) == (
        hf.hidden_size, hf.num_key_value_heads, hf.rope_parameters["rope_theta"])
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope_type = hf.rope_parameters["rope_type"]
    hf_inv_freq = (ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")[0] if rope_type != "default" else
                   1.0 / hf.rope_parameters["rope_theta"] ** (torch.arange(0, ours.head_dim, 2).float() / ours.head_dim))
    torch.testing.assert_close(rope_inv_freq(ours), hf_inv_freq)
    assert DenseConfig.from_dict(ours.to_dict()) == ours


def test_engine_decodes_a_student_like_the_plain_forward():
    """The engine's paged cache holds the student's keys and values (model.cache_dims); greedy
    decoding through it, batched and with a shared prefix, equals the no-cache forward."""
    torch.manual_seed(0)
    model = student(initializer_range=0.5)  # large weights: varied, non-degenerate greedy outputs
    assert model.cache_dims == (2 * 16, 2 * 16)
    prompts = [[1, 5, 9, 11, 3], [1, 5, 9, 11, 7, 2, 8, 30, 9, 22], [4]]
    llm = LLM(model, None, block_size=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, 10)


@pytest.mark.parametrize("vocab_size", [331, 1024, 4096])
def test_student_small_is_at_most_half_the_small_teacher(vocab_size):
    teacher = model_stats(preset("small", vocab_size=vocab_size)).total_params  # main model, MTP not counted
    with torch.device("meta"):
        n = DenseTransformer(dense_preset("student-small", vocab_size=vocab_size)).num_parameters()
    assert n <= teacher / 2, (n, teacher)


def test_student_small_starts_at_its_own_init_scale():
    # At HF's default std 0.02 a fresh student-small sat on the reasoning corpus's loss plateau for
    # 1,070 steps; its preset draws weights at 0.08, and residual-branch outputs at 0.08 / sqrt(2 L).
    config = dense_preset("student-small", vocab_size=288)
    torch.manual_seed(0)
    model = DenseTransformer(config)
    assert config.initializer_range == 0.08
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.08, rel=0.05)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.08, rel=0.05)
    residual_std = 0.08 / (2 * config.num_hidden_layers) ** 0.5
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert DenseConfig.from_dict(config.to_dict()).initializer_range == 0.08  # config.json keeps it
