"""DeepSeek-V4's manifold-constrained hyper-connections (mHC) in the V3 model: the mixing math
against transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead / DeepseekV4DecoderLayer,
Sinkhorn's doubly stochastic output, the config and checkpoint format (transformers must refuse
it), the cached paths and the engine (prefix cache, graphs, MTP speculation), and training
(the optimizer split, a pretraining run with model.hc_mult).

Tests perturb the hyper-connections' parameters: at V4's init (base 0, scale 1, fn ~ N(0, 0.02))
every token gets nearly the same mixing, which would hide a per-token mistake.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from decoding_checks import PROMPTS, assert_cached_decoding_matches, engine_greedy, reference_greedy
from eager_graphs import eager_record

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.checkpoint import load_model, read_tensors
from nanoseek.cli import main as cli_main
from nanoseek.config import ModelConfig, preset
from nanoseek.errors import ConfigError
from nanoseek.model.decoder import DecoderBlock
from nanoseek.model.hyper import HyperConnection, HyperHead, sinkhorn
from nanoseek.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
V4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
pytestmark = pytest.mark.usefixtures("one_thread")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Per-token mixings far from uniform: larger fn, random base and scale (and routing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_hc.fn", "hc_head.hc_fn")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("_hc.base", "hc_head.hc_base")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(("_hc.scale", "hc_head.hc_scale")):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def ours(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return perturb(Transformer(preset("tiny", hc_mult=3, **overrides)), seed).eval()


# eps values apart, so that a mix-up of the norm's eps (rms_norm_eps) and mHC's (hc_eps) shows
HC = dict(hc_mult=3, hidden_size=16, hc_sinkhorn_iters=7, hc_eps=1e-3, rms_norm_eps=1e-2)


def v4_config():
    return transformers.DeepseekV4Config(
        **HC, vocab_size=32,
        num_hidden_layers=1, num_attention_heads=2, head_dim=8, q_lora_rank=8, o_lora_rank=8, o_groups=2,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, index_n_heads=2, index_head_dim=8)


def random_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.numel() <= 3 else 0.0))
    return module


# ---------------------------------------------------------------- the math against transformers


def test_hyper_connection_and_head_match_transformers():
    cfg = v4_config()
    theirs = random_(V4.DeepseekV4HyperConnection(cfg), 0)
    mine = HyperConnection(SimpleNamespace(**HC))
    mine.load_state_dict(theirs.state_dict())
    streams = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(1))
    post, comb, collapsed = theirs(streams)
    pre_mine, post_mine, comb_mine = mine.coefficients(streams)
    torch.testing.assert_close(post_mine, post, atol=1e-6, rtol=0)
    torch.testing.assert_close(comb_mine, comb, atol=1e-6, rtol=0)
    assert comb.std(dim=(0, 1)).min() > 0.01  # the mixing really differs between tokens
    seen = []
    f = nn.Linear(16, 16)
    out = mine(streams, lambda h: seen.append(h) or f(h))
    torch.testing.assert_close(seen[0], collapsed, atol=1e-6, rtol=0)  # the sub-block's input: pre's collapse
    # DeepseekV4DecoderLayer's update: post (x) f(collapsed) + comb^T @ streams
    expected = post.unsqueeze(-1) * f(collapsed).unsqueeze(-2) + comb.transpose(-1, -2) @ streams
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)

    head_theirs = random_(V4.DeepseekV4HyperHead(cfg), 2)
    head_mine = HyperHead(SimpleNamespace(**HC))
    head_mine.load_state_dict(head_theirs.state_dict())
    torch.testing.assert_close(head_mine(streams), head_theirs(streams), atol=1e-6, rtol=0)


class Stub(nn.Module):
    """A sub-block stand-in that takes either caller's arguments: tanh(W x)."""

    def __init__(self, linear: nn.Linear, returns_tuple: bool):
        super().__init__()
        self.linear, self.returns_tuple = linear, returns_tuple

    def forward(self, h, *args, **kwargs):
        out = torch.tanh(self.linear(h))
        return (out, None) if self.returns_tuple else out


def test_decoder_block_stream_update_matches_transformers_decoder_layer():
    """nanoseek's DecoderBlock with mHC and DeepseekV4DecoderLayer, their attention and FFN replaced
    by the same stand-ins and with the same norm and hyper-connection weights, give the same streams."""
    cfg = v4_config()
    theirs = V4.DeepseekV4DecoderLayer(cfg, 0)
    attention, ffn = nn.Linear(16, 16), nn.Linear(16, 16)
    theirs.self_attn, theirs.mlp = Stub(attention, True), Stub(ffn, False)
    random_(theirs, 3)
    config = SimpleNamespace(**HC)
    mine = DecoderBlock(config, Stub(attention, False), Stub(ffn, False), 0)
    mine.load_state_dict(theirs.state_dict())
    streams = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs(streams, input_ids=None)
        torch.testing.assert_close(mine(streams, None, None), expected, atol=1e-6, rtol=0)


def test_init_is_v4s():
    """fn ~ N(0, initializer_range), base 0, scale 1 (DeepseekV4PreTrainedModel._init_weights)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", hc_mult=4, initializer_range=0.05))
    for hc in [model.model.layers[2].attn_hc, model.model.layers[0].ffn_hc]:  # an MTP block's, a main one's
        assert abs(hc.fn.std().item() - 0.05) < 0.005 and abs(hc.fn.mean().item()) < 0.005
        assert torch.equal(hc.base, torch.zeros(24)) and torch.equal(hc.scale, torch.ones(3))
    for head in (model.model.hc_head, model.model.layers[2].hc_head):
        assert abs(head.hc_fn.std().item() - 0.05) < 0.01
        assert torch.equal(head.hc_base, torch.zeros(4)) and torch.equal(head.hc_scale, torch.ones(1))


def test_sinkhorn_output_is_doubly_stochastic():
    """Columns sum to 1 (the last normalisation), rows nearly: 20 iterations leave 1e-4 on softmax
    logits of unit scale (sharper ones converge slower: 2e-2 at 2x the scale)."""
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0))
    comb = sinkhorn(torch.softmax(logits, dim=-1) + 1e-6, iters=20, eps=1e-6)
    assert (comb >= 0).all()
    torch.testing.assert_close(comb.sum(-2), torch.ones(64, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(64, 4), atol=2e-4, rtol=0)
    # non-expansive: a convex mix of the streams grows no stream's norm beyond the largest
    x = torch.randn(64, 4, 8)
    assert ((comb.transpose(-1, -2) @ x).norm(dim=-1).amax(-1) <= x.norm(dim=-1).amax(-1) * (1 + 1e-3)).all()
    # and in the model, the comb of a (strongly) perturbed hyper-connection: columns exact
    hc = ours().model.layers[1].ffn_hc
    _, _, comb = hc.coefficients(torch.randn(2, 5, 3, 64))
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 5, 3), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- config and checkpoints


def test_config_fields_and_errors():
    for name in ("tiny", "v2-lite", "v3"):  # hc off: the config.json of V3 / V2, no hc_* key
        d = preset(name).to_dict()
        assert not any(k.startswith("hc_") for k in d) and d["model_type"] in ("deepseek_v3", "deepseek_v2")
    d = preset("tiny", hc_mult=4).to_dict()
    assert d["model_type"] == "deepseek_v3_mhc" and d["architectures"] == ["DeepseekV3MHCForCausalLM"]
    assert (d["hc_mult"], d["hc_sinkhorn_iters"], d["hc_eps"]) == (4, 20, 1e-6)  # V4's defaults
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == preset("tiny", hc_mult=4)
    for bad in (dict(hc_mult=0), dict(hc_mult=True), dict(hc_mult="4"), dict(hc_mult=2, hc_sinkhorn_iters=0),
                dict(hc_mult=2, hc_eps=0.0)):
        with pytest.raises(ConfigError, match=next(iter(bad)) if len(bad) == 1 else list(bad)[1]):
            preset("tiny", **bad)


def test_hc_off_builds_todays_model():
    """Without hc_mult: no hyper-connection module or key, and the forward is the plain pre-norm
    residual, written out here (test_model.py / test_checkpoint.py check that model against transformers)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", num_nextn_predict_layers=0)).eval()
    assert not any("hc" in k for k in model.state_dict())
    assert all(layer.attn_hc is None and layer.ffn_hc is None for layer in model.layers) and model.model.hc_head is None
    ids = torch.randint(0, 512, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    rope = model.rope(positions)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        for layer in model.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), positions, rope, None, layer.layer_idx, None)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        torch.testing.assert_close(model(ids).logits, model.lm_head(model.model.norm(x)), atol=0, rtol=0)


def test_save_load_round_trip_keeps_the_hc_weights_in_fp32(tmp_path):
    model = ours()
    nanoseek.save_model(model, tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3_mhc" and d["hc_mult"] == 3
    keys = set(read_tensors(tmp_path / "ck"))
    assert {"model.layers.0.attn_hc.fn", "model.layers.1.ffn_hc.scale", "model.hc_head.hc_fn",
            "model.layers.2.hc_head.hc_base", "model.layers.2.attn_hc.base"} <= keys  # layer 2: the MTP module
    loaded = load_model(tmp_path / "ck")
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, labels=ids).mtp_loss, model(ids, labels=ids).mtp_loss, atol=0, rtol=0)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    bf16 = load_model(tmp_path / "ck", dtype="bfloat16")
    assert bf16.model.layers[0].attn_hc.fn.dtype == torch.float32 and bf16.model.hc_head.hc_scale.dtype == torch.float32
    assert bf16.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16(ids).logits.dtype == torch.bfloat16


def test_transformers_refuses_an_mhc_checkpoint(tmp_path):
    """transformers has no V3-with-mHC class: under model_type deepseek_v3 it would load the file as
    a plain V3 and drop the hyper-connections. nanoseek's own model_type makes the Auto classes refuse it."""
    nanoseek.save_model(ours(), tmp_path / "ck")
    with pytest.raises(ValueError, match="deepseek_v3_mhc"):
        transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="deepseek_v3_mhc"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


# ---------------------------------------------------------------- cached paths and the engine


def test_cached_decode_equals_the_no_cache_forward():
    """Prefill, a chunk on a past and single tokens (absorbed attention on the latent cache) equal
    one forward without a cache at every position; the MTP module's too."""
    assert_cached_decoding_matches(ours(1), torch.randint(0, 512, (3, 20)), 4, 10, mtp_split=12, max_len=24)


def test_engine_greedy_equals_the_no_cache_argmax_with_batching_and_prefix_hits(tmp_path):
    model = ours(2, num_nextn_predict_layers=0)
    nanoseek.save_model(model, tmp_path / "ck")
    assert engine_greedy(tmp_path / "ck", 10) == [reference_greedy(model, p, 10) for p in PROMPTS]


def test_graph_path_and_mtp_speculation_give_the_eager_tokens(monkeypatch):
    """The CUDA-graph path (capture replaced by an eager rerun on the static inputs,
    tests/eager_graphs.py) and MTP speculation through the mHC MTP module change no token."""
    from nanoseek.inference.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "_record", eager_record)
    model = ours(1)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42, 43, 44] * 3]
    greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (14, 6, 10)]
    expected = [o.outputs[0].token_ids for o in LLM(model, block_size=4).generate(prompts, greedy)]
    assert expected[0] == reference_greedy(model, prompts[0], 14)
    for speculative in (0, 2):
        graphed = LLM(model, block_size=4, speculative_mtp=speculative, speculative_max_batch=4)
        graphed.runner.cuda_graphs, graphed.runner.graphs_need_bf16 = True, False
        assert [o.outputs[0].token_ids for o in graphed.generate(prompts, greedy)] == expected
        assert graphed.stats()["spec_draft_tokens"] > 0 if speculative else True


def test_info_counts_the_hc_parameters_and_names_the_streams(tmp_path, capsys):
    model = ours()
    nanoseek.save_model(model, tmp_path / "ck")
    assert cli_main(["info", "--model", str(tmp_path / "ck"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["total_params"] + figures["mtp_params"] == model.num_parameters()
    assert cli_main(["info", "--model", str(tmp_path / "ck")]) == 0
    assert "mHC, 3 streams" in capsys.readouterr().out


# ---------------------------------------------------------------- training


def test_muon_takes_the_hc_projections_and_adamw_their_biases_and_gains():
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.trainer import build_optimizers

    model = ours()
    muon, adamw = build_optimizers(model, TrainConfig(optimizer="muon"))
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.endswith((".fn", ".hc_fn")):
            assert id(p) in in_muon, name
        elif name.endswith((".base", ".scale", ".hc_base", ".hc_scale")):
            assert id(p) in in_adamw and id(p) not in decayed, name


def test_activation_checkpointing_gives_the_same_gradients():
    model = ours().train()
    ids = torch.randint(0, 512, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        out = model(ids, labels=ids)
        (out.loss + out.mtp_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "_hc." in n or "hc_head" in n})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_pretraining_with_model_hc_mult_trains_every_hc_parameter(corpus, tmp_path):
    """Two steps of `nanoseek pretrain` (the tiny recipe, Muon) with model.hc_mult=2: the checkpoint
    is an mHC one, and from step 1 to step 2 every hyper-connection parameter moves."""
    from nanoseek.train import pretrain
    from nanoseek.train.checkpointing import list_checkpoints
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_tiny.toml")
    cfg = load_run_config(PretrainConfig, recipe, [
        f"out_dir={tmp_path / 'run'}", f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}",
        "max_steps=2", "eval_every=0", "save_every=1", "optimizer=muon", "model.hc_mult=2"])
    pretrain.train(cfg)
    first, second = list_checkpoints(tmp_path / "run")
    assert json.loads((second / "config.json").read_text())["model_type"] == "deepseek_v3_mhc"
    before, after = read_tensors(first), read_tensors(second)
    hc = [k for k in before if "_hc." in k or ".hc_head." in k]
    assert len(hc) >= 3 * 4 + 3 and all(not torch.equal(before[k], after[k]) for k in hc)
