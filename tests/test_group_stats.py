"""Separation statistics within groups (``rlfr.group_stats``): hand-worked cases, one where the pooled and the within-group
AUROC part ways, and slow loop references for the vectorised parts."""

from __future__ import annotations

import math
import random

import pytest

from rlfr.group_stats import (
    GroupMean,
    draw_repeatability,
    group_rows,
    pearson,
    standardize,
    within_group_auroc,
    within_group_pearson,
)
from rlfr.stats import auroc, paired_bootstrap


def test_different_base_rates_give_a_high_pooled_and_a_chance_within_group_auroc():
    # problem A is easy (9 of 10 correct) and the score is 3 on every rollout; problem B is hard (1 of 10) and the
    # score is 1 on every rollout: the score knows which problem is easy but nothing within a problem.
    scores = [3.0] * 10 + [1.0] * 10
    labels = [True] * 9 + [False] + [True] + [False] * 9
    groups = ["A"] * 10 + ["B"] * 10
    # pooled: positives 9 x 3, 1 x 1; negatives 1 x 3, 9 x 1. Pairs: 9 x 1 ties (3 vs 3) = 4.5, 9 x 9 wins
    # (3 vs 1) = 81, 1 x 1 loss (1 vs 3) = 0, 1 x 9 ties (1 vs 1) = 4.5 -> 90 / 100
    assert auroc(scores, labels) == pytest.approx(0.9)
    w = within_group_auroc(scores, labels, groups, iters=0)
    assert (w.mean, w.groups, w.lo, w.hi) == (0.5, 2, None, None)  # all ties within each problem


def test_within_group_auroc_hand_worked_and_uninformative_groups_left_out():
    scores = [0.9, 0.1, 0.5, 0.2, 0.4, 0.3, 0.8, 0.7]
    labels = [True, False, True, False, False, True, True, True]
    groups = [0, 0, 1, 1, 1, 1, 2, 2]
    # group 0: 0.9 > 0.1 -> 1.0; group 1: positives 0.5, 0.3 vs negatives 0.2, 0.4: 0.5 wins both, 0.3 wins one
    # (0.2) -> 3 / 4; group 2: only correct rollouts -> not informative
    w = within_group_auroc(scores, labels, groups, iters=0)
    assert w.mean == pytest.approx((1.0 + 0.75) / 2) and w.groups == 2
    assert within_group_auroc([1.0, 2.0], [True, True], [0, 0]) == GroupMean(None, 0)
    with pytest.raises(ValueError, match="group ids"):
        within_group_auroc([1.0], [True], [0, 1])


def test_group_rows_in_order_of_first_appearance():
    assert group_rows(["a", "b", "a", "c", "b"]) == [[0, 2], [1, 4], [3]]
    assert group_rows([]) == []


def test_the_within_group_interval_resamples_groups_and_matches_paired_bootstrap():
    rng = random.Random(0)
    scores, labels, groups = [], [], []
    for g in range(30):
        for _ in range(8):
            ok = rng.random() < 0.5
            scores.append(rng.gauss(0.6 if ok else 0.0, 1.0))
            labels.append(ok)
            groups.append(g)
    w = within_group_auroc(scores, labels, groups, iters=1000, seed=3)
    per = [auroc([scores[i] for i in r], [labels[i] for i in r]) for r in group_rows(groups)]
    per = [a for a in per if a is not None]
    assert w.groups == len(per) and w.mean == pytest.approx(sum(per) / len(per))
    # the same resampling as the paired bootstrap of the per-group values against 0
    ref = paired_bootstrap(per, [0.0] * len(per), iters=1000, seed=3)
    assert (w.lo, w.hi) == (ref.lo, ref.hi) and w.lo < w.mean < w.hi
    one = within_group_auroc([1.0, 0.0], [True, False], [0, 0])
    assert (one.mean, one.groups, one.lo, one.hi) == (1.0, 1, None, None)  # one group: no interval


def test_pearson_hand_worked():
    # x = 1, 2, 3 (mean 2), y = 2, 4, 7 (mean 13/3): sxy = (-1)(-7/3) + 0 + 1 (8/3) = 5, sxx = 2,
    # syy = 49/9 + 1/9 + 64/9 = 114/9 -> r = 5 / sqrt(2 * 114 / 9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(228 / 9))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_within_group_pearson_averages_groups_of_three_or_more_where_both_vary():
    x = [1, 2, 3, 1, 2, 3, 5, 6, 1, 2, 3]
    y = [1, 2, 3, 3, 2, 1, 0, 9, 4, 4, 4]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # group 0: +1, group 1: -1, group 2: two items (left out), group 3: y constant (left out)
    w = within_group_pearson(x, y, groups, iters=0)
    assert w.mean == pytest.approx(0.0) and w.groups == 2
    # the pooled r mixes groups: a length effect between problems is not one within them
    assert pearson(x, y) != pytest.approx(0.0)


def test_standardize():
    z = standardize([1.0, 2.0, 3.0])  # mean 2, population sd sqrt(2/3)
    assert z == pytest.approx([-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3)])
    assert standardize([5.0, 5.0]) == [0.0, 0.0] and standardize([]) == []
    assert standardize([7.0]) == [0.0]


def test_draw_repeatability_by_hand():
    # 4 draws of 3 items (item 0 correct, 1 and 2 wrong; items 0, 1 in group a, item 2 in group b)
    draws = [[1.0, 0.0, 5.0], [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 1.0, 4.0]]
    out = draw_repeatability(draws, [True, False, False], ["a", "a", "b"], ks=(1, 2, 4), iters=0)
    assert [o["k"] for o in out] == [1, 2, 4]
    # k = 1: draw 0 against draw 1: pearson([1, 0, 5], [3, 2, 1]); AUROC of draw 0: 1 > 0 wins, 1 < 5 loses -> 1/2
    assert out[0]["r"] == pytest.approx(pearson([1, 0, 5], [3, 2, 1])) and out[0]["auroc"] == 0.5
    assert out[0]["auroc_within"]["mean"] == 1.0 and out[0]["auroc_within"]["groups"] == 1
    # k = 2: mean of draws 0-1 = [2, 1, 3] against mean of draws 2-3 = [1, 1, 3]
    assert out[1]["r"] == pytest.approx(pearson([2, 1, 3], [1, 1, 3])) and out[1]["auroc"] == 0.5
    # k = 4: no second half to correlate with; mean [1.5, 1, 3]
    assert out[2]["r"] is None and out[2]["auroc"] == 0.5 and out[2]["auroc_within"]["mean"] == 1.0
    assert [o["k"] for o in draw_repeatability(draws, [True, False, False], [0, 0, 1], ks=(1, 8))] == [1]
    with pytest.raises(ValueError):
        draw_repeatability([[1.0]], [True, False], [0, 0])
