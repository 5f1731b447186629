"""Velocity deviation: the per-token flow score (docs/RLFR_METHOD.md §4).

Contract:
- ``velocity_deviation(field, target (N, d), cond (N, d), layer (N,), timesteps) -> (N,) float32``:
  for each rewarding timestep t, D_t = mean_d (v(x_t, t, c, layer) - (x1 - eps))^2 * t / (1 - t),
  then the mean over timesteps. Higher = the latent deviates more from the reference flow.
- ``token_scores(field, latents (L, B, T, d), layer_values (L,), mask (B, T), modes, shift, timesteps,
  *, context_mask (B, T)) -> TokenScores``: scores (B, T) float32 = mean over layers and modes of the
  deviation of the pairs whose **target** is each position (``rlfr.flow.matching``: the token whose latent
  leaves the flow gets the score); ``valid`` (B, T) bool marks positions with at least one pair. Scores
  are 0 where not valid; callers must use ``valid`` (unscored positions join no statistics).
- ``sequence_scores(scores (B, T), valid (B, T), quantile) -> ((B,), (B,))``: the mean and the ``quantile`` of
  each sequence's scored tokens (a response's flow score; NaN for a row without one).

Both run under ``torch.no_grad()``: scores are rewards, not a training signal for the field.

Departures from the authors' code (docs/RLFR_METHOD.md §8.3): each timestep uses its own debias weight t / (1 - t)
(theirs applied the last timestep's weight to all) and its own noise draw (theirs shared one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rlfr.flow.matching import Mode, check_latents, check_modes, pair_indices


@dataclass
class TokenScores:
    """scores: (B, T) float32 flow deviation (0 where not valid); valid: (B, T) bool."""

    scores: torch.Tensor
    valid: torch.Tensor


def _check_timesteps(timesteps: Sequence[float]) -> list[float]:
    ts = [float(t) for t in timesteps]
    if not ts or any(not 0.0 < t < 1.0 for t in ts):
        raise ValueError(f"rewarding timesteps must be a non-empty list of values in (0, 1), got {timesteps}")
    return ts


@torch.no_grad()
def velocity_deviation(
    field: nn.Module,
    target: torch.Tensor,
    cond: torch.Tensor,
    layer: torch.Tensor,
    timesteps: Sequence[float] = (0.8,),
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Debiased velocity deviation -> (N,) float32.

    target, cond: (N, d); layer: (N,); noise: None (fresh N(0, I) per timestep from ``generator``, which must
    live on target's device), (N, d) (shared by all timesteps) or (K, N, d) with K = len(timesteps).
    """
    ts = _check_timesteps(timesteps)
    x1 = target.float()
    if noise is None:
        noise = torch.randn((len(ts), *x1.shape), generator=generator, device=x1.device)
    elif noise.shape == x1.shape:
        noise = noise.expand(len(ts), *x1.shape)
    elif noise.shape != (len(ts), *x1.shape):
        raise ValueError(
            f"noise must be (N, d) = {tuple(x1.shape)} or (K, N, d) = {(len(ts), *x1.shape)}, "
            f"got {tuple(noise.shape)}"
        )
    total = torch.zeros(x1.shape[0], dtype=torch.float32, device=x1.device)
    for t, eps in zip(ts, noise.float()):
        x_t = t * x1 + (1 - t) * eps
        v = field(x_t, torch.full_like(total, t), cond, layer)
        total += ((v.float() - (x1 - eps)) ** 2).mean(dim=-1) * (t / (1 - t))
    return total / len(ts)


@torch.no_grad()
def token_scores(
    field: nn.Module,
    latents: torch.Tensor,
    layer_values: torch.Tensor,
    mask: torch.Tensor,
    modes: Sequence[Mode] = ("token_post",),
    shift: int = 1,
    timesteps: Sequence[float] = (0.8,),
    generator: torch.Generator | None = None,
    chunk_size: int = 8192,
    *,
    context_mask: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> TokenScores:
    """Per-token flow scores, averaged over layers and modes (docs/RLFR_METHOD.md §4).

    latents: (L, B, T, d) (any float dtype); layer_values: (L,); mask: (B, T) bool (scored targets:
    response tokens); context_mask: (B, T) bool (allowed conditions: real tokens). The pairs of every mode
    and hooked layer and every rewarding timestep go through the field together, ``chunk_size`` rows per
    call (memory is bounded by it, not by L * modes * B * T); each chunk draws fresh noise for each of its
    timesteps. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the field under autocast; the deviation is
    computed in float32.
    """
    check_latents(latents, layer_values, mask, context_mask)
    check_modes(modes)
    ts_list = _check_timesteps(timesteps)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_layers, bsz, seq_len, d = latents.shape
    device = latents.device
    idx = [pair_indices(mask, context_mask, mode, shift) for mode in modes]
    b = torch.cat([i[0] for i in idx])
    kt = torch.cat([i[1] for i in idx])
    kc = torch.cat([i[2] for i in idx])
    n = b.numel()  # pairs per layer, all modes
    layer_idx = torch.arange(num_layers, device=device).repeat_interleave(n)  # (L * n,), layer-major
    b, kt, kc = b.repeat(num_layers), kt.repeat(num_layers), kc.repeat(num_layers)
    lv = layer_values.to(device, torch.float32)
    ts = torch.tensor(ts_list, dtype=torch.float32, device=device)
    weight = ts / (1 - ts)  # each timestep's own debias weight (docs/RLFR_METHOD.md §8.3)
    k = len(ts_list)
    sums = torch.zeros(bsz * seq_len, dtype=torch.float32, device=device)
    counts = torch.zeros(bsz * seq_len, dtype=torch.float32, device=device)
    per_call = max(1, chunk_size // k)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    for start in range(0, b.numel(), per_call):
        sl = slice(start, start + per_call)
        x1 = latents[layer_idx[sl], b[sl], kt[sl]].float()  # (m, d)
        cond = latents[layer_idx[sl], b[sl], kc[sl]].float()
        layer = lv[layer_idx[sl]]
        m = x1.shape[0]
        eps = torch.randn((k, m, d), generator=generator, device=device)
        x_t = ts[:, None, None] * x1 + (1 - ts[:, None, None]) * eps  # (K, m, d)
        with autocast:
            v = field(x_t.reshape(k * m, d), ts.repeat_interleave(m), cond.repeat(k, 1), layer.repeat(k))
        dev = ((v.float().view(k, m, d) - (x1 - eps)) ** 2).mean(dim=-1) * weight[:, None]  # (K, m)
        flat = b[sl] * seq_len + kt[sl]
        sums.index_add_(0, flat, dev.mean(dim=0))
        counts.index_add_(0, flat, torch.ones(m, device=device))
    valid = counts > 0
    scores = torch.where(valid, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return TokenScores(scores=scores.view(bsz, seq_len), valid=valid.view(bsz, seq_len))


def sequence_scores(
    scores: torch.Tensor, valid: torch.Tensor, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: (B, T) float, valid: (B, T) bool -> (mean (B,), ``quantile`` (B,)) of each row's valid scores
    (linear interpolation between order statistics); NaN for a row without a valid score."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    x = torch.where(valid, scores.float(), torch.nan)
    return x.nanmean(dim=1), x.nanquantile(quantile, dim=1)
