"""The online flow update trains the flow, and only the flow, under gradient checkpointing.

The authors' release silently trains nothing here (RLFR_METHOD.md §8.1: with reentrant checkpointing their
hook runs under no-grad and the flow loss has no graph) and, were the graph there, would push flow-loss
gradient into the policy (§8.2). One step of the trainer's pattern: policy forward with labels (tap
attached, checkpointing on, train mode) -> latents -> flow-matching loss -> (LM loss + flow loss).backward().
"""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_ARCHS, enable_checkpointing, tiny_batch, tiny_model
from rlfr.flow import FlowField, build_pairs, flow_matching_loss
from rlfr.policy.latents import LatentTap

SEQ = 12


def _response_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    mask[:, SEQ // 2 :] = True  # second half = response tokens
    return mask


def _policy(arch: str, reentrant: bool):
    model = tiny_model(arch)
    enable_checkpointing(model, reentrant)
    return model.train()


def _field(perturb: bool) -> FlowField:
    torch.manual_seed(1)
    field = FlowField(32, depth=4)
    if perturb:  # the modulation and output layers start at 0, which blocks gradient to most of the field
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in field.parameters():
                if not p.any():
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return field


def _step(model, tap, field, batch, use_lm: bool, use_flow: bool) -> torch.Tensor:
    out = model(**batch, labels=batch["input_ids"])
    latents = tap.latents()
    assert not latents.requires_grad
    pairs = build_pairs(latents, tap.layer_values, _response_mask(batch), modes=("token_post",), shift=1,
                        context_mask=batch["attention_mask"].bool())  # fmt: skip
    assert len(pairs) == 3 * 2 * (
        SEQ // 2
    )  # layers x batch x response tokens (the first one's condition: prompt)
    flow_loss = flow_matching_loss(field, pairs, batch_mul=2, generator=torch.Generator().manual_seed(3))
    loss = (out.loss if use_lm else 0.0) + (flow_loss if use_flow else 0.0)
    loss.backward()
    return flow_loss.detach()


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_flow_trains_and_policy_gets_lm_gradient_only(arch, reentrant):
    batch = tiny_batch(batch=2, seq=SEQ)

    # LM loss + flow loss.
    model, field = _policy(arch, reentrant), _field(perturb=True)
    tap = LatentTap(model)
    flow_loss = _step(model, tap, field, batch, use_lm=True, use_flow=True)
    assert torch.isfinite(flow_loss) and flow_loss > 0
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"flow parameter {name} got no gradient"
    both = _grads(model)
    assert all(g is not None and g.abs().sum() > 0 for g in both.values()), "policy got no LM gradient"

    # The flow loss changes nothing in the policy's gradient: identical to the LM loss alone.
    ref_model = _policy(arch, reentrant)
    _step(ref_model, LatentTap(ref_model), _field(perturb=True), batch, use_lm=True, use_flow=False)
    lm_only = _grads(ref_model)
    assert both.keys() == lm_only.keys()
    for name in both:
        assert torch.equal(both[name], lm_only[name]), f"flow loss leaked into policy gradient of {name}"

    # The flow loss alone sends no gradient into the policy.
    flow_model = _policy(arch, reentrant)
    _step(flow_model, LatentTap(flow_model), _field(perturb=True), batch, use_lm=False, use_flow=True)
    for name, g in _grads(flow_model).items():
        assert g is None or not g.any(), f"flow loss sent gradient into policy parameter {name}"

    # One AdamW step changes every flow tensor.
    before = {n: p.detach().clone() for n, p in field.named_parameters()}
    torch.optim.AdamW(field.parameters(), lr=1e-3, weight_decay=0.0).step()
    for name, p in field.named_parameters():
        assert not torch.equal(p, before[name]), f"flow parameter {name} did not change"


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_zero_init_flow_trains_every_parameter_within_a_few_steps(reentrant):
    """From the real (zero-modulation, zero-output) init, gradient reaches the whole field after a few
    AdamW steps: step 1 only the output layer, then the modulations, then everything upstream."""
    batch = tiny_batch(batch=2, seq=SEQ)
    model, field = _policy("qwen2", reentrant), _field(perturb=False)
    tap = LatentTap(model)
    initial = {n: p.detach().clone() for n, p in field.named_parameters()}
    opt = torch.optim.AdamW(field.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        _step(model, tap, field, batch, use_lm=True, use_flow=True)
        opt.step()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"flow parameter {name} got no gradient"
        assert not torch.equal(p, initial[name]), f"flow parameter {name} never changed"
    assert tap.capture_count == [3, 3, 3]
