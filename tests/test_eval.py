"""Task evaluation: the pass@k / maj@k arithmetic on scripted completions, and determinism through
the real engine on a tiny random model (same seed -> same problems -> same score)."""

import copy

import pytest
import torch

from nanoseek import cli
from nanoseek.checkpoint import save_model
from nanoseek.config import preset
from nanoseek.data.synthetic import generate_documents
from nanoseek.data.tasks import get_task, r1zero_completion
from nanoseek.eval import evaluate, majority_answer, pass_at_k
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_tokenizer
from scripted_engine import ScriptedEngine


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(8, 7, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_answer():
    assert majority_answer(["3", " 4", "4 ", None, "3", "4"]) == "4"
    assert majority_answer(["3", "4"]) == "3"  # a tie goes to the first seen
    assert majority_answer([None, " "]) is None


# ---------------------------------------------------------------- scripted completions


@pytest.fixture(scope="module")
def task():
    return get_task("default")


def test_greedy_pass_at_1_counts_only_full_credit(task):
    problems = task.problems(4, seed=0)
    answers = [problems[0].answer, problems[1].answer + "1", "nonsense", problems[3].answer]  # #1 earns part credit
    engine = ScriptedEngine(lambda i: [r1zero_completion("r", answers[i])])
    report = evaluate(engine, task=task, n=4, seed=0)
    assert report["pass@1"] == 0.5 and report["format"] == 1.0 and report["n"] == 4
    assert all(p.temperature == 0 and p.n == 1 for p in engine.calls[0])  # K = 1 is greedy
    assert "maj@1" not in report


def test_sampled_pass_at_k_and_majority(task):
    problems = task.problems(2, seed=0)
    right = [r1zero_completion("", p.answer) for p in problems]
    wrong = r1zero_completion("", "12345")
    script = {0: [right[0], wrong, wrong, wrong],  # 1 of 4 right, the majority wrong
              1: [right[1], right[1], wrong, " no answer"]}  # 2 of 4 right, the majority right
    engine = ScriptedEngine(lambda i: script[i])
    report = evaluate(engine, task=task, n=2, samples=4, seed=0, temperature=0.7)
    assert report["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert report["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 2)
    assert report["pass@4"] == 1.0 and report["maj@4"] == 0.5 and report["format"] == pytest.approx(7 / 8)
    seeds = [p.seed for p in engine.calls[0]]
    assert all(p.temperature == 0.7 and p.n == 4 for p in engine.calls[0]) and len(set(seeds)) == 2


def test_chat_asks_in_the_template_and_grades_the_boxed_answer(task, checkpoint):
    """A released chat model (R1-Distill) is asked in its own template and answers in \\boxed{}."""
    from nanoseek.eval import CHAT_INSTRUCTION
    from nanoseek.tokenizer import Tokenizer

    problems = task.problems(2, seed=0)
    replies = [f"adding up</think>\n\nSo the answer is $\\boxed{{{problems[0].answer}}}$.",
               "adding up</think>\n\n\\boxed{12345}"]
    engine = ScriptedEngine(lambda i: [replies[i]])
    engine.tokenizer = Tokenizer.from_dir(checkpoint)
    report = evaluate(engine, task=task, n=2, seed=0, chat=True)
    assert report["pass@1"] == 0.5 and report["chat"]
    prompt = engine.tokenizer.decode(engine.prompts[0])
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{problems[0].question}\n{CHAT_INSTRUCTION}"}], add_generation_prompt=True)
    assert prompt == expected and prompt.count(problems[0].question) == 1
    # chat_template_kwargs reach the template (V3.1's reads `thinking`; V3.2's / V4's encoders take it too)
    engine.tokenizer = copy.copy(engine.tokenizer)
    engine.tokenizer.chat_template = "{% if thinking %}THINKING {% endif %}" + engine.tokenizer.chat_template
    report = evaluate(engine, task=task, n=2, seed=0, chat=True, chat_template_kwargs={"thinking": True})
    assert engine.tokenizer.decode(engine.prompts[-2]) == "THINKING " + expected  # problem 0 of this call
    assert report["chat_template_kwargs"] == {"thinking": True}


def test_chat_template_kwargs_need_chat(checkpoint, capsys):
    from nanoseek.cli import main

    assert main(["eval", "--model", str(checkpoint), "--chat-template-kwargs", '{"thinking": true}']) == 2
    assert "add --chat" in capsys.readouterr().err


# ---------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    tok = train_tokenizer(generate_documents(300, seed=0), vocab_size=512)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_model(Transformer(cfg), path, tokenizer=tok)
    return path


def test_same_seed_same_problems_same_score(checkpoint, task):
    kwargs = dict(task=task, n=4, samples=2, max_tokens=8, return_samples=True)
    a, b = evaluate(checkpoint, seed=1, **kwargs), evaluate(checkpoint, seed=1, **kwargs)  # fresh engines
    c = evaluate(checkpoint, seed=2, **kwargs)
    assert a["results"] == b["results"]  # same problems, same completions
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert [r["question"] for r in a["results"]] != [r["question"] for r in c["results"]]
    assert [r["question"] for r in a["results"]] == [p.question for p in task.problems(4, seed=1)]


def test_cli_prints_the_scores(checkpoint, capsys):
    assert cli.main(["eval", "--model", str(checkpoint), "--n", "3", "--max-tokens", "8", "--samples", "2",
                     "--task", "chain_sum", "--difficulty", "min_terms=2", "max_terms=2"]) == 0
    out = capsys.readouterr().out
    assert "chain_sum" in out and "pass@1" in out and "pass@2" in out and "maj@2" in out


def test_cli_prompt_longer_than_the_context_gets_a_hint_eval_users_can_follow(checkpoint, tmp_path, capsys):
    """The engine's "shorten the prompt" is no fix here: eval writes the prompts."""
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(checkpoint)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                 max_position_embeddings=8)  # shorter than any task prompt
    save_model(Transformer(cfg), tmp_path / "short", tokenizer=tok)
    assert cli.main(["eval", "--model", str(tmp_path / "short"), "--n", "1", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds 8" in err and "a model with a longer context" in err and "shorten the prompt" not in err


def test_cli_says_when_the_split_has_fewer_problems_than_n(checkpoint, tmp_path, capsys):
    """--n 1000 on a jsonl task with a few eval rows evaluated those few and said nothing."""
    import json

    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": 2 * i}) + "\n"
                            for i in range(30)))
    eval_rows = len(get_task(f"jsonl:{path}").problems(1000))
    assert 0 < eval_rows < 30
    assert cli.main(["eval", "--model", str(checkpoint), "--task", f"jsonl:{path}", "--n", "1000",
                     "--max-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert f"n={eval_rows}," in out
    assert f"has {eval_rows} problems, fewer than --n 1000: evaluated all {eval_rows}" in err


def test_cli_rerank_mistakes_are_refused_before_generating(checkpoint, tmp_path, capsys, monkeypatch):
    """A mistyped GRM path or --rerank-k 0 used to surface only after every sample was generated."""
    import nanoseek.eval as eval_module

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking --rerank")

    monkeypatch.setattr(eval_module, "evaluate", no_generation)
    base = ["eval", "--model", str(checkpoint), "--n", "1", "--samples", "2", "--max-tokens", "2"]
    assert cli.main(base + ["--rerank", str(tmp_path / "no_grm")]) == 2
    assert "GRM checkpoint" in capsys.readouterr().err
    assert cli.main(base + ["--rerank", str(checkpoint), "--rerank-k", "0"]) == 2
    assert "--rerank-k 0" in capsys.readouterr().err


def test_majority_groups_the_forms_the_task_scores_alike(tmp_path):
    """Under math-verify "0.5" and "\\frac{1}{2}" are one answer: two votes beat the one "3" seen
    first (string votes made it a three-way tie that "3" won, so maj@3 was 0 with 2 of 3 right)."""
    import json
    from fractions import Fraction

    assert majority_answer(["3", "0.5", "1/2"], same=lambda a, b: Fraction(a) == Fraction(b)) == "0.5"
    path = tmp_path / "half.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} divided by {2 * i}?", "answer": "1/2"}) + "\n"
                            for i in range(1, 60)))
    task = get_task(f"jsonl:{path}")
    script = [r1zero_completion("", a) for a in ("3", "0.5", "\\frac{1}{2}")]
    report = evaluate(ScriptedEngine(lambda i: script), task=task, problems=task.problems(2), samples=3)
    assert report["pass@1"] == pytest.approx(2 / 3) and report["maj@3"] == 1.0


def test_an_empty_problem_list_is_refused_in_words(task):
    from nanoseek.errors import NanoseekError
    with pytest.raises(NanoseekError, match="empty problems list"):
        evaluate(ScriptedEngine(lambda i: [""]), task=task, problems=[])
