"""The fused head + cross-entropy (model/loss.py) against the plain logits path: the same loss and
the same gradients, to fp32 rounding, for the function alone and through whole models (V3 with MTP,
a tied dense student, V4), under activation checkpointing and bf16 autocast, and GRPO's per-token
log-probabilities; and no (N, V) block of logits kept for the backward."""

import pytest
import torch
import torch.nn.functional as F

import nanoseek.model.loss as loss_module
from nanoseek.config import preset
from nanoseek.model.dense import DenseConfig, DenseTransformer
from nanoseek.model.loss import IGNORE_INDEX, linear_cross_entropy, token_logprobs
from nanoseek.model.transformer import Transformer
from nanoseek.train import grpo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of 5 x V logits: the tiny inputs below then span several forward chunks (the last one
    short) and several vocabulary blocks in the backward."""
    def set_rows(vocab_size):
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * vocab_size)
    return set_rows


# ---------------------------------------------------------------- the function alone


def inputs(N=23, D=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:7] = IGNORE_INDEX  # the first chunk (5 rows) has no target at all, the second two
    labels[-2] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_equal_the_plain_path(small_chunks, reduction):
    hidden, weight, labels = inputs()
    small_chunks(weight.shape[0])
    fused = linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    torch.testing.assert_close(fused, ref)
    for a, b in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(a, b)


def test_no_target_gives_nan_mean_and_zero_gradients(small_chunks):
    hidden, weight, labels = inputs()
    small_chunks(weight.shape[0])
    labels[:] = IGNORE_INDEX
    assert linear_cross_entropy(hidden, weight, labels).isnan()  # as F.cross_entropy: 0 / 0
    total = linear_cross_entropy(hidden, weight, labels, reduction="sum")
    assert total.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(total, (hidden, weight)))


def test_token_logprobs_and_entropy_with_any_upstream_gradient(small_chunks):
    """GRPO weighs each token's log-probability by its own advantage: the gradient is per token."""
    hidden, weight, labels = inputs()
    small_chunks(weight.shape[0])
    labels[labels == IGNORE_INDEX] = 3
    upstream = torch.randn(len(labels), generator=torch.Generator().manual_seed(1))
    logp, entropy = token_logprobs(hidden, weight, labels, entropy=True)
    ref_all = (hidden @ weight.t()).log_softmax(-1)
    ref = ref_all.gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref)
    torch.testing.assert_close(entropy, -(ref_all.exp() * ref_all).sum(-1).detach())
    assert not entropy.requires_grad
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    for a, b in zip(grads, torch.autograd.grad((ref * upstream).sum(), (hidden, weight))):
        torch.testing.assert_close(a, b)


def test_a_frozen_head_gets_no_gradient_and_hidden_still_does(small_chunks):
    hidden, weight, labels = inputs()
    small_chunks(weight.shape[0])
    weight.requires_grad_(False)
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), hidden)
    (ref,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), labels), hidden)
    torch.testing.assert_close(grad, ref)


def test_double_backward_fails_saying_why():
    hidden, weight, labels = inputs()
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), hidden, create_graph=True)


def test_bad_shapes_and_reduction_are_refused():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="weight \\(V, D\\)"):
        token_logprobs(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")


# ---------------------------------------------------------------- through whole models


def v3_with_mtp():
    return Transformer(preset("tiny", num_nextn_predict_layers=2))


def tied_student():
    return DenseTransformer(DenseConfig(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=True))


def v4():
    return Transformer(preset("v4-tiny"))


def batch(vocab_size, B=2, T=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    labels = torch.randint(0, vocab_size, (B, T), generator=g)
    labels[0, :7] = IGNORE_INDEX  # SFT's hidden prompt: a whole 5-row chunk without targets
    labels[1, -3:] = IGNORE_INDEX  # right padding
    return ids, labels


def step(model, ids, labels, checkpointing=False, fused=True):
    """One objective (next-token + MTP + balance loss) and its gradient of every parameter, with the
    fused loss or (fused=False) the plain one, the reference."""
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    inner = getattr(model, "_orig_mod", model)  # compiled: the module inside
    inner.activation_checkpointing, inner.fused_loss = checkpointing, fused
    out = model(ids, labels=labels, logits=False)
    assert (out.logits is None) == fused
    losses = {k: getattr(out, k) for k in ("loss", "mtp_loss", "mtp_loss_sum", "aux_loss")
              if getattr(out, k) is not None}
    sum(v for k, v in losses.items() if k != "mtp_loss_sum").backward()
    return ({k: v.detach() for k, v in losses.items()},
            {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None})


@pytest.mark.parametrize("make", [v3_with_mtp, tied_student, v4], ids=["v3_mtp", "tied_student", "v4"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_model_trains_as_with_the_full_logits(make, checkpointing, small_chunks):
    torch.manual_seed(0)
    model = make().train()
    ids, labels = batch(model.config.vocab_size)
    small_chunks(model.config.vocab_size)
    losses, grads = step(model, ids, labels, checkpointing)
    ref_losses, ref_grads = step(model, ids, labels, fused=False)
    assert losses.keys() == ref_losses.keys() and "loss" in losses
    assert ("mtp_loss" in losses) == (make is v3_with_mtp)
    torch.testing.assert_close(losses, ref_losses)
    assert grads.keys() == ref_grads.keys()
    assert "lm_head.weight" in grads or make is tied_student  # tied: the head's gradient is the embedding's
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m: f"{name}: {m}")


def test_a_model_under_bf16_autocast_stays_close_to_the_plain_bf16_path(small_chunks):
    torch.manual_seed(0)
    model = v3_with_mtp().train()
    ids, labels = batch(model.config.vocab_size)
    small_chunks(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, grads = step(model, ids, labels)
        ref_losses, ref_grads = step(model, ids, labels, fused=False)
    # the same bf16 logits, summed in another order
    torch.testing.assert_close(losses, ref_losses, rtol=1e-3, atol=1e-3)
    for name in grads:  # bf16 products: gradients agree to bf16 precision, relative to each tensor's scale
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert err < 2e-2, name


def test_no_block_of_logits_is_kept_for_the_backward():
    """The plain path saves (B, T, V) logits (or their log-softmax) for its backward; the fused one
    saves nothing with a vocabulary-sized dimension but the head's weight."""
    model = v3_with_mtp().train()
    V = model.config.vocab_size
    ids, labels = batch(V)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for fused in (False, True):
        model.fused_loss = fused
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=labels, logits=False)
        with_v = [s for s in saved if V in s and s != tuple(model.lm_head.weight.shape)]
        assert bool(with_v) != fused, with_v


def test_torch_compile_traces_it_in_one_graph(small_chunks):
    """compile=true recipes: Dynamo traces the chunk loops and the custom backward without a
    graph break (fullgraph), and the compiled step gives the eager one's loss and gradients."""
    torch.manual_seed(0)
    model = tied_student().train()
    ids, labels = batch(model.config.vocab_size)
    small_chunks(model.config.vocab_size)
    losses, grads = step(model, ids, labels)
    compiled_losses, compiled_grads = step(torch.compile(model, backend="aot_eager", fullgraph=True), ids, labels)
    torch.testing.assert_close(compiled_losses, losses)
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], msg=name)


# ---------------------------------------------------------------- GRPO's log-probabilities


def test_grpo_completion_logprobs_through_the_head_equal_the_whole_logits(small_chunks):
    torch.manual_seed(0)
    model = v3_with_mtp().train()
    small_chunks(model.config.vocab_size)
    ids, targets = batch(model.config.vocab_size)
    mask = torch.zeros(ids.shape)
    mask[0, 3:10], mask[1, 0:4] = 1, 1
    mb = {"input_ids": ids, "targets": targets.clamp_min(0), "mask": mask}
    upstream = torch.randn(int(mask.sum()))
    results = []
    for head in (model.lm_head, None):
        model.zero_grad(set_to_none=True)
        logp, entropy = grpo.completion_logprobs(model, mb, head, fused=head is not None)
        (logp * upstream).sum().backward()
        results.append((logp.detach(), entropy, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logp, entropy, grads), (ref_logp, ref_entropy, ref_grads) = results
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m: f"{name}: {m}")
