"""Flow-matching pairs and loss (docs/RLFR_METHOD.md §1, §3).

Contract:
- ``build_pairs(latents (L, B, T, d), layer_values (L,), mask (B, T) bool, modes, shift, *,
  context_mask (B, T) bool) -> FlowPairs``: one pair per (mode, layer, target position k) with
  ``mask[k]`` (a response token, EOS included) and a condition position that ``context_mask`` allows
  (a real token: prompt or response, never padding). ``token_post``: target h_k, cond h_{k-s};
  ``token_pre``: target h_k, cond h_{k+s}; ``identity``: target = cond = h_k. Every pair has
  ``position = k``, the position of its **target**: the token whose latent leaves the flow is the one
  scored, rewarded and (in RL) penalised, as in the authors' code (their scores are padded at the front
  in ``token_post`` and at the back in ``token_pre``, so each lands on its target). A condition may lie
  in the prompt: with ``token_post`` the first response token is scored against the last prompt token.
  ``PAIRING = "target"`` names this convention in every flow directory's ``latents.json``.
- ``flow_matching_loss_per_pair(field, pairs, batch_mul) -> (N,)`` and ``flow_matching_loss(...) -> ()``:
  x_t = t x1 + (1 - t) eps, u = x1 - eps, loss = mean_d (v - u)^2 with t ~ logit-normal, each pair
  repeated ``batch_mul`` times with fresh (t, eps), then a weighted mean over pairs.

Latents are detached and cast to float32 in ``build_pairs``: the flow loss must never send gradient into
the policy (the authors' RL hook did not detach the target, docs/RLFR_METHOD.md §8.2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Mode = Literal["token_post", "token_pre", "identity"]
MODES: tuple[str, ...] = ("token_post", "token_pre", "identity")
# The pairing convention (see the module docstring): a pair's score belongs to its target position.
# rlfr < 0.2 credited it to the condition position; flows written then are refused (rlfr.flow.store).
PAIRING = "target"


@dataclass
class FlowPairs:
    """N flow-matching pairs. target, cond: (N, d) float32; layer: (N,) float32 (block_index / num_blocks);
    batch_index, position, mode_index, layer_index: (N,) long (position = the target token's position)."""

    target: torch.Tensor
    cond: torch.Tensor
    layer: torch.Tensor
    batch_index: torch.Tensor
    position: torch.Tensor
    mode_index: torch.Tensor
    layer_index: torch.Tensor

    def __len__(self) -> int:
        return self.target.shape[0]


def check_latents(
    latents: torch.Tensor, layer_values: torch.Tensor, mask: torch.Tensor, context_mask: torch.Tensor
) -> None:
    if latents.dim() != 4:
        raise ValueError(f"latents must be (L, B, T, d), got shape {tuple(latents.shape)}")
    if layer_values.shape != latents.shape[:1]:
        raise ValueError(
            f"layer_values must be (L,) = ({latents.shape[0]},), got {tuple(layer_values.shape)}"
        )
    for name, m in (("mask", mask), ("context_mask", context_mask)):
        if m.shape != latents.shape[1:3] or m.dtype != torch.bool:
            raise ValueError(
                f"{name} must be bool (B, T) = {tuple(latents.shape[1:3])}, got {m.dtype} {tuple(m.shape)}"
            )


def pair_indices(
    mask: torch.Tensor, context_mask: torch.Tensor, mode: str, shift: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index the pairs of one mode: mask, context_mask (B, T) bool -> (batch, target_pos, cond_pos), each (n,).

    The score of pair i belongs to ``target_pos[i]`` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown context mode {mode!r}; valid: {list(MODES)}")
    if shift < 1:
        raise ValueError(f"shift must be >= 1, got {shift}")
    if mode == "identity":
        b, k = mask.nonzero(as_tuple=True)
        return b, k, k
    allowed = torch.zeros_like(mask)
    if mode == "token_post":  # condition k - s before the target k
        allowed[:, shift:] = mask[:, shift:] & context_mask[:, :-shift]
        b, k = allowed.nonzero(as_tuple=True)
        return b, k, k - shift
    allowed[:, :-shift] = mask[:, :-shift] & context_mask[:, shift:]  # token_pre: condition k + s after it
    b, k = allowed.nonzero(as_tuple=True)
    return b, k, k + shift


def check_modes(modes: Sequence[str]) -> None:
    if isinstance(modes, str) or len(modes) == 0:
        raise ValueError(f"modes must be a non-empty sequence of {list(MODES)}, got {modes!r}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown context mode {mode!r}; valid: {list(MODES)}")


def build_pairs(
    latents: torch.Tensor,
    layer_values: torch.Tensor,
    mask: torch.Tensor,
    modes: Sequence[Mode] = ("token_post",),
    shift: int = 1,
    *,
    context_mask: torch.Tensor,
) -> FlowPairs:
    """latents (L, B, T, d), layer_values (L,), mask (B, T) bool (targets: response tokens),
    context_mask (B, T) bool (allowed conditions: real tokens, e.g. ``attention_mask.bool()``)
    -> FlowPairs, ordered by (mode, layer, batch, target position)."""
    check_latents(latents, layer_values, mask, context_mask)
    check_modes(modes)
    h = latents.detach().float()
    num_layers, d = h.shape[0], h.shape[-1]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("target", "cond", "layer", "b", "pos", "m", "l")}
    for m, mode in enumerate(modes):
        b, kt, kc = pair_indices(mask, context_mask, mode, shift)
        n = b.numel()
        parts["target"].append(h[:, b, kt].reshape(-1, d))  # (L * n, d), layer-major
        parts["cond"].append(h[:, b, kc].reshape(-1, d))
        lidx = torch.arange(num_layers, device=h.device).repeat_interleave(n)
        parts["l"].append(lidx)
        parts["layer"].append(layer_values.to(h.device, torch.float32)[lidx])
        parts["b"].append(b.repeat(num_layers))
        parts["pos"].append(kt.repeat(num_layers))
        parts["m"].append(torch.full((num_layers * n,), m, dtype=torch.long, device=h.device))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return FlowPairs(
        target=cat["target"], cond=cat["cond"], layer=cat["layer"], batch_index=cat["b"],
        position=cat["pos"], mode_index=cat["m"], layer_index=cat["l"],
    )  # fmt: skip


def pair_counts(
    mask: torch.Tensor, context_mask: torch.Tensor, modes: Sequence[str], shift: int, num_layers: int
) -> torch.Tensor:
    """Flow pairs per sequence under the rule of ``build_pairs``: (B, T) bool x 2 -> (B,) float32."""
    counts = torch.zeros(mask.shape[0], device=mask.device)
    for mode in modes:
        b, _, _ = pair_indices(mask, context_mask, mode, shift)
        counts += torch.bincount(b, minlength=mask.shape[0]).to(counts.dtype)
    return counts * num_layers


def sample_timesteps(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Logit-normal training timesteps t = sigmoid(N(0, 1)) (docs/RLFR_METHOD.md §3): -> (n,) float32 in (0, 1)."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device))


def flow_matching_loss_per_pair(
    field: nn.Module,
    pairs: FlowPairs,
    batch_mul: int = 1,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Conditional flow-matching loss of each pair, averaged over its ``batch_mul`` fresh (t, eps) draws.

    -> (N,) float32 with graph to the field's parameters (never to the latents). ``autocast_dtype`` runs
    the field under autocast (its weights stay float32: the optimizer keeps full-precision master weights);
    the squared error is computed in float32.
    """
    if batch_mul < 1:
        raise ValueError(f"batch_mul must be >= 1, got {batch_mul}")
    n, d = pairs.target.shape
    x1 = pairs.target.detach().float().repeat(batch_mul, 1)  # (batch_mul * N, d)
    t = sample_timesteps(n * batch_mul, generator=generator, device=x1.device)
    eps = torch.randn(x1.shape, generator=generator, device=x1.device)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * eps
    u = x1 - eps
    autocast = (
        torch.autocast(device_type=x1.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        v = field(x_t, t, pairs.cond.detach().repeat(batch_mul, 1), pairs.layer.repeat(batch_mul))
    per = ((v.float() - u) ** 2).mean(dim=-1)
    return per.view(batch_mul, n).mean(dim=0)


def flow_matching_loss(
    field: nn.Module,
    pairs: FlowPairs,
    batch_mul: int = 1,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted mean of the per-pair flow-matching loss -> () float32.

    weights: (N,) non-negative (e.g. 1 for pairs of correct rollouts, ``soft_flow`` for wrong ones,
    docs/RLFR_METHOD.md §6). A zero total weight (or no pairs) gives a 0 loss that is still connected to the
    field's parameters, so ``backward()`` works and gives zero gradients instead of NaN or an error.
    """
    per = flow_matching_loss_per_pair(field, pairs, batch_mul, generator, autocast_dtype)
    if weights is None:
        weights = torch.ones_like(per)
    if weights.shape != per.shape:
        raise ValueError(f"weights must be (N,) = {tuple(per.shape)}, got {tuple(weights.shape)}")
    weights = weights.detach().to(per.device, torch.float32)
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("flow-matching weights must be finite and non-negative")
    total = weights.sum()
    if total <= 0:
        # Tie the zero to every parameter: an empty `per` may not reach all of them through autograd.
        return (per * weights).sum() + sum(p.sum() * 0.0 for p in field.parameters())
    return (per * weights).sum() / total


def per_sequence_mean(values: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of per-pair values per rollout: values (N,), batch_index (N,) long -> (B,); 0 where no pair
    (count with ``torch.bincount(batch_index, minlength=B)``). For logging correct/wrong flow losses."""
    sums = torch.zeros(batch_size, dtype=torch.float32, device=values.device)
    sums.index_add_(0, batch_index, values.detach().float())
    counts = torch.bincount(batch_index, minlength=batch_size).to(sums.dtype)
    return sums / counts.clamp_min(1)
