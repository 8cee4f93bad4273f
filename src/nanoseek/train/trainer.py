"""The Trainer: what a stage's loop holds on to. It owns the optimizer and its schedule, one
optimizer step, precision, the end-of-step work, metrics and the Ctrl-C stop signal:

    with Trainer(cfg, model, env, tokenizer=tok, loader=loader, resume=resume) as trainer:
        while trainer.step < cfg.max_steps:
            batches = [next(loader) for _ in range(trainer.grad_accum_steps)]
            trainer.log(trainer.train_step(batches, loss_fn))
            if trainer.end_of_step(validate=validate, sample=sample):  # eval, sample, save; Ctrl-C?
                break
        return trainer.save_checkpoint()

In the order a loop meets it:

1. Precision: fp32 on CPU, bf16 autocast on GPU (weights and optimizer state stay fp32).
2. The optimizers (AdamW, or Muon on the blocks' matrices and AdamW on the rest; no weight decay
   on norms, biases and embeddings) and the learning-rate schedule (linear warmup, then cosine or
   warmup-stable-decay to min_lr_ratio * lr, or constant: the RL recipes'), a pure function of the
   step, so resuming needs only the step.
3. `Trainer`: DDP or FSDP2 wrapping (DDP with the routed experts sharded: expert_parallel),
   activation checkpointing and torch.compile, one optimizer step over micro-batches (gradient
   accumulation, clipping), the end-of-step work (validation, samples, checkpoints, stop), exact
   resume (the files are `checkpointing`'s), metrics (`metrics`), and a Ctrl-C (SIGINT/SIGTERM)
   that finishes the current step and saves before exiting.
4. `evaluate_loss`, the periodic validation loss.

Processes and cross-rank sums are `distributed`'s.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from nanoseek.checkpoint import check_state_dict
from nanoseek.model import expert_parallel as ep
from nanoseek.model.attention_v4 import Compressor
from nanoseek.model.decoder import DecoderBlock
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.model.hyper import HyperHead
from nanoseek.errors import ConfigError
from nanoseek.train import checkpointing
from nanoseek.train.config import TrainConfig, config_to_dict
from nanoseek.device import check_trainable, resolve_dtype
from nanoseek.train.distributed import DistEnv, barrier, gather_objects, launch_rank, sum_over_ranks
from nanoseek.train.metrics import MetricsLogger

# ============================================================================ 1. precision


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training (None: plain fp32). Weights and optimizer state stay fp32;
    `dtype` "auto" is bf16 on a GPU and fp32 on the CPU, as for inference (nanoseek.device)."""
    dtype = resolve_dtype(cfg.dtype, device)
    return None if dtype == torch.float32 else dtype


# ============================================================== 2. optimizer and schedule


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers one training step steps together (cfg.optimizer).

    adamw: AdamW on every parameter.
    muon:  Muon (Jordan et al. 2024; at LLM scale in Moonlight, Liu et al. 2025) on the 2-D
           weights of the decoder blocks (attention and expert projections, the router, MTP's
           eh_proj, mHC's projections `fn` and `hc_fn`), AdamW on the rest (embeddings, output
           head, norms, biases, mHC's static `base` and `scale`: DeepSeek-V4's split): a
           matrix's update is its momentum orthogonalized by Newton-Schulz iterations, then scaled by
           0.2 * sqrt(max(rows, cols)) (Moonlight's "match_rms_adamw") so that it has AdamW's
           update size: an AdamW recipe's lr and weight decay carry over.

    Weight decay falls on weight matrices only. Norm weights and biases (1-D) and embeddings are
    not decayed: decaying a norm's gain or a token's embedding towards zero only fights the
    representation, it regularizes nothing.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # DeepSeek-V4's compressors' position biases are 2-D (a bias per place in the window) but biases
    # all the same: AdamW without weight decay, never Muon
    biases = {id(m.position_bias) for m in model.modules() if isinstance(m, Compressor)}
    hidden = {id(p) for block in model.modules() if isinstance(block, (DecoderBlock, HyperHead))
              for p in block.parameters() if p.ndim == 2 and id(p) not in biases}
    muon, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and id(p) in hidden:
            muon.append(p)
        else:
            (no_decay if p.ndim < 2 or id(p) in embeddings or id(p) in biases else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU, the fused kernel: the default (foreach) step of the `gpu` preset's 1,860 tensors
    # took 32.7 ms of a 187 ms training step on an H100. The CPU keeps the default.
    fused = all(p.device.type == "cuda" for p in decay + no_decay) or None
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)]
    if muon:
        optimizers.insert(0, torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                              momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"))
    return optimizers


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


# ============================================================================ 3. trainer


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Trainer:
    """What a stage's loop holds on to: the wrapped model, the optimizer, the step, the metrics
    writer, checkpointing and the stop signal. The loop itself stays in the stage's file (see
    the module docstring).

    `model` is the bare Transformer (on env.device); `trainer.model` is what to train through
    (compiled, DDP- or FSDP-wrapped) and `trainer.raw_model` the bare one (for saving, sampling,
    the expert-bias update). `loader` is anything with state_dict()/load_state_dict(); its
    position is checkpointed. `extra_state` (a dict) is saved and restored as is, for a stage's
    own counters. `resume` ("latest" or a checkpoint directory) restores a checkpoint at once.
    As a context manager it closes itself (metrics file, signal handlers) however the loop ends.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, env: DistEnv, tokenizer=None, loader=None,
                 resume: str | Path | None = None):
        check_trainable(model, "trained")  # packed / quantized layers hold no parameters to update
        self.cfg, self.env, self.tokenizer, self.loader = cfg, env, tokenizer, loader
        self.out_dir = Path(cfg.out_dir)
        self.raw_model = model
        self.micro_batch_size, self.grad_accum_steps = batch_plan(cfg, env.world_size)
        self.amp_dtype = autocast_dtype(cfg, env.device)
        self.expert_parallel = cfg.expert_parallel and env.distributed  # one process holds every expert
        self.model = self._wrap(model)
        self.optimizers = build_optimizers(model, cfg)
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0  # seconds inside train_step, summed over resumes
        self.extra_state: dict[str, Any] = {}
        self._saved_step = None  # the step of the checkpoint this trainer wrote last
        self.metrics = MetricsLogger(self.out_dir, enabled=env.is_main, tensorboard=cfg.tensorboard)
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_partial_saves(self.out_dir)  # of a run killed mid-save
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
        """Activation checkpointing, compile; with several ranks, FSDP2 (parameters, gradients and
        optimizer state sharded per decoder layer) before it or DDP (replicated; gradients all-reduced) after it.
        expert_parallel: each rank keeps its slice of the routed experts, which DDP then leaves alone."""
        if self.cfg.activation_checkpointing:
            if not hasattr(model, "activation_checkpointing"):
                raise ConfigError(f"activation_checkpointing=true: a {type(model).__name__} has no decoder layers "
                                  "to checkpoint")
            model.activation_checkpointing = True  # CausalLM.forward checkpoints each main layer
        if self.cfg.fused_loss:
            model.fused_loss = True  # CausalLM.forward fuses the head into the loss (model/loss.py)
        if self.env.distributed and self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # One FSDP unit per main decoder layer. The MTP modules stay with the root unit: their
            # norms and projections are called outside the block's own forward, which FSDP2 hooks.
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        if self.expert_parallel:
            ep.shard_experts(model)
        if self.cfg.compile:
            model = torch.compile(model)
        if self.env.distributed and self.cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # No buffer sync: each rank's expert-load counters are its own (they are summed
            # across ranks in update_expert_bias), and the routing bias is updated identically everywhere.
            no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 spelling
                              if "forward_sync_buffers" in inspect.signature(DDP).parameters
                              else {"broadcast_buffers": False})
            if self.expert_parallel:  # no other rank holds them: neither broadcast from rank 0 nor all-reduced
                experts = {id(p) for p in ep.expert_parameters(model)}
                DDP._set_params_and_buffers_to_ignore_for_model(
                    model, [name for name, p in model.named_parameters() if id(p) in experts])
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
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
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
        if self.expert_parallel:  # the experts' gradients summed every rank's tokens: to the mean, then one global norm
            ep.scale_expert_grads(self.raw_model)
            grad_norm = ep.clip_grad_norm_(self.raw_model, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
        sums = sum_over_ranks(self.env, [torch.as_tensor(v, dtype=torch.float32) for v in values.values()])
        return {k: v / self.env.world_size for k, v in zip(values, sums)}

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

    def end_of_step(self, validate: Callable[[], None] | None = None, sample: Callable[[], None] | None = None,
                    steps: int = 1) -> bool:
        """The every-so-often work after a step, the same in every stage: the validation every
        eval_every steps and at the end, a sample every sample_every steps (and at the end unless
        0), a checkpoint every save_every steps (the loop saves the last one itself). Returns True
        when the loop should stop (Ctrl-C / SIGTERM).

        `steps`: optimizer steps taken since the last call (GRPO takes mu per rollout); a period
        is due when a multiple of it was passed during them.
        """
        def due(n: int) -> bool:
            return n > 0 and self.step // n > (self.step - steps) // n

        last = self.step >= self.cfg.max_steps
        if validate is not None and (due(self.cfg.eval_every) or last):
            validate()
        if sample is not None and self.cfg.sample_every and (due(self.cfg.sample_every) or last):
            sample()
        if due(self.cfg.save_every) and not last:
            self.save_checkpoint()
        return self.should_stop()

    def should_stop(self) -> bool:
        """True once Ctrl-C (SIGINT) or SIGTERM arrived on any rank; every rank agrees on it."""
        return sum_over_ranks(self.env, [float(self._stop.requested)])[0] > 0

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
        `latest` at it and prune old ones. Every rank must call it (states are gathered to rank 0).
        Returns at once when this step's checkpoint was just written (a Ctrl-C on a save_every
        step: end_of_step saved it, then the loop's final save asks again)."""
        path = self.out_dir / f"checkpoint-{self.step}"
        if self._saved_step == self.step:
            return path
        export_model = self._exportable_model()
        optim_state = self._optimizer_state()
        rng = gather_objects(checkpointing.rng_state())
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
                "stage": type(self.cfg).__name__,  # what --resume may continue it (checkpointing.check_stage)
            }
            checkpointing.write_checkpoint(self.out_dir, self.step, export_model, self.tokenizer, state,
                                           self.cfg.keep_checkpoints)
            print(f"saved {path}", flush=True)
        barrier()
        self._saved_step = self.step
        return path

    def resume(self, checkpoint: str | Path = "latest") -> Path:
        """Restore weights, optimizer, step, RNG states, loader position and counters from a
        checkpoint ("latest": the one out_dir's `latest` points to), so that training continues exactly as
        if it had never stopped. metrics.jsonl loses any records after the checkpoint's step."""
        path, tensors, state = checkpointing.read_checkpoint(
            self.out_dir if str(checkpoint) == "latest" else checkpoint, self.raw_model.config)
        checkpointing.check_stage(state, type(self.cfg), path)
        saved_optimizer = json.loads(state["config"]).get("optimizer", "adamw")
        if saved_optimizer != self.cfg.optimizer:  # Muon's momentum and AdamW's moments do not convert
            raise ConfigError(f"{path} was trained with optimizer={saved_optimizer}, so its optimizer state cannot "
                              f"continue under optimizer={self.cfg.optimizer}: resume with optimizer={saved_optimizer}, "
                              f"or start a new run from its weights with init={path}")
        self._load_model_state(tensors)
        self._load_optimizer_state(state["optimizer"])
        self.step = state["step"]
        if self.loader is not None and state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        checkpointing.set_rng_state(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        self.tokens_seen = state["counters"]["tokens_seen"]
        self.train_time = state["counters"]["train_time"]
        self.extra_state = state["extra"]
        if self.env.is_main:
            self.metrics.truncate_after(self.step)
            print(f"resumed from {path} at step {self.step}", flush=True)
            changed = changed_settings(json.loads(state["config"]), config_to_dict(self.cfg))
            if changed:  # allowed (extending max_steps, a new lr), but never silently: the run is no longer the saved one
                print(f"resumed with settings that differ from the checkpoint's run: {changed}", flush=True)
        return path

    def _exportable_model(self) -> nn.Module | None:
        """The model for save_model on rank 0. Under FSDP the full weights, under expert parallelism
        every rank's experts, are gathered (a collective) into a fresh CPU copy; otherwise it is the
        bare model itself."""
        if self.expert_parallel:
            sd = ep.gather_experts(self.raw_model.state_dict())
        elif self.fsdp:
            sd = get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            return self.raw_model
        if not self.env.is_main:
            return None
        with torch.device("meta"):
            copy = type(self.raw_model)(self.raw_model.config)
        copy.load_state_dict(sd, assign=True)
        return copy

    def _optimizer_state(self) -> dict:
        """The full optimizer state keyed by parameter name (not position), so a checkpoint resumes
        under any layout: one process, DDP, FSDP2 or expert parallelism with another number of ranks."""
        if self.expert_parallel:  # every rank's experts' entries gathered on rank 0
            return ep.gather_optimizer_state(get_optimizer_state_dict(
                self.raw_model, self.optimizers, options=StateDictOptions(full_state_dict=True)))
        return get_optimizer_state_dict(self.raw_model, self.optimizers, options=StateDictOptions(
            full_state_dict=True, cpu_offload=self.env.distributed))

    def _load_model_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.expert_parallel:  # a whole model's weights: this rank keeps its own experts
            tensors = ep.local_tensors(self.raw_model, tensors)
        if self.fsdp:
            set_model_state_dict(self.raw_model, tensors, options=StateDictOptions(full_state_dict=True))
        else:
            check_state_dict(tensors, self.raw_model.state_dict(), "the checkpoint", "the model")
            self.raw_model.load_state_dict(tensors)

    def _load_optimizer_state(self, optim_state: dict) -> None:
        # A parameter the saved optimizer holds but never stepped (frozen until then: pretraining's
        # DSA dense warm-up trains the indexers alone) has no saved state, as in a new optimizer.
        # torch's loader calls that missing for a parameter that requires a gradient, so it loads
        # with those frozen; a parameter the saved optimizer lacks altogether is still an error.
        # Under expert parallelism the state is a whole model's: the loader takes this rank's by name.
        listed = {name for group in optim_state["param_groups"] for name in group["params"]}
        names: dict[int, list[str]] = {}  # a tied parameter has several
        for name, p in self.raw_model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        unstepped = [p for p in self.raw_model.parameters() if p.requires_grad
                     and any(n in listed for n in names[id(p)]) and not any(n in optim_state["state"] for n in names[id(p)])]
        for p in unstepped:
            p.requires_grad_(False)
        try:
            set_optimizer_state_dict(self.raw_model, self.optimizers, optim_state,
                                     options=StateDictOptions(full_state_dict=True))
        finally:
            for p in unstepped:
                p.requires_grad_(True)


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The settings (but out_dir: resuming elsewhere is usual) whose values differ, as "key old -> new, ..."."""
    keys = [k for k in current if k != "out_dir" and k in saved and saved[k] != current[k]]
    return ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in keys)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- the stop signal


class _StopSignal:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current step (the loop
    then saves a checkpoint); a second Ctrl-C interrupts at once. A repeated SIGTERM does not: a
    scheduler signals the whole process group while a parent (the speedrun, torchrun) passes its
    own on, so one stop request often arrives twice."""

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
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        if launch_rank() == 0:  # under torchrun every rank gets the signal: one line, not one per rank
            print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ============================================================== 4. evaluation


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], env: DistEnv,
                  autocast=nullcontext, documents: Callable | None = None, observe: Callable | None = None) -> float:
    """Mean next-token loss of `model` over the target tokens (labels != IGNORE_INDEX) of all
    ranks' (inputs, labels) batches. `documents(inputs)`: the document index of each token, for
    models trained with document masks. `observe(output)` sees each batch's ModelOutput (a V3.2
    model's indexer stats come with the same forwards).

    A token mean, not a mean of batch means: SFT batches hold different numbers of targets, and a
    mean of batch means would weigh a token by how many others share its batch, so the value would
    change with micro_batch_size and the number of ranks. Run every rank with its own equal number
    of batches (the loaders' rank splits do that): under FSDP each forward is a collective.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=env.device)  # summed loss of the targets
    count = torch.zeros((), dtype=torch.float64, device=env.device)  # number of targets
    for inputs, labels in batches:
        inputs, labels = inputs.to(env.device), labels.to(env.device)
        extra = {"documents": documents(inputs)} if documents else {}
        with autocast():
            # mean over its targets; mtp=False: the MTP modules' loss is not part of it (it cost the `small`
            # V3 model a third of each validation forward: one more block and one more output head)
            out = model(inputs, labels=labels, logits=False, mtp=False, **extra)
        if observe is not None:
            observe(out)
        loss = out.loss.double()
        n = (labels != IGNORE_INDEX).sum()
        total += torch.where(n > 0, loss * n, 0.0)  # a batch without targets has a NaN mean
        count += n
    model.train(was_training)
    total, count = sum_over_ranks(env, [total, count])
    return total / max(1.0, count)
