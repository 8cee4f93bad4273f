"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are not cached per head: each token is compressed to a latent c (kv_lora_rank
values, RMS-normed) plus one rotary key k_pe shared by all heads (qk_rope_head_dim values). That is
all the cache holds: 576 values per token per layer for V3, against 40,960 for the multi-head
attention it replaces.

Two ways to compute the same attention:
- expanded (training, and a prefill with no past, which still writes the cache): up-project c
  into per-head k_nope and v with kv_b_proj and run ordinary causal attention;
- absorbed (a forward with a cache that has a past: decode, chunked or prefix-cached prefill):
  fold kv_b_proj's key half into the query and its value half into the output, so attention
  runs directly on the cached latents and nothing is re-expanded.
  Exact, because k_nope and v are linear in c and RoPE lives on the separate k_pe channel.

Shape legend: B batch, T query positions, S cached positions, H heads, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, D hidden size.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model.layers import RMSNorm, apply_rope

# The norms of the compressed q and kv latents use 1e-6 whatever the config's rms_norm_eps, as in
# DeepSeek's code and transformers' (they only differ for a config whose eps is not 1e-6)
LATENT_NORM_EPS = 1e-6


class LatentCache(Protocol):
    """Where a forward with a cache reads and writes each layer's latents.

    `update` stores the new tokens' latents at their positions and returns every cached latent of
    each sequence in position order, from position 0, padded to a common length S. Attention then
    lets query position p see cached position s iff s <= p, which also masks the padding.
    The inference engine's paged cache and `ContiguousCache` below implement it.
    """

    def update(self, layer_idx: int, positions: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T), latent (B, T, C), k_pe (B, T, R) -> latents (B, S, C), k_pe (B, S, R)."""
        ...


class ContiguousCache:
    """A plain (batch, max_len) latent cache: the reference implementation of LatentCache.

    Useful for tests and single-batch generation; the engine uses a paged cache instead.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
        self.latent = torch.zeros(n_layers, batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0  # positions [0, length) hold data in every row

    def update(self, layer_idx, positions, latent, k_pe):
        rows = torch.arange(latent.shape[0], device=latent.device).unsqueeze(1)  # (B, 1)
        self.latent[layer_idx][rows, positions] = latent.to(self.latent.dtype)
        self.k_pe[layer_idx][rows, positions] = k_pe.to(self.k_pe.dtype)
        self.length = max(self.length, int(positions.max()) + 1)
        return self.latent[layer_idx, :, : self.length], self.k_pe[layer_idx, :, : self.length]


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.softmax_scale = config.softmax_scale
        self.rope_interleave = config.rope_interleave
        D, H, qk_dim = config.hidden_size, config.num_attention_heads, config.qk_head_dim
        bias = config.attention_bias

        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        # one projection gives both the latent c (first C rows) and the shared rotary key (last R rows)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        # per head h: rows [h*(N+V), h*(N+V)+N) up-project c to k_nope, the next V rows to v
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None, layer_idx: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), positions (B, T), rope = cos/sin (B, T, R/2) -> (B, T, D). mask (B, 1, T, T),
        True where a query may attend a key, replaces the causal mask (training on packed rows)."""
        B, T, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B,T,H,N), (B,T,H,R)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C): what the cache stores, after the norm
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)  # (B, T, R): one rotary key for all heads

        if cache is None:
            out = self._expanded(q_nope, q_pe, latent, k_pe, mask)
        else:
            latent_all, k_pe_all = cache.update(layer_idx, positions, latent, k_pe)
            if T > 1 and latent_all.shape[1] == T and not positions[:, 0].any():
                # a prefill with no past (every row starts at 0): the expanded path is the same
                # attention and cheaper here, since absorbing pays C-wide scores over T x T
                out = self._expanded(q_nope, q_pe, latent, k_pe)
            else:
                out = self._absorbed(q_nope, q_pe, latent_all, k_pe_all, positions)
        return self.o_proj(out.flatten(2))

    def _expanded(self, q_nope, q_pe, latent, k_pe, mask=None) -> torch.Tensor:
        """Causal (or `mask`ed) attention over the sequence itself, per-head K/V expanded from the latents."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B,T,H,N), (B,T,H,V)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, N+R)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1)
        # The fused (flash) SDPA kernels want one head size for q, k and v; MLA's v is narrower
        # (V < N+R), so pad v with zeros and drop the padding after. Without this, SDPA falls back
        # to the unfused math path: ~2x slower on CPU and it materializes the (T, T) scores.
        pad = q.shape[-1] - self.v_dim
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             F.pad(v, (0, pad)).transpose(1, 2) if pad > 0 else v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return out.transpose(1, 2)[..., : self.v_dim]  # (B, T, H, V)

    def _absorbed(self, q_nope, q_pe, latent, k_pe, positions) -> torch.Tensor:
        """Attention on cached latents (B,S,C) and rotary keys (B,S,R), kv_b_proj folded in."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, N, C), (H, V, C)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # query in latent space
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, latent)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.softmax_scale
        S = latent.shape[1]
        visible = torch.arange(S, device=positions.device) <= positions.unsqueeze(-1)  # (B, T, S)
        scores = scores.float().masked_fill(~visible.unsqueeze(1), float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)  # (B, H, T, S)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, latent)
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)  # (B, T, H, V)
