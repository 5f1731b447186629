"""Reward interface: TRL-shaped functions (built-ins, import specs, columns, None), weighted sums, the authors'
outcome scoring, which rollouts are correct (``reward.correct_if``), validation errors."""

import math
import sys
import types

import pytest

from rlfr.config import ConfigError, load_config
from rlfr.data import Example
from rlfr.reward.functions import CombinedReward, authors_outcome, build_reward, check_scores, load_reward_fn
from rlfr.reward.outcome import OutcomeReward, reward_columns
from rlfr.reward.verifier import Verifier
from rlfr.schema import RewardConfig, Threshold, parse_correct_if


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=1, timeout=120.0) as v:  # a limit no loaded machine reaches
        yield v


PROMPTS = ["2 + 2?", "2 + 2?", "2 + 2?"]
COMPLETIONS = ["so \\boxed{4}", "so \\boxed{5}", "I think four"]
ANSWERS = ["4", "4", "4"]


@pytest.fixture
def user_module(monkeypatch):
    """An importable module of user reward functions, as a user writes them for TRL."""
    mod = types.ModuleType("my_rewards")

    def exact_match(
        prompts, completions, answer, **kwargs
    ):  # a non-math task: the last word must be the answer
        return [1.0 if c.split()[-1].strip(".") == a else 0.0 for c, a in zip(completions, answer)]

    def hard_only(prompts, completions, difficulty, **kwargs):  # scores only the rows it applies to
        return [len(c) / 100 if d == "hard" else None for c, d in zip(completions, difficulty)]

    def long_enough(prompts, completions, **kwargs):
        return [len(c) > 10 for c in completions]

    mod.exact_match, mod.hard_only, mod.long_enough = exact_match, hard_only, long_enough
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    return mod


def test_builtins_take_trls_arguments(verifier):
    assert load_reward_fn("math", verifier)(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 0.0]
    assert load_reward_fn("format")(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 1.0, 0.0]
    # the authors' scoring: 1 for a correct box, 0.5 for a wrong one, 0 without one
    assert load_reward_fn("math", verifier, "authors")(PROMPTS, COMPLETIONS, answer=ANSWERS) == [
        1.0,
        0.5,
        0.0,
    ]


def test_authors_outcome_by_hand():
    assert authors_outcome("\\boxed{4}", correct=True) == 1.0
    assert authors_outcome("\\boxed{5}", correct=False) == 0.5
    assert authors_outcome("the answer is 5", correct=False) == 0.0  # no box: 0 even with an answer form
    assert authors_outcome("\\boxed{4} " * 5, correct=True) == 0.0  # five boxes: 0 on their server


def test_import_spec():
    fn = load_reward_fn("rlfr.reward.functions:format_rewards")
    assert fn(PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown reward 'nope'"),
        ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod' for function 'fn'"),
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
    total, parts = reward.compute(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert total == [1.5, 0.5, 0.0]
    assert parts == {"math": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert reward(PROMPTS, COMPLETIONS, answer=ANSWERS) == total


def test_columns_reach_the_functions_and_none_is_left_out_of_the_sum(user_module):
    # exact_match [1, 0, 0] * 1.0 + hard_only [None, 16 / 100, None] * 2.0 = [1.0, 0.32, 0.0]: a None adds nothing
    completions = ["It is Paris.", "maybe Lyon or so", "no idea"]
    columns = {"answer": ["Paris", "Paris", "Rome"], "difficulty": ["easy", "hard", "easy"]}
    reward = build_reward([("my_rewards:exact_match", 1.0), ("my_rewards:hard_only", 2.0)])
    total, parts = reward.compute(["q1", "q2", "q3"], completions, columns)
    assert parts == {"exact_match": [1.0, 0.0, 0.0], "hard_only": [None, 0.16, None]}
    assert total == [1.0, 0.32, 0.0]
    alone = build_reward(
        [("my_rewards:hard_only", 1.0)]
    )  # no function scored rows 1 and 3: an error naming them
    with pytest.raises(ValueError, match=r"no reward function scored completion\(s\) \[0, 2\] \(every one of "
                                         r"\['hard_only'\] returned None\)"):  # fmt: skip
        alone.compute(["q1", "q2", "q3"], completions, columns)


def test_reward_columns_repeat_each_row_for_its_rollouts():
    exs = [
        Example("p1", "1", columns={"difficulty": "easy", "final": 1}),
        Example("p2", ("2", "two"), columns={}),
    ]
    assert reward_columns(exs, 2) == {
        "difficulty": ["easy", "easy", None, None],
        "final": [1, 1, None, None],
        "answer": ["1", "1", ("2", "two"), ("2", "two")],
    }


def test_validation_names_the_function():
    def short(prompts, completions, **kwargs):
        return [1.0]

    def nan(prompts, completions, **kwargs):
        return [math.nan] * len(completions)

    with pytest.raises(ValueError, match="reward 'short' returned 1 scores for 3 completions"):
        CombinedReward([(short, 1.0)])(PROMPTS, COMPLETIONS, answer=ANSWERS)
    with pytest.raises(ValueError, match="reward 'nan' returned non-finite scores at indices \\[0, 1, 2\\]"):
        CombinedReward([(nan, 1.0)])(PROMPTS, COMPLETIONS, answer=ANSWERS)
    with pytest.raises(ValueError, match="non-finite weight"):
        CombinedReward([(short, math.inf)])
    with pytest.raises(ValueError, match="names must be unique"):
        build_reward([("format", 1.0), ("format", 2.0)])
    with pytest.raises(ValueError, match="returned int scores"):
        check_scores("x", 3, 1)


# ------------------------------------------------------------------ which rollouts are correct


def test_correct_if_syntax():
    funcs = ("math", "my_rewards:exact_match")
    assert (
        parse_correct_if("auto", funcs)
        == "verifier"
        == parse_correct_if("verifier", ("my_rewards:exact_match",))
    )
    assert parse_correct_if("exact_match>=1", funcs) == Threshold("exact_match", ">=", 1.0)
    assert parse_correct_if(" my_rewards:exact_match > 0.5 ", funcs) == Threshold("exact_match", ">", 0.5)
    assert parse_correct_if("my_rewards:judge", funcs) == "my_rewards:judge"
    for bad, match in (
        ("missing>=1", r"no reward 'missing' in reward.funcs; the names are \['math', 'exact_match'\]"),
        ("exact_match=>1", "expected verifier, NAME OP NUMBER"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_correct_if(bad, funcs)
    # without math, "auto" cannot guess: the config is refused at load, naming the choices
    with pytest.raises(ConfigError, match="reward.correct_if=auto needs math in reward.funcs"):
        load_config(RewardConfig, overrides=["funcs=[my_rewards:exact_match]"])
    with pytest.raises(ConfigError, match="reward.outcome=authors scores the built-in math reward"):
        load_config(RewardConfig, overrides=["funcs=[format]", "outcome=authors", "correct_if=verifier"])


def test_authors_outcome_pays_half_for_a_boxed_wrong_answer_that_is_not_correct(verifier):
    reward = OutcomeReward(["math"], [1.0], verifier, outcome="authors")
    scored = reward(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert scored.rewards == [1.0, 0.5, 0.0] and scored.correct == [True, False, False]
    binary = OutcomeReward(["math"], [1.0], verifier)(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert binary.rewards == [1.0, 0.0, 0.0] and binary.correct == [True, False, False]


def test_a_string_match_task_decides_correctness_by_its_own_reward(verifier, user_module):
    """A non-math task: the reward is exact_match, correct means exact_match >= 1 (the verifier is never
    asked), or a user's predicate."""
    completions = ["It is Paris.", "It is Lyon.", "Paris"]
    columns = {"answer": ["Paris", "Paris", "Paris"]}
    verifier.last_counts.total = -1  # a marker: an answer check would overwrite it
    scored = OutcomeReward(["my_rewards:exact_match"], [1.0], verifier, correct_if="exact_match>=1")(
        ["Capital of France?"] * 3, completions, columns
    )
    assert scored.rewards == [1.0, 0.0, 1.0] and scored.correct == [True, False, True]
    assert verifier.last_counts.total == -1
    by_predicate = OutcomeReward(
        ["my_rewards:exact_match"], [1.0], verifier, correct_if="my_rewards:long_enough"
    )(["Capital of France?"] * 3, completions, columns)
    assert by_predicate.correct == [True, True, False]  # len > 10
    # with a format bonus in the reward, a wrong answer still is not correct
    mixed = OutcomeReward(["math", "format"], [1.0, 0.5], verifier)(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert mixed.rewards == [1.5, 0.5, 0.0] and mixed.correct == [True, False, False]


def test_the_answer_check_runs_once_for_reward_and_correctness(verifier, monkeypatch):
    calls = []
    real = verifier.verify_batch
    monkeypatch.setattr(verifier, "verify_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    OutcomeReward(["math", "format"], [1.0, 0.5], verifier)(PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    assert len(calls) == 1
