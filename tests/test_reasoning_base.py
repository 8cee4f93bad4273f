"""The R1-Zero demo's reasoning base: the digit-sum task, its corpus (the direct / worked mix and
the hash split), eval's reasoning share and prefill, the R1-Zero figure, and a toy end-to-end run
(pretrain a tiny base on the corpus, then RL) in which RL raises the share of responses that reason.
"""

import tomllib
from pathlib import Path

import pytest

from nanoseek import cli
from nanoseek.data.corpus import load_sources
from nanoseek.data.synthetic import corpus_from_spec, reasoning_base_documents
from nanoseek.data.tasks import (
    DIGIT_SUM_TEMPLATE, DigitSumTask, extract_answer, get_task, prompt_of, r1zero_completion, reasoning_of, reasons, split_of,
)
from nanoseek.errors import NanoseekError
from nanoseek.eval import evaluate
from nanoseek.plots import r1zero_figure, save_r1zero_figure
from nanoseek.tokenizer import Tokenizer
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------- the task


def test_digit_sum_task():
    task = get_task("digit_sum")
    problems = task.problems(50, seed=0, split="eval")
    assert len({p.question for p in problems}) == 50 and task.problems(50, seed=0, split="eval") == problems
    for p in problems:
        assert len(p.question) == 10 and p.question.isdigit() and split_of(p.question) == "eval"
        assert p.answer == str(sum(map(int, p.question)) % 10)
        assert prompt_of(p) == f"User: {p.question}\nAssistant: <think>"
    p = next(p for p in problems)
    assert task.score(f" {p.answer} ", p) == 1.0 and task.score(str((int(p.answer) + 1) % 10), p) == 0.0
    assert task.score(None, p) == 0.0
    short = get_task("digit_sum", length=4).problems(3, seed=0, split="train")
    assert all(len(p.question) == 4 and split_of(p.question) == "train" for p in short)
    with pytest.raises(NanoseekError, match="length"):
        get_task("digit_sum", min_terms=3)


def test_worked_chain_is_the_running_sums():
    task = DigitSumTask()
    p = task.problems(1, seed=0)[0]
    p.question, p.answer = "3815920471", "0"
    assert task.reasoning(p) == "sums 3127688290"
    completion = r1zero_completion(task.reasoning(p), p.answer)
    assert completion.startswith(task.chain_opening) and extract_answer(completion) == "0"
    assert reasoning_of(completion) == "sums 3127688290" and reasons(completion)
    direct = r1zero_completion("", p.answer)
    assert not reasons(direct) and extract_answer(direct) == "0"
    assert not reasons(" sums 31 no end")  # never closes its reasoning: no answer, not counted as reasoning
    assert reasons("<think>x</think> <answer>1</answer>")


# ---------------------------------------------------------------- the corpus


def split_document(doc: str) -> tuple[str, str]:
    prompt, sep, completion = doc.partition("<think>")
    assert sep
    return prompt + sep, completion


@pytest.mark.parametrize("share", [0.35, 0.1])
def test_corpus_has_the_configured_mix_and_no_eval_question(share):
    n = 3000
    docs = reasoning_base_documents(n, worked_share=share, seed=0)
    assert docs == reasoning_base_documents(n, worked_share=share, seed=0)  # deterministic
    assert docs != reasoning_base_documents(n, worked_share=share, seed=1)
    task = DigitSumTask()
    questions, worked = [], 0
    for doc in docs:
        prompt, completion = split_document(doc)
        question = prompt.removeprefix("User: ").split("\n")[0]
        questions.append(question)
        answer = str(sum(map(int, question)) % 10)
        assert prompt == task.prompt(question) and extract_answer(completion) == answer
        if reasons(completion):
            worked += 1
            assert completion == r1zero_completion(task.reasoning(task.problems(1)[0].__class__(question, answer)),
                                                   answer)
        else:
            assert completion == r1zero_completion("", answer)
    assert worked == round(share * n)  # exactly the recipe's share
    assert len(set(questions)) == n and all(split_of(q) == "train" for q in questions)
    held_out = {p.question for p in task.problems(1000, seed=0, split="eval")}
    assert not held_out & set(questions)


def test_corpus_spec():
    docs = corpus_from_spec("synthetic:digit_sum?documents=200&worked_share=0.5&length=6", seed=3)
    assert docs == reasoning_base_documents(200, worked_share=0.5, seed=3, length=6)
    assert sum(reasons(split_document(d)[1]) for d in docs) == 100
    (name, loaded), = load_sources(["synthetic:digit_sum?documents=20"], seed=3)
    assert name == "synthetic:digit_sum" and loaded == reasoning_base_documents(20, seed=3)
    for bad, match in [("synthetic:nope", "unknown synthetic corpus"), ("synthetic:digit_sum?docs=3", "docs"),
                       ("synthetic:digit_sum?documents=x", "documents='x' is not an integer"),
                       ("synthetic:digit_sum?documents=-5", r"documents=-5 must be a positive integer"),
                       ("synthetic:digit_sum?garbage", r"setting 'garbage' is not key=value"),
                       ("synthetic:digit_sum?length=1", r"^'synthetic:digit_sum\?length=1': .*length=1"),
                       ("synthetic:digit_sum?worked_share=2", "worked_share")]:
        with pytest.raises(NanoseekError, match=match):
            corpus_from_spec(bad)


# ---------------------------------------------------------------- eval: reasoning share and prefill


def test_eval_reports_the_reasoning_share_and_length():
    task = DigitSumTask()
    problems = task.problems(4, seed=0)
    chain = [r1zero_completion(task.reasoning(p), p.answer) for p in problems]
    direct = [r1zero_completion("", str((int(p.answer) + 1) % 10)) for p in problems]  # wrong
    script = {0: [chain[0], direct[0]], 1: [chain[1], chain[1]], 2: [direct[2], direct[2]], 3: [direct[3], "x"]}
    engine = ScriptedEngine(lambda i: script[i])
    report = evaluate(engine, task=task, n=4, samples=2, seed=0)
    assert report["reasoning"] == pytest.approx(3 / 8) and report["pass@1"] == pytest.approx(3 / 8)
    assert report["reasoning_length"] == pytest.approx(len(chain[0]))  # scripted: one token per character
    assert "prefill" not in report and engine.prompts == [prompt_of(p) for p in problems]
    line = cli_line(report)
    assert "reasoning 0.3750" in line and "reasoning_length" in line


def cli_line(report):
    from nanoseek.eval import format_report

    return format_report(report)


def test_eval_prefill_grades_the_prefilled_response():
    task = DigitSumTask()
    problems = task.problems(3, seed=0)
    # the model continues the chain after the prefilled " sums"
    rest = [r1zero_completion(task.reasoning(p), p.answer).removeprefix(task.chain_opening) for p in problems]
    engine = ScriptedEngine(lambda i: [rest[i]])
    report = evaluate(engine, task=task, n=3, seed=0, prefill=task.chain_opening)
    assert engine.prompts == [prompt_of(p) + " sums" for p in problems]
    assert report["pass@1"] == 1.0 and report["reasoning"] == 1.0 and report["format"] == 1.0
    assert report["prefill"] == " sums" and "prefill ' sums'" in cli_line(report)


def test_eval_cli_prefill_needs_an_opening(tmp_path, capsys):
    code = cli.main(["eval", "--model", str(tmp_path), "--task", "chain_sum", "--prefill"])
    assert code == 2 and "chain opening" in capsys.readouterr().err


def test_pretrain_rejects_a_chat_template_that_does_not_compile(tmp_path, capsys):
    code = cli.main(["pretrain", "--config", str(CONFIGS / "pretrain_tiny.toml"), f"out_dir={tmp_path}",
                     "chat_template={% if %}"])
    assert code == 2 and "chat template" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # before any data is prepared


# ---------------------------------------------------------------- the figure


def test_r1zero_figure_is_written(tmp_path):
    records = [{"step": 0, "eval_pass@1": 0.1, "eval_length": 10.0, "eval_reasoning": 0.0}]
    records += [{"step": s, "acc": s / 10, "len": 10 + s, "reward": 1.0} for s in range(1, 11)]
    records += [{"step": 10, "eval_pass@1": 0.9, "eval_length": 20.0, "eval_reasoning": 1.0}]
    out = r1zero_figure(records, tmp_path / "fig.png", control=0.12)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_r1zero_figure(tmp_path) is None  # no metrics.jsonl with evaluations: nothing to draw


# ---------------------------------------------------------------- toy end to end: RL makes it reason


def reasoning_reward(completion: str, problem) -> float:
    """1.0 for a response that reasons (writes a chain before its answer), else 0.0."""
    return float(reasons(completion))


def test_toy_rl_raises_the_reasoning_share(tmp_path):
    """The whole path on a toy scale, deterministic and in seconds: pretrain the `tiny` preset on
    a corpus of 4-digit questions answered with a chain in 30% of documents (it learns to open a
    chain about that often and greedy decoding never does), then RL from that base. The reward here
    pays for reasoning as such, since no tiny model learns to add digits in seconds; the outcome-reward
    version is the measured demo (README). What this checks is the plumbing the demo rests on: the
    corpus reaches the base, rollouts and eval count reasoning, RL moves it, the figure is drawn."""
    from nanoseek.rewards import REWARDS, register_reward
    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.grpo import train as rl_train
    from nanoseek.train.config import load_run_config
    from nanoseek.train.metrics import read_metrics
    from nanoseek.train.pretrain import PretrainConfig
    from nanoseek.train.pretrain import train as pretrain

    base = pretrain(PretrainConfig(
        out_dir=str(tmp_path / "base"), preset="tiny", data=["synthetic:digit_sum?documents=3000&worked_share=0.3&length=4"],
        vocab_size=300, val_fraction=0.02, batch_size=8, seq_len=64, max_steps=60, lr=1e-2, warmup_steps=5,
        eval_every=0, eval_batches=1, log_every=20, tensorboard=False, threads=1, model={"initializer_range": 0.08},
        chat_template=tomllib.loads((CONFIGS / "pretrain_reasoning.toml").read_text())["chat_template"]))
    register_reward("reasons", reasoning_reward)
    try:
        cfg = load_run_config(GRPOConfig, None, [
            f"init={base}", f"out_dir={tmp_path / 'rl'}", "task=digit_sum", "task_args.length=4",
            "rewards.reasons=1.0", "max_steps=12", "num_generations=8", "batch_size=64", "micro_batch_size=64",
            "max_completion_length=16", "seq_len=48", "lr=5e-3", "warmup_steps=0", "beta=0.0", "log_kl=false",
            "loss=dapo", "dynamic_sampling=false", "overlong_buffer=0", "eval_n=32", "eval_every=6",
            "save_every=0", "log_every=6", "tensorboard=false", "threads=1"])
        cfg.rewards = {"reasons": 1.0}
        rl_train(cfg)
    finally:
        REWARDS.pop("reasons", None)
    records = read_metrics(tmp_path / "rl")
    sampled = [r["reasoning"] for r in records if "reasoning" in r]
    held_out = [r["eval_reasoning"] for r in records if "eval_reasoning" in r]
    assert 0.1 < sampled[0] < 0.5, sampled  # the base opens a chain about as often as its corpus does
    assert held_out[0] == 0.0  # ... and greedy decoding never does
    assert sampled[-1] > 0.9 and held_out[-1] == 1.0, (sampled, held_out)
    assert (tmp_path / "rl" / "r1zero.png").is_file()
    # chat and serve ask the trained model in its corpus's format (the base's template travels with it)
    tokenizer = Tokenizer.from_dir(tmp_path / "rl" / "latest")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "3815"}])
    assert prompt == tokenizer.bos_token + DIGIT_SUM_TEMPLATE.format(question="3815")
