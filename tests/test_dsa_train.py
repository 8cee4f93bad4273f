"""Training DeepSeek-V3.2's DSA indexer (DeepSeek-V3.2-Exp report §2.1): the KL loss against the
main attention distribution, that it trains the indexer alone and the language-model loss never
reaches the indexer, that the dense warm-up raises the indexer's recall, and `nanoseek pretrain`
converting a V3 checkpoint into a V3.2 one (`init=` + model.index_*) and running both stages."""

import json
import math
import os

import pytest
import torch

from nanoseek.checkpoint import read_tensors
from nanoseek.config import ModelConfig
from nanoseek.errors import ConfigError
from nanoseek.model.layers import apply_rope
from nanoseek.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
    kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    num_nextn_predict_layers=1, index_topk=3, index_head_dim=16, index_n_heads=4,
)


def model(seed=0, sharp=0.0, **overrides) -> Transformer:
    """A tiny V3.2 model; `sharp` > 0 redraws the attention's query and key projections with that
    std, so each head's attention is peaked (at the 0.02 init it is nearly uniform, and every
    selection then holds about the same mass)."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if sharp and name.endswith(("q_b_proj.weight", "kv_b_proj.weight", "q_a_proj.weight",
                                        "kv_a_proj_with_mqa.weight")):
                p.normal_(0, sharp)
            elif "indexer.k_norm" in name:  # away from the constant init
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return m


# ---------------------------------------------------------------- the loss by hand


def hand_loss(m: Transformer, x: torch.Tensor, mode: str) -> tuple[float, float]:
    """L_I and recall of layer 0 for one sequence x (1, T, D) (its attention input), from the
    formulas, one query and one position at a time."""
    attn, cfg = m.layers[0].self_attn, m.config
    T, H, N, R = x.shape[1], cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    cos, sin = m.rope(torch.arange(T).unsqueeze(0))
    with torch.no_grad():
        qc = attn.q_a_layernorm(attn.q_a_proj(x))
        q = attn.q_b_proj(qc).view(1, T, H, N + R)
        q = torch.cat([q[..., :N], apply_rope(q[..., N:], cos, sin)], dim=-1)[0]  # (T, H, N+R)
        latent, k_pe = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, R], dim=-1)
        k_nope = attn.kv_b_proj(attn.kv_a_layernorm(latent)).view(1, T, H, N + cfg.v_head_dim)[0, :, :, :N]
        k_pe = apply_rope(k_pe, cos, sin)[0]  # (T, R)
        ix = attn.indexer
        qi = ix._rope(ix.wq_b(qc).view(1, T, ix.n_heads, ix.head_dim), cos, sin)[0]  # (T, J, I)
        ki = ix._rope(ix.k_norm(ix.wk(x)), cos, sin)[0]  # (T, I)
        w = ix.weights_proj(x)[0] / math.sqrt(ix.n_heads)  # (T, J)
    kls, recalls = [], []
    for t in range(T):
        vis = range(t + 1)
        index = {s: sum(float(w[t, j]) * max(0.0, float(qi[t, j] @ ki[s])) / math.sqrt(ix.head_dim)
                        for j in range(ix.n_heads)) for s in vis}
        top = sorted(vis, key=lambda s: (-index[s], s))[: cfg.index_topk]
        support = list(vis) if mode == "dense" else top
        p = dict.fromkeys(support, 0.0)
        recall = 0.0
        for h in range(H):
            logit = {s: float(q[t, h] @ torch.cat([k_nope[s, h], k_pe[s]])) * cfg.softmax_scale for s in vis}
            dense_z = sum(math.exp(v) for v in logit.values())
            recall += sum(math.exp(logit[s]) / dense_z for s in top) / H
            z = sum(math.exp(logit[s]) for s in support)
            for s in support:
                p[s] += math.exp(logit[s]) / z / H  # the heads' sum, L1-normalized
        zi = sum(math.exp(index[s]) for s in support)
        kls.append(sum(p[s] * math.log(p[s] / (math.exp(index[s]) / zi)) for s in support))
        if t + 1 > cfg.index_topk:
            recalls.append(recall)
    return sum(kls) / T, sum(recalls) / len(recalls)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_indexer_loss_and_recall_equal_a_hand_computation(mode):
    m = model(sharp=0.3, num_hidden_layers=1, num_nextn_predict_layers=0).eval()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    seen = {}
    m.layers[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    m.set_dsa_mode(mode)
    out = m(ids, labels=ids)
    loss, recall = hand_loss(m, seen["x"], mode)
    assert 0.05 < loss and 0.3 < recall < 0.99  # not a degenerate case
    assert out.indexer_loss.item() == pytest.approx(loss, rel=1e-4, abs=1e-6)
    assert out.indexer_recall.item() == pytest.approx(recall, rel=1e-4)


def test_dense_mode_attends_densely_and_mode_none_returns_no_indexer_loss():
    m = model(sharp=0.3).eval()
    dense = Transformer(ModelConfig(**{**TINY, "index_topk": None, "index_head_dim": None,
                                       "index_n_heads": None})).eval()
    dense.load_state_dict(m.state_dict(), strict=False)  # the same weights, no indexers
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    sparse_logits = m(ids).logits
    assert m(ids, labels=ids).indexer_loss is None  # no dsa_mode: inference, nothing computed
    m.set_dsa_mode("dense")
    torch.testing.assert_close(m(ids).logits, dense(ids).logits)
    m.set_dsa_mode("sparse")
    torch.testing.assert_close(m(ids).logits, sparse_logits)
    assert not torch.allclose(sparse_logits, dense(ids).logits)


# ---------------------------------------------------------------- where the gradients go


def test_indexer_loss_reaches_only_the_indexers_and_the_lm_loss_never_does():
    from nanoseek.train.pretrain import indexers

    m = model(sharp=0.3).train()
    for ix in indexers(m):
        ix.requires_grad_(True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    m.set_dsa_mode("sparse")

    def grads(loss):
        m.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in m.named_parameters()}

    out = m(ids, labels=ids)
    got = grads(out.indexer_loss)
    assert sorted({n.split(".self_attn")[0] for n in got if ".indexer." in n}) == [
        "model.layers.0", "model.layers.1", "model.layers.2"]  # both layers and the MTP module
    # every indexer weight (wq_b, wk, k_norm, weights_proj; the MTP module's too) and nothing else
    assert all(got[n] == (".indexer." in n) for n in got), [n for n in got if got[n] != (".indexer." in n)]

    out = m(ids, labels=ids)
    got = grads(out.loss + out.mtp_loss)
    assert not any(got[n] for n in got if ".indexer." in n)
    assert all(got[n] for n in got if n.endswith(("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")))


def test_activation_checkpointing_leaves_no_indexer_stats_after_the_backward():
    """The backward's rerun of a checkpointed layer computes the indexer's loss again; what it
    leaves must not stay on the layer (with its graph) until the next forward."""
    from nanoseek.train.pretrain import indexers

    m = model(sharp=0.3).train()
    for ix in indexers(m):
        ix.requires_grad_(True)
    m.set_dsa_mode("sparse")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        m.activation_checkpointing = checkpointing
        m.zero_grad(set_to_none=True)
        out = m(ids, labels=ids)
        (out.loss + out.indexer_loss).backward()
        assert all(layer.self_attn.indexer_stats is None for layer in m.model.layers)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


# ---------------------------------------------------------------- the dense warm-up


def test_dense_warmup_raises_the_indexer_recall():
    """A few warm-up steps (pretraining's objective and stage switch) on a fixed batch: the other
    weights stay as they are and the share of the attention mass on the top-k rises."""
    from nanoseek.train.pretrain import indexers, pretrain_loss, set_indexer_stage

    m = model(sharp=0.3, index_topk=4).train()
    for ix in indexers(m):
        ix.requires_grad_(True)
    trainable = list(m.parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(4))
    batch = (ids[:, :-1], ids[:, 1:])
    set_indexer_stage(m, warmup=True, trainable=trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    recalls = []
    for _ in range(30):
        objective, metrics = pretrain_loss(m, batch, mtp_lambda=0.3, indexer_lambda=1.0, warmup=True)
        recalls.append(metrics["indexer_recall"].item())
        assert not metrics["loss"].requires_grad  # frozen: no graph of the main model is even built
        opt.zero_grad()
        objective.backward()
        opt.step()
    assert recalls[-1] > recalls[0] + 0.1, recalls  # measured: 0.35 -> 0.64
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".indexer." in n for n in moved)


# ---------------------------------------------------------------- nanoseek pretrain


def test_pretrain_converts_a_v3_checkpoint_then_warms_up_then_trains_sparse(corpus, tmp_path, monkeypatch):
    """init=<V3 run> + model.index_*: every V3 weight loaded; a warm-up step moves the indexers
    alone (the routing biases included); the sparse step then moves everything; metrics logged."""
    from nanoseek.train import pretrain
    from nanoseek.train.checkpointing import list_checkpoints
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_tiny.toml")
    common = [f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}", "eval_every=1"]
    v3 = pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / 'v3'}", "max_steps=1",
                                                                 *common]))
    index = ["model.index_topk=4", "model.index_head_dim=16", "model.index_n_heads=4"]
    cfg = load_run_config(PretrainConfig, recipe, [
        f"out_dir={tmp_path / 'v32'}", f"init={v3}", "max_steps=2", "dense_warmup_steps=1", "save_every=1",
        *common, *index])
    pretrain.train(cfg)
    warm, sparse = list_checkpoints(tmp_path / "v32")  # after steps 1 (warm-up) and 2 (sparse)
    assert json.loads((warm / "config.json").read_text())["model_type"] == "deepseek_v32"
    base, after_warmup, after_sparse = read_tensors(v3), read_tensors(warm), read_tensors(sparse)
    indexer = {k for k in after_warmup if ".indexer." in k}
    assert indexer and set(after_warmup) - indexer == set(base)
    assert all(torch.equal(base[k], after_warmup[k]) for k in base)  # loaded, then frozen by the warm-up
    assert all(not torch.equal(after_warmup[k], after_sparse[k]) for k in indexer)
    assert all(not torch.equal(after_warmup[k], after_sparse[k]) for k in base
               if k.endswith(("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")))
    records = [json.loads(line) for line in (tmp_path / "v32" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "indexer_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(0 < r["indexer_recall"] <= 1 for r in steps)
    assert sum("val_indexer_recall" in r for r in records) == 3  # before training, after each step

    # a real mismatch with the checkpoint is still refused, naming what pretraining takes
    bad = load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / 'bad'}", f"init={v3}",
                                                   "model.hidden_size=32", *index, *common])
    with pytest.raises(ConfigError, match="model.index_topk, model.index_head_dim and model.index_n_heads"):
        pretrain.train(bad)
    # a warm-up without an indexer fails before the data is prepared (minutes at real size)
    monkeypatch.setattr(pretrain, "prepare_corpus", lambda *args: pytest.fail("prepared the data first"))
    with pytest.raises(ConfigError, match="this model has none"):
        pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / 'v3b'}", f"init={v3}",
                                                                "dense_warmup_steps=1", *common]))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_run_resumed_inside_the_dense_warmup_ends_bit_exact(optimizer, corpus, tmp_path):
    """A checkpoint of the warm-up holds optimizer state for the indexers alone (nothing else has
    stepped yet); resumed there (and at the boundary), the run crosses into sparse training and ends
    with the uninterrupted run's weights."""
    from nanoseek.train import pretrain
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_tiny.toml")
    common = [f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}", "eval_every=0",
              "max_steps=3", "dense_warmup_steps=2", f"optimizer={optimizer}",
              "model.index_topk=4", "model.index_head_dim=16", "model.index_n_heads=4"]
    whole = read_tensors(pretrain.train(load_run_config(PretrainConfig, recipe, [
        f"out_dir={tmp_path / 'whole'}", "save_every=1", "keep_checkpoints=0", *common])))
    for step in (1, 2):  # inside the warm-up, and at its end
        resumed = pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / str(step)}", *common]),
                                 resume=tmp_path / "whole" / f"checkpoint-{step}")
        got = read_tensors(resumed)
        assert all(torch.equal(whole[k], got[k]) for k in whole), step


def test_a_topk_that_covers_the_sequence_is_pointed_out(corpus, tmp_path, capsys):
    """index_topk >= seq_len: sparse attention is dense there and recall is 1; the run says so."""
    from nanoseek.train import pretrain
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_tiny.toml")
    common = [f"data={json.dumps([str(corpus)])}", f"data_dir={tmp_path / 'shards'}", "max_steps=1",
              "eval_every=0", "seq_len=16", "model.index_head_dim=16", "model.index_n_heads=4"]
    for topk, noted in ((16, True), (8, False)):
        pretrain.train(load_run_config(PretrainConfig, recipe, [f"out_dir={tmp_path / str(topk)}",
                                                                f"model.index_topk={topk}", *common]))
        assert ("sparse attention is dense here" in capsys.readouterr().out) == noted
