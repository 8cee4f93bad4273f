"""Run directories: where a training run keeps its checkpoints, and how it finds them again.

    <out_dir>/checkpoint-<step>/     an HF DeepseekV3ForCausalLM (or Llama / Qwen2) directory:
        config.json, model.safetensors, ...   config.json, weights, generation_config.json, tokenizer
        trainer_state/state.pt       optimizer, step, RNG states of every rank, data-loader
                                     position, counters; read with torch.load(weights_only=True)
    <out_dir>/latest -> checkpoint-<step>    symlink to the newest complete checkpoint
    <out_dir>/metrics.jsonl          one JSON object per line, each with its "step"
    <out_dir>/run_config.json        the resolved run config

A checkpoint is written into a hidden temporary directory and renamed into place only once
complete, then `latest` is repointed, then old checkpoints beyond `keep_checkpoints` are pruned.
So a run that dies at any moment (even SIGKILL mid-save) leaves its previous checkpoint intact;
the half-written temporary directory is never listed and is removed when the run is resumed.

`latest`, not the highest step, is the run's current checkpoint: a run resumed from an earlier
checkpoint continues a new line, and the higher-step checkpoints of the line it left are the first
to be pruned and never what `--resume` picks.

The Trainer (`nanoseek.train.trainer`) decides what goes into the state; this file only puts it
on disk and takes it off again.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint import atomic_directory, convert_checkpoint_tensors, read_tensors, write_model
from nanoseek.errors import CheckpointError

STATE_DIR = "trainer_state"
STATE_FILE = "state.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# what a save leaves behind when it dies: atomic_directory's ".checkpoint-N.tmp-*" / ".old-*", the
# ".latest.tmp-PID" link made while repointing `latest`, and (from versions that nested a second
# atomic directory for the weights) "..checkpoint-N.tmp-*.tmp-*" / ".old-*"
PARTIAL_RE = re.compile(r"^\.\.?(checkpoint-\d+\.(tmp|old)-|latest\.tmp-)")


def write_checkpoint(out_dir: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int) -> Path:
    """Write `<out_dir>/checkpoint-<step>` (the model in HF format, the tokenizer, and `state` as
    trainer_state/state.pt) atomically, point `latest` at it, then keep only the newest `keep`
    checkpoints (0: all). Call on one process only."""
    path = Path(out_dir) / f"checkpoint-{step}"
    with atomic_directory(path) as tmp:  # the one temporary directory: weights and state go in it directly
        write_model(model, tmp, tokenizer=tokenizer)
        (tmp / STATE_DIR).mkdir()
        torch.save(state, tmp / STATE_DIR / STATE_FILE)
    point_latest(path.parent, path)
    prune_checkpoints(out_dir, path, keep)
    return path


def prune_checkpoints(out_dir: str | Path, current: Path, keep: int) -> None:
    """Keep `current` (just written) and the newest `keep` - 1 checkpoints below its step; delete the
    rest (keep = 0: delete nothing). Checkpoints above its step belong to a line abandoned by resuming
    from an earlier checkpoint (or by a fresh run in this out_dir): they go first."""
    if keep <= 0:
        return
    step = _step(current)
    checkpoints = list_checkpoints(out_dir)
    ranked = ([current] + [p for p in reversed(checkpoints) if _step(p) < step]
              + [p for p in checkpoints if _step(p) > step])
    for old in ranked[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(checkpoint: str | Path, config) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(directory, model tensors, trainer state) of a resumable checkpoint: a checkpoint directory,
    or a run directory (its current one, as find_checkpoint picks it). `config` is the model's, to
    map the tensors onto it."""
    path = resumable_checkpoint(checkpoint)
    state = load_state(path)
    return path, convert_checkpoint_tensors(read_tensors(path), config, None), state


def load_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of checkpoint directory `path`; a CheckpointError when the file is damaged."""
    file = path / STATE_DIR / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        earlier = [p for p in list_checkpoints(path.parent)
                   if CHECKPOINT_RE.match(path.name) and _step(p) < _step(path)]
        fix = (f"continue from the one before it: --resume-from {earlier[-1]}" if earlier
               else "start a new run (without --resume, in a new out_dir)")
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file} is damaged and cannot be resumed ({reason}); {fix}") from None


def resumable_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint directory `checkpoint` names (itself, or a run directory's current one) if it
    holds a trainer state to resume from; a CheckpointError otherwise. Cheap: reads nothing."""
    path = find_checkpoint(checkpoint)
    if not (path / STATE_DIR / STATE_FILE).is_file():
        raise CheckpointError(f"{path} has no {STATE_DIR}/{STATE_FILE}: it holds weights only and cannot be "
                              "resumed (start a new run from its weights instead)")
    return path


# the stages' config classes, as a trainer state names the one that wrote it, and their commands
STAGE_COMMANDS = {"PretrainConfig": "pretrain", "SFTConfig": "sft", "DistillConfig": "distill", "GRPOConfig": "rl"}


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """A resumable checkpoint's trainer state, its tensors memory-mapped (nothing large is read)."""
    return load_state(resumable_checkpoint(checkpoint), mmap=True)


def check_stage(state: dict[str, Any], config_class: type, checkpoint: str | Path) -> None:
    """A CheckpointError unless `state` was saved by a run of the stage whose config is
    `config_class` (or of a stage it extends: distill trains with sft's). Resuming another stage's
    checkpoint would carry its step, optimizer and data position into this one. States saved
    before the stage was recorded pass."""
    saved = state.get("stage")
    if saved is None or saved in [c.__name__ for c in config_class.__mro__]:
        return
    this = STAGE_COMMANDS.get(config_class.__name__, config_class.__name__)
    raise CheckpointError(f"{checkpoint} was saved by `nanoseek {STAGE_COMMANDS.get(saved, saved)}`, not `nanoseek "
                          f"{this}`: --resume continues a run of the same stage; to start {this} from its weights, "
                          f"run without --resume, with init={checkpoint} and a new out_dir")


def stopped_early(checkpoint: str | Path) -> bool:
    """True when the run that wrote `checkpoint` stopped before its max_steps (Ctrl-C / SIGTERM)."""
    state = load_state(Path(checkpoint), mmap=True)  # the step and the config: nothing large is read
    return state["step"] < json.loads(state["config"])["max_steps"]


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary save directories are skipped)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory's current checkpoint: the one `latest`
    points to (the highest step when `latest` is missing or broken)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_symlink() and (latest / "config.json").is_file():
        return path / os.readlink(latest)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"no checkpoint in {path}: expected a checkpoint directory (with config.json) "
                              f"or a run directory holding {path}/checkpoint-<step>/")
    return checkpoints[-1]


def checkpoint_path(path: str | Path) -> Path:
    """What an inference command's --model (or LLM(path)) names: a checkpoint directory as it is,
    a run directory (no config.json of its own, checkpoint-<step>/ inside) as the checkpoint its
    `latest` names, as `init=` and `nanoseek judge` take them. Anything else comes back as it is,
    for the caller's own error."""
    try:
        return find_checkpoint(path)
    except CheckpointError:
        return Path(path)


def checkpoint_argument(text: str) -> str:
    """argparse type for the inference commands' --model (generate, chat, eval, serve, info)."""
    return str(checkpoint_path(text))


def remove_partial_saves(out_dir: str | Path) -> list[Path]:
    """Clean up after saves that died half-way (a process killed mid-save never ran its cleanup):
    delete their temporary directories, except that a checkpoint moved aside to be replaced
    (`.checkpoint-N.old-*`) whose replacement never arrived is moved back. Returns what was
    removed. Only call it while no save is in progress."""
    out_dir = Path(out_dir)
    partial = sorted(p for p in out_dir.iterdir() if PARTIAL_RE.match(p.name)) if out_dir.is_dir() else []
    removed = []
    for p in partial:
        original = out_dir / p.name[1:].split(".")[0]  # ".checkpoint-8.old-123" -> checkpoint-8
        if p.name.startswith(".checkpoint-") and ".old-" in p.name and not original.exists():
            os.replace(p, original)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _step(checkpoint: Path) -> int:
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))


def point_latest(out_dir: Path, target: Path) -> None:
    """Atomically repoint out_dir's `latest` symlink at `target` (a checkpoint in out_dir or below it),
    as a relative link, so the run directory can move."""
    tmp = out_dir / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(Path(target).resolve(), Path(out_dir).resolve()), target_is_directory=True)
    os.replace(tmp, out_dir / "latest")


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
