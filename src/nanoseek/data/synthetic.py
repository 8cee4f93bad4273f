"""Synthetic reasoning text for pretraining, in exactly the format the RL stage prompts with.

Two corpora live here. The reasoning base's (`reasoning_base_documents`, data spec
`synthetic:digit_sum`, configs/pretrain_reasoning.toml) is the R1-Zero base of the CPU demo: the
same prompt answered directly in most documents and with a worked chain in a minority. The older
chain-sum mix below (`generate_documents`) is the synthetic part of the default Shakespeare corpus.

Each document is `r1zero_prompt(question) + r1zero_completion(reasoning, answer)`: the same template,
the same prefilled "<think>", the same "</think> <answer>...</answer>" ending that the RL stage and
`extract_answer` use. Pretraining on it teaches a tiny model the format and the arithmetic steps.

The mix (`SOURCES`) is worked solutions of reasoning-gym `chain_sum`
("12 + 85 - 40 ="), one "a op b = c." step per operation, for settings EASIER than the RL mix
(`tasks.DEFAULT_MIX`: 3 terms of two digits, 4 terms of one digit): 2-3 terms of one digit
(chaining), 2 terms of two digits (two-digit steps), and 2 terms of 1-3 digits with negative
numbers (the signed, larger running totals that longer chains meet).

Why this holds no worked solution from the RL evaluation distribution: the settings do not overlap
the RL settings (fewer terms or fewer digits; `tests/test_tasks.py` checks the ranges), and every
question comes from the train side of the hash split (`tasks.split_of`), so no eval question appears
at all. The base model sees the format and every kind of single step; carrying a longer chain
through without slipping is what RL has to improve.

Why no answer-only documents for the RL settings (which R1-Zero's rules would allow): with them the
base learns to answer those questions in one guess, without a chain, and scores about 1%: too rare
a success for GRPO's groups to carry any signal (measured: 81-94% of groups had zero reward std).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoseek.data.tasks import (
    DigitSumTask,
    Problem,
    allocate_counts,
    derive_seed,
    get_task,
    r1zero_completion,
    r1zero_prompt,
)
from nanoseek.errors import NanoseekError


@dataclass(frozen=True)
class Source:
    """One slice of the corpus: a reasoning-gym setting and its share."""

    label: str
    dataset: str
    difficulty: dict = field(hash=False)
    weight: float


SOURCES: tuple[Source, ...] = (
    Source("worked chain_sum, 2-3 one-digit terms", "chain_sum",
           dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1), 0.45),
    Source("worked chain_sum, 2 two-digit terms", "chain_sum",
           dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2), 0.275),
    Source("worked chain_sum, 2 signed terms of 1-3 digits", "chain_sum",
           dict(min_terms=2, max_terms=2, min_digits=1, max_digits=3, allow_negation=True), 0.275),
)


def chain_sum_reasoning(expression: str) -> str:
    """The worked solution of a chain sum, one step per operation: "12 + 85 = 97. 97 - 40 = 57."."""
    tokens = expression.split()
    total, steps = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        new = total + int(term) if op == "+" else total - int(term)
        steps.append(f"{total} {op} {term} = {new}.")
        total = new
    return " ".join(steps)


# Worked-solution writers, Problem -> reasoning text, by reasoning-gym dataset.
REASONING: dict[str, Callable[[Problem], str]] = {
    "chain_sum": lambda p: chain_sum_reasoning(p.metadata["entry"]["metadata"]["expression"]),
}


def generate_documents(n: int, seed: int = 0) -> list[str]:
    """`n` synthetic documents in `SOURCES`' proportions, shuffled; the same list for the same seed.

    Documents carry no end-of-text marker; the corpus builder separates them, which is what teaches
    the model to stop after "</answer>".
    """
    docs: list[str] = []
    for i, (source, count) in enumerate(zip(SOURCES, allocate_counts(n, [s.weight for s in SOURCES]))):
        if source.dataset not in REASONING:
            raise NanoseekError(f"no worked-solution writer for {source.dataset!r}; add one to REASONING")
        task = get_task(source.dataset, **source.difficulty)
        for p in task.problems(count, seed=derive_seed("synthetic", i, seed), split="train"):
            docs.append(r1zero_prompt(p.question) + r1zero_completion(REASONING[source.dataset](p), p.answer))
    random.Random(derive_seed("synthetic-order", seed)).shuffle(docs)
    return docs


# ---------------------------------------------------------------- the reasoning base's corpus

WORKED_SHARE = 0.35  # the measured share (probe 2b: 25% was not enough on the V3 model with MoE)


def reasoning_base_documents(n: int, worked_share: float = WORKED_SHARE, seed: int = 0,
                             length: int = 10) -> list[str]:
    """`n` documents of the reasoning base: `DigitSumTask(length)` train-split questions, each in the
    task's R1-Zero prompt, answered directly (" </think> <answer>7</answer>") in most documents and
    with the worked chain (" sums 3127688290 </think> <answer>0</answer>") in exactly
    round(worked_share * n) of them, chosen at random. Every question is distinct and none is in
    the eval split, so `nanoseek eval` and the RL stage's held-out set never meet a question the
    corpus answered. Deterministic for a seed.

    This is R1-Zero's situation in miniature: the base has seen the procedure, worked, in a minority
    of its documents; whether it chooses to use it is what RL can change.
    """
    if not 0.0 <= worked_share <= 1.0:
        raise NanoseekError(f"worked_share={worked_share} must be in [0, 1]")
    task = DigitSumTask(length)
    problems = task.problems(n, seed=derive_seed("reasoning-base", seed), split="train")
    worked = set(random.Random(derive_seed("reasoning-base-worked", seed)).sample(range(n), round(worked_share * n)))
    return [task.prompt(p.question) + r1zero_completion(task.reasoning(p) if i in worked else "", p.answer)
            for i, p in enumerate(problems)]


# data specs for the corpus loader: "synthetic:<name>[?key=value&...]" -> documents
CORPORA: dict[str, Callable[..., list[str]]] = {"digit_sum": reasoning_base_documents}
CORPUS_ARGS = {"documents": int, "worked_share": float, "length": int}
_FORMS = {int: "an integer", float: "a number"}  # how a setting's type reads in an error


def corpus_from_spec(spec: str, seed: int = 0) -> list[str]:
    """The documents a data spec such as `synthetic:digit_sum?documents=200000&worked_share=0.35`
    names (defaults: 100,000 documents, the recipe's worked share, length 10), for `seed`."""
    name, _, query = spec.removeprefix("synthetic:").partition("?")
    if name not in CORPORA:
        raise NanoseekError(f"unknown synthetic corpus {name!r} in {spec!r}; available: {', '.join(CORPORA)}")
    example = f"synthetic:{name}?documents=1000&worked_share=0.35"
    args = {"documents": 100_000}
    # split by hand rather than with parse_qsl, whose error for a setting without "=" names no spec
    for setting in query.split("&") if query else []:
        key, eq, value = setting.partition("=")
        if not eq:
            raise NanoseekError(f"{spec!r}: setting {setting!r} is not key=value; write settings as key=value "
                                f"joined by '&', e.g. {example}")
        if key not in CORPUS_ARGS:
            raise NanoseekError(f"{spec!r}: unknown setting {key!r}; valid: {', '.join(CORPUS_ARGS)}")
        try:
            args[key] = CORPUS_ARGS[key](value)
        except ValueError:
            raise NanoseekError(f"{spec!r}: {key}={value!r} is not {_FORMS[CORPUS_ARGS[key]]}; "
                                f"e.g. {example}") from None
    n = args.pop("documents")
    if n < 1:
        raise NanoseekError(f"{spec!r}: documents={n} must be a positive integer (how many documents to generate)")
    try:
        return CORPORA[name](n, seed=seed, **args)
    except NanoseekError as e:  # a value out of range ("worked_share=2 must be in [0, 1]"): say which spec
        raise NanoseekError(f"{spec!r}: {e}") from None
