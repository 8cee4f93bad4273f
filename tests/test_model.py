"""The model core: config, MLA (expanded == absorbed), DeepSeekMoE routing and balancing, MTP."""

import math

import pytest
import torch
from decoding_checks import assert_cached_decoding_matches

from nanoseek.config import ModelConfig, preset
from nanoseek.errors import ConfigError
from nanoseek.model.decoder import document_layout
from nanoseek.model.loss import cross_entropy
from nanoseek.model.moe import Gate, MoE, load_imbalance, update_expert_bias
from nanoseek.model.transformer import IGNORE_INDEX, Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny(**kw) -> ModelConfig:
    return preset("tiny", **kw)


# ---------------------------------------------------------------- config


def test_config_round_trips_through_hf_dict():
    cfg = tiny(rope_scaling=YARN, q_lora_rank=None)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_config_reads_hf5_rope_parameters_and_mtp_alias():
    d = tiny().to_dict()
    d["rope_parameters"] = {**YARN, "rope_type": "yarn", "rope_theta": 5000.0}
    d["num_mtp_layers"] = 2
    del d["num_nextn_predict_layers"], d["rope_theta"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.yarn["factor"] == 4.0 and cfg.num_nextn_predict_layers == 2


def test_unknown_config_field_is_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({**tiny().to_dict(), "hiden_size": 3})


@pytest.mark.parametrize("change, field", [
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_invalid_config_values_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**change)


@pytest.mark.parametrize("field, value, why", [
    ("max_position_embeddings", None, "must be an integer"),  # a TypeError when the engine sized its cache
    ("rope_theta", "abc", "must be a number"),  # a TypeError building the rotary embedding
    ("rms_norm_eps", None, "must be a number"),  # a TypeError in the first forward
])
def test_config_json_numbers_of_the_wrong_type_are_named(field, value, why):
    with pytest.raises(ConfigError, match=f"invalid config field {field}={value!r}: {why}"):
        ModelConfig.from_dict({**tiny().to_dict(), field: value})
    assert ModelConfig.from_dict({**tiny().to_dict(), "rope_theta": 10000}).rope_theta == 10000  # JSON's int


def test_softmax_scale_includes_yarn_mscale():
    v3 = preset("v3")
    assert math.isclose(v3.softmax_scale, 0.1352338, rel_tol=1e-6)
    assert math.isclose(preset("v2-lite").softmax_scale, 0.1147214, rel_tol=1e-6)


# ---------------------------------------------------------------- MLA


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=None), dict(rope_scaling=YARN)])
def test_absorbed_cache_path_matches_expanded_path(kw):
    """Prefill on the latent cache, a chunk, then cached decode steps, equal one no-cache forward."""
    torch.manual_seed(0)
    cfg = tiny(**kw)
    assert_cached_decoding_matches(Transformer(cfg).eval(), torch.randint(0, cfg.vocab_size, (3, 20)), 10, 14)


def test_document_mask_makes_a_packed_row_equal_its_documents_alone():
    """Packed pretraining rows: with `documents`, each document sees only itself, from position 0,
    so the logits and the MTP loss of a packed row are those of its documents run one by one."""
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg).eval()
    docs = [torch.randint(3, cfg.vocab_size, (1, n)) for n in (7, 12, 5)]
    row = torch.cat(docs, dim=1)
    documents = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        packed = model(row, documents=documents).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        crossing = model(row).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert (crossing[:, 7:] - alone[:, 7:]).abs().max() > 1e-3  # without the mask, documents see each other
    positions, mask = document_layout(documents)
    assert positions.tolist() == [list(range(7)) + list(range(12)) + list(range(5))]
    assert mask.shape == (1, 1, 24, 24) and mask[0, 0, 8, 6].item() is False and mask[0, 0, 8, 7].item() is True


def test_forward_backward_small_preset():
    torch.manual_seed(0)
    cfg = preset("small")
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    out = model(ids, labels=ids.roll(-1, 1))
    assert out.logits.shape == (2, 64, cfg.vocab_size)
    assert abs(out.loss.item() - math.log(cfg.vocab_size)) < 0.5  # untrained: near uniform
    (out.loss + 0.3 * out.mtp_loss).backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.mtp_layers[0].eh_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- MoE


def reference_route(gate: Gate, x: torch.Tensor):
    """Token-by-token V3 routing written out plainly, for comparison."""
    weights, ids = [], []
    E, G = gate.weight.shape[0], gate.n_group
    for row in x:
        s = torch.sigmoid(gate.weight.float() @ row.float())
        choice = s + gate.e_score_correction_bias
        groups = choice.view(G, E // G)
        group_score = groups.topk(2).values.sum(-1)
        kept = set(group_score.topk(gate.topk_group).indices.tolist())
        eligible = [e for e in range(E) if e // (E // G) in kept]
        chosen = sorted(eligible, key=lambda e: -choice[e].item())[: gate.top_k]
        w = s[chosen]
        w = w / w.sum() * gate.routed_scaling_factor
        ids.append(sorted(chosen))
        weights.append(dict(zip(chosen, w.tolist())))
    return ids, weights


def test_v3_router_matches_plain_reference_with_bias_and_groups():
    torch.manual_seed(0)
    cfg = tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(50, cfg.hidden_size)
    w, ids, _ = gate(x)
    ref_ids, ref_w = reference_route(gate, x)
    for t in range(50):
        assert sorted(ids[t].tolist()) == ref_ids[t]
        for e, wt in zip(ids[t].tolist(), w[t].tolist()):
            assert math.isclose(wt, ref_w[t][e], rel_tol=1e-5)


def test_router_scores_stay_fp32_under_bf16_autocast():
    """Training and RL rollouts on a GPU run under bf16 autocast, which would compute the router's
    matmul in bf16 even on fp32 inputs (~1e-3 error in the affinities, enough to flip near-tied
    expert choices); the gate turns autocast off for it."""
    torch.manual_seed(0)
    cfg = tiny(n_group=1, topk_group=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    plain = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gate(x)
    for a, b in zip(plain, under):
        assert torch.equal(a, b)


def test_bias_steers_selection_but_not_gate_weights():
    torch.manual_seed(0)
    cfg = tiny(n_group=1, topk_group=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(20, cfg.hidden_size)
    gate.e_score_correction_bias[3] = 10.0  # expert 3 always selected ...
    w, ids, scores = gate(x)
    assert (ids == 3).any(dim=1).all()
    # ... but weighted by its unbiased sigmoid affinity (normalised, scaled)
    picked = scores.gather(1, ids)
    torch.testing.assert_close(w, picked / picked.sum(1, keepdim=True) * cfg.routed_scaling_factor)


def test_excluded_groups_are_masked_with_minus_inf():
    """Negative biases must not let experts of excluded groups win (masking with 0 would)."""
    torch.manual_seed(0)
    cfg = tiny(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias[:4] = -2.0  # group 0's biased scores are all negative
    gate.e_score_correction_bias[4:] = -3.0  # group 1's are more negative: group 0 is kept
    _, ids, _ = gate(torch.randn(30, cfg.hidden_size))
    assert (ids < 4).all()


def test_v2_softmax_greedy_router():
    cfg = tiny(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
               routed_scaling_factor=1.0, n_group=1, topk_group=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    assert gate.e_score_correction_bias is None
    x = torch.randn(10, cfg.hidden_size)
    w, ids, scores = gate(x)
    ref = torch.softmax(x @ gate.weight.T, -1).topk(2)
    torch.testing.assert_close(w.sort(1).values, ref.values.sort(1).values)


def test_sorted_dispatch_equals_per_token_loop():
    torch.manual_seed(0)
    cfg = tiny()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, cfg.hidden_size)
    y = moe(x)
    w, ids, _ = moe.gate(x.view(-1, cfg.hidden_size))
    ref = torch.stack([
        sum(w[t, k] * moe.experts[ids[t, k]](row) for k in range(cfg.num_experts_per_tok)) + moe.shared_experts(row)
        for t, row in enumerate(x.view(-1, cfg.hidden_size))
    ])
    torch.testing.assert_close(y.view(-1, cfg.hidden_size), ref, atol=1e-5, rtol=1e-5)


def test_expert_counts_and_sign_bias_update():
    cfg = tiny()
    model = Transformer(cfg).train()
    moe = [m for m in model.modules() if isinstance(m, MoE)][0]
    moe.tokens_per_expert.copy_(torch.tensor([10., 0, 2, 4, 4, 4, 4, 4]))
    before = moe.gate.e_score_correction_bias.clone()
    imbalance = update_expert_bias(model, gamma=0.01)
    delta = moe.gate.e_score_correction_bias - before
    assert imbalance[0] == pytest.approx(10 / 4)
    torch.testing.assert_close(delta, torch.tensor([-0.01, 0.01, 0.01, 0, 0, 0, 0, 0]))
    assert moe.tokens_per_expert.sum() == 0  # reset after the update
    model(torch.randint(0, cfg.vocab_size, (2, 8)))
    # every token is counted top_k times, in the main MoE layer and the MTP block's (not run here)
    assert moe.tokens_per_expert.sum() == 2 * 8 * cfg.num_experts_per_tok
    assert load_imbalance([torch.ones(8)]) == [1.0]


def test_bias_update_balances_a_skewed_router():
    """Repeated sign updates drive max/mean load down on a router that starts badly skewed."""
    torch.manual_seed(0)
    cfg = tiny(n_group=1, topk_group=1)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    moe.gate.weight.data[0] += 0.5  # expert 0 attracts everything
    x = torch.randn(4, 64, cfg.hidden_size).abs()
    first = None
    for _ in range(60):
        moe(x)
        imb = update_expert_bias(moe, gamma=0.01)[0]
        first = first or imb
    assert imb < first / 2


def test_sequence_balance_loss_hand_computed():
    cfg = tiny(aux_loss_alpha=0.1, n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1)
    moe = MoE(cfg)
    scores = torch.tensor([[[0.6, 0.2, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]]])  # (B=1, T=2, E=4), rows sum 1
    ids = torch.tensor([[[0], [1]]])
    # f = E/(K T) * counts = 4/2 * [1,1,0,0]; P = mean scores = [0.5,0.3,0.1,0.1]; sum f P = 2*(0.8)
    assert moe._sequence_balance_loss(scores, ids).item() == pytest.approx(0.1 * 1.6)
    # P_i uses the affinities normalised per token (eq. 19): sigmoid scores do not sum to 1, and
    # scaling them changes nothing (un-normalised, this would be twice the loss)
    assert moe._sequence_balance_loss(2 * scores, ids).item() == pytest.approx(0.1 * 1.6)
    # with a token mask the padding counts neither in f nor in P: the row's first token alone
    real = torch.tensor([[True, False]])
    # f = 4/1 * [1,0,0,0], P = [0.6,0.2,0.1,0.1]: sum f P = 2.4
    assert moe._sequence_balance_loss(2 * scores, ids, real).item() == pytest.approx(0.1 * 2.4)


# ---------------------------------------------------------------- MTP


def test_mtp_loss_is_cross_entropy_of_each_depth_on_shifted_targets():
    torch.manual_seed(0)
    cfg = tiny(num_nextn_predict_layers=2)
    model = Transformer(cfg).eval()
    ids = torch.randint(2, cfg.vocab_size, (2, 12))
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    out = model(ids, labels=labels)
    T = 12
    pos = torch.arange(T).expand(2, T)
    h1, logits1 = model.mtp_forward(0, out.hidden[:, : T - 1], labels[:, : T - 1].clamp(min=0), pos[:, : T - 1])
    _, logits2 = model.mtp_forward(1, h1[:, : T - 2], labels[:, 1: T - 1].clamp(min=0), pos[:, : T - 2])
    expected = (cross_entropy(logits1, labels[:, 1:]) + cross_entropy(logits2, labels[:, 2:])) / 2
    torch.testing.assert_close(out.mtp_loss, expected)
    # the summed form (SFT normalises it by the step's targets): each depth's loss times its target
    # count, averaged over the depths
    counts = [(labels[:, k:] != IGNORE_INDEX).sum() for k in (1, 2)]
    expected_sum = (cross_entropy(logits1, labels[:, 1:]) * counts[0] + cross_entropy(logits2, labels[:, 2:]) * counts[1]) / 2
    torch.testing.assert_close(out.mtp_loss_sum, expected_sum)


def test_mtp_input_is_the_embedding_then_the_hidden_state():
    """eh_proj reads [enorm(Emb(t_{i+k})); hnorm(h)], embedding first: the column order of the
    released eh_proj weights (vLLM's and DeepSeek's code). Swapped, every released MTP module drafts garbage."""
    from nanoseek.model.mtp import mtp_inputs

    torch.manual_seed(0)
    cfg = tiny()
    layer = Transformer(cfg).mtp_layers[0]
    D = cfg.hidden_size
    embedded, hidden = torch.randn(1, 3, D), torch.randn(1, 3, D)
    with torch.no_grad():
        layer.eh_proj.weight.copy_(torch.cat([torch.eye(D), torch.zeros(D, D)], dim=1))  # reads the first half
        torch.testing.assert_close(mtp_inputs(layer, embedded, hidden), layer.enorm(embedded))
        layer.eh_proj.weight.copy_(torch.cat([torch.zeros(D, D), torch.eye(D)], dim=1))  # the second half
        torch.testing.assert_close(mtp_inputs(layer, embedded, hidden), layer.hnorm(hidden))


def test_info_counts_match_a_built_model():
    from nanoseek.info import model_stats

    for cfg in (tiny(), tiny(first_k_dense_replace=0, num_nextn_predict_layers=2), tiny(tie_word_embeddings=True)):
        stats = model_stats(cfg)
        assert stats.total_params + stats.mtp_params == Transformer(cfg).num_parameters()


@pytest.mark.parametrize("family", ["v3", "dense"])
def test_activation_checkpointing_keeps_loss_gradients_and_expert_load_and_saves_memory(family):
    """Checkpointed layers recompute their activations in the backward: the same loss and
    gradients (V3: MTP and the balance loss included) and expert-load counts (the rerun must not
    count its tokens again), with a fraction of the saved activations."""
    from nanoseek.model.dense import DenseTransformer, dense_preset

    torch.manual_seed(0)
    model = (Transformer(tiny(aux_loss_alpha=0.01)) if family == "v3" else
             DenseTransformer(dense_preset("student-tiny", vocab_size=512))).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    moes = [m for m in model.modules() if isinstance(m, MoE)]

    token_mask = torch.ones_like(ids, dtype=torch.bool)
    token_mask[1, 24:] = False  # a padded row, as SFT batches have: its pads count in no expert load

    def run(checkpointed: bool):
        model.zero_grad()
        model.activation_checkpointing = checkpointed
        for moe in moes:
            moe.tokens_per_expert.zero_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = model(ids, labels=ids, token_mask=token_mask)
        loss = out.loss + (out.mtp_loss + out.aux_loss if family == "v3" else 0)
        loss.backward(retain_graph=True)  # twice: a second backward reruns the layers again
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, [m.tokens_per_expert.clone() for m in moes], sum(saved)

    plain, checkpointed = run(False), run(True)
    assert checkpointed[0] == plain[0]
    assert checkpointed[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=0, atol=1e-7, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(checkpointed[2], plain[2])) and (family == "dense" or moes)
    # the layers' activations are no longer kept for the backward (the head's logits, the losses and
    # V3's MTP module still are: at this toy size a good part of the rest)
    assert checkpointed[3] < 0.6 * plain[3]


def test_activation_checkpointing_under_torch_compile_counts_expert_load_once():
    """Compiled, the checkpointed layers are recomputed inside the graph (Dynamo takes no custom
    recompute context): the same loss and gradients, and each routed token counted once."""
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    results = []
    for checkpointed, forward in ((False, model), (True, torch.compile(model, backend="aot_eager"))):
        model.zero_grad()
        model.activation_checkpointing = checkpointed
        for moe in moes:
            moe.tokens_per_expert.zero_()
        loss = forward(ids, labels=ids, mtp=False).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                        [m.tokens_per_expert.clone() for m in moes]))
    (loss_a, grads_a, load_a), (loss_b, grads_b, load_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(load_a, load_b))
