"""Reward functions in TRL's shape and their weighted sum (``reward.funcs``, ``reward.weights``).

Contract
--------
- A reward function is called as ``f(prompts, completions, **columns) -> list[float | None]``, like a reward
  function of TRL's ``GRPOTrainer``: ``prompts`` are the problems as the dataset holds them (before the template),
  ``completions`` the generated texts, one per rollout (the rollouts of one prompt are consecutive, and
  ``prompts[i]`` is the prompt of ``completions[i]``); ``columns`` are the dataset's other columns by their names,
  one value per rollout, and ``answer``, the ground truth as rlfr read it from ``data.answer_field`` (a string, or
  a tuple of accepted forms). Write ``**kwargs`` to take the columns you do not use. ``None`` means "no score
  from this function for this rollout" (a function that only applies to some rows).
- ``load_reward_fn(spec, verifier=None, outcome="binary")``: a built-in name (``"math"``: the answer check,
  scored as ``outcome`` says; ``"format"``: 1.0 when a final-answer form is present) or ``"module:function"``
  (imported from the current directory or ``PYTHONPATH``; a missing module or function or a non-callable raises
  ``ValueError`` naming both).
- ``CombinedReward([(fn, weight), ...])``: ``total_i = sum_k weight_k * fn_k(...)_i`` over the functions that
  scored rollout i (a ``None`` is left out of the sum, as TRL's ``nansum``); a rollout that no function scored is
  an error naming it (a silent 0 would be a reward nobody chose). Every function's output is checked for length
  and finiteness, and errors name the function.
- ``build_reward(specs, verifier, outcome)``: ``CombinedReward`` from ``[(spec, weight), ...]``.

Outcome scoring of the built-in ``math`` (``reward.outcome``):
- ``binary`` (default, the paper's description): 1 for a verified-correct answer, else 0;
- ``authors`` (the authors' reward server, their ``openrlhf/openrlhf/cli/serve_rm.py``): 1 for a correct last
  ``\\boxed{}``, 0.5 for a ``\\boxed{}`` answer that is wrong, 0 without one or with five or more ``\\boxed``. Their
  server also gives 0 to a truncated response, to one with over 30 % characters outside their allowed set and to
  one repeating a 5+-character piece 5 times; those filters are left out here (a truncated response is scored
  like any other). Which rollouts train the flow is decided apart (``reward.correct_if``,
  ``rlfr.reward.correctness``): a boxed-but-wrong rollout earns 0.5 but is never "correct".
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rlfr.reward.verifier import Answer, Verifier, default_verifier, format_reward

RewardFn = Callable[..., Sequence[float | None]]
BUILTINS = ("math", "format")
OUTCOMES = ("binary", "authors")
AUTHORS_MAX_BOXED = 5  # their server scores 0 from this many \boxed on


def authors_outcome(completion: str, correct: bool) -> float:
    """The authors' outcome score of one completion (module docstring): 1 / 0.5 (boxed but wrong) / 0."""
    boxes = completion.count("\\boxed")
    if boxes == 0 or boxes >= AUTHORS_MAX_BOXED:
        return 0.0
    return 1.0 if correct else 0.5


class MathReward:
    """The built-in ``math`` reward: the verifier's answer check, scored as ``outcome`` says."""

    __name__ = "math"

    def __init__(self, verifier: Verifier | None = None, outcome: str = "binary") -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self.verifier, self.outcome = verifier, outcome

    def check(self, completions: list[str], answers: Sequence[Answer]) -> list[bool]:
        """Verified correctness (the shared module-level pool when no verifier was given)."""
        verifier = self.verifier if self.verifier is not None else default_verifier()
        return [s >= 1.0 for s in verifier.verify_batch(completions, answers)]

    def scores(self, completions: list[str], correct: Sequence[bool]) -> list[float]:
        if self.outcome == "authors":
            return [authors_outcome(c, ok) for c, ok in zip(completions, correct)]
        return [1.0 if ok else 0.0 for ok in correct]

    def __call__(
        self, prompts: list[str], completions: list[str], answer: Sequence[Answer], **_: Any
    ) -> list[float]:
        return self.scores(completions, self.check(completions, answer))


def format_rewards(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 per completion that has an extractable final answer."""
    return [format_reward(c) for c in completions]


def load_reward_fn(spec: str, verifier: Verifier | None = None, outcome: str = "binary") -> RewardFn:
    """The reward function named by ``spec`` (see module docstring)."""
    if spec == "math":
        return MathReward(verifier, outcome)
    if spec == "format":
        return format_rewards
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: use one of {BUILTINS} or 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the rlfr script, unlike python, does not add it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward {spec!r}: cannot import module {module_name!r} for function {attr!r} ({e}); the module must "
            "be importable from the working directory or PYTHONPATH"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


def short_name(spec: str) -> str:
    """What a reward is called in logs and ``reward.correct_if``: ``"pkg.mod:fn"`` -> ``"fn"``."""
    return spec.rpartition(":")[2]


def _name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def check_scores(name: str, scores: Sequence[float | None], n: int) -> list[float | None]:
    """``scores`` as floats (None kept); ValueError naming ``name`` if the length or a value is wrong."""
    if not isinstance(scores, Sequence) or len(scores) != n:
        got = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
        raise ValueError(f"reward {name!r} returned {got} scores for {n} completions")
    out = [None if s is None else float(s) for s in scores]
    bad = [i for i, s in enumerate(out) if s is not None and not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward {name!r} returned non-finite scores at indices {bad[:10]}")
    return out


class CombinedReward:
    """Weighted sum of reward functions (module docstring)."""

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

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return self.compute(prompts, completions, columns)[0]

    def compute(
        self,
        prompts: list[str],
        completions: list[str],
        columns: dict[str, Sequence],
        known: dict | None = None,
    ) -> tuple[list[float], dict[str, list[float | None]]]:
        """(total scores, per-function unweighted scores by name, None where a function gave none). ``known``
        holds scores already computed for some functions (by name), which are then not called again."""
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            lengths = {k: len(v) for k, v in columns.items()}
            raise ValueError(f"{n} completions but {len(prompts)} prompts and column lengths {lengths}")
        total: list[float | None] = [None] * n
        parts: dict[str, list[float | None]] = {}
        for name, (fn, w) in zip(self.names, self.components):
            raw = (known or {}).get(name)
            scores = check_scores(name, raw if raw is not None else fn(prompts, completions, **columns), n)
            parts[name] = scores
            total = [t if s is None else (0.0 if t is None else t) + w * s for t, s in zip(total, scores)]
        unscored = [i for i, t in enumerate(total) if t is None]
        if unscored:
            raise ValueError(
                f"no reward function scored completion(s) {unscored[:10]} (every one of {self.names} returned None); "
                f"the first: {completions[unscored[0]][:80]!r}. Return a number from at least one function"
            )
        return total, parts  # type: ignore[return-value]


def build_reward(
    specs: Sequence[tuple[str, float]], verifier: Verifier | None = None, outcome: str = "binary"
) -> CombinedReward:
    """``CombinedReward`` from ``[(spec, weight), ...]``; e.g. ``[("math", 1.0)]`` is the paper's reward."""
    return CombinedReward(
        [(load_reward_fn(s, verifier, outcome), w) for s, w in specs], names=[short_name(s) for s, _ in specs]
    )
