"""Statistics shared by ``rlfr eval``, ``rlfr compare`` and ``rlfr inspect`` (pure functions, no models).

- ``pass_at_k(n, c, k)``: the unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", eq. 1 and their numpy snippet): 1 - C(n-c, k) / C(n, k), computed as
  1 - prod_{i=n-c+1}^{n} (1 - k / i) so that no large binomial is ever formed.
- ``avg_at_k(c, n)``: the expected fraction of correct samples, c / n (avg@k with n = k samples).
- ``powers_of_two(k_max)``: 1, 2, 4, ... <= k_max (the k reported for pass@k).
- ``mean_std`` / ``format_mean_std``: sample mean and standard deviation (ddof = 1; 0 for one value); the
  formatter shows one value alone, without a spread.
- ``auroc(scores, positive)``: probability that a random positive scores higher than a random negative,
  ties counting 1/2 (Mann-Whitney U / (n_pos n_neg)); None when one class is missing.
- ``token_class(text)``: digits / operators / words / whitespace+punct, for the flow-reward statistics.
- ``paired_bootstrap(a, b, iters, seed)``: mean of a - b over paired items (problems) with a percentile
  bootstrap 95 % interval that resamples items (Efron & Tibshirani 1993, ch. 13); a and b are per-problem
  scores (e.g. correctness averaged over seeds) of two methods on the same problems.
- ``mcnemar(a, b)``: McNemar's exact test on paired 0/1 outcomes: the discordant counts n01 (a wrong, b
  right) and n10, and the two-sided p-value of the binomial test of n10 against Bin(n01 + n10, 1/2).
- ``format_diff(d)``: a ``{diff, lo, hi}`` difference of proportions as "+x.x [+lo, +hi]" percentage points.
- ``compare_arms(a, b, samples)``: the two above for two arms evaluated over runs (seeds) on the same N
  problems; each arm maps run -> {"greedy": N 0/1 values, "sampled": N correct counts of ``samples``}.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

TOKEN_CLASSES = ("digits", "operators", "words", "whitespace/punct")
OPERATORS = set("+-*/=^<>%×÷·−")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (requires 0 <= c <= n, 1 <= k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(c: int, n: int) -> float:
    """Mean correctness of n samples, c of them correct."""
    if not 0 <= c <= n or n < 1:
        raise ValueError(f"avg@k needs 0 <= c <= n and n >= 1, got c={c}, n={n}")
    return c / n


def powers_of_two(k_max: int) -> list[int]:
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    return [2**i for i in range(int(math.log2(k_max)) + 1)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std() of no values")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'45.0 ± 2.1' (values scaled, e.g. accuracies to percent); '45.0' for one value (no spread to show);
    'n/a' for no values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0] * scale:.{digits}f}"
    m, s = mean_std([v * scale for v in vals])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties count 1/2); None with one class.

    Computed from average ranks in O(n log n): AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    n_pos = sum(bool(p) for p in positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based average rank of the tie block
        for t in range(i, j + 1):
            ranks[order[t]] = avg
        i = j + 1
    r_pos = sum(r for r, p in zip(ranks, positive) if p)
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def token_class(text: str) -> str:
    """One of ``TOKEN_CLASSES`` for a decoded token (leading/trailing whitespace ignored).

    digits: only digits (and '.' / ',' between them); operators: only characters in ``OPERATORS``;
    words: contains a letter; whitespace/punct: everything else (blank tokens, brackets, punctuation).
    """
    s = text.strip()
    if not s:
        return "whitespace/punct"
    if any(ch.isdigit() for ch in s) and all(ch.isdigit() or ch in ".," for ch in s):
        return "digits"
    if all(ch in OPERATORS for ch in s):
        return "operators"
    if any(ch.isalpha() for ch in s):
        return "words"
    return "whitespace/punct"


def token_reward_stats(
    tokens: Sequence[str], rewards: Sequence[float], min_count: int = 3, top: int = 15, spread_top: int = 10
) -> dict:
    """Flow-reward statistics over scored response tokens (``tokens[i]`` decoded, ``rewards[i]`` its reward).

    -> {"rewarded": tokens with the highest mean reward > 0, "penalised": the most negative mean reward
    (both among tokens seen >= min_count times), "by_class": count / mean / share penalised / share
    rewarded per ``token_class``, "spread": count / mean / std (population) / min / max of the reward of
    the ``spread_top`` most frequent tokens across their contexts}.
    """
    if len(tokens) != len(rewards):
        raise ValueError(f"{len(tokens)} tokens but {len(rewards)} rewards")
    by_tok: dict[str, list[float]] = {}
    for t, r in zip(tokens, rewards):
        by_tok.setdefault(t, []).append(float(r))

    def summary(t: str) -> dict:
        v = by_tok[t]
        m = sum(v) / len(v)
        std = math.sqrt(sum((x - m) ** 2 for x in v) / len(v))
        return {"token": t, "count": len(v), "mean": m, "std": std, "min": min(v), "max": max(v)}

    frequent = [summary(t) for t, v in by_tok.items() if len(v) >= min_count]
    rewarded = sorted((s for s in frequent if s["mean"] > 0), key=lambda s: (-s["mean"], s["token"]))[:top]
    penalised = sorted((s for s in frequent if s["mean"] < 0), key=lambda s: (s["mean"], s["token"]))[:top]
    by_class = {}
    for cls in TOKEN_CLASSES:
        v = [float(r) for t, r in zip(tokens, rewards) if token_class(t) == cls]
        by_class[cls] = {
            "count": len(v),
            "mean": sum(v) / len(v) if v else None,
            "penalised": sum(x < 0 for x in v) / len(v) if v else None,
            "rewarded": sum(x > 0 for x in v) / len(v) if v else None,
        }
    order = sorted(by_tok, key=lambda t: (-len(by_tok[t]), t))[:spread_top]
    return {
        "min_count": min_count,
        "rewarded": rewarded,
        "penalised": penalised,
        "by_class": by_class,
        "spread": [summary(t) for t in order],
    }


@dataclass(frozen=True)
class PairedDiff:
    """mean(a - b) over n paired items and its bootstrap interval [lo, hi] (level ``level``)."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], iters: int = 10000, seed: int = 0, level: float = 0.95
) -> PairedDiff:
    """Percentile bootstrap of the mean paired difference, resampling items with replacement."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_bootstrap needs two equally long non-empty sequences, got {len(a)}, {len(b)}"
        )
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo_i = int(math.floor((1 - level) / 2 * iters))
    hi_i = min(iters - 1, int(math.ceil((1 + level) / 2 * iters)) - 1)
    return PairedDiff(mean=sum(d) / n, lo=means[lo_i], hi=means[hi_i], n=n, level=level)


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs: n10 = a right and b wrong, n01 = a wrong and b right; exact two-sided p-value."""

    n10: int
    n01: int
    p_value: float


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """McNemar's exact test on paired binary outcomes (e.g. two methods' correctness per problem)."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar needs paired outcomes, got {len(a)} and {len(b)}")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n10 + n01
    if n == 0:
        return McNemar(n10, n01, 1.0)
    k = min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # P(X <= k), X ~ Bin(n, 1/2)
    return McNemar(n10, n01, min(1.0, 2 * tail))


def compare_arms(a: dict[str, dict], b: dict[str, dict], samples: int) -> dict:
    """Arm ``a`` against arm ``b`` on the same N problems; each maps run -> {"greedy": N ints 0/1, "sampled": N
    correct counts out of ``samples``}. -> {"greedy": {diff, lo, hi, n}, "sampled": ... (when ``samples`` > 0),
    "mcnemar_greedy": {run: {n10, n01, p}}}: ``paired_bootstrap`` of the per-problem accuracy averaged over each
    arm's runs, and ``mcnemar`` per run present in both arms."""
    out = {}
    kinds = [("greedy", 1)] + ([("sampled", samples)] if samples else [])
    for kind, k in kinds:
        va = [[x / k for x in r[kind]] for r in a.values()]
        vb = [[x / k for x in r[kind]] for r in b.values()]
        n = len(va[0])
        ma = [sum(v[i] for v in va) / len(va) for i in range(n)]
        mb = [sum(v[i] for v in vb) / len(vb) for i in range(n)]
        d = paired_bootstrap(ma, mb, iters=10000, seed=0)
        out[kind] = {"diff": d.mean, "lo": d.lo, "hi": d.hi, "n": d.n}
    tests = {}
    for s in sorted(set(a) & set(b)):
        m = mcnemar([bool(x) for x in a[s]["greedy"]], [bool(x) for x in b[s]["greedy"]])
        tests[s] = {"n10": m.n10, "n01": m.n01, "p": m.p_value}
    out["mcnemar_greedy"] = tests
    return out


def format_diff(d: dict) -> str:
    """``{"diff", "lo", "hi"}`` (proportions) -> "+x.x [+lo, +hi]" in percentage points."""
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
