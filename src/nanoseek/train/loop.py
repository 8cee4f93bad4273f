"""The machinery every training stage shares; the stages' loops (pretrain, SFT, distill, GRPO) use it.

What lives here, in the order a loop meets it:

1. Run configs: a dataclass per stage (`TrainConfig` holds the shared fields, a stage subclasses
   it), loaded from TOML with `key=value` overrides (`model.hidden_size=128` for nested tables).
   Values are parsed to the field's type; an unknown key or a bad value is a ConfigError that
   lists the valid keys.
2. Distributed setup from torchrun's environment (gloo on CPU, nccl on GPU; `run_stage` wraps a
   stage's loop in it), seeding, precision (fp32 on CPU, bf16 autocast on GPU), DDP or FSDP2
   wrapping, optional torch.compile.
3. The optimizer (AdamW, no weight decay on norms, biases and embeddings) and the learning-rate
   schedule (linear warmup, then cosine or warmup-stable-decay to min_lr_ratio * lr), a pure
   function of the step, so resuming needs only the step.
4. `Trainer`: one optimizer step over micro-batches (gradient accumulation, clipping), metrics
   (metrics.jsonl, console lines, TensorBoard when installed), checkpoints and exact resume,
   and a Ctrl-C (SIGINT/SIGTERM) that finishes the current step and saves before exiting.
5. `evaluate_loss` and `generate` (greedy / top-k sampling with the no-cache forward) for the
   periodic validation loss and text samples.

Checkpoint layout (one directory per save, written atomically):

    <out_dir>/checkpoint-<step>/     an HF DeepseekV3ForCausalLM directory: config.json,
        model.safetensors, ...          model.safetensors, generation_config.json, tokenizer files
        trainer_state/state.pt       optimizer, step, RNG states of every rank, data-loader
                                     position, counters; read with torch.load(weights_only=True)
    <out_dir>/latest -> checkpoint-<step>    symlink to the newest complete checkpoint
    <out_dir>/metrics.jsonl          one JSON object per line, each with its "step"
    <out_dir>/run_config.json        the resolved run config

Only the newest `keep_checkpoints` checkpoints are kept. A new one is complete before the old
ones are pruned, and each is renamed into place only once fully written, so a crash mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import tomllib
import types
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from nanoseek.checkpoint import atomic_directory, convert_checkpoint_tensors, read_tensors, save_model
from nanoseek.errors import CheckpointError, ConfigError

STATE_DIR = "trainer_state"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# ============================================================================ 1. run configs


@dataclass
class TrainConfig:
    """The settings every stage shares. A stage subclasses it (`PretrainConfig(TrainConfig)`)
    and adds its own fields; `load_config` fills it from TOML and `key=value` overrides."""

    # run
    out_dir: str = "runs/run"  # checkpoints, metrics.jsonl, run_config.json
    seed: int = 0  # model init, data order and sampling all derive from it
    max_steps: int = 1000  # optimizer steps
    # batch
    batch_size: int = 32  # sequences per optimizer step, summed over ranks and micro-steps
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = batch_size / world_size
    seq_len: int = 256
    # optimizer and schedule
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd only: the last fraction of the steps decays linearly
    weight_decay: float = 0.1  # on matrices only (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    # hardware
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several ranks: replicate (DDP) or shard (FSDP2)
    threads: int = 0  # CPU threads per process; 0 = torch's default
    # logging, evaluation, checkpoints
    log_every: int = 10  # console line every N steps (metrics.jsonl gets every step)
    eval_every: int = 100  # validation loss every N steps (and at the end); 0 = only at the end
    eval_batches: int = 8  # validation micro-batches per evaluation
    sample_every: int = 0  # print/log a generated text sample every N steps (and at the end); 0 = never
    sample_tokens: int = 64
    save_every: int = 0  # checkpoint every N steps; 0 = only at the end and on Ctrl-C
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 = keep all
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "seq_len", "log_every", "eval_batches")
        non_negative = ("micro_batch_size", "warmup_steps", "weight_decay", "grad_clip", "threads",
                        "eval_every", "sample_every", "sample_tokens", "save_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: expected one of auto, cpu, cuda")


C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build a `cls` run config from a TOML file (optional) and `key=value` overrides.

    Overrides win over the file, which wins over the dataclass defaults. Dotted keys reach into
    nested tables (`model.hidden_size=128`). Override values are parsed to the field's type (TOML
    literal syntax: `lr=3e-4`, `compile=true`, `data=["a.txt","b.txt"]`; plain words are strings).
    An unknown key or a value of the wrong type raises ConfigError naming the valid keys.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value; valid keys: {', '.join(config_keys(cls))}")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a table")
        node[leaf] = _CLIValue(value.strip())
    return _build(cls, data, cls)


def config_keys(cls: type) -> list[str]:
    """Every valid key of a config dataclass, nested ones dotted (`model.<field>` for dict tables)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += [f"{f.name}.{k}" for k in config_keys(tp)]
        elif typing.get_origin(tp) is dict or tp is dict:
            keys.append(f"{f.name}.<field>")
        else:
            keys.append(f.name)
    return keys


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _CLIValue(str):
    """A command-line value: a string still to be parsed to its field's type."""


def _build(cls: type, data: dict, root: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys: {', '.join(config_keys(root))}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a table: set its fields as {key}.<field>=value")
            kwargs[name] = _build(tp, value, root, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from TOML, or a _CLIValue string) as an instance of type `tp`, or a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _CLIValue):
        if tp is str or (origin is Literal and all(isinstance(a, str) for a in args)):
            value = str(value)
        elif value.lower() in ("none", "null") and type(None) in args:
            return None
        else:
            value = _parse_literal(value)
    if origin in (types.UnionType, typing.Union):  # X | None
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return value
    if origin is list or tp is list:
        if not isinstance(value, list):
            value = [value]  # `data=notes.txt` means a one-element list
        return [_coerce(v, args[0], key) if args else v for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a table: set its fields as {key}.<field>=value")
        return {k: _parse_literal(v) if isinstance(v, _CLIValue) else v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")


def _parse_literal(text: str) -> Any:
    """A TOML literal (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`); anything else is the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return str(text)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# ================================================================ 2. processes and precision


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
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, local_rank, world_size, dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_stage(train_fn: Callable, cfg: TrainConfig, resume=None):
    """Run a stage's `train_fn(cfg, env, resume)` in this process or as one rank under torchrun:
    join the process group, set the CPU thread count, and always leave the group again."""
    env = setup_distributed(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return train_fn(cfg, env, resume)
    finally:
        teardown_distributed()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Every rank uses the same seed: the model starts
    identical everywhere, and the data loader, not the RNG, gives each rank different samples."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (weights and optimizer stay fp32), plain fp32 on CPU, unless set."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ============================================================== 3. optimizer and schedule


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only.

    Norm weights and biases (1-D) and embeddings are not decayed: decaying a norm's gain or a
    token's embedding towards zero only fights the representation, it regularizes nothing.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Linear warmup over warmup_steps to lr, then
      cosine:   half a cosine from lr down to min_lr_ratio * lr at max_steps;
      wsd:      constant lr, then a linear decay to min_lr_ratio * lr over the last decay_fraction
                of the steps (warmup-stable-decay: the stable phase can be extended or branched);
      constant: lr.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, cfg.max_steps - decay_start)))
        return peak + (floor - peak) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def batch_plan(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum_steps) so that micro * accum * world_size == batch_size."""
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world_size)
    per_step = micro * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size ({micro}) x "
                          f"world size ({world_size}); change batch_size or micro_batch_size")
    return micro, cfg.batch_size // per_step


# ============================================================== 4. trainer


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Trainer:
    """What a stage's loop holds on to: the wrapped model, the optimizer, the step, the metrics
    writer, checkpointing and the stop signal. The loop itself stays in the stage's file:

        with Trainer(cfg, model, env, tokenizer=tok, loader=loader, resume=resume) as trainer:
            while trainer.step < cfg.max_steps:
                batches = [next(loader) for _ in range(trainer.grad_accum_steps)]
                trainer.log(trainer.train_step(batches, loss_fn))
                if trainer.every(cfg.save_every):
                    trainer.save_checkpoint()
                if trainer.should_stop():  # Ctrl-C
                    break
            trainer.save_checkpoint()

    `model` is the bare Transformer (on env.device); `trainer.model` is what to train through
    (compiled, DDP- or FSDP-wrapped) and `trainer.raw_model` the bare one (for saving, sampling,
    the expert-bias update). `loader` is anything with state_dict()/load_state_dict(); its
    position is checkpointed. `extra_state` (a dict) is saved and restored as is, for a stage's
    own counters. `resume` ("latest" or a checkpoint directory) restores a checkpoint at once.
    As a context manager it closes itself (metrics file, signal handlers) however the loop ends.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, env: DistEnv, tokenizer=None, loader=None,
                 resume: str | Path | None = None):
        self.cfg, self.env, self.tokenizer, self.loader = cfg, env, tokenizer, loader
        self.out_dir = Path(cfg.out_dir)
        self.raw_model = model
        self.micro_batch_size, self.grad_accum_steps = batch_plan(cfg, env.world_size)
        self.amp_dtype = autocast_dtype(cfg, env.device)
        self.model = self._wrap(model)
        self.optimizer = build_optimizer(model, cfg)
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds inside train_step, summed over resumes
        self.extra_state: dict[str, Any] = {}
        self.metrics = MetricsLogger(self.out_dir, enabled=env.is_main, tensorboard=cfg.tensorboard)
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "run_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        if resume is not None:
            self.resume(resume)
        elif env.is_main:
            self.metrics.truncate_after(-1)  # a fresh run in a used out_dir starts a fresh metrics.jsonl
        self._start_step = self.step
        self._t_start = time.perf_counter()
        self._stop = _StopSignal()

    # ---- wrapping

    def _wrap(self, model: nn.Module) -> nn.Module:
        """compile, then DDP (replicated; gradients all-reduced) or FSDP2 (parameters, gradients
        and optimizer state sharded per decoder layer) when there are several ranks."""
        if self.env.distributed and self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # One FSDP unit per main decoder layer. The MTP modules stay with the root unit: their
            # norms and projections are called outside the block's own forward, which FSDP2 hooks.
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        if self.cfg.compile:
            model = torch.compile(model)
        if self.env.distributed and self.cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # No buffer sync: each rank's expert-load counters are its own (they are summed
            # across ranks in update_expert_bias), and the routing bias is updated identically everywhere.
            no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 spelling
                              if "forward_sync_buffers" in inspect.signature(DDP).parameters
                              else {"broadcast_buffers": False})
            model = DDP(model, device_ids=[self.env.local_rank] if self.env.device.type == "cuda" else None,
                        **no_buffer_sync)
        return model

    @property
    def fsdp(self) -> bool:
        return self.env.distributed and self.cfg.parallel == "fsdp"

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    @contextmanager
    def _gradient_sync(self, enabled: bool):
        """Skip the cross-rank gradient reduction on all but the last micro-batch of a step."""
        if enabled or not self.env.distributed:
            yield
        elif self.cfg.parallel == "ddp":
            with self.model.no_sync():
                yield
        else:
            self.raw_model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.raw_model.set_requires_gradient_sync(True)

    # ---- one optimizer step

    def train_step(self, micro_batches: Sequence[Any], loss_fn: LossFn, tokens: int | None = None) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns metrics averaged over ranks.

        loss_fn(model, batch) -> (objective, metrics): the objective is backpropagated; metrics
        (scalar tensors, the same keys on every rank) are logged. Each micro-batch's objective is
        scaled by 1/len(micro_batches), so micro-batches weigh equally: return a per-token mean
        when they hold equal token counts (pretraining), or a sum divided by a fixed normalizer
        when they do not. `tokens` (over all ranks) feeds the tokens/s figure.
        """
        t0 = time.perf_counter()
        self._stop.install()
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        n = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            with self._gradient_sync(i == n - 1):
                with self.autocast():
                    objective, metrics = loss_fn(self.model, batch)
                (objective / n).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / n
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = self.mean_over_ranks(totals)
        elapsed = time.perf_counter() - t0
        self.train_time += elapsed
        stats.update(lr=lr, grad_norm=float(grad_norm), step_time_s=elapsed)
        if tokens is not None:
            self.tokens_seen += tokens
            stats["tokens_per_s"] = tokens / elapsed
        return stats

    def mean_over_ranks(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Average scalar metrics over ranks (one all-reduce); a plain float() without torchrun."""
        if not values:
            return {}
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values.values()]).to(self.env.device)
        if self.env.distributed:
            dist.all_reduce(stacked)
            stacked /= self.env.world_size
        return dict(zip(values, stacked.tolist()))

    # ---- bookkeeping

    def every(self, n: int) -> bool:
        """True when the step just taken is a multiple of n (n = 0: never)."""
        return n > 0 and self.step % n == 0

    def log(self, record: dict[str, Any], console: bool | None = None) -> None:
        """Append {"step": step, **record} to metrics.jsonl (and TensorBoard) on rank 0, and print a
        progress line every log_every steps (or when console=True)."""
        if not self.env.is_main:
            return
        self.metrics.write({"step": self.step, **record})
        if console is None:
            console = self.every(self.cfg.log_every) or self.step == self.cfg.max_steps
        if console:
            print(self.progress_line(record), flush=True)

    def progress_line(self, record: dict[str, Any]) -> str:
        parts = [f"step {self.step:>{len(str(self.cfg.max_steps))}}/{self.cfg.max_steps}"]
        for key, value in record.items():
            if key in ("step_time_s",) or isinstance(value, (list, dict)):
                continue
            if key == "tokens_per_s":
                parts.append(f"{value / 1000:.1f}k tok/s")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.2e}" if key == "lr" or abs(value) < 1e-3 and value else f"{key} {value:.4g}")
            elif isinstance(value, str):
                parts.append(f"{key}: {value}")
            else:
                parts.append(f"{key} {value}")
        done = self.step - self._start_step
        if done > 0 and "step_time_s" in record:
            per_step = (time.perf_counter() - self._t_start) / done  # wall clock: eval and saves included
            parts.append(f"eta {_duration(per_step * (self.cfg.max_steps - self.step))}")
        return " | ".join(parts)

    def should_stop(self) -> bool:
        """True once Ctrl-C (SIGINT) or SIGTERM arrived on any rank; every rank agrees on it."""
        stop = self._stop.requested
        if self.env.distributed:
            flag = torch.tensor([float(stop)], device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def close(self) -> None:
        """Flush the metrics and give Ctrl-C back its usual meaning."""
        self.metrics.close()
        self._stop.restore()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        """Write `<out_dir>/checkpoint-<step>` (HF weights + tokenizer + trainer_state/), point
        `latest` at it and prune old ones. Every rank must call it (states are gathered to rank 0)."""
        path = self.out_dir / f"checkpoint-{self.step}"
        export_model = self._exportable_model()
        optim_state = self._optimizer_state()
        rng = _gather(rng_state())
        if self.env.is_main:
            state = {
                "step": self.step,
                "optimizer": optim_state,
                "scheduler": {"schedule": self.cfg.schedule, "lr": lr_at(self.cfg, max(0, self.step - 1))},
                "rng": rng,  # one entry per rank
                "loader": self.loader.state_dict() if self.loader is not None else None,
                "counters": {"tokens_seen": self.tokens_seen, "train_time": self.train_time},
                "extra": self.extra_state,
                "config": json.dumps(config_to_dict(self.cfg)),
            }
            with atomic_directory(path) as tmp:
                save_model(export_model, tmp, tokenizer=self.tokenizer)
                (tmp / STATE_DIR).mkdir()
                torch.save(state, tmp / STATE_DIR / STATE_FILE)
            _point_latest(self.out_dir, path)
            self._prune_checkpoints()
            print(f"saved {path}", flush=True)
        barrier()
        return path

    def resume(self, checkpoint: str | Path = "latest") -> Path:
        """Restore weights, optimizer, step, RNG states, loader position and counters from a
        checkpoint ("latest": the newest one in out_dir), so that training continues exactly as
        if it had never stopped. metrics.jsonl loses any records after the checkpoint's step."""
        path = find_checkpoint(self.out_dir if str(checkpoint) == "latest" else checkpoint)
        state_file = path / STATE_DIR / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"{path} has no {STATE_DIR}/{STATE_FILE}: it holds weights only and cannot be "
                                  "resumed (start a new run from its weights instead)")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        tensors = convert_checkpoint_tensors(read_tensors(path), self.raw_model.config, None)
        self._load_model_state(tensors)
        self._load_optimizer_state(state["optimizer"])
        self.step = state["step"]
        if self.loader is not None and state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        set_rng_state(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        self.tokens_seen = state["counters"]["tokens_seen"]
        self.train_time = state["counters"]["train_time"]
        self.extra_state = state["extra"]
        if self.env.is_main:
            self.metrics.truncate_after(self.step)
            print(f"resumed from {path} at step {self.step}", flush=True)
        return path

    def _exportable_model(self) -> nn.Module | None:
        """The model for save_model on rank 0. Under FSDP the full weights are gathered (a
        collective) into a fresh CPU copy; otherwise it is the bare model itself."""
        if not self.fsdp:
            return self.raw_model
        sd = get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        with torch.device("meta"):
            copy = type(self.raw_model)(self.raw_model.config)
        copy.load_state_dict(sd, assign=True)
        return copy

    def _optimizer_state(self) -> dict:
        """The full optimizer state keyed by parameter name (not position), so a checkpoint resumes
        under any layout: one process, DDP, or FSDP2 with another number of ranks."""
        return get_optimizer_state_dict(self.raw_model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=self.env.distributed))

    def _load_model_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            set_model_state_dict(self.raw_model, tensors, options=StateDictOptions(full_state_dict=True))
        else:
            missing, unexpected = self.raw_model.load_state_dict(tensors, strict=False)
            # the only keys a checkpoint may lack are non-persistent buffers, which state_dict skips
            if missing or unexpected:
                raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")

    def _load_optimizer_state(self, optim_state: dict) -> None:
        set_optimizer_state_dict(self.raw_model, self.optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=True))

    def _prune_checkpoints(self) -> None:
        if self.cfg.keep_checkpoints <= 0:
            return
        for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary save directories are skipped)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"no checkpoint in {path}: expected a checkpoint directory (with config.json) "
                              f"or a run directory holding {path}/checkpoint-<step>/")
    return checkpoints[-1]


def _point_latest(out_dir: Path, target: Path) -> None:
    """Atomically repoint the `latest` symlink (a relative link, so the run directory can move)."""
    tmp = out_dir / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name, target_is_directory=True)
    os.replace(tmp, out_dir / "latest")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- RNG state, in types torch.load(weights_only=True) accepts


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- metrics


class MetricsLogger:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when tensorboard is
    installed. Disabled on ranks other than 0."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{key}/{i}", v, step)
                elif isinstance(value, str):
                    self.tb.add_text(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop records with a step > `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class _StopSignal:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current step (the loop
    then saves a checkpoint); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        """Take over SIGINT/SIGTERM (once; only the main thread may). Done at the first training
        step, so an error while a loop is still setting up leaves Ctrl-C as it was."""
        if not self._previous and sys.platform != "win32" and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
              "(again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ============================================================== 5. evaluation and samples


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], env: DistEnv,
                  autocast=nullcontext, documents: Callable | None = None) -> float:
    """Mean next-token loss of `model` over (inputs, targets) batches, averaged over ranks.
    `documents(inputs)`: the document index of each token, for models trained with document masks.

    Run every rank with its own equal share of the batches (the loader's rank split does that).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=env.device)
    for inputs, targets in batches:
        inputs = inputs.to(env.device)
        extra = {"documents": documents(inputs)} if documents else {}
        with autocast():
            total += model(inputs, labels=targets.to(env.device), logits=False, **extra).loss.float()
    model.train(was_training)
    if env.distributed:
        dist.all_reduce(total)
        total /= env.world_size
    return float(total) / max(1, len(batches))


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Sample a continuation with the plain no-cache forward (O(T^2), fine for short samples);
    temperature 0 is greedy. Uses its own seeded generator, so sampling never moves the global RNG.
    Returns the new token ids only."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    max_len = model.config.max_position_embeddings
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:]).logits[0, -1].float()  # (V,)
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        new.append(token)
        if token == eos_id:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    model.train(was_training)
    return new
