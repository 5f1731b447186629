"""Policy-gradient losses and KL estimators (docs/RLFR_METHOD.md §5).

Alignment (the trainer relies on it): every per-token tensor is (B, T) aligned with ``input_ids``, as
``rlfr.policy.forward`` computes log-probs and entropies: ``logp[b, k] = log p(input_ids[b, k] |
input_ids[b, :k])``, so position 0 is never scored (0 there).

Contract:
- ``kl_penalty(logp, ref_logp, estimator) -> (B, T)``: k1 = log(p / p_ref), k3 = r - 1 - log r with
  r = p_ref / p (Schulman, "Approximating KL divergence", 2020).
- ``policy_loss(logp, old_logp, advantages, mask, ...) -> PolicyLossOutput``: the PPO clipped objective
  -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) (+ kl_coef * KL), masked, aggregated as the mean
  over sequences of each sequence's token mean (``seq_mean_token_mean``, the paper's) or the mean over all
  tokens (``token_mean``). ``num_sequences`` / ``num_tokens`` are the normalisers of the whole batch, so
  summing micro-batch losses under gradient accumulation equals the full-batch loss. ``ratio_max`` caps
  the importance ratio before both surrogates (the authors' ``loss.py`` uses 3.0): a token whose ratio
  exceeds it contributes ``ratio_max * A`` without gradient, so a stale, very unlikely sample with a
  negative advantage cannot dominate the update (the dual-clip idea of Ye et al. 2020).

- ``truncated_is_weights(old_logp, engine_logp, mask, cap) -> (B, T)``: min(exp(old_logp - engine_logp), cap)
  on response tokens, 1 elsewhere: the truncated importance-sampling correction for rollouts sampled by
  another engine (vLLM) than the one that scores them (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"; TRL's ``vllm_importance_sampling_correction``). It multiplies
  the PPO term of ``policy_loss`` (``is_weights``), never the KL term.

Departure from the authors' code (docs/RLFR_METHOD.md §8.5): the low and high clips are separate, explicit
arguments (theirs passed ``use_dapo`` into the clip-high slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Log-ratios are clamped before exp() in the KL estimators: a token the reference finds ~impossible would
# otherwise give inf. |log r| = 20 is far beyond anything a healthy run produces.
_LOG_RATIO_CLAMP = 20.0


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k3"] = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs: (B, T), (B, T) -> (B, T)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    log_ratio = (logp.float() - ref_logp.float()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # r = p_ref / p: unbiased (E_pi[r - 1] = 0) and always >= 0.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: ['k1', 'k3']")


def truncated_is_weights(
    old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token weights pi_old / pi_engine truncated at ``cap``: (B, T), (B, T), (B, T) bool -> (B, T) float32.

    ``old_logp`` is the trainer's log-prob of each sampled token (the policy that the update's ratio starts
    from), ``engine_logp`` the sampling engine's for the same token; outside ``mask`` the weight is 1."""
    if old_logp.shape != engine_logp.shape or mask.shape != old_logp.shape:
        raise ValueError(
            f"old_logp {tuple(old_logp.shape)}, engine_logp {tuple(engine_logp.shape)} and mask "
            f"{tuple(mask.shape)} must have one shape"
        )
    if not cap >= 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    log_w = (old_logp.float() - engine_logp.float()).clamp(max=_LOG_RATIO_CLAMP)
    return torch.where(mask, torch.exp(log_w).clamp(max=cap), 1.0).detach()


@dataclass
class PolicyLossOutput:
    """loss: () with graph; clip_frac, approx_kl (KL(pi_old || pi), k3), kl (to the reference): () detached
    token means over this micro-batch (kl is 0 without ``ref_logp``)."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    kl: torch.Tensor


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k3"] = "k3",
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    ratio_max: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO-clipped policy loss; all per-token inputs (B, T), mask (B, T) bool; ``is_weights`` (B, T) (see
    ``truncated_is_weights``) multiply each token's PPO term, None = 1.

    Defaults for the normalisers are this micro-batch's counts: ``num_sequences`` = rows with at least one
    response token, ``num_tokens`` = mask.sum() (count the whole batch the same way when accumulating).
    Empty rows contribute 0 (never NaN).
    """
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"{name} must be {tuple(logp.shape)} like logp, got {tuple(x.shape)}")
    if mask.dtype != torch.bool or logp.dim() != 2:
        raise ValueError("logp must be (B, T) and mask a bool (B, T) tensor")
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if ratio_max is not None and not ratio_max > 1 + clip_high:
        raise ValueError(f"ratio_max must exceed 1 + clip_high = {1 + clip_high}, got {ratio_max}")
    log_ratio = torch.where(mask, logp.float() - old_logp.float().detach(), 0.0)
    ratio = torch.exp(log_ratio)
    if ratio_max is not None:
        ratio = ratio.clamp(max=ratio_max)
    adv = advantages.float().detach()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(surr1, surr2)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(
                f"is_weights must be {tuple(logp.shape)} like logp, got {tuple(is_weights.shape)}"
            )
        per_token = per_token * is_weights.float().detach()
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        kl_tok = kl_penalty(logp, ref_logp.detach(), kl_estimator)
        per_token = per_token + kl_coef * kl_tok
        kl = _masked_mean(kl_tok.detach(), mask)
    elif kl_coef != 0:
        raise ValueError("kl_coef != 0 needs ref_logp")
    per_token = torch.where(mask, per_token, 0.0)
    if aggregation == "seq_mean_token_mean":
        tokens_per_seq = mask.sum(dim=1)
        seq_mean = per_token.sum(dim=1) / tokens_per_seq.clamp_min(1)
        n = int((tokens_per_seq > 0).sum()) if num_sequences is None else num_sequences
        loss = seq_mean.sum() / max(n, 1)
    elif aggregation == "token_mean":
        n = int(mask.sum()) if num_tokens is None else num_tokens
        loss = per_token.sum() / max(n, 1)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: ['seq_mean_token_mean', 'token_mean']")
    with torch.no_grad():
        clip_frac = _masked_mean((surr2 < surr1).float(), mask)
        approx_kl = _masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return PolicyLossOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, kl=kl)
