"""The flow during RL: one object that reads the policy's latents, scores them into token rewards and keeps
training on the rollouts that pass the check (RLFR §4-6). ``rlfr train`` (``rlfr.rl.step``) and the TRL
bridge (``rlfr.integrations.trl``) both run it; the maths are the pure functions it wires
(``deviation.token_scores``, ``shaping.shape_flow_rewards``, ``matching.build_pairs``, ``online``).

Use, per batch of rollouts (every tensor on the policy's device)::

    flow = FlowLearner(cfg, bundle, tap, reduce=acc.reduce, backward=acc.backward, optimizer_step=...)
    flow.attach_optimizer(opt, sched)                     # online updates (cfg.update)
    total = flow.total_weight(correct, response, context)  # () before the first micro-batch
    for each micro-batch:                                  # the policy's forward fills the tap
        if flow.fit_norm(response_mb):                     # a fresh flow's statistics, once
            rewards = flow.score(response_mb, context_mb, correct_mb, log)     # (b, T)
            flow.backward(response_mb, context_mb, correct_mb, total, log, entropy_mb)
    flow.step(total, max_grad_norm, step, log)             # one optimizer step per batch

What it owns: which latents it reads (``tap``: the hooked blocks at ``cfg.fractions`` and their layer values);
their standardisation (``latent_norm=standardize``: a fresh flow fits the statistics on the first latents that
have a response token on every process, averaged over processes with ``reduce``; a loaded flow brings its
own); the token rewards and their statistics (``flow_reward/*``, ``flow_score/*``); the online loss on
detached latents (weight 1 for rollouts that pass the check, ``soft_flow`` for the others; the whole batch's
weight is known before the first micro-batch, so the micro-batch losses sum to the full-batch mean), its
optimizer and schedule and the one step per batch (none when nothing anywhere passed the check: AdamW would
still move the flow); and its state in checkpoints (``bundle()``, ``optimizer_state()``, ``load()``).

What is injected, so that this module needs nothing above ``flow`` in the layer order: ``reduce(tensor, op)``
(accelerate's ``Accelerator.reduce``), ``backward(loss)`` (``Accelerator.backward``, or ``Tensor.backward``
where the flow is not the accelerator's), ``optimizer_step(module, opt, sched, max_grad_norm, what, step)``
(``rlfr.runtime.optim.optimizer_step`` with its accelerator bound), and each call's ``log``: any object with
``add``, ``total``, ``flag_nonfinite`` and ``add_samples`` (``rlfr.runtime.metrics.Accum``). Statistics and
non-finite flags stay on the device (no host sync inside a micro-batch); a non-finite score turns its row's
rewards into NaN, so the loss and the all-reduced gradients are NaN on every process and the optimizer step
stops the run, naming the quantity flagged first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from rlfr.flow.deviation import token_scores
from rlfr.flow.matching import build_pairs, pair_counts, per_sequence_mean
from rlfr.flow.norm import LatentNorm
from rlfr.flow.online import above_quantile, online_flow_loss, rollout_weights
from rlfr.flow.shaping import shape_flow_rewards
from rlfr.flow.store import FlowBundle, load_flow
from rlfr.policy.latents import LatentTap
from rlfr.schema import FlowConfig


class StepLog(Protocol):
    """What the learner writes its statistics to (``rlfr.runtime.metrics.Accum``)."""

    def add(self, key: str, value: Any, weight: Any = 1.0) -> None: ...
    def total(self, key: str, value: float) -> None: ...
    def flag_nonfinite(self, quantity: str, flag: Any) -> None: ...
    def add_samples(
        self, key: str, scores: Any, labels: Any, keep: Any = None, groups: Any = None
    ) -> None: ...
    def add_pairs(self, key: str, x: Any, y: Any, keep: Any = None, groups: Any = None) -> None: ...


def _single_process(tensor: torch.Tensor, op: str) -> torch.Tensor:
    return tensor


class FlowLearner:
    """The flow of an RL run (module docstring). ``bundle``: the flow as built or loaded (``store.build_flow``);
    ``tap``: the tap on the policy, or None when the trainer attaches one per batch (``reading``); ``field``:
    the module to train when the accelerator wrapped ``bundle.field`` (DDP), which still scores and is saved;
    ``average_gradients``: average the flow's gradients over processes at the step (for a flow that no
    wrapper synchronises); ``autocast_dtype``: ``flow.precision`` resolved for the device (None: float32)."""

    def __init__(
        self,
        cfg: FlowConfig,
        bundle: FlowBundle,
        tap: LatentTap | None = None,
        *,
        field: nn.Module | None = None,
        reduce: Callable[[torch.Tensor, str], torch.Tensor] = _single_process,
        backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
        optimizer_step: Callable[..., float] | None = None,
        average_gradients: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.cfg, self.meta, self.tap = cfg, bundle.meta, tap
        self.module = bundle.field  # unwrapped: scores, logs untrained pairs, is saved
        self.field = field if field is not None else bundle.field  # trained (maybe DDP-wrapped)
        self.norm: LatentNorm | None = bundle.norm
        self.opt: torch.optim.Optimizer | None = None
        self.sched: torch.optim.lr_scheduler.LRScheduler | None = None
        self.autocast_dtype, self.average_gradients = autocast_dtype, average_gradients
        self._reduce, self._backward, self._optimizer_step = reduce, backward, optimizer_step

    # ------------------------------------------------------------------ set-up

    def attach_optimizer(
        self, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler
    ) -> None:
        """The online update's optimizer and schedule (built by the trainer, which knows the step count)."""
        self.opt, self.sched = opt, sched

    @contextlib.contextmanager
    def reading(self, model: nn.Module) -> Iterator[LatentTap]:
        """A tap on ``model`` inside only: for trainers whose own forwards must not be captured."""
        if self.tap is not None:
            raise RuntimeError("the flow learner already has a tap on the policy")
        self.tap = LatentTap(model, self.cfg.fractions)
        try:
            yield self.tap
        finally:
            self.tap.remove()
            self.tap = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def needs_entropy(self) -> bool:
        """Whether ``backward`` needs the policy's token entropies (``entropy_quantile`` with online updates)."""
        return self.cfg.update and self.cfg.entropy_quantile is not None

    # ------------------------------------------------------------------ latents

    @property
    def needs_norm(self) -> bool:
        """A fresh flow with ``latent_norm=standardize`` before its statistics are fitted."""
        return self.cfg.latent_norm == "standardize" and self.norm is None

    def fit_norm(self, mask: torch.Tensor) -> bool:
        """Whether the flow can read the latest forward's latents; fits a fresh flow's statistics on them first
        (over the ``mask`` (b, T) tokens, averaged over processes). False while some process has no token in
        its ``mask`` (TRL's ``mask_truncated_completions`` can empty a micro-batch): nothing to fit from yet."""
        if not self.needs_norm:
            return True
        if float(self._reduce(mask.any().float().to(self.device), "min")) == 0:
            return False
        fitted = LatentNorm.fit(self.tap.latents(), mask)
        self.norm = LatentNorm(self._reduce(fitted.mean, "mean"), self._reduce(fitted.std, "mean"))
        return True

    def latents(self) -> torch.Tensor:
        """The latest forward's tapped latents as the flow sees them: (L, b, T, d), standardised when configured."""
        lat = self.tap.latents()
        if self.cfg.latent_norm == "none":
            return lat
        if self.norm is None:
            raise RuntimeError("latent_norm=standardize but no statistics yet: call fit_norm() first")
        return self.norm(lat)

    # ------------------------------------------------------------------ rewards

    def score(
        self,
        mask: torch.Tensor,
        context_mask: torch.Tensor,
        correct: torch.Tensor,
        log: StepLog,
        group: torch.Tensor | None = None,
    ):
        """The flow rewards of the latest forward's b sequences (RLFR §4), their statistics in ``log``.

        mask: (b, T) bool response tokens; context_mask: (b, T) bool non-padding; correct: (b,) bool (the labels of
        the flow-score AUROC); group: (b,) long, the prompt of each row, or None -> (b, T) float32 rewards
        r = -beta x, 0 outside ``mask``. With ``group`` the statistics also hold the AUROC within prompts
        (``flow_score/auroc_within``, ``flow_score/auroc_within_groups``: GRPO compares rollouts of one prompt
        only) and the correlation of the sequence score with the response length (``flow_score/len_corr``, pooled,
        and ``flow_score/len_corr_within``)."""
        f, r = self.cfg, self.cfg.reward
        lat = self.latents()
        log.flag_nonfinite("a latent (the output of a hooked block)", ~torch.isfinite(lat).all())
        scores = token_scores(
            self.module, lat, self.tap.layer_values.to(mask.device), mask, f.modes, f.shift, r.timesteps,
            context_mask=context_mask, autocast_dtype=self.autocast_dtype,
        )  # fmt: skip
        finite = torch.isfinite(scores.scores) | ~scores.valid
        log.flag_nonfinite("a flow score", ~finite.all())
        clean = torch.where(finite, scores.scores, 0.0)  # shaped without a host sync; NaN put back below
        rewards = shape_flow_rewards(clean, scores.valid, r.beta, r.eta, r.top_k, r.bilateral, r.gamma,
                                     check_finite=False)  # fmt: skip
        rewards = torch.where(finite.all(1, keepdim=True), rewards, torch.where(mask, torch.nan, 0.0))
        n_tok = mask.sum().clamp(min=1)
        n_valid = scores.valid.sum()
        log.add("flow_reward/mean", rewards.sum() / n_tok)
        log.add("flow_reward/nonzero_frac", (rewards != 0).sum() / n_tok)
        log.add("flow_score/mean", (clean * scores.valid).sum() / n_valid.clamp(min=1), weight=n_valid)
        has = scores.valid.any(1)  # the sequence score: the mean deviation over its scored tokens
        seq = (clean * scores.valid).sum(1) / scores.valid.sum(1).clamp(min=1)
        log.add_samples("flow_score/auroc", -seq, correct, keep=has, groups=group)
        if group is not None:
            log.add_pairs("flow_score/len_corr", seq, mask.sum(1), keep=has, groups=group)
        return rewards

    # ------------------------------------------------------------------ online update

    def total_weight(
        self, correct: torch.Tensor, mask: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """The whole batch's flow-loss weight: sum over rollouts of (1 if correct else soft_flow) x pair count;
        correct (B,), masks (B, T) -> (). It counts all response pairs: with ``entropy_quantile`` the trained
        pairs are a subset and every micro-batch's loss is scaled down by the same factor."""
        f = self.cfg
        counts = pair_counts(mask, context_mask, f.modes, f.shift, len(f.fractions))
        return (rollout_weights(correct, f.soft_flow) * counts).sum()

    def backward(
        self,
        mask,
        context_mask,
        correct,
        total: torch.Tensor,
        log: StepLog,
        entropy: torch.Tensor | None = None,
    ) -> None:
        """Back-propagate the online flow loss of the latest forward's b sequences (RLFR §6: rejection
        sampling) into the field; nothing without ``cfg.update``. mask, context_mask: (b, T) bool; correct:
        (b,) bool; total: () (``total_weight``); entropy: (b, T), needed with ``entropy_quantile``."""
        f = self.cfg
        if not f.update:
            return
        t0 = time.time()
        lat = self.latents()  # detached: no gradient reaches the policy
        if f.entropy_quantile is not None:
            mask = mask & above_quantile(entropy, mask, f.entropy_quantile)
        pairs = build_pairs(lat, self.tap.layer_values.to(mask.device), mask, f.modes, f.shift,
                            context_mask=context_mask)  # fmt: skip
        w = rollout_weights(correct, f.soft_flow)[pairs.batch_index]
        log.total(
            "flow/pairs", float(len(w))
        )  # a shape, no host sync; the FLOP floor of benchmarks/rl_step.py
        log.add("flow/trained_pair_frac", (w > 0).float().sum() / max(len(w), 1), weight=len(w))
        out = online_flow_loss(self.field, pairs, w, total, f.batch_mul, self.module, self.autocast_dtype)
        log.flag_nonfinite("the online flow loss", ~torch.isfinite(out.loss))
        self._backward(out.loss)
        seq = per_sequence_mean(out.per_pair, pairs.batch_index, len(correct))
        has = torch.bincount(pairs.batch_index, minlength=len(correct)) > 0
        for name, sel in (("flow/loss_correct", correct & has), ("flow/loss_wrong", ~correct & has)):
            n_sel = sel.sum()
            log.add(name, (seq * sel).sum() / n_sel.clamp(min=1), weight=n_sel)
        log.total("time/flow", time.time() - t0)

    def step(self, total: torch.Tensor, max_grad_norm: float, step: int, log: StepLog) -> float | None:
        """One optimizer step on the accumulated gradients (clipped at ``max_grad_norm``; ``step`` names the
        step in errors) -> the gradient norm, also logged as ``flow/grad_norm``. None, and the gradients
        dropped, when ``total`` summed over processes is 0 (nothing passed the check anywhere and
        ``soft_flow`` = 0); None without ``cfg.update``."""
        if not self.cfg.update:
            return None
        if self.opt is None or self._optimizer_step is None:
            raise RuntimeError(
                "the flow learner cannot step: give it optimizer_step and attach_optimizer() before training"
            )
        if not float(self._reduce(total.to(self.device), "sum")) > 0:
            self.opt.zero_grad(set_to_none=True)
            return None
        if self.average_gradients:
            for p in self.field.parameters():
                p.grad = self._reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
        norm = self._optimizer_step(self.field, self.opt, self.sched, max_grad_norm, "flow", step)
        log.add("flow/grad_norm", norm)
        return norm

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (a skipped batch)."""
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state

    def bundle(self) -> FlowBundle:
        """The flow as a flow directory holds it (``store.save_flow``)."""
        if self.needs_norm:
            raise RuntimeError(
                "the flow's latent statistics are fitted at the first batch; nothing to save before"
            )
        return FlowBundle(self.module, self.meta, self.norm)

    def optimizer_state(self) -> dict[str, Any]:
        """The online update's optimizer and schedule state (tensors and numbers: ``weights_only`` loads it)."""
        return {"flow": self.opt.state_dict(), "flow_sched": self.sched.state_dict()}

    def load(self, directory, optimizer_state: dict[str, Any] | None = None) -> None:
        """Restore a checkpoint's flow directory (checked to model this run's latents) and, given, the
        optimizer state ``optimizer_state()`` wrote."""
        bundle = load_flow(directory, self.meta)
        self.module.load_state_dict(bundle.field.state_dict())
        self.norm = bundle.norm
        if optimizer_state is not None:
            self.opt.load_state_dict(optimizer_state["flow"])
            self.sched.load_state_dict(optimizer_state["flow_sched"])
