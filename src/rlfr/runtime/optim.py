"""Optimizers, learning-rate schedules and the one optimizer step every stage uses.

- ``lr_lambda(total, warmup_ratio, schedule, min_ratio)``: multiplier of the base lr at scheduler step s:
  linear warm-up over ``ceil(warmup_ratio * total)`` steps (as transformers' schedulers count them), then
  constant, or cosine decay to ``min_ratio`` (the authors: ``cosine_with_min_lr`` with min_lr = 0.1 lr).
- ``build_optimizer(params, lr, betas, weight_decay, total, warmup_ratio, schedule, min_ratio)``:
  AdamW with that schedule -> ``(optimizer, scheduler)``.
- ``optimizer_step(accelerator, model, opt, sched, max_grad_norm, what, step)``: clip the gradient norm,
  refuse a non-finite one (``NonFiniteError`` naming ``what``, e.g. "policy", and the step; nothing is
  applied), step, advance the schedule, zero the gradients; returns the norm before clipping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from rlfr.errors import NonFiniteError


def lr_lambda(total: int, warmup_ratio: float, schedule: str, min_ratio: float = 0.0):
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, cosine")
    warm = math.ceil(warmup_ratio * total)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if schedule == "constant":
            return 1.0
        p = min(1.0, (s - warm) / max(1, total - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(max(1, total_steps), warmup_ratio, schedule, min_lr_ratio)
    )
    return opt, sched


def optimizer_step(
    accelerator, model, opt, sched, max_grad_norm: float, what: str, step: int | None = None
) -> float:
    """Clip, check, step, schedule, zero; -> the gradient norm before clipping."""
    norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    if not math.isfinite(norm):
        raise NonFiniteError(f"the {what} gradient norm", step, f"it is {norm}")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm
