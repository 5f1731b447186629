"""The RL loop shared by ``--method rlfr | rlvr | entropy`` (RLFR_METHOD §5-6).

One step (``RLTrainer.step``) reads top to bottom:
rollout -> verify -> outcome advantages -> [per micro-batch: forward (log-probs, entropies and latents
from the same pass) -> flow scores -> shaped flow rewards -> token advantages -> PPO loss -> backward
-> flow-matching loss on the detached latents of rollouts that pass the check -> backward] -> optimizer
steps -> log.

When each rollout batch is used once (``ppo_epochs = minibatches = 1``) the rollout policy *is* the
current policy, so the old log-probs are the current ones detached and no extra scoring forward is
needed; otherwise a no-grad pass first records old log-probs, entropies and flow rewards, which stay
fixed over the PPO epochs. Distributed plumbing (accelerate), checkpoints and logging live in
``rlfr.engine``.

Departures from the authors' code (RLFR_METHOD §8): the flow loss runs outside the hooks under
autograd, so online flow updates really train the flow (also under gradient checkpointing), on
detached latents (no gradient reaches the policy); rewards are binary by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlfr.advantages import entropy_advantage, group_advantages, kl_rewards, reward_to_go, token_advantages
from rlfr.flow import build_pairs, pair_counts, per_sequence_mean, token_scores
from rlfr.losses import kl_penalty, policy_loss
from rlfr.metrics import Accum, reduce_stats
from rlfr.online_flow import above_quantile, online_flow_loss, rollout_weights
from rlfr.optim import optimizer_step
from rlfr.rollout import Rollout, generate, policy_forward
from rlfr.shaping import shape_flow_rewards


@dataclass
class Batch:
    """One step's rollouts with their rewards: all (B, ...) on the policy's device."""

    rollout: Rollout
    reward: torch.Tensor  # (B,) combined reward
    correct: torch.Tensor  # (B,) bool, passed the answer check
    outcome_adv: torch.Tensor  # (B,)


def forward_logprobs(model, ro: Rollout, need_entropy: bool):
    """Policy forward: -> (logp (b, T), entropy (b, T) detached or None); latents land in the tap."""
    return policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, need_entropy)


class RLTrainer:
    """Holds the components (built by ``rlfr.engine.build_rl``); ``step(examples)`` runs one RL step."""

    def __init__(
        self,
        cfg,
        accelerator,
        policy,
        ref_policy,
        tokenizer,
        tap,
        flow,
        policy_opt,
        policy_sched,
        flow_opt,
        flow_sched,
        reward_fn,
        verifier,
    ):
        self.cfg, self.acc = cfg, accelerator
        self.policy, self.ref, self.tok, self.tap = policy, ref_policy, tokenizer, tap
        self.flow, self.policy_opt, self.policy_sched = flow, policy_opt, policy_sched
        self.flow_opt, self.flow_sched = flow_opt, flow_sched
        self.reward_fn, self.verifier = reward_fn, verifier
        self.step_count = 0
        self.norm = None  # LatentNorm; fitted on the first micro-batch when the flow has none yet

    @property
    def uses_flow(self) -> bool:
        return self.cfg.method == "rlfr"

    # -- one RL step ---------------------------------------------------------------------------
    def step(self, examples, prompts: list[str]) -> dict[str, float]:
        cfg, t0 = self.cfg, time.time()
        n = cfg.rollout.num_generations
        # 1. rollout (latent capture paused: generate() runs the model once per new token)
        with self.tap.paused() if self.tap else _null():
            rollout = generate(
                self.acc.unwrap_model(self.policy),
                self.tok,
                prompts,
                n,
                cfg.rollout.max_new_tokens,
                cfg.rollout.temperature,
                cfg.rollout.top_p,
                batch_size=cfg.rollout.batch_size,
            )
        t_roll = time.time()
        # 2. verify
        answers = [ex.answer for ex in examples for _ in range(n)]
        reward, correct = self.reward_fn(rollout.completions, answers)
        dev = self.acc.device
        rollout = _to(rollout, dev)
        reward_t = torch.tensor(reward, dtype=torch.float32, device=dev)
        correct_t = torch.tensor(correct, dtype=torch.bool, device=dev)
        t_verify = time.time()
        if self.uses_flow and cfg.flow.latent_norm == "standardize" and self.norm is None:
            self.fit_norm(rollout)
        # 3. outcome advantages (group-normalised over the n samples of each prompt)
        adv_o = group_advantages(reward_t, n, normalize_std=cfg.policy.normalize_std)
        kept = self.accuracy_filter(correct_t, n)
        trained = rollout if kept is None else _with_mask(rollout, rollout.response_mask & kept[:, None])
        batch = Batch(trained, reward_t, correct_t, adv_o)
        # 4-7. policy and flow updates
        stats = self.update(batch)
        if kept is not None:
            stats["filter/kept_frac"] = kept.float().mean().item()
        t_end = time.time()
        self.step_count += 1
        lens = rollout.response_lengths.float()
        stats.update(
            {
                "reward": reward_t.mean().item(),
                "accuracy": correct_t.float().mean().item(),
                "response_len": lens.mean().item(),
                "truncated": rollout.truncated.float().mean().item(),
                "time/rollout": t_roll - t0,
                "time/verify": t_verify - t_roll,
                "time/step": t_end - t0,
                "rollout_tokens_per_s": lens.sum().item() / max(t_roll - t0, 1e-9),
            }
        )
        return reduce_stats(self.acc, stats)

    def accuracy_filter(self, correct: torch.Tensor, n: int) -> torch.Tensor | None:
        """(B,) bool rows of groups whose accuracy is inside the bounds, or None when the filter is off.

        The authors' ``enable_accuracy_filter``: a group of all-equal rewards carries no outcome signal.
        Filtered rows stay in the batch with an empty response mask (they are neither trained on nor train
        the flow), so every process runs the same micro-batches."""
        p = self.cfg.policy
        if not p.accuracy_filter or self.step_count + 1 <= p.freezing_filter_steps:
            return None
        acc = correct.float().view(-1, n).mean(1)
        keep = (acc >= p.accuracy_lower_bound - 1e-9) & (acc <= p.accuracy_upper_bound + 1e-9)
        return keep.repeat_interleave(n)

    # -- update -------------------------------------------------------------------------------
    def update(self, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        bsz = batch.rollout.input_ids.shape[0]
        mbs = cfg.policy.micro_batch_size
        single_pass = cfg.policy.ppo_epochs == 1 and cfg.policy.minibatches == 1
        hold_actor = self.step_count < cfg.flow.actor_warmup_steps
        acc = Accum()
        tokens = self.acc.reduce(batch.rollout.response_mask.sum().to(self.acc.device).float(), "sum")
        if float(tokens) == 0:  # the accuracy filter dropped every group: nothing to learn, and an AdamW
            return {"update/skipped": 1.0}  # step on zero gradients would still move the weights
        self.flow_seconds = 0.0
        self.flow_weight_total = self.flow_weights(batch).sum()
        fixed = None if single_pass else self.score_batch(batch, acc)
        t_upd = time.time()
        per_epoch = max(1, bsz // cfg.policy.minibatches)
        for _ in range(cfg.policy.ppo_epochs):
            order = torch.arange(bsz) if single_pass else torch.randperm(bsz)
            for m0 in range(0, bsz, per_epoch):
                mini = order[m0 : m0 + per_epoch]
                mask_mini = batch.rollout.response_mask[mini]
                n_seq, n_tok = int(mask_mini.any(1).sum()), int(mask_mini.sum())
                for c0 in range(0, len(mini), mbs):
                    rows = mini[c0 : c0 + mbs]
                    self.micro_step(batch, rows, fixed, n_seq, n_tok, acc, hold_actor)
                if not hold_actor:
                    acc.add(
                        "policy/grad_norm", self._opt_step(self.policy, self.policy_opt, self.policy_sched)
                    )
        t_flow = time.time()
        if self.uses_flow and cfg.flow.update:
            # no rollout passed the check anywhere (and soft_flow = 0): nothing to learn, and an AdamW step on
            # zero gradients would still move the flow through momentum and weight decay
            if float(self.acc.reduce(self.flow_weight_total.to(self.acc.device), "sum")) > 0:
                acc.add("flow/grad_norm", self._opt_step(self.flow, self.flow_opt, self.flow_sched, "flow"))
            else:
                self.flow_opt.zero_grad(set_to_none=True)
        out = acc.means()
        if "flow_score/auroc" in acc.samples:  # do the flow's scores separate correct from wrong rollouts?
            from rlfr.report import auroc

            scores, correct = acc.samples["flow_score/auroc"]
            auc = auroc([-x for x in scores], correct)  # lower deviation = correct
            if auc is not None:
                out["flow_score/auroc"] = auc
        out["time/update"] = t_flow - t_upd
        out["time/flow"] = self.flow_seconds
        out["policy/lr"] = self.policy_sched.get_last_lr()[0]
        return out

    def micro_step(self, batch: Batch, rows: torch.Tensor, fixed, n_seq: int, n_tok: int, acc, hold_actor):
        cfg = self.cfg
        ro = batch.rollout.select(rows)
        mask = ro.response_mask
        with torch.set_grad_enabled(not hold_actor):  # entropies are always logged, so always computed
            logp, ent = forward_logprobs(self.policy, ro, True)
        ref_logp = None
        if self.ref is not None:
            with self.tap.paused() if self.tap else _null(), torch.no_grad():  # not the policy's latents
                ref_logp, _ = forward_logprobs(self.ref, ro, False)
        if fixed is None:  # single pass: rewards and old log-probs come from this very forward
            old_logp = logp.detach()
            adv = self.advantages(batch, rows, ro, ent, old_logp, ref_logp, acc)
        else:
            adv, old_logp = fixed["adv"][rows], fixed["old_logp"][rows]
        if self.uses_flow and cfg.flow.update and fixed is None:
            self.flow_micro_step(batch, rows, ro, ent, acc)
        if hold_actor:
            return
        p = cfg.policy
        out = policy_loss(
            logp, old_logp, adv, mask, p.clip_low, p.clip_high, p.aggregation,
            ref_logp=ref_logp if p.kl_mode == "loss" else None,
            kl_coef=p.kl_coef if p.kl_mode == "loss" else 0.0,
            kl_estimator=p.kl_estimator, num_sequences=n_seq, num_tokens=n_tok, ratio_max=p.ratio_max,
        )  # fmt: skip
        self.acc.backward(out.loss)
        acc.add("policy/loss", out.loss.item(), weight=len(rows))
        acc.add("policy/clip_frac", out.clip_frac.item(), weight=len(rows))
        if ref_logp is not None:
            kl = kl_penalty(logp.detach(), ref_logp, p.kl_estimator)
            acc.add("policy/kl", (kl * mask).sum().item() / max(int(mask.sum()), 1), weight=len(rows))
        acc.add("policy/entropy", (ent * mask).sum().item() / max(int(mask.sum()), 1), weight=len(rows))

    def advantages(
        self,
        batch: Batch,
        rows: torch.Tensor,
        ro: Rollout,
        ent: torch.Tensor,
        logp: torch.Tensor,
        ref_logp: torch.Tensor | None,
        acc: Accum,
    ) -> torch.Tensor:
        """Token advantages of rows (b, T): A_k = A_o + sum_{s >= k} r_s with r the shaped flow rewards
        (rlfr) plus, with ``kl_mode=reward``, -kl_coef * k1 per token (the authors' RLVR baseline puts its
        KL there). Logs the flow statistics into ``acc``."""
        cfg, mask = self.cfg, ro.response_mask
        token_rewards = None
        if self.uses_flow:
            scores = token_scores(
                self.acc.unwrap_model(self.flow),
                self.latents(mask),
                self.tap.layer_values.to(mask.device),
                mask,
                cfg.flow.modes,
                cfg.flow.shift,
                cfg.flow.reward.timesteps,
                context_mask=ro.attention_mask.bool(),
            )
            r = cfg.flow.reward
            token_rewards = shape_flow_rewards(
                scores.scores, scores.valid, r.beta, r.eta, r.top_k, r.bilateral, r.gamma
            )
            n_tok = max(int(mask.sum()), 1)
            acc.add("flow_reward/mean", token_rewards.sum().item() / n_tok)
            acc.add("flow_reward/nonzero_frac", (token_rewards != 0).sum().item() / n_tok)
            if scores.valid.any():
                acc.add("flow_score/mean", scores.scores[scores.valid].mean().item())
            rtg = reward_to_go(token_rewards, mask)  # the flow term of the advantage, next to |A_o|
            acc.add("adv/flow_abs", rtg.abs().sum().item() / n_tok, weight=n_tok)
            has = scores.valid.any(1)  # the sequence score: mean deviation over its scored tokens
            seq = (scores.scores * scores.valid).sum(1) / scores.valid.sum(1).clamp(min=1)
            acc.add_samples("flow_score/auroc", seq[has].tolist(), batch.correct[rows][has].tolist())
        live = mask.any(1)
        if live.any():
            acc.add(
                "adv/outcome_abs", batch.outcome_adv[rows][live].abs().mean().item(), weight=int(live.sum())
            )
        if cfg.policy.kl_mode == "reward" and ref_logp is not None:
            kl_r = kl_rewards(logp, ref_logp, mask, cfg.policy.kl_coef)
            token_rewards = kl_r if token_rewards is None else token_rewards + kl_r
        adv = token_advantages(batch.outcome_adv[rows], token_rewards, mask)
        if cfg.method == "entropy":
            adv = entropy_advantage(adv, ent, mask, cfg.policy.entropy_alpha, cfg.policy.entropy_kappa)
        return adv

    def latents(self, mask: torch.Tensor) -> torch.Tensor:
        """The tapped latents of the latest forward, standardised per layer when configured: (L, b, T, d)."""
        lat = self.tap.latents()
        if self.cfg.flow.latent_norm == "none":
            return lat
        if self.norm is None:
            raise RuntimeError("latent_norm=standardize but no statistics: fit_norm() runs at the first step")
        return self.norm(lat)

    def fit_norm(self, rollout: Rollout) -> None:
        """Latent statistics of a flow trained from scratch during RL: the first micro-batch of the first
        rollouts (before any filtering), averaged over processes so that every rank uses the same."""
        from rlfr.latent_norm import LatentNorm

        ro = rollout.select(torch.arange(min(len(rollout.completions), self.cfg.policy.micro_batch_size)))
        with torch.no_grad():
            forward_logprobs(self.policy, ro, False)
        fitted = LatentNorm.fit(self.tap.latents(), ro.response_mask)
        self.norm = LatentNorm(self.acc.reduce(fitted.mean, "mean"), self.acc.reduce(fitted.std, "mean"))

    def flow_weights(self, batch: Batch) -> torch.Tensor:
        """Per-rollout flow-loss weight times its pair count (B,): 1 if correct, soft_flow otherwise.

        Known before any forward, so it counts all response pairs: with ``entropy_quantile`` the trained
        pairs are a subset and the loss is scaled down by the same factor for every micro-batch."""
        if not self.uses_flow:
            return torch.zeros(1)
        w = rollout_weights(batch.correct, self.cfg.flow.soft_flow)
        return w * pair_counts(
            batch.rollout.response_mask,
            batch.rollout.attention_mask.bool(),
            self.cfg.flow.modes,
            self.cfg.flow.shift,
            len(self.cfg.flow.fractions),
        )

    def flow_micro_step(self, batch: Batch, rows: torch.Tensor, ro: Rollout, ent: torch.Tensor, acc) -> None:
        """Online flow update (rejection sampling, RLFR §6) on this micro-batch's detached latents."""
        t0, cfg = time.time(), self.cfg.flow
        mask = ro.response_mask
        if cfg.entropy_quantile is not None:
            mask = mask & above_quantile(ent, mask, cfg.entropy_quantile)
        pairs = build_pairs(
            self.latents(ro.response_mask),
            self.tap.layer_values.to(mask.device),
            mask,
            cfg.modes,
            cfg.shift,
            context_mask=ro.attention_mask.bool(),
        )
        correct = batch.correct[rows]
        w = rollout_weights(correct, cfg.soft_flow)[pairs.batch_index]
        out = online_flow_loss(
            self.flow, pairs, w, self.flow_weight_total, cfg.batch_mul, self.acc.unwrap_model(self.flow)
        )
        self.acc.backward(out.loss)
        seq = per_sequence_mean(out.per_pair, pairs.batch_index, len(rows))
        has = torch.bincount(pairs.batch_index, minlength=len(rows)) > 0
        for name, sel in (("flow/loss_correct", correct & has), ("flow/loss_wrong", ~correct & has)):
            if sel.any():
                acc.add(name, seq[sel].mean().item(), weight=int(sel.sum()))
        self.flow_seconds += time.time() - t0

    def score_batch(self, batch: Batch, acc) -> dict[str, torch.Tensor]:
        """No-grad pass for multi-epoch PPO: old log-probs and fixed advantages, plus the flow update."""
        bsz, mbs = batch.rollout.input_ids.shape[0], self.cfg.policy.micro_batch_size
        old, advs = [], []
        for c0 in range(0, bsz, mbs):
            rows = torch.arange(c0, min(c0 + mbs, bsz))
            ro = batch.rollout.select(rows)
            with torch.no_grad():
                logp, ent = forward_logprobs(self.policy, ro, True)
                ref_logp = None
                if self.ref is not None:
                    with self.tap.paused() if self.tap else _null():
                        ref_logp, _ = forward_logprobs(self.ref, ro, False)
            adv = self.advantages(batch, rows, ro, ent, logp, ref_logp, acc)
            if self.uses_flow and self.cfg.flow.update:
                self.flow_micro_step(batch, rows, ro, ent, acc)
            old.append(logp)
            advs.append(adv)
        return {"old_logp": torch.cat(old), "adv": torch.cat(advs)}

    def _opt_step(self, model, opt, sched, name: str = "policy") -> float:
        return optimizer_step(
            self.acc,
            model,
            opt,
            sched,
            self.cfg.policy.max_grad_norm,
            f"{name} at step {self.step_count + 1}",
        )


def _with_mask(ro: Rollout, response_mask: torch.Tensor) -> Rollout:
    return Rollout(ro.input_ids, ro.attention_mask, response_mask, ro.group, ro.completions, ro.truncated)


def _to(ro: Rollout, device) -> Rollout:
    return Rollout(
        ro.input_ids.to(device),
        ro.attention_mask.to(device),
        ro.response_mask.to(device),
        ro.group.to(device),
        ro.completions,
        ro.truncated.to(device),
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
