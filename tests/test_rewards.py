"""Reward interface: built-ins, import specs, weighted sums, validation errors."""

import math

import pytest

from rlfr.reward.functions import CombinedReward, build_reward, check_scores, load_reward_fn
from rlfr.reward.verifier import Verifier


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=1, timeout=120.0) as v:  # a limit no loaded machine reaches
        yield v


COMPLETIONS = ["so \\boxed{4}", "so \\boxed{5}", "I think four"]
ANSWERS = ["4", "4", "4"]


def test_builtins(verifier):
    assert load_reward_fn("math", verifier)(COMPLETIONS, ANSWERS) == [1.0, 0.0, 0.0]
    assert load_reward_fn("format")(COMPLETIONS, ANSWERS) == [1.0, 1.0, 0.0]


def test_import_spec():
    fn = load_reward_fn("rlfr.reward.functions:format_rewards")
    assert fn(COMPLETIONS, ANSWERS) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown reward 'nope'"),
        ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
        ("rlfr.reward.functions:missing", "has no attribute 'missing'"),
        ("rlfr.reward.functions:BUILTINS", "not callable"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward_fn(spec)


def test_combined_weighted_sum(verifier):
    # math [1, 0, 0] * 1.0 + format [1, 1, 0] * 0.5 = [1.5, 0.5, 0.0]
    reward = build_reward([("math", 1.0), ("format", 0.5)], verifier)
    total, parts = reward.compute(COMPLETIONS, ANSWERS)
    assert total == [1.5, 0.5, 0.0]
    assert parts == {"math": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert reward(COMPLETIONS, ANSWERS) == total


def test_validation_names_the_function():
    def short(completions, answers):
        return [1.0]

    def nan(completions, answers):
        return [math.nan] * len(completions)

    with pytest.raises(ValueError, match="reward 'short' returned 1 scores for 3 completions"):
        CombinedReward([(short, 1.0)])(COMPLETIONS, ANSWERS)
    with pytest.raises(ValueError, match="reward 'nan' returned non-finite scores at indices \\[0, 1, 2\\]"):
        CombinedReward([(nan, 1.0)])(COMPLETIONS, ANSWERS)
    with pytest.raises(ValueError, match="non-finite weight"):
        CombinedReward([(short, math.inf)])
    with pytest.raises(ValueError, match="names must be unique"):
        build_reward([("format", 1.0), ("format", 2.0)])
    with pytest.raises(ValueError, match="returned int scores"):
        check_scores("x", 3, 1)
