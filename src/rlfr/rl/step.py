"""The RL step shared by ``method=rlfr | rlvr | entropy`` (docs/RLFR_METHOD.md §5-6).

``rl_step(c, step, examples, prompts) -> dict[str, float]`` reads top to bottom: rollout -> verify ->
outcome advantages (-> accuracy filter) -> update -> log. The update, per micro-batch: one forward gives
log-probs, entropies and (through the tap) latents -> flow scores -> shaped flow rewards -> token advantages
-> PPO loss -> backward -> flow-matching loss on the detached latents of rollouts that pass the check ->
backward; then the optimizer steps. Every long-lived object is in ``Components`` (built by
``rlfr.recipes.train``); everything of one step is a local passed explicitly. Everything about the flow
(latents, their statistics, scores, shaped rewards, the online update and its optimizer) is the
``rlfr.flow.learner.FlowLearner`` in ``Components.flow``, which the TRL bridge (``rlfr.integrations.trl``)
runs too; this module only says when.

When each rollout batch is used once (``ppo_epochs = minibatches = 1``) the rollout policy *is* the current
policy, so the old log-probs are the current ones detached and no extra forward is needed; otherwise a
no-grad pass (``score_pass``) first records old log-probs and advantages, which stay fixed over the epochs,
and trains the flow.

Rollouts come from ``Components.sampler`` (``rlfr.policy.sampler``: Hugging Face ``generate`` on the policy,
or with ``rollout.engine=vllm`` a colocated vLLM engine, which gets the policy's weights before each rollout
after an optimizer step); the update's log-probs always come from the transformers forward, and
``rollout/logp_diff_*`` log how far the engine's log-probs are from them (``rollout.vllm_is_correction``
reweights the loss by their truncated ratio).

Departures from the authors' code (docs/RLFR_METHOD.md §8): the flow loss runs outside the hooks under autograd, so
online flow updates really train the flow (also under gradient checkpointing), on detached latents (no
gradient reaches the policy; ``rlfr.flow.learner``); rewards are binary by default (``reward.outcome=authors``
gives their 1 / 0.5 / 0), and only rollouts that pass ``reward.correct_if`` train the flow
(``rlfr.reward.outcome``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from rlfr.errors import NonFiniteError
from rlfr.flow.learner import FlowLearner
from rlfr.policy.forward import policy_forward
from rlfr.policy.rollout import Rollout
from rlfr.policy.sampler import Sampler, SamplingParams
from rlfr.policy.vision import images_of
from rlfr.reward.outcome import OutcomeReward, reward_columns
from rlfr.rl.advantages import entropy_advantage, group_advantages, kl_rewards, reward_to_go, token_advantages
from rlfr.rl.losses import kl_penalty, policy_loss, truncated_is_weights
from rlfr.runtime.metrics import Accum, reduce_stats
from rlfr.runtime.optim import optimizer_step
from rlfr.runtime.sharding import root_gathered
from rlfr.schema import TrainConfig


@dataclass
class Components:
    cfg: TrainConfig
    acc: object  # accelerate.Accelerator
    policy: nn.Module  # as prepared by accelerate
    tokenizer: object
    policy_opt: torch.optim.Optimizer
    policy_sched: torch.optim.lr_scheduler.LRScheduler
    reward: OutcomeReward
    # the start model, for the KL (kl_coef > 0 or track_kl); with LoRA the policy with its adapters off
    ref: nn.Module | None = None
    flow: FlowLearner | None = None  # method rlfr only: the flow, its tap on the policy and its optimizer
    # rollout.engine's sampler (rlfr.policy.sampler.build_sampler); None only for components that never sample
    sampler: Sampler | None = None
    nonfinite_skipped: int = 0  # batches skipped for NaN / inf so far (policy.skip_nonfinite_batches)


@dataclass
class Batch:
    """One step's rollouts on the policy's device: all (B, ...)."""

    rollout: Rollout
    reward: torch.Tensor  # (B,) combined reward
    correct: torch.Tensor  # (B,) bool, passed the answer check
    outcome_adv: torch.Tensor  # (B,)


@dataclass
class Fixed:
    """Multi-epoch PPO: old log-probs and advantages of the whole batch, (B, T) each."""

    old_logp: torch.Tensor
    adv: torch.Tensor


def rl_step(
    c: Components, step: int, examples, prompts: list[str], samples: list[dict] | None = None
) -> dict[str, float]:
    """One RL step (``step`` counts from 0); -> statistics averaged over processes. ``samples``, when given,
    receives one row per rollout of this process: prompt, completion, reward, correct and (rlfr) the sum of
    its flow rewards."""
    cfg, n, t0 = c.cfg, c.cfg.rollout.num_generations, time.time()
    # 1. rollout (latent capture paused: generate() runs the model once per new token)
    with paused(c):
        pushed = sync_sampler(c)
        t_sync = time.time()
        ro = sample(c, prompts, examples)
    t_roll = time.time()
    # 2. verify: rewards (reward.funcs) and which rollouts are correct (reward.correct_if: they train the flow)
    problems = [ex.problem for ex in examples for _ in range(n)]
    scored = c.reward(problems, ro.completions, reward_columns(examples, n))
    reward, correct = scored.rewards, scored.correct
    ro = ro.to(c.acc.device)
    reward_t = torch.tensor(reward, dtype=torch.float32, device=c.acc.device)
    correct_t = torch.tensor(correct, dtype=torch.bool, device=c.acc.device)
    t_verify = time.time()
    if c.flow is not None and c.flow.needs_norm:
        fit_norm(c, ro)
    # 3. outcome advantages, group-normalised over the n samples of each prompt; the accuracy filter
    #    empties the response mask of groups without outcome signal
    adv_o = group_advantages(reward_t, n, normalize_std=cfg.policy.normalize_std)
    keep = accuracy_filter(correct_t, n, cfg, step)
    trained = ro if keep is None else replace(ro, response_mask=ro.response_mask & keep[:, None])
    # 4-6. policy and flow updates
    log = Accum()
    update(c, Batch(trained, reward_t, correct_t, adv_o), step, log)
    # 7. log
    lens = ro.response_lengths.float()
    stats = log.means() | {
        "reward": reward_t.mean().item(),
        "accuracy": correct_t.float().mean().item(),
        "response_len": lens.mean().item(),
        "truncated": ro.truncated.float().mean().item(),
        "update/tokens": ro.attention_mask.sum().item(),  # prompt + response tokens the update's forward sees
        "time/rollout": t_roll - t_sync,
        "time/verify": t_verify - t_roll,
        "time/step": time.time() - t0,
        "rollout_tokens_per_s": lens.sum().item() / max(t_roll - t_sync, 1e-9),
    }
    if c.sampler.holds_weights:
        stats |= {"time/weight_sync": t_sync - t0, "rollout/weights_pushed": float(pushed)}
    if len(scored.parts) > 1:  # each function's own mean score, over the rollouts it scored
        stats |= {
            f"reward/{k}": sum(g) / len(g)
            for k, v in scored.parts.items()
            if (g := [x for x in v if x is not None])
        }
    if keep is not None:
        stats["filter/kept_frac"] = keep.float().mean().item()
    if "update/skipped_nonfinite" in stats:  # the skipped batch's NaN statistics are not logged
        stats = {k: v for k, v in stats.items() if math.isfinite(v)}
    vc = c.reward.verifier.last_counts  # what scored 0 for a reason other than a wrong answer
    stats |= {f"verify/{k}": getattr(vc, k) / max(vc.total, 1) for k in ("no_answer", "timeouts", "errors")}
    if samples is not None:
        flow_sums = log.row_values("flow_reward")
        for i, text in enumerate(ro.completions):
            row = {"prompt": prompts[i // n], "completion": text, "reward": reward[i], "correct": correct[i]}
            samples.append(row | ({"flow_reward": flow_sums.get(i, 0.0)} if c.flow is not None else {}))
    return reduce_stats(c.acc, stats)


def sync_sampler(c: Components) -> bool:
    """Give the sampler the policy's weights (the scheduler's step count is their version): a sampler with its
    own copy pushes them if an optimizer step changed them since the last push; -> whether it pushed."""
    return c.sampler.sync_weights(c.acc.unwrap_model(c.policy), version=c.policy_sched.last_epoch)


def sample(c: Components, prompts: list[str], examples) -> Rollout:
    """``num_generations`` rollouts per prompt (images from ``examples`` for a vision-language policy). No
    seed: the sampler draws from torch's RNG, which is seeded per process and checkpointed."""
    r = c.cfg.rollout
    params = SamplingParams(n=r.num_generations, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_p=r.top_p)  # fmt: skip
    return c.sampler.generate(prompts, params, images=images_of(c.tokenizer, examples))


def update(c: Components, batch: Batch, step: int, log: Accum) -> None:
    """Policy optimizer steps (``ppo_epochs`` x ``minibatches``) and one flow optimizer step.

    A NaN or inf anywhere reaches the gradients (a micro-batch's non-finite loss is back-propagated, so under
    DDP every process sees it in the all-reduced gradient and all stop together) and is caught at the
    optimizer step, which applies nothing; the error names the first quantity that went non-finite on this
    process. With ``policy.skip_nonfinite_batches`` > 0 the rest of the batch is skipped instead, that many
    times at most."""
    try:
        _update(c, batch, step, log)
    except NonFiniteError as e:
        quantity = log.first_nonfinite() or e.quantity
        if c.nonfinite_skipped >= c.cfg.policy.skip_nonfinite_batches:
            raise NonFiniteError(quantity, step + 1, "nothing of this step was applied") from None
        c.nonfinite_skipped += 1
        c.policy_opt.zero_grad(set_to_none=True)
        if c.flow is not None:
            c.flow.zero_grad()
        log.add("update/skipped_nonfinite", 1.0)
        print(f"step {step + 1}: {quantity} is not finite; batch skipped "
              f"({c.nonfinite_skipped} of {c.cfg.policy.skip_nonfinite_batches} allowed)")  # fmt: skip


def _update(c: Components, batch: Batch, step: int, log: Accum) -> None:
    p, bsz = c.cfg.policy, batch.rollout.input_ids.shape[0]
    tokens = c.acc.reduce(batch.rollout.response_mask.sum().to(c.acc.device).float(), "sum")
    if float(tokens) == 0:  # the accuracy filter dropped every group: nothing to learn, and an AdamW
        log.add("update/skipped", 1.0)  # step on zero gradients would still move the weights
        return
    hold_actor = step < c.cfg.flow.actor_warmup_steps
    flow_total = flow_weight_total(c, batch)
    single_pass = p.ppo_epochs == 1 and p.minibatches == 1
    fixed = None if single_pass else score_pass(c, batch, flow_total, log)
    t_upd = time.time()
    per_mini = max(1, bsz // p.minibatches)
    for _ in range(p.ppo_epochs):
        order = torch.arange(bsz) if single_pass else torch.randperm(bsz)
        for m0 in range(0, bsz, per_mini):
            mini = order[m0 : m0 + per_mini]
            mask = batch.rollout.response_mask[mini]
            norms = (
                int(mask.any(1).sum()),
                int(mask.sum()),
            )  # the minibatch's sequence and token counts (1 sync)
            for c0 in range(0, len(mini), p.micro_batch_size):
                micro_step(
                    c, batch, mini[c0 : c0 + p.micro_batch_size], fixed, flow_total, norms, hold_actor, log
                )
            if not hold_actor:
                norm = optimizer_step(
                    c.acc, c.policy, c.policy_opt, c.policy_sched, p.max_grad_norm, "policy", step + 1
                )
                log.add("policy/grad_norm", norm)
    log.add("time/update", time.time() - t_upd)
    log.add("policy/lr", c.policy_sched.get_last_lr()[0])
    if c.flow is not None:
        c.flow.step(flow_total, p.max_grad_norm, step + 1, log)


def micro_step(c, batch: Batch, rows, fixed: Fixed | None, flow_total, norms, hold_actor: bool, log: Accum):
    p, ro = c.cfg.policy, batch.rollout.select(rows)
    mask = ro.response_mask
    with torch.set_grad_enabled(not hold_actor):  # entropies are always logged, so always computed
        logp, ent = forward(c.policy, ro, need_entropy=True)
    ref_logp = ref_forward(c, ro)
    if fixed is None:  # single pass: rewards and old log-probs come from this very forward
        old_logp = logp.detach()
        adv = advantages(c, batch, rows, ro, ent, old_logp, ref_logp, log)
        flow_backward(c, batch, rows, ro, ent, flow_total, log)
        log_engine_mismatch(ro, old_logp, log)
    else:
        adv, old_logp = fixed.adv[rows], fixed.old_logp[rows]
    if hold_actor:
        return
    is_w = None
    if c.cfg.rollout.vllm_is_correction:
        is_w = truncated_is_weights(old_logp, ro.engine_logp, mask, c.cfg.rollout.vllm_is_cap)
        log.add("rollout/is_weight_mean", (is_w * mask).sum() / mask.sum().clamp(min=1), weight=mask.sum())
    in_loss = p.kl_mode == "loss"
    out = policy_loss(
        logp, old_logp, adv, mask, p.clip_low, p.clip_high, p.aggregation,
        ref_logp=ref_logp if in_loss else None, kl_coef=p.kl_coef if in_loss else 0.0,
        kl_estimator=p.kl_estimator, num_sequences=norms[0], num_tokens=norms[1], ratio_max=p.ratio_max,
        is_weights=is_w,
    )  # fmt: skip
    log.flag_nonfinite("the policy loss", ~torch.isfinite(out.loss))
    c.acc.backward(out.loss)
    n_tok = mask.sum().clamp(min=1)  # statistics stay on the device until the end of the step
    log.add("policy/loss", out.loss.detach(), weight=len(rows))
    log.add("policy/clip_frac", out.clip_frac, weight=len(rows))
    log.add("policy/entropy", (ent * mask).sum() / n_tok, weight=len(rows))
    if ref_logp is not None:
        kl = kl_penalty(logp.detach(), ref_logp, p.kl_estimator)
        log.add("policy/kl", (kl * mask).sum() / n_tok, weight=len(rows))


def score_pass(c: Components, batch: Batch, flow_total, log: Accum) -> Fixed:
    """Multi-epoch PPO: a no-grad pass for old log-probs and fixed advantages, which also trains the flow."""
    bsz, mbs = batch.rollout.input_ids.shape[0], c.cfg.policy.micro_batch_size
    old, advs = [], []
    for c0 in range(0, bsz, mbs):
        rows = torch.arange(c0, min(c0 + mbs, bsz))
        ro = batch.rollout.select(rows)
        with torch.no_grad():
            logp, ent = forward(c.policy, ro, need_entropy=True)
        ref_logp = ref_forward(c, ro)
        advs.append(advantages(c, batch, rows, ro, ent, logp, ref_logp, log))
        flow_backward(c, batch, rows, ro, ent, flow_total, log)
        log_engine_mismatch(ro, logp, log)
        old.append(logp)
    return Fixed(old_logp=torch.cat(old), adv=torch.cat(advs))


def log_engine_mismatch(ro: Rollout, logp: torch.Tensor, log: Accum) -> None:
    """|logp_engine - logp_hf| over the response tokens of rollouts from another engine (vLLM)."""
    if ro.engine_logp is None:
        return
    mask = ro.response_mask
    diff = torch.where(mask, (ro.engine_logp - logp.detach()).abs(), 0.0)
    n_tok = mask.sum()
    log.add("rollout/logp_diff_mean", diff.sum() / n_tok.clamp(min=1), weight=n_tok)
    log.maximum("rollout/logp_diff_max", diff.max())


def advantages(c, batch: Batch, rows, ro: Rollout, ent, logp, ref_logp, log: Accum) -> torch.Tensor:
    """Token advantages of ``rows`` (b, T): A_k = A_o + sum_{s >= k} r_s, r = the shaped flow rewards (rlfr)
    plus, with ``kl_mode=reward``, -kl_coef * k1 per token (the authors' RLVR baseline puts its KL there)."""
    cfg, mask = c.cfg, ro.response_mask
    token_rewards = flow_rewards(c, batch, rows, ro, log) if c.flow is not None else None
    if cfg.policy.kl_mode == "reward" and ref_logp is not None:
        kl_r = kl_rewards(logp, ref_logp, mask, cfg.policy.kl_coef)
        token_rewards = kl_r if token_rewards is None else token_rewards + kl_r
    live = mask.any(1)
    n_live = live.sum()
    # the baseline the flow's separation is read against: the mean token log-prob of each rollout
    mean_logp = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
    log.add_samples("logp/auroc", mean_logp, batch.correct[rows], keep=live, groups=ro.group)
    log.add(
        "adv/outcome_abs", (batch.outcome_adv[rows].abs() * live).sum() / n_live.clamp(min=1), weight=n_live
    )
    adv = token_advantages(batch.outcome_adv[rows], token_rewards, mask)
    if cfg.method == "entropy":
        adv = entropy_advantage(adv, ent, mask, cfg.policy.entropy_alpha, cfg.policy.entropy_kappa)
    return adv


def flow_rewards(c: Components, batch: Batch, rows, ro: Rollout, log: Accum) -> torch.Tensor:
    """The flow rewards of the latest forward's latents: -> (b, T); the magnitude of their reward-to-go (the
    flow's part of the token advantages) is logged as ``adv/flow_abs``."""
    mask = ro.response_mask
    rewards = c.flow.score(mask, ro.attention_mask.bool(), batch.correct[rows], log, group=ro.group)
    n_tok = mask.sum().clamp(min=1)
    log.add("adv/flow_abs", reward_to_go(rewards, mask).abs().sum() / n_tok, weight=n_tok)
    log.put_rows("flow_reward", torch.as_tensor(rows), rewards.sum(1))  # read only for the sample tables
    return rewards


def flow_backward(c: Components, batch: Batch, rows, ro: Rollout, ent, flow_total, log: Accum) -> None:
    """Online flow update (rejection sampling, RLFR §6) on this micro-batch's detached latents."""
    if c.flow is not None:
        mask = ro.response_mask
        c.flow.backward(mask, ro.attention_mask.bool(), batch.correct[rows], flow_total, log, entropy=ent)


def flow_weight_total(c: Components, batch: Batch) -> torch.Tensor:
    """The whole batch's flow-loss weight (``FlowLearner.total_weight``), known before any forward, so the
    micro-batch losses sum to the full-batch mean."""
    if c.flow is None:
        return torch.zeros(())
    ro = batch.rollout
    return c.flow.total_weight(batch.correct, ro.response_mask, ro.attention_mask.bool())


def accuracy_filter(correct: torch.Tensor, n: int, cfg: TrainConfig, step: int) -> torch.Tensor | None:
    """(B,) bool rows of groups whose accuracy is inside the bounds, or None when the filter is off.

    The authors' ``enable_accuracy_filter`` (active after ``freezing_filter_steps`` steps): a group of
    all-equal rewards carries no outcome signal. Filtered rows stay in the batch with an empty response mask
    (they are neither trained on nor train the flow), so every process runs the same micro-batches."""
    p = cfg.policy
    if not p.accuracy_filter or step + 1 <= p.freezing_filter_steps:
        return None
    acc = correct.float().view(-1, n).mean(1)
    keep = (acc >= p.accuracy_lower_bound - 1e-9) & (acc <= p.accuracy_upper_bound + 1e-9)
    return keep.repeat_interleave(n)


def forward(model, ro: Rollout, need_entropy: bool):
    """Policy forward: -> (logp (b, T), entropy (b, T) detached or None); latents land in the tap."""
    return policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, need_entropy, ro.vision)


def ref_forward(c: Components, ro: Rollout) -> torch.Tensor | None:
    """Log-probs under the start model (no grad; never the policy's latents), or None without one."""
    if c.ref is None:
        return None
    with paused(c), torch.no_grad():
        return forward(c.ref, ro, need_entropy=False)[0]


def fit_norm(c: Components, ro: Rollout) -> None:
    """Latent statistics of a flow trained from scratch during RL: the first micro-batch of the first
    rollouts (before any filtering), averaged over processes so that every rank uses the same."""
    first = ro.select(torch.arange(min(len(ro.completions), c.cfg.policy.micro_batch_size)))
    with torch.no_grad():
        forward(c.policy, first, need_entropy=False)
    if not c.flow.fit_norm(first.response_mask):
        raise RuntimeError("the first rollouts hold no response token to fit the latent statistics on")


@contextlib.contextmanager
def paused(c: Components):
    """No latent capture inside (generation, the reference's forward, evaluation); under FSDP the root's own
    weights are gathered too, since generation and evaluation call the model below the root."""
    with contextlib.ExitStack() as stack:
        if c.flow is not None:
            stack.enter_context(c.flow.tap.paused())
        stack.enter_context(root_gathered(c.acc, c.policy))
        yield
