"""Optimizers, learning-rate schedules and the one optimizer step every stage uses.

- ``lr_lambda(total, warmup_ratio, schedule, min_ratio)``: multiplier of the base lr at scheduler step s:
  linear warm-up over ``ceil(warmup_ratio * total)`` steps (as transformers' schedulers count them), then
  constant, or cosine decay to ``min_ratio`` (the authors: ``cosine_with_min_lr`` with min_lr = 0.1 lr).
- ``build_optimizer(params, lr, betas, weight_decay, total, warmup_ratio, schedule, min_ratio, master_weights)``:
  AdamW with that schedule -> ``(optimizer, scheduler)``; with ``master_weights`` (the default) a
  ``MasterWeightAdamW``, which updates bfloat16/float16 parameters through float32 copies.
- ``optimizer_step(accelerator, model, opt, sched, max_grad_norm, what, step)``: clip the gradient norm,
  refuse a non-finite one (``NonFiniteError`` naming ``what``, e.g. "policy", and the step; nothing is
  applied), step, advance the schedule, zero the gradients; returns the norm before clipping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain

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


LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that updates a bfloat16 / float16 parameter through a float32 copy of it kept in the optimizer
    state (``state["master"]``, with float32 moments), and writes the rounded result back to the parameter, as
    DeepSpeed's bf16 optimizer does (the authors' runs). AdamW directly on bfloat16 weights loses every update
    smaller than half a bfloat16 step of the weight (0.2-0.4 % of it): at lr 1e-6 almost all of them. float32
    parameters are updated exactly as by ``torch.optim.AdamW``. The copies are ordinary state tensors, so they
    are saved, loaded (kept float32) and, under FSDP, sharded like the moments; they cost 4 bytes per
    low-precision parameter, and the moments 4 instead of 2 each."""

    @torch.no_grad()
    def step(self, closure=None):
        # AdamW steps the float32 copies in the parameters' places (with the parameters' state, whose moments
        # it creates at the first step as float32, like the copy); then every parameter and its state return
        moved = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None or p.dtype not in LOW_PRECISION:
                    continue
                state = self.state.pop(p, {})
                master = state.pop("master", None)
                master = p.detach().clone().to(torch.float32) if master is None else master
                master.grad = p.grad.detach().to(torch.float32)
                self.state[master], group["params"][i] = state, master
                moved.append((group, i, p, master))
        try:
            return super().step(closure)
        finally:
            for group, i, p, master in moved:
                state = self.state.pop(master)
                master.grad, state["master"] = None, master
                self.state[p], group["params"][i] = state, p
                p.copy_(master)  # the update, rounded once, from the float32 copy

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.AdamW``, except that the float32 copies and moments of low-precision parameters stay
        float32 (torch casts every floating state tensor to its parameter's dtype)."""
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        super().load_state_dict(state_dict)
        for k, entries in saved.items():
            p = params.get(k)
            if p is None or p.dtype not in LOW_PRECISION:
                continue
            for name, value in entries.items():
                if name != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][name] = value.to(device=p.device, dtype=torch.float32)


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    master_weights: bool = True,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    cls = MasterWeightAdamW if master_weights else torch.optim.AdamW
    opt = cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
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
