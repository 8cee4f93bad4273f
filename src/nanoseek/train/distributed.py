"""Processes: where this one sits in a torchrun job, and the few collectives the stages use.

Without torchrun everything here is a no-op on one process: `sum_over_ranks` returns its inputs,
`barrier` returns at once, `gather_objects` returns a one-element list.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from nanoseek.device import resolve_device



@dataclass
class DistEnv:
    """Where this process sits in the job: its rank, the world size, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE and join the process group (gloo on CPU,
    nccl on GPU). Without torchrun it is a single process and no process group is created."""
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = launch_world_size()
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)  # one GPU per rank
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, local_rank, world_size, dev)


def launch_rank() -> int:
    """This process's rank as torchrun launched it (0 without torchrun): for what only one rank
    should print, where no DistEnv is at hand."""
    return int(os.environ.get("RANK", 0))


def launch_world_size() -> int:
    """How many processes torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Every rank uses the same seed: the model starts
    identical everywhere, and the data loader, not the RNG, gives each rank different samples."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sum_over_ranks(env: DistEnv, values: Sequence[float | torch.Tensor]) -> list[float]:
    """Each value summed over all ranks, in one all-reduce (float64, so counts stay exact);
    the values themselves without torchrun."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).to(env.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
