"""Token credit (RLFR_METHOD §1): a pair's flow score belongs to its TARGET token, in every context mode.

Layout of the hand-worked batch (B = 2, T = 9; P = padding, p = prompt, r = response, E = EOS):

    position   0  1  2  3  4  5  6  7  8
    row 0      P  p  p  r  r  r  r  E  P      outlier latent at position 5
    row 1      P  P  P  P  p  r  r  r  E      a one-token prompt

With a zero flow field (the field is exactly 0 at init) the deviation of a pair is
mean_d (x1 - eps)^2 * t / (1 - t): it depends on the target latent only, so an outlier latent (all 10s,
against zeros elsewhere) makes exactly its own position's score about 100x larger than any other.
"""

from __future__ import annotations

import pytest
import torch

from rlfr.flow import FlowField, build_pairs, pair_counts, token_scores
from rlfr.flow.shaping import shape_flow_rewards
from rlfr.rl.advantages import token_advantages

J = 5  # the outlier's position in row 0
CONTEXT = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
RESPONSE = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)

# Scored positions, worked out by hand from the layout: token_post needs a real token s before the target
# (the prompt counts: row 0's first response token is scored against the last prompt token), token_pre a
# real token s after it (so the last s response tokens, EOS included, have no condition), identity none.
SCORED = {
    ("token_post", 1): [[3, 4, 5, 6, 7], [5, 6, 7, 8]],
    ("token_post", 2): [[3, 4, 5, 6, 7], [6, 7, 8]],  # row 1, position 5: position 3 is padding
    ("token_pre", 1): [[3, 4, 5, 6], [5, 6, 7]],
    ("token_pre", 2): [[3, 4, 5], [5, 6]],
    ("identity", 1): [[3, 4, 5, 6, 7], [5, 6, 7, 8]],
    ("identity", 2): [[3, 4, 5, 6, 7], [5, 6, 7, 8]],
}


def _latents(num_layers=2, d=4):
    lat = torch.zeros(num_layers, 2, 9, d)
    lat[:, 0, J] = 10.0
    return lat, torch.tensor([0.25, 0.5])


@pytest.mark.parametrize("mode,shift", sorted(SCORED))
def test_outlier_gets_its_own_score_and_penalty(mode, shift):
    lat, lv = _latents()
    field = FlowField(dim=4, width=8, depth=1)  # zero output at init
    sc = token_scores(field, lat, lv, RESPONSE, (mode,), shift, (0.8,), torch.Generator().manual_seed(0),
                      context_mask=CONTEXT)  # fmt: skip
    for b in range(2):
        assert sc.valid[b].nonzero().flatten().tolist() == SCORED[(mode, shift)][b]
    assert not (sc.valid & ~RESPONSE).any()  # prompt and padding are never scored
    assert int(sc.scores[0].argmax()) == J
    # (10 - eps)^2 * 4 is about 400 against about 4 for a zero latent
    others = torch.cat([sc.scores[0, :J], sc.scores[0, J + 1 :]])
    assert sc.scores[0, J] > 50 * others.max()

    r = shape_flow_rewards(sc.scores, sc.valid, beta=0.01, eta=0.6, top_k=15)
    # row 0: min-max puts the outlier at 1 and everything else below 0.03, so only J is penalised
    assert r[0].nonzero().flatten().tolist() == [J]
    torch.testing.assert_close(r[0, J], torch.tensor(-0.01))
    assert (r[~RESPONSE] == 0).all()

    adv = token_advantages(torch.tensor([0.5, -0.5]), r, RESPONSE)
    # reward-to-go includes the token's own reward: every response token up to and including J carries it
    for k in range(3, 8):
        expected = 0.5 + (-0.01 if k <= J else 0.0)
        assert adv[0, k].item() == pytest.approx(expected)
    assert (adv[~RESPONSE] == 0).all()


@pytest.mark.parametrize("mode,shift", sorted(SCORED))
def test_pairs_and_counts_follow_the_same_rule(mode, shift):
    lat, lv = _latents()
    pairs = build_pairs(lat, lv, RESPONSE, (mode,), shift, context_mask=CONTEXT)
    for b in range(2):
        got = sorted(set(pairs.position[pairs.batch_index == b].tolist()))
        assert got == SCORED[(mode, shift)][b]
    # the targets are the scored tokens' own latents, the conditions s before / after (identity: the same)
    sel = (pairs.batch_index == 0) & (pairs.position == J)
    assert (pairs.target[sel] == 10.0).all()
    if mode != "identity":
        assert (pairs.cond[sel] == 0.0).all()
    counts = pair_counts(RESPONSE, CONTEXT, (mode,), shift, num_layers=2)
    assert counts.tolist() == [2.0 * len(SCORED[(mode, shift)][b]) for b in range(2)]
