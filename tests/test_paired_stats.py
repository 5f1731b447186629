"""Paired statistics for method comparisons: hand-worked McNemar and a bootstrap checked against theory."""

from __future__ import annotations

import math
import random

import pytest

from rlfr.eval.stats import mcnemar, paired_bootstrap


def test_mcnemar_hand_worked():
    # a right / b wrong on 4 problems, the reverse on 1, 5 ties: n = 5 discordant, k = 1
    a = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]
    b = [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    r = mcnemar([bool(x) for x in a], [bool(x) for x in b])
    # P(X <= 1) for Bin(5, 1/2) = (1 + 5) / 32; two-sided: 12 / 32 = 0.375
    assert (r.n10, r.n01) == (4, 1) and r.p_value == pytest.approx(0.375)
    assert mcnemar([True, False], [True, False]).p_value == 1.0  # no discordant pair
    # 10 vs 0: 2 / 1024
    assert mcnemar([True] * 10, [False] * 10).p_value == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_paired_bootstrap_mean_and_interval():
    a, b = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    r = paired_bootstrap(a, b, iters=2000, seed=0)
    assert r.mean == pytest.approx(0.5) and r.n == 4 and 0.0 <= r.lo <= r.mean <= r.hi <= 1.0
    # identical methods: a zero-width interval at 0
    same = paired_bootstrap(a, a, iters=200)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    # a large sample: the interval's half-width is close to 1.96 sd / sqrt(n) of the differences
    rng = random.Random(1)
    n = 400
    x = [float(rng.random() < 0.6) for _ in range(n)]
    y = [float(rng.random() < 0.5) for _ in range(n)]
    r = paired_bootstrap(x, y, iters=4000, seed=2)
    d = [p - q for p, q in zip(x, y)]
    m = sum(d) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1))
    assert (r.hi - r.lo) / 2 == pytest.approx(1.96 * sd / math.sqrt(n), rel=0.1)
    assert paired_bootstrap(x, y, iters=500, seed=3) == paired_bootstrap(x, y, iters=500, seed=3)
