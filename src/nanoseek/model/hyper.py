"""Manifold-constrained hyper-connections (mHC; Xie et al. 2026), DeepSeek-V4's residual stream.

A plain pre-norm block keeps one residual stream x (B, T, D) and adds each sub-block's output to it:
x <- x + f(norm(x)). With mHC (config.hc_mult = n) the residual is n parallel streams X (B, T, n, D):
the embedding starts as n copies, and around each sub-block (attention, then the FFN / MoE) a
HyperConnection computes, per token and from the streams themselves, three mixings:

    z     = rmsnorm(flatten(X))                      (B, T, n*D)  unweighted RMSNorm, fp32
    a     = z @ fn.T                                 (B, T, (2+n)*n), split into pre | post | comb
    pre   = sigmoid(scale[0] * a_pre + base_pre) + eps       (B, T, n)    how much each stream feeds f
    post  = 2 * sigmoid(scale[1] * a_post + base_post)       (B, T, n)    how much of f's output each gets
    comb  = sinkhorn(softmax(scale[2] * a_comb + base_comb) + eps)   (B, T, n, n)  stream mixing

    x_in  = sum_i pre_i * X_i                        (B, T, D)    the sub-block's usual input
    X'_k  = post_k * f(norm(x_in)) + sum_j comb_jk * X_j       i.e. X' = post (x) y + comb^T X

Sinkhorn-Knopp alternately divides comb by its column and row sums, so comb ends (nearly) doubly
stochastic: each output stream is a convex combination of the input streams, and the residual
mixing cannot grow the streams' norm however deep the stack (the "manifold constraint" that
unconstrained hyper-connections lack). A HyperHead collapses the streams once more before the
model's final norm, with sigmoid weights of its own (no post, no comb).

The sub-blocks keep their (B, T, D) interface: only the residual around them changes. The math is
transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead (the coefficients in fp32 whatever
the model's dtype, the same order of Sinkhorn normalisations, comb used transposed), and so are
the parameter names: `attn_hc.{fn,base,scale}`, `ffn_hc.*` per layer, `hc_head.{hc_fn,hc_base,hc_scale}`.

Shape legend: B batch, T positions, n streams (hc_mult), D hidden size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def hc_mult(config) -> int | None:
    """The number of residual streams, or None for the plain residual (dense configs have no field)."""
    return getattr(config, "hc_mult", None)


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, D) -> (B, T, n, D): n copies, the streams' start (V4's embedding, an MTP module's input)."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


def _stream_rms(streams: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, T, n, D) -> (B, T, n*D) fp32: the streams side by side, RMS-normalised without a weight."""
    flat = streams.flatten(2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """(..., n, n) positive -> approximately doubly stochastic: a column normalisation, then
    iters - 1 rounds of (rows, columns), V4's order (the columns are exact, the rows nearly)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """The residual around one sub-block: `streams = hc(streams, f)` where a plain block has
    `x = x + f(x)`. fn ((2+n)*n, n*D) projects the normed streams to the raw coefficients; base
    ((2+n)*n,) and scale (3,: pre, post, comb) are their static bias and gains."""

    def __init__(self, config):
        super().__init__()
        n, D = config.hc_mult, config.hidden_size
        self.n, self.iters, self.eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * D))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    def reset_parameters(self, std: float) -> None:
        """V4's init: fn ~ N(0, std); base 0 and scale 1, so every token starts from the same mixing."""
        nn.init.normal_(self.fn, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams (B, T, n, D) -> fp32 pre (B, T, n), post (B, T, n), comb (B, T, n, n)."""
        n = self.n
        with torch.autocast(streams.device.type, enabled=False):  # V4 computes these in fp32
            mixes = F.linear(_stream_rms(streams, self.norm_eps), self.fn.float())  # (B, T, (2+n)*n)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.eps
        return pre, post, sinkhorn(comb, self.iters, self.eps)

    def forward(self, streams: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """streams (B, T, n, D), sublayer (B, T, D) -> (B, T, D) -> the updated streams (B, T, n, D)."""
        dtype = streams.dtype
        pre, post, comb = self.coefficients(streams)
        y = sublayer((pre.unsqueeze(-1) * streams).sum(dim=2).to(dtype))  # (B, T, D)
        # comb[j, k] carries stream j into stream k: X'_k = sum_j comb_jk X_j, i.e. comb^T @ X
        return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    """The streams' last collapse, before the final norm: sum_i (sigmoid(hc_scale * a_i + hc_base_i)
    + eps) X_i with a = rmsnorm(flatten(X)) @ hc_fn.T; (B, T, n, D) -> (B, T, D)."""

    def __init__(self, config):
        super().__init__()
        n, D = config.hc_mult, config.hidden_size
        self.n, self.eps, self.norm_eps = n, config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * D))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.hc_fn, std=std)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        with torch.autocast(streams.device.type, enabled=False):
            mixes = F.linear(_stream_rms(streams, self.norm_eps), self.hc_fn.float())  # (B, T, n)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
