"""Next-token losses, and the output head fused into them so the full logits never exist.

The plain loss is `cross_entropy(lm_head(hidden), labels)`: logits (B, T, V), their fp32 copy for
the softmax, and in the backward the fp32 gradient of the same size. At a real vocabulary that is
the largest activation of a training step: Qwen2's 151,936 tokens at 1,024 positions are 0.62 GB
per fp32 copy, several times the hidden states that produce them.

`token_logprobs(hidden, weight, targets)` applies the head and the log-softmax in blocks instead,
so only a block of about 2**24 logits exists at any time. The forward goes over row chunks: each
chunk's logits (C, V) are reduced to each row's logsumexp and target logit, then dropped. The
backward recomputes the logits from the saved hidden states, weight and logsumexps (one more
head-sized matmul), by vocabulary blocks (N, Vb): each block gives its slice of d/d weight in one
matmul over all rows (row chunks would each add a whole (V, D) product) and its share of
d/d hidden, summed in fp32.

Why recompute: Apple's Cut Cross-Entropy does too. Liger-Kernel's FusedLinearCrossEntropy instead
computes the gradients during the forward and only scales them in the backward, which saves the
extra matmul (the head's compute is 4/3 of the plain path's here, 1 with Liger) but (1) holds a
(V, D) fp32 weight gradient from the forward to the backward once per head call (V3's main head
and each MTP depth, all alive at the forward's peak, when every activation is), and (2) needs
the loss's gradient known up to one factor in the forward, so it cannot give GRPO's per-token
log-probabilities, whose gradients depend on the advantages. Recomputing serves both with one
function, and its backward allocates d/d weight when the plain path's does.

`linear_cross_entropy` is the training loss on top: the mean (or sum) of -log p over the labels that
are not IGNORE_INDEX, equal to the plain path's to fp32 rounding. The softmax is always in fp32;
under autocast the matmuls run in the autocast dtype (bf16), as `lm_head` does there. The backward
is not differentiable again: a backward with create_graph=True fails, saying so.

Shape legend: N rows (positions), D hidden size, V vocabulary, C rows of a chunk, Vb a block's vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Logits per block, fp32: 64 MB. Forward chunks of 110 rows at Qwen2's vocabulary, 512 at the `gpu`
# preset's 32,768; the backward's vocabulary blocks hold as many. Each step holds one or two such
# blocks (the logits, then their softmax gradient in place and its cast to the matmul dtype).
CHUNK_ELEMENTS = 2 ** 24


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over positions whose label is not IGNORE_INDEX; computed in fp32.
    The plain path, for callers that have the logits anyway (SFT's distillation term)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) without the logits: hidden (..., D), weight (V, D),
    labels (...) with IGNORE_INDEX where there is no target. "mean" over the targets (NaN without
    any, as F.cross_entropy) or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'")
    labels = labels.flatten()
    loss = -token_logprobs(hidden.flatten(0, -2), weight, labels).sum()
    return loss if reduction == "sum" else loss / (labels != IGNORE_INDEX).sum()


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T)[targets], over row chunks: hidden (N, D), weight (V, D),
    targets (N,) -> (N,) fp32, 0 (and no gradient) where the target is IGNORE_INDEX.
    entropy=True: also each row's next-token entropy (N,) fp32, without gradient."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"token_logprobs takes hidden (N, D), weight (V, D), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets, dtype, chunk, entropy)
    return (logp, ent) if entropy else logp


class _TokenLogprobs(torch.autograd.Function):
    """The chunked head + log-softmax; see the module docstring. `dtype`: the matmuls' (the
    autocast dtype, or the inputs'); the softmax and the sums over chunks are fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk, entropy):
        valid = targets != IGNORE_INDEX  # (N,)
        targets = torch.where(valid, targets, 0)  # an index gather can read (the row is masked out)
        N = hidden.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)  # (N,) logsumexp of each row
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if entropy else torch.zeros(0, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit
            w = weight.to(dtype)
            for s in range(0, N, chunk):
                logits = (hidden[s: s + chunk].to(dtype) @ w.t()).float()  # (C, V)
                lse[s: s + chunk] = logits.logsumexp(dim=-1)
                logp[s: s + chunk] = logits.gather(-1, targets[s: s + chunk, None]).squeeze(-1) - lse[s: s + chunk]
                if entropy:  # H = -sum_j p_j log p_j (not lse - sum_j p_j logit_j, which cancels)
                    logits.sub_(lse[s: s + chunk, None])  # (C, V) the log-softmax
                    ent[s: s + chunk] = -(logits.exp() * logits).sum(dim=-1)
        logp = torch.where(valid, logp, 0.0)
        ctx.save_for_backward(hidden, weight, targets, valid, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward has no backward of its own
            raise RuntimeError("linear_cross_entropy / token_logprobs cannot be differentiated twice (a backward "
                               "with create_graph=True): compute the loss from the logits (model(..., logits=True)) "
                               "with cross_entropy for that")
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        N, V = hidden.shape[0], weight.shape[0]
        # d logp_i / d logit_ij = [j == target_i] - softmax_ij, times the incoming gradient g_i
        g = torch.where(valid, grad_logp.float(), 0.0)  # (N,)
        # By vocabulary blocks of all rows, not by row chunks: each block's slice of d/d weight is
        # then one matmul over all rows, written once (row chunks would each add a (V, D) product).
        block = max(1, CHUNK_ELEMENTS // max(1, N))
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None  # (V, D)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(ctx.dtype)  # (N, D)
            for v in range(0, V, block):
                w = weight[v: v + block].to(ctx.dtype)  # (Vb, D)
                grad = (h @ w.t()).float()  # (N, Vb) this block's logits again
                grad.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g_i softmax_ij
                here = (targets >= v) & (targets < v + w.shape[0])  # (N,) rows whose target is in the block
                grad.scatter_add_(-1, (targets - v).clamp(0, w.shape[0] - 1)[:, None], torch.where(here, g, 0.0)[:, None])
                grad = grad.to(ctx.dtype)
                if need_hidden:
                    grad_hidden += (grad @ w).float()
                if need_weight:
                    grad_weight[v: v + block] = grad.t() @ h
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None
