"""Verifiable tasks: registry, seeded disjoint splits, scoring, prompt/answer markup, synthetic corpus."""

import json
import re
import sys

import pytest

from nanoseek.data import synthetic
from nanoseek.data.tasks import (
    DEFAULT_MIX,
    R1ZERO_TEMPLATE,
    Problem,
    extract_answer,
    get_task,
    r1zero_completion,
    r1zero_prompt,
    split_of,
)
from nanoseek.errors import NanoseekError
from nanoseek.rewards import accuracy_reward


@pytest.fixture(scope="module")
def mix():
    return get_task("default")


@pytest.fixture(scope="module")
def docs():
    return synthetic.generate_documents(3000, seed=0)


@pytest.fixture
def jsonl_task(tmp_path):
    rows = [{"question": f"What is {i} divided by {2 * i}?", "answer": "1/2"} for i in range(1, 60)]
    rows += [{"question": f"What is {i} plus {i}?", "answer": 2 * i} for i in range(1, 60)]
    path = tmp_path / "half.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return get_task(f"jsonl:{path}")


@pytest.mark.parametrize(
    "name, difficulty",
    [
        ("default", {}),
        ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
        ("rg:simple_equations", dict(min_terms=2, max_terms=2, max_value=9)),
    ],
)
def test_gold_scores_one_and_wrong_scores_zero(name, difficulty):
    task = get_task(name, **difficulty)
    for p in task.problems(20, seed=1):
        assert task.score(p.answer, p) == 1.0
        assert task.score(str(int(p.answer) + 1), p) == 0.0
        assert task.score(None, p) == 0.0


def test_same_seed_same_problems_other_seed_others(mix):
    a, b, c = mix.problems(50, seed=3), mix.problems(50, seed=3), mix.problems(50, seed=4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert len(a) == 50


def test_train_and_eval_are_disjoint(mix):
    eval_qs = {p.question for p in mix.problems(400, seed=0, split="eval")}
    train_qs = {p.question for seed in range(3) for p in mix.problems(400, seed=seed, split="train")}
    assert eval_qs and train_qs and not eval_qs & train_qs
    assert {split_of(q) for q in eval_qs} == {"eval"}


def test_default_mix_draws_every_component_in_proportion(mix):
    counts = {}
    for p in mix.problems(100, seed=0):
        counts[p.task.name] = counts.get(p.task.name, 0) + 1
    assert counts == {label: round(100 * w) for label, _, w in DEFAULT_MIX}


def test_unknown_task_and_bad_difficulty_are_clear_errors():
    with pytest.raises(NanoseekError, match="unknown task 'no_such_task'.*default.*chain_sum"):
        get_task("no_such_task")
    with pytest.raises(NanoseekError, match="bad difficulty"):
        get_task("chain_sum", no_such_knob=3)
    with pytest.raises(NanoseekError, match="fixes its own difficulty"):
        get_task("default", min_terms=2)
    with pytest.raises(NanoseekError, match="split"):
        get_task("chain_sum").problems(3, split="test")


def test_tasks_without_reasoning_gym(monkeypatch):
    """reasoning-gym is an optional extra: without it a typo is still an unknown task listing the known
    ones, and a reasoning-gym task names the extra to install, instead of a ModuleNotFoundError."""
    for name in ("reasoning_gym", "reasoning_gym.factory"):  # None in sys.modules: the import raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(NanoseekError, match=r"unknown task 'digitsum'\. Available tasks: default; 'digit_sum'; "
                                            r"'jsonl:<path>'.*reasoning-gym is not installed \(pip install -e '\.\[rl\]'\)"):
        get_task("digitsum")
    with pytest.raises(NanoseekError, match=r"'chain_sum' task needs the reasoning-gym package.*pip install -e '\.\[rl\]'"):
        get_task("default")
    with pytest.raises(NanoseekError, match=r"'chain_sum' task needs the reasoning-gym package"):
        get_task("rg:chain_sum")  # surely reasoning-gym's: not "unknown"
    assert get_task("digit_sum").problems(2, seed=0)  # tasks of nanoseek's own still work


def test_a_jsonl_task_without_math_verify_says_so_before_any_generation(monkeypatch, tmp_path):
    """math-verify scores jsonl tasks; without it the import failed only when the first sample was
    scored, after generating them all."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n')
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(NanoseekError, match=r"scored with math-verify, which is not installed: pip install -e '\.\[rl\]'"):
        get_task(f"jsonl:{path}")


def test_jsonl_task_scores_with_math_verify(jsonl_task):
    half = Problem("What is 1 divided by 2?", "1/2", task=jsonl_task)
    for equivalent in ("1/2", "0.5", "\\frac{1}{2}", "$\\frac{1}{2}$", ".5"):
        assert jsonl_task.score(equivalent, half) == 1.0, equivalent
    for wrong in ("1/3", "2", "", None, "half-ish junk"):
        assert jsonl_task.score(wrong, half) == 0.0, wrong
    eval_ps, train_ps = jsonl_task.problems(1000, split="eval"), jsonl_task.problems(1000, split="train")
    assert len(eval_ps) + len(train_ps) == 118 and not {p.question for p in eval_ps} & {p.question for p in train_ps}
    assert all(jsonl_task.score(p.answer, p) == 1.0 for p in eval_ps)


def test_jsonl_task_errors(tmp_path):
    with pytest.raises(NanoseekError, match="not found"):
        get_task(f"jsonl:{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\n')
    with pytest.raises(NanoseekError, match="bad.jsonl:2"):
        get_task(f"jsonl:{bad}")
    # null fields were read as the text "None" and an empty question was asked as is
    for row, why in [({"question": None, "answer": "2"}, "question is None"),
                     ({"question": " ", "answer": "2"}, "question is ' '"),
                     ({"question": "1+1?", "answer": None}, "answer is None"),
                     ({"question": "1+1?", "answer": ""}, "answer is ''"),
                     ({"question": "1+1?", "answer": ["2"]}, r"answer is \['2'\]")]:
        bad.write_text('{"question": "1+1?", "answer": 2}\n' + json.dumps(row) + "\n")
        with pytest.raises(NanoseekError, match=f"bad.jsonl:2: {why}, not a non-empty"):
            get_task(f"jsonl:{bad}")
    # a row that is no object, and a string holding U+2028 (which str.splitlines splits a line on)
    bad.write_text('{"question": "1+1?", "answer": 2}\n[1, 2]\n')
    with pytest.raises(NanoseekError, match="bad.jsonl:2: a JSON list, not an object"):
        get_task(f"jsonl:{bad}")
    bad.write_text(json.dumps({"question": "one\u2028two?", "answer": 2}, ensure_ascii=False) + "\n")
    assert get_task(f"jsonl:{bad}").rows == [("one\u2028two?", "2")]


def test_prompt_keeps_r1zero_structure():
    prompt = r1zero_prompt("What is 2 + 2?")
    assert "What is 2 + 2?" in prompt and prompt.endswith("Assistant: <think>")
    assert "<think> </think>" in prompt and "<answer> </answer>" in prompt
    assert r1zero_prompt("Q", template=R1ZERO_TEMPLATE).endswith("User: Q. Assistant:")
    assert r1zero_completion("2 + 2 = 4.", "4") == " 2 + 2 = 4. </think> <answer>4</answer>"
    assert r1zero_completion("", "4") == " </think> <answer>4</answer>"


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 2 + 2 = 4. </think> <answer>4</answer>", "4"),
        ("<think> 2 + 2 = 4. </think> <answer> 4 </answer>", "4"),
        (" reasoning </think> 4", "4"),
        (" reasoning </think>\n<answer>4", "4"),  # closing tag cut off by the length limit
        (" reasoning </think> <answer>4</answer> trailing junk <answer>5</answer>", "4"),
        (" 2 + 2 = 4. <answer>4</answer>", None),  # reasoning never closed
        (" reasoning </think> <answer></answer>", None),
        (" reasoning </think>   ", None),
        ("", None),
        # R1's released models: the last \\boxed{}, nested braces kept; the <answer> tag wins
        (" reasoning </think> so $\\boxed{3}$, no: $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        (" reasoning </think> <answer>4</answer> \\boxed{5}", "4"),
        (" reasoning </think> \\boxed{4", None),  # cut off inside the box
        (" reasoning </think> <answer>\\boxed{7}</answer>", "7"),  # a box inside the answer tag
        (" reasoning </think> $\\boxed{5}$ and \\boxed{", "5"),  # a cut-off box after a closed one
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_synthetic_docs_use_the_rl_format_and_are_deterministic(docs):
    assert docs == synthetic.generate_documents(3000, seed=0)
    assert docs != synthetic.generate_documents(3000, seed=1)
    for doc in docs[:200]:
        prompt, _, completion = doc.rpartition("\nAssistant: <think>")
        question = prompt.split("\nUser: ", 1)[1]
        assert doc == r1zero_prompt(question) + completion
        assert extract_answer(completion) is not None


def test_synthetic_docs_hold_no_eval_problem_of_the_default_mix(docs, mix):
    corpus = "\n".join(docs)
    leaked = [p.question for p in mix.problems(1000, seed=0, split="eval") if p.question in corpus]
    assert leaked == []


def _looks_like_rl_setting(expression: str) -> bool:
    """Whether a chain sum could come from a default-mix setting: its term count and every term's
    digit count are in range (the RL settings have no negative terms). Deliberately generous."""
    terms = expression.split()[::2]
    if any(t.startswith("-") for t in terms):
        return False
    return any(
        d["min_terms"] <= len(terms) <= d["max_terms"]
        and all(d["min_digits"] <= len(t) <= d["max_digits"] for t in terms)
        for _, d, _ in DEFAULT_MIX
    )


def test_synthetic_docs_are_worked_solutions_outside_the_rl_distribution(docs):
    pattern = re.compile(r"arithmetic problem: (.*) =\nAssistant: <think>(.*)</think> <answer>(.*)</answer>")
    for doc in docs:
        expression, reasoning, answer = pattern.search(doc).groups()
        assert not _looks_like_rl_setting(expression), doc
        steps = reasoning.split()  # "a op b = c." per operation, the last result being the answer
        assert len(steps) == 5 * (len(expression.split()) // 2) and steps[-1] == f"{answer}.", doc
        assert int(answer) == eval(expression), doc


def test_worked_sources_do_not_overlap_rl_settings():
    def box(d):
        return range(d["min_terms"], d["max_terms"] + 1), range(d["min_digits"], d["max_digits"] + 1)

    for source in synthetic.SOURCES:
        terms, digits = box(source.difficulty)
        for _, rl, _ in DEFAULT_MIX:
            rl_terms, rl_digits = box(rl)
            assert not (set(terms) & set(rl_terms) and set(digits) & set(rl_digits)), source.label


def test_the_split_ignores_runs_of_whitespace():
    assert split_of("What is 0 + 5?") == split_of("What is 0  + 5?") == split_of(" What is 0 +\n5? ")


def test_digit_sum_asks_for_no_more_questions_than_its_split_holds():
    """length 2 has 100 questions, about 80 of them in train: asking for 90 used to loop forever."""
    with pytest.raises(NanoseekError, match="found only"):
        get_task("digit_sum", length=2).problems(90, split="train")


def test_a_scorer_that_raises_scores_zero():
    """Some reasoning-gym scorers raise on junk answers; a reward must never crash RL."""
    task = get_task("prime_factorization")
    problem = task.problems(1, seed=0)[0]
    assert task.score("I don't know", problem) == 0.0
    assert accuracy_reward(" </think> <answer>I don't know</answer>", problem) == 0.0


def test_jsonl_task_with_no_row_in_the_split_is_a_clear_error(tmp_path):
    """3 rows that all hash to train: eval used to hand the engine no prompt at all and stop with
    'prompts must be ... a non-empty list', which says nothing about the file."""
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"question": f"what is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(3)))
    task = get_task(f"jsonl:{path}")
    assert len(task.problems(5, split="train")) == 3 and task.problems(0) == []
    with pytest.raises(NanoseekError, match="none of its 3 rows is in the eval split"):
        task.problems(5, split="eval")
