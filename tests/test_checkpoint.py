"""HF-format checkpoints: parity with transformers both ways, MTP, sharding, FP8, errors, atomicity."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import dequantize_fp8, read_tensors
from nanoseek.config import preset
from nanoseek.errors import CheckpointError
from nanoseek.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

HF_TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128,
    num_nextn_predict_layers=0,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}

HF_CONFIGS = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": None},
    "groups_4": {"n_routed_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    "yarn": {"rope_scaling": YARN, "rope_theta": 10000.0},
    "half_split_rope": {"rope_interleave": False},  # rotary dims stored half-split, not as pairs
    "norm_eps": {"rms_norm_eps": 1e-2},  # the q / kv latent norms keep 1e-6, as in transformers
    "v3_routing": {"n_routed_experts": 256, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8},  # V3's
    "head_dims": {"v_head_dim": 12, "first_k_dense_replace": 2, "rope_theta": 5e4},  # v != nope, 2 dense layers
}


def hf_model(**overrides):
    cfg = transformers.DeepseekV3Config(**{**HF_TINY, **overrides})
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial routing: random correction biases, larger router weights
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_transformers_checkpoint_loads_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    hf = hf_model(**HF_CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_transformers_loads_nanoseek_checkpoint_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    kw = {k: v for k, v in {**HF_TINY, **HF_CONFIGS[name]}.items()}
    ours = Transformer(nanoseek.ModelConfig(**kw)).eval()
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "e_score_correction_bias") and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    nanoseek.save_model(ours, tmp_path / "ck")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_checkpoint_with_mtp_layers_loads_in_transformers_and_round_trips(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(preset("tiny", num_nextn_predict_layers=1)).eval()
    nanoseek.save_model(ours, tmp_path / "ck")
    keys = read_tensors(tmp_path / "ck")
    L = ours.config.num_hidden_layers
    # stored like the released V3 files: the MTP block at layer index num_hidden_layers, with copies
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{L}.{key}" in keys
    back = nanoseek.load_model(tmp_path / "ck")
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ck").eval()  # ignores the MTP layer
    ids = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_checkpoint_without_mtp_weights_loads_main_model(tmp_path):
    torch.manual_seed(0)
    hf = hf_model(num_nextn_predict_layers=1)  # transformers saves no MTP weights
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP"):
        ours = nanoseek.load_model(tmp_path)
    assert len(ours.mtp_layers) == 0


def test_sharded_checkpoint_round_trip(tmp_path):
    model = Transformer(preset("tiny"))
    nanoseek.save_model(model, tmp_path / "ck", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = nanoseek.load_model(tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_bias_stays_fp32_in_bf16_load(tmp_path):
    nanoseek.save_model(Transformer(preset("tiny")), tmp_path / "ck")
    model = nanoseek.load_model(tmp_path / "ck", dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


# ---------------------------------------------------------------- FP8


def quantize_fp8(w: torch.Tensor, block: int = 128):
    """Reference block quantization: s = amax/448 per 128x128 block (ragged edges zero-padded)."""
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(gr * block, gc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(gr, block, gc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (gr, gc)
    q = (blocks / scale[:, None, :, None]).view(gr * block, gc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def test_fp8_dequant_handles_ragged_576_row_blocks():
    torch.manual_seed(0)
    w = torch.randn(576, 200)
    q, scale = quantize_fp8(w)
    assert scale.shape == (5, 2)
    deq = dequantize_fp8(q, scale)
    assert deq.shape == w.shape
    assert ((deq - w).abs().max() / w.abs().max()) < 0.07  # e4m3 has 3 mantissa bits
    torch.testing.assert_close(deq[512:, 128:], q[512:, 128:].float() * scale[4, 1])


def test_fp8_checkpoint_dequantizes_on_load(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", num_nextn_predict_layers=0)).eval()
    nanoseek.save_model(model, tmp_path / "ck")
    ck = tmp_path / "ck"
    tensors = load_file(ck / "model.safetensors")
    expected = dict(tensors)
    for key, t in list(tensors.items()):
        if key.endswith("proj.weight") and "eh_proj" not in key and t.dim() == 2:  # what V3 stores in FP8
            q, scale = quantize_fp8(t, block=16)
            tensors[key], tensors[key.replace("weight", "weight_scale_inv")] = q, scale
            expected[key] = dequantize_fp8(q, scale, (16, 16))
    save_file(tensors, ck / "model.safetensors")
    config = json.loads((ck / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [16, 16]}
    (ck / "config.json").write_text(json.dumps(config))
    loaded = nanoseek.load_model(ck)
    for key, t in loaded.state_dict().items():
        torch.testing.assert_close(t, expected[key], msg=key)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():  # close to the unquantized model
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 0.05


# ---------------------------------------------------------------- errors


def saved(tmp_path):
    nanoseek.save_model(Transformer(preset("tiny")), tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ck = saved(tmp_path)
    t = load_file(ck / "model.safetensors")
    del t["model.norm.weight"]
    t["model.extra.weight"] = torch.zeros(2)
    save_file(t, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.norm\.weight") as e:
        nanoseek.load_model(ck)
    assert "unexpected keys (1): model.extra.weight" in str(e.value)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    ck = saved(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["kv_lora_rank"] = 24
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        nanoseek.load_model(ck)
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight: checkpoint has (24, 64), " \
           "config.json implies (32, 64)" in str(e.value)


def test_unsupported_config_value_and_missing_config(tmp_path):
    ck = saved(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nanoseek.NanoseekError, match="hidden_act"):
        nanoseek.load_model(ck)
    (ck / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="model_type 'mistral' is not supported; .* deepseek_v3, "):
        nanoseek.load_model(ck)
    (ck / "config.json").write_text('{"model_type":')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        nanoseek.load_model(ck)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        nanoseek.load_model(ck)
    with pytest.raises(CheckpointError, match="does not exist"):
        nanoseek.load_model(tmp_path / "nowhere")


def test_a_cut_short_or_garbled_weights_file_is_an_error_not_garbage(tmp_path):
    """A model.safetensors cut short (a copy that stopped, a full disk) loaded without a word: the
    missing bytes of its last tensors were torch.empty's garbage."""
    ck = saved(tmp_path)
    file = ck / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=f"{file} is truncated: {len(data) - 1000} bytes, its header describes {len(data)}"):
        read_tensors(ck)
    with pytest.raises(CheckpointError, match="truncated"):
        nanoseek.load_model(ck)
    file.write_bytes(data[:5000])  # the header itself cut
    with pytest.raises(CheckpointError, match="header does not read"):
        read_tensors(ck)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    ck = saved(tmp_path)
    before = (ck / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("nanoseek.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        nanoseek.save_model(Transformer(preset("tiny")), ck)
    assert (ck / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left behind


# ---------------------------------------------------------------- CLI


def test_info_reports_v3_sizes(capsys):
    from nanoseek.cli import main

    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B total, 37.55B activated" in out
    assert "576 values/layer" in out and "71.1x smaller" in out


def test_cli_user_error_exits_nonzero_without_traceback(capsys, tmp_path):
    from nanoseek.cli import main

    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text("{}")  # a checkpoint's file passed for its directory
    assert main(["info", "--model", str(tmp_path / "config.json")]) == 2
    assert capsys.readouterr().err == (f"nanoseek info: error: {tmp_path / 'config.json'} is a file, not a checkpoint "
                                       f"directory: pass the directory that holds config.json and the weights "
                                       f"(here {tmp_path})\n")


@pytest.mark.parametrize("routing", [
    dict(topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0),  # V2-Lite
    dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,  # V2
         n_routed_experts=16, num_experts_per_tok=3),
], ids=["greedy", "group_limited_greedy"])
def test_deepseek_v2_lite_style_checkpoint_round_trips_with_transformers(tmp_path, routing):
    """V2's softmax routers (V2-Lite's greedy, V2's group-limited), uncompressed q_proj, two shared
    experts: both directions."""
    torch.manual_seed(0)
    kw = {**HF_TINY, "q_lora_rank": None, "n_shared_experts": 2, **routing}
    kw.pop("num_nextn_predict_layers")
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kw)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = nanoseek.load_model(tmp_path / "hf")
    assert ours.config.scoring_func == "softmax" and ours.config.num_nextn_predict_layers == 0
    nanoseek.save_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_deepseek_v2_config_with_transformers_defaults_reads_as_v2(tmp_path):
    """A V2 config.json as transformers writes it by default (n_group / topk_group null, no
    routed_scaling_factor override): it loads, routes as V2 (no renormalised top-k, scale 1, every
    layer MoE), and gives transformers' logits. Fields left out mean V2's defaults, not V3's."""
    torch.manual_seed(0)
    kw = {k: v for k, v in HF_TINY.items() if k not in ("n_group", "topk_group", "first_k_dense_replace",
                                                           "num_nextn_predict_layers")}
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**kw)).eval()
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("n_group") is None and saved.get("topk_group") is None
    ours = nanoseek.load_model(tmp_path)
    cfg = ours.config
    assert (cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.first_k_dense_replace) \
        == (1, 1, False, 1.0, 0)
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    bare = {k: v for k, v in saved.items() if k not in ("norm_topk_prob", "routed_scaling_factor",
                                                         "first_k_dense_replace", "n_group", "topk_group")}
    assert nanoseek.ModelConfig.from_dict(bare) == cfg
