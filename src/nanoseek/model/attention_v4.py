"""DeepSeek-V4's attention: a sliding window plus compressed long-range entries (V4 report §2.3).

Where MLA caches a latent per token, V4 keeps one shared K=V head per token (multi-query attention
whose key is also its value, head_dim wide) and reaches beyond a short window through compression:

- every layer sees the last `sliding_window` tokens uncompressed ("sliding_attention" layers see
  nothing else);
- a "heavily_compressed_attention" (HCA) layer also sees one entry per closed window of m' tokens
  (compress_rates, V4: 128): a softmax-gated sum of the window's projected tokens,
      C_w = kv_norm( sum_{j in window w} softmax_j(Z_j + B_j) * K_j ),   K = kv_proj(x), Z = gate_proj(x)
  per channel, B (`position_bias`) a learned bias per place in the window, RoPE at the window's
  first position;
- a "compressed_sparse_attention" (CSA) layer compresses every m tokens (V4: 4) over overlapping
  windows: each token projects two series (Ca | Cb, 2 x head_dim), and entry w pools window w-1's
  Ca with window w's Cb, 2m slots in one softmax (entry 0 has only Cb). A lightning indexer, with a
  compressor of its own at index_head_dim, scores every entry for each query,
      I[t, w] = sum_j weights[t, j] * relu(q_I[t, j] . K_I[w]) * index_head_dim^-0.5,
  (q_I from the query latent, weights from x; the V3.2 indexer's formula) and the query attends to
  its index_topk best entries only.

A query sees an entry once the entry's last source token is at or before it (window closed).
Attention itself (per query head, over [window keys ; visible entries]) adds a learned per-head
sink logit to the softmax's denominator (`sinks`: a head may attend to "nothing"), and the keys'
rotary part rides into the output (K = V): it is rotated back by the query's position (cos, -sin),
so what a value contributes depends on its distance to the query only. RoPE is partial (the last
qk_rope_head_dim of head_dim, interleaved pairs) and has two tables: "main" (rope_theta) for the
sliding-window layers, "compress" (compress_rope_theta, with YaRN) for the compressed layers and
their compressors and indexer. The output projection is grouped: the H heads' outputs split into
o_groups groups, each projected to o_lora_rank (`o_a_proj`), then mixed to D (`o_b_proj`).

The math and the parameter names are transformers' DeepseekV4Attention / DeepseekV4CSACompressor /
DeepseekV4HCACompressor / DeepseekV4Indexer (its checkpoint names are checkpoint.py's concern).
Here only the forward without a cache (training, scoring): the inference engine's paged latent
cache does not fit V4's per-layer window and compressor state, and the engine refuses a V4 model.
Packed training rows (a `mask` from `documents=`) are honoured: the window stays in the document,
and an entry is visible only if its first source token is in the query's document (a window that
straddles a document start is seen by neither document); the compressed windows stay aligned to the
row, not to each document's start. The indexer is frozen: its training loss (V3.2's KL to the
attention) is not implemented for V4, and the language-model loss does not reach it (selection).

Shape legend: B batch, T positions, H query heads, Dh head_dim, R qk_rope_head_dim, D hidden size,
W compressed entries (T // m), m compression rate, J index heads, I index_head_dim, G o_groups.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model.attention import causal_mask, top_visible
from nanoseek.model.layers import RMSNorm, apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the last R dims of x (B, T, [H,] Dh), interleaved pairs; the first Dh - R untouched."""
    R = 2 * cos.shape[-1]
    return torch.cat([x[..., :-R], apply_rope(x[..., -R:], cos, sin)], dim=-1)


class Compressor(nn.Module):
    """One compressed entry per m tokens: (B, T, D) -> (B, T // m, dim). `overlap` (CSA): each
    token projects Ca | Cb and entry w pools window w-1's Ca with window w's Cb; else (HCA) entry w
    pools window w alone. Keys: kv_proj, gate_proj, position_bias (m, width), kv_norm."""

    def __init__(self, config: ModelConfig, rate: int, dim: int, overlap: bool):
        super().__init__()
        self.rate, self.dim, self.overlap = rate, dim, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, config.rms_norm_eps)

    def entries(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x (B, T, D), rope = cos/sin (B, W, R/2) at each entry's position -> entries (B, W, dim).
        The last T % m tokens (an unclosed window) make no entry."""
        B, T, _ = x.shape
        m, W, d = self.rate, T // self.rate, self.dim
        if W == 0:
            return x.new_zeros(B, 0, d)
        x = x[:, : W * m]
        kv = self.kv_proj(x).view(B, W, m, -1)  # (B, W, m, width)
        gate = self.gate_proj(x).view(B, W, m, -1) + self.position_bias
        if self.overlap:
            # 2m slots per entry: window w-1's Ca (window 0 has none: zero kv, gate -inf: weight 0), window w's Cb
            prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
            prev_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat([prev_kv, kv[..., d:]], dim=2)  # (B, W, 2m, d)
            gate = torch.cat([prev_gate, gate[..., d:]], dim=2)
        pooled = (kv * gate.float().softmax(dim=2).to(kv.dtype)).sum(dim=2)  # (B, W, d): softmax per channel
        return rope_tail(self.kv_norm(pooled), *rope)

    def first_source(self, W: int, device) -> torch.Tensor:
        """(W,) the first token each entry pools (CSA's entry w starts in window w-1)."""
        start = torch.arange(W, device=device) * self.rate
        return (start - self.rate).clamp(min=0) if self.overlap else start


class IndexScorer(nn.Module):
    """The indexer's per-head weights: weights_proj(x) * J^-0.5 (transformers' `indexer.scorer`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """q (B, T, J, I), keys (B, W, I), x (B, T, D) -> index scores (B, T, W), fp32."""
        scores = F.relu(torch.matmul(q.float(), keys.float().transpose(1, 2).unsqueeze(1)))  # (B, T, J, W)
        scores = scores * q.shape[-1] ** -0.5
        weights = self.weights_proj(x).float() * q.shape[2] ** -0.5  # (B, T, J)
        return (scores * weights.unsqueeze(-1)).sum(dim=2)


class LightningIndexer(Compressor):
    """CSA's indexer: its own overlapping compressor at index_head_dim (the keys K_I), a query
    projection from the attention's query latent (q_b_proj) and the scorer; picks each query's
    index_topk entries. Frozen (see the module docstring)."""

    def __init__(self, config: ModelConfig, rate: int):
        super().__init__(config, rate, config.index_head_dim, overlap=True)
        self.n_heads, self.topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, config.index_n_heads * config.index_head_dim, bias=False)
        self.scorer = IndexScorer(config)
        self.requires_grad_(False)  # no loss trains it; an unused trainable weight would break DDP

    @torch.no_grad()
    def select(self, x: torch.Tensor, q_latent: torch.Tensor, rope: Rope, entry_rope: Rope,
               visible: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), q_latent (B, T, q_lora_rank), rope (B, T, R/2) at the queries, entry_rope
        (B, W, R/2), visible (B, T, W) bool -> (B, T, W) bool: the visible entries among each query's top k."""
        B, T, _ = x.shape
        keys = self.entries(x, entry_rope)  # (B, W, I)
        q = rope_tail(self.q_b_proj(q_latent).view(B, T, self.n_heads, self.dim), *rope)  # (B, T, J, I)
        top, top_ok = top_visible(self.scorer(q, keys, x), visible, self.topk)
        return torch.zeros_like(visible).scatter_(-1, top, top_ok)


class V4Attention(nn.Module):
    """One DeepSeek-V4 attention layer of type config.layer_types[layer_idx]. Keys: q_a_proj,
    q_a_norm, q_b_proj, kv_proj, kv_norm, o_a_proj, o_b_proj, sinks, and for CSA / HCA
    `compressor.*` (CSA's with `compressor.indexer.*`)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        kind = config.layer_types[layer_idx]
        D, H, Dh = config.hidden_size, config.num_attention_heads, config.head_dim
        self.n_heads, self.head_dim, self.window = H, Dh, config.sliding_window
        self.n_groups, self.norm_eps = config.o_groups, config.rms_norm_eps
        self.rope_kind = "main" if kind == "sliding_attention" else "compress"
        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * Dh, bias=False)
        self.kv_proj = nn.Linear(D, Dh, bias=False)  # the one head, key and value at once
        self.kv_norm = RMSNorm(Dh, config.rms_norm_eps)
        # grouped output projection: group g's H*Dh/G outputs -> o_lora_rank, then all G*o_lora_rank -> D
        self.o_a_proj = nn.Linear(H * Dh // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))  # per head, a logit with no value in the softmax
        self.compressor = None
        if kind != "sliding_attention":
            rate = config.compress_rates[kind]
            csa = kind == "compressed_sparse_attention"
            self.compressor = Compressor(config, rate, Dh, overlap=csa)
            if csa:
                self.compressor.indexer = LightningIndexer(config, rate)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: dict[str, Rope], cache=None,
                layer_idx: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), rope {"main", "compress"} -> cos/sin (B, T, R/2) at `positions` (B, T)
        -> (B, T, D). mask (B, 1, T, T) bool, True where a query may attend a key (packed rows;
        None: causal)."""
        if cache is not None:  # the engine refuses V4 before this (inference/engine.py)
            raise NotImplementedError("DeepSeek-V4 attention has no cached (inference engine) path")
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        cos, sin = rope[self.rope_kind]
        q_latent = self.q_a_norm(self.q_a_proj(x))  # (B, T, q_lora_rank)
        q = F.rms_norm(self.q_b_proj(q_latent).view(B, T, H, Dh), (Dh,), eps=self.norm_eps)  # per head, no weight
        q = rope_tail(q, cos, sin)  # (B, T, H, Dh)
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # (B, T, Dh)

        seen = (causal_mask(T, x.device) if mask is None else mask[:, 0]).expand(B, T, T)  # (B, T, T)
        index = torch.arange(T, device=x.device)
        allowed = seen & (index.view(-1, 1) - index.view(1, -1) < self.window)  # the sliding window
        keys = kv
        if self.compressor is not None:
            entries, visible = self._compressed(x, q_latent, rope, seen)
            keys = torch.cat([kv, entries], dim=1)  # (B, T + W, Dh)
            allowed = torch.cat([allowed, visible], dim=-1)  # (B, T, T + W)

        scores = torch.einsum("bthd,bsd->bhts", q, keys) * Dh**-0.5  # (B, H, T, T+W)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        sink = self.sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]  # the sink's share dropped
        out = torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys)  # (B, T, H, Dh), values = keys
        out = rope_tail(out, cos, -sin)  # undo the keys' rotation at the query's position
        grouped = out.reshape(B, T, self.n_groups, -1)  # (B, T, G, H*Dh/G)
        w = self.o_a_proj.weight.view(self.n_groups, -1, grouped.shape[-1])  # (G, o_lora_rank, H*Dh/G)
        return self.o_b_proj(torch.einsum("btgi,goi->btgo", grouped, w).flatten(2))

    def _compressed(self, x, q_latent, rope, seen) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressor's entries (B, W, Dh) and which of them each query attends (B, T, W) bool."""
        B, T, _ = x.shape
        m = self.compressor.rate
        W = T // m
        # entry w sits at its window's first token w*m: that token's position and RoPE
        entry_rope = tuple(t[:, ::m][:, :W] for t in rope["compress"])
        entries = self.compressor.entries(x, entry_rope)
        closed = (torch.arange(W, device=x.device) + 1) * m - 1 <= torch.arange(T, device=x.device).view(-1, 1)
        # and every source token in the query's document (with no packed rows: always, once closed)
        visible = closed & seen[:, :, self.compressor.first_source(W, x.device)]  # (B, T, W)
        indexer = getattr(self.compressor, "indexer", None)
        if indexer is not None:
            visible = indexer.select(x, q_latent, rope["compress"], entry_rope, visible)
        return entries, visible
