"""Statistics shared by ``rlfr eval``, ``rlfr compare``, ``rlfr inspect``, ``rlfr select`` and the training log
(the flow score's AUROC per step, ``runtime.metrics.Accum``): pure functions of numbers, no models, no rlfr imports,
so every layer may use them.

- ``pass_at_k(n, c, k)``: the unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", eq. 1 and their numpy snippet): 1 - C(n-c, k) / C(n, k), computed as
  1 - prod_{i=n-c+1}^{n} (1 - k / i) so that no large binomial is ever formed.
- ``avg_at_k(c, n)``: the expected fraction of correct samples, c / n (avg@k with n = k samples).
- ``powers_of_two(k_max)``: 1, 2, 4, ... <= k_max (the k reported for pass@k).
- ``mean_std`` / ``format_mean_std``: sample mean and standard deviation (ddof = 1; 0 for one value); the
  formatter shows one value alone, without a spread.
- ``auroc(scores, positive)``: probability that a random positive scores higher than a random negative,
  ties counting 1/2 (Mann-Whitney U / (n_pos n_neg)); None when one class is missing.
- the same within groups (``within_group_auroc``, ``within_group_pearson``, ...): ``rlfr.group_stats``.
- ``token_class(text)``: digits / operators / words / whitespace+punct, for the flow-reward statistics.
- ``paired_bootstrap(a, b, iters, seed)``: mean of a - b over paired items (problems) with a percentile
  bootstrap 95 % interval that resamples items (Efron & Tibshirani 1993, ch. 13); a and b are per-problem
  scores (e.g. correctness averaged over seeds) of two methods on the same problems.
- ``mcnemar(a, b)``: McNemar's exact test on paired 0/1 outcomes: the discordant counts n01 (a wrong, b
  right) and n10, and the two-sided p-value of the binomial test of n10 against Bin(n01 + n10, 1/2).
- ``format_diff(d)``: a ``{diff, lo, hi}`` difference of proportions as "+x.x [+lo, +hi]" percentage points.
- ``t_quantile(p, df)``: the p-quantile of Student's t with ``df`` (a positive integer) degrees of freedom,
  by bisection on the exact finite series of its distribution function (Abramowitz & Stegun 26.7.3-4).
- ``seed_interval(diffs, level)``: mean of per-seed differences with a Student-t interval that takes the
  seed as the unit (mean +- t_{(1+level)/2, n-1} s / sqrt(n)): unlike ``paired_bootstrap`` over problems it
  covers the spread between seeds; None for fewer than two seeds.
- ``compare_arms(a, b, samples)``: the above for two arms evaluated over runs (seeds) on the same N
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
    lo, hi = percentile_interval(d, iters, seed, level)
    return PairedDiff(mean=sum(d) / len(d), lo=lo, hi=hi, n=len(d), level=level)


def percentile_interval(values: Sequence[float], iters: int, seed: int, level: float) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (n,): ``iters`` resamples of n items with
    replacement (``random.Random(seed)``)."""
    d, n = list(values), len(values)
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo_i = int(math.floor((1 - level) / 2 * iters))
    hi_i = min(iters - 1, int(math.ceil((1 + level) / 2 * iters)) - 1)
    return means[lo_i], means[hi_i]


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for T ~ Student's t with integer ``df`` >= 1 and t >= 0 (A&S 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, sin, cos = math.cos(theta) ** 2, math.sin(theta), math.cos(theta)
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return sin * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + ... up to cos^(df-3)))
    for j in range(1, (df - 1) // 2):
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + sin * cos * total)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (0 < p < 1; df a positive integer),
    e.g. t_quantile(0.975, 2) = 4.303; accurate to about 1e-9 unless p is within about 1e-12 of 0 or 1
    (where 2p - 1 loses its digits)."""
    if not 0 < p < 1 or int(df) != df or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and a positive integer df, got p={p}, df={df}")
    target = abs(2 * p - 1)
    lo, hi = 0.0, 1.0
    while _t_central_mass(hi, int(df)) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central_mass(mid, int(df)) < target else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    q = (lo + hi) / 2
    return q if p >= 0.5 else -q


def seed_interval(diffs: Sequence[float], level: float = 0.95) -> dict | None:
    """Per-seed differences (n,) -> {"diff": mean, "lo", "hi", "n"}: the Student-t interval of the mean with
    the seed as the unit; None for fewer than two seeds (no spread to estimate)."""
    vals = [float(d) for d in diffs]
    if len(vals) < 2:
        return None
    m, s = mean_std(vals)
    half = t_quantile((1 + level) / 2, len(vals) - 1) * s / math.sqrt(len(vals))
    return {"diff": m, "lo": m - half, "hi": m + half, "n": len(vals)}


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
    arm's runs, and ``mcnemar`` per run present in both arms. Each kind also holds "per_seed" (run -> accuracy
    of a's run minus b's run of the same name, for the runs in both) and "across_seeds" (``seed_interval`` of
    those, None for fewer than two)."""
    out = {}
    kinds = [("greedy", 1)] + ([("sampled", samples)] if samples else [])
    common = [s for s in a if s in b]  # a's order (seed 10 after seed 9)
    for kind, k in kinds:
        va = [[x / k for x in r[kind]] for r in a.values()]
        vb = [[x / k for x in r[kind]] for r in b.values()]
        n = len(va[0])
        ma = [sum(v[i] for v in va) / len(va) for i in range(n)]
        mb = [sum(v[i] for v in vb) / len(vb) for i in range(n)]
        d = paired_bootstrap(ma, mb, iters=10000, seed=0)
        per_seed = {s: (sum(a[s][kind]) - sum(b[s][kind])) / (k * n) for s in common}
        out[kind] = {"diff": d.mean, "lo": d.lo, "hi": d.hi, "n": d.n, "per_seed": per_seed,
                     "across_seeds": seed_interval(list(per_seed.values()))}  # fmt: skip
    tests = {}
    for s in common:
        m = mcnemar([bool(x) for x in a[s]["greedy"]], [bool(x) for x in b[s]["greedy"]])
        tests[s] = {"n10": m.n10, "n01": m.n01, "p": m.p_value}
    out["mcnemar_greedy"] = tests
    return out


def format_diff(d: dict) -> str:
    """``{"diff", "lo", "hi"}`` (proportions) -> "+x.x [+lo, +hi]" in percentage points."""
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
