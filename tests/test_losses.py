"""Log-probs, entropies, KL estimators and the PPO-clipped policy loss, with hand-worked numbers."""

import math

import pytest
import torch

from rlfr.policy.forward import entropy_from_logits, logprobs_from_logits
from rlfr.rl.losses import kl_penalty, policy_loss, truncated_is_weights

T = True
F = False


def test_logprobs_and_entropy_match_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen, dtype=torch.float64).float().requires_grad_()
    ids = torch.randint(0, 11, (3, 6), generator=gen)
    ref_lp, ref_h = torch.zeros(3, 6), torch.zeros(3, 6)
    for b in range(3):
        for k in range(1, 6):
            # log p(ids[k] | ids[:k]) comes from the logits at position k - 1.
            logp = torch.log_softmax(logits[b, k - 1].detach(), -1)
            ref_lp[b, k] = logp[ids[b, k]]
            ref_h[b, k] = -(logp.exp() * logp).sum()
    for chunk_size in (1, 2, 8):
        torch.testing.assert_close(logprobs_from_logits(logits, ids, chunk_size), ref_lp)
        torch.testing.assert_close(entropy_from_logits(logits, chunk_size), ref_h)
    lp = logprobs_from_logits(logits, ids)
    assert lp.dtype == torch.float32 and (lp[:, 0] == 0).all()
    lp.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logprobs_from_logits(logits.bfloat16(), ids).dtype == torch.float32


def test_kl_estimators_hand_worked():
    logp = torch.tensor([[0.0, math.log(0.5)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])
    # k1 = log p - log p_ref = [log 2, 0].
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[math.log(2), 0.0]]))
    # k3 with r = p_ref / p = .5: r - 1 - log r = -.5 + .693147 = .193147; equal probs -> 0.
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.5 - 1 - math.log(0.5), 0.0]]))
    big = kl_penalty(torch.tensor([[0.0]]), torch.tensor([[-1e4]]), "k3")
    assert torch.isfinite(big).all() and (big >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_policy_loss_hand_worked_clipping():
    mask = torch.ones(1, 1, dtype=torch.bool)

    def loss(logp, adv, **kw):
        return policy_loss(torch.tensor([[logp]]), torch.tensor([[0.0]]), torch.tensor([[adv]]), mask, **kw)

    # ratio = e, A = 1: clipped to 1.2, so the loss is -1.2 and the token counts as clipped.
    out = loss(1.0, 1.0)
    assert out.loss.item() == pytest.approx(-1.2) and out.clip_frac.item() == 1.0
    # ratio = e, A = 1, clip_high .28 (DAPO clip-higher): -1.28.
    assert loss(1.0, 1.0, clip_high=0.28).loss.item() == pytest.approx(-1.28)
    # ratio = e, A = -1: min(-e, -1.2) = -e, the pessimistic unclipped term -> loss e, not clipped.
    out = loss(1.0, -1.0)
    assert out.loss.item() == pytest.approx(math.e) and out.clip_frac.item() == 0.0
    # ratio = .5, A = 1: min(.5, .8) = .5 -> -.5.   ratio = .5, A = -1: clipped to .8 -> .8.
    assert loss(math.log(0.5), 1.0).loss.item() == pytest.approx(-0.5)
    assert loss(math.log(0.5), -1.0, clip_low=0.2).loss.item() == pytest.approx(0.8)
    # approx_kl (k3 of KL(old || new)) at ratio e: e - 1 - 1 = .71828.
    assert loss(1.0, 1.0).approx_kl.item() == pytest.approx(math.e - 2)


def test_ratio_cap_hand_worked():
    """The authors' loss.py caps the ratio at 3 before both surrogates."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    # ratio = e^2 = 7.39 capped to 3, A = -1: min(-3, -1.2) = -3 -> loss 3 with NO gradient (the cap is flat);
    # uncapped it would be e^2 with gradient e^2 pushing the log-prob down.
    logp = torch.tensor([[2.0]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 1), -torch.ones(1, 1), mask, ratio_max=3.0)
    assert out.loss.item() == pytest.approx(3.0)
    out.loss.backward()
    assert logp.grad.item() == 0.0
    uncapped = policy_loss(logp, torch.zeros(1, 1), -torch.ones(1, 1), mask)
    assert uncapped.loss.item() == pytest.approx(math.exp(2))
    # below the cap nothing changes: ratio e, A = -1 -> e either way
    small = torch.tensor([[1.0]])
    assert policy_loss(
        small, torch.zeros(1, 1), -torch.ones(1, 1), mask, ratio_max=3.0
    ).loss.item() == pytest.approx(math.e)
    with pytest.raises(ValueError, match="ratio_max"):
        policy_loss(small, torch.zeros(1, 1), torch.ones(1, 1), mask, ratio_max=1.1)


def test_policy_loss_aggregation_and_empty_rows():
    # ratio 1 everywhere so each token's loss is -A.
    adv = torch.tensor([[0.0, 1, 1, 1], [0, 4, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[F, T, T, T], [F, T, F, F], [F, F, F, F]])  # row 2 is empty (padding)
    zeros = torch.zeros(3, 4)
    # seq_mean_token_mean: row means [-1, -4], mean over the 2 non-empty rows -> -2.5.
    out = policy_loss(zeros, zeros, adv, mask)
    assert out.loss.item() == pytest.approx(-2.5)
    # token_mean: (-1 - 1 - 1 - 4) / 4 tokens = -1.75.
    assert policy_loss(zeros, zeros, adv, mask, aggregation="token_mean").loss.item() == pytest.approx(-1.75)
    empty = policy_loss(zeros, zeros, adv, torch.zeros(3, 4, dtype=torch.bool))
    for value in (empty.loss, empty.clip_frac, empty.approx_kl, empty.kl):
        assert value.item() == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(zeros, zeros, adv, mask, aggregation="sum")


def test_policy_loss_kl_term():
    logp = torch.tensor([[0.0, 0.0]])
    ref = torch.tensor([[math.log(0.5), 0.0]])
    mask = torch.tensor([[T, T]])
    # A = 0, ratio 1: loss = kl_coef * mean k1 = .1 * (log 2 + 0) / 2.
    out = policy_loss(logp, logp, torch.zeros(1, 2), mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k1")
    assert out.loss.item() == pytest.approx(0.1 * math.log(2) / 2)
    assert out.kl.item() == pytest.approx(math.log(2) / 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.zeros(1, 2), mask, kl_coef=0.1)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_gradient_accumulation_sums_to_full_batch(aggregation):
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(6, 7, generator=gen) * 0.1).requires_grad_()
    old = logp.detach() + torch.randn(6, 7, generator=gen) * 0.3
    adv = torch.randn(6, 7, generator=gen)
    mask = torch.rand(6, 7, generator=gen) < 0.6
    mask[2] = False
    num_seq, num_tok = int(mask.any(1).sum()), int(mask.sum())
    full = policy_loss(logp, old, adv, mask, aggregation=aggregation).loss
    (full_grad,) = torch.autograd.grad(full, logp)
    parts = [
        policy_loss(logp[s], old[s], adv[s], mask[s], aggregation=aggregation, num_sequences=num_seq,
                    num_tokens=num_tok).loss
        for s in (slice(0, 2), slice(2, 6))
    ]  # fmt: skip
    total = parts[0] + parts[1]
    (acc_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(acc_grad, full_grad)
    assert torch.isfinite(acc_grad).all() and (acc_grad[~mask] == 0).all()


def test_truncated_is_weights_hand_worked():
    # p_old / p_engine = 0.5 / 0.25 = 2 -> capped at 1.5; 0.2 / 0.4 = 0.5; 0.9 / 0.3 = 3 but masked out -> 1
    old = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)]])
    eng = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.3)]])
    mask = torch.tensor([[T, T, F]])
    w = truncated_is_weights(old, eng, mask, cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 1.0]]))
    # the same with a slow loop over tokens
    loop = [
        min(math.exp(o - e), 1.5) if m else 1.0
        for o, e, m in zip(old[0].tolist(), eng[0].tolist(), mask[0].tolist())
    ]
    assert torch.allclose(w[0], torch.tensor(loop))
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, eng, mask, cap=0.5)
    with pytest.raises(ValueError, match="one shape"):
        truncated_is_weights(old, eng[:, :2], mask, cap=2.0)


def test_is_weights_scale_the_pg_term_only():
    # logp = old_logp: ratio 1, no clipping, per-token loss -A. Advantages (1, 2) with weights (1.5, 0.5):
    # token_mean = -(1.5 * 1 + 0.5 * 2) / 2 = -1.25 (without weights -(1 + 2) / 2 = -1.5)
    logp = torch.tensor([[-0.7, -1.6, -0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 0.0]])
    mask = torch.tensor([[T, T, F]])
    w = torch.tensor([[1.5, 0.5, 1.0]])
    out = policy_loss(logp, logp.detach(), adv, mask, aggregation="token_mean", is_weights=w)
    assert out.loss.item() == pytest.approx(-1.25)
    assert policy_loss(logp, logp.detach(), adv, mask, aggregation="token_mean").loss.item() == pytest.approx(
        -1.5
    )
    # the gradient of token k is -w_k A_k / 2 (d ratio / d logp = 1 at ratio 1)
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.75, -0.5, 0.0]]))
    # the KL term is not weighted: ref = logp - 1 on token 0 only, k1 = 1 there, kl_coef 0.1 adds 0.1 / 2
    ref = logp.detach() - torch.tensor([[1.0, 0.0, 0.0]])
    kl = policy_loss(logp, logp.detach(), adv, mask, aggregation="token_mean", is_weights=w, ref_logp=ref,
                     kl_coef=0.1, kl_estimator="k1")  # fmt: skip
    assert kl.loss.item() == pytest.approx(-1.25 + 0.05)
