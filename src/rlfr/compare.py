"""``rlfr compare``: base vs RLVR vs RLFR vs entropy shaping, same start, same budget, several seeds.

    rlfr compare --start runs/demo/sft/model --flow runs/demo/flow/flow --seeds 0 1 2 --steps 40 \\
        rollout.prompts_per_step=16 rollout.num_generations=8

Every RL run gets the same ``TrainConfig`` (defaults, then ``--config``, then the ``key=value``
overrides) with only ``method``, ``seed`` and ``out_dir`` changed (RLFR also gets ``flow.init=--flow``
when given). "base" is the greedy held-out accuracy of the start model without RL. Every run uses the
same problems (the embedded split depends on ``data.task_seed``, not on the run seed), so base is
evaluated once (greedy decoding is deterministic). Outputs in ``--out``:

- ``results.json``: per method and seed the final held-out accuracy and the training-reward curve;
- ``report.md``: held-out accuracy mean ± std (sample std over seeds) per method, per-seed values, the
  budget and the command line;
- ``learning_curves.png`` (mean training reward per step over seeds) and ``accuracy.png`` (bars with
  error bars = std over seeds).

A finished run (``<out>/<method>/seed_<s>/compare_result.json`` with the same config) is reused, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from rlfr.report import format_mean_std, mean_std

METHODS = ("rlvr", "rlfr", "entropy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", required=True, help="start model of every run (e.g. the demo's SFT model)")
    p.add_argument("--flow", default=None, help="pretrained flow directory for RLFR (flow.init)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="RL methods to run")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (one run per method and seed)"
    )
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the config's)")
    p.add_argument("--config", default=None, help="YAML TrainConfig applied to every run")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig overrides for every run")


def command_line(args: argparse.Namespace) -> str:
    parts = ["rlfr", "compare", "--start", args.start]
    if args.flow:
        parts += ["--flow", args.flow]
    parts += ["--methods", *args.methods, "--seeds", *map(str, args.seeds)]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    if args.config:
        parts += ["--config", args.config]
    parts += ["--out", args.out, *args.overrides]
    return shlex.join(parts)


def run_config(args: argparse.Namespace, method: str, seed: int):
    from rlfr.config import load_config
    from rlfr.schema import TrainConfig

    extra = [
        f"model.name_or_path={args.start}",
        *args.overrides,
        f"method={method}",
        f"seed={seed}",
        f"out_dir={Path(args.out) / method / f'seed_{seed}'}",
    ]
    if args.steps is not None:
        extra.append(f"steps={args.steps}")
    if method == "rlfr" and args.flow:
        extra.append(f"flow.init={args.flow}")
    return load_config(TrainConfig, path=args.config, overrides=extra)


def _cached(path: Path, config: dict) -> dict | None:
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("config") == config:
            return saved
    return None


def base_accuracy(cfg, out: Path) -> float:
    """Greedy held-out accuracy of the start model (cfg.model) on cfg's held-out split, cached in ``out``."""
    import torch

    from rlfr.config import to_dict
    from rlfr.evaluation import evaluate
    from rlfr.models import load_model, load_tokenizer
    from rlfr.pipeline import resolve_data
    from rlfr.verifier import Verifier

    key = {
        "model": to_dict(cfg.model),
        "data": to_dict(cfg.data),
        "seed": cfg.seed,
        "eval_max_new_tokens": cfg.eval_max_new_tokens,
    }
    if (hit := _cached(out, key)) is not None:
        return float(hit["accuracy"])
    _, evals = resolve_data(cfg.data)
    if not evals:
        raise ValueError("rlfr compare needs a held-out set (data.eval is '')")
    device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    model = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code).to(device).eval()
    with Verifier(num_workers=cfg.reward.workers, timeout=cfg.reward.timeout) as verifier:
        res = evaluate(model, tok, evals, cfg.data.template, cfg.eval_max_new_tokens, verifier)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": key, "accuracy": res.accuracy, "n": res.n}, indent=2))
    return res.accuracy


def run_one(cfg, progress: bool) -> dict:
    from rlfr.config import to_dict
    from rlfr.engine import run_train

    path = Path(cfg.out_dir) / "compare_result.json"
    config = to_dict(cfg)
    if (hit := _cached(path, config)) is not None:
        return hit
    res = run_train(cfg, progress=progress)
    if res["final_accuracy"] is None:
        raise ValueError(f"run {cfg.out_dir} has no held-out accuracy (data.eval is '')")
    rewards = [r["reward"] for r in res["history"] if "reward" in r]
    result = {"config": config, "final_accuracy": res["final_accuracy"], "reward": rewards}
    path.write_text(json.dumps(result, indent=2))
    return result


def curve_mean(curves: list[list[float]]) -> list[float]:
    """Mean over seeds per step (over the runs that reached that step)."""
    steps = max((len(c) for c in curves), default=0)
    return [
        sum(c[i] for c in curves if i < len(c)) / sum(1 for c in curves if i < len(c)) for i in range(steps)
    ]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {(m, s): run_config(args, m, s) for m in args.methods for s in args.seeds}  # fail fast on typos
    ref = configs[(args.methods[0], args.seeds[0])]
    methods: dict[str, dict] = {"base": {"seeds": {}, "reward": None}}
    base = base_accuracy(ref, out / "base" / "accuracy.json")
    for s in args.seeds:
        methods["base"]["seeds"][str(s)] = base
    for m in args.methods:
        runs = {s: run_one(configs[(m, s)], progress=not args.no_progress) for s in args.seeds}
        methods[m] = {
            "seeds": {str(s): r["final_accuracy"] for s, r in runs.items()},
            "reward": curve_mean([r["reward"] for r in runs.values()]),
            "reward_per_seed": {str(s): r["reward"] for s, r in runs.items()},
        }
    for entry in methods.values():
        entry["mean"], entry["std"] = mean_std(list(entry["seeds"].values()))
    budget = {
        "steps": ref.steps,
        "prompts_per_step": ref.rollout.prompts_per_step,
        "num_generations": ref.rollout.num_generations,
        "max_new_tokens": ref.rollout.max_new_tokens,
        "policy_lr": ref.policy.lr,
        "train_size": ref.data.train_size,
        "eval_size": ref.data.eval_size,
        "eval_max_new_tokens": ref.eval_max_new_tokens,
        "template": ref.data.template,
    }
    results = {
        "command": command_line(args),
        "start": args.start,
        "flow": args.flow,
        "seeds": args.seeds,
        "budget": budget,
        "methods": methods,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(methods, out / "learning_curves.png")
    plot_accuracy(methods, out / "accuracy.png")
    (out / "report.md").write_text(render_report(results))
    print((out / "report.md").read_text())
    return 0


def render_report(results: dict) -> str:
    seeds = [str(s) for s in results["seeds"]]
    lines = [
        "# RLVR vs RLFR vs entropy shaping",
        "",
        f"Start model: `{results['start']}`"
        + (f"; RLFR flow: `{results['flow']}`" if results["flow"] else ""),
        "",
        "Held-out greedy accuracy (%), mean ± std over seeds (sample std):",
        "",
        "| method | accuracy | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for name, e in results["methods"].items():
        vals = [e["seeds"][s] for s in seeds]
        lines.append(
            f"| {name} | {format_mean_std(vals)} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |"
        )
    lines += ["", "Budget (identical for every RL run):", ""]
    lines += [f"- {k}: {v}" for k, v in results["budget"].items()]
    lines += [
        "",
        "![training reward](learning_curves.png)",
        "",
        "![held-out accuracy](accuracy.png)",
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot_curves(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, e in methods.items():
        if e["reward"]:
            ax.plot(
                range(1, len(e["reward"]) + 1),
                e["reward"],
                marker="o" if len(e["reward"]) < 30 else None,
                label=name,
            )
    ax.set_xlabel("RL step")
    ax.set_ylabel("training reward (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 1.5, 3.6))
    ax.bar(
        names,
        [100 * methods[n]["mean"] for n in names],
        yerr=[100 * methods[n]["std"] for n in names],
        capsize=6,
        color=["#999999", "#4C72B0", "#55A868", "#C44E52"][: len(names)],
    )
    for i, n in enumerate(names):
        ax.scatter(
            [i] * len(methods[n]["seeds"]),
            [100 * v for v in methods[n]["seeds"].values()],
            color="black",
            s=10,
            zorder=3,
        )
    ax.set_ylabel("held-out accuracy (%)")
    top = max(100 * (methods[n]["mean"] + methods[n]["std"]) for n in names)
    ax.set_ylim(0, max(5.0, 1.15 * top))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
