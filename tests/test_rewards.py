"""Rule-based rewards: accuracy via the task's scorer, the R1-Zero format rule, weighted combination."""

import pytest

from nanoseek.data.tasks import Problem, get_task, r1zero_completion
from nanoseek.errors import NanoseekError
from nanoseek.rewards import (
    accuracy_reward,
    combine_rewards,
    format_reward,
    get_reward,
    register_reward,
    REWARDS,
)


@pytest.fixture(scope="module")
def problem():
    return get_task("default").problems(1, seed=0)[0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 3 + 4 = 7. </think> <answer>7</answer>", 1.0),
        ("<think> 3 + 4 = 7. </think>\n<answer>7</answer>\n", 1.0),  # the model opened <think> itself
        (" </think> <answer>7</answer>", 1.0),  # answer-only is still the template
        (" 3 + 4 = 7. <answer>7</answer>", 0.0),  # missing </think>
        (" 3 + 4 = 7. </think> <answer></answer>", 0.0),  # empty answer
        (" 3 + 4 = 7. </think> <answer>  </answer>", 0.0),
        (" 3 + 4 = 7. </think> 7", 0.0),  # answer without its tags
        (" 3 + 4 = 7. </think> <answer>7", 0.0),  # unclosed answer
        (" 3 + 4 = 7. </think> <answer>7</answer> and more", 0.0),  # text after the answer
        (" a </think> b </think> <answer>7</answer>", 0.0),  # two </think>
        ("<think> a <think> b </think> <answer>7</answer>", 0.0),
        (" a </think> <answer>7 <answer>8</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, None) == expected


def test_accuracy_reward_uses_the_task_scorer(problem):
    assert accuracy_reward(r1zero_completion("reasoning", problem.answer), problem) == 1.0
    assert accuracy_reward(r1zero_completion("", problem.answer), problem) == 1.0
    assert accuracy_reward(r1zero_completion("reasoning", str(int(problem.answer) + 1)), problem) == 0.0
    assert accuracy_reward(f" {problem.answer} <answer>{problem.answer}</answer>", problem) == 0.0  # no </think>


def test_accuracy_reward_without_task_uses_math_verify():
    p = Problem("What is 1 divided by 2?", "\\frac{1}{2}")
    assert accuracy_reward(" 1/2 = 0.5 </think> <answer>0.5</answer>", p) == 1.0
    assert accuracy_reward(" </think> <answer>1/3</answer>", p) == 0.0


def test_combine_rewards_weights_and_breakdown(problem):
    good, sloppy = r1zero_completion("r", problem.answer), f" r </think> {problem.answer} junk"
    reward = combine_rewards({"accuracy": 1.0, "format": 0.1})
    assert reward(good, problem) == pytest.approx(1.1)
    assert reward(" r </think> <answer>nope</answer>", problem) == pytest.approx(0.1)
    assert reward.breakdown(good, problem) == {"accuracy": 1.0, "format": 1.0}
    assert combine_rewards(["accuracy", "format"])(good, problem) == 2.0  # R1: equal weights
    assert combine_rewards(["format"])(sloppy, problem) == 0.0


def test_reward_registry_accepts_user_rewards(problem):
    def brevity(completion, problem):
        return 1.0 if len(completion) < 40 else 0.0

    register_reward("brevity", brevity)
    try:
        assert get_reward("brevity") is brevity
        reward = combine_rewards({"brevity": 0.5, accuracy_reward: 1.0})
        assert reward(r1zero_completion("", problem.answer), problem) == 1.5
    finally:
        del REWARDS["brevity"]
    with pytest.raises(NanoseekError, match="unknown reward 'brevity'.*accuracy, format"):
        get_reward("brevity")
    with pytest.raises(NanoseekError, match="at least one"):
        combine_rewards([])


def test_two_callables_with_one_name_are_an_error():
    """Two lambdas are both named "<lambda>": combined, one used to replace the other silently."""
    with pytest.raises(NanoseekError, match="named '<lambda>'"):
        combine_rewards({lambda c, p: 1.0: 1.0, lambda c, p: 10.0: 1.0})
