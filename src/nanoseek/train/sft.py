"""Supervised fine-tuning: the loss on assistant tokens only, packed sequences, any nanoseek model.

    nanoseek sft --config configs/sft_student_small.toml [--resume] [key=value ...]

Used for R1's cold start (a DeepSeek-V3 model on a few long reasoning traces) and for R1-Distill
(a dense student on the teacher's verified traces, see `nanoseek.train.distill`).

Data: jsonl files, one example per line, in the layouts TRL's SFTTrainer reads:

- `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`: rendered with
  the tokenizer's chat template (the checkpoint's own; DeepSeek-R1's format for a nanoseek BPE).
  The loss covers the content of every assistant turn (with nanoseek's template, `<think>`
  reasoning included) and the `<｜end▁of▁sentence｜>` that closes it; bos, system prompt, user
  turns and the `<｜User｜>` / `<｜Assistant｜>` markers are context only.
- `{"prompt": ..., "completion": ...}`: plain text, `bos prompt completion eos`, as the inference
  engine sees a text prompt; the loss covers the completion and its eos. Distillation trains on
  this view, the R1-Zero prompt the teacher answered and `nanoseek eval` asks.
- `{"text": ...}`: language modelling, `bos text eos` with every token a target (a prompt-less
  completion), e.g. to warm a fresh student up on a corpus's documents before distillation.

`format` picks the view when a row has several ("auto": messages, else prompt / completion, else
text). Other fields (e.g. `metadata`) are ignored.

Packing: examples are shuffled (per epoch, seeded) and concatenated into rows of seq_len + 1 tokens;
an example never straddles two rows (one longer than a row is truncated). Every example starts
with bos, which marks the seams: each example attends only to itself and its positions start at 0
(`documents=` of the models, as in pretraining), so a packed row trains exactly what the examples
would one per row, the context inference gives them. No loss is taken across a seam: an example's
first token is never a target. `packing=false` puts one example per row (padded).

The loss is a mean over the target tokens of the whole optimizer step (all micro-batches and
ranks), so an example weighs the same whatever row or micro-batch it lands in. Optional logit
distillation (`teacher=DIR`, `kd_weight`) mixes in the forward KL from the teacher's next-token
distribution on the same target tokens; it needs the teacher's tokenizer.

The loop reads like pretraining's: setup, then per step: batches -> optimizer step -> (MoE bias
update) -> log -> every so often validation loss, a sample, a checkpoint. The CLI, the model from
`init`, optimizer, schedule, checkpoints, exact resume and distributed training are the shared
machinery's (`nanoseek.train.stage`, `trainer`, `checkpointing`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.checkpoint import load_model
from nanoseek.data.corpus import jsonl_rows
from nanoseek.data.tasks import derive_seed
from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.model.decoder import documents_of
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.model.moe import update_expert_bias
from nanoseek.tokenizer import THINK_START, Tokenizer
from nanoseek.train import stage
from nanoseek.train.checkpointing import find_checkpoint
from nanoseek.train.config import TrainConfig
from nanoseek.train.distributed import DistEnv, seed_everything, sum_over_ranks
from nanoseek.train.stage import run_stage, sample_text, stage_model
from nanoseek.train.trainer import Trainer, batch_plan, evaluate_loss


@dataclass
class SFTConfig(TrainConfig):
    out_dir: str = "runs/sft"
    max_steps: int = 200
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 10
    # model
    init: str = ""  # checkpoint directory to fine-tune, or a preset to train from scratch ("student-small", "small")
    model: dict[str, Any] = field(default_factory=dict)  # config overrides when `init` is a preset
    tokenizer: str = ""  # tokenizer directory; "" = the one saved with `init`
    # data
    data: list[str] = field(default_factory=list)  # jsonl files of messages, prompt/completion or text rows
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    packing: bool = True  # several examples per row, each attending only to itself
    epochs: float = 0.0  # > 0: max_steps = epochs over the training rows (a max_steps given on the CLI wins)
    val_fraction: float = 0.05  # share of prompts held out for the validation loss (all their examples)
    # objective
    teacher: str = ""  # checkpoint directory whose logits to distil (same tokenizer); "" = none
    kd_weight: float = 0.0  # loss = (1 - kd_weight) * CE + kd_weight * KL(teacher || student)
    mtp_lambda: float = 0.0  # DeepSeek-V3 models: weight of the MTP loss (0 leaves the MTP module as it is)
    bias_gamma: float = 1e-3  # DeepSeek-V3 models: aux-loss-free expert-bias update speed; 0 = off
    # samples
    sample_temperature: float = 0.0  # greedy samples of a validation prompt

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError(f"kd_weight={self.kd_weight} must be in [0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs} must be >= 0")
        if self.kd_weight > 0 and not self.teacher:
            raise ConfigError("kd_weight > 0 needs teacher=DIR, the checkpoint whose logits to distil")


# ============================================================================ data


@dataclass
class Example:
    ids: list[int]  # the rendered example
    mask: list[bool]  # per token: is it a target (assistant content / completion, and its eos)
    prompt: str  # what the example answers; the validation split and samples use it


def tokenize_messages(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Render a conversation with the tokenizer's chat template (the checkpoint's own); mark the
    tokens of each assistant turn, as the template renders it, and what closes it as targets.

    Assistant turn i ends where the rendering of messages[:i+1] ends (a prefix of the whole: a
    template that renders earlier turns differently once later ones follow cannot be trained this
    way, and is an error) and starts where it parts from messages[:i] plus the generation prompt.
    A generation prompt the turn does not repeat (DeepSeek-R1's "<think>\\n") is context, not a target.

    A template that drops part of an assistant message (DeepSeek-R1's and its distills' strip the
    reasoning from every assistant turn, the last one too) would train the answer without its
    reasoning: then the last assistant turn is trained as the model writes it at inference
    (`_as_generated`), and earlier turns are context only, as the template shows them.
    """
    _check_messages(messages)
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = tokenizer.encode_chat(messages[:i], True), tokenizer.encode_chat(messages[: i + 1], False)
        if ids[: len(turn)] != turn:
            raise NanoseekError(f"the chat template renders assistant turn {i} differently once later turns follow; "
                                "split the conversation into one example per assistant turn")
        start = next((j for j, (a, b) in enumerate(zip(prompt, turn)) if a != b), min(len(prompt), len(turn)))
        mask[start: len(turn)] = [True] * (len(turn) - start)
        shown = tokenizer.decode(turn[start:])
        if _without_opened(message["content"], tokenizer.decode(prompt)).strip() not in shown:
            last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
            return _as_generated(messages[: last + 1], tokenizer)
    return ids, mask


def _without_opened(content: str, prompt_text: str) -> str:
    """`content` less the think tag the generation prompt already opened (R1's "<think>\\n")."""
    for opened in (THINK_START + "\n", THINK_START):
        if prompt_text.endswith(opened) and content.startswith(opened):
            return content[len(opened):]
    return content


def _as_generated(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """The conversation's last (assistant) turn as the model generates it: the template's prompt for
    it, generation prompt included, then the message's own text and eos as the targets."""
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    prompt = tokenizer.encode(prompt_text)
    target = tokenizer.encode(_without_opened(messages[-1]["content"], prompt_text)) + [tokenizer.eos_id]
    return prompt + target, [False] * len(prompt) + [True] * len(target)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise NanoseekError("messages must be a list of {role, content} objects")
    roles = [m.get("role") for m in messages]
    if any(not isinstance(m.get("content"), str) for m in messages):
        raise NanoseekError("every message needs a string content")
    if "assistant" not in roles:
        raise NanoseekError("a conversation needs at least one assistant turn to train on")
    first_other = next(i for i, r in enumerate(roles) if r != "system")
    if "system" in roles[first_other:]:  # the template moves system prompts to the front
        raise NanoseekError("system messages must come before the conversation's other turns")


def tokenize_prompt_completion(prompt: str, completion: str, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """`bos prompt completion eos`, bos added the way the engine adds it to text prompts; the
    completion and eos are the targets."""
    prompt_ids = tokenizer.encode_prompt(prompt)
    completion_ids = tokenizer.encode(completion) + [tokenizer.eos_id]
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def check_data_files(paths: list[str]) -> None:
    """Every data file exists; distill checks them before it samples the teacher."""
    for path in paths:
        if not Path(path).is_file():
            raise NanoseekError(f"SFT data file {path} not found")


def load_examples(paths: list[str], tokenizer: Tokenizer, fmt: str, max_len: int) -> tuple[list[Example], dict]:
    """Tokenize every row of the jsonl files; examples longer than `max_len` tokens are truncated,
    and those left with no target are dropped. Returns the examples and counts."""
    if not paths:
        raise ConfigError("no SFT data: set data=[\"file.jsonl\", ...]")
    check_data_files(paths)
    examples, counts = [], {"rows": 0, "truncated": 0, "dropped": 0}
    for path in map(Path, paths):
        for line_no, row in jsonl_rows(path):
            try:
                if not isinstance(row, dict):
                    raise NanoseekError(f"a JSON {type(row).__name__}, not an object")
                use_messages = "messages" in row and fmt != "prompt_completion"
                if use_messages:
                    ids, mask = tokenize_messages(row["messages"], tokenizer)
                    prompt = next(m["content"] for m in row["messages"] if m["role"] != "system")
                elif fmt != "messages" and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                    ids, mask = tokenize_prompt_completion(row["prompt"], row["completion"], tokenizer)
                    prompt = row["prompt"]
                elif fmt == "auto" and isinstance(row.get("text"), str):
                    ids, mask = tokenize_prompt_completion("", row["text"], tokenizer)
                    prompt = row["text"]
                else:
                    want = {"auto": "messages, prompt and completion, or text", "messages": "messages",
                            "prompt_completion": "prompt and completion"}[fmt]
                    raise NanoseekError(f"expected {want} (format={fmt})")
            except (NanoseekError, AttributeError, TypeError) as e:
                raise NanoseekError(f"{path}:{line_no}: not an SFT example: {e}") from None
            counts["rows"] += 1
            if len(ids) > max_len:
                ids, mask = ids[:max_len], mask[:max_len]
                counts["truncated"] += 1
            if not any(mask[1:]):  # the first token is never a target
                counts["dropped"] += 1
                continue
            examples.append(Example(ids, mask, prompt))
    if not examples:
        raise NanoseekError(f"no trainable examples in {paths} ({counts})")
    return examples, counts


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val) by a seeded hash of the prompt, so all examples of one prompt (several traces
    of one question) land on the same side."""
    cut = int(val_fraction * 10_000)
    is_val = [derive_seed("sft-val", seed, ex.prompt) % 10_000 < cut for ex in examples]
    train = [ex for ex, v in zip(examples, is_val) if not v]
    val = [ex for ex, v in zip(examples, is_val) if v]
    if not train:
        raise NanoseekError(f"val_fraction={val_fraction} left no training examples")
    return train, val


def pack(examples: list[Example], row_len: int, packing: bool) -> list[Example]:
    """Concatenate examples, in order, into rows of at most row_len tokens (one per row without
    packing). A row's `prompt` is its first example's."""
    rows: list[Example] = []
    for ex in examples:
        if rows and packing and len(rows[-1].ids) + len(ex.ids) <= row_len:
            rows[-1].ids += ex.ids
            rows[-1].mask += ex.mask
        else:
            rows.append(Example(list(ex.ids), list(ex.mask), ex.prompt))
    return rows


def collate(rows: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows -> inputs (B, T), labels (B, T) and real (B, T): labels[t] is token t+1 when it is a
    target, else IGNORE_INDEX; padded to the longest row, and real is False at the padding (the pad
    id may be a real token too, eos, so it cannot be told from the inputs)."""
    T = max(len(r.ids) for r in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, row in enumerate(rows):
        ids, mask = torch.tensor(row.ids), torch.tensor(row.mask)
        inputs[b, : len(ids) - 1] = ids[:-1]
        labels[b, : len(ids) - 1] = ids[1:].masked_fill(~mask[1:], IGNORE_INDEX)
        real[b, : len(ids) - 1] = True
    return inputs, labels, real


class PackedLoader:
    """Micro-batches of packed rows, reshuffled and repacked every epoch (seeded). Each rank takes
    every world_size-th row, so a step's micro-batches over all ranks are consecutive rows. Its
    position (epoch, rows served over all ranks) is checkpointed, so a resumed run sees the same
    batches as an uninterrupted one, under another world_size too as long as the global batch
    (micro_batch x world_size) is the same: another one would cut the epochs elsewhere."""

    def __init__(self, examples: list[Example], row_len: int, micro_batch: int, pad_id: int, packing: bool = True,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.examples, self.row_len, self.micro_batch, self.pad_id = examples, row_len, micro_batch, pad_id
        self.packing, self.rank, self.world_size, self.seed, self.shuffle = packing, rank, world_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self.rows = self._epoch_rows(0)
        if len(self.rows) < micro_batch:
            raise ConfigError(f"the data packs into {len(self.rows)} rows per rank, fewer than one micro-batch "
                              f"({micro_batch}); lower batch_size / micro_batch_size or add data")

    def _epoch_rows(self, epoch: int) -> list[Example]:
        order = list(self.examples)
        if self.shuffle:
            random.Random(derive_seed("sft-epoch", self.seed, epoch)).shuffle(order)
        rows = pack(order, self.row_len, self.packing)
        return rows[self.rank: len(rows) - len(rows) % self.world_size: self.world_size]

    @property
    def rows_per_epoch(self) -> int:
        """Rows over all ranks in the first epoch (later epochs pack within a row or two of it)."""
        return len(self.rows) * self.world_size

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position + self.micro_batch > len(self.rows):  # the epoch's remainder is dropped
            self.epoch, self.position = self.epoch + 1, 0
            self.rows = self._epoch_rows(self.epoch)
        batch = self.rows[self.position: self.position + self.micro_batch]
        self.position += self.micro_batch
        return collate(batch, self.pad_id)

    def state_dict(self) -> dict:
        global_batch = self.micro_batch * self.world_size
        return {"epoch": self.epoch, "rows": self.position * self.world_size, "global_batch": global_batch}

    def load_state_dict(self, state: dict) -> None:
        global_batch = self.micro_batch * self.world_size
        if "rows" not in state:  # saved before the layout was recorded: assume it is this one
            state = {**state, "rows": state["position"] * self.world_size, "global_batch": global_batch}
        if state["global_batch"] != global_batch:
            raise ConfigError(f"cannot resume the SFT data: it was saved with {state['global_batch']} rows per "
                              f"micro-batch over all ranks and is {global_batch} now (micro_batch_size x world "
                              "size), which cuts the epochs elsewhere; resume with the same")
        self.epoch, self.position = state["epoch"], state["rows"] // self.world_size
        self.rows = self._epoch_rows(self.epoch)


# ============================================================================ model


def load_tokenizer(cfg: SFTConfig) -> Tokenizer:
    source = cfg.tokenizer or (find_checkpoint(cfg.init) if Path(cfg.init).is_dir() else "")
    if not source:
        raise ConfigError(f"init={cfg.init!r} is a preset: name a tokenizer directory with tokenizer=DIR")
    return Tokenizer.from_dir(source)


def check_teacher_tokenizer(cfg: SFTConfig, tokenizer: Tokenizer) -> None:
    """Logit distillation compares the teacher's and the student's logits id by id: one vocabulary.
    Cheap, so distill checks it before it samples the teacher."""
    teacher_tok = Tokenizer.from_dir(cfg.teacher)
    if teacher_tok.tk.get_vocab() != tokenizer.tk.get_vocab():
        raise ConfigError(f"logit distillation needs the teacher's tokenizer; {cfg.teacher} has a different "
                          "vocabulary (set kd_weight=0 to train on its traces only)")


def load_teacher(cfg: SFTConfig, tokenizer: Tokenizer, device: torch.device) -> nn.Module:
    """The frozen model whose logits `kd_weight` distils; its tokenizer must be the student's."""
    check_teacher_tokenizer(cfg, tokenizer)
    teacher = load_model(cfg.teacher, device=device).eval()
    teacher.requires_grad_(False)
    return teacher


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target positions (labels != IGNORE_INDEX) of KL(p_teacher || p_student), the
    next-token distributions from logits (B, T, V) of the same vocabulary."""
    target = labels != IGNORE_INDEX  # (B, T)
    log_p_student = student_logits[target].float().log_softmax(-1)  # (N, V)
    log_p_teacher = teacher_logits[target].float().log_softmax(-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")


# ============================================================================ training


def train(cfg: SFTConfig, resume: str | Path | None = None) -> Path:
    """Run SFT (in this process, or as one rank under torchrun); returns the final checkpoint
    directory. `resume`: "latest" or a checkpoint directory to continue from."""
    return run_stage(_train, cfg, resume)


def _train(cfg: SFTConfig, env: DistEnv, resume) -> Path:
    seed_everything(cfg.seed)

    # ---- data, model
    tokenizer = load_tokenizer(cfg)
    if cfg.packing and tokenizer.bos_id is None:
        raise ConfigError("packing marks each example's start with bos, and this tokenizer has none (Qwen2.5's "
                          "has no bos): set packing=false")
    examples, counts = load_examples(cfg.data, tokenizer, cfg.format, max_len=cfg.seq_len + 1)
    if cfg.packing and any(e.ids[:1] != [tokenizer.bos_id] for e in examples):
        # the model finds a packed row's documents at their bos: without one, examples would attend to each other
        raise ConfigError("packing marks each example's start with bos, and this tokenizer adds none to text "
                          "(DeepSeek-V3's does not): set packing=false, or use messages rows whose chat template "
                          "writes bos")
    train_examples, val_examples = split_examples(examples, cfg.val_fraction, cfg.seed)
    micro_batch, accum = batch_plan(cfg, env.world_size)
    loader = PackedLoader(train_examples, cfg.seq_len + 1, micro_batch, tokenizer.pad_id, cfg.packing,
                          env.rank, env.world_size, seed=cfg.seed)
    if cfg.epochs:
        cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * loader.rows_per_epoch / cfg.batch_size)))
    val_rows = pack(val_examples, cfg.seq_len + 1, cfg.packing)
    val_rows = val_rows[env.rank: len(val_rows) - len(val_rows) % env.world_size: env.world_size]
    # eval_batches x batch_size rows as (inputs, labels): in eval mode no MoE counts expert load
    val_batches = [collate(val_rows[i: i + micro_batch], tokenizer.pad_id)[:2]
                   for i in range(0, len(val_rows), micro_batch)][: cfg.eval_batches * accum]
    model = stage_model(cfg.init, tokenizer, cfg.model, cfg.seq_len).to(env.device)
    if cfg.mtp_lambda == 0:
        # the MTP loss is computed but not trained: frozen, the modules stay as they are, and DDP does not
        # wait for their gradients (it fails the second step when a parameter gets none)
        model.mtp_layers.requires_grad_(False)
    teacher = load_teacher(cfg, tokenizer, env.device) if cfg.kd_weight > 0 else None
    if env.is_main:
        targets = sum(sum(ex.mask) for ex in train_examples)
        tokens = sum(len(ex.ids) for ex in train_examples)
        print(f"data: {counts['rows']} rows -> {len(train_examples)} train / {len(val_examples)} val examples "
              f"({counts['truncated']} truncated, {counts['dropped']} dropped), {tokens:,} tokens of which "
              f"{targets:,} targets, packed into {loader.rows_per_epoch} rows of {cfg.seq_len + 1}", flush=True)
        print(f"model: {type(model).__name__} {model.num_parameters() / 1e6:.2f}M parameters | "
              f"batch {cfg.batch_size} rows = {micro_batch} x {accum} accumulation x {env.world_size} ranks | "
              f"{cfg.max_steps} steps ({cfg.max_steps * cfg.batch_size / loader.rows_per_epoch:.2f} epochs)", flush=True)

    bos_id = tokenizer.bos_id if cfg.packing else None  # bos marks the seams of packed examples

    def loss_fn(model, batch):
        inputs, labels, real, scale = batch  # scale = micro-batches x ranks / target tokens in the whole step
        inputs, labels, real = inputs.to(env.device), labels.to(env.device), real.to(env.device)
        documents = documents_of(inputs, bos_id)
        # the padding counts in no expert load: the bias update balances the real tokens' routing;
        # an untrained MTP module (mtp_lambda = 0) is not run at all; the logits only for the teacher's
        # KL term (without them, under fused_loss, the loss never holds the (B, T, V) logits: model/loss.py)
        out = model(inputs, labels=labels, documents=documents, token_mask=real, mtp=cfg.mtp_lambda > 0,
                    logits=teacher is not None)
        ce_sum = out.loss * (labels != IGNORE_INDEX).sum()  # the model's loss is a mean over targets
        objective, metrics = ce_sum * scale, {"loss": ce_sum * scale}
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(inputs, documents=documents).logits
            V = tokenizer.vocab_size  # heads may be padded past the vocabulary; compare the ids that exist
            kl_sum = forward_kl(out.logits[..., :V], teacher_logits[..., :V], labels)
            objective = ((1 - cfg.kd_weight) * ce_sum + cfg.kd_weight * kl_sum) * scale
            metrics["kl"] = kl_sum * scale
        if out.mtp_loss is not None and cfg.mtp_lambda > 0:
            # a token mean over the step too (not a mean of micro-batch means), like the loss above
            objective = objective + cfg.mtp_lambda * out.mtp_loss_sum * scale
            metrics["mtp_loss"] = out.mtp_loss_sum * scale
        if out.aux_loss is not None:
            objective = objective + out.aux_loss
        return objective, metrics

    def validate():
        if val_batches:
            loss = evaluate_loss(trainer.raw_model, val_batches, env, trainer.autocast,
                                 documents=lambda inputs: documents_of(inputs, bos_id))
            trainer.log({"val_loss": loss}, console=True)

    def sample():
        example = (val_examples or train_examples)[0]
        prompt = example.ids[: example.mask.index(True)]
        text = sample_text(trainer.raw_model, tokenizer, prompt, cfg.sample_tokens, cfg.sample_temperature,
                           seed=cfg.seed + trainer.step)
        trainer.log({"sample": text}, console=False)
        if env.is_main:
            print(f"---- sample at step {trainer.step} ----\n{tokenizer.decode(prompt)}{text}\n----", flush=True)

    with Trainer(cfg, model, env, tokenizer=tokenizer, loader=loader, resume=resume) as trainer:
        if trainer.step == 0:
            validate()

        # ---- the loop
        while trainer.step < cfg.max_steps:
            batches = [next(loader) for _ in range(accum)]
            targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _ in batches)
            tokens = sum(int(real.sum()) for _, _, real in batches)
            targets, tokens = (int(v) for v in sum_over_ranks(env, [targets, tokens]))
            scale = accum * env.world_size / targets
            stats = trainer.train_step([(*batch, scale) for batch in batches], loss_fn, tokens=tokens)
            # DeepSeek-V3 models only; an untrained MTP module (mtp_lambda = 0) keeps its routing bias too
            balanced = trainer.raw_model if cfg.mtp_lambda > 0 else trainer.raw_model.layers
            imbalance = update_expert_bias(balanced, cfg.bias_gamma)
            if imbalance:
                stats["imbalance"] = max(imbalance)
            trainer.log(stats)
            if trainer.end_of_step(validate=validate, sample=sample):
                break

        return trainer.save_checkpoint()


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    stage.add_arguments(parser, "init=runs/pretrain/latest data=chats.jsonl max_steps=100")


def steps_given_win(overrides: list[str]) -> list[str]:
    """`max_steps=N` among the command-line overrides wins over a recipe's `epochs`, as every
    override wins over the file. Left alone, the recipe's `epochs` would recompute max_steps and
    silently discard the N the user asked for."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    return [*overrides, "epochs=0"] if "max_steps" in keys and "epochs" not in keys else list(overrides)


def run(args) -> int:
    return stage.run_cli(args, SFTConfig, train, steps_given_win(args.overrides))
