"""DeepSeek-V3.2's sparse attention (DSA): config and checkpoints both ways with transformers'
DeepseekV32ForCausalLM, that the top-k restriction is really applied, the cached (absorbed) paths,
the engine against transformers' generate, FP8 indexer weights, `nanoseek info`, and training.

The tiny model keeps index_topk (4) well below the sequence lengths (16-24), so sparsity changes
every output. It uses 16 index heads: a key that every index head scores <= 0 gets exactly 0,
and exact ties at the top-k boundary are broken differently by torch.topk (transformers) and
nanoseek's stable sort (the earlier position); with J heads that happens for a key with
probability 2^-J, so with 16 heads the fixed seeds here meet none.
"""

import json
import os
import warnings

import pytest
import torch
from decoding_checks import PROMPTS, assert_cached_decoding_matches, engine_greedy
from eager_graphs import eager_record
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.checkpoint import dequantize_fp8, read_tensors
from nanoseek.cli import main as cli_main
from nanoseek.config import ModelConfig, preset
from nanoseek.errors import ConfigError
from nanoseek.model.attention import MLA, ContiguousCache
from nanoseek.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

V32_TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=128,
    index_topk=4, index_head_dim=32, index_n_heads=16,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}  # cos/sin scaled by 0.96: the indexer's too


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial routing and indexer norms (both init to constants): random correction biases and
    router weights, k_norm weight and bias away from 1 and 0."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                t.normal_(0, 0.3)
            elif "indexer.k_norm" in name:
                t.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model


def hf_model(**overrides):
    cfg = transformers.DeepseekV32Config(**{**V32_TINY, **overrides})
    return perturb(transformers.DeepseekV32ForCausalLM(cfg)).eval()


def ours(**overrides) -> Transformer:
    return perturb(Transformer(ModelConfig(**{**V32_TINY, **overrides}))).eval()


# ---------------------------------------------------------------- config and checkpoints


def test_config_fields_and_errors():
    config = ModelConfig(**V32_TINY)
    d = config.to_dict()
    assert d["model_type"] == "deepseek_v32" and d["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (d["index_topk"], d["index_head_dim"], d["index_n_heads"]) == (4, 32, 16)
    assert ModelConfig.from_dict(d) == config
    # a V3 config writes no DSA field (its config.json is what it was before V3.2 existed)
    v3 = preset("tiny").to_dict()
    assert v3["model_type"] == "deepseek_v3" and not any(k.startswith("index_") for k in v3)
    # a V3.2 file that leaves the fields out means DeepseekV32Config's defaults
    bare = {k: v for k, v in d.items() if not k.startswith("index_")}
    assert ModelConfig.from_dict(bare).index_topk == 2048
    with pytest.raises(ConfigError, match="index_head_dim=None.*all set"):
        ModelConfig(**{**V32_TINY, "index_head_dim": None})
    with pytest.raises(ConfigError, match="index_head_dim=8.*qk_rope_head_dim"):
        ModelConfig(**{**V32_TINY, "index_head_dim": 8})
    with pytest.raises(ConfigError, match="q_lora_rank.*query latent"):
        ModelConfig(**{**V32_TINY, "q_lora_rank": None})


@pytest.mark.parametrize("rope", ["plain", "yarn"])
def test_transformers_checkpoint_loads_with_same_logits(rope, tmp_path):
    torch.manual_seed(0)
    hf = hf_model(**({"rope_scaling": YARN} if rope == "yarn" else {}))
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP"):  # transformers saves no MTP layer
        model = nanoseek.load_model(tmp_path)
    assert model.config.sparse_attention and model.model.layers[0].self_attn.indexer is not None
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_nanoseek_checkpoint_loads_in_transformers_with_same_logits_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ours(num_nextn_predict_layers=1)
    nanoseek.save_model(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["architectures"] == ["DeepseekV32ForCausalLM"]
    keys = read_tensors(tmp_path / "ck")
    for layer in (0, 3):  # a main layer and the MTP module (model.layers.61 in the release)
        for name in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
            assert f"model.layers.{layer}.self_attn.indexer.{name}" in keys
    back = nanoseek.load_model(tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its note on the MTP layer it drops
        hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert hf.config.index_topk == 4
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_fp8_indexer_weights_dequantize_and_fp32_ones_load(tmp_path):
    """As released: wq_b and wk in FP8 with weight_scale_inv, weights_proj and k_norm unquantized in
    fp32 (the rest here bf16), loaded into a bf16 model; its logits stay close to the fp32 model's."""
    torch.manual_seed(0)
    model = ours(num_nextn_predict_layers=0)
    nanoseek.save_model(model, tmp_path / "ck")
    ck = tmp_path / "ck"
    tensors, expected = load_file(ck / "model.safetensors"), {}
    for key, t in list(tensors.items()):
        if key.endswith(("indexer.wq_b.weight", "indexer.wk.weight")):
            blocks = t.view(t.shape[0] // 16, 16, t.shape[1] // 16, 16)  # 16x16 blocks (the release's are 128x128)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).view(t.shape).to(torch.float8_e4m3fn)
            tensors[key], tensors[key.replace("weight", "weight_scale_inv")] = q, scale
            expected[key] = dequantize_fp8(q, scale, (16, 16))
        elif "indexer" not in key:
            tensors[key] = t.to(torch.bfloat16)
        expected.setdefault(key, tensors[key].float())
    save_file(tensors, ck / "model.safetensors")
    config = json.loads((ck / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [16, 16]}
    (ck / "config.json").write_text(json.dumps(config))
    loaded = nanoseek.load_model(ck, dtype="bfloat16")
    indexer = loaded.model.layers[1].self_attn.indexer
    assert indexer.wk.weight.dtype == indexer.weights_proj.weight.dtype == torch.bfloat16
    for key, t in loaded.state_dict().items():
        torch.testing.assert_close(t.float(), expected[key].to(t.dtype).float(), msg=key)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (loaded(ids).logits.float() - model(ids).logits).abs().max() < 0.1


# ---------------------------------------------------------------- the restriction


def test_top_k_restricts_attention_and_covers_the_packed_row_mask():
    """With index_topk < T the logits are not dense attention's; with index_topk >= T they are V3's
    (same weights, no indexer). Packed rows: the indexer sees only each document's own tokens."""
    torch.manual_seed(0)
    sparse = ours(num_nextn_predict_layers=0)
    dense_config = ModelConfig(**{**V32_TINY, "num_nextn_predict_layers": 0,
                                  "index_topk": None, "index_head_dim": None, "index_n_heads": None})
    dense = Transformer(dense_config).eval()
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if ".indexer." not in k})
    wide = Transformer(sparse.config.replace(index_topk=24)).eval()
    wide.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        restricted, full = sparse(ids).logits, dense(ids).logits
        torch.testing.assert_close(wide(ids).logits, full, atol=1e-5, rtol=0)
    # the first index_topk positions see at most index_topk tokens: the same either way
    torch.testing.assert_close(restricted[:, :4], full[:, :4], atol=1e-5, rtol=0)
    assert (restricted[:, 5:] - full[:, 5:]).abs().amax(-1).min() > 1e-3  # every later position differs

    docs = [torch.randint(3, 256, (1, n)) for n in (9, 12, 5)]
    row = torch.cat(docs, dim=1)
    documents = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        packed = sparse(row, documents=documents).logits
        alone = torch.cat([sparse(d).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_cached_decode_equals_the_no_cache_forward():
    """Prefill (expanded, fewer tokens than index_topk), a chunk on a past and single tokens
    (absorbed, the indexer keys read back from the cache rows, the top-k rows gathered) equal one
    forward without a cache at every position; the MTP block's indexer on its own cache layer too."""
    torch.manual_seed(0)
    model = ours(num_nextn_predict_layers=1)
    assert model.cache_dims == (16, 48)  # the key row: k_pe, then the indexer key
    assert_cached_decoding_matches(model, torch.randint(0, 256, (3, 20)), 3, 10, mtp_split=12, max_len=24)


def test_sparse_decode_gathers_the_rows_the_masked_path_attends(monkeypatch):
    """A decode step attends to its gathered top-k rows (`_absorbed_sparse`); the result equals the
    masked dense path's, also for a query that sees fewer than index_topk tokens (row 0 at
    position 2 of a batch padded to 16 positions) and for a short multi-token run."""
    import nanoseek.model.attention as attention

    torch.manual_seed(0)
    model = ours()
    mla, cfg = model.layers[1].self_attn, model.config
    x = torch.randn(2, 2, cfg.hidden_size)
    positions = torch.tensor([[2, 3], [14, 15]])

    def run():
        cache = ContiguousCache(cfg, batch_size=2, max_len=16)
        torch.manual_seed(1)  # the same cached past for both paths
        cache.latent.normal_()
        cache.k_pe.normal_()
        cache.length = 16
        return mla(x, positions, model.rope(positions), cache, layer_idx=0)

    gathered, sparse = [], MLA._absorbed_sparse
    monkeypatch.setattr(MLA, "_absorbed_sparse", lambda self, *a: gathered.append(a[-2]) or sparse(self, *a))
    with torch.no_grad():
        out_sparse = run()
        assert gathered and gathered[0].shape == (2, 2, 4)  # (B, T, index_topk) rows gathered, not S = 16
        monkeypatch.setattr(attention, "SPARSE_DECODE_MAX_TOKENS", 0)  # the masked dense path
        out_masked = run()
    assert len(gathered) == 1
    torch.testing.assert_close(out_sparse, out_masked, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- engine


def test_engine_greedy_equals_transformers_generate_with_batching_and_prefix_hits(tmp_path):
    torch.manual_seed(3)
    nanoseek.save_model(ours(num_nextn_predict_layers=0), tmp_path / "ck")
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "ck").eval()
    hf.generation_config.eos_token_id = None
    n = 14  # the 3-token prompt grows from below index_topk (4) to 17 tokens

    def hf_greedy(prompt):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    assert engine_greedy(tmp_path / "ck", n) == [hf_greedy(p) for p in PROMPTS]


def test_graph_path_and_mtp_speculation_give_the_eager_tokens(monkeypatch):
    """The CUDA-graph path's padding (rows, and cache spans rounded up to a power of two of blocks:
    more invisible positions in each indexer row) and MTP speculation (a verify of k+1 tokens on a
    past; the MTP block's own indexer) change no token. The capture is replaced by a rerun of the
    forward on the static inputs (tests/eager_graphs.py), so this runs on the CPU."""
    from nanoseek.inference.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "_record", eager_record)
    torch.manual_seed(1)
    model = ours(num_nextn_predict_layers=1)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42, 43, 44] * 3]
    greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (14, 6, 10)]
    expected = [o.outputs[0].token_ids for o in LLM(model, block_size=4).generate(prompts, greedy)]
    for speculative in (0, 2):
        graphed = LLM(model, block_size=4, speculative_mtp=speculative, speculative_max_batch=4)
        graphed.runner.cuda_graphs, graphed.runner.graphs_need_bf16 = True, False
        assert [o.outputs[0].token_ids for o in graphed.generate(prompts, greedy)] == expected
        assert len({span for _, _, span, _ in graphed.runner.graphs}) > 1  # several padded spans
        assert graphed.stats()["spec_draft_tokens"] > 0 if speculative else True


def test_info_counts_the_indexer_key_in_the_cache(tmp_path, capsys):
    nanoseek.save_model(ours(), tmp_path / "ck")
    assert cli_main(["info", "--model", str(tmp_path / "ck"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    # 3 layers x (latent 16 + rotary key 16 + indexer key 32) x 2 bytes
    assert figures["kv_cache_bytes_per_token"] == 3 * (16 + 16 + 32) * 2
    assert cli_main(["info", "--model", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "64 values/layer" in out and "DSA indexer key 32 values/layer" in out and "top 4 tokens" in out


# ---------------------------------------------------------------- training


def test_pretraining_a_v32_model_with_indexer_lambda_0_trains_all_but_the_indexer(corpus, tmp_path):
    """Two steps of `nanoseek pretrain` on a V3.2 model (model.index_* overrides of the tiny recipe)
    with the indexer's loss off: from step 1 to step 2 every attention weight moves, the indexer's
    (frozen, no gradient) do not. (With its loss on: test_dsa_train.py.)"""
    from nanoseek.train import pretrain
    from nanoseek.train.config import load_run_config
    from nanoseek.train.checkpointing import list_checkpoints
    from nanoseek.train.pretrain import PretrainConfig

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_tiny.toml")
    cfg = load_run_config(PretrainConfig, recipe, [
        f"out_dir={tmp_path / 'run'}", f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}",
        "max_steps=2", "eval_every=0", "save_every=1", "indexer_lambda=0",
        "model.index_topk=4", "model.index_head_dim=16", "model.index_n_heads=4"])
    pretrain.train(cfg)
    first, second = list_checkpoints(tmp_path / "run")  # after steps 1 and 2
    assert json.loads((second / "config.json").read_text())["model_type"] == "deepseek_v32"
    before, after = read_tensors(first), read_tensors(second)
    moved = {k: not torch.equal(v, after[k]) for k, v in before.items()}
    assert any(".indexer." in k for k in moved) and not any(moved[k] for k in moved if ".indexer." in k)
    assert all(moved[k] for k in moved if k.endswith(("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")))
