"""Choosing one of N sampled responses (``rlfr select``): the rules, and accuracy against N from subsets of the
same samples. Pure functions of numbers and strings (no model).

A problem's samples are ``Sample``s: the voting key of the final answer (``rlfr.reward.verifier.answer_key``;
None without an answer), whether it is correct, and its scores, higher = better (``"logp"``: mean token
log-prob; ``"flow_mean"`` / ``"flow_q"``: minus the mean / a quantile of the token deviations).

Rules (``rule_names``), applied to a subset of a problem's samples:
- ``majority``: the most frequent answer (samples without one do not vote);
- ``vote:<score>``: each answer gets the sum of exp(z) over its samples, z the score standardised within the
  subset (``rlfr.group_stats.standardize``): a score-weighted vote; equal scores give majority voting;
- ``best:<score>``: the sample with the highest score (best-of-N), among the samples with an answer when any has
  one;
- ``<score>`` may be ``combined``: z(logp) + weight * z(flow score), both standardised within the subset.
Ties go to the answer (or sample) that comes first in the subset's order; subsets are drawn in random order, so
that is a random tie-break. A rule picks nothing (scores as wrong) when no sample has an answer (votes) or there
is no sample. Every sample with the chosen answer key has the same correctness, so a vote's correctness is that
of the first sample with the winning key.

Accuracy against N (``accuracy_at``): the mean over N-subsets of each problem's samples, the same subsets for every
rule (so rules are compared on the same draws): every N-subset when there are at most ``draws`` of them (N = 1, and
N = N_max: the full set in its order), else ``draws`` random ones in random order. The samples of a problem are
independent draws in random order, so taking them in index order is no bias. pass@N (the ceiling: some sample is
correct) is the unbiased estimator ``rlfr.stats.pass_at_k``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from rlfr.group_stats import standardize
from rlfr.stats import pass_at_k

SCORES = ("logp", "flow_mean", "flow_q")
FLOW_SCORES = ("flow_mean", "flow_q", "combined")


@dataclass(frozen=True)
class Sample:
    key: str | None  # the answer's voting key; None: no final answer
    correct: bool
    scores: dict[str, float]  # score name -> value, higher = better


def rule_names() -> list[str]:
    """Every rule, majority first: majority, then best:/vote: for each score and the combined score."""
    return ["majority"] + [f"{kind}:{s}" for s in (*SCORES, "combined") for kind in ("best", "vote")]


def is_flow_rule(rule: str) -> bool:
    """Whether a rule uses the flow (its score is a flow score or the combined one)."""
    return rule.partition(":")[2] in FLOW_SCORES


def subset_scores(samples: Sequence[Sample], score: str, combine_with: str, weight: float) -> list[float]:
    """The standardised scores (n,) of ``score`` within ``samples``; ``combined``: z(logp) + weight *
    z(``combine_with``)."""
    if score == "combined":
        a = standardize([s.scores["logp"] for s in samples])
        b = standardize([s.scores[combine_with] for s in samples])
        return [x + weight * y for x, y in zip(a, b)]
    return standardize([s.scores[score] for s in samples])


def choose(
    samples: Sequence[Sample], rule: str, combine_with: str = "flow_mean", weight: float = 1.0
) -> int | None:
    """The index (in ``samples``) of the sample ``rule`` picks (module docstring), or None."""
    if not samples:
        return None
    kind, _, score = rule.partition(":")
    if kind == "best":
        z = subset_scores(samples, score, combine_with, weight)
        pool = [i for i, s in enumerate(samples) if s.key is not None] or list(range(len(samples)))
        return max(pool, key=lambda i: (z[i], -i))
    if kind == "majority":
        weights = [1.0] * len(samples)
    elif kind == "vote":
        weights = [math.exp(v) for v in subset_scores(samples, score, combine_with, weight)]
    else:
        raise ValueError(f"unknown selection rule {rule!r}; rules: {', '.join(rule_names())}")
    total: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (s, w) in enumerate(zip(samples, weights)):
        if s.key is not None:
            total[s.key] = total.get(s.key, 0.0) + w
            first.setdefault(s.key, i)
    if not total:
        return None
    best = max(total, key=lambda k: (total[k], -first[k]))
    return first[best]


def rule_correct(
    samples: Sequence[Sample], rule: str, combine_with: str = "flow_mean", weight: float = 1.0
) -> float:
    """1.0 when the sample ``rule`` picks is correct, else 0.0."""
    i = choose(samples, rule, combine_with, weight)
    return float(i is not None and samples[i].correct)


def subsets(n_max: int, n: int, draws: int, rng: random.Random) -> list[list[int]]:
    """The index lists the accuracy at N = n averages over: all C(n_max, n) n-subsets (in index order) when there
    are at most ``draws`` of them, else ``draws`` random n-subsets in random order."""
    if not 1 <= n <= n_max:
        raise ValueError(f"N must be in [1, {n_max}], got {n}")
    if math.comb(n_max, n) <= draws:
        return [list(c) for c in itertools.combinations(range(n_max), n)]
    return [rng.sample(range(n_max), n) for _ in range(draws)]


def accuracy_at(
    problems: Sequence[Sequence[Sample]],
    rules: Sequence[str],
    ns: Sequence[int],
    draws: int,
    seed: int,
    combine_with: str = "flow_mean",
    weight: float = 1.0,
) -> dict[str, dict[int, list[float]]]:
    """Per rule and N: each problem's expected correctness over the subsets of ``subsets`` (P problems of N_max
    samples each -> rule -> N -> (P,)). The subsets are drawn once per (problem, N) from ``random.Random(seed)``
    and shared by every rule."""
    n_max = len(problems[0]) if problems else 0
    if any(len(p) != n_max for p in problems):
        raise ValueError("every problem needs the same number of samples")
    rng = random.Random(seed)
    out: dict[str, dict[int, list[float]]] = {r: {n: [] for n in ns} for r in rules}
    for samples in problems:
        for n in ns:
            picks = [[samples[i] for i in idx] for idx in subsets(n_max, n, draws, rng)]
            for r in rules:
                out[r][n].append(sum(rule_correct(p, r, combine_with, weight) for p in picks) / len(picks))
    return out


def pass_at(problems: Sequence[Sequence[Sample]], ns: Sequence[int]) -> dict[int, list[float]]:
    """N -> each problem's pass@N (unbiased, from its N_max samples): the ceiling of every rule."""
    return {n: [pass_at_k(len(p), sum(s.correct for s in p), n) for p in problems] for n in ns}
