"""The flow learner (``rlfr.flow.learner.FlowLearner``), which ``rlfr train`` and the TRL bridge both run: its
latent standardisation (``latent_norm``: the one place this behaviour is tested), token rewards and their
statistics, the online update's weights and backward, the optimizer step and its skips, and its checkpoint
state. Latents come from a fixed tap (no model), so every number is known.

Layout (B = 2, T = 6, L = 2 hooked layers, d = 4; every position is context, token_post with shift 1)::

    position   0  1  2  3  4  5
    row 0      p  p  r  r  r  r     outlier latent (all 10s) at position 4
    row 1      p  p  p  r  r  r     outlier latent at position 5

With the zero-initialised field (its output is exactly 0) a pair's deviation is mean_d (x1 - eps)^2 t / (1 - t):
about 400 for an outlier target and about 4 for a zero one, so min-max puts each row's outlier at 1 and every
other token below 0.1: with eta 0.6 exactly the outlier is penalised, r = -beta.
"""

from __future__ import annotations

import types

import pytest
import torch

from rlfr.errors import FlowMismatchError
from rlfr.flow import FlowField, build_pairs, token_scores
from rlfr.flow.learner import FlowLearner
from rlfr.flow.online import online_flow_loss, rollout_weights
from rlfr.flow.shaping import shape_flow_rewards
from rlfr.flow.store import FlowBundle, FlowMeta, save_flow
from rlfr.runtime.metrics import Accum
from rlfr.runtime.optim import build_optimizer, optimizer_step
from rlfr.schema import FlowConfig, RewardShapingConfig

D = 4
RESPONSE = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
CONTEXT = torch.ones(2, 6, dtype=torch.bool)
CORRECT = torch.tensor([True, False])
TORCH_CLIP = types.SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_)


class FixedTap:
    """A tap whose latest forward captured ``lat`` (L, B, T, d): what the learner reads from a LatentTap."""

    def __init__(self, lat: torch.Tensor):
        self.lat, self.layer_values = lat, torch.tensor([0.25, 0.5])

    def latents(self) -> torch.Tensor:
        return self.lat


class Processes:
    """``reduce(tensor, op)`` of this process and one other whose values are queued in ``other``."""

    def __init__(self, *other: torch.Tensor):
        self.other, self.calls = list(other), []

    def __call__(self, t: torch.Tensor, op: str) -> torch.Tensor:
        self.calls.append(op)
        theirs = self.other.pop(0)
        return {"min": torch.minimum, "sum": torch.add}.get(op, lambda a, b: (a + b) / 2)(t, theirs)


def outliers() -> torch.Tensor:
    lat = torch.zeros(2, 2, 6, D)
    lat[:, 0, 4] = 10.0
    lat[:, 1, 5] = 10.0
    return lat


def learner(lat=None, perturb=False, norm=None, reduce=None, **flow) -> FlowLearner:
    cfg = FlowConfig(fractions=(0.25, 0.5), **({"latent_norm": "none"} | flow))
    torch.manual_seed(0)
    field = FlowField(dim=D, width=8, depth=1)
    if perturb:  # the zero-initialised output layer would block gradient to the rest of the field
        with torch.no_grad():
            for p in field.parameters():
                p.add_(0.1 * torch.randn(p.shape))
    meta = FlowMeta(fractions=cfg.fractions, modes=cfg.modes, shift=cfg.shift, latent_norm=cfg.latent_norm,
                    hidden_size=D, num_hidden_layers=4)  # fmt: skip
    kw = {"reduce": reduce} if reduce is not None else {}
    out = FlowLearner(cfg, FlowBundle(field, meta, norm), FixedTap(outliers() if lat is None else lat),
                      optimizer_step=lambda *a: optimizer_step(TORCH_CLIP, *a), **kw)  # fmt: skip
    out.attach_optimizer(*build_optimizer(field.parameters(), 1e-2, (0.9, 0.95), 0.0, 10, 0.0, "constant"))
    return out


# ------------------------------------------------------------------ latent_norm


def test_raw_latents_need_no_statistics():
    flow, reduce = learner(latent_norm="none"), Processes()
    flow._reduce = reduce
    assert not flow.needs_norm and flow.fit_norm(RESPONSE) and flow.norm is None and reduce.calls == []
    assert torch.equal(flow.latents(), outliers())  # as the tap captured them


def test_a_fresh_flow_fits_its_statistics_once_over_the_response_tokens_of_every_process():
    # layer 0 of row 0: response latents (1, 2) and (3, 6) at positions 2, 3; positions 4-5 masked off below,
    # and the prompt's 100s never count: mean (2, 4), std (1, 2) over this process's two tokens
    lat = torch.zeros(2, 2, 6, D)
    lat[:, 0, :2] = 100.0
    lat[:, 0, 2, :2] = torch.tensor([1.0, 2.0])
    lat[:, 0, 3, :2] = torch.tensor([3.0, 6.0])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:4] = True
    # the other process: some token (min 1), mean 4 and std 3 everywhere -> averaged mean (3, 4, 2, 2), std (2, 2.5,
    # 1.5005, 1.5005) (this process's std is clamped at 1e-3 for the two constant dimensions)
    reduce = Processes(torch.tensor(1.0), torch.full((2, D), 4.0), torch.full((2, D), 3.0))
    flow = learner(lat, reduce=reduce, latent_norm="standardize")
    assert flow.needs_norm
    with pytest.raises(RuntimeError, match="no statistics yet: call fit_norm"):
        flow.latents()
    assert flow.fit_norm(mask) and reduce.calls == ["min", "mean", "mean"]
    torch.testing.assert_close(flow.norm.mean, torch.tensor([[3.0, 4.0, 2.0, 2.0]] * 2))
    torch.testing.assert_close(flow.norm.std, torch.tensor([[2.0, 2.5, 1.5005, 1.5005]] * 2))
    # (3 - 3) / 2 = 0 and (6 - 4) / 2.5 = 0.8 for the second response token; the prompt's 100s are standardised too
    torch.testing.assert_close(flow.latents()[0, 0, 3, :2], torch.tensor([0.0, 0.8]))
    torch.testing.assert_close(flow.latents()[1, 0, 0, 0], torch.tensor(48.5))
    fitted = flow.norm
    flow.tap.lat = lat * 7  # later batches never refit
    assert flow.fit_norm(mask) and flow.norm is fitted and reduce.calls == ["min", "mean", "mean"]


def test_no_statistics_while_some_process_has_no_response_token():
    # TRL's mask_truncated_completions can leave a micro-batch without completion tokens on some process
    for mine, theirs in ((RESPONSE, torch.tensor(0.0)), (torch.zeros_like(RESPONSE), torch.tensor(1.0))):
        reduce = Processes(theirs)
        flow = learner(reduce=reduce, latent_norm="standardize")
        assert not flow.fit_norm(mine) and flow.norm is None and reduce.calls == ["min"]
        with pytest.raises(RuntimeError, match="nothing to save before"):
            flow.bundle()


def test_a_loaded_flow_keeps_its_own_statistics():
    from rlfr.flow import LatentNorm

    own = LatentNorm(torch.full((2, D), 1.0), torch.full((2, D), 5.0))
    flow, reduce = learner(norm=own, latent_norm="standardize"), Processes()
    flow._reduce = reduce
    assert not flow.needs_norm and flow.fit_norm(RESPONSE) and flow.norm is own and reduce.calls == []
    torch.testing.assert_close(flow.latents()[0, 0, 4], torch.full((D,), 1.8))  # (10 - 1) / 5


# ------------------------------------------------------------------ rewards


def test_each_rows_outlier_gets_minus_beta_and_the_statistics_say_so():
    flow, log = learner(reward=RewardShapingConfig(beta=0.07)), Accum()
    torch.manual_seed(1)
    r = flow.score(RESPONSE, CONTEXT, CORRECT, log)
    expected = torch.zeros(2, 6)
    expected[0, 4] = expected[1, 5] = -0.07
    torch.testing.assert_close(r, expected)
    stats = log.means()
    assert stats["flow_reward/mean"] == pytest.approx(-0.14 / 7)  # two rewards over 7 response tokens
    assert stats["flow_reward/nonzero_frac"] == pytest.approx(2 / 7)
    # sequence score = mean deviation: about 400 / 4 (row 0, correct) < 400 / 3 (row 1, wrong): AUROC 1
    assert stats["flow_score/auroc"] == 1.0 and log.first_nonfinite() is None
    # the same as the pure functions it wires, from the same noise
    torch.manual_seed(1)
    sc = token_scores(flow.module, outliers(), torch.tensor([0.25, 0.5]), RESPONSE, ("token_post",), 1, (0.8,),
                      context_mask=CONTEXT)  # fmt: skip
    torch.testing.assert_close(
        r, shape_flow_rewards(sc.scores, sc.valid, 0.07, 0.6, 15, False, 1.0), rtol=0, atol=0
    )
    assert stats["flow_score/mean"] == pytest.approx(float(sc.scores.sum() / 7), rel=1e-6)


def test_with_group_ids_the_statistics_hold_the_auroc_within_prompts_and_the_length_correlation():
    # row 0 (correct) scores about 400 / 4, row 1 (wrong) about 400 / 3: one prompt -> within 1.0 over 1 group
    flow, log = learner(), Accum()
    flow.score(RESPONSE, CONTEXT, CORRECT, log, group=torch.tensor([0, 0]))
    stats = log.means()
    assert stats["flow_score/auroc_within"] == 1.0 and stats["flow_score/auroc_within_groups"] == 1.0
    # two points: lengths 4 and 3 against mean deviations about 100 and 133 -> r = -1; no group of 3 or more
    assert stats["flow_score/len_corr"] == pytest.approx(-1.0) and "flow_score/len_corr_within" not in stats
    # two prompts with one rollout each: no prompt holds both classes, the pooled AUROC stays
    flow.score(RESPONSE, CONTEXT, CORRECT, log := Accum(), group=torch.tensor([0, 1]))
    stats = log.means()
    assert stats["flow_score/auroc"] == 1.0 and stats["flow_score/auroc_within_groups"] == 0.0
    assert "flow_score/auroc_within" not in stats
    flow.score(RESPONSE, CONTEXT, CORRECT, log := Accum())  # without group ids (the TRL bridge): pooled only
    assert set(log.means()) == {
        "flow_reward/mean",
        "flow_reward/nonzero_frac",
        "flow_score/mean",
        "flow_score/auroc",
    }


def test_a_non_finite_latent_is_flagged_and_poisons_only_its_row():
    lat = outliers()
    lat[1, 1, 3, 0] = float("nan")
    flow, log = learner(lat), Accum()
    r = flow.score(RESPONSE, CONTEXT, CORRECT, log)
    assert log.first_nonfinite() == "a latent (the output of a hooked block)"
    assert r[1][RESPONSE[1]].isnan().all() and (r[1][~RESPONSE[1]] == 0).all()
    assert torch.isfinite(r[0]).all() and r[0, 4] < 0


# ------------------------------------------------------------------ online update


def test_the_batch_weight_counts_pairs_of_every_layer():
    # token_post pairs: row 0 has 4 response tokens, row 1 has 3, on 2 layers -> (8, 6) pairs;
    # weights (1, soft_flow 0.5) -> 8 + 3 = 11
    flow = learner(soft_flow=0.5)
    assert flow.total_weight(CORRECT, RESPONSE, CONTEXT).item() == 11.0


def test_backward_trains_on_the_rollouts_that_pass_the_check():
    seen = []
    flow = learner(perturb=True)
    flow._backward = lambda loss: (seen.append(loss.detach()), loss.backward())
    total, log = flow.total_weight(CORRECT, RESPONSE, CONTEXT), Accum()
    assert total.item() == 8.0  # row 0's 8 pairs; row 1 failed and soft_flow = 0
    torch.manual_seed(2)
    flow.backward(RESPONSE, CONTEXT, CORRECT, total, log)
    assert len(seen) == 1 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in flow.module.parameters()
    )
    stats = log.means()
    assert stats["flow/pairs"] == 14.0 and stats["flow/trained_pair_frac"] == pytest.approx(8 / 14)
    assert {"flow/loss_correct", "flow/loss_wrong"} <= stats.keys()
    # the loss is online_flow_loss of the same pairs, weights and total, from the same noise
    pairs = build_pairs(
        outliers(), torch.tensor([0.25, 0.5]), RESPONSE, ("token_post",), 1, context_mask=CONTEXT
    )
    torch.manual_seed(2)
    ref = online_flow_loss(flow.module, pairs, rollout_weights(CORRECT, 0.0)[pairs.batch_index], total, 4)
    torch.testing.assert_close(seen[0], ref.loss.detach(), rtol=0, atol=0)

    frozen = learner(perturb=True, update=False)
    frozen._backward = lambda loss: pytest.fail("update=false must not back-propagate")
    frozen.backward(RESPONSE, CONTEXT, CORRECT, total, log := Accum())
    assert log.means() == {} and frozen.step(total, 1.0, 1, log) is None


def test_entropy_quantile_trains_only_high_entropy_tokens():
    flow, log = learner(perturb=True, entropy_quantile=0.5), Accum()
    assert flow.needs_entropy
    entropy = torch.arange(12.0).view(2, 6)  # increasing along each row: the upper half of response tokens
    flow.backward(RESPONSE, CONTEXT, CORRECT, torch.tensor(8.0), log, entropy=entropy)
    # row 0 keeps positions 4, 5 (median of 2..5 is 3.5), row 1 keeps 10, 11 (median 10): 4 tokens x 2 layers
    assert log.means()["flow/pairs"] == 8.0


def test_one_step_per_batch_and_none_when_nothing_passed_anywhere():
    flow = learner(perturb=True)
    before = {k: v.clone() for k, v in flow.module.state_dict().items()}
    nothing = torch.tensor(0.0)
    flow.backward(RESPONSE, CONTEXT, torch.tensor([False, False]), nothing, Accum())
    assert flow.step(nothing, 1.0, 1, log := Accum()) is None and "flow/grad_norm" not in log.means()
    assert flow.sched.last_epoch == 0 and all(p.grad is None for p in flow.module.parameters())
    assert all(torch.equal(before[k], v) for k, v in flow.module.state_dict().items())  # AdamW never ran

    total = flow.total_weight(CORRECT, RESPONSE, CONTEXT)
    flow.backward(RESPONSE, CONTEXT, CORRECT, total, Accum())
    grad_norm = torch.cat([p.grad.flatten() for p in flow.module.parameters()]).norm().item()
    assert flow.step(total, 1e9, 1, log := Accum()) == pytest.approx(grad_norm)
    assert log.means()["flow/grad_norm"] == pytest.approx(grad_norm) and flow.sched.last_epoch == 1
    assert any(not torch.equal(before[k], v) for k, v in flow.module.state_dict().items())


def test_another_process_that_passed_makes_every_process_step_on_averaged_gradients():
    # here nothing passed (total 0), on the other process something did (total 8): both step, on the mean of
    # their gradients (the other's are 0 here, so half of ours)
    flow = learner(perturb=True, soft_flow=1.0)
    flow.backward(RESPONSE, CONTEXT, CORRECT, torch.tensor(14.0), Accum())
    local = torch.cat([p.grad.flatten() for p in flow.module.parameters()]).norm().item()
    grads = [torch.zeros_like(p) for p in flow.module.parameters()]
    flow._reduce, flow.average_gradients = Processes(torch.tensor(8.0), *grads), True
    assert flow.step(torch.tensor(0.0), 1e9, 1, Accum()) == pytest.approx(local / 2)
    assert flow._reduce.calls == ["sum"] + ["mean"] * len(grads)


# ------------------------------------------------------------------ checkpoint state


def test_the_checkpoint_state_restores_field_statistics_and_optimizer(tmp_path):
    flow = learner(perturb=True, latent_norm="standardize")
    assert flow.fit_norm(RESPONSE)
    total = flow.total_weight(CORRECT, RESPONSE, CONTEXT)
    flow.backward(RESPONSE, CONTEXT, CORRECT, total, Accum())
    flow.step(total, 1.0, 1, Accum())
    save_flow(tmp_path / "flow", flow.bundle())
    torch.save(flow.optimizer_state(), tmp_path / "optim.pt")

    again = learner(latent_norm="standardize")  # a fresh flow: other weights, no statistics
    again.load(tmp_path / "flow", torch.load(tmp_path / "optim.pt", weights_only=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(flow.module.state_dict().values(), again.module.state_dict().values())
    )
    assert torch.equal(again.norm.mean, flow.norm.mean) and torch.equal(again.norm.std, flow.norm.std)
    assert again.sched.last_epoch == 1 and again.opt.state_dict()["state"][0]["step"] == 1
    with pytest.raises(FlowMismatchError, match="shift: flow 1 vs run 2"):
        learner(latent_norm="standardize", shift=2).load(tmp_path / "flow")


def test_reading_attaches_a_tap_for_the_duration_only():
    from helpers import tiny_model

    model = tiny_model("llama")
    flow = learner()
    flow.tap = None
    with flow.reading(model) as tap:
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
        assert flow.tap is tap and tap.latents().shape == (2, 1, 3, 32) and tap.indices == [1, 2]
    assert flow.tap is None and tap.sessions == 1
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    assert tap.sessions == 1  # hooks removed
