"""Run configs: one dataclass per stage, filled from a TOML recipe and `key=value` overrides.

    cfg = load_run_config(PretrainConfig, "configs/pretrain_small.toml", ["lr=3e-4", "model.num_hidden_layers=2"])

`TrainConfig` holds the fields every training stage shares; a stage subclasses it and adds its
own. Overrides win over the file, which wins over the dataclass defaults. Values are parsed to the
field's type (TOML literal syntax: `lr=3e-4`, `compile=true`, `data=["a.txt","b.txt"]`; plain words
are strings). An unknown key or a bad value is a ConfigError that lists the valid keys.

(`nanoseek.checkpoint.load_config` is the other config loader: a checkpoint's model config.json.)
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from nanoseek.errors import ConfigError


@dataclass
class TrainConfig:
    """The settings every stage shares. A stage subclasses it (`PretrainConfig(TrainConfig)`)
    and adds its own fields; `load_run_config` fills it from TOML and `key=value` overrides."""

    # run
    out_dir: str = "runs/run"  # checkpoints, metrics.jsonl, run_config.json
    seed: int = 0  # model init, data order and sampling all derive from it
    max_steps: int = 1000  # optimizer steps
    # batch
    batch_size: int = 32  # sequences per optimizer step, summed over ranks and micro-steps
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = batch_size / world_size
    seq_len: int = 256
    # optimizer and schedule
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the blocks' weight matrices, AdamW on the rest
    muon_momentum: float = 0.95
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
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward: less memory, ~1/3 more compute
    # the output head fused into the loss (model/loss.py): no (B, T, V) logits, one more head matmul;
    # for a large vocabulary (a released model's 100-150k) where the logits are most of a step's memory
    fused_loss: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several ranks: replicate (DDP) or shard (FSDP2)
    # with several ranks: each holds 1/world_size of every MoE layer's routed experts, tokens reach
    # them by all-to-all; the rest stays data-parallel (DDP). Ignored in one process.
    expert_parallel: bool = False
    threads: int = 0  # CPU threads per process; 0 = torch's default
    # logging, evaluation, checkpoints
    log_every: int = 10  # console line every N steps (metrics.jsonl gets every step)
    eval_every: int = 100  # validation loss every N steps (and at the end); 0 = only at the end
    eval_batches: int = 8  # validation batches (of batch_size rows) per evaluation
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
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum={self.muon_momentum} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.expert_parallel and self.parallel == "fsdp":
            raise ConfigError("expert_parallel=true keeps the non-expert weights data-parallel with DDP; it does not "
                              "compose with parallel=fsdp here: set parallel=ddp, or expert_parallel=false")
        if self.expert_parallel and self.sample_every:
            raise ConfigError(f"sample_every={self.sample_every} with expert_parallel=true: the inference engine that "
                              "samples needs every expert on each rank; set sample_every=0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: expected one of auto, cpu, cuda")


C = TypeVar("C")


def load_run_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
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
        for depth, part in enumerate(parents):
            if depth == 0 and part not in node:  # a dotted key edits the default table, not an empty one
                node[part] = _default_table(cls, part)
            if isinstance(node.get(part), _CLIValue) and node[part].startswith("{"):
                node[part] = parse_literal(node[part])  # an earlier `rewards={grm=1.0}`, now edited
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a table")
        node[leaf] = _CLIValue(value.strip())
    return _build(cls, data, cls)


def _default_table(cls: type, name: str) -> dict:
    """A copy of field `name`'s default when it is a table (else {}), for dotted overrides to edit:
    `rewards.format=0.5` without a recipe keeps the default accuracy weight beside it."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            return dict(value) if isinstance(value, dict) else {}
    return {}


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
            # a quoted value is a TOML string (`out_dir="runs/x"`, `sample_prompt="a\n"`), as in a list
            quoted = parse_literal(value) if value.startswith(('"', "'")) else None
            value = quoted if isinstance(quoted, str) else str(value)
        elif value.lower() in ("none", "null") and type(None) in args:
            return None
        else:
            value = parse_literal(value)
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
        # each value to the table's value type, as a top-level field is (`rewards.format=abc` is an error)
        return {k: _coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
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


def parse_literal(text: str) -> Any:
    """A command-line value as TOML reads it: a TOML literal (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`);
    anything else is the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return str(text)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
