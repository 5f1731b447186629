"""The shared schedule and optimizer step: hand-worked multipliers, the non-finite gradient check, float32 master
weights of bfloat16 parameters."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from rlfr.runtime.optim import MasterWeightAdamW, build_optimizer, lr_lambda, optimizer_step


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


def _adam_steps(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def test_master_weights_keep_the_updates_bfloat16_rounds_away():
    """Hand-worked: with a constant gradient every AdamW step (no decay) moves a weight by exactly -lr (m_hat =
    1, v_hat = 1, up to eps), so 100 steps at lr 1e-6 move it by -1e-4. A weight of 0.02 has a bfloat16 step
    of 2^-6 * 2^-7 = 1.2e-4: each -1e-6 update is under half of it, so AdamW on the bfloat16 weight never
    moves it, while the float32 copy moves by -1e-4 and the rounded weight follows it."""
    start = torch.full((4,), 0.02)
    plain = torch.nn.Parameter(start.to(torch.bfloat16))
    _adam_steps([plain], torch.optim.AdamW([plain], lr=1e-6, weight_decay=0.0), 100)
    assert torch.equal(plain, start.to(torch.bfloat16))  # every update lost

    master = torch.nn.Parameter(start.to(torch.bfloat16))
    opt = MasterWeightAdamW([master], lr=1e-6, weight_decay=0.0)
    _adam_steps([master], opt, 100)
    copy = opt.state[master]["master"]
    assert copy.dtype == torch.float32 and opt.state[master]["exp_avg"].dtype == torch.float32
    # float32 rounds each of the 100 additions to 0.02 by at most half its step (9.3e-10)
    assert torch.allclose(copy, start.to(torch.bfloat16).float() - 1e-4, rtol=0, atol=1e-7)
    assert master.dtype == torch.bfloat16 and master.grad.dtype == torch.bfloat16
    assert torch.equal(master.data, copy.to(torch.bfloat16))  # the weight is the rounded copy, and it moved
    assert not torch.equal(master.data, start.to(torch.bfloat16))


def test_master_weights_leave_float32_alone_and_survive_a_checkpoint():
    """float32 parameters: bit-identical to torch's AdamW. The copies and moments of bfloat16 parameters stay
    float32 through state_dict -> load_state_dict (torch casts state tensors to the parameter's dtype), so a
    resumed run continues exactly as an uninterrupted one."""
    torch.manual_seed(0)
    w32, w16 = torch.randn(64) * 0.02, torch.randn(8, 8) * 0.02
    a = torch.nn.Parameter(w32.clone())
    b = torch.nn.Parameter(w32.clone())
    _adam_steps([a], torch.optim.AdamW([a], lr=1e-3, weight_decay=0.1), 20)
    _adam_steps([b], MasterWeightAdamW([b], lr=1e-3, weight_decay=0.1), 20)
    assert torch.equal(a, b)

    def fresh():
        ps = [torch.nn.Parameter(w32.clone()), torch.nn.Parameter(w16.to(torch.bfloat16))]
        return ps, MasterWeightAdamW(ps, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.01)

    whole, opt = fresh()
    _adam_steps(whole, opt, 30)
    first, opt1 = fresh()
    _adam_steps(first, opt1, 10)
    saved = opt1.state_dict()
    resumed, opt2 = fresh()
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    opt2.load_state_dict(saved)
    assert opt2.state[resumed[1]]["master"].dtype == torch.float32
    assert opt2.state[resumed[1]]["exp_avg_sq"].dtype == torch.float32
    _adam_steps(resumed, opt2, 20)
    assert all(torch.equal(p, q) for p, q in zip(whole, resumed))
    assert torch.equal(opt.state[whole[1]]["master"], opt2.state[resumed[1]]["master"])
    assert not torch.equal(whole[1].data, w16.to(torch.bfloat16))  # 30 steps at 1e-6 moved bfloat16 weights
