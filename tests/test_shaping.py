"""Flow-reward shaping: hand-worked rows and a plain-loop reference (RLFR_METHOD §4)."""

import pytest
import torch

from rlfr.flow.shaping import minmax_normalize, shape_flow_rewards

T = True
F = False


def test_minmax_hand_worked():
    # Row 0: [1, 2, 3, 5] -> (x - 1) / 4 = [0, .25, .5, 1].
    # Row 1: [5, 1, 3, pad=100]: the TRUE min 1 (the authors' code took the second smallest, 3):
    #        (x - 1) / 4 = [1, 0, .5] and the padded 100 is ignored.
    scores = torch.tensor([[1.0, 2, 3, 5], [5, 1, 3, 100]])
    valid = torch.tensor([[T, T, T, T], [T, T, T, F]])
    out = minmax_normalize(scores, valid)
    torch.testing.assert_close(out, torch.tensor([[0, 0.25, 0.5, 1], [1, 0, 0.5, 0]]))


def test_minmax_degenerate_rows_are_zero_not_nan():
    scores = torch.tensor([[2.0, 2, 2, 2], [7.0, 0, 0, 0], [3.0, 1, 9, 9]])
    valid = torch.tensor([[T, T, T, F], [T, F, F, F], [F, F, F, F]])  # constant, single token, empty
    out = minmax_normalize(scores, valid)
    assert torch.equal(out, torch.zeros(3, 4))
    rewards = shape_flow_rewards(scores, valid, bilateral=True, eta=0.0)
    # bilateral 2 * 0 - 1 = -1 would reward every token of a row without information: we give 0.
    assert torch.equal(rewards, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        minmax_normalize(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[T, T]]))


def test_shape_one_sided_hand_worked():
    scores, valid = torch.tensor([[1.0, 2, 3, 5]]), torch.ones(1, 4, dtype=torch.bool)
    # minmax [0, .25, .5, 1]; eta .6 keeps only 1.0 -> r = -0.01 * 1 at position 3.
    torch.testing.assert_close(shape_flow_rewards(scores, valid), torch.tensor([[0, 0, 0, -0.01]]))
    # gamma 2 BEFORE the threshold (the authors' order): [0, .0625, .25, 1]; eta .2 keeps [.25, 1]
    # (.0625 falls below it, although .25 before the power would have passed); beta .1 -> [-.025, -.1].
    out = shape_flow_rewards(scores, valid, beta=0.1, eta=0.2, gamma=2.0)
    torch.testing.assert_close(out, torch.tensor([[0, 0, -0.025, -0.1]]))
    # top_k 1 keeps only the largest.
    out = shape_flow_rewards(scores, valid, beta=0.1, eta=0.2, top_k=1)
    torch.testing.assert_close(out, torch.tensor([[0, 0, 0, -0.1]]))


def test_shape_bilateral_hand_worked():
    scores, valid = torch.tensor([[1.0, 2, 3, 5]]), torch.ones(1, 4, dtype=torch.bool)
    # minmax [0, .25, .5, 1] -> 2x - 1 = [-1, -.5, 0, 1]; |x| > .6 keeps -1 and 1;
    # r = -.01 x = [.01, 0, 0, -.01]: the token inside the flow is rewarded.
    torch.testing.assert_close(shape_flow_rewards(scores, valid, bilateral=True),
                               torch.tensor([[0.01, 0, 0, -0.01]]))  # fmt: skip
    # top_k 2 -> 1 per side: [1, 1.2, 4, 5, 0.9 (pad)]: minmax over valid [0, .05, .75, 1]
    # -> 2x - 1 = [-1, -.9, .5, 1];
    # negatives beyond -.6: -1 (pos 0), -.9 (pos 1) -> keep the most negative (pos 0); positives: 1 (pos 3).
    scores = torch.tensor([[1.0, 1.2, 4, 5, 0.9]])
    valid = torch.tensor([[T, T, T, T, F]])
    out = shape_flow_rewards(scores, valid, beta=1.0, bilateral=True, top_k=2)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0, 0, -1, 0]]))


def test_ties_break_by_lower_position():
    # minmax [0, 1, 1, 1]: three ties above eta; top_k 2 keeps positions 1 and 2.
    scores, valid = torch.tensor([[0.0, 1, 1, 1]]), torch.ones(1, 4, dtype=torch.bool)
    out = shape_flow_rewards(scores, valid, beta=1.0, eta=0.5, top_k=2)
    assert out.tolist() == [[0.0, -1.0, -1.0, 0.0]]
    for no_limit in (None, 0, -1):
        assert shape_flow_rewards(scores, valid, beta=1.0, eta=0.5, top_k=no_limit).tolist() == [
            [0, -1, -1, -1]
        ]


def _reference_minmax(scores, valid, eps=1e-6):
    out = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        vals = [scores[b, k].item() for k in range(scores.shape[1]) if valid[b, k]]
        if not vals or max(vals) - min(vals) < eps:
            continue
        for k in range(scores.shape[1]):
            if valid[b, k]:
                out[b, k] = (scores[b, k] - min(vals)) / (max(vals) - min(vals))
    return out


def _reference_shape(scores, valid, beta, eta, top_k, bilateral, gamma, eps=1e-6):
    x = _reference_minmax(scores, valid, eps)
    out = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        vals = [scores[b, k].item() for k in range(scores.shape[1]) if valid[b, k]]
        if not vals or max(vals) - min(vals) < eps:
            continue
        row = [(2 * x[b, k].item() - 1 if bilateral else x[b, k].item()) for k in range(scores.shape[1])]
        row = [(1.0 if v > 0 else -1.0) * abs(v) ** gamma for v in row]  # the power, sign kept, first
        pos = [k for k in range(len(row)) if valid[b, k] and row[k] > eta]
        neg = [k for k in range(len(row)) if valid[b, k] and bilateral and row[k] < -eta]
        if top_k:
            k_side = top_k // 2 if bilateral else top_k
            pos = sorted(pos, key=lambda k: (-row[k], k))[:k_side]  # largest first, ties -> lower position
            neg = sorted(neg, key=lambda k: (row[k], k))[:k_side]  # most negative first
        for k in pos + neg:
            out[b, k] = -beta * row[k]
    return out


@pytest.mark.parametrize("bilateral", [False, True])
@pytest.mark.parametrize("top_k", [None, 1, 3, 6])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_shape_matches_loop_on_random_rows(bilateral, top_k, gamma):
    gen = torch.Generator().manual_seed(top_k or 0)
    for _ in range(3):
        scores = torch.randint(0, 6, (6, 20), generator=gen).float()  # small integers -> many ties
        valid = torch.rand(6, 20, generator=gen) < 0.8
        valid[0] = False
        scores[1] = 3.0  # constant row
        torch.testing.assert_close(minmax_normalize(scores, valid), _reference_minmax(scores, valid))
        eta = 0.3 if bilateral else 0.5
        got = shape_flow_rewards(scores, valid, 0.01, eta, top_k, bilateral, gamma)
        torch.testing.assert_close(got, _reference_shape(scores, valid, 0.01, eta, top_k, bilateral, gamma))
        assert torch.isfinite(got).all() and (got[~valid] == 0).all()
