"""Online flow updates: pair counting, weights, and that zero-weight pairs never get trained."""

from __future__ import annotations

import torch

from rlfr.flow import FlowField, build_pairs, pair_counts
from rlfr.flow.online import above_quantile, online_flow_loss, rollout_weights


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 3, 7, 8, generator=g)  # L=2 layers, B=3 rollouts, T=7, d=8
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6] = True  # 4 response tokens -> 4 token_post pairs per layer (the first one's condition
    mask[1, 3:5] = True  # 2 tokens -> 2 pairs                               is the last prompt token)
    mask[2, 6] = True  # 1 token -> 1 pair
    context = torch.ones(3, 7, dtype=torch.bool)
    context[:, 0] = False  # left padding
    return latents, torch.tensor([0.25, 0.5]), mask, context


def test_pair_counts_match_build_pairs():
    latents, lv, mask, ctx = _setup()
    for modes in (("token_post",), ("token_pre", "identity")):
        pairs = build_pairs(latents, lv, mask, modes, shift=1, context_mask=ctx)
        counts = torch.bincount(pairs.batch_index, minlength=3).float()
        assert torch.equal(pair_counts(mask, ctx, modes, 1, num_layers=2), counts)
    # by hand, token_post: (4, 2, 1) pairs per layer, 2 layers
    assert pair_counts(mask, ctx, ("token_post",), 1, 2).tolist() == [8.0, 4.0, 2.0]


def test_zero_weight_pairs_are_logged_but_not_trained():
    torch.manual_seed(0)
    latents, lv, mask, ctx = _setup()
    field = FlowField(dim=8, width=16, depth=2)
    for p in field.parameters():  # leave the zero-init so every parameter can receive gradient
        torch.nn.init.normal_(p, std=0.1)
    pairs = build_pairs(latents, lv, mask, context_mask=ctx)
    correct = torch.tensor([True, False, False])
    w = rollout_weights(correct, soft_flow=0.0)  # (1, 0, 0)
    assert w.tolist() == [1.0, 0.0, 0.0]
    total = (w * pair_counts(mask, ctx, ("token_post",), 1, 2)).sum()  # 8 trained pairs
    out = online_flow_loss(field, pairs, w[pairs.batch_index], total, batch_mul=2)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())
    assert (
        out.per_pair.shape == (len(pairs),) and (out.per_pair > 0).all()
    )  # wrong rollout's pairs logged too
    # the loss is the mean over the 8 trained pairs of their (detached) per-pair losses
    trained = pairs.batch_index == 0
    assert torch.allclose(out.loss.detach(), out.per_pair[trained].sum() / 8)
    # changing the untrained pairs' targets changes nothing in the gradient (same noise draws)
    latents2 = latents.clone()
    latents2[:, 1] += 5.0
    pairs2 = build_pairs(latents2, lv, mask, context_mask=ctx)
    field.zero_grad()
    torch.manual_seed(0)
    out = online_flow_loss(field, pairs, w[pairs.batch_index], total, batch_mul=2)
    out.loss.backward()
    g0 = [p.grad.clone() for p in field.parameters()]
    field.zero_grad()
    torch.manual_seed(0)
    out2 = online_flow_loss(field, pairs2, w[pairs2.batch_index], total, batch_mul=2)
    out2.loss.backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(g0, field.parameters()))
    assert torch.equal(out.loss.detach(), out2.loss.detach())


def test_no_trained_pair_gives_zero_loss_with_graph():
    latents, lv, mask, ctx = _setup()
    field = FlowField(dim=8, width=16, depth=2)
    pairs = build_pairs(latents, lv, mask, context_mask=ctx)
    out = online_flow_loss(field, pairs, torch.zeros(len(pairs)), torch.tensor(0.0), batch_mul=2)
    out.loss.backward()  # no error, no NaN: every rank under DDP can still call backward
    assert out.loss.item() == 0.0 and torch.isfinite(out.per_pair).all()


def test_above_quantile_by_hand():
    ent = torch.tensor([[0.1, 0.5, 0.9, 0.3, 7.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    # response entropies (0.1, 0.5, 0.9, 0.3): median (q=0.5) = 0.4 -> keep 0.5 and 0.9
    assert above_quantile(ent, mask, 0.5).tolist() == [[False, True, True, False, False]]
    empty = torch.zeros(1, 5, dtype=torch.bool)
    assert not above_quantile(ent, empty, 0.5).any()
