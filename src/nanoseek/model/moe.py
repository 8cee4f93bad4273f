"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts (V3 §2.1.2).

Routing (V3, `noaux_tc`): sigmoid affinities s; a per-expert correction bias b is added for
*selection only*; experts form n_group contiguous groups, a group scores the sum of its top-2
biased affinities, only the best topk_group groups stay eligible (the rest are masked with -inf,
since biased scores can be negative); the top-k eligible experts are chosen; their gate weights
come from the *unbiased* s, are normalised to sum 1 and scaled by routed_scaling_factor.
V2 routing (`greedy` / `group_limited_greedy`, softmax) is kept for V2-Lite checkpoints.

DeepSeek-V4 (config.is_v4) scores with sqrt(softplus(logit)) ("sqrtsoftplus"), routes by the biased
top-k without groups, and clamps its experts' SwiGLU (swiglu_limit). Its first layers
(mlp_layer_types "hash_moe") are hash-routed: a fixed table tid2eid (vocab, K) picks each token's K
experts from its token id alone, and the learned gate only weights them; such a gate has no
correction bias, so the balancing update leaves it alone (it still counts the load, for the logs).

Load balancing without an auxiliary loss: each MoE layer counts the tokens routed to each expert
during training (real tokens only: a padded batch, SFT's, passes a token_mask that leaves its pads
out); after every optimizer step `update_expert_bias` nudges b_i down by gamma for overloaded
experts and up for underloaded ones (the sign rule of eq. 16). The sequence-wise balance loss
(eqs. 17-20) is optional via `aux_loss_alpha`.

Expert compute has two equivalent forms: a loop over experts (fastest on CPU) and grouped GEMMs
over all experts at once (`grouped_experts`, with `F.grouped_mm`; the default on CUDA in bf16: no
host sync, no per-expert kernel launches). Both read the same per-expert `nn.Linear` weights, so
checkpoint keys stay those of the released files. Under expert parallelism (training under
torchrun, `expert_parallel=true`) a rank holds a slice of the experts, and the tokens travel by
all-to-all to the experts' owners, which run either form on them, and back: model/expert_parallel.py.

Shape legend: N tokens (B*T flattened), D hidden size, E routed experts, K experts per token,
G expert groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model.layers import MLP

# torch >= 2.10 spells it F.grouped_mm; 2.8-2.9 have the same op as torch._grouped_mm
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# The grouped GEMM kernels want each expert's rows to start 16-byte aligned: groups are padded
# to a multiple of this many rows (padding rows are zeros and never read back).
GROUP_ALIGN = 16


class Gate(nn.Module):
    """The router. Stored as `mlp.gate.weight` (E, D) and `mlp.gate.e_score_correction_bias` (E,);
    a V4 hash-routed layer's (`hashed`) has `mlp.gate.tid2eid` (vocab, K) instead of the bias."""

    def __init__(self, config: ModelConfig, hashed: bool = False):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        # V4's router renormalises even a single expert's weight (to 1); DeepSeek's V3 code keeps
        # its raw affinity
        self.normalise = config.norm_topk_prob and (self.top_k > 1 or config.is_v4)
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.hashed = hashed
        if hashed:  # token id -> its K experts; int64, and no gradient: a buffer, loaded from the checkpoint
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
            self.e_score_correction_bias = None
        elif self.topk_method == "noaux_tc":
            # fp32 whatever the model dtype: updates of 1e-3 vanish in bf16. No gradient flows to it.
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    @torch.no_grad()
    def reset_hash(self) -> None:
        """A fresh table: each token id gets K distinct experts drawn at random (a hash of the id that
        spreads the vocabulary evenly over the experts); a checkpoint's table replaces it."""
        V, E = self.tid2eid.shape[0], self.weight.shape[0]
        self.tid2eid.copy_(torch.rand(V, E, device=self.tid2eid.device).topk(self.top_k, dim=-1).indices)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> gate weights (N, K) fp32, expert ids (N, K), affinities (N, E) fp32.
        input_ids (N,): the tokens, which alone pick a hash-routed gate's experts."""
        # (N, E) in fp32, as DeepSeek's training and torchtitan route; autocast would run the cast
        # inputs' matmul in bf16 anyway (transformers' router does, under autocast), so it is off here
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.scoring_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.hashed:
            expert_ids = self.tid2eid[input_ids]  # (N, K): fixed by the token, whatever its hidden state
            return self._weights(scores, expert_ids), expert_ids, scores
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method != "greedy":
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                # the top 2 of each group by a sort: a group is a few experts, which CUDA's sort
                # handles in one kernel where topk takes several passes (0.3 ms a layer on an H200)
                group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(dim=-1)  # (N, G)
            else:  # V2 group_limited_greedy: a group scores its best expert
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(N, E)
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        return self._weights(scores, expert_ids), expert_ids, scores

    def _weights(self, scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The gate weights (N, K) of the chosen experts, from the unbiased affinities (N, E)."""
        weights = scores.gather(1, expert_ids)
        if self.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, hashed: bool = False):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.aux_loss_alpha = config.aux_loss_alpha
        self.gate = Gate(config, hashed)
        limit = config.swiglu_limit if config.is_v4 else None
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size, limit)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = (MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size, limit)
                               if config.n_shared_experts else None)
        # tokens routed to each expert since the last bias update (training forwards only)
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None  # set by training forwards when aux_loss_alpha > 0
        self.recomputing = False  # True while activation checkpointing reruns this layer in the backward
        # None: grouped GEMM on CUDA, the expert loop elsewhere; True / False force one form
        self.grouped_gemm: bool | None = None
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see stack_experts
        # set by expert_parallel.shard_experts: `experts` then holds this rank's slice (a ModuleDict
        # keyed by global id) and the tokens go to their experts' ranks by all-to-all
        self.expert_shard = None

    @torch.no_grad()
    def stack_experts(self) -> None:
        """For inference: keep the experts' weights in two stacked tensors, gate and up (E, 2F, D)
        and down (E, D, F), with each expert's weights views into them, so that the grouped GEMMs
        read them in place instead of stacking 3 x E matrices per forward (on an H100 that copy was
        a quarter of a batch-64 decode step's GPU time). The weights stop being trainable."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
        down = torch.stack([e.down_proj.weight for e in self.experts])
        half = gate_up.shape[1] // 2
        for i, e in enumerate(self.experts):
            e.gate_proj.weight = nn.Parameter(gate_up[i, :half], requires_grad=False)
            e.up_proj.weight = nn.Parameter(gate_up[i, half:], requires_grad=False)
            e.down_proj.weight = nn.Parameter(down[i], requires_grad=False)
        self.stacked = (gate_up, down)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). token_mask (B, T) bool: the real tokens of a padded batch; pads
        are still computed but count neither in the expert load nor in the balance loss (None: all count).
        input_ids (B, T): the tokens, for a hash-routed gate."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, expert_ids, scores = self.gate(flat, None if input_ids is None else input_ids.reshape(-1))
        # (E,) pairs per expert, for the dispatch. Not torch.bincount: on CUDA it reads the largest id
        # back to the host, a sync per layer that idles the GPU and breaks CUDA-graph capture.
        ids = expert_ids.flatten()
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=ids.device).index_add_(
            0, ids, torch.ones_like(ids))
        if self.training:
            if not self.recomputing:  # the rerun's routing is the forward's: counted once
                self.tokens_per_expert += counts.detach().float() if token_mask is None else self._real_load(
                    expert_ids, token_mask)
            if self.aux_loss_alpha > 0:  # recomputed too: the backward needs the rerun's saved tensors
                self.balance_loss = self._sequence_balance_loss(scores.view(B, T, -1), expert_ids.view(B, T, -1),
                                                                token_mask)
        grouped = self.grouped_gemm
        if grouped is None:  # the CUDA grouped-GEMM kernels are bf16 ones
            grouped = flat.is_cuda and _compute_dtype(flat) == torch.bfloat16
        if grouped and _grouped_mm is None:
            raise RuntimeError(f"grouped_gemm needs torch >= 2.8 (F.grouped_mm); this is torch {torch.__version__}")
        if self.expert_shard is not None:  # experts sharded over ranks: all-to-all to their owners
            y = self.expert_shard.dispatch(self.experts, flat, weights, expert_ids, counts, grouped)
        else:
            y = (self._dispatch_grouped if grouped else self._dispatch)(flat, weights, expert_ids, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, D)

    def _dispatch(self, x, weights, expert_ids, counts) -> torch.Tensor:
        """Sort the N*K (token, expert) pairs by expert and run each expert once on its own rows.

        Written for speed on CPU: gathers are index_select (whose backward is a cheap index_add),
        expert outputs are concatenated rather than written into slices of a buffer (slice writes
        make autograd copy and zero the whole buffer once per expert in the backward), and the K
        outputs of each token are combined by a weighted sum instead of a scatter.
        """
        N, D = x.shape
        order = expert_ids.flatten().argsort(stable=True)  # (N*K,) pair indices grouped by expert
        x_sorted = x.index_select(0, order // self.top_k)  # (N*K, D) the token of each sorted pair
        # In training an expert without tokens still runs (on zero rows), so every expert weight gets
        # a gradient, zeros included: DDP and FSDP2 need the same set of gradients on every rank.
        # Without autograd it is skipped: a decode step of one sequence touches only K experts.
        chunks = x_sorted.split(counts.tolist())  # one host sync; the loop is over experts, not tokens
        grad = torch.is_grad_enabled()
        out = torch.cat([expert(chunk) if grad or len(chunk) else chunk
                         for expert, chunk in zip(self.experts, chunks)])  # (N*K, D)
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(0, unsort).view(N, self.top_k, D)  # back to (token, k) order
        return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)  # (N, D)

    def _dispatch_grouped(self, x, weights, expert_ids, counts) -> torch.Tensor:
        """The same computation as `_dispatch`, as three grouped GEMMs over all experts."""
        return grouped_experts(list(self.experts), x, weights, expert_ids, counts, self.stacked)

    def _real_load(self, expert_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """(E,) tokens routed to each expert, pads left out; an index_add, so no host sync."""
        real = token_mask.reshape(-1, 1).expand_as(expert_ids).float()  # (N, K)
        return torch.zeros(self.n_experts, device=expert_ids.device).index_add_(0, expert_ids.flatten(),
                                                                               real.flatten())

    def _sequence_balance_loss(self, scores_BTE, ids_BTK, token_mask=None) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over the batch (V3 eqs. 17-20); with a
        token_mask (B, T) each sequence's T is its count of real tokens and its pads are left out."""
        B, T, E = scores_BTE.shape
        picked = torch.zeros(B, T, E, device=scores_BTE.device).scatter_(2, ids_BTK, 1.0)
        normed = scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)  # (B, T, E)
        if token_mask is None:
            f = picked.sum(dim=1) * (E / (self.top_k * T))  # (B, E)
            p = normed.mean(dim=1)  # (B, E)
        else:
            real = token_mask.view(B, T, 1).float()
            n = real.sum(dim=1).clamp(min=1)  # (B, 1) real tokens per sequence
            f = (picked * real).sum(dim=1) * (E / self.top_k) / n  # (B, E)
            p = (normed * real).sum(dim=1) / n  # (B, E)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()


def grouped_experts(experts: list[nn.Module], x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                    counts: torch.Tensor, stacked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x (N, D) through the `experts` its pairs are routed to, as three grouped GEMMs over them all
    (MoE._dispatch_grouped, and under expert parallelism the local experts): weights / expert_ids
    (N, K) the routing, ids into `experts`; counts (E,) pairs per expert; `stacked` the experts'
    weights already stacked for inference (MoE.stack_experts). Returns (N, D).

    Each (token, k) pair gets a row of a buffer in which expert e's rows start at a multiple of
    GROUP_ALIGN. Its size is a static upper bound (N*K + E*(GROUP_ALIGN-1)), so no shape depends
    on the routing and nothing waits for the GPU. Rows move by gathers whose gradients are
    gathers too (`_RowsOfTokens`, `_GatherRows`): an index_select's own backward is an atomic
    index_add, which cost 23 ms of a 187 ms training step of the `gpu` preset on an H100. The
    gate weights scale each row between the two GEMMs, where a row is F wide rather than D.
    """
    N, D = x.shape
    E, A, K = len(experts), GROUP_ALIGN, expert_ids.shape[1]
    rows = N * K + E * (A - 1)
    dtype = _compute_dtype(x)
    pair_experts = expert_ids.flatten()  # (N*K,) the expert of each (token, k) pair
    order = pair_experts.argsort(stable=True)  # (N*K,) pairs grouped by expert
    sorted_experts = pair_experts[order]  # (N*K,) non-decreasing
    padded = (counts + A - 1) // A * A  # (E,) rows per expert, aligned
    padded_start = padded.cumsum(0) - padded  # (E,)
    first = counts.cumsum(0) - counts  # (E,) first sorted pair of each expert
    rank = torch.arange(N * K, device=x.device) - first[sorted_experts]  # place within its expert
    row = torch.empty_like(order).index_copy_(0, order, padded_start[sorted_experts] + rank)  # (N*K,) per pair
    # (rows,) the token each row reads; padding rows read token 0: their outputs are never read
    # back, so their gradients are exactly zero
    pair_token = torch.arange(N * K, device=x.device) // K
    row_token = torch.zeros(rows, dtype=torch.long, device=x.device).index_copy_(0, row, pair_token)
    row_weight = weights.new_zeros(rows).index_copy(0, row, weights.flatten())  # (rows,) 0 on padding
    buffer = _RowsOfTokens.apply(x.to(dtype), row_token, row, K)  # (rows, D)
    offsets = padded.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
    gate_up, down = _stacked_weights(experts, dtype, stacked)  # (E, D, 2F), (E, F, D)
    # autocast would run the grouped GEMMs in fp32: the inputs are already in its dtype
    with torch.autocast(x.device.type, enabled=False):
        gate, up = _grouped_mm(buffer, gate_up, offs=offsets).chunk(2, dim=-1)  # (rows, F) each
        limit = experts[0].limit if experts else None
        if limit is not None:  # DeepSeek-V4's swiglu_limit, as MLP applies it
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        hidden = F.silu(gate) * up * row_weight.unsqueeze(-1).to(dtype)  # (rows, F)
        out = _grouped_mm(hidden, down, offs=offsets)  # (rows, D)
    return _GatherRows.apply(out, row).view(N, K, D).sum(dim=1)  # (N, D)


def _stacked_weights(experts: list[nn.Module], dtype: torch.dtype,
                     stacked: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' weights for the grouped GEMMs, in dtype: gate and up (E, D, 2F), down (E, F, D)."""
    if stacked is not None and stacked[0].dtype == dtype:  # inference: stacked once, read in place
        gate_up, down = stacked
    else:  # training: stacked per forward, so that each expert's weight gets its own gradient
        E = len(experts)
        gate_up = _StackedWeights.apply(dtype, *[w for e in experts
                                                 for w in (e.gate_proj.weight, e.up_proj.weight)])
        gate_up = gate_up.view(E, -1, gate_up.shape[-1])  # (2E, F, D) -> (E, 2F, D): gate rows, then up
        down = _StackedWeights.apply(dtype, *[e.down_proj.weight for e in experts])  # (E, D, F)
    return gate_up.transpose(1, 2), down.transpose(1, 2)


class _GatherRows(torch.autograd.Function):
    """source.index_select(0, index) for an index without repeats, whose gradient is then a plain
    copy of rows back (index_copy) rather than index_select's atomic index_add."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = source.shape[0]
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


class _RowsOfTokens(torch.autograd.Function):
    """x (N, D) -> (rows, D), row r a copy of token row_token[r]. Token n's K pairs have the rows
    pair_row[n*K : (n+1)*K]; every other row is padding, whose gradient is zero. So a token's
    gradient is the sum of its K pair rows' gradients: a gather and a sum, no atomic index_add.
    With no tokens (an expert-parallel rank that received none) the padding rows are zeros, and
    the empty gradient still flows back (the all-to-all's backward is a collective)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, row_token: torch.Tensor, pair_row: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(pair_row)
        ctx.k = k
        source = x if len(x) else x.new_zeros(1, x.shape[1])
        return source.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pair_row,) = ctx.saved_tensors
        return grad.index_select(0, pair_row).view(-1, ctx.k, grad.shape[1]).sum(dim=1), None, None, None


class _StackedWeights(torch.autograd.Function):
    """torch.stack(weights).to(dtype), whose backward casts the stacked gradient back once, as one
    contiguous tensor: each weight's gradient is a slice of it that becomes its .grad without a
    copy. (Through autograd's own stack and cast, each of the 3 x E gradients arrived strided and
    was copied on its own: about 1,700 small copies per step of the `gpu` preset.)"""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> torch.Tensor:
        ctx.weight_dtype = weights[0].dtype
        return torch.stack(weights).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, *grad.to(ctx.weight_dtype, memory_format=torch.contiguous_format).unbind(0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x computes in: autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def load_imbalance(loads: list[torch.Tensor]) -> list[float]:
    """max/mean expert load per layer: 1.0 is perfectly balanced, E/K is everything on K experts."""
    return [float(l.max() / l.mean().clamp(min=1e-9)) for l in loads]


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float = 1e-3) -> list[float]:
    """The auxiliary-loss-free balancing step (V3 eq. 16); call it after each optimizer step.

    Under torch.distributed the counts are summed over ranks first, so every rank applies the same
    update. Returns each layer's load imbalance (max/mean) for logging, then resets the counts.
    With gamma = 0 only the statistics are gathered (V3 sets gamma to 0 for its last 500B tokens).
    """
    imbalance = []
    for moe in moe_layers(model):
        counts = moe.tokens_per_expert
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        imbalance += load_imbalance([counts])
        bias = moe.gate.e_score_correction_bias
        if bias is not None and gamma > 0:
            bias += gamma * torch.sign(counts.mean() - counts)  # overloaded -> down, underloaded -> up
        counts.zero_()
    return imbalance
