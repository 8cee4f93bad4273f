"""SFT: the exact loss mask (chat and prompt/completion), packing seams, token-mean normalisation
under accumulation, logit distillation, and bit-exact resume of a packed, accumulated run."""

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import read_tensors
from nanoseek.cli import main as cli_main
from nanoseek.errors import NanoseekError
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import IGNORE_INDEX, Transformer
from nanoseek.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer, train_tokenizer
from nanoseek.train import sft
from nanoseek.train.config import load_run_config
from nanoseek.train.metrics import read_metrics
from nanoseek.train.sft import Example, SFTConfig, collate, forward_kl, pack, tokenize_messages

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread")


def conversation(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"<think> {a} + {b} = {a + b}. </think> <answer>{a + b}</answer>"}]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [json.dumps(conversation(rng)) + " You are terse. And then? Sure." for _ in range(200)]
    return train_tokenizer(texts, 320)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sft")
    tok.save(d / "tok")
    rng = random.Random(1)
    rows = [{"messages": conversation(rng)} for _ in range(40)]
    rows += [{"prompt": f"Q: {i} + 1 = ?\nA: <think>", "completion": f" {i} + 1 = {i + 1}. </think> {i + 1}"}
             for i in range(20)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_loss_mask_is_exactly_the_assistant_content_and_its_eos(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "<think> 2 + 3 = 5. </think> 5"},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Sure."}]
    ids, mask = tokenize_messages(messages, tok)
    # the same conversation built by hand, piece by piece, each piece's tokens marked
    pieces = [(BOS + "You are terse." + USER + "What is 2 + 3?" + ASSISTANT, False),
              ("<think> 2 + 3 = 5. </think> 5" + EOS, True),
              (USER + "And then?" + ASSISTANT, False),
              ("Sure." + EOS, True)]
    want_ids = [t for text, _ in pieces for t in tok.encode(text)]
    want_mask = [m for text, m in pieces for _ in tok.encode(text)]
    assert ids == want_ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert mask == want_mask
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "<think> 2 + 3 = 5. </think> 5" + EOS + "Sure." + EOS


def test_prompt_completion_and_text_masks_and_row_errors(tok, tmp_path):
    ids, mask = sft.tokenize_prompt_completion("Q: 1 + 1 = ?\nA: <think>", " 2 </think> 2", tok)
    n = len(tok.encode("Q: 1 + 1 = ?\nA: <think>")) + 1  # + bos
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert mask == [False] * n + [True] * (len(ids) - n)
    assert tok.decode(ids[n:]) == " 2 </think> 2" + EOS
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "2 + 2 = 4"}) + "\n")
    [example], _ = sft.load_examples([str(text)], tok, "auto", 100)
    assert example.ids == [tok.bos_id] + tok.encode("2 + 2 = 4") + [tok.eos_id]
    assert example.mask == [False] + [True] * (len(example.ids) - 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(NanoseekError, match=r"bad.jsonl:1: .*assistant turn"):
        sft.load_examples([str(bad)], tok, "auto", 100)
    for line, says in (("[1, 2]", "not an SFT example: a JSON list, not an object"),
                       ('{"text": "a\tb', "not valid JSON \\(Invalid control character at column 12\\)")):
        bad.write_text(line + "\n")
        with pytest.raises(NanoseekError, match=f"bad.jsonl:1: {says}"):
            sft.load_examples([str(bad)], tok, "auto", 100)


def test_packing_keeps_examples_whole_and_takes_no_loss_across_seams():
    a = Example([0, 10, 11, 12, 1], [False, False, True, True, True], "a")
    b = Example([0, 20, 21, 1], [False, False, True, True], "b")
    c = Example([0, 30, 31, 32, 33, 1], [False, False, False, True, True, True], "c")
    rows = pack([a, b, c], row_len=10, packing=True)
    assert [r.ids for r in rows] == [[0, 10, 11, 12, 1, 0, 20, 21, 1], [0, 30, 31, 32, 33, 1]]
    inputs, labels, real = collate(rows, pad_id=2)
    I = IGNORE_INDEX
    assert inputs.tolist() == [[0, 10, 11, 12, 1, 0, 20, 21], [0, 30, 31, 32, 33, 2, 2, 2]]
    # a target only where the *next* token is trained: never the next example's bos
    assert labels.tolist() == [[I, 11, 12, 1, I, I, 21, 1], [I, I, 32, 33, 1, I, I, I]]
    assert real.tolist() == [[True] * 8, [True] * 5 + [False] * 3]  # the padding, though pad_id is a token too
    assert len(pack([a, b, c], row_len=10, packing=False)) == 3


def test_padding_counts_in_no_expert_load_or_balance_loss():
    """A padded batch with its token mask counts exactly the expert load and balance loss of its
    rows run one by one without padding (the pads are routed, they would otherwise count: 20 pads
    per row swing the load of a couple of experts and flip the bias update), main layer and MTP."""
    torch.manual_seed(0)
    model = Transformer(nanoseek.config.preset("tiny", vocab_size=64, aux_loss_alpha=0.01)).train()
    rows = [Example([0] + list(range(5, 15)) + [1], [False] * 3 + [True] * 9, "a"),
            Example([0] + list(range(20, 26)) + [1], [False] * 3 + [True] * 5, "b")]
    moes = [m for m in model.modules() if isinstance(m, MoE)]

    def load_and_balance(inputs, labels, real=None):
        for moe in moes:
            moe.tokens_per_expert.zero_()
        aux = model(inputs, labels=labels, token_mask=real).aux_loss
        return [moe.tokens_per_expert.clone() for moe in moes], aux

    alone = [load_and_balance(*collate([row], pad_id=2)[:2]) for row in rows]
    want_load = [sum(loads) for loads in zip(*(load for load, _ in alone))]
    want_aux = sum(aux for _, aux in alone) / len(rows)  # the balance loss is a mean over sequences
    inputs, labels, real = collate(rows, pad_id=2)
    I = IGNORE_INDEX
    for extra in (0, 20):  # padded to the longest row, then 20 more pads each
        padded = [torch.cat([t, torch.full((2, extra), v, dtype=t.dtype)], 1)
                  for t, v in ((inputs, 2), (labels, I), (real, False))]
        load, aux = load_and_balance(*padded)
        assert all(torch.equal(a, b) for a, b in zip(load, want_load))
        torch.testing.assert_close(aux, want_aux)
    assert [float(sum(load)) for load in want_load] == [2 * (11 + 7), 2 * (10 + 6)]  # K=2 per real token


def test_forward_kl_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.tensor([[5, IGNORE_INDEX, 1], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    p = t.softmax(-1)
    want = (p * (p.log() - s.log_softmax(-1))).sum(-1)[labels != IGNORE_INDEX].sum()
    torch.testing.assert_close(forward_kl(s, t, labels), want)
    assert forward_kl(s, s, labels).abs() < 1e-6


def config(data_dir, out_dir, *overrides) -> SFTConfig:
    return load_run_config(SFTConfig, None, [
        "init=student-tiny", f"tokenizer={data_dir / 'tok'}", f"data={data_dir / 'data.jsonl'}", f"out_dir={out_dir}",
        "seq_len=64", "batch_size=4", "micro_batch_size=2", "lr=3e-3", "warmup_steps=2", "val_fraction=0.1",
        "eval_every=3", "eval_batches=2", "tensorboard=false", "threads=1", "keep_checkpoints=0", *overrides])


def test_accumulation_gives_the_token_mean_of_the_whole_step(data_dir, tmp_path):
    """One step of 4 rows as 2 micro-batches of 2 equals one micro-batch of 4: each target token
    weighs the same however the rows are split (the micro-batches hold different target counts)."""
    sft.train(config(data_dir, tmp_path / "a", "max_steps=1", "micro_batch_size=2"))
    sft.train(config(data_dir, tmp_path / "b", "max_steps=1", "micro_batch_size=4"))
    a, b = read_tensors(tmp_path / "a" / "checkpoint-1"), read_tensors(tmp_path / "b" / "checkpoint-1")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    # and the validation covers the same eval_batches x batch_size rows, not eval_batches micro-batches
    val = [[r["val_loss"] for r in read_metrics(tmp_path / run) if "val_loss" in r] for run in "ab"]
    assert len(val[0]) == len(val[1]) >= 1 and val[0] == pytest.approx(val[1], rel=1e-6)


def test_max_steps_on_the_command_line_wins_over_the_recipes_epochs(data_dir, tmp_path):
    """A recipe with `epochs = 3` (about 30 steps here) and `max_steps=2` on the command line: 2 steps,
    as every override wins over the file. The recipe alone still trains its epochs."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("epochs = 3.0\n")
    common = ["sft", "--config", str(recipe), "init=student-tiny", f"tokenizer={data_dir / 'tok'}",
              f"data={data_dir / 'data.jsonl'}", "seq_len=64", "batch_size=4", "val_fraction=0.1", "eval_every=0",
              "save_every=0", "tensorboard=false", "threads=1"]
    assert cli_main([*common, f"out_dir={tmp_path / 'steps'}", "max_steps=2"]) == 0
    assert (tmp_path / "steps" / "checkpoint-2").is_dir() and not (tmp_path / "steps" / "checkpoint-3").exists()
    cfg = load_run_config(SFTConfig, recipe, sft.steps_given_win(["lr=1e-3"]))
    assert cfg.epochs == 3.0  # no max_steps given: the recipe's epochs stand
    assert load_run_config(SFTConfig, recipe, sft.steps_given_win(["max_steps=2", "epochs=1"])).epochs == 1.0


def test_resume_is_bit_exact(data_dir, tmp_path):
    """12 steps straight == 4 steps, stop, resume to 12, with gradient accumulation. The resumed
    stretch crosses an epoch boundary (the data packs into 39 rows, 4 per step): reshuffle and repack."""
    full = config(data_dir, tmp_path / "full", "max_steps=12", "save_every=4")
    sft.train(full)
    cli_main(["sft", "--resume-from", str(tmp_path / "full" / "checkpoint-4"), "init=student-tiny",
              f"tokenizer={data_dir / 'tok'}", f"data={data_dir / 'data.jsonl'}", f"out_dir={tmp_path / 'resumed'}",
              "seq_len=64", "batch_size=4", "micro_batch_size=2", "lr=3e-3", "warmup_steps=2", "val_fraction=0.1",
              "eval_every=3", "eval_batches=2", "tensorboard=false", "threads=1", "keep_checkpoints=0",
              "max_steps=12", "save_every=4"])
    a = read_tensors(tmp_path / "full" / "checkpoint-12")
    b = read_tensors(tmp_path / "resumed" / "checkpoint-12")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "full" / "checkpoint-12" / "trainer_state" / "state.pt", weights_only=True)
    assert state["loader"]["epoch"] >= 1  # the resumed stretch really crossed into a new epoch


def test_resuming_another_stages_run_is_a_clear_error(data_dir, tmp_path, capsys):
    """`nanoseek rl --resume` / `pretrain --resume` on an SFT run's directory: one line naming the stage
    that wrote it, exit 2, before any work. (rl resumed it silently, carrying SFT's step and optimizer
    into RL; pretrain failed on embedding shapes after preparing its data; sft on a pretrain run's
    directory died of a KeyError in the loader's state.)"""
    run = tmp_path / "sft"
    sft.train(config(data_dir, run, "max_steps=1"))
    cases = [["rl", f"init={run}", "task=digit_sum"],
             ["pretrain", "--config", str(Path(__file__).parents[1] / "configs" / "pretrain_tiny.toml")]]
    for argv in cases:
        assert cli_main([argv[0], "--resume", *argv[1:], f"out_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert "saved by `nanoseek sft`" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # distill trains with SFT's config: its runs are SFT runs and continue as such
    from nanoseek.train.checkpointing import check_stage
    from nanoseek.train.distill import DistillConfig

    state = torch.load(run / "checkpoint-1" / "trainer_state" / "state.pt", weights_only=True)
    check_stage(state, DistillConfig, run / "checkpoint-1")


def test_a_damaged_trainer_state_is_a_clear_error_naming_the_checkpoint_before_it(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    sft.train(config(data_dir, run, "max_steps=2", "save_every=1"))
    state = run / "checkpoint-2" / "trainer_state" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    argv = ["sft", "--resume", "init=student-tiny", f"tokenizer={data_dir / 'tok'}", f"data={data_dir / 'data.jsonl'}",
            f"out_dir={run}", "max_steps=3"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{state} is damaged and cannot be resumed" in err and f"--resume-from {run / 'checkpoint-1'}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_resuming_with_changed_settings_says_which(data_dir, tmp_path, capsys):
    """A resume may change settings (extend max_steps, lower lr), but the run then differs from the
    saved one's: the changes are printed, not silently taken (out_dir aside)."""
    sft.train(config(data_dir, tmp_path / "a", "max_steps=1"))
    capsys.readouterr()
    sft.train(config(data_dir, tmp_path / "b", "max_steps=2", "seed=3"), resume=tmp_path / "a" / "checkpoint-1")
    assert "differ from the checkpoint's run: seed 0 -> 3, max_steps 1 -> 2\n" in capsys.readouterr().out


def test_sft_has_the_edges_every_stage_shares(data_dir, tmp_path, monkeypatch, capsys):
    """Where the stages had drifted apart before they shared train/stage.py: Ctrl-C saves and exits
    130 (pretrain's status), the Ctrl-C handler is given back however the loop ends, and an
    unknown model.* key is a clear error (it was a TypeError traceback)."""
    args = ["sft", "init=student-tiny", f"tokenizer={data_dir / 'tok'}", f"data={data_dir / 'data.jsonl'}",
            "seq_len=64", "batch_size=4", "val_fraction=0.1", "eval_every=0", "tensorboard=false", "threads=1"]
    handler_before = signal.getsignal(signal.SIGINT)
    calls = []

    def interrupt_at_step_2(model, gamma):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers
        return []

    monkeypatch.setattr(sft, "update_expert_bias", interrupt_at_step_2)
    assert cli_main([*args, f"out_dir={tmp_path / 'stopped'}", "max_steps=5"]) == 130
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) == handler_before

    def fail(model, gamma):
        raise RuntimeError("boom")

    monkeypatch.setattr(sft, "update_expert_bias", fail)
    with pytest.raises(RuntimeError, match="boom"):
        cli_main([*args, f"out_dir={tmp_path / 'failed'}", "max_steps=5"])
    assert signal.getsignal(signal.SIGINT) == handler_before

    capsys.readouterr()
    assert cli_main([*args, f"out_dir={tmp_path / 'typo'}", "model.hidden_sise=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.hidden_sise'" in err and "hidden_size" in err and "Traceback" not in err


def test_sft_fine_tunes_a_deepseek_checkpoint_with_logit_distillation(data_dir, tmp_path):
    """Cold-start style: a DeepSeek-V3 (MoE + MTP) checkpoint fine-tuned, distilling a teacher's logits."""
    tok = nanoseek.tokenizer.Tokenizer.from_dir(data_dir / "tok")
    teacher = Transformer(nanoseek.config.preset("tiny", vocab_size=tok.vocab_size))
    nanoseek.save_model(teacher, tmp_path / "teacher", tokenizer=tok)
    path = sft.train(config(data_dir, tmp_path / "run", "max_steps=2", f"init={tmp_path / 'teacher'}", "tokenizer=",
                            f"teacher={tmp_path / 'teacher'}", "kd_weight=0.5", "mtp_lambda=0.3"))
    model = nanoseek.load_model(path)
    assert isinstance(model, Transformer) and model.config.num_nextn_predict_layers == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "kl" in r)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # the student starts as the teacher
    assert "mtp_loss" in first


def test_the_mtp_loss_reads_the_prompt_tokens_the_loss_mask_hides():
    """The MTP module at position i reads token i+1 (depth 1). SFT's labels hide the prompt tokens
    (IGNORE_INDEX), and the MTP loss once read them from the labels, so every prompt token it saw
    was id 0: its loss on the completion must be the one computed from the true tokens."""
    torch.manual_seed(0)
    model = Transformer(nanoseek.config.preset("tiny", vocab_size=64)).eval()
    ids = [0] + list(range(5, 15)) + [1]
    inputs, labels, _ = collate([Example(ids, [False] * 6 + [True] * 6, "a")], pad_id=2)
    with torch.no_grad():
        out = model(inputs, labels=labels)
        T = inputs.shape[1]
        _, logits = model.mtp_forward(0, out.hidden[:, :-1], inputs[:, 1:], torch.arange(T - 1)[None])
        want = torch.nn.functional.cross_entropy(logits[0], labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.mtp_loss, want)


def test_sft_counts_only_the_real_tokens_in_the_expert_load(data_dir, tmp_path, monkeypatch):
    """One row per example (padded batches) of a DeepSeek-V3 model: the load the bias update sees
    is K experts per real token of the step, not per padded position."""
    tok = nanoseek.tokenizer.Tokenizer.from_dir(data_dir / "tok")
    torch.manual_seed(0)
    nanoseek.save_model(Transformer(nanoseek.config.preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "v3",
                        tokenizer=tok)
    real_tokens, pads, loads = [], [], []
    collate_rows, update = sft.collate, sft.update_expert_bias

    def recording_collate(rows, pad_id):
        batch = collate_rows(rows, pad_id)
        real_tokens.append(int(batch[2].sum()))
        pads.append(int((~batch[2]).sum()))
        return batch

    def recording_update(model, gamma):
        main_moe = next(m for m in model.modules() if isinstance(m, MoE))  # layer 1's (layer 0 is dense)
        loads.append(float(sum(main_moe.tokens_per_expert)))
        return update(model, gamma)

    monkeypatch.setattr(sft, "collate", recording_collate)
    monkeypatch.setattr(sft, "update_expert_bias", recording_update)
    sft.train(config(data_dir, tmp_path / "run", "max_steps=1", f"init={tmp_path / 'v3'}", "tokenizer=",
                     "packing=false", "val_fraction=0"))
    assert len(real_tokens) == 2 and sum(pads) > 0  # 2 micro-batches, rows of different lengths
    assert loads == [2 * sum(real_tokens)]  # top-2 routing


def test_the_mtp_loss_is_a_token_mean_of_the_whole_step_too(data_dir, tmp_path):
    """A DeepSeek-V3 model with mtp_lambda > 0: one step of 4 rows as 2 micro-batches of 2 has the
    gradient of one micro-batch of 4 (the MTP loss was a mean of micro-batch means). Compared by
    the step's gradient norm and MTP loss: Adam's first update, about lr x sign(grad), would blow a
    rounding difference of a near-zero gradient up to lr."""
    tok = nanoseek.tokenizer.Tokenizer.from_dir(data_dir / "tok")
    torch.manual_seed(0)
    nanoseek.save_model(Transformer(nanoseek.config.preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "v3",
                        tokenizer=tok)
    common = ["max_steps=1", f"init={tmp_path / 'v3'}", "tokenizer=", "mtp_lambda=1", "val_fraction=0"]
    steps = []
    for micro in (2, 4):
        sft.train(config(data_dir, tmp_path / str(micro), *common, f"micro_batch_size={micro}"))
        steps.append(next(r for r in read_metrics(tmp_path / str(micro)) if "grad_norm" in r))
    assert steps[0]["grad_norm"] == pytest.approx(steps[1]["grad_norm"], rel=1e-6)
    assert steps[0]["mtp_loss"] == pytest.approx(steps[1]["mtp_loss"], rel=1e-6)


def test_an_untrained_mtp_module_keeps_its_routing_bias(data_dir, tmp_path, monkeypatch):
    """mtp_lambda = 0 leaves the MTP module as it is: frozen weights and, since its load is not
    what the run balances, its expert bias too (the bias update moved it by gamma a step). Nor is
    it run: its loss, unused, cost a third of a small V3's step."""
    tok = nanoseek.tokenizer.Tokenizer.from_dir(data_dir / "tok")
    torch.manual_seed(0)
    nanoseek.save_model(Transformer(nanoseek.config.preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "v3",
                        tokenizer=tok)
    monkeypatch.setattr(Transformer, "_mtp_loss", lambda *a, **k: pytest.fail("ran the untrained MTP module"))
    path = sft.train(config(data_dir, tmp_path / "run", "max_steps=2", f"init={tmp_path / 'v3'}", "tokenizer=",
                            "mtp_lambda=0", "val_fraction=0"))
    before, after = read_tensors(tmp_path / "v3"), read_tensors(path)
    mtp = [k for k in before if k.startswith("model.layers.2.") and "embed_tokens" not in k and "head.weight" not in k]
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in mtp  # the MTP module's MoE router
    assert all(torch.equal(before[k], after[k]) for k in mtp)  # (its embedding and head are the trained shared ones)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"  # the main MoE layer's is balanced as before
    assert (after[bias] - before[bias]).abs().max() == pytest.approx(2e-3)


def test_student_checkpoint_is_a_llama_directory(data_dir, tmp_path):
    path = sft.train(config(data_dir, tmp_path / "run", "max_steps=1", "val_fraction=0"))
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert isinstance(nanoseek.load_model(path), DenseTransformer)
    assert (path / "tokenizer.json").is_file() and (path / "trainer_state" / "state.pt").is_file()


def test_packed_rows_train_each_example_as_if_alone():
    """Packing changes nothing but speed: with the documents the bos tokens mark, a packed row's
    per-token losses are those of its examples run one per row (dense student and DeepSeek model)."""
    torch.manual_seed(0)
    examples = [Example([0] + torch.randint(3, 60, (n,)).tolist() + [1], [False] + [True] * (n + 1), str(n))
                for n in (6, 9, 4)]
    rows = pack(examples, row_len=64, packing=True)
    assert len(rows) == 1
    row = torch.tensor([rows[0].ids])
    for model in (DenseTransformer(nanoseek.model.dense.dense_preset("student-tiny", vocab_size=64)),
                  Transformer(nanoseek.config.preset("tiny", vocab_size=64))):
        model.eval()
        with torch.no_grad():
            logits = model(row, documents=sft.documents_of(row, bos_id=0)).logits[0]
            alone = torch.cat([model(torch.tensor([ex.ids])).logits[0] for ex in examples])
            crossing = model(row).logits[0]
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
        assert (crossing - alone).abs().max() > 1e-3  # without the documents, examples see each other


def test_the_loader_resumes_under_another_world_size_with_the_same_global_batch():
    """2 ranks x micro 2 stop after 4 micro-batches each; 1 rank x micro 4 serves the next rows of
    the same epoch. Another global batch would cut the epochs elsewhere: a clear error."""
    examples = [Example([1] + [10 + i] * 5 + [2], [False] + [True] * 6, str(i)) for i in range(40)]
    make = lambda micro, rank, world: sft.PackedLoader(examples, 8, micro, 0, False, rank, world)  # noqa: E731
    ranks, alone = [make(2, r, 2) for r in range(2)], make(4, 0, 1)
    seen = {int(t) for _ in range(4) for loader in ranks for t in next(loader)[0][:, 1]}
    served = {int(t) for _ in range(4) for t in next(alone)[0][:, 1]}
    resumed = make(4, 0, 1)
    resumed.load_state_dict(ranks[0].state_dict())
    assert {int(t) for t in next(resumed)[0][:, 1]} == {int(t) for t in next(alone)[0][:, 1]}
    assert seen == served and len(seen) == 16
    with pytest.raises(NanoseekError, match="rows per micro-batch over all ranks"):
        make(2, 0, 1).load_state_dict(ranks[0].state_dict())


def test_packing_leaves_the_training_loss_unchanged(data_dir, tmp_path):
    """SFT passes the documents to the model: one step over every training example gives the same
    loss packed (several examples per row) as one example per row."""
    tokenizer = Tokenizer.from_dir(data_dir / "tok")
    examples, _ = sft.load_examples([str(data_dir / "data.jsonl")], tokenizer, "auto", 65)
    train, _ = sft.split_examples(examples, 0.1, seed=0)
    losses, rows = {}, {}
    for packing in (True, False):
        rows[packing] = sft.PackedLoader(train, 65, 1, tokenizer.pad_id, packing, seed=0).rows_per_epoch
        out = tmp_path / str(packing)
        sft.train(config(data_dir, out, "max_steps=1", f"packing={str(packing).lower()}",
                         f"batch_size={rows[packing]}", f"micro_batch_size={rows[packing]}"))
        losses[packing] = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"loss"' in line][0]["loss"]
    assert rows[True] < rows[False] == len(train)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
