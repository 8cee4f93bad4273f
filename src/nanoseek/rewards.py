"""Rule-based rewards for R1-Zero RL: plain callables `reward(completion, problem) -> float`.

DeepSeek-R1-Zero uses two rules and no neural reward model: accuracy (the final answer is right)
and format (reasoning inside <think> </think>, then the answer). Rewards are registered by name so
an RL config names them with their weights, `rewards = { accuracy = 1.0, format = 1.0 }` (a list
is refused there; `combine_rewards` also takes one, weight 1 each); add your own with `register_reward`.

    reward = combine_rewards({"accuracy": 1.0, "format": 0.1})
    reward(" 3 + 4 = 7. </think> <answer>7</answer>", problem)   # -> 1.1 when 7 is right
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from nanoseek.data.tasks import ANSWER_END, ANSWER_START, Problem, extract_answer, math_verify_score
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import THINK_END, THINK_START

Reward = Callable[[str, Problem], float]

_TAGS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
# The completion as the prompt leaves it: "<think>" is optional (the default prompt prefills it).
_FORMAT = re.compile(
    rf"\s*(?:{re.escape(THINK_START)})?(?P<think>.*?){re.escape(THINK_END)}"
    rf"\s*{re.escape(ANSWER_START)}(?P<answer>.*?){re.escape(ANSWER_END)}\s*",
    re.DOTALL,
)


def accuracy_reward(completion: str, problem: Problem) -> float:
    """1.0 iff the task scores the extracted answer as fully correct, else 0.0 (no answer: 0.0).

    Binary, as R1's accuracy rule: partial credit from a task's scorer counts as wrong, since it
    is easy to farm (chain_sum gives most of the credit to any answer that contains the right one:
    "-561" earns 0.75 when the answer is "-56"). A problem without a task (built by hand) is graded
    with math-verify against `problem.answer`.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    if problem.task is None:
        return math_verify_score(answer, problem.answer)
    return float(problem.task.score(answer, problem) == 1.0)


def format_reward(completion: str, problem: Problem | None = None) -> float:
    """1.0 iff the completion follows the template, else 0.0.

    Well-formed: optional "<think>" (if the prompt did not prefill it), reasoning (may be empty),
    "</think>", then "<answer>non-empty</answer>" and nothing after it; no tag appears twice.
    `problem` is unused; it is accepted so every reward has the same signature.
    """
    m = _FORMAT.fullmatch(completion)
    if m is None or not m["answer"].strip():
        return 0.0
    if any(tag in m["think"] or tag in m["answer"] for tag in _TAGS):
        return 0.0
    return 1.0


REWARDS: dict[str, Reward] = {"accuracy": accuracy_reward, "format": format_reward}


def register_reward(name: str, fn: Reward) -> None:
    """Make `fn` available by `name` to `get_reward` and `combine_rewards` (and so to RL configs)."""
    REWARDS[name] = fn


def get_reward(name: str) -> Reward:
    """The reward registered as `name`; unknown names raise NanoseekError listing the known ones."""
    if name not in REWARDS:
        raise NanoseekError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


class CombinedReward:
    """A weighted sum of rewards; `breakdown` gives each term for logging (the RL log's reward_<name>)."""

    def __init__(self, weights: Mapping[str, float], fns: Mapping[str, Reward]):
        self.weights, self.fns = dict(weights), dict(fns)

    def breakdown(self, completion: str, problem: Problem) -> dict[str, float]:
        """Each reward's unweighted value, by name."""
        return {name: float(fn(completion, problem)) for name, fn in self.fns.items()}

    def __call__(self, completion: str, problem: Problem) -> float:
        parts = self.breakdown(completion, problem)
        return sum(self.weights[name] * value for name, value in parts.items())

    def __repr__(self) -> str:
        return f"CombinedReward({self.weights})"


def combine_rewards(spec: Mapping[str | Reward, float] | Sequence[str | Reward]) -> CombinedReward:
    """One reward from several: {name or callable: weight}, or a list for equal weights of 1.

    Equal weights are R1's choice ("the accuracy reward and format reward are combined with the
    same weight"); a small format weight such as 0.1 is TinyZero's.
    """
    weights = dict(spec) if isinstance(spec, Mapping) else {item: 1.0 for item in spec}
    if not weights:
        raise NanoseekError("combine_rewards needs at least one reward")
    fns = {}
    named = {}
    for key, w in weights.items():
        name = key if isinstance(key, str) else getattr(key, "__name__", repr(key))
        if name in fns:  # two callables named alike (two lambdas) would silently count as one
            raise NanoseekError(f"two rewards are named {name!r}: give each callable its own __name__")
        fns[name] = get_reward(key) if isinstance(key, str) else key
        named[name] = float(w)
    return CombinedReward(named, fns)
