"""Paired statistics for method comparisons: hand-worked McNemar and a bootstrap checked against theory."""

from __future__ import annotations

import math
import random

import pytest

from rlfr.stats import compare_arms, mcnemar, paired_bootstrap, seed_interval, t_quantile


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


@pytest.mark.parametrize(
    "p, df, table",  # two-sided 95 % and 99 % points of Student's t from printed tables
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 9, 2.262),
     (0.975, 30, 2.042), (0.995, 5, 4.032), (0.025, 2, -4.303), (0.5, 3, 0.0)],
)  # fmt: skip
def test_t_quantile_matches_the_tables(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_rejects_bad_arguments():
    for p, df in [(0.0, 2), (1.0, 2), (0.9, 0), (0.9, 2.5)]:
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(p, df)


def test_seed_interval_and_per_seed_differences_by_hand():
    """Three seeds, four problems: per-seed differences +0.25, 0, +0.25 (mean 1/6, sd 0.1443), so the
    interval is 1/6 -+ 4.303 * 0.1443 / sqrt(3) = 1/6 -+ 0.3586."""
    from helpers import SEED_ARMS_A as a
    from helpers import SEED_ARMS_B as b

    r = compare_arms(a, b, samples=2)
    assert r["greedy"]["per_seed"] == pytest.approx({"0": 0.25, "1": 0.0, "2": 0.25})
    g = r["greedy"]["across_seeds"]
    assert (g["diff"], g["lo"], g["hi"], g["n"]) == pytest.approx(
        (1 / 6, 1 / 6 - 0.35856, 1 / 6 + 0.35856, 3), abs=1e-4
    )
    assert r["sampled"]["per_seed"] == pytest.approx({"0": 0.125, "1": 0.0, "2": 0.125})
    assert r["sampled"]["across_seeds"]["lo"] == pytest.approx(1 / 12 - 0.17928, abs=1e-4)
    # the problem bootstrap of seed-averaged accuracy has the same mean
    assert r["greedy"]["diff"] == pytest.approx(1 / 6)
    assert seed_interval([0.1]) is None  # one seed: no spread to estimate
    assert compare_arms({"0": a["0"]}, {"0": b["0"]}, samples=0)["greedy"]["across_seeds"] is None
