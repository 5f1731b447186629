"""Advantages: group-normalised outcome advantage plus flow reward-to-go (docs/RLFR_METHOD.md §5).

Contract:
- ``group_advantages(rewards (B,), group_size) -> (B,)``: A_o = (R - mean_g) / (std_g + eps) over each
  contiguous group of ``group_size`` rollouts of one prompt (B = prompts * group_size).
- ``reward_to_go(token_rewards (B, T), mask (B, T)) -> (B, T)``: sum_{s >= k, mask} r_s (gamma = 1).
- ``token_advantages(outcome_adv (B,), token_rewards (B, T) | None, mask) -> (B, T)``:
  A_k = A_o + reward_to_go (plain RLVR/GRPO when token_rewards is None), no further normalisation.
- ``entropy_advantage(adv, entropy, mask, alpha, kappa) -> (B, T)``: the entropy baseline of Cheng et al.
  2025, A_k + min(alpha * H_k.detach(), |A_k| / kappa). rlfr's own: the paper reports an entropy baseline, but the
  authors' release has no implementation of it (its ``--baseline_mode`` option is parsed and never read);
  alpha 0.4 and kappa 2 are values of public reproductions, not the paper's.
- ``kl_rewards(logp, ref_logp, mask, coef) -> (B, T)``: -coef * (log p - log p_ref) per token (k1), the
  KL penalty the authors' RLVR baseline puts into the token rewards (OpenRLHF ``compute_reward``), so it
  enters the advantage through the reward-to-go like the flow rewards.

All outputs are 0 outside ``mask``.

Choice: the group std is the unbiased (Bessel-corrected) sample std, torch's default and what the
authors' OpenRLHF-based GRPO uses; a group of one rollout therefore has no std and raises ValueError.
"""

from __future__ import annotations

import torch


def _check_mask(x: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"{name} and mask must be (B, T) (mask bool), got {tuple(x.shape)}, "
            f"{tuple(mask.shape)} {mask.dtype}"
        )


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-9
) -> torch.Tensor:
    """GRPO outcome advantage: rewards (B,) -> (B,) float32; an all-equal group gives zeros."""
    if rewards.dim() != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be (B,) with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        if group_size < 2:
            raise ValueError(
                "normalize_std needs group_size >= 2 (the unbiased std of one value is undefined)"
            )
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv.view(-1)


def reward_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T), (B, T) bool -> (B, T): out[b, k] = sum_{s >= k} mask[b, s] * r[b, s], 0 outside the mask."""
    _check_mask(token_rewards, mask, "token_rewards")
    r = torch.where(mask, token_rewards.float(), 0.0)
    rtg = r.flip(1).cumsum(1).flip(1)
    return torch.where(mask, rtg, 0.0)


def token_advantages(
    outcome_adv: torch.Tensor, token_rewards: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """A_k = A_o + reward_to_go(r)_k: outcome_adv (B,), token_rewards (B, T) or None, mask -> (B, T)."""
    if outcome_adv.shape != mask.shape[:1]:
        raise ValueError(f"outcome_adv must be (B,) = ({mask.shape[0]},), got {tuple(outcome_adv.shape)}")
    adv = outcome_adv.float()[:, None].expand(mask.shape)
    if token_rewards is not None:
        adv = adv + reward_to_go(token_rewards, mask)
    return torch.where(mask, adv, 0.0)


def entropy_advantage(
    adv: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, alpha: float = 0.4, kappa: float = 2.0
) -> torch.Tensor:
    """Entropy-shaped advantage (Cheng et al. 2025): A + min(alpha * H.detach(), |A| / kappa) -> (B, T).

    The clip by |A| / kappa keeps the bonus from flipping the sign of a negative advantage.
    """
    _check_mask(adv, mask, "adv")
    if entropy.shape != adv.shape:
        raise ValueError(f"entropy must be {tuple(adv.shape)}, got {tuple(entropy.shape)}")
    if kappa <= 0 or alpha < 0:
        raise ValueError(f"need alpha >= 0 and kappa > 0, got alpha={alpha}, kappa={kappa}")
    bonus = torch.minimum(alpha * entropy.detach().float(), adv.detach().float().abs() / kappa)
    return torch.where(mask, adv.float() + bonus, 0.0)


def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token KL penalty as a reward: (B, T) x 2, mask (B, T) bool -> -coef * (logp - ref_logp), 0 outside."""
    _check_mask(logp, mask, "logp")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    return torch.where(mask, -coef * (logp.detach().float() - ref_logp.detach().float()), 0.0)
