"""Reward functions: ``RewardFn(completions, answers) -> scores`` and their weighted sum.

Contract
--------
- ``RewardFn = Callable[[list[str], list[Answer]], list[float]]``: one finite float per completion.
- ``load_reward_fn(spec, verifier=None)``: a built-in name (``"math"``: verifier correctness, 1.0/0.0;
  ``"format"``: 1.0 when a boxed/answer form is present) or ``"package.module:function"`` (imported; a
  missing module/attribute or a non-callable raises ``ValueError`` naming the spec).
- ``CombinedReward([(fn, weight), ...])``: ``score_i = sum_k weight_k * fn_k(...)_i``. Every component's
  output is checked for length and finiteness, and errors name the component.
- ``build_reward(specs, verifier)``: ``CombinedReward`` from ``[(spec, weight), ...]``.
- ``OutcomeReward(functions, weights, verifier)``: what RL uses: ``(completions, answers) -> (rewards,
  correct)``, the reward of each completion and whether it passed the answer check (the latter decides
  which rollouts train the flow).

The paper's verifiable reward is ``"math"`` alone with weight 1 (binary 0/1); the flow reward is added
by the trainer, not here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from rlfr.reward.verifier import Answer, Verifier, default_verifier, format_reward

RewardFn = Callable[[list[str], list[Answer]], list[float]]
BUILTINS = ("math", "format")


class MathReward:
    """Correctness from the verifier (the shared module-level pool when ``verifier`` is None)."""

    __name__ = "math"

    def __init__(self, verifier: Verifier | None = None) -> None:
        self.verifier = verifier

    def __call__(self, completions: list[str], answers: list[Answer]) -> list[float]:
        verifier = self.verifier if self.verifier is not None else default_verifier()
        return verifier.verify_batch(completions, answers)


def format_rewards(completions: list[str], answers: list[Answer]) -> list[float]:
    """1.0 per completion that has an extractable final answer (``answers`` unused)."""
    return [format_reward(c) for c in completions]


def load_reward_fn(spec: str, verifier: Verifier | None = None) -> RewardFn:
    """The reward function named by ``spec`` (see module docstring)."""
    if spec == "math":
        return MathReward(verifier)
    if spec == "format":
        return format_rewards
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {BUILTINS} or 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


def _name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def check_scores(name: str, scores: Sequence[float], n: int) -> list[float]:
    """``scores`` as a list of floats; ValueError naming ``name`` if the length or a value is wrong."""
    if not isinstance(scores, Sequence) or len(scores) != n:
        got = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
        raise ValueError(f"reward {name!r} returned {got} scores for {n} completions")
    out = [float(s) for s in scores]
    bad = [i for i, s in enumerate(out) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward {name!r} returned non-finite scores at indices {bad[:10]}")
    return out


class CombinedReward:
    """Weighted sum of reward functions: ``score_i = sum_k w_k * fn_k(completions, answers)_i``."""

    def __init__(self, components: Sequence[tuple[RewardFn, float]], names: Sequence[str] | None = None):
        if not components:
            raise ValueError("CombinedReward needs at least one (fn, weight) component")
        self.components = [(fn, float(w)) for fn, w in components]
        self.names = list(names) if names is not None else [_name(fn) for fn, _ in components]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward names must be unique (they key the logged parts), got {self.names}")
        for name, (_, w) in zip(self.names, self.components):
            if not math.isfinite(w):
                raise ValueError(f"reward {name!r} has non-finite weight {w}")

    def __call__(self, completions: list[str], answers: list[Answer]) -> list[float]:
        return self.compute(completions, answers)[0]

    def compute(
        self, completions: list[str], answers: list[Answer]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(total scores, per-component unweighted scores by name) - the latter for logging."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        total = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for name, (fn, w) in zip(self.names, self.components):
            scores = check_scores(name, fn(completions, answers), len(completions))
            parts[name] = scores
            total = [t + w * s for t, s in zip(total, scores)]
        return total, parts


def build_reward(specs: Sequence[tuple[str, float]], verifier: Verifier | None = None) -> CombinedReward:
    """``CombinedReward`` from ``[(spec, weight), ...]``; e.g. ``[("math", 1.0)]`` is the paper's reward."""
    return CombinedReward([(load_reward_fn(s, verifier), w) for s, w in specs], names=[s for s, _ in specs])


class OutcomeReward:
    """(completions, answers) -> (rewards, correct): the configured reward, and the verifier's 0/1 check."""

    def __init__(self, functions: Sequence[str], weights: Sequence[float], verifier: Verifier) -> None:
        self.verifier = verifier
        self.plain = tuple(functions) == ("math",) and tuple(weights) == (1.0,)
        self.combined = None if self.plain else build_reward(list(zip(functions, weights)), verifier)

    def __call__(self, completions: list[str], answers: list[Answer]) -> tuple[list[float], list[bool]]:
        correct = [s >= 1.0 for s in self.verifier.verify_batch(completions, answers)]
        rewards = [float(c) for c in correct] if self.plain else self.combined(completions, answers)
        return rewards, correct
