"""Synthetic reasoning text for pretraining, in exactly the format the RL stage prompts with.

Each document is `r1zero_prompt(question) + r1zero_completion(reasoning, answer)`: the same template,
the same prefilled "<think>", the same "</think> <answer>...</answer>" ending that the RL stage and
`extract_answer` use. Pretraining on it teaches a tiny model the format and the arithmetic steps.

The mix (`SOURCES`, printed by `describe()`) is worked solutions of reasoning-gym `chain_sum`
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


def generate_documents(n: int, seed: int = 0, sources: tuple[Source, ...] = SOURCES) -> list[str]:
    """`n` synthetic documents in `sources`' proportions, shuffled; the same list for the same seed.

    Documents carry no end-of-text marker; the corpus builder separates them, which is what teaches
    the model to stop after "</answer>".
    """
    docs: list[str] = []
    for i, (source, count) in enumerate(zip(sources, allocate_counts(n, [s.weight for s in sources]))):
        if source.dataset not in REASONING:
            raise NanoseekError(f"no worked-solution writer for {source.dataset!r}; add one to REASONING")
        task = get_task(source.dataset, **source.difficulty)
        for p in task.problems(count, seed=derive_seed("synthetic", i, seed), split="train"):
            docs.append(r1zero_prompt(p.question) + r1zero_completion(REASONING[source.dataset](p), p.answer))
    random.Random(derive_seed("synthetic-order", seed)).shuffle(docs)
    return docs


def describe(sources: tuple[Source, ...] = SOURCES) -> str:
    """A readable table of the mix: share, kind and reasoning-gym settings of each source."""
    total = sum(s.weight for s in sources)
    lines = ["synthetic pretraining mix (reasoning-gym chain_sum, R1-Zero format):"]
    for s in sources:
        lines.append(f"  {100 * s.weight / total:5.1f}%  {s.label}: {s.dataset} {s.difficulty}")
    return "\n".join(lines)
