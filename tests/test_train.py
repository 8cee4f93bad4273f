"""Training machinery and the pretraining loop: configs, schedule, optimizer, checkpoints, resume.

Every run uses the `tiny` preset on a small generated corpus (configs/pretrain_tiny.toml), so each
takes a second or two on CPU.
"""

import json
import os
import random
import re
import signal
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import read_tensors
from nanoseek.cli import main as cli_main
from nanoseek.config import preset
from nanoseek.errors import CheckpointError, ConfigError
from nanoseek.model.transformer import IGNORE_INDEX, Transformer
from nanoseek.train import checkpointing, pretrain
from nanoseek.train.checkpointing import list_checkpoints
from nanoseek.train.config import TrainConfig, load_run_config
from nanoseek.train.distributed import DistEnv
from nanoseek.train.metrics import read_metrics
from nanoseek.train.trainer import Trainer, batch_plan, build_optimizers, evaluate_loss, lr_at
from nanoseek.train.pretrain import PretrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain_tiny.toml"
WORDS = ("the king queen lord lady sword crown night day love death heaven earth fair foul sweet "
         "gentle noble speak hear thou thee thy my our good ill come go stay fly").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Twelve pseudo-verse documents (~40k characters), fixed by seed."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        lines = [f"{rng.choice(WORDS).upper()}.\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
                 for _ in range(60)]
        (d / f"doc{i:02d}.txt").write_text("\n\n".join(lines) + "\n")
    return d


def tiny_config(out_dir, corpus, *overrides) -> PretrainConfig:
    return load_run_config(PretrainConfig, TINY, [f"out_dir={out_dir}", f"data={json.dumps([str(corpus)])}",
                                              f"data_dir={corpus.parent / 'shards'}", *overrides])


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return read_tensors(checkpoint)


# ---------------------------------------------------------------- configs


@dataclass
class Section:
    width: int = 4


@dataclass
class DemoConfig(TrainConfig):
    name: str = "x"
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    files: list[str] = field(default_factory=list)
    limit: int | None = None
    table: dict = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    section: Section = field(default_factory=Section)


def test_config_from_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('name = "from-file"\nratio = 1\nmax_steps = 7\n[section]\nwidth = 8\n[table]\nhidden_size = 32\n')
    cfg = load_run_config(DemoConfig, f, ["max_steps=9", "lr=3e-4", "flag=true", "mode=b", "files=one.txt",
                                      "limit=none", "section.width=16", "table.num_hidden_layers=2", "name=run 1"])
    assert (cfg.name, cfg.ratio, cfg.max_steps, cfg.lr, cfg.flag, cfg.mode) == ("run 1", 1.0, 9, 3e-4, True, "b")
    assert isinstance(cfg.ratio, float) and cfg.files == ["one.txt"] and cfg.limit is None
    assert cfg.section.width == 16 and cfg.table == {"hidden_size": 32, "num_hidden_layers": 2}
    assert load_run_config(DemoConfig, None, ['files=["a", "b"]', "limit=3"]).files == ["a", "b"]


@dataclass
class TableConfig(TrainConfig):
    weights: dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 1.0})


def test_a_dotted_override_edits_a_default_table(tmp_path):
    """`nanoseek rl rewards.format=0.5` without a recipe kept only {format: 0.5}, dropping the default
    accuracy reward; a dotted key edits the table, a whole table still replaces it, as in a file."""
    assert load_run_config(TableConfig, None, ["weights.b=0.5"]).weights == {"a": 1.0, "b": 0.5}
    assert load_run_config(TableConfig, None, ["weights={b=0.5}"]).weights == {"b": 0.5}
    f = tmp_path / "c.toml"
    f.write_text("weights = { c = 2.0 }\n")
    assert load_run_config(TableConfig, f, ["weights.b=0.5"]).weights == {"c": 2.0, "b": 0.5}
    # a whole table on the command line, then one of its keys ("weights is not a table" before)
    assert load_run_config(TableConfig, None, ["weights={c=2.0}", "weights.b=0.5"]).weights == {"c": 2.0, "b": 0.5}


def test_a_quoted_string_override_is_a_toml_string():
    cfg = load_run_config(DemoConfig, None, ['out_dir="runs/x"', 'name="a\\nb"', "mode='b'", 'files="c.txt"'])
    assert (cfg.out_dir, cfg.name, cfg.mode, cfg.files) == ("runs/x", "a\nb", "b", ["c.txt"])
    assert load_run_config(DemoConfig, None, ['name="unterminated']).name == '"unterminated'  # kept as typed


@pytest.mark.parametrize("overrides, message", [
    (["max_stpes=3"], r"unknown config key 'max_stpes'; valid keys: out_dir, seed, max_steps.*section.width"),
    (["section.depth=3"], r"unknown config key 'section.depth'"),
    (["max_steps=many"], r"max_steps='many': expected int"),
    (["max_steps=2.5"], r"expected int"),
    (["flag=maybe"], r"flag='maybe': expected bool"),
    (["mode=c"], r"mode='c': expected one of a, b"),
    (["lr=-1"], r"lr=-1.0 must be positive"),
    (["max_steps"], r"not key=value"),
    (["section=3"], r"section is a table"),
    (["weights.a=abc"], r"weights.a='abc': expected float"),  # a table's values are typed too
])
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(DemoConfig, None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(DemoConfig, tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("max_steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(DemoConfig, tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("btach_size = 3")
    with pytest.raises(ConfigError, match="unknown config key 'btach_size'"):
        load_run_config(DemoConfig, tmp_path / "typo.toml")


def test_recipes_load():
    from nanoseek.train.distill import DistillConfig
    from nanoseek.train.grm import GRMConfig
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.sft import SFTConfig

    stages = {"pretrain": PretrainConfig, "rl": GRPOConfig, "sft": SFTConfig, "distill": DistillConfig,
              "grm": GRMConfig}
    paths = sorted((ROOT / "configs").glob("*.toml"))
    for path in paths:
        cfg = load_run_config(stages[path.stem.split("_")[0]], path)  # every shipped recipe names a stage
        assert cfg.batch_size % (cfg.micro_batch_size or 1) == 0, path
    assert {p.stem.split("_")[0] for p in paths} == set(stages)


# ---------------------------------------------------------------- schedule and optimizer


def test_lr_schedule_values():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(cfg, 110) == pytest.approx(0.1) and lr_at(cfg, 500) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(wsd, s) for s in (50, 88, 99, 110)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    const = TrainConfig(lr=2.0, warmup_steps=0, schedule="constant")
    assert lr_at(const, 0) == lr_at(const, 999) == 2.0


def test_optimizer_decays_only_matrices():
    model = Transformer(preset("tiny"))
    (adamw,) = build_optimizers(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = adamw.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in no_decay_names
    assert all(n.endswith(("norm.weight", "embed_tokens.weight")) for n in no_decay_names)
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = Transformer(preset("tiny"))
    muon, adamw = build_optimizers(model, TrainConfig(optimizer="muon", weight_decay=0.1, lr=0.02))
    names = {id(p): n for n, p in model.named_parameters()}
    (matrices,) = muon.param_groups
    decay, no_decay = adamw.param_groups
    muon_names = {names[id(p)] for p in matrices["params"]}
    assert isinstance(muon, torch.optim.Muon) and matrices["adjust_lr_fn"] == "match_rms_adamw"
    assert matrices["weight_decay"] == 0.1 and matrices["lr"] == 0.02
    expected = {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("model.layers.")}
    assert muon_names == expected  # attention, experts, router, the MTP module's eh_proj
    assert {"model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.2.eh_proj.weight"} <= muon_names
    assert {names[id(p)] for p in decay["params"]} == {"lm_head.weight"}  # the output head stays with AdamW
    assert all(names[id(p)].endswith(("norm.weight", "embed_tokens.weight")) for p in no_decay["params"])
    assert len(matrices["params"]) + len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_muon_update_is_an_orthogonalized_step_of_adamws_size(tmp_path):
    """One step from zero momentum: each matrix moves by lr * 0.2 * sqrt(max(rows, cols)) times the
    Newton-Schulz orthogonalization of its (Nesterov) gradient, so its singular values are nearly
    equal and the update's RMS is about 0.2 * lr, an AdamW update's size (Moonlight's scaling)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    cfg = TrainConfig(out_dir=str(tmp_path), optimizer="muon", lr=1e-2, weight_decay=0.0, warmup_steps=0,
                      schedule="constant", batch_size=4, tensorboard=False)
    trainer = Trainer(cfg, model, DistEnv())
    weight = model.model.layers[0].mlp.up_proj.weight  # (128, 64)
    before = weight.detach().clone()
    ids = torch.randint(0, 512, (4, 65))
    batch = (ids[:, :-1], ids[:, 1:])
    _loss_fn(model, batch)[0].backward()
    gradient = torch.linalg.svdvals(weight.grad)
    model.zero_grad()
    trainer.train_step([batch], _loss_fn)
    update = (before - weight.detach()) / 1e-2
    singular = torch.linalg.svdvals(update / (0.2 * max(update.shape) ** 0.5))
    assert gradient.min() < 0.2 * gradient.max()  # the gradient's spectrum is spread out...
    assert singular.min() > 0.5 and singular.max() < 1.3  # ...the update's is nearly flat
    assert 0.15 < update.pow(2).mean().sqrt() < 0.25
    trainer.close()


def _loss_fn(model, batch):
    inputs, targets = batch
    out = model(inputs, labels=targets)
    mtp = 0.3 * out.mtp_loss if out.mtp_loss is not None else 0.0
    return out.loss + mtp, {"loss": out.loss}


def test_one_step_reduces_loss_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    cfg = TrainConfig(out_dir=str(tmp_path), lr=1e-2, warmup_steps=0, schedule="constant", batch_size=4,
                      tensorboard=False)
    trainer = Trainer(cfg, model, DistEnv())
    ids = torch.randint(0, 512, (4, 33))
    batch = (ids[:, :-1], ids[:, 1:])
    before = trainer.train_step([batch], _loss_fn, tokens=128)
    after = _loss_fn(model, batch)[1]["loss"].item()
    assert after < before["loss"] - 0.05
    assert before["grad_norm"] > 0 and before["lr"] == 1e-2 and trainer.step == 1
    trainer.close()


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    ids = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for micro in (4, 2):
        torch.manual_seed(0)
        model = Transformer(preset("tiny", num_nextn_predict_layers=0))
        cfg = TrainConfig(out_dir=str(tmp_path), batch_size=4, micro_batch_size=micro, tensorboard=False)
        trainer = Trainer(cfg, model, DistEnv())
        batches = [(ids[i:i + micro, :-1], ids[i:i + micro, 1:]) for i in range(0, 4, micro)]
        assert trainer.grad_accum_steps == len(batches)
        (optimizer,) = trainer.optimizers
        optimizer.step = lambda: None  # keep the gradients: inspect them instead of stepping
        optimizer.zero_grad = lambda set_to_none=True: None
        trainer.train_step(batches, _loss_fn)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        trainer.close()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_validation_loss_is_the_mean_over_all_target_tokens():
    """SFT batches hold different numbers of targets: each target token weighs the same, so the
    value does not depend on how the rows are cut into micro-batches (or ranks)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64)).eval()
    inputs, labels = torch.randint(2, 64, (3, 8)), torch.randint(2, 64, (3, 8))
    labels[0, 2:] = IGNORE_INDEX  # row 0 has 2 targets, rows 1 and 2 have 8 each
    with torch.no_grad():
        whole = model(inputs, labels=labels, logits=False).loss.item()  # the mean over all 18 targets
    split = evaluate_loss(model, [(inputs[:1], labels[:1]), (inputs[1:], labels[1:])], DistEnv())
    assert split == pytest.approx(whole, rel=1e-5)


def test_validation_does_not_run_the_mtp_modules(monkeypatch):
    """The validation loss is the next-token loss alone: the MTP modules' loss would be thrown away
    (a third of a `small` model's validation forward)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64)).eval()
    assert len(model.mtp_layers)
    inputs, labels = torch.randint(2, 64, (2, 8)), torch.randint(2, 64, (2, 8))
    with torch.no_grad():
        whole = model(inputs, labels=labels, logits=False).loss.double()
    monkeypatch.setattr(model, "mtp_forward", lambda *a, **k: pytest.fail("validation ran an MTP module"))
    assert evaluate_loss(model, [(inputs, labels)], DistEnv()) == whole


def test_pretraining_validates_the_same_windows_under_accumulation(corpus, tmp_path):
    # eval_batches counts batches of batch_size windows: 1 x 4 and 2 x 2 accumulated measure one val set
    runs = {micro: pretrain.train(tiny_config(tmp_path / str(micro), corpus, "max_steps=1", "eval_batches=2",
                                              f"micro_batch_size={micro}")) for micro in (4, 2)}
    val = {micro: [r["val_loss"] for r in read_metrics(path.parent) if "val_loss" in r] for micro, path in runs.items()}
    assert len(val[4]) >= 1 and val[4] == pytest.approx(val[2], rel=1e-6)


def test_batch_plan_errors():
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_plan(TrainConfig(batch_size=6, micro_batch_size=4), 1)
    assert batch_plan(TrainConfig(batch_size=8, micro_batch_size=2), 2) == (2, 2)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def full_run(corpus, tmp_path_factory):
    """8 uninterrupted steps through the CLI, saving at 4 and at the end."""
    out = tmp_path_factory.mktemp("full")
    code = cli_main(["pretrain", "--config", str(TINY), f"out_dir={out}", f"data={json.dumps([str(corpus)])}",
                     f"data_dir={corpus.parent / 'shards'}", "save_every=4", "keep_checkpoints=0",
                     "sample_every=8", "sample_tokens=8"])
    assert code == 0
    return out


def test_cli_run_writes_metrics_and_loadable_checkpoints(full_run):
    records = read_metrics(full_run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "imbalance", "imbalance_per_layer"):
        assert key in steps[0]
    assert len(steps[0]["imbalance_per_layer"]) == 2  # the MoE layer and the (MoE) MTP module
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    unigram = next(r["unigram_val_loss"] for r in records if "unigram_val_loss" in r)
    assert len(vals) == 3 and vals[-1] < vals[0] and unigram > 0
    assert any("sample" in r for r in records)
    assert [p.name for p in list_checkpoints(full_run)] == ["checkpoint-4", "checkpoint-8"]
    assert (full_run / "latest").resolve() == (full_run / "checkpoint-8").resolve()
    assert json.loads((full_run / "run_config.json").read_text())["max_steps"] == 8

    model = nanoseek.load_model(full_run / "latest")
    tok = nanoseek.tokenizer.Tokenizer.from_dir(full_run / "latest")
    assert model.config.vocab_size == tok.vocab_size == 320
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(full_run / "latest").eval()
    ids = torch.tensor([tok.encode("the king speak")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(full_run / "latest")
    # a text prompt gets bos in both, as pretraining stored its documents; the text itself alike
    assert hf_tok("the king").input_ids == tok.encode_prompt("the king") == [tok.bos_id] + tok.encode("the king")
    assert hf_tok("the king", add_special_tokens=False).input_ids == tok.encode("the king")


def test_resume_is_bit_exact(full_run, corpus, tmp_path):
    """Train 8 steps == train 4, stop, resume (a fresh process state) and train to 8."""
    cfg = tiny_config(tmp_path, corpus)
    final = pretrain.train(cfg, resume=full_run / "checkpoint-4")
    assert final.name == "checkpoint-8"
    expected, got = weights(full_run / "checkpoint-8"), weights(final)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bias buffers included
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    assert losses(tmp_path) == losses(full_run)[4:]


def test_a_muon_run_resumes_bit_exactly(corpus, tmp_path):
    """optimizer=muon: 6 steps == 3, stop, resume and 3 more (Muon's momentum is in the checkpoint,
    keyed by parameter name beside AdamW's moments), and the loss falls."""
    muon = ("optimizer=muon", "max_steps=6", "save_every=3", "keep_checkpoints=0", "eval_every=0")
    whole = pretrain.train(tiny_config(tmp_path / "whole", corpus, *muon))
    resumed = pretrain.train(tiny_config(tmp_path / "resumed", corpus, *muon),
                             resume=tmp_path / "whole" / "checkpoint-3")
    expected, got = weights(whole), weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed") if "loss" in r] == losses[3:]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="trained with optimizer=muon.*resume with optimizer=muon"):
        pretrain.train(tiny_config(tmp_path / "adamw", corpus, "max_steps=6"), resume=tmp_path / "whole" / "checkpoint-3")


def test_activation_checkpointing_trains_the_same_run(full_run, corpus, tmp_path, monkeypatch):
    """activation_checkpointing=true recomputes each layer in the backward: resumed at step 4, the
    run ends with the uninterrupted run's weights and losses, bit for bit."""
    import nanoseek.model.decoder as decoder

    calls = []
    monkeypatch.setattr(decoder, "checkpoint", lambda *args, **kwargs: calls.append(1) or
                        torch.utils.checkpoint.checkpoint(*args, **kwargs))
    final = pretrain.train(tiny_config(tmp_path, corpus, "activation_checkpointing=true"),
                           resume=full_run / "checkpoint-4")
    assert calls  # the trainer did turn it on
    expected, got = weights(full_run / "checkpoint-8"), weights(final)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    losses = lambda run: [(r["step"], r["loss"], r["imbalance"]) for r in read_metrics(run) if "loss" in r]
    assert losses(tmp_path) == losses(full_run)[4:]


def test_continued_pretraining_starts_from_init(full_run, corpus, tmp_path):
    # vocab_size and seed differ from the run that made `init`: its tokenizer is used all the same.
    # init names the run directory: its latest checkpoint
    cfg = tiny_config(tmp_path / "more", corpus, f"init={full_run}", "max_steps=1", "save_every=0",
                      "vocab_size=300", "seed=1", f"data_dir={tmp_path / 'shards'}")
    pretrain.train(cfg)
    first_loss = lambda run: next(r["loss"] for r in read_metrics(run) if "loss" in r)
    assert first_loss(tmp_path / "more") < first_loss(full_run) - 0.5  # trained weights, not a fresh model
    init_tokenizer = (full_run / "latest" / "tokenizer.json").read_text()
    assert (tmp_path / "shards" / "tokenizer.json").read_text() == init_tokenizer
    assert (tmp_path / "more" / "latest" / "tokenizer.json").read_text() == init_tokenizer
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        pretrain.train(tiny_config(tmp_path / "y", corpus, f"init={tmp_path}"))


def test_continued_pretraining_reuses_its_runs_shards(full_run, corpus, tmp_path, monkeypatch):
    """init= with data_dir=<its run's data> and the same data and seed: the shards the run made with the
    BPE it trained are the checkpoint tokenizer's, so they are reused, not tokenized again."""
    monkeypatch.setattr(pretrain, "prepare_data", lambda *a, **k: pytest.fail("tokenized the data again"))
    shards = corpus.parent / "shards"
    meta = (shards / "meta.json").read_text()
    pretrain.train(tiny_config(tmp_path / "more", corpus, f"init={full_run / 'latest'}", "max_steps=1",
                               "save_every=0", "eval_every=0"))
    assert (shards / "meta.json").read_text() == meta


def test_a_data_dir_of_an_earlier_version_keeps_its_recipe(full_run, corpus, tmp_path, monkeypatch, capsys):
    """Runs before the recipe moved into meta.json kept it in recipe.json: still recognised (reused
    when it matches), and `data prepare` over such a directory removes it with the old shards."""
    import shutil

    from nanoseek.data.corpus import prepare_data
    from nanoseek.tokenizer import Tokenizer

    old = tmp_path / "old"
    shutil.copytree(corpus.parent / "shards", old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "recipe.json").write_text(json.dumps(meta.pop("recipe")) + "\n")
    (old / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(pretrain, "prepare_data", lambda *a, **k: pytest.fail("tokenized the data again"))
    pretrain.train(tiny_config(tmp_path / "run", corpus, f"data_dir={old}", "max_steps=1", "save_every=0",
                               "eval_every=0"))
    assert "data prepare" not in capsys.readouterr().out  # its own recipe's shards, reused
    prepare_data([corpus], Tokenizer.from_dir(old), old, val_fraction=0.1)
    assert not (old / "recipe.json").exists()


def test_a_data_dir_from_data_prepare_is_trained_on_never_overwritten(full_run, corpus, tmp_path, monkeypatch,
                                                                       capsys):
    """`nanoseek data prepare --out D` then `pretrain data_dir=D`: pretraining re-tokenized the
    default corpus over the user's shards (no recipe of its own there). Now it trains on them as
    they are; with init= they must be the checkpoint tokenizer's."""
    from nanoseek.data.corpus import prepare_data
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    tok = Tokenizer.from_dir(full_run / "latest")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"text": f"row {i} of the user's own data."}) + "\n" for i in range(400)))
    prepare_data([mine], tok, tmp_path / "prepared", val_fraction=0.1)
    train_bin = (tmp_path / "prepared" / "train.bin").read_bytes()
    monkeypatch.setattr(pretrain, "prepare_data", lambda *a, **k: pytest.fail("overwrote the prepared shards"))
    pretrain.train(tiny_config(tmp_path / "run", corpus, f"data_dir={tmp_path / 'prepared'}", "max_steps=1",
                               "save_every=0", "eval_every=0"))
    assert "training on the shards `nanoseek data prepare` wrote" in capsys.readouterr().out
    assert (tmp_path / "prepared" / "train.bin").read_bytes() == train_bin
    other = train_tokenizer(["quite another corpus altogether"] * 20, vocab_size=280)
    prepare_data([mine], other, tmp_path / "other", val_fraction=0.1)
    with pytest.raises(ConfigError, match="tokenized with another tokenizer"):
        pretrain.train(tiny_config(tmp_path / "run2", corpus, f"data_dir={tmp_path / 'other'}",
                                   f"init={full_run / 'latest'}", "max_steps=1"))


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_exactly(full_run, corpus, tmp_path, monkeypatch):
    calls = []

    def interrupt_at_step_3(model, gamma):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers
        return original(model, gamma)

    original = pretrain.update_expert_bias
    handler_before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(pretrain, "update_expert_bias", interrupt_at_step_3)
    assert cli_main(["pretrain", "--config", str(TINY), f"out_dir={tmp_path}", f"data={json.dumps([str(corpus)])}",
                     f"data_dir={corpus.parent / 'shards'}"]) == 130  # the exit status of an interrupted command
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"] and len(calls) == 3
    assert signal.getsignal(signal.SIGINT) == handler_before  # Ctrl-C handler restored
    monkeypatch.setattr(pretrain, "update_expert_bias", original)
    assert cli_main(["pretrain", "--config", str(TINY), "--resume", f"out_dir={tmp_path}",
                     f"data={json.dumps([str(corpus)])}", f"data_dir={corpus.parent / 'shards'}"]) == 0
    expected, got = weights(full_run / "checkpoint-8"), weights(tmp_path / "latest")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 9))


def test_failed_save_leaves_the_previous_checkpoint_intact(corpus, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, corpus, "max_steps=4", "save_every=2")
    real_save = torch.save

    def crash_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            Path(f).write_bytes(b"half a file")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", crash_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        pretrain.train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "latest").resolve().name == "checkpoint-2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    nanoseek.load_model(tmp_path / "latest")
    state = torch.load(tmp_path / "latest" / "trainer_state" / "state.pt", weights_only=True)
    assert state["step"] == 2


def test_sigkill_mid_save_loses_nothing(full_run, corpus, tmp_path):
    """A run killed with SIGKILL (no handler, no cleanup runs) while it writes checkpoint-4 still
    has checkpoint-2 as `latest`; --resume ignores and removes the half-written directory, and the
    resumed run ends bit-exactly where the uninterrupted one did, metrics included."""
    out, saving = tmp_path / "run", tmp_path / "saving"
    args = ["pretrain", "--config", str(TINY), f"out_dir={out}", f"data={json.dumps([str(corpus)])}",
            f"data_dir={corpus.parent / 'shards'}", "save_every=2", "keep_checkpoints=0"]
    pid = os.fork()  # a forked child needs no second interpreter start and torch import
    if pid == 0:  # the training process: its step-4 save stops half-written (weights, no trainer
        try:      # state) and waits to be killed
            real_save_file = nanoseek.checkpoint.save_file

            def save_file(tensors, file, metadata=None):
                real_save_file(tensors, file, metadata=metadata)
                if ".checkpoint-4." in str(file):
                    saving.write_text(str(Path(file).parent))
                    time.sleep(600)

            nanoseek.checkpoint.save_file = save_file
            cli_main(args)
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 120
        while not saving.exists():
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the run ended before its step-4 save"
            assert time.monotonic() < deadline, "the run did not reach its step-4 save"
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    partial = Path(saving.read_text())
    assert partial.is_dir() and (partial / "model.safetensors").is_file()
    assert [p for p in out.iterdir() if p.name.startswith(".")] == [partial]  # one temporary directory
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "latest").resolve().name == "checkpoint-2"

    assert cli_main([*args, "--resume"]) == 0
    assert not partial.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    expected, got = weights(full_run / "checkpoint-8"), weights(out / "latest")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    assert losses(out) == losses(full_run)


def test_partial_saves_are_cleaned_and_a_checkpoint_moved_aside_comes_back(tmp_path):
    """What a kill mid-save can leave: a temporary directory (deleted), and, when it re-saved an
    existing step, that checkpoint moved aside with its replacement unfinished (moved back)."""
    nested = ["..checkpoint-6.tmp-cd34.tmp-ef56", "..checkpoint-6.tmp-cd34.old-77"]  # older versions' save_model
    for name in (".checkpoint-4.tmp-ab12", ".checkpoint-2.old-77", "checkpoint-1", *nested):
        (tmp_path / name).mkdir()
    (tmp_path / ".latest.tmp-77").symlink_to("checkpoint-1")
    removed = checkpointing.remove_partial_saves(tmp_path)
    assert sorted(p.name for p in removed) == sorted([".checkpoint-4.tmp-ab12", ".latest.tmp-77", *nested])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]


def fake_checkpoints(out: Path, *steps: int, latest: int | None = None) -> None:
    for step in steps:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "config.json").write_text("{}")
    if latest is not None:
        checkpointing.point_latest(out, out / f"checkpoint-{latest}")


def test_the_current_checkpoint_is_latest_not_the_highest_step(tmp_path):
    """Resumed from checkpoint-4 of 8, a run saves checkpoint-6: --resume continues from it, and
    pruning keeps it and its line, deleting the abandoned checkpoint-8 first."""
    fake_checkpoints(tmp_path, 2, 4, 6, 8, latest=6)
    assert checkpointing.find_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    checkpointing.prune_checkpoints(tmp_path, tmp_path / "checkpoint-6", keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    fake_checkpoints(tmp_path, 2, latest=2)  # a fresh run in this out_dir (through the API) saved step 2
    checkpointing.prune_checkpoints(tmp_path, tmp_path / "checkpoint-2", keep=1)  # never the one just written
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    (tmp_path / "latest").unlink()
    fake_checkpoints(tmp_path, 5)
    assert checkpointing.find_checkpoint(tmp_path) == tmp_path / "checkpoint-5"  # no `latest`: the highest


def test_a_fresh_run_in_a_used_out_dir_is_a_clear_error(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "prepare_corpus", lambda *a: pytest.fail("prepared data before the check"))
    fake_checkpoints(tmp_path, 8, latest=8)
    assert cli_main(["pretrain", "--config", str(TINY), f"out_dir={tmp_path}", f"data={json.dumps([str(corpus)])}"]) == 2
    err = capsys.readouterr().err
    assert f"out_dir={tmp_path} already holds" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.parametrize("sigterms", [1, 2])
def test_sigterm_on_a_save_step_writes_its_checkpoint_once(sigterms, corpus, tmp_path, monkeypatch):
    # twice: a scheduler signals the whole process group and a parent (the speedrun, torchrun) passes
    # its own on; a repeated SIGTERM must not turn into "stop at once, unsaved" as a second Ctrl-C does
    def terminate_at_step_2(model, gamma):
        if len(steps) == 1:
            for _ in range(sigterms):
                signal.raise_signal(signal.SIGTERM)
        steps.append(1)
        return original(model, gamma)

    def count_writes(out_dir, step, *args, **kwargs):
        writes.append(step)
        return real_write(out_dir, step, *args, **kwargs)

    steps, writes, original, real_write = [], [], pretrain.update_expert_bias, checkpointing.write_checkpoint
    monkeypatch.setattr(pretrain, "update_expert_bias", terminate_at_step_2)
    monkeypatch.setattr(checkpointing, "write_checkpoint", count_writes)
    final = pretrain.train(tiny_config(tmp_path, corpus, "save_every=2", "eval_every=0"))
    assert writes == [2] and final == tmp_path / "checkpoint-2"


def test_resume_errors(corpus, tmp_path):
    cfg = tiny_config(tmp_path, corpus)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        pretrain.train(cfg, resume="latest")
    with pytest.raises(ConfigError, match="unknown config key 'model.hidden_sise'"):
        pretrain.train(tiny_config(tmp_path, corpus, "model.hidden_sise=8"))


def test_bad_model_settings_fail_before_the_data_is_tokenized(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "prepare_corpus", lambda *a: pytest.fail("tokenized the data first"))
    with pytest.raises(ConfigError, match="bad model settings: invalid config field hidden_size='abc'"):
        pretrain.train(tiny_config(tmp_path, corpus, "model.hidden_size=abc", f"data_dir={tmp_path / 'd'}"))


@pytest.mark.parametrize("command, config", [
    ("pretrain", "pretrain_tiny.toml"), ("sft", "sft_tiny.toml"), ("rl", "rl_r1zero_tiny.toml"), ("grm", "grm_tiny.toml"),
])
def test_out_dir_that_is_a_file_is_a_clear_error(command, config, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out, message in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "run", "is inside")):
        assert cli_main([command, "--config", str(ROOT / "configs" / config), f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"error: out_dir={out} {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["preset=huge"], "preset='huge': expected one of tiny"),
    (["val_fraction=0"], r"val_fraction=0.0 must be in \(0, 1\)"),
    (["--resume"], "--resume: no checkpoint in .*; run without --resume to start fresh"),
    (["--resume-from", "nowhere"], "no checkpoint in nowhere"),
])
def test_pretrain_checks_its_settings_before_preparing_data(args, message, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "prepare_corpus", lambda *a: pytest.fail("prepared data before the check"))
    argv = ["pretrain", "--config", str(TINY), f"out_dir={tmp_path / 'run'}", f"data={json.dumps([str(corpus)])}"]
    assert cli_main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_overrides_may_follow_an_option(tmp_path, monkeypatch, capsys):
    """`--resume max_steps=5`: argparse closes the override list at the option; the ones after it
    still count (they used to be an 'unrecognized arguments' usage error)."""
    monkeypatch.setattr(pretrain, "prepare_corpus", lambda *a: pytest.fail("prepared data before the check"))
    assert cli_main(["pretrain", "--config", str(TINY), "max_steps=5", "--resume", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint in {tmp_path / 'run'} to continue from" in err and "unrecognized" not in err
    with pytest.raises(SystemExit):  # anything else left over is still argparse's usage error
        cli_main(["pretrain", "--config", str(TINY), "--resume", "--bogus"])


def test_cli_reports_config_errors(capsys):
    assert cli_main(["pretrain", "--config", str(TINY), "max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'max_stepz'" in err and "max_steps" in err and "Traceback" not in err


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_read_and_resume(tmp_path):
    from nanoseek.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.write({"step": step, "loss": 1.0 / step})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # killed in the middle of a write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    logger.truncate_after(2)  # a resume from checkpoint-2
    logger.write({"step": 3, "loss": 0.3})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_a_stop_signal_is_announced_by_rank_0_alone(rank, lines, monkeypatch, capsys):
    from nanoseek.train.trainer import _StopSignal

    monkeypatch.setenv("RANK", rank)  # torchrun signals every rank; one of them says so
    stop = _StopSignal()
    stop._handle(signal.SIGTERM, None)
    assert stop.requested and capsys.readouterr().err.count("finishing this step") == lines


def test_other_ranks_wait_for_rank_0s_data_outside_the_barrier(corpus, tmp_path):
    # rank 1 must not read data_dir before rank 0 has written it, and waits for it without a
    # collective (whose timeout a large corpus's tokenization could outlast); no process group here
    cfg = tiny_config(tmp_path / "run", corpus, f"data_dir={tmp_path / 'data'}")
    other = {}
    rank_1 = threading.Thread(target=lambda: other.update(result=pretrain.prepare_corpus(cfg, DistEnv(rank=1, world_size=2))))
    rank_1.start()
    tokenizer, data_dir = pretrain.prepare_corpus(cfg, DistEnv())
    rank_1.join(timeout=60)
    assert not rank_1.is_alive() and other["result"][1] == data_dir
    assert other["result"][0].tk.get_vocab() == tokenizer.tk.get_vocab()
