"""Statistics within groups (the n rollouts of one prompt, the N samples of one problem): how well a score
separates correct from wrong items where only items of one group are compared (GRPO's advantage, choosing one of
N samples). Pure functions of numbers, no models; ``rlfr.stats`` holds the pooled ones they build on.

- ``within_group_auroc(scores, positive, groups)``: the AUROC computed per group (the n rollouts of one
  prompt) over the groups that hold both classes, averaged, with their count and a percentile bootstrap
  interval that resamples groups (``GroupMean``). GRPO compares rollouts of one prompt only, so this is the
  separation that can shape RL; the pooled ``auroc`` also rewards telling easy problems from hard ones (a
  score that only tracks a problem's difficulty has a pooled AUROC above 0.5 and a within-group one of 0.5).
- ``pearson(x, y)`` and ``within_group_pearson(x, y, groups)``: Pearson's r, and its mean over the groups of
  at least 3 items where both vary (``GroupMean``), e.g. the flow score against response length.
- ``standardize(values)``: z-scores (population std; all 0 when the values do not vary).
- ``draw_repeatability(draws, positive, groups, ks)``: how a noisy score (one value per item and noise draw)
  settles as draws are averaged: for each k, the correlation of two independent k-draw means (split-half) and
  the pooled and within-group AUROC of the k-draw mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rlfr.stats import auroc, percentile_interval


@dataclass(frozen=True)
class GroupMean:
    """A per-group statistic averaged over the ``groups`` groups where it is defined (``mean`` None when there is
    none), with a percentile bootstrap interval [lo, hi] at ``level`` that resamples those groups (None with
    fewer than two groups, or without a bootstrap)."""

    mean: float | None
    groups: int
    lo: float | None = None
    hi: float | None = None
    level: float = 0.95

    def to_dict(self) -> dict:
        return {"mean": self.mean, "groups": self.groups, "lo": self.lo, "hi": self.hi, "level": self.level}


def group_rows(groups: Sequence) -> list[list[int]]:
    """The item indices of each group, groups in order of first appearance: [a, b, a] -> [[0, 2], [1]]."""
    rows: dict = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    return list(rows.values())


def _group_mean(values: list[float], iters: int, seed: int, level: float) -> GroupMean:
    if not values:
        return GroupMean(None, 0, level=level)
    mean = sum(values) / len(values)
    if len(values) < 2 or iters < 1:
        return GroupMean(mean, len(values), level=level)
    lo, hi = percentile_interval(values, iters, seed, level)
    return GroupMean(mean, len(values), lo, hi, level)


def within_group_auroc(
    scores: Sequence[float],
    positive: Sequence[bool],
    groups: Sequence,
    iters: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> GroupMean:
    """``auroc`` within each group of ``groups`` (n,) that holds both classes, averaged over those groups, with
    a bootstrap interval over them (``iters`` = 0: none). scores, positive, groups: (n,) each."""
    if not len(scores) == len(positive) == len(groups):
        raise ValueError(f"{len(scores)} scores, {len(positive)} labels and {len(groups)} group ids")
    per_group = [auroc([scores[i] for i in rows], [positive[i] for i in rows]) for rows in group_rows(groups)]
    return _group_mean([a for a in per_group if a is not None], iters, seed, level)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's correlation of x and y (n,) each; None for n < 2 or when either does not vary."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs paired values, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def within_group_pearson(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence,
    iters: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> GroupMean:
    """``pearson`` within each group of at least 3 items where x and y both vary (two points always give +-1),
    averaged over those groups, with a bootstrap interval over them. x, y, groups: (n,) each."""
    if not len(x) == len(y) == len(groups):
        raise ValueError(f"{len(x)} x, {len(y)} y and {len(groups)} group ids")
    per_group = [
        pearson([x[i] for i in rows], [y[i] for i in rows]) for rows in group_rows(groups) if len(rows) >= 3
    ]
    return _group_mean([r for r in per_group if r is not None], iters, seed, level)


def standardize(values: Sequence[float]) -> list[float]:
    """(v - mean) / std with the population std, (n,) -> (n,); all 0 when the values do not vary."""
    vals = [float(v) for v in values]
    if not vals:
        return []
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    # a relative floor: values equal up to rounding count as not varying
    if sd <= 1e-12 * max(1.0, max(abs(v) for v in vals)):
        return [0.0] * len(vals)
    return [(v - m) / sd for v in vals]


def draw_repeatability(
    draws: Sequence[Sequence[float]],
    positive: Sequence[bool],
    groups: Sequence,
    ks: Sequence[int] = (1, 2, 4, 8),
    iters: int = 2000,
    seed: int = 0,
) -> list[dict]:
    """draws: (D, n) scores (higher = positive) of n items under D independent noise draws; positive, groups:
    (n,). For each k <= D in ``ks``: {"k", "r": ``pearson`` of the mean of draws 0..k-1 and the mean of draws
    k..2k-1 (None when 2k > D), "auroc": ``auroc`` of the mean of draws 0..k-1, "auroc_within":
    ``within_group_auroc`` of it (``GroupMean.to_dict``)}."""
    if not draws or any(len(d) != len(positive) for d in draws):
        raise ValueError(f"draws must be D >= 1 lists of {len(positive)} scores")

    def mean_of(lo: int, hi: int) -> list[float]:
        return [sum(d[i] for d in draws[lo:hi]) / (hi - lo) for i in range(len(positive))]

    out = []
    for k in ks:
        if k > len(draws):
            continue
        m = mean_of(0, k)
        w = within_group_auroc(m, positive, groups, iters, seed)
        r = pearson(m, mean_of(k, 2 * k)) if 2 * k <= len(draws) else None
        out.append({"k": k, "r": r, "auroc": auroc(m, positive), "auroc_within": w.to_dict()})
    return out
