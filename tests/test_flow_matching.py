"""Flow matching pairs, loss and velocity-deviation scores (RLFR_METHOD §1, §3, §4)."""

import pytest
import torch
from torch import nn

from rlfr.flow import (
    FlowField,
    build_pairs,
    flow_matching_loss,
    flow_matching_loss_per_pair,
    per_sequence_mean,
    sample_timesteps,
    token_scores,
    velocity_deviation,
)

ALL_MODES = ("token_post", "token_pre", "identity")


def _random_batch(seed: int, num_layers=3, bsz=4, seq_len=9, d=5):
    """Random latents with a response mask (targets) and a context mask (real tokens) that contains it:
    left padding, a prompt, then a response with holes (rows of the entropy filter have them)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_layers, bsz, seq_len, d, generator=gen)
    context = torch.ones(bsz, seq_len, dtype=torch.bool)
    context[:, 0] = False  # left padding
    context[1, :3] = False
    context[2, -2:] = False  # right padding after a short response
    mask = (torch.rand(bsz, seq_len, generator=gen) < 0.7) & context
    mask[:, :3] = False  # positions 1-2 are the prompt
    mask[-1] = False  # a row without response
    layer_values = torch.arange(1, num_layers + 1, dtype=torch.float32) / (num_layers + 1)
    return latents, layer_values, mask, context


def _cond_pos(mode, k, shift):
    return {"token_post": k - shift, "token_pre": k + shift, "identity": k}[mode]


def _reference_pairs(latents, layer_values, mask, context, modes, shift):
    """Slow, obvious: loop over modes, layers, rows and target positions k (a pair's score belongs to k)."""
    out = []
    num_layers, bsz, seq_len, _ = latents.shape
    for m, mode in enumerate(modes):
        for li in range(num_layers):
            for b in range(bsz):
                for k in range(seq_len):
                    c = _cond_pos(mode, k, shift)
                    if not (mask[b, k] and 0 <= c < seq_len and context[b, c]):
                        continue
                    out.append((m, li, b, k, latents[li, b, k], latents[li, b, c], float(layer_values[li])))
    return out


@pytest.mark.parametrize("shift", [1, 2])
def test_build_pairs_matches_loop(shift):
    latents, layer_values, mask, context = _random_batch(0)
    pairs = build_pairs(latents, layer_values, mask, ALL_MODES, shift=shift, context_mask=context)
    ref = _reference_pairs(latents, layer_values, mask, context, ALL_MODES, shift)
    got = sorted(
        zip(pairs.mode_index.tolist(), pairs.layer_index.tolist(), pairs.batch_index.tolist(),
            pairs.position.tolist(), range(len(pairs)))
    )  # fmt: skip
    assert len(got) == len(ref) > 0
    for (m, li, b, k, i), (rm, rli, rb, rk, tgt, cnd, lv) in zip(got, sorted(ref, key=lambda r: r[:4])):
        assert (m, li, b, k) == (rm, rli, rb, rk)
        assert torch.equal(pairs.target[i], tgt) and torch.equal(pairs.cond[i], cnd)
        assert pairs.layer[i].item() == pytest.approx(lv)
    assert pairs.target.dtype == torch.float32 and not pairs.target.requires_grad


def test_build_pairs_detaches_and_casts():
    latents, layer_values, mask, context = _random_batch(1)
    latents = latents.bfloat16().requires_grad_()
    pairs = build_pairs(latents, layer_values, mask, context_mask=context)
    assert pairs.target.dtype == torch.float32 and pairs.cond.dtype == torch.float32
    assert not pairs.target.requires_grad and not pairs.cond.requires_grad
    with pytest.raises(ValueError, match="unknown context mode"):
        build_pairs(latents, layer_values, mask, modes=("token_next",), context_mask=context)
    with pytest.raises(ValueError, match="mask"):
        build_pairs(latents, layer_values, mask.long(), context_mask=context)
    with pytest.raises(ValueError, match="context_mask"):
        build_pairs(latents, layer_values, mask, context_mask=context[:, 1:])


def test_sample_timesteps_logit_normal_and_seeded():
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all() and abs(t.mean().item() - 0.5) < 0.01
    assert torch.equal(t, sample_timesteps(20000, generator=torch.Generator().manual_seed(0)))
    z = torch.logit(t)
    assert abs(z.std().item() - 1.0) < 0.02


def test_flow_loss_weights_and_zero_weight_has_graph():
    latents, layer_values, mask, context = _random_batch(2)
    field = FlowField(dim=5, width=8, depth=1)
    pairs = build_pairs(latents, layer_values, mask, context_mask=context)
    per = flow_matching_loss_per_pair(field, pairs, batch_mul=3, generator=torch.Generator().manual_seed(0))
    assert per.shape == (len(pairs),)
    weights = torch.rand(len(pairs), generator=torch.Generator().manual_seed(1))
    loss = flow_matching_loss(field, pairs, 3, weights, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, (per * weights).sum() / weights.sum())
    zero = flow_matching_loss(field, pairs, weights=torch.zeros(len(pairs)))
    empty = build_pairs(latents, layer_values, torch.zeros_like(mask), context_mask=context)
    for loss in (zero, flow_matching_loss(field, empty)):
        assert loss.item() == 0.0
        field.zero_grad()
        loss.backward()
        assert all(
            p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in field.parameters()
        )
    with pytest.raises(ValueError):
        flow_matching_loss(field, pairs, weights=-torch.ones(len(pairs)))


def test_per_sequence_mean():
    values = torch.tensor([1.0, 3.0, 5.0])
    # rows 0 -> (1 + 3) / 2 = 2, row 1 has no pair -> 0, row 2 -> 5
    assert per_sequence_mean(values, torch.tensor([0, 0, 2]), 3).tolist() == [2.0, 0.0, 5.0]


def _conditional_problem(n, gen, shift=0.0):
    """x1 = A c + 0.05 noise with a fixed A (d = 8): the flow must learn the conditional map."""
    a = torch.randn(8, 8, generator=torch.Generator().manual_seed(123)) / 8**0.5
    cond = torch.randn(n, 8, generator=gen)
    target = cond @ a.T + 0.05 * torch.randn(n, 8, generator=gen) + shift
    return target, cond, torch.full((n,), 0.5)


@pytest.fixture
def one_thread():
    # Tiny matmuls run far slower with 2 threads on a shared 2-core machine (oversubscription).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_flow_matching_learns_and_deviation_separates_shifted_targets(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    field = FlowField(dim=8, width=64, depth=2, freq_dim=32)
    opt = torch.optim.AdamW(field.parameters(), lr=3e-3, weight_decay=0.0)
    from rlfr.flow.matching import FlowPairs

    def pairs_of(target, cond, layer):
        n = len(target)
        idx = torch.arange(n)
        return FlowPairs(target, cond, layer, idx, idx, torch.zeros_like(idx), torch.zeros_like(idx))

    held_out = pairs_of(*_conditional_problem(2048, torch.Generator().manual_seed(99)))
    eval_gen = torch.Generator().manual_seed(5)
    zero_loss = flow_matching_loss(FlowField(dim=8, width=8, depth=1), held_out, generator=eval_gen).item()
    for _ in range(200):
        loss = flow_matching_loss(
            field, pairs_of(*_conditional_problem(256, gen)), batch_mul=2, generator=gen
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = flow_matching_loss(field, held_out, generator=torch.Generator().manual_seed(5)).item()
    print(f"held-out loss {trained:.3f} vs zero field {zero_loss:.3f}")
    assert trained < 0.5 * zero_loss, (trained, zero_loss)

    inside = velocity_deviation(field, *_conditional_problem(300, torch.Generator().manual_seed(7)),
                                timesteps=(0.8,), generator=gen)  # fmt: skip
    shifted = _conditional_problem(300, torch.Generator().manual_seed(8), shift=1.0)
    outside = velocity_deviation(field, *shifted, timesteps=(0.8,), generator=gen)
    # AUROC by pair counting: P(score of a shifted target > score of an in-distribution one).
    auroc = (outside[:, None] > inside[None, :]).float().mean().item()
    print(f"AUROC {auroc:.3f}")
    assert auroc > 0.9, auroc


class PointMassField(nn.Module):
    """Exact optimal velocity for a point-mass target x1: u*(x_t, t) = (x1 - x_t) / (1 - t)."""

    def __init__(self, x1: torch.Tensor):
        super().__init__()
        self.x1 = x1

    def forward(self, x_t, t, cond, layer):
        return (self.x1 - x_t) / (1 - t[:, None])


def test_optimal_field_has_zero_deviation():
    x1 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    dev = velocity_deviation(
        PointMassField(x1), x1, torch.zeros_like(x1), torch.zeros(16), (0.2, 0.5, 0.9), None, gen
    )
    assert dev.abs().max().item() < 1e-9


class LinearField(nn.Module):
    """v = W x_t + t: simple enough to hand-compute the deviation."""

    def __init__(self, d: int):
        super().__init__()
        self.w = torch.randn(d, d, generator=torch.Generator().manual_seed(3))

    def forward(self, x_t, t, cond, layer):
        return x_t @ self.w.T + t[:, None]


def test_velocity_deviation_uses_each_timesteps_weight_and_noise():
    gen = torch.Generator().manual_seed(0)
    x1, cond, layer = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen), torch.zeros(6)
    noise = torch.randn(2, 6, 4, generator=gen)
    field = LinearField(4)
    expected = 0
    for t, eps in zip((0.3, 0.8), noise):
        x_t = t * x1 + (1 - t) * eps
        expected = expected + ((x_t @ field.w.T + t - (x1 - eps)) ** 2).mean(-1) * t / (1 - t)
    got = velocity_deviation(field, x1, cond, layer, timesteps=(0.3, 0.8), noise=noise)
    torch.testing.assert_close(got, expected / 2)
    # (N, d) noise is shared by all timesteps.
    shared = velocity_deviation(field, x1, cond, layer, timesteps=(0.3, 0.8), noise=noise[0])
    torch.testing.assert_close(shared, velocity_deviation(field, x1, cond, layer, (0.3, 0.8), noise[[0, 0]]))
    a = velocity_deviation(field, x1, cond, layer, (0.3, 0.8), generator=torch.Generator().manual_seed(4))
    b = velocity_deviation(field, x1, cond, layer, (0.3, 0.8), generator=torch.Generator().manual_seed(4))
    c = velocity_deviation(field, x1, cond, layer, (0.3, 0.8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for bad in ((), (0.0,), (1.0,), (0.5, 1.2)):
        with pytest.raises(ValueError, match="timesteps"):
            velocity_deviation(field, x1, cond, layer, timesteps=bad)
    with pytest.raises(ValueError, match="noise"):
        velocity_deviation(field, x1, cond, layer, timesteps=(0.3, 0.8), noise=torch.zeros(3, 6, 4))


class NoiseFreeField(nn.Module):
    """v = (c - x_t) / (1 - t) + layer, so v - (x1 - eps) = (c - x1) / (1 - t) + layer: no noise left,
    which lets a loop reference check token_scores exactly (pairing, layer values, averaging)."""

    def forward(self, x_t, t, cond, layer):
        return (cond - x_t) / (1 - t[:, None]) + layer[:, None]


def _reference_scores(latents, layer_values, mask, context, modes, shift, timesteps):
    num_layers, bsz, seq_len, _ = latents.shape
    scores, valid = torch.zeros(bsz, seq_len), torch.zeros(bsz, seq_len, dtype=torch.bool)
    for b in range(bsz):
        for k in range(seq_len):
            values = []
            for mode in modes:
                c = _cond_pos(mode, k, shift)
                if not (mask[b, k] and 0 <= c < seq_len and context[b, c]):
                    continue
                for li in range(num_layers):
                    x1, cv, lv = latents[li, b, k], latents[li, b, c], float(layer_values[li])
                    per_t = [((cv - x1) / (1 - t) + lv).pow(2).mean() * t / (1 - t) for t in timesteps]
                    values.append(sum(per_t) / len(per_t))
            if values:
                scores[b, k], valid[b, k] = sum(values) / len(values), True
    return scores, valid


@pytest.mark.parametrize("modes", [("token_post",), ("token_pre",), ALL_MODES])
@pytest.mark.parametrize("shift", [1, 2])
def test_token_scores_match_loop(modes, shift):
    latents, layer_values, mask, context = _random_batch(4)
    latents = latents.bfloat16().float()
    ref_scores, ref_valid = _reference_scores(latents, layer_values, mask, context, modes, shift, (0.5, 0.8))
    for chunk_size in (3, 8192):
        out = token_scores(NoiseFreeField(), latents, layer_values, mask, modes, shift, timesteps=(0.5, 0.8),
                           chunk_size=chunk_size, context_mask=context)  # fmt: skip
        assert torch.equal(out.valid, ref_valid)
        torch.testing.assert_close(out.scores, ref_scores)
        assert (out.scores[~out.valid] == 0).all() and out.scores.dtype == torch.float32
    assert not (out.valid & ~mask).any()  # only response tokens are ever scored


def test_token_scores_seeded():
    latents, layer_values, mask, context = _random_batch(5)
    field = FlowField(dim=5, width=8, depth=1)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.1)
    runs = [token_scores(field, latents, layer_values, mask, generator=torch.Generator().manual_seed(s),
                         context_mask=context) for s in (0, 0, 1)]  # fmt: skip
    assert torch.equal(runs[0].scores, runs[1].scores) and not torch.equal(runs[0].scores, runs[2].scores)


def test_bf16_autocast_scores_and_loss_stay_close_to_float32():
    """flow.precision=bfloat16: autocast with float32 weights. On a trained-looking field the scores agree
    within a few percent and the shaped rewards select the same tokens (benchmarks/flow_precision.py
    measures this at scale)."""
    torch.manual_seed(0)
    latents, layer_values, mask, context = _random_batch(6, d=16)
    field = FlowField(dim=16, width=32, depth=2)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kw = dict(context_mask=context, timesteps=(0.8,))
    s32 = token_scores(field, latents, layer_values, mask, generator=torch.Generator().manual_seed(1), **kw)
    s16 = token_scores(field, latents, layer_values, mask, generator=torch.Generator().manual_seed(1),
                       autocast_dtype=torch.bfloat16, **kw)  # fmt: skip
    assert torch.equal(s32.valid, s16.valid)
    rel = (s16.scores - s32.scores).abs()[s32.valid] / s32.scores[s32.valid].abs().clamp(min=1e-6)
    assert rel.median() < 0.02 and rel.max() < 0.1
    pairs = build_pairs(latents, layer_values, mask, context_mask=context)
    l32 = flow_matching_loss(field, pairs, 2, generator=torch.Generator().manual_seed(2))
    l16 = flow_matching_loss(
        field, pairs, 2, generator=torch.Generator().manual_seed(2), autocast_dtype=torch.bfloat16
    )
    assert abs(l16.item() - l32.item()) / l32.item() < 0.02
    l16.backward()  # gradients reach the float32 weights
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in field.parameters())


def test_latent_norm_fit_batches_by_hand_and_against_one_fit():
    from rlfr.flow.norm import LatentNorm

    # one layer, d = 1: masked tokens 1, 3 in the first batch and 5 in the second (the 100 and -7 are masked out):
    # mean 3, population variance ((1-3)^2 + 0 + (5-3)^2) / 3 = 8/3
    a = (torch.tensor([[[[1.0], [3.0], [100.0]]]]), torch.tensor([[True, True, False]]))
    b = (torch.tensor([[[[-7.0], [5.0]]]]), torch.tensor([[False, True]]))
    norm = LatentNorm.fit_batches([a, b])
    assert norm.mean.item() == pytest.approx(3.0) and norm.std.item() == pytest.approx((8 / 3) ** 0.5)
    one = LatentNorm.fit_batches(iter([a]))  # one batch: exactly fit
    ref = LatentNorm.fit(*a)
    assert torch.equal(one.mean, ref.mean) and torch.equal(one.std, ref.std)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 5, 7, 4, generator=g) * 50 + 20  # far from 0 and 1, as hidden states are
    mask = torch.rand(5, 7, generator=g) > 0.3
    whole = LatentNorm.fit(lat, mask)
    parts = LatentNorm.fit_batches((lat[:, i : i + 2], mask[i : i + 2]) for i in range(0, 5, 2))
    torch.testing.assert_close(parts.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.std, whole.std, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no batch"):
        LatentNorm.fit_batches([])
