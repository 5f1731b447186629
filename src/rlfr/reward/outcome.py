"""The outcome of each rollout: its reward (``reward.funcs``) and whether it is *correct* (``reward.correct_if``).

"Correct" decides which rollouts train the flow online (rejection sampling, RLFR §6: the flow learns the
latents of successful reasoning only) and what ``accuracy`` counts; the reward is what the policy maximises.
The two are kept apart on purpose: with ``reward.outcome=authors`` a boxed-but-wrong answer earns 0.5 and is
still not correct, and a reward that mixes in a format bonus never lets a wrong answer train the flow.

``reward.correct_if`` is one of
- ``verifier``: the answer check (``rlfr.reward.verifier``: normalised string or numeric match, then math-verify)
  of the completion's final answer against ``data.answer_field``; what ``auto`` means when ``reward.funcs``
  includes ``math``;
- ``NAME OP NUMBER`` (``my_reward>=1``; OP one of ``>=``, ``>``, ``==``, ``<=``, ``<``): a threshold on the
  unweighted score of the reward function called NAME (its function name, or its full ``module:function``);
  a rollout it gave ``None`` is not correct;
- ``module:function``: a function called like a reward function (``f(prompts, completions, **columns)``) that
  returns one truth value per rollout (``None`` = not correct).

The syntax is read by ``rlfr.schema.parse_correct_if`` (at config load). Contract: ``OutcomeReward(funcs,
weights, verifier, outcome, correct_if)(prompts, completions, columns) -> Scored(rewards, correct, parts)``; ``reward_columns(examples, n)`` gives the columns of ``n`` rollouts per
example. A ``correct_if`` that names no reward function, or a predicate that returns the wrong number of values,
is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlfr.reward.functions import MathReward, build_reward, load_reward_fn
from rlfr.reward.verifier import Verifier
from rlfr.schema import Threshold, parse_correct_if


@dataclass
class Scored:
    rewards: list[float]
    correct: list[bool]
    parts: dict[str, list[float | None]] = field(default_factory=dict)  # unweighted score per function


def reward_columns(examples: Sequence, n: int) -> dict[str, list]:
    """The keyword columns of the reward functions for ``n`` rollouts per example (``rlfr.reward.functions``):
    every column of the rows, then ``answer`` (the ground truth)."""
    names = list(dict.fromkeys(k for ex in examples for k in ex.columns))
    cols = {k: [ex.columns.get(k) for ex in examples for _ in range(n)] for k in names}
    cols["answer"] = [ex.answer for ex in examples for _ in range(n)]
    return cols


class OutcomeReward:
    """``(prompts, completions, columns) -> Scored``: the weighted rewards and the correctness of each rollout."""

    def __init__(
        self,
        funcs: Sequence[str],
        weights: Sequence[float],
        verifier: Verifier,
        outcome: str = "binary",
        correct_if: str = "auto",
    ) -> None:
        self.verifier = verifier
        self.combined = build_reward(list(zip(funcs, weights)), verifier, outcome)
        rule = parse_correct_if(correct_if, tuple(funcs))
        self.rule: str | Threshold | Any = (
            load_reward_fn(rule) if isinstance(rule, str) and ":" in rule else rule
        )
        self.rule_name = rule if isinstance(rule, str) else None
        self.math = next((fn for fn, _ in self.combined.components if isinstance(fn, MathReward)), None)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> Scored:
        verified, known = None, {}
        if self.rule == "verifier" or self.math is not None:  # one answer check serves both
            checker = self.math or MathReward(self.verifier)
            verified = checker.check(completions, columns["answer"])
            if self.math is not None:
                known["math"] = self.math.scores(completions, verified)
        rewards, parts = self.combined.compute(prompts, completions, columns, known)
        if self.rule == "verifier":
            correct = verified
        elif isinstance(self.rule, Threshold):
            correct = [self.rule(s) for s in parts[self.rule.name]]
        else:
            flags = self.rule(prompts, completions, **columns)
            if len(flags) != len(completions):
                raise ValueError(
                    f"reward.correct_if={self.rule_name}: returned {len(flags)} values for {len(completions)} completions"
                )
            correct = [bool(f) for f in flags]
        return Scored(rewards, correct, parts)
