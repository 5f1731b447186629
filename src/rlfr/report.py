"""Statistics shared by ``rlfr eval``, ``rlfr compare`` and ``rlfr inspect`` (pure functions, no models).

- ``pass_at_k(n, c, k)``: the unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", eq. 1 and their numpy snippet): 1 - C(n-c, k) / C(n, k), computed as
  1 - prod_{i=n-c+1}^{n} (1 - k / i) so that no large binomial is ever formed.
- ``avg_at_k(c, n)``: the expected fraction of correct samples, c / n (avg@k with n = k samples).
- ``powers_of_two(k_max)``: 1, 2, 4, ... <= k_max (the k reported for pass@k).
- ``mean_std`` / ``format_mean_std``: sample mean and standard deviation (ddof = 1; 0 for one value).
- ``auroc(scores, positive)``: probability that a random positive scores higher than a random negative,
  ties counting 1/2 (Mann-Whitney U / (n_pos n_neg)); None when one class is missing.
- ``token_class(text)``: digits / operators / words / whitespace+punct, for the flow-reward statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """'45.0 ± 2.1' (values scaled, e.g. accuracies to percent); 'n/a' for no values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
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
