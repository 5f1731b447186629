"""Online flow updates during RL (docs/RLFR_METHOD.md §6, stage 2: rejection sampling).

The flow keeps learning the latents of the policy's own rollouts that pass the answer check (weight 1),
and of the others with weight ``soft_flow`` (default 0). Pure functions of tensors:

- ``rollout_weights(correct (B,), soft_flow) -> (B,)`` and ``rlfr.flow.pair_counts(...) -> (B,)``:
  with them the trainer knows the whole batch's total weight before the first micro-batch, so summing the
  micro-batch losses gives the full-batch weighted mean (gradient accumulation).
- ``online_flow_loss(field, pairs, weights, total, batch_mul, log_field) -> OnlineFlowLoss``: the loss to
  back-propagate plus every pair's loss for logging. Only pairs with weight > 0 are trained; the others
  cost one no-grad forward at ``batch_mul`` 1 (their loss is logged, e.g. the flow loss of wrong
  rollouts) instead of ``batch_mul`` forward + backward passes.
- ``above_quantile(entropy, mask, q)``: the optional filter that trains the flow only on high-entropy tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from rlfr.flow.matching import FlowPairs, flow_matching_loss_per_pair


@dataclass
class OnlineFlowLoss:
    loss: torch.Tensor  # () with graph to the field: sum of weighted trained-pair losses / total weight
    per_pair: torch.Tensor  # (N,) detached loss of every pair (trained or not), for logging


def subset(pairs: FlowPairs, keep: torch.Tensor) -> FlowPairs:
    """The pairs where ``keep`` (N,) bool is True."""
    return FlowPairs(**{f.name: getattr(pairs, f.name)[keep] for f in dataclasses.fields(pairs)})


def rollout_weights(correct: torch.Tensor, soft_flow: float) -> torch.Tensor:
    """Flow-loss weight per rollout: correct (B,) bool -> (B,) float, 1 if correct else soft_flow."""
    return torch.where(correct, 1.0, float(soft_flow))


def above_quantile(entropy: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Tokens whose entropy is >= the per-sequence q-quantile of response-token entropies: (B, T) -> (B, T) bool."""
    x = torch.where(mask, entropy, torch.nan)
    thr = torch.nanquantile(x, q, dim=-1, keepdim=True)
    return mask & (entropy >= thr.nan_to_num(float("inf")))


def online_flow_loss(
    field: nn.Module,
    pairs: FlowPairs,
    weights: torch.Tensor,
    total: torch.Tensor,
    batch_mul: int,
    log_field: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> OnlineFlowLoss:
    """weights: (N,) per pair; total: () the whole batch's total weight. ``log_field`` (default ``field``)
    scores the untrained pairs, e.g. the unwrapped module when ``field`` is wrapped by DDP."""
    train = weights > 0
    trained = flow_matching_loss_per_pair(
        field, subset(pairs, train), batch_mul, autocast_dtype=autocast_dtype
    )
    loss = (trained * weights[train]).sum() / total.clamp(min=1e-12)
    per_pair = torch.zeros(len(pairs), device=weights.device)
    per_pair[train] = trained.detach()
    if (~train).any():
        with torch.no_grad():
            per_pair[~train] = flow_matching_loss_per_pair(
                log_field or field, subset(pairs, ~train), autocast_dtype=autocast_dtype
            )
    return OnlineFlowLoss(loss, per_pair)
