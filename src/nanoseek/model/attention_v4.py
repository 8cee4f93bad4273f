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

With a cache (the inference engine's paged per-token cache, model/attention.py's `LatentCache`)
each token leaves, per layer, what V4's attention will ever need from it, in the same per-token row
an MLA latent takes: its K=V row (head_dim, rotated: the "latent") and, for a compressed layer, its
compressor's per-token projections kv | gate (CSA: 2 x 2 x head_dim, HCA: 2 x head_dim), followed
for CSA by its indexer compressor's (2 x 2 x index_head_dim) (the "key row"; a sliding layer's is
empty). Every row depends on the token's own layer input alone, so on the tokens up to it: prefix
caching and preemption hold. A cached forward writes its new tokens' rows, reads every row of the
sequence back (position-ordered, padded), attends to the last sliding_window K=V rows and recomputes
the compressed entries of all closed windows from the cached projections, the indexer's keys and its
top-k with them: the same functions on the same values as the forward without a cache. Recomputing
costs O(S x row width) per layer and step (S the context), about what the indexer's scoring of every
entry costs; a production engine keeps the entries and only the open window's projections instead.
Packed training rows (a `mask` from `documents=`) are honoured: the window stays in the document,
and an entry is visible only if its first source token is in the query's document (a window that
straddles a document start is seen by neither document); the compressed windows stay aligned to the
row, not to each document's start. The indexer is frozen: its training loss (V3.2's KL to the
attention) is not implemented for V4, and the language-model loss does not reach it (selection).

Shape legend: B batch, T positions, S cached positions (with a cache), H query heads, Dh head_dim,
R qk_rope_head_dim, D hidden size, W compressed entries (T // m, or S // m), m compression rate,
J index heads, I index_head_dim, G o_groups.
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
        self.width = width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> each token's kv | gate (B, T, 2 * width): all an entry needs from its source
        tokens, and what the engine's cache keeps of them (one token's row depends on that token alone)."""
        return torch.cat([self.kv_proj(x), self.gate_proj(x)], dim=-1)

    def pool(self, rows: torch.Tensor, rope: Rope) -> torch.Tensor:
        """rows (B, S, 2 * width) (`project`'s, positions 0..S-1), rope = cos/sin (B, W, R/2) at each
        entry's position -> entries (B, W, dim), W = S // m. The last S % m tokens (an unclosed window)
        make no entry."""
        B, S, _ = rows.shape
        m, W, d = self.rate, S // self.rate, self.dim
        if W == 0:
            return rows.new_zeros(B, 0, d)
        kv, gate = rows[:, : W * m].reshape(B, W, m, -1).chunk(2, dim=-1)  # (B, W, m, width) each
        gate = gate + self.position_bias
        if self.overlap:
            # 2m slots per entry: window w-1's Ca (window 0 has none: zero kv, gate -inf: weight 0), window w's Cb
            prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
            prev_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat([prev_kv, kv[..., d:]], dim=2)  # (B, W, 2m, d)
            gate = torch.cat([prev_gate, gate[..., d:]], dim=2)
        pooled = (kv * gate.float().softmax(dim=2).to(kv.dtype)).sum(dim=2)  # (B, W, d): softmax per channel
        return rope_tail(self.kv_norm(pooled), *rope)

    def entries(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x (B, T, D), rope (B, W, R/2) at each entry's position -> entries (B, W, dim)."""
        return self.pool(self.project(x), rope)

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
    def select(self, keys: torch.Tensor, x: torch.Tensor, q_latent: torch.Tensor, rope: Rope,
               visible: torch.Tensor) -> torch.Tensor:
        """keys (B, W, I) its entries (`pool`'s), x (B, T, D), q_latent (B, T, q_lora_rank), rope
        (B, T, R/2) at the queries, visible (B, T, W) bool -> (B, T, W) bool: the visible entries
        among each query's top k."""
        B, T, _ = x.shape
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: dict, cache=None,
                layer_idx: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), rope {"main", "compress"} -> cos/sin (B, T, R/2) at `positions` (B, T), and
        "compress_at" (the compress table, for entries at positions before the new tokens) -> (B, T, D).
        mask (B, 1, T, T) bool, True where a query may attend a key (packed rows; None: causal).
        With a `cache` (LatentCache) the tokens' rows are written and the sequence's past attended."""
        B, T, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        cos, sin = rope[self.rope_kind]
        q_latent = self.q_a_norm(self.q_a_proj(x))  # (B, T, q_lora_rank)
        q = F.rms_norm(self.q_b_proj(q_latent).view(B, T, H, Dh), (Dh,), eps=self.norm_eps)  # per head, no weight
        q = rope_tail(q, cos, sin)  # (B, T, H, Dh)
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # (B, T, Dh)
        if cache is None:
            keys, allowed = self._uncached(x, q_latent, kv, rope, mask)
        else:
            keys, allowed = self._cached(x, q_latent, kv, positions, rope, cache, layer_idx)

        scores = torch.einsum("bthd,bsd->bhts", q, keys) * Dh**-0.5  # (B, H, T, S+W)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        sink = self.sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]  # the sink's share dropped
        out = torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys)  # (B, T, H, Dh), values = keys
        out = rope_tail(out, cos, -sin)  # undo the keys' rotation at the query's position
        grouped = out.reshape(B, T, self.n_groups, -1)  # (B, T, G, H*Dh/G)
        w = self.o_a_proj.weight.view(self.n_groups, -1, grouped.shape[-1])  # (G, o_lora_rank, H*Dh/G)
        return self.o_b_proj(torch.einsum("btgi,goi->btgo", grouped, w).flatten(2))

    def _uncached(self, x, q_latent, kv, rope, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys of a forward without a cache, [kv ; entries] (B, T + W, Dh), and what each query
        attends (B, T, T + W) bool: its window, in its document, and its visible selected entries."""
        B, T, _ = x.shape
        seen = (causal_mask(T, x.device) if mask is None else mask[:, 0]).expand(B, T, T)  # (B, T, T)
        index = torch.arange(T, device=x.device)
        allowed = seen & (index.view(-1, 1) - index.view(1, -1) < self.window)  # the sliding window
        if self.compressor is None:
            return kv, allowed
        m = self.compressor.rate
        W = T // m
        # entry w sits at its window's first token w*m: that token's position and RoPE
        entry_rope = tuple(t[:, ::m][:, :W] for t in rope["compress"])
        closed = (torch.arange(W, device=x.device) + 1) * m - 1 <= index.view(-1, 1)
        # and every source token in the query's document (with no packed rows: always, once closed)
        visible = closed & seen[:, :, self.compressor.first_source(W, x.device)]  # (B, T, W)
        entries, visible = self._entries(self._projections(x), x, q_latent, rope, entry_rope, visible)
        return torch.cat([kv, entries], dim=1), torch.cat([allowed, visible], dim=-1)

    def _cached(self, x, q_latent, kv, positions, rope, cache, layer_idx) -> tuple[torch.Tensor, torch.Tensor]:
        """`_uncached` over the sequence's cached rows: writes the new tokens' K=V rows and
        projections, reads all S back -> keys (B, S + W, Dh), allowed (B, T, S + W) bool."""
        keys, rows = cache.update(layer_idx, positions, kv, self._projections(x))  # (B, S, Dh), (B, S, row)
        S = keys.shape[1]
        behind = positions.unsqueeze(-1) - torch.arange(S, device=x.device)  # (B, T, S): query minus key position
        allowed = (behind >= 0) & (behind < self.window)  # causal and in the window; hides the padding past S
        if self.compressor is None:
            return keys, allowed
        m = self.compressor.rate
        W = S // m
        starts = (torch.arange(W, device=x.device) * m).expand(x.shape[0], W)  # (B, W) each entry's position
        entry_rope = rope["compress_at"](starts)
        visible = (torch.arange(W, device=x.device) + 1) * m - 1 <= positions.unsqueeze(-1)  # (B, T, W) closed
        entries, visible = self._entries(rows, x, q_latent, rope, entry_rope, visible)
        return torch.cat([keys, entries], dim=1), torch.cat([allowed, visible], dim=-1)

    def _projections(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> the per-token rows the compressed entries are made of (B, T, row): the
        compressor's kv | gate, then the indexer's (CSA); width 0 for a sliding layer. What the
        engine's cache keeps next to each token's K=V row (latent_cache_dims sizes it)."""
        if self.compressor is None:
            return x.new_zeros(*x.shape[:2], 0)
        rows = self.compressor.project(x)
        indexer = getattr(self.compressor, "indexer", None)
        if indexer is not None:
            with torch.no_grad():  # the frozen indexer (module docstring)
                index_rows = indexer.project(x)
            rows = torch.cat([rows, index_rows], dim=-1)
        return rows

    def _entries(self, rows, x, q_latent, rope, entry_rope, visible) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (B, S, row) `_projections` at positions 0..S-1, entry_rope (B, W, R/2), visible
        (B, T, W) bool (closed, in the document) -> the compressor's entries (B, W, Dh) and which of
        them each query attends (B, T, W) bool: the visible ones, of CSA's the indexer's top k."""
        width = 2 * self.compressor.width
        entries = self.compressor.pool(rows[..., :width], entry_rope)
        indexer = getattr(self.compressor, "indexer", None)
        if indexer is not None:
            keys = indexer.pool(rows[..., width:], entry_rope)  # (B, W, I)
            visible = indexer.select(keys, x, q_latent, rope["compress"], visible)
        return entries, visible
