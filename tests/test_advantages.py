"""Advantages: hand-worked GRPO groups, reward-to-go, entropy shaping, and loop references."""

import math

import pytest
import torch

from rlfr.rl.advantages import entropy_advantage, group_advantages, kl_rewards, reward_to_go, token_advantages

T = True
F = False


def test_group_advantages_hand_worked():
    # Group [1, 0, 0, 1]: mean .5, unbiased std sqrt(4 * .25 / 3) = .57735 -> +-.5 / .57735 = +-.866025.
    # Group [1, 1, 1, 1]: all equal -> 0 / (0 + 1e-9) = 0 (no NaN).
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    adv = group_advantages(rewards, group_size=4)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 4, normalize_std=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))  # fmt: skip
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), 1, normalize_std=False), torch.zeros(2))
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_group_advantages_match_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (40,), generator=gen).float()
    adv = group_advantages(rewards, group_size=8)
    for g in range(5):
        group = rewards[8 * g : 8 * g + 8].tolist()
        mean = sum(group) / 8
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 7)
        for i in range(8):
            assert adv[8 * g + i].item() == pytest.approx((group[i] - mean) / (std + 1e-9), abs=1e-5)


def test_reward_to_go_hand_worked():
    # r = [9 (prompt), 1, 2, 3, 7 (pad)], response = positions 1..3 -> [0, 6, 5, 3, 0].
    r = torch.tensor([[9.0, 1, 2, 3, 7]])
    mask = torch.tensor([[F, T, T, T, F]])
    assert reward_to_go(r, mask).tolist() == [[0, 6, 5, 3, 0]]


def test_reward_to_go_matches_loop():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(5, 12, generator=gen)
    mask = torch.rand(5, 12, generator=gen) < 0.7
    mask[0] = False
    ref = torch.zeros_like(r)
    for b in range(5):
        for k in range(12):
            if mask[b, k]:
                ref[b, k] = sum(r[b, s] for s in range(k, 12) if mask[b, s])
    torch.testing.assert_close(reward_to_go(r, mask), ref)


def test_token_advantages():
    mask = torch.tensor([[F, T, T, F], [F, F, F, F]])
    a_o = torch.tensor([0.5, -1.0])
    # Plain RLVR: A_o on every response token; the empty (padded) row is all zeros, no NaN.
    assert token_advantages(a_o, None, mask).tolist() == [[0, 0.5, 0.5, 0], [0, 0, 0, 0]]
    # Flow rewards [-.01, -.02] on positions 1, 2 -> reward-to-go [-.03, -.02] -> A = [.47, .48].
    r = torch.tensor([[0, -0.01, -0.02, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(
        token_advantages(a_o, r, mask), torch.tensor([[0, 0.47, 0.48, 0], [0, 0, 0, 0]])
    )
    assert torch.equal(token_advantages(a_o, torch.zeros(2, 4), mask), token_advantages(a_o, None, mask))


def test_entropy_advantage_hand_worked():
    # A=1, H=1: min(.4 * 1, 1 / 2) = .4 -> 1.4.   A=-1, H=2: min(.8, .5) = .5 -> -.5 (sign kept).
    # A=0: bonus min(., 0) = 0 -> 0.              padded position -> 0.
    adv = torch.tensor([[1.0, -1.0, 0.0, 5.0]])
    ent = torch.tensor([[1.0, 2.0, 3.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[T, T, T, F]])
    out = entropy_advantage(adv, ent, mask, alpha=0.4, kappa=2.0)
    torch.testing.assert_close(out, torch.tensor([[1.4, -0.5, 0.0, 0.0]]))
    assert not out.requires_grad  # entropy is detached: the bonus shapes the advantage, it is not a loss
    with pytest.raises(ValueError):
        entropy_advantage(adv, ent, mask, kappa=0.0)


def test_kl_rewards_enter_the_reward_to_go_hand_worked():
    # log p - log p_ref = [_, .5, -1, 2] on a response at positions 1-3; coef .1 -> r = [_, -.05, .1, -.2]
    logp = torch.tensor([[0.0, -0.5, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.0, -1.0, -2.0]])
    mask = torch.tensor([[F, T, T, T]])
    r = kl_rewards(logp, ref, mask, coef=0.1)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 0.1, -0.2]]))
    # A_o = 1: A_k = 1 + sum_{s >= k} r_s = [_, .85, .9, .8] (the authors' RLVR baseline with k1 in the reward)
    torch.testing.assert_close(
        token_advantages(torch.tensor([1.0]), r, mask), torch.tensor([[0.0, 0.85, 0.9, 0.8]])
    )
