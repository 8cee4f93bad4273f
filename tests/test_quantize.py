"""CPU inference precision: weight-only int8 (`--quantize int8`), torch.ao's dynamic int8
(`int8-dynamic`) and float16-weight (`fp16`) layers, and fp32 linear layers packed for oneDNN (what
`LLM` does to a checkpoint it loads)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import load_model
from nanoseek.config import preset
from nanoseek.device import (Fp16Embedding, Fp16Linear, Int8Linear, PackedLinear, pack_linears, quantizable,
                             quantize_layer, quantize_linear, quantize_model)
from nanoseek.errors import NanoseekError
from nanoseek.inference.sampling import SamplingParams
from nanoseek.model.dense import DenseConfig, DenseTransformer
from nanoseek.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("in_features, out_features, bias", [(64, 48, True), (96, 7, False), (40, 33, True)])
def test_int8_linear_is_within_a_percent_of_float(in_features, out_features, bias):
    # 64 and 96 run torch's int8-weight kernel; 40 (not a multiple of 32) the dequantizing fallback
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    int8 = Int8Linear(linear)
    assert int8.weight.dtype == torch.int8 and int8.weight.shape == (out_features, in_features)
    x = torch.randn(2, 5, in_features)
    with torch.no_grad():
        y, ref = int8(x), linear(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_error(y, ref) < 0.01


def test_int8_weights_round_to_nearest_under_the_scale_the_kernel_uses():
    # the kernel reads the scale in bfloat16: each weight must be the nearest multiple of that scale,
    # not of the float32 scale it was rounded from (a per-channel gain error of up to 0.39%)
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    int8 = Int8Linear(linear)
    scale = int8.scale.float()[:, None]  # (out, 1), as stored
    error = (linear.weight.detach() - int8.weight.float() * scale).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()


def test_packed_linear_is_the_same_fp32_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    packed = PackedLinear(linear)
    for shape in ((1, 64), (8, 64), (3, 7, 64)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def tiny_dense(tie: bool = False) -> DenseTransformer:
    torch.manual_seed(0)
    return DenseTransformer(DenseConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=tie))


def test_pack_linears_keeps_the_outputs_and_leaves_a_tied_head(tmp_path):
    model = tiny_dense().eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        packed = pack_linears(model)
        assert type(packed.lm_head) is PackedLinear and type(packed.model.layers[0].mlp.up_proj) is PackedLinear
        torch.testing.assert_close(packed(ids).logits, ref, rtol=1e-4, atol=1e-4)
    tied = pack_linears(tiny_dense(tie=True))
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
    # the engine packs the checkpoints it loads (CPU, float32), not an in-memory model (RL updates it)
    nanoseek.save_model(tiny_dense(), tmp_path / "ckpt")
    assert type(nanoseek.LLM(tmp_path / "ckpt", max_num_seqs=1).model.lm_head) is PackedLinear
    assert type(nanoseek.LLM(tiny_dense(), max_num_seqs=1).model.lm_head) is nn.Linear


def trained_toy() -> DenseTransformer:
    """A tiny model trained until it is confident: next token = (3 * token + 1) mod 64, a few hundred steps."""
    model = tiny_dense()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        start = torch.randint(0, 64, (16, 1), generator=g)
        seq = [start]
        for _ in range(23):
            seq.append((3 * seq[-1] + 1) % 64)
        ids = torch.cat(seq, dim=1)
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    return model.eval()


def test_weight_only_int8_greedy_agrees_with_fp32_on_a_trained_model():
    model = trained_toy()
    prompts = [[p, (3 * p + 1) % 64] for p in range(0, 64, 8)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    fp32 = [o.outputs[0].token_ids for o in nanoseek.LLM(model, max_num_seqs=8).generate(prompts, params)]
    int8_model = quantize_model(trained_toy(), "int8")
    assert not [n for n, m in int8_model.named_modules() if type(m) is nn.Linear]
    int8 = [o.outputs[0].token_ids for o in nanoseek.LLM(int8_model, max_num_seqs=8).generate(prompts, params)]
    same = sum(a == b for x, y in zip(fp32, int8) for a, b in zip(x, y))
    assert same / (8 * 32) >= 0.9


def is_dynamic(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")


def test_an_untied_head_is_quantized_and_a_tied_head_stays_float(tmp_path):
    assert is_dynamic(quantize_model(tiny_dense(), "int8-dynamic").lm_head)
    assert type(quantize_model(tiny_dense(), "int8").lm_head) is Int8Linear
    assert type(quantize_model(tiny_dense(), "fp16").lm_head) is Fp16Linear
    for method in ("int8", "int8-dynamic", "fp16"):
        # an untied embedding is stored in float16; a tied one stays the head's float matrix
        assert type(quantize_model(tiny_dense(), method).model.embed_tokens) is Fp16Embedding
        tied = quantize_model(tiny_dense(tie=True), method)
        assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
        assert type(tied.model.embed_tokens) is nn.Embedding
    assert not quantizable("lm_head", nn.Linear(8, 8), tied_head=True)
    assert quantizable("lm_head", nn.Linear(8, 8), tied_head=False)
    # loading quantized decides by the config's tie_word_embeddings, also where a tied checkpoint
    # stores the head's copy of the embedding (as some do)
    nanoseek.save_model(tiny_dense(), tmp_path / "untied")
    assert is_dynamic(load_model(tmp_path / "untied", quantize="int8-dynamic").lm_head)
    nanoseek.save_model(tiny_dense(tie=True), tmp_path / "tied")
    file = tmp_path / "tied" / "model.safetensors"
    tensors = load_file(file)
    assert "lm_head.weight" not in tensors
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, file,
              metadata={"format": "pt"})
    tied = load_model(tmp_path / "tied", quantize="int8-dynamic")
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_quantized_head_logits_stay_close_to_fp32():
    model = tiny_dense().eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, hidden = model(ids).logits, model(ids, logits=False).hidden
        assert rel_error(Int8Linear(model.lm_head)(hidden), ref) < 0.01  # the head alone
        assert rel_error(quantize_linear(model.lm_head, "int8-dynamic")(hidden), ref) < 0.05
        assert rel_error(quantize_model(model, "int8-dynamic")(ids).logits, ref) < 0.1  # every layer


def test_deepseek_model_quantized_with_mtp_speculation():
    # MLA + MoE + MTP: the MTP projection is int8, kv_b_proj stays float, the head (which the MTP
    # module shares) is int8; speculative decoding on the int8 model is its own plain greedy
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    dynamic = quantize_model(copy.deepcopy(model), "int8-dynamic")
    assert is_dynamic(dynamic.lm_head) and type(dynamic.model.layers[0].self_attn.kv_b_proj) is nn.Linear
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, "int8")
        assert rel_error(model(ids).logits, ref) < 0.03
    assert type(model.mtp_layers[0].eh_proj) is Int8Linear and type(model.lm_head) is Int8Linear
    assert type(model.model.layers[0].self_attn.kv_b_proj) is nn.Linear
    prompts = [[3, 5, 7], [11, 13]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in nanoseek.LLM(model, max_num_seqs=2).generate(prompts, params)]
    spec = nanoseek.LLM(model, max_num_seqs=2, speculative_mtp=1, speculative_max_batch=8)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == plain
    assert spec.stats()["spec_draft_tokens"] > 0


def test_fp16_of_a_bf16_checkpoint_computes_what_fp32_does(tmp_path):
    # float16 holds every bf16 weight of this model exactly, and fbgemm sums in float32: the logits
    # are fp32's up to the order of the sums, and the greedy text is fp32's
    nanoseek.save_model(tiny_dense().to(torch.bfloat16), tmp_path / "bf16")
    fp32, fp16 = load_model(tmp_path / "bf16"), load_model(tmp_path / "bf16", quantize="fp16")
    linears = [m for n, m in fp16.named_modules() if n.endswith(("proj", "lm_head"))]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is Fp16Linear for m in linears)
    assert type(fp16.model.embed_tokens) is Fp16Embedding
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fp16(ids).logits, fp32(ids).logits, rtol=1e-4, atol=1e-5)
    prompts = [[p, (3 * p + 1) % 64] for p in range(0, 64, 8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    texts = [[o.outputs[0].token_ids for o in nanoseek.LLM(m, max_num_seqs=8).generate(prompts, params)]
             for m in (fp32, fp16)]
    assert texts[0] == texts[1]


def test_fp16_keeps_a_layer_beyond_its_range_in_float():
    linear, embedding = nn.Linear(16, 8), nn.Embedding(8, 16)
    with torch.no_grad():
        linear.weight[3, 5] = embedding.weight[3, 5] = 1e5  # float16's largest is 65504
    assert quantize_linear(linear, "fp16") is linear and quantize_layer(embedding, "int8") is embedding
    assert type(quantize_layer(nn.Embedding(8, 16), "int8")) is Fp16Embedding
    assert type(quantize_linear(nn.Linear(16, 8), "fp16")) is Fp16Linear


def test_fp16_deepseek_model_keeps_kv_b_proj_float_and_speculates():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, "fp16")
        assert rel_error(model(ids).logits, ref) < 1e-3  # fp32 weights: float16 rounds them, 2^-11
    assert type(model.lm_head) is Fp16Linear and type(model.mtp_layers[0].eh_proj) is Fp16Linear
    assert type(model.model.layers[0].self_attn.kv_b_proj) is nn.Linear
    prompts, params = [[3, 5, 7], [11, 13]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in nanoseek.LLM(model, max_num_seqs=2).generate(prompts, params)]
    spec = nanoseek.LLM(model, max_num_seqs=2, speculative_mtp=1, speculative_max_batch=8)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == plain


def test_quantize_choices_and_none(tmp_path):
    nanoseek.save_model(tiny_dense(), tmp_path / "ckpt")
    assert type(load_model(tmp_path / "ckpt", quantize="none").model.layers[0].mlp.up_proj) is nn.Linear
    assert type(load_model(tmp_path / "ckpt", quantize="int8").model.layers[0].mlp.up_proj) is Int8Linear
    assert is_dynamic(load_model(tmp_path / "ckpt", quantize="int8-dynamic").model.layers[0].mlp.up_proj)
    assert type(load_model(tmp_path / "ckpt", quantize="fp16").model.layers[0].mlp.up_proj) is Fp16Linear
    with pytest.raises(NanoseekError, match="unknown quantization"):
        load_model(tmp_path / "ckpt", quantize="int4")


def test_cli_quantize_choices(capsys):
    import argparse

    from nanoseek.device import add_quantize_argument

    parser = argparse.ArgumentParser()
    add_quantize_argument(parser)
    assert parser.parse_args([]).quantize == "none"
    for method in ("none", "int8", "int8-dynamic", "fp16"):
        assert parser.parse_args(["--quantize", method]).quantize == method
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int4"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_model_packed_or_quantized_for_inference_is_not_saved_trained_or_requantized(tmp_path):
    """Their weights are not parameters: saving wrote a checkpoint missing them (or crashed), and
    training silently left the linear layers as they were."""
    import nanoseek
    from nanoseek.device import pack_linears, quantize_model
    from nanoseek.errors import NanoseekError
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.distributed import DistEnv
    from nanoseek.train.trainer import Trainer

    for convert in (pack_linears, lambda m: quantize_model(m, "int8"), lambda m: quantize_model(m, "fp16"),
                    lambda m: quantize_model(m, "int8-dynamic")):
        model = convert(tiny_dense())
        with pytest.raises(NanoseekError, match="cannot be saved"):
            nanoseek.save_model(model, tmp_path / "ck")
        with pytest.raises(NanoseekError, match="cannot be trained"):
            Trainer(TrainConfig(out_dir=str(tmp_path / "run")), model, DistEnv())
    with pytest.raises(NanoseekError, match="already packed or quantized"):
        quantize_model(pack_linears(tiny_dense()), "int8")
    assert not (tmp_path / "ck").exists()


def test_fp16_needs_fbgemm(monkeypatch):
    """fbgemm's float16 GEMM is x86-only: elsewhere (qnnpack on ARM) a clear error before loading."""
    from nanoseek.device import check_quantize
    from nanoseek.errors import NanoseekError

    monkeypatch.setattr(torch.backends.quantized, "engine", "qnnpack", raising=False)
    with pytest.raises(NanoseekError, match="fbgemm"):
        check_quantize("fp16", torch.device("cpu"), torch.float32)
    check_quantize("int8", torch.device("cpu"), torch.float32)


def test_returning_free_memory_is_a_no_op_off_linux(monkeypatch):
    """malloc_trim is glibc's; ctypes.CDLL(None) itself raises on Windows, and loading calls this
    after every tensor."""
    import sys

    from nanoseek import device

    device._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(device.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(TypeError("no CDLL(None)")))
    try:
        device.return_free_memory()  # no error, nothing done
        assert device._malloc_trim() is None
    finally:
        device._malloc_trim.cache_clear()
