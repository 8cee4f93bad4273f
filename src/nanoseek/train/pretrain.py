"""Pretraining: next-token prediction + multi-token prediction on a token-shard corpus.

    nanoseek pretrain --config configs/pretrain_small.toml [--resume] [key=value ...]
    torchrun --nproc_per_node=N -m nanoseek.cli pretrain --config ... device=cuda
    torchrun --nproc_per_node=N -m nanoseek.cli pretrain --config ... expert_parallel=true sample_every=0

The objective is DeepSeek-V3's (§2.2, §2.1.2):

    loss = CE(next token) + mtp_lambda * mean_k CE(MTP depth k) + sequence-wise balance loss

(the last only when aux_loss_alpha > 0), and after every optimizer step the auxiliary-loss-free
bias update nudges each MoE layer's routing bias towards balanced expert load (bias_gamma; 0 turns
it off, the load imbalance is still logged).

A DeepSeek-V3.2 model (model.index_* set) also trains its DSA indexer as DeepSeek-V3.2-Exp's
continued pretraining did (its report, §2.1; model/attention.py has the loss):
- the first `dense_warmup_steps` steps are the dense warm-up: attention stays dense, every weight
  but the indexers' is frozen (and the expert-bias update paused), and the objective is
  indexer_lambda * L_I, the KL divergence from the main attention distribution to the indexer's;
- then sparse training: top-k attention, every weight trained, and L_I restricted to the selected
  tokens. The indexer's inputs are detached, so L_I trains the indexer alone and the objective
  above everything else (indexer_lambda then only scales the indexer's own updates).
indexer_lambda=0 leaves the indexer frozen as loaded. metrics.jsonl gets `indexer_loss` and
`indexer_recall` (the share of the dense attention's mass on the selected tokens), and each
validation `val_indexer_recall` / `val_indexer_loss` of the sparse model as it would run.
`init=<a V3 checkpoint>` with `model.index_topk=K model.index_head_dim=I model.index_n_heads=J`
converts it: every V3 weight loaded, the indexers newly initialized.

Data: `data` lists text/jsonl/json/parquet sources, `default` (Shakespeare + synthetic reasoning
text) or `synthetic:` specs (the reasoning base's digit-sum corpus). A byte-level BPE of
`vocab_size` is trained on them and they are tokenized into shards under `data_dir` (default
`<out_dir>/data`), reused on the next run with the same recipe. A `data_dir` that
`nanoseek data prepare` wrote is trained on as it is (its shards and tokenizer; `data` and
`vocab_size` then do not apply), never overwritten.

A trained tokenizer: `tokenizer=<dir>` (from `nanoseek tokenizer train`) tokenizes the data with
it instead of training a BPE here (vocab_size is then the tokenizer's).

Continued pretraining: `init=<checkpoint dir>` starts from that model instead of a fresh `preset`
and tokenizes the data with the checkpoint's tokenizer (`data_dir=<its run>/data` with the same
data and seed reuses its shards as they are). Its only model.* overrides are the index_* ones
that turn a V3 checkpoint into a V3.2 model (above).

The loop below reads top to bottom: setup, then per step: batch -> optimizer step -> expert-bias
update -> log -> (every so often) validation loss, a text sample, a checkpoint. The machinery is
`nanoseek.train`'s: stage (CLI, model, samples), trainer (optimizer step, metrics, Ctrl-C),
checkpointing (run directories, exact resume), config (the TOML recipe and overrides).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint import load_config
from nanoseek.config import PRESETS
from nanoseek.data.corpus import LEGACY_RECIPE, TokenLoader, load_sources, open_split, prepare_data
from nanoseek.errors import ConfigError
from nanoseek.model.decoder import ModelOutput, documents_of
from nanoseek.model.expert_parallel import check_expert_split
from nanoseek.model.moe import moe_layers, update_expert_bias
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer, render_chat_template, train_tokenizer
from nanoseek.train import stage
from nanoseek.train.checkpointing import checkpoint_path
from nanoseek.train.config import TrainConfig
from nanoseek.train.distributed import DistEnv, barrier, gather_objects, seed_everything
from nanoseek.train.stage import preset_config, run_stage, sample_text, stage_model
from nanoseek.train.trainer import Trainer, batch_plan, evaluate_loss


@dataclass
class PretrainConfig(TrainConfig):
    out_dir: str = "runs/pretrain"
    # model
    preset: str = "small"  # a nanoseek.config preset
    init: str = ""  # checkpoint directory to continue pretraining from (then preset/model are unused)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides: model.num_hidden_layers=2
    # data
    data: list[str] = field(default_factory=lambda: ["default"])  # files, directories, or "default"
    data_dir: str = ""  # token shards and tokenizer; "" = <out_dir>/data
    tokenizer: str = ""  # a tokenizer directory (`nanoseek tokenizer train`) to use instead of training a BPE
    vocab_size: int = 4096  # of the BPE trained on `data` (with init: the checkpoint's tokenizer instead)
    chat_template: str = ""  # Jinja chat template the checkpoints carry; "" keeps the tokenizer's (R1's format)
    val_fraction: float = 0.05  # share of documents held out
    # objective
    document_mask: bool = True  # attention stays inside each packed document (which starts with bos)
    mtp_lambda: float = 0.3  # weight of the MTP loss (V3: 0.3, then 0.1 late in training)
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3: 1e-4); 0 = off; sets the model's
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed (V3: 1e-3); 0 = off
    # DeepSeek-V3.2 models only (model.index_* set): training the DSA indexer (module docstring)
    indexer_lambda: float = 1.0  # weight of the indexer's KL loss; 0 = the indexer stays frozen
    dense_warmup_steps: int = 0  # the first N steps: dense attention, only the indexer trained
    # samples
    sample_prompt: str = "ROMEO.\n"
    sample_temperature: float = 0.8
    sample_top_k: int = 40

    def __post_init__(self):
        super().__post_init__()
        # checked as the config loads, not after data preparation (minutes at real size)
        if not self.init and self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r}: expected one of {', '.join(PRESETS)}")
        if self.indexer_lambda < 0:
            raise ConfigError(f"indexer_lambda={self.indexer_lambda} must be >= 0 (0 leaves the indexer frozen)")
        if not 0 <= self.dense_warmup_steps <= self.max_steps:
            raise ConfigError(f"dense_warmup_steps={self.dense_warmup_steps} must be between 0 and max_steps "
                              f"({self.max_steps})")
        if self.dense_warmup_steps and not self.indexer_lambda:
            raise ConfigError("dense_warmup_steps trains only the indexer, by its loss: it needs indexer_lambda > 0")
        if not 0 < self.val_fraction < 1:  # the validation loss needs held-out documents
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1): pretraining measures its "
                              "validation loss on held-out documents")


def train(cfg: PretrainConfig, resume: str | Path | None = None) -> Path:
    """Run pretraining (in this process, or as one rank under torchrun); returns the final
    checkpoint directory. `resume`: "latest" or a checkpoint directory to continue from."""
    return run_stage(_train, cfg, resume)


def _train(cfg: PretrainConfig, env: DistEnv, resume) -> Path:
    if cfg.init:  # a run directory names its latest checkpoint, as every stage's init= does
        cfg.init = str(checkpoint_path(cfg.init))
    if cfg.init and not all((Path(cfg.init) / f).is_file() for f in ("config.json", "tokenizer.json")):
        raise ConfigError(f"init={cfg.init!r} is not a checkpoint directory with its tokenizer "
                          "(config.json, tokenizer.json)")

    # bad settings fail now, not after the data is tokenized (minutes on a real corpus)
    if not cfg.init:
        vocab_size = cfg.model.get("vocab_size", cfg.vocab_size)  # the tokenizer's is checked with the model
        config = preset_config(cfg.preset, cfg.model, cfg.seq_len, vocab_size, 0, 1, aux_loss_alpha=cfg.aux_loss_alpha)
        sparse = config.sparse_attention
    else:  # a V3.2 checkpoint, or a V3 one that model.index_* convert
        config = load_config(cfg.init)
        sparse = getattr(config, "sparse_attention", False) or "index_topk" in cfg.model
    if cfg.expert_parallel and env.distributed:
        check_expert_split(getattr(config, "n_routed_experts", 0), env.world_size)
    if cfg.dense_warmup_steps and not sparse:
        raise ConfigError("dense_warmup_steps trains a DeepSeek-V3.2 model's indexer; this model has none: set "
                          "model.index_topk, model.index_head_dim and model.index_n_heads (with init=, to convert it)")
    if cfg.dense_warmup_steps and env.world_size > 1:
        # DDP wraps the parameters that require a gradient once; the warm-up changes which do
        raise ConfigError("dense_warmup_steps runs in one process: run the warm-up alone (max_steps=N "
                          "dense_warmup_steps=N), then the sparse stage under torchrun with init=<that run>")

    # ---- data, tokenizer, model
    tokenizer, data_dir = prepare_corpus(cfg, env)
    seed_everything(cfg.seed)  # after data preparation, which only rank 0 (and only once) does
    model = initial_model(cfg, tokenizer).to(env.device)
    train_indexer = model.config.sparse_attention and cfg.indexer_lambda > 0
    if train_indexer:
        for indexer in indexers(model):
            indexer.requires_grad_(True)  # before the Trainer builds the optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]  # what sparse training trains
    micro_batch, accum = batch_plan(cfg, env.world_size)
    loader = TokenLoader(data_dir, "train", micro_batch, cfg.seq_len, env.rank, env.world_size, seed=cfg.seed)
    # a fixed random sample of val windows, so the val loss covers the whole val mix, not its first
    # documents: eval_batches batches of batch_size windows, the same windows whatever the layout
    # (micro-batches x accumulation x ranks)
    val_loader = TokenLoader(data_dir, "val", micro_batch, cfg.seq_len, env.rank, env.world_size, seed=cfg.seed)
    val_batches = [next(val_loader) for _ in range(min(cfg.eval_batches * accum, val_loader.batches_per_epoch))]
    bos_id = tokenizer.bos_id if cfg.document_mask else None
    loss_fn = functools.partial(pretrain_loss, mtp_lambda=cfg.mtp_lambda, bos_id=bos_id,
                                indexer_lambda=cfg.indexer_lambda)

    n_params = model.num_parameters()  # before expert parallelism leaves this rank its slice of the experts
    with Trainer(cfg, model, env, tokenizer=tokenizer, loader=loader, resume=resume) as trainer:
        if env.is_main:
            on_rank = f" ({model.num_parameters() / 1e6:.2f}M on each rank)" if trainer.expert_parallel else ""
            print(f"model: {n_params / 1e6:.2f}M parameters{on_rank}, {len(model.layers)} layers + "
                  f"{len(model.mtp_layers)} MTP | batch {cfg.batch_size} x {cfg.seq_len} tokens = {micro_batch} "
                  f"x {accum} accumulation x {env.world_size} ranks | {cfg.max_steps} steps", flush=True)
            if model.config.sparse_attention and model.config.index_topk >= cfg.seq_len:
                print(f"note: index_topk ({model.config.index_topk}) >= seq_len ({cfg.seq_len}): every query "
                      "attends to all it sees, so sparse attention is dense here and the indexer's recall is 1; "
                      "set model.index_topk below seq_len to train a selection", flush=True)
        if trainer.step == 0:
            # the windows val_loss covers are every rank's val_batches, not rank 0's alone
            eval_targets = [t for rank_targets in gather_objects([t for _, t in val_batches]) for t in rank_targets]
            if env.is_main:
                trainer.log({"unigram_val_loss": unigram_loss(data_dir),  # over the whole val split
                             "unigram_eval_loss": unigram_loss(data_dir, eval_targets)}, console=True)
            validate(trainer, val_batches, bos_id)

        # ---- the loop
        while trainer.step < cfg.max_steps:
            batches = [tuple(t.to(env.device) for t in next(loader)) for _ in range(accum)]
            warmup = trainer.step < cfg.dense_warmup_steps
            if train_indexer:  # a function of the step, so a resumed run is in the right stage
                set_indexer_stage(trainer.raw_model, warmup, trainable)
            stats = trainer.train_step(batches, functools.partial(loss_fn, warmup=warmup),
                                       tokens=cfg.batch_size * cfg.seq_len)
            # after the optimizer step; the warm-up freezes the routing biases too
            imbalance = update_expert_bias(trainer.raw_model, 0.0 if warmup else cfg.bias_gamma)
            if imbalance:
                stats.update(imbalance=max(imbalance), imbalance_per_layer=imbalance)
            trainer.log(stats)

            if trainer.end_of_step(validate=lambda: validate(trainer, val_batches, bos_id),
                                   sample=lambda: sample(trainer, tokenizer, cfg)):
                break  # Ctrl-C: the checkpoint below is where --resume picks up

        return trainer.save_checkpoint()


def pretrain_loss(model, batch, mtp_lambda: float, bos_id: int | None = None, indexer_lambda: float = 0.0,
                  warmup: bool = False):
    """DeepSeek-V3's objective on one (inputs, targets) batch: next-token CE + mtp_lambda * MTP CE
    + the sequence-wise balance loss (present only when aux_loss_alpha > 0, already scaled by it),
    + indexer_lambda * the DSA indexer's loss when the model returns one (set_indexer_stage).
    With `bos_id`, each document of a packed row (bos doc eos) attends only to itself.
    `warmup` (the dense warm-up): the objective is the indexer's loss alone (the rest is frozen;
    the other losses are still logged)."""
    inputs, targets = batch
    out = model(inputs, labels=targets, logits=False, documents=documents_of(inputs, bos_id))
    objective, metrics = out.loss, {"loss": out.loss}
    if out.mtp_loss is not None:
        objective = objective + mtp_lambda * out.mtp_loss
        metrics["mtp_loss"] = out.mtp_loss
    if out.aux_loss is not None:
        objective = objective + out.aux_loss
        metrics["aux_loss"] = out.aux_loss
    if out.indexer_loss is not None:
        # detached inputs: this term reaches the indexers alone, the terms above everything else
        objective = indexer_lambda * out.indexer_loss + (0.0 if warmup else objective)
        metrics.update(indexer_loss=out.indexer_loss, indexer_recall=out.indexer_recall)
    return objective, metrics


def indexers(model: Transformer) -> list[torch.nn.Module]:
    """The DSA indexers of a V3.2 model (every MLA's, the MTP modules' included)."""
    return [layer.self_attn.indexer for layer in model.model.layers if layer.self_attn.indexer is not None]


def set_indexer_stage(model: Transformer, warmup: bool, trainable: list[torch.nn.Parameter]) -> None:
    """Put a V3.2 model whose indexers are trained in the dense warm-up (dense attention, every
    weight but the indexers' frozen) or in sparse training (top-k attention, the `trainable`
    weights trained). Frozen weights get no gradient, so the optimizer leaves them as they are
    (weight decay included)."""
    model.set_dsa_mode("dense" if warmup else "sparse")
    for p in trainable:
        p.requires_grad_(not warmup)
    for indexer in indexers(model):
        indexer.requires_grad_(True)


def validate(trainer: Trainer, val_batches, bos_id: int | None) -> None:
    """The validation loss; for a V3.2 model, of its sparse attention (as inference runs it, also
    during the dense warm-up), with its indexer's recall and loss on the selected tokens from the
    same forwards ("sparse" mode attends as inference does and also leaves the indexer's stats)."""
    model = trainer.raw_model
    stats = {"val_indexer_recall": 0.0, "val_indexer_loss": 0.0}

    def observe(out: ModelOutput) -> None:  # a V3.2 model's indexer stats of one val batch
        stats["val_indexer_recall"] += float(out.indexer_recall) / len(val_batches)
        stats["val_indexer_loss"] += float(out.indexer_loss) / len(val_batches)

    with dsa_mode(model, "sparse"):
        loss = evaluate_loss(model, val_batches, trainer.env, trainer.autocast,
                             documents=functools.partial(documents_of, bos_id=bos_id),
                             observe=observe if model.config.sparse_attention else None)
    record = {"val_loss": loss}
    if model.config.sparse_attention:
        record.update(trainer.mean_over_ranks(stats))
    trainer.log(record, console=True)


@contextmanager
def dsa_mode(model: Transformer, mode: str | None):
    """The model in `mode` (Transformer.set_dsa_mode), then back in the mode it had. A V3 model has
    none: it is left as it is."""
    if not model.config.sparse_attention:
        yield
        return
    before = model.model.layers[0].self_attn.dsa_mode  # set_dsa_mode sets every layer alike
    model.set_dsa_mode(mode)
    try:
        yield
    finally:
        model.set_dsa_mode(before)


def sample(trainer: Trainer, tokenizer: Tokenizer, cfg: PretrainConfig) -> None:
    """Generate from cfg.sample_prompt; the text goes to metrics.jsonl and the console."""
    text = cfg.sample_prompt + sample_text(trainer.raw_model, tokenizer, tokenizer.encode_prompt(cfg.sample_prompt),
                                           cfg.sample_tokens, cfg.sample_temperature, cfg.sample_top_k,
                                           seed=cfg.seed + trainer.step)
    trainer.log({"sample": text}, console=False)
    if trainer.env.is_main:
        print(f"---- sample at step {trainer.step} ----\n{text}\n----", flush=True)


# ---------------------------------------------------------------- setup helpers


def initial_model(cfg: PretrainConfig, tokenizer: Tokenizer) -> Transformer:
    """A fresh model of the configured preset, or the `init` checkpoint to continue from (a V3 one
    made V3.2 by model.index_* overrides); either way its sequence-wise balance loss weight is the
    run's aux_loss_alpha."""
    model = stage_model(cfg.init or cfg.preset, tokenizer, cfg.model, cfg.seq_len, convert_to_v32=True,
                        aux_loss_alpha=cfg.aux_loss_alpha)
    if not isinstance(model, Transformer):
        raise ConfigError(f"init={cfg.init or cfg.preset!r} is a dense model; pretraining is for DeepSeek-V3 models")
    set_aux_loss_alpha(model, cfg.aux_loss_alpha)
    return model


def set_aux_loss_alpha(model: Transformer, alpha: float) -> None:
    """Give a (loaded) model the run's balance-loss weight, in its config (saved with it) and its MoE layers."""
    model.config = model.config.replace(aux_loss_alpha=alpha)
    for moe in moe_layers(model):
        moe.aux_loss_alpha = alpha


def prepare_corpus(cfg: PretrainConfig, env: DistEnv) -> tuple[Tokenizer, Path]:
    """Tokenize the data into token shards in data_dir (rank 0), with a BPE trained on it or, when
    continuing a checkpoint (`init`), with that checkpoint's tokenizer; skipped when a previous run
    already prepared data_dir with the same recipe. Every rank then loads the result."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.out_dir) / "data"
    if cfg.chat_template:  # a template that does not render fails now, not after tokenizing the data
        render_chat_template(cfg.chat_template, [{"role": "user", "content": "1+1?"}], bos_token="", eos_token="")
    if cfg.init and cfg.tokenizer:
        raise ConfigError("set init= or tokenizer=, not both: a checkpoint brings its own tokenizer")
    source = cfg.init or cfg.tokenizer
    if source and not (Path(source) / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer={source!r} is not a tokenizer directory (no tokenizer.json)")
    init_tokenizer = Tokenizer.from_dir(source) if source else None
    recipe = {"data": cfg.data, "vocab_size": cfg.vocab_size, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    tokenizer_hash = lambda tok: hashlib.sha256(tok.tk.to_str().encode()).hexdigest()  # noqa: E731
    if init_tokenizer is not None:
        recipe.update(vocab_size=init_tokenizer.vocab_size, tokenizer=tokenizer_hash(init_tokenizer))
    meta_file = data_dir / "meta.json"

    def prepared() -> str:
        """'recipe': data_dir holds this recipe's shards; 'data prepare': shards `nanoseek data
        prepare` wrote (no recipe), used as they are; '': none yet, or another recipe's."""
        if not meta_file.is_file():
            return ""
        saved = json.loads(meta_file.read_text()).get("recipe")
        if saved is None and (data_dir / LEGACY_RECIPE).is_file():  # a run of an earlier nanoseek
            saved = json.loads((data_dir / LEGACY_RECIPE).read_text())
        if saved is None:
            return "data prepare"
        if saved == recipe:
            return "recipe"
        # data_dir=<its run>/data when continuing a run: shards tokenized with the BPE that run trained,
        # which is the checkpoint's tokenizer, so the same shards (its recipe names a vocab_size, not a hash)
        if init_tokenizer is None or "tokenizer" in saved or not (data_dir / "tokenizer.json").is_file():
            return ""
        same_data = {k: v for k, v in saved.items() if k != "vocab_size"} == {
            k: v for k, v in recipe.items() if k not in ("vocab_size", "tokenizer")}
        return "recipe" if same_data and tokenizer_hash(Tokenizer.from_dir(data_dir)) == recipe["tokenizer"] else ""

    found = prepared() if env.is_main else ""
    if found == "data prepare":  # the user's own shards: never overwritten, trained on as they are
        if init_tokenizer is not None and tokenizer_hash(Tokenizer.from_dir(data_dir)) != recipe["tokenizer"]:
            raise ConfigError(f"data_dir={data_dir} was tokenized with another tokenizer than {source}'s: prepare "
                              f"it again with `nanoseek data prepare --tokenizer {source} --out {data_dir}`")
        sources = ", ".join(json.loads(meta_file.read_text())["sources"])
        print(f"data: training on the shards `nanoseek data prepare` wrote in {data_dir} (from {sources}); "
              "data= and vocab_size= do not apply", flush=True)
    elif env.is_main and not found:
        t0 = time.perf_counter()
        if init_tokenizer is not None:
            tokenizer = init_tokenizer
        else:
            tokenizer = train_tokenizer([doc for _, docs in load_sources(cfg.data, seed=cfg.seed) for doc in docs],
                                        cfg.vocab_size)
        meta = prepare_data(cfg.data, tokenizer, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                            recipe=recipe)  # meta.json, written last, marks the directory complete
        s = meta["splits"]
        print(f"data: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, vocab "
              f"{tokenizer.vocab_size}, in {data_dir} ({time.perf_counter() - t0:.0f}s)", flush=True)
    while not env.is_main and not prepared():
        # the other ranks wait for the data here, not in the barrier: tokenizing a large corpus
        # can outlast a collective's timeout (NCCL's is 10 minutes). An error on rank 0 ends the job.
        time.sleep(1)
    barrier()
    tokenizer = Tokenizer.from_dir(data_dir)
    if cfg.chat_template:  # the format the corpus speaks, so chat and serve prompt the model in it
        tokenizer.chat_template = cfg.chat_template
    return tokenizer, data_dir


def unigram_loss(data_dir: Path, targets: list[torch.Tensor] | None = None) -> float:
    """Cross-entropy (nats/token) of the val split, or of the given target tokens, under the train
    split's unigram frequencies (add-one smoothed): the loss of a model that ignores context.
    The bar a language model has to clear."""
    train = open_split(data_dir, "train")
    val = open_split(data_dir, "val") if targets is None else torch.cat([t.flatten() for t in targets]).numpy()
    vocab = int(max(train.max(), val.max())) + 1
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].mean())


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    stage.add_arguments(parser, "out_dir=runs/x max_steps=100 seed=1 model.num_hidden_layers=2")


def run(args) -> int:
    return stage.run_cli(args, PretrainConfig, train)
