"""DeepSeek-GRM: the judgment format, voting, the meta RM's selection, the +1/-1 rule, the data
builder, the judge API and CLI, the recipe end to end (tiny), eval --rerank and the grm reward."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import read_tensors
from nanoseek.cli import main
from nanoseek.data.tasks import split_of
from nanoseek.errors import NanoseekError
from nanoseek.grm import (GRM, Judgment, format_judgment, judge_prompt, judgment_correct, meta_select,
                          parse_judgment, pick_best, rule_reward, strictly_best, summed_scores)
from nanoseek.train.checkpointing import find_checkpoint
from nanoseek.train.grm import Item, build_items, program_judgment, verdict_of

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "grm_tiny.toml"

Q = "3815920471"


def chain_of(q: str) -> str:
    total, out = 0, ""
    for d in q:
        total = (total + int(d)) % 10
        out += str(total)
    return out


# ---------------------------------------------------------------- parsing


def test_parse_good_judgment():
    text = " work 7 form 3\nC: [1] ok [2] none\n\\boxed{10, 6}"
    principles, critique, scores = parse_judgment(text, 2)
    assert principles == [("work", 7), ("form", 3)]
    assert critique == "[1] ok [2] none"
    assert scores == [10, 6]
    assert format_judgment([("work", 7), ("form", 3)], ["ok", "none"], [10, 6]) == text


def test_parse_malformed_and_clamped():
    assert parse_judgment(" work 7\nC: [1] ok", 2)[2] is None  # cut off before the boxed line
    assert parse_judgment("\\boxed{10}", 2)[2] is None  # wrong count
    assert parse_judgment("\\boxed{10, x}", 2)[2] is None  # not integers
    assert parse_judgment("\\boxed{1, 2} then \\boxed{0, 99}", 2)[2] == [1, 10]  # the last box, clamped
    assert parse_judgment("", 1)[2] is None


def test_single_response_uses_the_same_format():
    prompt = judge_prompt(Q, ["x"])
    assert prompt == f"Judge: {Q}\n[1] x\nP:"
    assert parse_judgment(" work 6 form 4\nC: [1] none\n\\boxed{6}", 1)[2] == [6]
    assert judgment_correct([6], -1, label=1) and not judgment_correct([5], -1, label=1)
    assert judgment_correct([5], -1, label=0)
    with pytest.raises(NanoseekError):
        judge_prompt(Q, [])


# ---------------------------------------------------------------- voting, ties, meta RM, reward


def test_voting_sums_parsed_judgments_and_ties_miss():
    js = [Judgment("a", scores=[8, 3]), Judgment("b", scores=[3, 9]), Judgment("c", scores=None),
          Judgment("d", scores=[7, 5])]
    assert summed_scores(js, 2) == [18, 17]
    assert strictly_best([18, 17]) == 0
    assert strictly_best([9, 9, 1]) is None  # a tie for the top is a miss
    assert not judgment_correct([9, 9], 0) and judgment_correct([9, 8], 0) and not judgment_correct(None, 0)
    picks = {pick_best([5, 5, 1], seed) for seed in range(30)}
    assert picks == {0, 1}  # ties broken at random, never to a lower score
    assert pick_best([5, 5, 1], 7) == pick_best([5, 5, 1], 7)  # with a seed


def test_meta_select_keeps_the_top_k():
    js = [Judgment(str(i), scores=[i, 0]) for i in range(6)]
    kept = meta_select(js, [0.1, 0.9, 0.5, 0.2, 0.8, 0.0], 3)
    assert [j.text for j in kept] == ["1", "2", "4"]
    assert [j.text for j in meta_select(js, [1.0] * 6, 2)] == ["0", "1"]  # ties: earlier samples
    js[1].scores = None  # rated highest, but it did not parse: it would be a vote left out
    assert [j.text for j in meta_select(js, [0.1, 0.9, 0.5, 0.2, 0.8, 0.0], 3)] == ["2", "3", "4"]


def test_rule_reward_plus_minus_one():
    assert rule_reward([9, 2], 0) == 1.0
    assert rule_reward([2, 9], 0) == -1.0
    assert rule_reward([9, 9], 0) == -1.0
    assert rule_reward(None, 0) == -1.0
    assert rule_reward([8], -1, label=1) == 1.0 and rule_reward([8], -1, label=0) == -1.0


# ---------------------------------------------------------------- data and the program's critique


def test_verdicts_read_only_the_response():
    ok = f" sums {chain_of(Q)} </think> <answer>{chain_of(Q)[-1]}</answer>"
    assert verdict_of(Q, ok) == "ok"
    wrong_step = " sums " + chain_of(Q)[:4] + "0" + chain_of(Q)[5:] + f" </think> <answer>{chain_of(Q)[-1]}</answer>"
    assert verdict_of(Q, wrong_step) == "bad"
    assert verdict_of(Q, f" sums {chain_of(Q)} </think> <answer>5</answer>") in ("bad", "ok")
    assert verdict_of(Q, " </think> <answer>7</answer>") == "none"
    assert verdict_of(Q, " sums 12") == "void"
    item = Item(Q, [" </think> <answer>7</answer>", ok], 1)
    principles, critique, scores = parse_judgment(program_judgment(item, random.Random(0)), 2)
    assert critique == "[1] none [2] ok" and scores[1] == 10 and scores[0] < 10
    assert sum(w for _, w in principles) == 10


def test_items_have_exactly_one_right_response():
    rng = random.Random(0)
    samples = ["r1", "w1", "w2", "w3", "r2"]
    labels = [1, 0, 0, 0, 1]
    for kind in ("pair", "group"):
        for _ in range(20):
            item = build_items(Q, samples, labels, kind, 4, rng)
            right = [r for r in item.responses if r.startswith("r")]
            assert len(right) == 1 and item.responses[item.best] == right[0]
            assert len(item.responses) == (2 if kind == "pair" else 4)
    assert build_items(Q, ["w1", "w2"], [0, 0], "pair", 4, rng) is None
    assert build_items(Q, ["r1", "w1"], [1, 0], "group", 4, rng) is None  # too few wrong ones
    single = build_items(Q, samples, labels, "single", 4, rng)
    assert len(single.responses) == 1 and single.label in (0, 1)


# ---------------------------------------------------------------- the judge on a tiny model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny model pretrained for seconds on 4-digit digit_sum documents: it writes the answer
    format (sometimes a chain), so its samples make items with right and wrong responses."""
    from nanoseek.train.pretrain import PretrainConfig
    from nanoseek.train.pretrain import train as pretrain

    out = tmp_path_factory.mktemp("grm") / "base"
    return pretrain(PretrainConfig(
        out_dir=str(out), preset="tiny", data=["synthetic:digit_sum?documents=2000&worked_share=0.3&length=4"],
        vocab_size=300, val_fraction=0.02, batch_size=8, seq_len=64, max_steps=40, lr=1e-2, warmup_steps=5,
        eval_every=0, eval_batches=1, log_every=40, tensorboard=False, threads=1,
        model={"initializer_range": 0.08, "max_position_embeddings": 256}))


def test_the_default_judge_length_holds_a_judgment_of_four_responses(base):
    """`nanoseek judge` samples GRM's default max_tokens: a group of 4 responses must fit, \\boxed{} line
    included (64 tokens cut it short, so every judgment of a group failed to parse)."""
    from nanoseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(base)
    text = format_judgment([("work", 10), ("form", 10)], ["void", "bad", "none", "ok"], [10, 10, 10, 10])
    assert len(tokenizer.encode(text)) <= GRM.__init__.__kwdefaults__["max_tokens"]
    assert parse_judgment(text, 4)[2] == [10, 10, 10, 10]


def test_judge_api_on_a_tiny_model(base):
    grm = GRM(base, max_tokens=12)
    v = grm.judge(Q, ["a", "b", "c"], k=4, seed=3)
    assert len(v.scores) == 3 and len(v.samples) == 4 and 0 <= v.best < 3
    assert 0.0 <= v.parse_rate <= 1.0  # an untrained judge rarely parses: counted, never raised
    assert v.kept == [0, 1, 2, 3]
    assert sorted(v.samples[0].order) == [0, 1, 2]
    assert len({tuple(j.order) for j in v.samples}) > 1  # shuffled per sample
    again = grm.judge(Q, ["a", "b", "c"], k=4, seed=3)
    assert [j.text for j in again.samples] == [j.text for j in v.samples]  # seeded
    assert len(grm.judge(Q, "only one", k=2).scores) == 1
    with pytest.raises(NanoseekError, match="meta RM"):
        grm.judge(Q, ["a", "b"], k=2, meta=True)


def test_recipe_end_to_end_then_judge_eval_and_rl(base, tmp_path, capsys):
    out = tmp_path / "grm"
    assert main(["grm", "--config", str(TINY), f"init={base}", f"out_dir={out}"]) == 0
    report = json.loads((out / "grm_report.json").read_text())
    for key in ("parse_rate", "voting", "meta", "single_sample", "ablations", "best_of_n", "seconds"):
        assert key in report, key
    assert set(report["voting"]) == {"1", "2", "4"} and set(report["meta"]) == {"2", "4"}
    assert {"no_principles@2", "bt_scalar_rm", "solve_and_compare"} <= set(report["ablations"])
    assert {"policy_pass1", "maj@8", "grm@8"} <= set(report["best_of_n"])
    assert set(report["seconds"]) == {"data", "cold_start", "ablations", "rft", "rl", "best_of_n", "meta", "evaluate"}
    # the ablations and best-of-N ran in second processes beside the main line: the wall total counts
    # only the main line's wait for them
    assert set(report["beside"]) == {"ablations", "best_of_n"} and (out / "best_of_n.log").is_file()
    main_line = sum(t for step, t in report["seconds"].items() if step not in report["beside"])
    assert report["total_seconds"] == pytest.approx(main_line + sum(report["beside"].values()))
    assert (out / "grm_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "latest" / "config.json").is_file() and (out / "meta" / "score_head.safetensors").is_file()

    # no eval-split question in training
    train_items = [json.loads(line) for line in (out / "data" / "items_train.jsonl").read_text().splitlines()]
    eval_items = [json.loads(line) for line in (out / "data" / "items_eval.jsonl").read_text().splitlines()]
    assert train_items and eval_items
    assert all(split_of(i["question"]) == "train" for i in train_items)
    assert all(split_of(i["question"]) == "eval" for i in eval_items)

    # a re-run skips every finished step
    capsys.readouterr()
    assert main(["grm", "--config", str(TINY), f"init={base}", f"out_dir={out}"]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 8

    # in line (beside=false) the ablations retrain to the same bits and give the same numbers, as best-of-N does
    inline = tmp_path / "inline"
    shutil.copytree(out, inline, symlinks=True,
                    ignore=shutil.ignore_patterns("no_principles", "bt", "ablations.*", "best_of_n.*"))
    timings = json.loads((inline / "timings.json").read_text())
    del timings["ablations"], timings["best_of_n"]
    (inline / "timings.json").write_text(json.dumps(timings))
    assert main(["grm", "--config", str(TINY), f"init={base}", f"out_dir={inline}",
                 'steps=["ablations","best_of_n"]', "beside=false"]) == 0
    again = json.loads((inline / "ablations.json").read_text())
    assert again["accuracy"] == report["ablations"] and again["parse_rate"] == report["ablation_parse_rate"]
    assert json.loads((inline / "best_of_n.json").read_text())["result"] == report["best_of_n"]
    a, b = (read_tensors(find_checkpoint(d / "no_principles")) for d in (out, inline))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # nanoseek judge: one JSON line per item (its k judgments); a bad file exits 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "1234", "responses": [" </think> <answer>0</answer>", "x"]}) + "\n"
                     + json.dumps({"question": "5678", "response": " </think> <answer>6</answer>"}) + "\n")
    judged = tmp_path / "judged.jsonl"
    assert main(["judge", "--model", str(out / "latest"), "--input", str(pairs), "--output", str(judged),
                 "--k", "2", "--meta"]) == 0
    rows = [json.loads(line) for line in judged.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["scores"]) == 2 and len(rows[1]["scores"]) == 1
    assert len(rows[0]["votes"]) == 2 and len(rows[0]["kept"]) == 1  # the meta RM keeps k/2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    assert main(["judge", "--model", str(out / "latest"), "--input", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err

    # eval --rerank: best-of-K by the GRM beside pass@k and maj@k
    capsys.readouterr()
    assert main(["eval", "--model", str(base), "--task", "digit_sum", "--difficulty", "length=4", "--n", "6",
                 "--samples", "4", "--max-tokens", "16", "--rerank", str(out / "latest"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"pass@1", "maj@4", "grm@4", "rerank_parse_rate"} <= set(result)
    assert main(["eval", "--model", str(base), "--task", "digit_sum", "--n", "2", "--rerank", str(out)]) == 2

    # the grm reward in rl: the judge scores, the task's checker only evaluates
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.grpo import train as rl_train
    from nanoseek.train.config import load_run_config
    from nanoseek.train.metrics import read_metrics

    cfg = load_run_config(GRPOConfig, None, [
        f"init={base}", f"out_dir={tmp_path / 'rl'}", "task=digit_sum", "task_args.length=4", "rewards={grm=1.0}",
        f"grm_model={out / 'latest'}", "max_steps=1", "num_generations=2", "batch_size=4",
        "micro_batch_size=4", "max_completion_length=8", "seq_len=64", "eval_n=2", "eval_every=1", "save_every=0", "log_every=1",
        "tensorboard=false", "threads=1"])
    rl_train(cfg)
    record = next(r for r in read_metrics(tmp_path / "rl") if "reward_grm" in r)
    assert 0.0 <= record["reward_grm"] <= 1.0 and "eval_pass@1" in json.dumps(read_metrics(tmp_path / "rl"))
    with pytest.raises(NanoseekError, match="grm_model"):
        load_run_config(GRPOConfig, None, [f"init={base}", "rewards={grm=1.0}"])


def test_ctrl_c_in_a_training_step_stops_the_recipe_and_the_re_run_resumes_it_exactly(base, tmp_path, monkeypatch,
                                                                                       capsys):
    """Ctrl-C in the cold-start SFT, then (re-run) in the RL: each saves and stops the recipe (exit 130)
    without marking its step done; the next re-run resumes that training from its checkpoint and
    ends bit-identical to an uninterrupted recipe. (A stopped SFT used to count as done: the
    recipe went on to rft with a half-trained judge and exited 0.)"""
    import signal

    from nanoseek.train.trainer import Trainer

    args = ["grm", "--config", str(TINY), f"init={base}", 'steps=["data","cold_start","rft","rl"]']
    assert main([*args, f"out_dir={tmp_path / 'straight'}"]) == 0
    train_step = Trainer.train_step

    def ctrl_c_at(name, step):
        def patched(self, *a, **k):
            stats = train_step(self, *a, **k)
            if self.out_dir.name == name and self.step == step:
                signal.raise_signal(signal.SIGINT)
            return stats
        monkeypatch.setattr(Trainer, "train_step", patched)

    out = tmp_path / "stopped"
    ctrl_c_at("cold_start", 1)
    assert main([*args, f"out_dir={out}"]) == 130
    assert set(json.loads((out / "timings.json").read_text())) == {"data"} and not (out / "rft").exists()
    ctrl_c_at("rl", 1)
    capsys.readouterr()
    assert main([*args, f"out_dir={out}"]) == 130
    assert f"resumed from {out / 'cold_start' / 'checkpoint-1'} at step 1" in capsys.readouterr().out
    assert set(json.loads((out / "timings.json").read_text())) == {"data", "cold_start", "rft"}
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main([*args, f"out_dir={out}"]) == 0
    assert f"resumed from {out / 'rl' / 'checkpoint-1'} at step 1" in capsys.readouterr().out
    for name, step in (("cold_start", 3), ("rl", 2)):
        a = read_tensors(tmp_path / "straight" / name / f"checkpoint-{step}")
        b = read_tensors(out / name / f"checkpoint-{step}")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ctrl_c_stops_the_step_running_beside_and_the_re_run_finishes_it(base, tmp_path, monkeypatch, capsys):
    """Ctrl-C in rft stops the recipe (exit 130) with the ablations still running in their second
    process: that process stops too (none is left behind) and the step is not counted done; the
    re-run runs it again and finishes the recipe."""
    import multiprocessing
    import signal

    from nanoseek.train.trainer import Trainer

    train_step = Trainer.train_step

    def patched(self, *a, **k):
        stats = train_step(self, *a, **k)
        if self.out_dir.name == "rft" and self.step == 1:
            signal.raise_signal(signal.SIGINT)
        return stats

    monkeypatch.setattr(Trainer, "train_step", patched)
    out = tmp_path / "grm"
    args = ["grm", "--config", str(TINY), f"init={base}", f"out_dir={out}"]
    assert main(args) == 130
    assert not multiprocessing.active_children()
    assert set(json.loads((out / "timings.json").read_text())) == {"data", "cold_start"}
    assert "ablations, beside, stopped with the recipe" in capsys.readouterr().out
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(args) == 0
    assert set(json.loads((out / "grm_report.json").read_text())["beside"]) == {"ablations", "best_of_n"}


def test_a_step_that_fails_beside_names_its_log(base, tmp_path, capsys):
    out = tmp_path / "grm"
    (out / "bt").mkdir(parents=True)
    (out / "bt" / "score_head.safetensors").write_bytes(b"not a safetensors file")
    assert main(["grm", "--config", str(TINY), f"init={base}", f"out_dir={out}", "ablations=[\"bt\"]",
                 'steps=["data","cold_start","ablations"]']) == 2
    err = capsys.readouterr().err  # the second process's own error, as the main line's
    assert f"step ablations (run beside the others, log {out / 'ablations.log'})" in err
    assert "bt has no config.json" in err and "Traceback" not in err


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["grm", "--config", str(TINY), "steps=[\"nope\"]", f"out_dir={tmp_path}"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["grm", "--config", str(TINY), f"out_dir={tmp_path}", "init="]) == 2
    assert main(["grm", "--config", str(TINY), f"out_dir={tmp_path}", "meta_loss=listwise"]) == 2


def test_resume_from_is_refused_not_ignored(tmp_path, capsys):
    """A re-run continues the recipe; --resume-from (the stages' shared option) has nothing to do here."""
    assert main(["grm", "--config", str(TINY), f"out_dir={tmp_path / 'run'}", "--resume-from", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--resume-from" in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_the_recipe_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: each rank would run the whole recipe
    assert main(["grm", "--config", str(TINY), f"out_dir={tmp_path / 'run'}"]) == 2
    assert "runs in one process" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_data_without_a_right_and_a_wrong_sample(base, tmp_path, capsys):
    """One sample per question never makes a pair: a clear error naming the fixes; fill_right (toy
    runs) puts the gold answer beside an under-trained policy's samples so every question makes one."""
    args = ["grm", "--config", str(TINY), f"init={base}", "steps=[\"data\"]"]
    assert main([*args, f"out_dir={tmp_path / 'a'}", "policy_samples=1"]) == 2
    assert "fill_right" in capsys.readouterr().err
    assert main([*args, f"out_dir={tmp_path / 'b'}", "task_args.length=10", "fill_right=true"]) == 0
    items = [json.loads(line) for line in (tmp_path / "b" / "data" / "items_eval.jsonl").read_text().splitlines()]
    assert len(items) == 24 and all(0 <= i["best"] < len(i["responses"]) for i in items)
    # the filled answers make judge items only: best-of-N reads the policy's own samples
    rows = {r["question"]: r for r in map(json.loads, (tmp_path / "b" / "data" / "policy_eval.jsonl").open())}
    filled = [i for i in items if any(resp not in rows[i["question"]]["samples"] for resp in i["responses"])]
    assert filled and all(not any(rows[i["question"]]["labels"]) for i in filled)


# ---------------------------------------------------------------- best-of-N and the RL reward, on a scripted judge


class ScriptedJudge:
    """GRM.judge_many's shape with scripted single-response scores: `script[response]` is the list
    of per-sample scores (None: that judgment did not parse). Records each call's size."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def judge_many(self, items, k=1, seed=0, meta=False):
        from nanoseek.grm import Verdict

        self.calls.append(len(items))
        verdicts = []
        for _, (response,) in items:
            samples = [Judgment("x", scores=None if s is None else [s]) for s in self.script[response][:k]]
            parsed = [j for j in samples if j.scores is not None]
            verdicts.append(Verdict([sum(j.scores[0] for j in parsed)], 0, samples, list(range(k)),
                                    len(parsed) / k))
        return verdicts


def test_rerank_averages_the_judgments_that_parse():
    """A judgment that does not parse scores no candidate: 9 from the one that parsed beats 5 + 5
    (summing would give 9 against 10)."""
    from nanoseek.grm import rerank

    judge = ScriptedJudge({"good": [9, None], "plain": [5, 5]})
    picks, parse_rate = rerank(judge, [Q] * 5, [["plain", "good"]] * 5, k=2)
    assert picks == [1] * 5 and parse_rate == pytest.approx(0.75)


def test_grm_reward_judges_each_completion_once_duplicates_included():
    """prepare() judges the whole rollout in one call; every completion, repeated ones too, then
    takes its own prepared reward (duplicates used to be judged again, one call each)."""
    from nanoseek.data.tasks import Problem
    from nanoseek.grm import GRMReward

    reward = GRMReward.__new__(GRMReward)
    reward.grm, reward.k, reward.seed, reward.calls, reward.cache = ScriptedJudge({"A": [10], "B": [1]}), 1, 0, 0, {}
    problem = Problem(Q, "0")
    rollout = ["A"] * 4 + ["B"] * 4
    reward.prepare([(c, problem) for c in rollout])
    assert [reward(c, problem) for c in rollout] == [1.0] * 4 + [0.0] * 4
    assert reward.grm.calls == [8] and reward.cache == {}


def test_majority_is_graded_by_the_samples_labels():
    """maj@N takes the grade of the samples that give the majority answer (the task's scorer), not
    string equality with the gold answer."""
    from nanoseek.train.grm import majority_is_right

    samples = [" </think> <answer>1/2</answer>", " </think> <answer>1/2</answer>", " </think> <answer>3</answer>"]
    assert majority_is_right(samples, [1, 1, 0])  # "1/2" is right by the scorer although the gold reads "0.5"
    assert not majority_is_right(samples, [0, 0, 1])
    assert not majority_is_right([" no answer"], [0])


@pytest.fixture(scope="module")
def untrained_judge() -> GRM:
    """A random tiny model with a 64-token context as a judge, for errors raised before sampling."""
    import torch

    from nanoseek.config import preset
    from nanoseek.inference.engine import LLM
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["judge the answer 1 2 3"] * 10, vocab_size=270)
    torch.manual_seed(0)
    return GRM(LLM(Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=64)), tok,
                   block_size=16))


def test_responses_too_long_for_the_judge_name_the_item_and_the_fix(untrained_judge):
    """A judge prompt beyond the context: the engine's own "shorten the prompt" named a prompt the
    caller never wrote; the error names the item and says to judge fewer or shorter responses."""
    grm = untrained_judge
    with pytest.raises(NanoseekError, match="item 2: .* judge fewer or shorter responses"):
        grm.judge_many([(Q, ["a"]), (Q, ["x" * 100, "y"])], k=1)


def test_k_meta_below_one_is_refused(untrained_judge, monkeypatch):
    """k_meta=0 kept no judgment (every score 0, exit 0) and -1 all but one: both are errors."""
    monkeypatch.setattr(untrained_judge, "meta", object())  # refused before the meta RM is used
    for bad in (0, -1):
        with pytest.raises(NanoseekError, match=f"k_meta={bad}: the meta RM keeps at least one"):
            untrained_judge.judge(Q, ["a", "b"], k=2, k_meta=bad)
    with pytest.raises(NanoseekError, match="k_meta=5 keeps more judgments than the k=2 sampled"):
        untrained_judge.judge(Q, ["a", "b"], k=2, k_meta=5)


def test_judge_input_with_responses_as_a_string_is_refused(tmp_path):
    """"responses": "abc" was judged as three responses "a", "b", "c"; it is a bad line now."""
    from nanoseek.grm import read_items

    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"question": "1+1", "responses": "abc"}) + "\n")
    with pytest.raises(NanoseekError, match=r"items.jsonl:1: responses must be a non-empty list of strings"):
        read_items(path)


def test_judge_api_names_a_question_or_response_that_is_not_a_string(untrained_judge):
    """GRM.judge(None, ...) or a None response raised AttributeError: 'NoneType' object has no attribute 'split'."""
    with pytest.raises(NanoseekError, match="item 1: a judgment takes a question string"):
        untrained_judge.judge(None, ["a"], k=1)
    with pytest.raises(NanoseekError, match=r"item 1: .* got str and \['a', None\]"):
        untrained_judge.judge(Q, ["a", None], k=1)
    with pytest.raises(NanoseekError, match="item 2: .* got str and 'abc'"):
        untrained_judge.judge_many([(Q, ["a"]), (Q, "abc")], k=1)


def test_judging_with_a_model_that_is_not_a_grm_says_so(base, tmp_path, capsys):
    """The reasoning base never writes a judgment: every item scored nothing, and the only sign was
    'parse rate 0.000'."""
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"question": "1234", "responses": ["0", "1"]}) + "\n")
    assert main(["judge", "--model", str(base), "--input", str(items), "--k", "2"]) == 0
    out, err = capsys.readouterr()
    assert "parse rate 0.000" in err and f"is {base} a generative reward model" in err
    assert json.loads(out)["best"] is None  # not a random pick among zero scores
    # eval --rerank with it: grm@K picked at random, and says so
    assert main(["eval", "--model", str(base), "--task", "digit_sum", "--difficulty", "length=4", "--n", "2",
                 "--samples", "2", "--max-tokens", "4", "--rerank", str(base)]) == 0
    assert f"no judgment of {base} parsed, so grm@2 picked at random" in capsys.readouterr().err


def test_judge_cli_checks_output_and_threads_before_judging_and_names_bad_lines(base, tmp_path, capsys,
                                                                                      monkeypatch):
    """A bad --output used to crash (a traceback) after every item was judged; --threads -1 raised
    in torch.set_num_threads; a line that is a JSON list said "list indices must be integers"."""
    import nanoseek.grm as grm_module

    def no_judging(*args, **kwargs):
        raise AssertionError("judged before checking the flags")

    monkeypatch.setattr(grm_module.GRM, "judge_many", no_judging)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"question": "1234", "responses": ["0", "1"]}) + "\n")
    judge = ["judge", "--model", str(base), "--input", str(items)]
    assert main([*judge, "--output", str(tmp_path)]) == 2
    assert "is a directory; give a file path" in capsys.readouterr().err
    assert main([*judge, "--output", str(tmp_path / "no" / "out.jsonl")]) == 2
    assert f"no directory {tmp_path / 'no'} to write it in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*judge, "--threads", "-1"])
    assert exit_info.value.code == 2 and "--threads: '-1' is not a thread count" in capsys.readouterr().err
    for line, problem in (("[1, 2]", "a JSON list, not an object"), ('{"responses": ["a"]}', 'no "question" string'),
                          ('{"question": "q"}', 'no "responses" list'), ("{oops", "not valid JSON")):
        items.write_text(line + "\n")
        assert main(judge) == 2
        err = capsys.readouterr().err
        assert f"items.jsonl:1: {problem}" in err and "Traceback" not in err


def test_the_recipes_trainings_run_under_its_optimizer(tmp_path, monkeypatch):
    """optimizer=muon (and muon_momentum) reach the judge's SFT trainings (cold start, RFT) and its
    RL, as activation_checkpointing does, instead of falling back to AdamW."""
    from nanoseek.train.grm import GRMConfig, Recipe

    checkpoint = tmp_path / "run" / "rft" / "checkpoint-1"  # only found, never loaded: _train is replaced
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    recipe = Recipe(GRMConfig(out_dir=str(tmp_path / "run"), init=str(checkpoint), optimizer="muon",
                              muon_momentum=0.9))
    (recipe.out / "data").mkdir()
    (recipe.out / "data" / "items_train.jsonl").write_text("")
    configs = []

    class Captured(Exception):
        pass

    def capture(name, train_fn, cfg):
        configs.append(cfg)
        raise Captured  # what follows a training reads its checkpoint
    monkeypatch.setattr(recipe, "_train", capture)
    with pytest.raises(Captured):
        recipe._sft("cold_start", checkpoint, [], steps=1, lr=1e-3)
    with pytest.raises(Captured):
        recipe.rl()
    assert [(c.optimizer, c.muon_momentum) for c in configs] == [("muon", 0.9)] * 2
