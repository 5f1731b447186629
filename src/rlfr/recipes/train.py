"""``rlfr train``: RL with flow rewards (``method=rlfr``), plain RLVR, or entropy-shaped advantages.

``run_train(cfg, resume=False) -> TrainResult`` is the whole stage, top to bottom: build the components
(model, data, flow, checkpoint identity are checked before any long work), resume if asked, then for each
step draw the prompts (a seeded per-epoch permutation, so the data position is just the step number; with
several processes each takes every ``world``-th prompt), run ``rlfr.rl.step.rl_step``, log (console,
``metrics.jsonl``, TensorBoard), evaluate every ``eval_every`` steps, and checkpoint atomically.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr.config import to_dict
from rlfr.data.sources import data_fingerprints, render_prompts, resolve_data
from rlfr.errors import ConfigError, Interrupted, NonFiniteError
from rlfr.eval.plots import plot_metrics
from rlfr.eval.scoring import evaluate
from rlfr.flow.learner import FlowLearner
from rlfr.flow.store import build_flow, pairing_note
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import (
    base_model_path,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from rlfr.policy.lora import AdapterDisabled, apply_lora, is_lora, parameter_counts
from rlfr.policy.sampler import Sampler, build_sampler
from rlfr.policy.vision import ImageTextProcessor, freeze_vision_tower, is_vision_language
from rlfr.policy.vllm_engine import VLLMSettings, check_model_len, require_vllm
from rlfr.reward.outcome import OutcomeReward
from rlfr.reward.verifier import Verifier
from rlfr.rl.step import Components, paused, rl_step
from rlfr.runtime import checkpoint as ckpt_io
from rlfr.runtime import sharding
from rlfr.runtime.env import flow_autocast, make_accelerator, seed_everything, set_tf32
from rlfr.runtime.metrics import MetricsLogger, flat_config, format_step, read_metrics
from rlfr.runtime.optim import build_optimizer, optimizer_step
from rlfr.runtime.rundir import RunLock, StopOnSignal, claim, holds_run
from rlfr.runtime.stream import EpochStream, shard
from rlfr.schema import FlowConfig, TrainConfig, require_flow_init, resume_changes


@dataclass
class TrainResult:
    out_dir: str
    model_dir: str | None  # the final checkpoint's policy/ (None when the run stopped before its last step)
    final_accuracy: float | None  # held-out greedy accuracy at the end (None: not evaluated)
    history: list[dict] = field(default_factory=list)  # one row of statistics per step run by this call
    stopped_at: int | None = None  # the step after which ``stop_after`` ended the run


@dataclass
class RunData:
    train: list
    eval: list
    prompts: list[str]
    fingerprints: dict[str, str]  # SHA-256 of the data files (``data_fingerprints``), saved with checkpoints


def ignored_flow_keys(cfg: TrainConfig) -> list[str]:
    """The ``flow.*`` settings changed from their defaults under a method that reads none of them (any but
    rlfr): said at the start rather than dropped silently (``flow.init`` given to an RLVR run, say)."""
    if cfg.method == "rlfr":
        return []
    given, default = flat_config(to_dict(cfg.flow), "flow."), flat_config(to_dict(FlowConfig()), "flow.")
    return sorted(k for k, v in given.items() if v != default.get(k))


def build_components(cfg: TrainConfig, acc) -> tuple[Components, RunData]:
    seed_everything(cfg.seed)  # same on every rank: identical initial flow weights
    set_tf32(cfg.tf32, acc.device)
    if cfg.rollout.engine == "vllm":  # before minutes of loading: a missing vLLM or FSDP fails here
        require_vllm("rollout.engine=vllm")
        if sharding.is_fsdp(acc):
            raise ConfigError(
                "rollout.engine=vllm does not support FSDP yet (it syncs whole weights); use DDP"
            )
    train, evals = resolve_data(cfg.data)  # data errors surface before minutes of model loading
    if evals and cfg.reward.correct_if not in ("auto", "verifier") and acc.is_main_process:
        print(f"reward.correct_if={cfg.reward.correct_if} decides the training accuracy and the flow's updates; the "
              "held-out accuracy (eval/accuracy) is the math verifier's check of data.eval's answers")  # fmt: skip
    tok = load_tokenizer(
        cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.data.min_pixels, cfg.data.max_pixels
    )
    if cfg.rollout.engine == "vllm" and isinstance(tok, ImageTextProcessor):
        raise ConfigError(
            f"rollout.engine=vllm: {cfg.model.name_or_path} is a vision-language model and rlfr's vLLM engine "
            "is text-only for now; use rollout.engine=hf"
        )
    prompts = render_prompts(train, cfg.data.template, tok, cfg.data.max_prompt_tokens)
    policy = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code, acc.device)
    need_ref = cfg.policy.kl_coef > 0 or cfg.policy.track_kl
    ref = None
    if need_ref and cfg.model.lora.rank == 0:  # the start model: a copy, not a second load (nor its warnings)
        ref = copy.deepcopy(policy).eval()
        ref.requires_grad_(False)
        ref.to(acc.device)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if cfg.model.freeze_vision and is_vision_language(policy.config):
        freeze_vision_tower(policy)  # the authors' --freeze_prefix visual
    policy = apply_lora(policy, cfg.model.lora)  # unchanged at rank 0
    policy.train()
    bundle = tap = None
    if cfg.method == "rlfr":
        tap = LatentTap(policy, cfg.flow.fractions)
        bundle = build_flow(cfg.flow, policy)
        if acc.is_main_process and (note := pairing_note(bundle.meta, cfg.flow.modes, cfg.flow.shift)):
            print(note)
        if cfg.flow.init == "random" and acc.is_main_process:
            print(
                "flow.init=random: the flow starts from random weights and learns online (an ablation: its "
                "rewards are noise until it has learned; a pretrained flow comes from rlfr flow-pretrain)"
            )
        if not cfg.flow.update:
            bundle.field.requires_grad_(False)
    elif acc.is_main_process and (ignored := ignored_flow_keys(cfg)):
        print(f"method={cfg.method} trains and uses no flow field: ignoring {', '.join(ignored)}")
    p, trainable = cfg.policy, [q for q in policy.parameters() if q.requires_grad]  # LoRA: the adapters
    opt, sched = build_optimizer(
        trainable, p.lr, p.betas, p.weight_decay, cfg.steps * p.ppo_epochs * p.minibatches,
        p.warmup_ratio, p.schedule, p.min_lr_ratio, p.master_weights,
    )  # fmt: skip
    policy, opt = acc.prepare(policy, opt)
    sharding.finish_prepare(acc, policy, tap)  # FSDP: the first forward runs through the whole model
    if need_ref and is_lora(policy):  # the start model is the policy with its adapters off: no second copy
        ref = AdapterDisabled(policy, acc.unwrap_model(policy))
    if is_lora(policy) and acc.is_main_process:
        print("LoRA: {:,} of {:,} parameters train".format(*parameter_counts(acc.unwrap_model(policy))))
    flow = None
    if bundle is not None:
        f = cfg.flow
        flow_opt, flow_sched = build_optimizer(
            bundle.field.parameters(), f.lr, f.betas, f.weight_decay, cfg.steps, f.warmup_ratio, "cosine",
            f.min_lr_ratio,
        )  # fmt: skip
        field_, flow_opt = sharding.prepare_replicated(acc, bundle.field, flow_opt)  # never sharded
        bundle.field = acc.unwrap_model(field_)  # moved to the device by prepare
        flow = FlowLearner(
            f, bundle, tap, field=field_, reduce=acc.reduce, backward=acc.backward,
            optimizer_step=partial(optimizer_step, acc), autocast_dtype=flow_autocast(f.precision, acc.device),
        )  # fmt: skip
        flow.attach_optimizer(flow_opt, flow_sched)
    sampler = rollout_sampler(cfg, acc, tok, acc.unwrap_model(policy))
    seed_everything(cfg.seed + 7919 * acc.process_index)  # rollouts differ across ranks
    r = cfg.reward
    verifier = Verifier(num_workers=r.workers, timeout=r.timeout)
    c = Components(
        cfg=cfg, acc=acc, policy=policy, tokenizer=tok, policy_opt=opt, policy_sched=sched,
        reward=OutcomeReward(r.funcs, r.weights, verifier, r.outcome, r.correct_if), ref=ref, flow=flow,
        sampler=sampler,
    )  # fmt: skip
    return c, RunData(train, evals, prompts, data_fingerprints(cfg.data))


def rollout_sampler(cfg: TrainConfig, acc, tok, policy) -> Sampler:
    """This process's sampler (``rollout.engine``): hf samples the (unwrapped) policy itself; vllm is a
    colocated engine loaded from the start model (for a LoRA adapter directory, its base model; the first
    rollout pushes the policy's own weights: merged, or a resumed checkpoint's)."""
    r = cfg.rollout
    vllm = {}
    if r.engine == "vllm":
        max_len = check_model_len(
            cfg.data.max_prompt_tokens + r.max_new_tokens, policy.config,
            "data.max_prompt_tokens + rollout.max_new_tokens",
        )  # fmt: skip
        settings = VLLMSettings(
            dtype=resolve_dtype(cfg.model.dtype, acc.device), memory_fraction=r.vllm_memory_fraction, max_model_len=max_len,
            sleep=r.vllm_sleep, seed=cfg.seed + acc.process_index, distributed=acc.num_processes > 1,
        )  # fmt: skip
        vllm = dict(model_path=base_model_path(cfg.model.name_or_path), vllm=settings)
    return build_sampler(r.engine, tok, model=policy, device=acc.device, batch_size=r.batch_size, **vllm)


def save(c: Components, step: int, data: RunData) -> Path:
    for name, module in (("policy", c.policy), ("flow", c.flow.field if c.flow is not None else None)):
        if module is not None and not sharding.all_finite(c.acc, module):
            raise NonFiniteError(
                f"the {name} weights", step, "no checkpoint was written; the previous one is intact"
            )
    if c.acc.is_main_process:  # the run's config next to its first checkpoint (a failed start leaves nothing)
        (Path(c.cfg.out_dir) / "config.json").write_text(json.dumps(to_dict(c.cfg), indent=2))
    optim = {
        "policy": sharding.optimizer_state(c.acc, c.policy, c.policy_opt),
        "policy_sched": c.policy_sched.state_dict(),
    }
    if c.flow is not None:
        optim |= c.flow.optimizer_state()
    return ckpt_io.save_checkpoint(
        c.cfg.out_dir, step, c.acc, c.acc.unwrap_model(c.policy), c.tokenizer,
        flow=c.flow.bundle() if c.flow is not None else None, optim_state=optim,
        extra={"config": to_dict(c.cfg), "nonfinite_skipped": c.nonfinite_skipped, "data_sha256": data.fingerprints},
        keep=c.cfg.keep_checkpoints,
        policy_state=sharding.full_state_dict(c.acc, c.policy, trainable_only=is_lora(c.policy)),
    )  # fmt: skip


def restore(c: Components, path: Path) -> int:
    """Load a checkpoint into the built components; returns the step to continue from."""
    policy = c.acc.unwrap_model(c.policy)
    sharding.load_model_state(c.acc, c.policy, ckpt_io.read_policy_weights(path, policy))
    optim = ckpt_io.load_optim_state(path)
    sharding.load_optimizer_state(c.acc, c.policy, c.policy_opt, optim["policy"])
    c.policy_sched.load_state_dict(optim["policy_sched"])
    if c.flow is not None:  # checked as a fresh run's flow.init: it must model this run's latents
        c.flow.load(ckpt_io.flow_dir(path), optim)
    ckpt_io.load_rng(path, c.acc.process_index)
    state = ckpt_io.load_state(path)
    c.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
    return int(state["step"])


def held_out_accuracy(c: Components, examples) -> float:
    with paused(c):
        res = evaluate(
            c.acc.unwrap_model(c.policy), c.tokenizer, examples, c.cfg.data.template, c.cfg.eval_max_new_tokens,
            c.reward.verifier, accelerator=c.acc,
        )  # fmt: skip
    return res.accuracy


def run_train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    stage: str = "train",
    stop_after: int | None = None,
    final_eval: bool = True,
    overwrite: bool = False,
    force_resume: bool = False,
    allow_data_change: bool = False,
) -> TrainResult:
    """The RL stage. ``resume`` continues from the newest intact checkpoint of ``cfg.out_dir`` (changes to
    keys outside ``RESUMABLE_KEYS`` are refused unless ``force_resume``, a data file whose content changed
    unless ``allow_data_change``, fewer ``steps`` than the checkpoint's always; a run stopped before its first
    checkpoint starts again from step 0); ``overwrite`` replaces a run
    already in ``cfg.out_dir``; ``stop_after`` ends this process after that many steps (after
    checkpointing), as a preempted job would; ``final_eval=False`` skips the closing held-out evaluation.
    SIGTERM / Ctrl-C finish the step, write a checkpoint and raise ``Interrupted``."""
    require_flow_init(cfg)  # before anything runs: a flow is chosen, not silently random
    acc = make_accelerator(cfg.cpu)
    out = Path(cfg.out_dir)
    lock = RunLock(out).acquire() if acc.is_main_process else None
    try:
        if acc.is_main_process:
            claim(out, resume, overwrite)
            for unfinished in ckpt_io.remove_unfinished(out):
                print(f"removed {unfinished}, a checkpoint whose writing was interrupted")
        acc.wait_for_everyone()
        resuming = (force_resume, allow_data_change) if resume else None
        return _train(cfg, acc, out, resuming, progress, stage, stop_after, final_eval)
    finally:
        if lock is not None:
            lock.release()


def _resume(c: Components, out: Path, data: RunData, force: bool, allow_data_change: bool) -> int:
    path, notes = ckpt_io.find_checkpoint(out)
    for note in notes:
        print(f"resume: {note}")
    if path is None and not ckpt_io.step_dirs(ckpt_io.checkpoint_root(out)):
        why = "the run stopped before its first checkpoint" if holds_run(out) else "nothing ran there yet"
        print(f"resume: {out} holds no checkpoint ({why}): starting at step 0")
        return 0
    if path is None:
        raise ckpt_io.CheckpointError(
            f"--resume: no intact checkpoint under {out / 'checkpoints'}"
            + (f" ({'; '.join(notes)})" if notes else "")
            + "; --overwrite starts the run over"
        )
    state = ckpt_io.load_state(path)
    if c.cfg.steps < int(state["step"]):
        raise ConfigError(
            f"--resume with steps={c.cfg.steps}: the run in {out} is already at step {state['step']} (its model: "
            f"{ckpt_io.policy_dir(path)}); set steps >= {state['step']} to continue it"
        )
    allowed, refused = resume_changes(state.get("config", {}), to_dict(c.cfg))
    if refused and not force:
        raise ConfigError(
            f"--resume from {path}: these settings differ from the run's and would change what it is: "
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            + ". Restore them, start a new out_dir, or pass --force-resume"
        )
    for key, digest in state.get("data_sha256", {}).items():  # the same path, other content
        if key not in refused and data.fingerprints.get(key) != digest and not allow_data_change:
            raise ConfigError(
                f"--resume: {getattr(c.cfg.data, key.split('.')[1])} ({key}) changed since the run started (its "
                "SHA-256 differs from the checkpoint's); restore it, start a new out_dir, or pass --allow-data-change"
            )
    step = restore(c, path)
    parts = [(c.policy_opt, c.policy_sched, c.cfg.policy.lr)]
    if c.flow is not None:
        parts.append((c.flow.opt, c.flow.sched, c.cfg.flow.lr))
    for opt, sched, lr in parts:
        # the scheduler state holds the old base lr: apply the configured one, at the resumed position
        sched.base_lrs = [lr for _ in opt.param_groups]
        for group, factor in zip(opt.param_groups, [f(sched.last_epoch) for f in sched.lr_lambdas]):
            group["initial_lr"], group["lr"] = lr, lr * factor
    if c.acc.is_main_process:
        print(f"resumed from {path} at step {step}")
        for k, (a, b) in {**allowed, **refused}.items():
            print(f"resume: {k} changed {a!r} -> {b!r}" + (" (forced)" if k in refused else ""))
    return step


def _train(cfg, acc, out, resuming, progress, stage, stop_after, final_eval) -> TrainResult:
    """``resuming``: None for a fresh run, else (force_resume, allow_data_change)."""
    c, data = build_components(cfg, acc)
    start = _resume(c, out, data, *resuming) if resuming else 0
    metrics = MetricsLogger(out, acc.is_main_process, cfg.report_to, resume_step=start if resuming else None,
                            config=to_dict(cfg))  # fmt: skip
    stream = EpochStream(len(data.train), cfg.seed, reseed_each_epoch=True)
    per_step = cfg.rollout.prompts_per_step
    result = TrainResult(out_dir=str(out), model_dir=None, final_accuracy=None)
    bar = tqdm(range(start, cfg.steps), desc=f"rl[{cfg.method}]", disable=not (progress and acc.is_main_process),
               initial=start, total=cfg.steps)  # fmt: skip
    try:
        with StopOnSignal() as stop:
            for step in bar:
                idx = shard(stream.take(step * per_step, per_step), acc.process_index, acc.num_processes,
                            "rollout.prompts_per_step")  # fmt: skip
                samples = [] if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0 else None
                examples, prompts = [data.train[i] for i in idx], [data.prompts[i] for i in idx]
                stats = rl_step(c, step, examples, prompts, samples)
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and data.eval:
                    stats["eval/accuracy"] = held_out_accuracy(c, data.eval)
                metrics.log(step + 1, stats, stage=stage)
                if samples is not None:  # this process's rollouts (the main process logs)
                    metrics.log_samples(step + 1, samples, stage=stage)
                result.history.append({"step": step + 1, **stats})
                if acc.is_main_process:
                    bar.write(format_step(step + 1, stats))
                signalled = bool(
                    acc.reduce(torch.tensor(float(stop.requested is not None), device=acc.device), "max")
                )
                stopping = signalled or (stop_after is not None and step + 1 - start >= stop_after)
                if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps or stopping:
                    path = save(c, step + 1, data)
                if signalled and step + 1 < cfg.steps:
                    raise Interrupted(
                        f"stopped by {stop.requested or 'a signal on another process'} after step {step + 1}; "
                        f"checkpoint {path} written. Continue with: rlfr train --resume (same config)"
                    )
                if stopping and step + 1 < cfg.steps:
                    result.stopped_at = step + 1
                    return result
        if data.eval and final_eval:
            result.final_accuracy = held_out_accuracy(c, data.eval)
            metrics.log(cfg.steps, {"eval/accuracy": result.final_accuracy}, stage=stage)
    finally:
        metrics.close()
        c.reward.verifier.close()
        if c.flow is not None:
            c.flow.tap.remove()
    if acc.is_main_process:
        rows = [r for r in read_metrics(metrics.path) if r.get("stage") == stage]
        keys = ["reward", "accuracy", "eval/accuracy", "flow/loss_correct", "flow/loss_wrong", "response_len"]
        plot_metrics(rows, out / "curves.png", keys, title=f"rlfr train ({cfg.method})")
    # every process leaves together: a launcher's agent waits only so long (torch elastic: 300 s) for the
    # other machines' processes once its own have exited, and rank 0's plotting can outlast that on a slow host
    acc.wait_for_everyone()
    result.model_dir = str(out / "checkpoints" / f"step_{cfg.steps:06d}" / "policy")
    return result


def run(
    cfg: TrainConfig,
    resume: bool = False,
    force_resume: bool = False,
    allow_data_change: bool = False,
    overwrite: bool = False,
) -> int:
    """``rlfr train`` (its flags: ``--resume``, ``--force-resume``, ``--allow-data-change``, ``--overwrite``)."""
    res = run_train(cfg, resume=resume or force_resume, overwrite=overwrite, force_resume=force_resume,
                    allow_data_change=allow_data_change)  # fmt: skip
    print(json.dumps({k: v for k, v in vars(res).items() if k != "history"}, indent=2))
    return 0
