"""The shared schedule and optimizer step: hand-worked multipliers, the non-finite gradient check."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from rlfr.runtime.optim import build_optimizer, lr_lambda, optimizer_step


def test_lr_lambda_hand_worked():
    # total 10, warm-up 0.25 -> ceil(2.5) = 3 steps: 1/4, 2/4, 3/4; then cosine from 1 to the floor 0.1
    f = lr_lambda(10, 0.25, "cosine", 0.1)
    assert [f(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert f(3) == pytest.approx(1.0)
    # halfway through the 7 decay steps: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    assert f(3 + 3.5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert lr_lambda(10, 0.0, "constant")(7) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(10, 0.0, "linear")


def test_optimizer_step_refuses_a_non_finite_gradient():
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    opt, sched = build_optimizer(model.parameters(), 0.1, (0.9, 0.95), 0.0, 4, 0.0, "constant")
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    model(torch.ones(1, 2)).sum().backward()
    norm = optimizer_step(acc, model, opt, sched, 1.0, "test", 1)
    assert math.isfinite(norm) and all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(1, 2)) * float("nan")).sum().backward()
    with pytest.raises(FloatingPointError, match="the test gradient norm is not finite at step 2: it is nan"):
        optimizer_step(acc, model, opt, sched, 1.0, "test", 2)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing was applied
