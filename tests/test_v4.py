"""DeepSeek-V4's architecture (model/attention_v4.py, V4's MoE in model/moe.py): the config against
transformers' DeepseekV4Config, the training forward's logits and loss against transformers'
DeepseekV4ForCausalLM on the same weights (loaded by nanoseek's own loader from a transformers-saved
directory), checkpoints both ways, packed rows, pretraining (with samples), and the inference engine:
cached forwards equal to the forward without a cache, the engine's greedy tokens equal to repeated
no-cache forwards (batching, prefix caching, preemption), and the generate / chat / eval CLIs and
the server on a V4 checkpoint.

Sequences are 40 tokens: longer than the window (8) and than both compression rates (2, 8), and
with more compressed entries (20) than the indexer keeps (3), so every branch runs; the engine's
prompts and outputs (up to 37 tokens) too.
"""

import json

import pytest
import torch
import torch.nn as nn
from decoding_checks import PROMPTS, assert_cached_decoding_matches, engine_greedy, reference_greedy

from nanoseek import LLM, SamplingParams
from nanoseek.checkpoint import load_model, read_tensors, save_model
from nanoseek.cli import main as cli_main
from nanoseek.config import V4_FIELDS, ModelConfig, preset
from nanoseek.errors import ConfigError
from nanoseek.model.attention import latent_cache_dims
from nanoseek.model.moe import Gate
from nanoseek.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.deepseek_v4")
pytestmark = pytest.mark.usefixtures("one_thread")

T = 40
# v4-tiny with YaRN on the compressed layers' RoPE, a SwiGLU limit the random weights reach, and 16
# index heads: an index score is exactly 0 (a tie, which nanoseek breaks towards the earlier entry
# and torch.topk arbitrarily) only where all 16 heads score an entry <= 0
PARITY = dict(index_n_heads=16, swiglu_limit=1.0, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                              "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0})


def hf_config(config: ModelConfig):
    d = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    return transformers.DeepseekV4Config(**d)


def random_hf_model(config: ModelConfig, seed: int = 0):
    """transformers' DeepseekV4ForCausalLM with every weight random (init would hide mistakes: zero
    sinks and position biases, unit norms, an all-zero tid2eid)."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(hf_config(config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], config.n_routed_experts, generator=g).topk(b.shape[1]).indices)
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def ids(config, seed=1, batch=2, length=T):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-saved DeepseekV4 checkpoint (its default, DeepSeek's tensor names) and its model."""
    config = preset("v4-tiny", **PARITY)
    model = random_hf_model(config)
    path = tmp_path_factory.mktemp("hf") / "v4"
    model.save_pretrained(path)
    return path, model, config


# ---------------------------------------------------------------- config


def test_v4_config_json_is_transformers_deepseek_v4_config_and_v3_files_are_unchanged():
    config = preset("v4-tiny", **PARITY)
    d = config.to_dict()
    assert (d["model_type"], d["architectures"]) == ("deepseek_v4", ["DeepseekV4ForCausalLM"])
    hf = hf_config(config)
    assert (hf.layer_types, hf.mlp_layer_types, hf.qk_rope_head_dim) == (config.layer_types, config.mlp_layer_types, 8)
    assert hf.rope_parameters["compress"]["rope_type"] == "yarn" and hf.rope_parameters["main"]["rope_type"] == "default"
    # transformers' own config.json reads back into the same config, and so does ours
    assert ModelConfig.from_dict(hf.to_dict()) == config == ModelConfig.from_dict(json.loads(json.dumps(d)))
    # a file with transformers' legacy keys and defaults: V4-Flash's layer schedule, hash layers, rates
    legacy = ModelConfig.from_dict({"model_type": "deepseek_v4", "num_hidden_layers": 4, "compress_ratios": [0, 4, 128, 4],
                                    "num_hash_layers": 1, "num_nextn_predict_layers": 1})
    assert legacy.layer_types == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                                  "compressed_sparse_attention"]
    assert legacy.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"] and legacy.num_nextn_predict_layers == 0
    assert (legacy.head_dim, legacy.qk_rope_head_dim, legacy.scoring_func) == (512, 64, "sqrtsoftplus")
    for name in ("tiny", "v3", "v2-lite"):  # no V4 key in a V3 / V2 file; head_dim as HF derives it
        d = preset(name).to_dict()
        assert not set(V4_FIELDS) - {"head_dim"} & set(d) and d["head_dim"] == preset(name).qk_rope_head_dim
        assert list(d)[-2:] == ["head_dim", "use_cache"]


@pytest.mark.parametrize("fields, message", [
    (dict(num_key_value_heads=4), "num_key_value_heads=4: must be 1 for DeepSeek-V4"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types="),
    (dict(mlp_layer_types=["moe", "moe", "dense", "moe"]), "mlp_layer_types="),
    (dict(num_nextn_predict_layers=1), "no DeepSeek-V4 MTP module"),
    (dict(o_groups=3), "o_groups=3"),
    (dict(index_topk=None), "index_topk=None"),
    (dict(hc_mult=None), "hc_mult=None"),
    (dict(compress_rates={"compressed_sparse_attention": 2}), "compress_rates="),
    (dict(qk_rope_head_dim=40), "qk_rope_head_dim=40"),
])
def test_bad_v4_configs_are_one_line_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        preset("v4-tiny", **fields)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fields", [dict(sliding_window=64), dict(o_groups=4), dict(scoring_func="sqrtsoftplus")])
def test_v4_fields_on_a_v3_config_are_refused(fields):
    with pytest.raises(ConfigError, match="DeepSeek-V4"):
        preset("tiny", **fields)


# ---------------------------------------------------------------- the forward against transformers


def test_logits_and_loss_match_transformers_deepseek_v4(hf_dir):
    """Weights through nanoseek's loader from the transformers-saved directory; fp32 logits and the
    loss equal transformers' to 1e-5, on rows that exercise the window, both compressors and the
    indexer's selection."""
    path, theirs, config = hf_dir
    ours = load_model(path)
    assert ours.config == config
    x = ids(config)
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)  # nanoseek's labels are the next tokens
    with torch.no_grad():
        out, ref = ours(x, labels=labels), theirs(x, labels=x)
    assert ref.logits.abs().max() > 1
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_each_v4_branch_changes_the_logits(hf_dir):
    """The parity above is not vacuous: the indexer's choice, the sinks, the HCA entries, the
    window and the hash table each move the logits."""
    path, _, config = hf_dir
    model = load_model(path)
    x = ids(config)
    with torch.no_grad():
        base = model(x).logits
        layers = model.model.layers
        for change in (lambda: layers[1].self_attn.compressor.indexer.q_b_proj.weight.neg_(),
                       lambda: layers[0].self_attn.sinks.add_(3.0),
                       lambda: layers[2].self_attn.compressor.kv_proj.weight.neg_(),
                       lambda: setattr(layers[3].self_attn, "window", 4),
                       lambda: layers[0].mlp.gate.tid2eid.copy_((layers[0].mlp.gate.tid2eid + 1) % 8)):
            change()
            assert (model(x).logits - base).abs().max() > 1e-3
            model = load_model(path)
            layers = model.model.layers


def test_hash_routed_gate_picks_experts_by_token_id_alone():
    config = preset("v4-tiny")
    torch.manual_seed(0)
    model = Transformer(config)
    gate = model.model.layers[0].mlp.gate
    assert gate.hashed and gate.e_score_correction_bias is None and not model.model.layers[2].mlp.gate.hashed
    table = gate.tid2eid
    assert table.dtype == torch.long and all(len(set(row.tolist())) == 2 for row in table)  # K distinct experts
    tokens = torch.tensor([5, 5, 9])
    weights, experts, _ = gate(torch.randn(3, config.hidden_size), tokens)
    assert torch.equal(experts, table[tokens])
    torch.testing.assert_close(weights.sum(-1), torch.full((3,), config.routed_scaling_factor))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trips_through_transformers(hf_dir, tmp_path):
    """nanoseek saves what transformers saves (config.json and tensor names); transformers loads it
    with equal logits; nanoseek reloads it exactly; transformers' in-memory layout (stacked experts,
    save_original_format=False) loads too."""
    path, theirs, config = hf_dir
    ours = load_model(path)
    save_model(ours, tmp_path / "ours")
    assert set(read_tensors(tmp_path / "ours")) == set(read_tensors(path))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "deepseek_v4"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = ids(config, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, theirs(x).logits, atol=0, rtol=0)
    again = load_model(tmp_path / "ours")
    for key, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], t), key
    theirs.save_pretrained(tmp_path / "stacked", save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in read_tensors(tmp_path / "stacked"))
    stacked = load_model(tmp_path / "stacked")
    for key, t in ours.state_dict().items():
        assert torch.equal(stacked.state_dict()[key], t), key


def test_bf16_load_keeps_the_routing_table_integral(hf_dir):
    path, _, _ = hf_dir
    model = load_model(path, dtype="bfloat16")
    assert model.model.layers[0].mlp.gate.tid2eid.dtype == torch.long
    assert model.model.layers[0].self_attn.sinks.dtype == torch.float32


# ---------------------------------------------------------------- packed rows


def test_packed_documents_do_not_see_each_other():
    """documents= (packed training rows): the first document's logits are its own forward's, and
    the second's do not depend on the first's tokens (window, entries and indexer stay inside)."""
    config = preset("v4-tiny")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = ids(config, batch=1)
    documents = (torch.arange(T) >= 21).long().unsqueeze(0)  # a second document from position 21
    other = x.clone()
    other[0, :21] = ids(config, seed=5, batch=1, length=21)
    with torch.no_grad():
        packed = model(x, documents=documents).logits
        alone = model(x[:, :21]).logits
        changed = model(other, documents=documents).logits
    torch.testing.assert_close(packed[:, :21], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed[:, 21:], packed[:, 21:], atol=1e-5, rtol=1e-5)
    assert (changed[:, :21] - packed[:, :21]).abs().max() > 1e-3


# ---------------------------------------------------------------- training and the engine


def test_pretrain_v4_tiny_updates_learned_routers_only(corpus, tmp_path):
    """Three steps of `nanoseek pretrain` with preset=v4-tiny on CPU, with a sample: the checkpoints
    are DeepseekV4 ones transformers loads with nanoseek's logits; the aux-loss-free bias moves in the learned-router
    layers, the hash layers have no bias and keep their table; the frozen indexer stays as it was."""
    from nanoseek.train import pretrain
    from nanoseek.train.checkpointing import list_checkpoints
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig

    recipe = __file__.rsplit("/", 2)[0] + "/configs/pretrain_tiny.toml"
    cfg = load_run_config(PretrainConfig, recipe, [
        f"out_dir={tmp_path / 'run'}", f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}",
        "preset=v4-tiny", "max_steps=3", "eval_every=0", "save_every=1", "sample_every=3", "sample_tokens=6"])
    pretrain.train(cfg)
    first, last = list_checkpoints(tmp_path / "run")  # steps 2 and 3 (the recipe keeps two)
    before, after = read_tensors(first), read_tensors(last)
    for layer in (0, 1):  # hash_moe
        assert f"model.layers.{layer}.ffn.gate.bias" not in after
        assert torch.equal(before[f"model.layers.{layer}.ffn.gate.tid2eid"], after[f"model.layers.{layer}.ffn.gate.tid2eid"])
    for layer in (2, 3):  # moe: the bias update ran
        assert not torch.equal(before[f"model.layers.{layer}.ffn.gate.bias"], after[f"model.layers.{layer}.ffn.gate.bias"])
    assert torch.equal(before["model.layers.1.attn.indexer.wq_b.weight"], after["model.layers.1.attn.indexer.wq_b.weight"])
    assert not torch.equal(before["model.layers.1.attn.compressor.wkv.weight"],
                           after["model.layers.1.attn.compressor.wkv.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    assert any("sample" in m for m in metrics)  # sample_every: the engine generated with the V4 model
    ours = load_model(last)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(last).eval()
    x = ids(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_v4_model_init_is_trainable_size():
    model = Transformer(preset("v4-tiny"))
    assert isinstance(model.model.layers[0].mlp.gate, Gate)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".indexer." in n for n in frozen)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert all(isinstance(m, nn.Module) for m in model.model.layers)


def test_info_counts_every_v4_layer(capsys):
    """`nanoseek info`: V4's layers differ by attention type, so each is counted; no MLA cache figure."""
    assert cli_main(["info", "--preset", "v4-tiny"]) == 0
    text = capsys.readouterr().out
    assert f"({Transformer(preset('v4-tiny')).num_parameters():,} /" in text
    assert "MHA equiv." not in text and "13.0 values per token and layer" in text
    assert "nanoseek's engine: 224 values per token and layer" in text  # 32 + CSA's 4 x 32 + 4 x 16
    assert cli_main(["info", "--preset", "v4-tiny", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)  # the compressed entries' growth, not an MLA latent
    assert stats["attention"] == "DeepSeek-V4" and "mla_cache_bytes_per_token" not in stats
    assert stats["kv_cache_bytes_per_token"] == 13.0 * 2 * 4  # values x bf16 bytes x layers


def test_v4_pretraining_resumes_exactly_under_muon(corpus, tmp_path):
    """"Train 4" equals "train 2, resume to 4" (the checkpoint's DeepSeek names map back onto the
    model), with Muon, which must leave the compressors' 2-D position biases to AdamW."""
    from nanoseek.train import pretrain
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig
    from nanoseek.train.trainer import build_optimizers

    recipe = __file__.rsplit("/", 2)[0] + "/configs/pretrain_tiny.toml"
    common = [f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}", "preset=v4-tiny",
              "eval_every=0", "optimizer=muon"]
    pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / 'a'}", "max_steps=4", *common]))
    pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / 'b'}", "max_steps=2", *common]))
    pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / 'b'}", "max_steps=4", *common]),
                   resume="latest")
    a, b = read_tensors(tmp_path / "a" / "checkpoint-4"), read_tensors(tmp_path / "b" / "checkpoint-4")
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = Transformer(preset("v4-tiny"))
    muon, adamw = build_optimizers(model, load_run_config(PretrainConfig, recipe, common))
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    biases = [p for name, p in model.named_parameters() if name.endswith("position_bias") and p.requires_grad]
    assert biases and not any(id(p) in in_muon for p in biases)
    assert id(model.model.layers[1].self_attn.compressor.kv_proj.weight) in in_muon


# ---------------------------------------------------------------- the inference engine


def perturbed(scale: float, seed: int = 0, **fields) -> Transformer:
    """v4-tiny with every parameter moved off its init by N(0, scale) (zero sinks and position biases,
    unit norms and near-uniform mHC mixing would hide a mistake)."""
    torch.manual_seed(seed)
    model = Transformer(preset("v4-tiny", **fields)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_cached_forward_equals_the_no_cache_forward():
    """A prefill of 13 (past the window and both rates), a chunk of 9 on that past (across an HCA
    window's end) and single tokens to 40, on the cache, give the no-cache forward's logits."""
    model = perturbed(0.05)
    assert model.cache_dims == latent_cache_dims(model.config) == (32, 4 * 32 + 4 * 16)  # CSA: the widest row
    assert_cached_decoding_matches(model, ids(model.config, batch=3), prefill=13, chunk_end=22, max_len=T)


@pytest.fixture(scope="module")
def v4_checkpoint(tmp_path_factory):
    """A perturbed v4-tiny saved with a tokenizer, as the CLIs and the server load it."""
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog. 12 + 3 = 15."] * 20, vocab_size=300)
    model = perturbed(0.1, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    path = tmp_path_factory.mktemp("v4") / "ck"
    save_model(model, path, tokenizer=tok)
    return path, model


def test_engine_greedy_equals_no_cache_greedy_with_batching_prefix_hits_and_preemption(v4_checkpoint):
    """24 tokens per prompt (to 37 positions: past the window, both rates and the indexer's top 3)
    through the engine, batched at three lengths, with prefix-cache hits (engine_greedy), without
    the prefix cache, and preempted for want of cache blocks: every token is the argmax of a
    forward without a cache over the whole sequence."""
    path, model = v4_checkpoint
    expected = [reference_greedy(model, p, 24) for p in PROMPTS]
    assert engine_greedy(path, 24) == expected
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(path, block_size=4, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy)] == expected
    small = LLM(path, block_size=4, num_cache_blocks=14, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in small.generate(PROMPTS, greedy)] == expected
    assert small.stats()["num_preemptions"] > 0


def test_generate_chat_and_eval_clis_run_a_v4_checkpoint(v4_checkpoint, capsys, monkeypatch):
    import io

    path, model = v4_checkpoint
    llm = LLM(path)
    expected = llm.generate("the fox", SamplingParams(temperature=0, max_tokens=12))[0]
    assert expected.outputs[0].token_ids == reference_greedy(model, expected.prompt_token_ids, 12)[
        : len(expected.outputs[0].token_ids)]
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(path), "--prompt", "the fox", "--max-tokens", "12",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == f"[0] the fox{expected.outputs[0].text}  ({expected.outputs[0].finish_reason})\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert cli_main(["chat", "--model", str(path), "--max-tokens", "5", "--temperature", "0"]) == 0
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    reply = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text
    assert capsys.readouterr().out.replace("> ", "") == reply + "\n"
    assert cli_main(["eval", "--model", str(path), "--n", "2", "--max-tokens", "4", "--task", "chain_sum"]) == 0
    assert "chain_sum" in capsys.readouterr().out


def test_server_answers_through_the_openai_client(v4_checkpoint):
    from openai import OpenAI
    from server_thread import ServerThread

    from nanoseek.serve.api import create_app

    path, _ = v4_checkpoint
    engine = LLM(path, block_size=4)
    expected = engine.generate("the fox", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    with ServerThread(create_app(engine, model_name="v4")) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        reply = client.completions.create(model="v4", prompt="the fox", max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
