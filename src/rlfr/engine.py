"""Wiring for ``rlfr train``: build the components, run the loop, checkpoint, resume, log.

``run_train(cfg, resume=False)`` is the whole stage: it validates inputs before any long work (model,
data, flow file, checkpoint identity), then loops ``RLTrainer.step`` with a progress bar, one log line
per step, ``metrics.jsonl`` + TensorBoard, periodic held-out evaluation and atomic checkpoints.
Prompts are drawn from a seeded per-epoch permutation, so the data position is just the step number;
with several processes (``accelerate launch``) each rank takes every ``world``-th prompt of the step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr import checkpoint as ckpt_io
from rlfr.config import to_dict
from rlfr.evaluation import evaluate
from rlfr.flow.store import FlowBundle, load_flow, meta_for, save_flow
from rlfr.latents import LatentTap
from rlfr.metrics import MetricsLogger, format_step, plot_metrics
from rlfr.models import enable_gradient_checkpointing, load_model, load_tokenizer
from rlfr.optim import build_optimizer
from rlfr.pipeline import build_flow, make_accelerator, render_prompts, resolve_data, seed_everything
from rlfr.rewards import build_reward
from rlfr.schema import TrainConfig
from rlfr.trainer import RLTrainer
from rlfr.verifier import Verifier

log = logging.getLogger(__name__)


class _RewardWithCorrectness:
    """(completions, answers) -> (rewards, correct): correctness is the verifier's 0/1 check."""

    def __init__(self, cfg: TrainConfig, verifier: Verifier):
        self.verifier = verifier
        self.plain = tuple(cfg.reward.functions) == ("math",) and tuple(cfg.reward.weights) == (1.0,)
        self.combined = (
            None
            if self.plain
            else build_reward(list(zip(cfg.reward.functions, cfg.reward.weights)), verifier)
        )

    def __call__(self, completions, answers):
        correct = [s >= 1.0 for s in self.verifier.verify_batch(completions, answers)]
        rewards = [float(c) for c in correct] if self.plain else self.combined(completions, answers)
        return rewards, correct


class StepData:
    """Deterministic prompt stream: step -> this rank's examples (seeded permutation per epoch)."""

    def __init__(self, n: int, per_step: int, seed: int, rank: int, world: int):
        if per_step % world:
            raise ValueError(
                f"rollout.prompts_per_step={per_step} must be divisible by the {world} processes"
            )
        self.n, self.per_step, self.seed, self.rank, self.world = n, per_step, seed, rank, world

    def indices(self, step: int) -> list[int]:
        out = []
        for i in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, pos = divmod(i, self.n)
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            out.append(int(torch.randperm(self.n, generator=g)[pos]))
        return out[self.rank :: self.world]


def build_rl(cfg: TrainConfig, accelerator) -> tuple[RLTrainer, dict]:
    seed_everything(cfg.seed)  # same on every rank: identical initial flow weights
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    policy = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    policy.train()
    ref = None
    if cfg.policy.kl_coef > 0 or cfg.policy.track_kl:
        ref = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code).eval()
        ref.requires_grad_(False)
        ref.to(accelerator.device)
    tap = flow = flow_opt = flow_sched = norm = None
    if cfg.method == "rlfr":
        tap = LatentTap(policy, cfg.flow.fractions)
        bundle = build_flow(cfg.flow, policy)
        flow, norm = bundle.field, bundle.norm
        if not cfg.flow.update:
            flow.requires_grad_(False)
    train, evals = resolve_data(cfg.data)
    prompts = render_prompts(train, cfg.data.template, tok, cfg.data.max_prompt_tokens)
    p = cfg.policy
    opt, sched = build_optimizer(
        policy.parameters(), p.lr, p.betas, p.weight_decay, cfg.steps * p.ppo_epochs * p.minibatches,
        p.warmup_ratio, p.schedule, p.min_lr_ratio,
    )  # fmt: skip
    policy, opt = accelerator.prepare(policy, opt)
    if flow is not None:
        f = cfg.flow
        flow_opt, flow_sched = build_optimizer(
            flow.parameters(),
            f.lr,
            f.betas,
            f.weight_decay,
            cfg.steps,
            f.warmup_ratio,
            "cosine",
            f.min_lr_ratio,
        )
        flow, flow_opt = accelerator.prepare(flow, flow_opt)
    seed_everything(cfg.seed + 7919 * accelerator.process_index)  # rollouts differ across ranks
    verifier = Verifier(num_workers=cfg.reward.workers, timeout=cfg.reward.timeout)
    trainer = RLTrainer(
        cfg,
        accelerator,
        policy,
        ref,
        tok,
        tap,
        flow,
        opt,
        sched,
        flow_opt,
        flow_sched,
        _RewardWithCorrectness(cfg, verifier),
        verifier,
    )
    trainer.norm = norm
    return trainer, {"train": train, "eval": evals, "prompts": prompts}


def optim_state(tr: RLTrainer) -> dict:
    state = {"policy": tr.policy_opt.state_dict(), "policy_sched": tr.policy_sched.state_dict()}
    if tr.flow_opt is not None:
        state |= {"flow": tr.flow_opt.state_dict(), "flow_sched": tr.flow_sched.state_dict()}
    return state


def restore(tr: RLTrainer, path: Path) -> int:
    """Load a checkpoint into the built trainer; returns the step to continue from."""
    from safetensors.torch import load_file

    unwrapped = tr.acc.unwrap_model(tr.policy)
    ckpt_io.check_identity(path, unwrapped)
    state = ckpt_io.load_state(path)
    weights = {}
    for f in sorted((path / "policy").glob("*.safetensors")):
        weights |= load_file(str(f))
    missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
    tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise ckpt_io.CheckpointError(
            f"{path}/policy does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    opt = ckpt_io.load_optim_state(path)
    tr.policy_opt.load_state_dict(opt["policy"])
    tr.policy_sched.load_state_dict(opt["policy_sched"])
    if tr.flow is not None:
        f = tr.cfg.flow
        # the same checks as a fresh run's flow.init: a checkpoint's flow must model this run's latents
        bundle = load_flow(path / "flow", meta_for(unwrapped, f.fractions, f.modes, f.shift, f.latent_norm))
        tr.acc.unwrap_model(tr.flow).load_state_dict(bundle.field.state_dict())
        tr.norm = bundle.norm
        tr.flow_opt.load_state_dict(opt["flow"])
        tr.flow_sched.load_state_dict(opt["flow_sched"])
    ckpt_io.load_rng(path, tr.acc.process_index)
    tr.step_count = int(state["step"])
    return tr.step_count


def run_train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    stage: str = "train",
    stop_after: int | None = None,
    final_eval: bool = True,
) -> dict:
    """The RL stage. ``stop_after`` ends this process after that many steps (after checkpointing), as a
    preempted job would; ``resume`` continues from the latest checkpoint of ``cfg.out_dir``;
    ``final_eval=False`` skips the closing held-out evaluation (for callers that evaluate themselves)."""
    acc = make_accelerator(cfg.cpu)
    out = Path(cfg.out_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    tr, data = build_rl(cfg, acc)
    start = 0
    if resume:
        path = ckpt_io.latest_checkpoint(out)
        if path is None:
            raise ckpt_io.CheckpointError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        start = restore(tr, path)
        if acc.is_main_process:
            print(f"resumed from {path} at step {start}")
    metrics = MetricsLogger(out, enabled=acc.is_main_process)
    stream = StepData(
        len(data["train"]), cfg.rollout.prompts_per_step, cfg.seed, acc.process_index, acc.num_processes
    )
    history = []
    bar = tqdm(
        range(start, cfg.steps),
        desc=f"rl[{cfg.method}]",
        disable=not (progress and acc.is_main_process),
        initial=start,
        total=cfg.steps,
    )
    try:
        for step in bar:
            idx = stream.indices(step)
            stats = {
                k: float(v)
                for k, v in tr.step(
                    [data["train"][i] for i in idx], [data["prompts"][i] for i in idx]
                ).items()
            }
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and data["eval"]:
                stats["eval/accuracy"] = run_eval(tr, cfg, data["eval"]).accuracy
            metrics.log(step + 1, stats, stage=stage)
            history.append({"step": step + 1, **stats})
            if acc.is_main_process:
                bar.write(format_step(step + 1, stats))
            stopping = stop_after is not None and step + 1 - start >= stop_after
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps or stopping:
                save(tr, cfg, step + 1)
            if stopping and step + 1 < cfg.steps:
                return {
                    "final_accuracy": None,
                    "history": history,
                    "out_dir": str(out),
                    "stopped_at": step + 1,
                }
        final = run_eval(tr, cfg, data["eval"]).accuracy if data["eval"] and final_eval else None
        if final is not None:
            metrics.log(cfg.steps, {"eval/accuracy": final}, stage=stage)
    finally:
        metrics.close()
        tr.verifier.close()
        if tr.tap is not None:
            tr.tap.remove()
    if acc.is_main_process:
        from rlfr.metrics import read_metrics

        rows = [r for r in read_metrics(metrics.path) if r.get("stage") == stage]
        plot_metrics(
            rows,
            out / "curves.png",
            ["reward", "accuracy", "eval/accuracy", "flow/loss_correct", "flow/loss_wrong", "response_len"],
            title=f"rlfr train ({cfg.method})",
        )
    return {
        "final_accuracy": final,
        "history": history,
        "out_dir": str(out),
        "model_dir": str(out / "checkpoints" / f"step_{cfg.steps:06d}" / "policy"),
    }


def save(tr: RLTrainer, cfg: TrainConfig, step: int) -> Path:
    policy = tr.acc.unwrap_model(tr.policy)
    writer = None
    if tr.flow is not None:
        f = cfg.flow
        bundle = FlowBundle(
            tr.acc.unwrap_model(tr.flow),
            meta_for(policy, f.fractions, f.modes, f.shift, f.latent_norm),
            tr.norm,
        )
        writer = lambda d: save_flow(d / "flow", bundle)  # noqa: E731
    return ckpt_io.save_checkpoint(
        cfg.out_dir,
        step,
        tr.acc,
        policy,
        tr.tok,
        write_extra=writer,
        optim_state=optim_state(tr),
        extra={"config": to_dict(cfg)},
        keep=cfg.keep_checkpoints,
    )


def run_eval(tr: RLTrainer, cfg: TrainConfig, examples):
    with tr.tap.paused() if tr.tap else _Null():
        return evaluate(
            tr.acc.unwrap_model(tr.policy),
            tr.tok,
            examples,
            cfg.data.template,
            cfg.eval_max_new_tokens,
            tr.verifier,
            accelerator=tr.acc,
        )


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
