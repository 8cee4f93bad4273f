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

DeepSeek Sparse Attention (DeepSeek-V3.2, a config with index_topk set). A small "lightning
indexer" per layer scores every visible token s for each query t,
    I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s]) * index_head_dim^-0.5,
with its own projections (wq_b from MLA's query latent, wk + a LayerNorm k_norm from x, the head
weights w from weights_proj(x) * index_n_heads^-0.5; RoPE on the first R dims of q_I and k_I, in the
half-split layout, not MLA's interleaved one), and attention then runs, in either path, over the
index_topk tokens with the highest I only (all of them when fewer are visible): a decode step
gathers those tokens' cached latents and attends to them alone, so its attention costs O(k) per
query instead of O(S) (the indexer itself still scores all S, with J x I = 8K multiply-adds per
token at V3.2 size against MLA's H x (C + R) = 74K); training and prefill mask the dense scores.
One indexer key k_I (I = index_head_dim values) per token is what it adds to the cache: it rides
in the same row as k_pe, so a V3.2 model's `cache_dims` is (C, R + I) and the caches need nothing new.
The scores are fp32 and the selection is not differentiable.

Training the indexer (DeepSeek-V3.2-Exp report, §2.1): `MLA.dsa_mode` (set for the whole model by
`Transformer.set_dsa_mode`) makes a forward without a cache also return, in `MLA.indexer_stats`,
the indexer's KL loss L_I and its recall. The target is the main attention's distribution p[t, :]:
each head's softmax of the scores the attention uses, summed over heads and L1-normalized (the mean
over heads); L_I = mean_t KL(p[t, M_t] || softmax(I[t, M_t])) over a support M_t:
- "dense" (the dense warm-up): attention stays dense and M_t is every visible position;
- "sparse" (sparse training): attention runs over the top-k, M_t is the selected set S_t and p is
  the sparse attention's own distribution (each head's softmax over S_t).
p is computed without gradient and the indexer's inputs (x, MLA's query latent) are always detached,
so L_I trains the indexer alone and the language-model loss never reaches it (the selection has no
gradient either). p costs a B x H x T x T tensor per layer, computed only when dsa_mode is set
(SDPA does not return its probabilities): fine at toy scale, a real cost at long context. Recall:
the share of the dense attention mass p that falls on the selected top-k, averaged over the queries
that see more than index_topk tokens (for the others every visible token is selected).
dsa_mode None (inference, the engine's cached paths) computes none of it. The indexer's weights are
frozen (requires_grad False) unless a training stage turns its loss on: an unused trainable weight
would break DDP. Ties in I
(a key every index head scores <= 0 scores exactly 0) go to the earlier position, so what a query
selects does not depend on how its batch is padded; torch.topk (transformers', DeepSeek's code)
breaks them arbitrarily. Not here: DeepSeek's FP8 indexer scoring (with its Hadamard rotation, an
exact identity in full precision) and the FlashMLA sparse kernels (training and prefill mask the
dense scores; decode gathers with plain torch ops).

Shape legend: B batch, T query positions, S cached positions, H heads, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, D hidden size; for the indexer
J index_n_heads, I index_head_dim.
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
# DSA: a cached forward of at most this many new tokens per sequence (decode, a speculative verify)
# gathers each query's top-k latents and attends to those alone. A longer run (a chunked or
# prefix-cached prefill) masks the dense scores instead: its gathered rows, T x k per sequence,
# would outgrow the (T, S) scores they save.
SPARSE_DECODE_MAX_TOKENS = 16


class LatentCache(Protocol):
    """Where a forward with a cache reads and writes each layer's latents.

    `update` stores the new tokens' latents at their positions and returns every cached latent of
    each sequence in position order, from position 0, padded to a common length S. Attention then
    lets query position p see cached position s iff s <= p, which also masks the padding.
    The inference engine's paged cache and `ContiguousCache` below implement it.
    """

    def update(self, layer_idx: int, positions: torch.Tensor, latent: torch.Tensor,
               k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T), latent (B, T, C), k_pe (B, T, K) -> latents (B, S, C), k_pe (B, S, K).
        K = R, or R + I with DSA: the rotary key and the indexer key, in one row. A key row narrower
        than the cache's (a DeepSeek-V4 layer's, see latent_cache_dims) takes its first K columns."""
        ...


def latent_cache_dims(config: ModelConfig) -> tuple[int, int]:
    """Per token and layer, the widths of the two tensors a LatentCache stores: the latent (C) and
    the key row, the rotary key (R) followed, with DSA, by the indexer key (I). DeepSeek-V4
    (attention_v4.py): its K=V row (head_dim), and its compressors' per-token projections, as wide
    as the widest layer's (CSA: kv | gate of 2 x head_dim each, then the indexer's of 2 x I each;
    HCA: kv | gate of head_dim each; sliding: none), narrower layers filling the first columns."""
    if config.is_v4:
        Dh, I = config.head_dim, config.index_head_dim
        widths = {"sliding_attention": 0, "heavily_compressed_attention": 2 * Dh,
                  "compressed_sparse_attention": 4 * Dh + 4 * I}
        return Dh, max(widths[kind] for kind in config.layer_types)
    return config.kv_lora_rank, config.qk_rope_head_dim + (config.index_head_dim if config.sparse_attention else 0)


class ContiguousCache:
    """A plain (batch, max_len) latent cache: the reference implementation of LatentCache.

    Useful for tests and single-batch generation; the engine uses a paged cache instead.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
        latent_dim, key_dim = latent_cache_dims(config)
        self.latent = torch.zeros(n_layers, batch_size, max_len, latent_dim, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len, key_dim, dtype=dtype, device=device)
        self.length = 0  # positions [0, length) hold data in every row

    def update(self, layer_idx, positions, latent, k_pe):
        rows = torch.arange(latent.shape[0], device=latent.device).unsqueeze(1)  # (B, 1)
        K = k_pe.shape[-1]  # a V4 layer's row may be narrower than the cache's
        self.latent[layer_idx][rows, positions] = latent.to(self.latent.dtype)
        self.k_pe[layer_idx][rows, positions, :K] = k_pe.to(self.k_pe.dtype)
        self.length = max(self.length, int(positions.max()) + 1)
        return self.latent[layer_idx, :, : self.length], self.k_pe[layer_idx, :, : self.length, :K]


class Indexer(nn.Module):
    """DSA's lightning indexer: which index_topk visible tokens each query attends to.

    Its keys, as transformers' `DeepseekV32Indexer` and the released V3.2 checkpoints name them:
    `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`. Its inputs are detached: only its own loss
    trains it, and it is frozen unless that loss is on (see the module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5
        self.requires_grad_(False)  # trained only by its own loss (a stage turns it on); unused, it would break DDP

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first R dims, half-split: the layout the released indexer weights expect
        (DeepSeek's 2025-11-17 fix of its inference demo; transformers does the same)."""
        x_pe, x_rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(x_pe, cos, sin, interleaved=False), x_rest], dim=-1)

    def key(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, T, D) -> the tokens' indexer keys (B, T, I), what the cache keeps for later queries."""
        k = self.wk(x.detach())  # detached: the indexer's loss must not reach the main model
        # LayerNorm in fp32 as DeepSeek's code (its k_norm weights are fp32); the same for fp32 weights
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).to(k.dtype)
        return self._rope(k, *rope)

    def scores(self, x: torch.Tensor, q_compressed: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               keys: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), q_compressed (B, T, q_lora_rank) (MLA's normed query latent), keys (B, S, I)
        of every cached position -> the index scores I (B, T, S), fp32, unmasked. With gradient
        when the indexer is trainable; its inputs are detached, so it is the only thing it reaches."""
        B, T, _ = x.shape
        x, q_compressed = x.detach(), q_compressed.detach()
        q = self._rope(self.wq_b(q_compressed).view(B, T, self.n_heads, self.head_dim), *rope)  # (B, T, J, I)
        # fp32 scores, in transformers' order of operations: (B,T,J,I) @ (B,1,I,S) -> (B,T,J,S). The two
        # positive constant scales change no ranking; they keep the scores the reference's
        scores = F.relu(torch.matmul(q.float(), keys.float().transpose(1, 2).unsqueeze(1)) * self.softmax_scale)
        weights = self.weights_proj(x).float() * self.n_heads**-0.5  # (B, T, J)
        return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # (B, T, S)

    @torch.no_grad()
    def top(self, index: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index (B, T, S) scores, visible (B, T, S) bool -> each query's top min(index_topk, S)
        positions (B, T, k) and whether each is visible (B, T, k) bool: with fewer than k visible,
        the top k include invisible positions, which attention must skip."""
        return top_visible(index, visible, self.topk)

    def select(self, index: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """index (B, T, S) scores, visible (B, T, S) bool -> (B, T, S) bool: the visible positions
        among each query's top index_topk, as a mask over all S."""
        top, top_visible = self.top(index, visible)
        return torch.zeros_like(visible).scatter_(-1, top, top_visible)


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
        # DeepSeek-V3.2: restrict each query to the tokens its indexer selects
        self.indexer = Indexer(config) if config.sparse_attention else None
        # training the indexer (module docstring): None, "dense" (warm-up) or "sparse"; a forward
        # without a cache then leaves (L_I, recall) here, collected by Transformer.extra_losses
        self.dsa_mode: str | None = None
        self.indexer_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LatentCache | None = None, layer_idx: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), positions (B, T), rope = cos/sin (B, T, R/2) -> (B, T, D). mask (B, 1, T, T),
        True where a query may attend a key, replaces the causal mask (training on packed rows)."""
        B, T, _ = x.shape
        cos, sin = rope
        q_compressed = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank)
        q = self.q_proj(x) if q_compressed is None else self.q_b_proj(q_compressed)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B,T,H,N), (B,T,H,R)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, C): what the cache stores, after the norm
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)  # (B, T, R): one rotary key for all heads
        index_k = None if self.indexer is None else self.indexer.key(x, rope)  # (B, T, I)

        if cache is None:
            if self.indexer is not None:  # DSA: of what the causal (or packed-row) mask shows, the selected
                visible = (causal_mask(T, x.device) if mask is None else mask[:, 0]).expand(B, T, T)
                index = self.indexer.scores(x, q_compressed, rope, index_k)  # (B, T, T)
                selected = self.indexer.select(index, visible)
                if self.dsa_mode is not None:
                    self.indexer_stats = self._indexer_loss(index, visible, selected, q_nope, q_pe, latent, k_pe)
                if self.dsa_mode != "dense":  # the dense warm-up keeps the mask it was given
                    mask = selected.unsqueeze(1)  # (B, 1, T, T)
            out = self._expanded(q_nope, q_pe, latent, k_pe, mask)
        else:
            # with DSA the indexer key rides in the rotary key's cache row: [k_pe, index_k]
            key_row = k_pe if index_k is None else torch.cat([k_pe, index_k.to(k_pe.dtype)], dim=-1)
            latent_all, key_rows = cache.update(layer_idx, positions, latent, key_row)
            k_pe_all, index_k_all = key_rows[..., : self.rope_dim], key_rows[..., self.rope_dim:]  # (B,S,R), (B,S,I)
            S = latent_all.shape[1]
            prefill = T > 1 and S == T and not positions[:, 0].any()
            visible = None  # a V3 prefill with no past attends causally: no mask to build
            if self.indexer is not None or not prefill:
                visible = torch.arange(S, device=positions.device) <= positions.unsqueeze(-1)  # (B, T, S)
            if self.indexer is not None:
                # a prefill with no past scores the keys it just computed; they are the cache's too
                index = self.indexer.scores(x, q_compressed, rope, index_k if prefill else index_k_all)
                if not prefill and T <= SPARSE_DECODE_MAX_TOKENS and self.indexer.topk < S:
                    # decode: attend to the gathered top-k rows only, DSA's O(k) instead of O(S)
                    return self.o_proj(self._absorbed_sparse(q_nope, q_pe, latent_all, k_pe_all,
                                                             *self.indexer.top(index, visible)).flatten(2))
                visible = self.indexer.select(index, visible)
            if prefill:
                # a prefill with no past (every row starts at 0): the expanded path is the same
                # attention and cheaper here, since absorbing pays C-wide scores over T x T
                keep = None if visible is None else visible.unsqueeze(1)  # (B, 1, T, T)
                out = self._expanded(q_nope, q_pe, latent, k_pe, keep)
            else:
                out = self._absorbed(q_nope, q_pe, latent_all, k_pe_all, visible)
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

    def _indexer_loss(self, index, visible, selected, q_nope, q_pe, latent, k_pe) -> tuple[torch.Tensor, torch.Tensor]:
        """index (B, T, T) the indexer's scores (with gradient), visible and selected (B, T, T) bool,
        the attention's inputs -> (L_I, recall), scalars (see the module docstring). The target p
        and the recall carry no gradient; L_I's gradient reaches the indexer alone."""
        with torch.no_grad():
            B, T, H, _ = q_nope.shape
            k_nope = self.kv_b_proj(latent).view(B, T, H, self.nope_dim + self.v_dim)[..., : self.nope_dim]
            q = torch.cat([q_nope, q_pe], dim=-1).float()  # (B, T, H, N+R)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1).float()
            # the attention's scores, fp32: (B, H, T, T), a T x T tensor per head (the cost of this loss)
            scores = torch.einsum("bthd,bshd->bhts", q, k) * self.softmax_scale
            dense = scores.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(dim=-1)
            # of what each query sees, the share of the heads' mean distribution on the top-k
            recall = (dense * selected.unsqueeze(1)).sum(-1).mean(1)  # (B, T)
            counted = visible.sum(-1) > self.indexer.topk  # queries with something left out
            recall = recall[counted].mean() if counted.any() else recall.new_ones(())
            support = visible if self.dsa_mode == "dense" else selected
            if self.dsa_mode == "sparse":  # the distribution the sparse attention really has
                dense = scores.masked_fill(~selected.unsqueeze(1), float("-inf")).softmax(dim=-1)
            p = dense.mean(1)  # (B, T, T): summed over heads, L1-normalized (each head's row sums to 1)
        # KL(p || softmax(I)) over the support, 0 * log 0 = 0; the masked log-probabilities are
        # zeroed, not -inf, so that p * log q stays finite where p = 0
        log_q = index.masked_fill(~support, float("-inf")).log_softmax(dim=-1).masked_fill(~support, 0.0)
        kl = (torch.xlogy(p, p) - p * log_q).sum(-1)  # (B, T)
        return kl.mean(), recall

    def _absorbed(self, q_nope, q_pe, latent, k_pe, visible) -> torch.Tensor:
        """Attention on cached latents (B,S,C) and rotary keys (B,S,R), kv_b_proj folded in; query t
        attends to the positions s where visible (B, T, S) is True."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, N, C), (H, V, C)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # query in latent space
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, latent)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.softmax_scale
        scores = scores.float().masked_fill(~visible.unsqueeze(1), float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)  # (B, H, T, S)
        out_latent = torch.einsum("bhts,bsc->bthc", probs, latent)
        return torch.einsum("bthc,hvc->bthv", out_latent, w_uv)  # (B, T, H, V)

    def _absorbed_sparse(self, q_nope, q_pe, latent, k_pe, top, top_visible) -> torch.Tensor:
        """`_absorbed` over the rows the indexer selected, gathered first: top (B, T, k) positions
        of the cached latents (B,S,C) and rotary keys (B,S,R), top_visible (B, T, k) bool. Each
        query becomes a batch row of its own, with its k rows as its cache: O(k) per query, not O(S)."""
        B, T, k = top.shape
        # each query a batch row of its own: q_nope / q_pe (B*T, 1, H, .), its rows (B*T, k, .)
        out = self._absorbed(q_nope.flatten(0, 1).unsqueeze(1), q_pe.flatten(0, 1).unsqueeze(1),
                             _gather_rows(latent, top).flatten(0, 1), _gather_rows(k_pe, top).flatten(0, 1),
                             top_visible.reshape(B * T, 1, k))
        return out.view(B, T, *out.shape[2:])  # (B, T, H, V)


def top_visible(index: torch.Tensor, visible: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """index (B, T, S) scores, visible (B, T, S) bool -> each query's top min(k, S) positions
    (B, T, k) and whether each is visible (B, T, k): the lightning indexers' selection (V3.2's, V4's)."""
    index = index.masked_fill(~visible, float("-inf"))
    # a stable descending sort, not topk: ties go to the earlier position whatever the padding
    k = min(k, index.shape[-1])
    top = index.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # (B, T, k)
    return top, visible.gather(-1, top)


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (B, S, W), index (B, T, k) positions -> (B, T, k, W): each query's selected rows.
    One index_select on flat row ids (on CPU several times faster than gather on an expanded index)."""
    B, S, W = rows.shape
    flat = (index + torch.arange(B, device=index.device).view(B, 1, 1) * S).flatten()
    return rows.reshape(B * S, W).index_select(0, flat).view(*index.shape, W)


def causal_mask(T: int, device: torch.device | str) -> torch.Tensor:
    """(1, T, T) bool: query t sees keys s <= t."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril().unsqueeze(0)
