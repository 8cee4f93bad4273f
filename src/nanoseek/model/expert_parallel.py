"""Expert parallelism (EP): each rank holds 1/W of every MoE layer's routed experts, and tokens
travel to their experts' owners and back by all-to-all (torchtitan's AllToAllTokenDispatcher; V3 §3.2).

With W ranks and E routed experts per layer, rank r holds experts [r*E/W, (r+1)*E/W) in a
ModuleDict keyed by the global id, so state-dict keys stay the released ones
(`mlp.experts.{global_id}.gate_proj.weight`). The router (and its correction bias) and the shared
experts stay replicated. `ExpertShard.dispatch` is the one forward; the rest of this file is
what training needs around it: `shard_experts` (called by the Trainer), the gradient scale and
norm, and gathering / selecting the experts' tensors for checkpoints.

Data parallelism composes with it (the Trainer's `expert_parallel=true` with `parallel=ddp`): each
rank trains on its own batch, the replicated parameters are all-reduced by DDP, the experts are not
(no other rank holds them). An expert's gradient arrives from every rank's tokens through the
reverse all-to-all, so it is a sum over ranks where DDP's is a mean: `scale_expert_grads` divides it
by W. The global gradient norm counts each replicated gradient once and sums the experts' over ranks.

Shape legend: N tokens on this rank, D hidden size, E routed experts, K experts per token, W ranks,
L = E/W experts per rank, S rows sent by this rank (N*K), R rows received by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from nanoseek.errors import ConfigError
from nanoseek.model.moe import _compute_dtype, grouped_experts, moe_layers

# a routed expert's parameter: (layer prefix, global expert id)
EXPERT_KEY = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.")


@dataclass
class ExpertShard:
    """Where one MoE layer's experts live: this rank holds global ids [first, first + n_local)."""

    rank: int
    world_size: int
    n_local: int

    @property
    def first(self) -> int:
        return self.rank * self.n_local

    def dispatch(self, experts: nn.ModuleDict, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 counts: torch.Tensor, grouped: bool = False) -> torch.Tensor:
        """The MoE's routed output for this rank's tokens, the experts run by their owners.

        x (N, D) this rank's tokens, weights / expert_ids (N, K) its routing, counts (E,) its pairs
        per expert; grouped: run the local experts as grouped GEMMs (MoE's choice: on CUDA in bf16)
        rather than a loop. Every rank must call it (it is a collective), with or without tokens.

        1. Sort the N*K (token, expert) pairs by expert, which sorts them by owner too (owners hold
           contiguous ids), and exchange the per-expert counts: `recv_counts` (W, L) is how many
           rows each source rank sends to each of this rank's experts.
        2. all-to-all the rows (S, D) -> (R, D): each owner receives them source-major (source 0's
           rows of its expert 0, 1, ..., then source 1's, ...).
        3. Run the local experts on the received rows: in a loop, each once on its rows (permuted to
           expert-major and back), or as grouped GEMMs over them all (`moe.grouped_experts`).
        4. The reverse all-to-all (R, D) -> (S, D) returns each pair's result to its token's rank,
           in step 1's order; un-sort and combine each token's K results with its gate weights.

        Both all-to-alls are differentiable: the backward of one is the other with the splits swapped.
        """
        N, D = x.shape
        K, W, L = expert_ids.shape[1], self.world_size, self.n_local
        # 1. (token, expert) pairs grouped by expert; counts exchanged so every rank knows its receives
        order = expert_ids.flatten().argsort(stable=True)  # (S,)
        # in the experts' compute dtype (bf16 under autocast): half the bytes of the fp32 residual stream,
        # and the same values the experts' first matmuls would cast to
        send = x.to(_compute_dtype(x)).index_select(0, order // K)  # (S, D)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)  # the counts of rank r's experts go to r
        recv_counts = recv_counts.view(W, L)  # [source, local expert]
        # rows to each owner, rows from each source, rows for each local expert: one host sync
        splits = torch.cat([counts.view(W, L).sum(dim=1), recv_counts.sum(dim=1), recv_counts.sum(dim=0)]).tolist()
        send_splits, recv_splits, expert_rows = splits[:W], splits[W:2 * W], splits[2 * W:]
        # 2. rows to the experts' owners
        recv = _AllToAll.apply(send, recv_splits, send_splits)  # (R, D) source-major
        # 3. the local experts, on every row received
        local_expert = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv_counts.flatten())  # (R,)
        if grouped:  # each row one (token, expert) pair of gate weight 1; the GEMMs sort them themselves
            out = grouped_experts(list(experts.values()), recv, recv.new_ones(len(recv), 1, dtype=weights.dtype),
                                  local_expert.unsqueeze(1), recv_counts.sum(dim=0))  # (R, D)
        else:
            perm = local_expert.argsort(stable=True)  # (R,) expert-major order of the received rows
            chunks = recv.index_select(0, perm).split(expert_rows)
            # every local expert runs, on zero rows too: each expert weight gets a gradient on every
            # step, as in the single-process loop (AdamW then steps it the same way)
            out = torch.cat([expert(chunk) for expert, chunk in zip(experts.values(), chunks)])  # (R, D)
            out = out.index_select(0, _inverse(perm))
        # 4. results back to the tokens' ranks, un-sorted, combined
        back = _AllToAll.apply(out, send_splits, recv_splits)  # (S, D) in step 1's order
        back = back.index_select(0, _inverse(order)).view(N, K, D)  # (token, k) order
        return (back * weights.unsqueeze(-1).to(back.dtype)).sum(dim=1)  # (N, D)


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single of rows with uneven splits, differentiable: the gradient of the
    received rows goes back to their senders by the same all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        out = rows.new_empty(sum(out_splits), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits), None, None


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `perm` (index_select by it puts the rows back)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


# ---------------------------------------------------------------- what training needs around it


def shard_experts(model: nn.Module) -> None:
    """Keep only this rank's routed experts in each MoE layer (the rest are freed) and make the
    layer dispatch its tokens by all-to-all, over all ranks of the default process group. Call it
    on every rank, on identically initialized models. A ConfigError when a layer's experts do not
    divide evenly over the ranks."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layers = moe_layers(model)
    if not layers:
        raise ConfigError(f"expert_parallel=true: a {type(model).__name__} has no MoE layers whose experts "
                          "could be sharded; set expert_parallel=false")
    for moe in layers:
        check_expert_split(moe.n_experts, world_size)
        shard = ExpertShard(rank, world_size, moe.n_experts // world_size)
        moe.experts = nn.ModuleDict({str(i): moe.experts[i] for i in range(shard.first, shard.first + shard.n_local)})
        moe.expert_shard = shard


def check_expert_split(n_experts: int, world_size: int) -> None:
    """A ConfigError unless `n_experts` routed experts divide evenly over `world_size` ranks."""
    if n_experts % world_size:
        raise ConfigError(f"expert_parallel=true: n_routed_experts={n_experts} does not divide over "
                          f"{world_size} ranks; run a number of ranks that divides {n_experts}")


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of this rank's routed experts (held by no other rank)."""
    return [p for moe in moe_layers(model) if moe.expert_shard is not None for p in moe.experts.parameters()]


@torch.no_grad()
def scale_expert_grads(model: nn.Module) -> None:
    """Divide the local experts' gradients by W: each is the sum of every rank's tokens'
    gradients, where the objective (DDP's, as one process's) is the mean over ranks."""
    for moe in moe_layers(model):
        if moe.expert_shard is not None:
            for p in moe.experts.parameters():
                if p.grad is not None:
                    p.grad.div_(moe.expert_shard.world_size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model under EP: the global norm counts each
    replicated gradient once (DDP made them equal on every rank) and sums the experts' squared
    norms over ranks; every rank then scales its gradients by the same factor."""
    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    replicated = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in experts])
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in experts]).to(
        replicated.device, torch.float64) ** 2  # (a CPU zero when no expert has a gradient)
    dist.all_reduce(expert_sq)
    total = (replicated.double() ** 2 + expert_sq).sqrt().to(replicated.dtype)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ---- checkpoints: every expert on rank 0 to save; this rank's experts to resume


def gather_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """`tensors` (a sharded model's state, this rank's experts in it) with every other rank's
    experts added, on rank 0; None on the others. A collective: every rank calls it."""
    mine = {k: v.detach().cpu() for k, v in tensors.items() if EXPERT_KEY.match(k)}
    parts = _gather_to_first(mine)
    if parts is None:
        return None
    full = dict(tensors)
    for part in parts:
        full.update(part)
    return full


def gather_optimizer_state(state: dict) -> dict | None:
    """The optimizer state (get_optimizer_state_dict's: entries and param groups keyed by parameter
    name) of a sharded model with every rank's experts in it, on rank 0, None on the others. Every
    rank's groups are alike (the same settings), so each group's list of names gains the other ranks'
    experts. Loading looks parameters up by name: one process, or EP on any number of ranks (each
    then takes its own experts' entries and leaves the rest), resumes it. A collective."""
    mine = {"state": {k: _to_cpu(v) for k, v in state["state"].items() if EXPERT_KEY.match(k)},
            "groups": [[n for n in g["params"] if EXPERT_KEY.match(n)] for g in state["param_groups"]]}
    parts = _gather_to_first(mine)
    if parts is None:
        return None
    entries = {k: _to_cpu(v) for k, v in state["state"].items()}
    for part in parts[1:]:
        entries.update(part["state"])
    groups = [{**group, "params": group["params"] + [name for part in parts[1:] for name in part["groups"][i]]}
              for i, group in enumerate(state["param_groups"])]
    return {"state": entries, "param_groups": groups}


def local_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model's weights without the experts other ranks hold."""
    local = set(model.state_dict())
    return {k: v for k, v in tensors.items() if k in local or not EXPERT_KEY.match(k)}


def _gather_to_first(obj):
    """Every rank's `obj` in rank order on rank 0 (None elsewhere)."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def _to_cpu(entry: dict) -> dict:
    """An optimizer entry (exp_avg, step, ...) with its tensors on the CPU, to pickle to rank 0."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
