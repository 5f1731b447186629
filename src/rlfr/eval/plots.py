"""Every plot rlfr draws (matplotlib, non-interactive backend): training curves, the demo's and the
comparison's figures. Pure functions of already computed numbers; each writes one PNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from rlfr.stats import format_diff


def _plt():
    import matplotlib  # lazy: only a plot needs matplotlib, whose import takes seconds

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, after the backend is chosen

    return plt


def plot_metrics(
    rows: Iterable[dict], out_png: str | Path, keys: Sequence[str], title: str = "", smooth: int = 1
) -> Path | None:
    """One panel per key (steps on x); returns the PNG path, or None when no key has data."""
    plt = _plt()
    rows = list(rows)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, lw=1.2)
        if smooth > 1 and len(ys) >= smooth:
            sm = [
                sum(ys[max(0, i - smooth + 1) : i + 1]) / len(ys[max(0, i - smooth + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, sm, lw=2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(arms_out: dict, curve_keys: Sequence[str], path: Path) -> None:
    """``rlfr compare``: one panel per training statistic, one line per arm (mean over seeds)."""
    plt = _plt()
    fig = curves_figure(plt, arms_out, curve_keys)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def moving_average(points: Sequence[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """(step, value) pairs -> the same steps with the mean of the ``window`` values around each, in the order
    given (centred for an odd window; steps without a value are not in ``points``, so a window spans them);
    fewer at the ends: the window is cut, not padded."""
    if window <= 1:
        return list(points)
    half = window // 2
    vals = [v for _, v in points]
    out = []
    for i, (step, _) in enumerate(points):
        part = vals[max(0, i - half) : i - half + window]
        out.append((step, sum(part) / len(part)))
    return out


def curves_figure(plt, arms_out: dict, curve_keys: Sequence[str]):
    """The figure of ``plot_curves``. Each arm keeps one colour in every panel (a panel of flow statistics
    has no RLVR line, and must not give RLFR RLVR's colour), and every panel has its legend. Per-step values
    are thin and pale; with 16 steps or more a centred moving average over (steps // 8) | 1 steps is drawn over them
    (per-step statistics of a few dozen rollouts are noisy). The AUROC panels mark chance (0.5)."""
    with_curves = [n for n, a in arms_out.items() if any(v is not None for c in a.get("curves", {}).values()
                                                          for v in c)]  # fmt: skip
    colour = {name: f"C{i}" for i, name in enumerate(with_curves)}
    keys = [k for k in curve_keys if any(any(v is not None for v in a.get("curves", {}).get(k, []))
                                         for a in arms_out.values())]  # fmt: skip
    if not keys:
        keys = ["reward"]
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.0 * rows), squeeze=False)
    steps = max((len(c) for a in arms_out.values() for c in a.get("curves", {}).values()), default=0)
    window = (steps // 8) | 1 if steps >= 16 else 1  # odd, so that it centres on its step
    for ax, key in zip(axes.flat, keys):
        for name in with_curves:
            ys = arms_out[name]["curves"].get(key, [])
            pts = [(i + 1, y) for i, y in enumerate(ys) if y is not None]
            if not pts:
                continue
            if window > 1:
                ax.plot(*zip(*pts), label=f"_{name} per step", lw=0.8, alpha=0.3, color=colour[name])
                pts = moving_average(pts, window)
            ax.plot(*zip(*pts), label=name, lw=1.6 if window > 1 else 1.2, color=colour[name])
        if key.endswith(("/auroc", "/auroc_within")):
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if window > 1:
        fig.suptitle(
            f"mean over seeds; pale: per step, bold: centred {window}-step moving average", fontsize=10
        )
    fig.tight_layout()
    return fig


def plot_accuracy(methods: dict, path: Path) -> None:
    """``rlfr compare``: held-out accuracy per method, mean with the std over seeds, each seed a dot."""
    plt = _plt()
    names = list(methods)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 1.5, 3.6))
    ax.bar(
        names,
        [100 * methods[n]["mean"] for n in names],
        yerr=[100 * methods[n]["std"] for n in names],
        capsize=6,
        color=["#999999", "#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974"][: len(names)],
    )
    for i, n in enumerate(names):
        ax.scatter(
            [i] * len(methods[n]["seeds"]),
            [100 * v for v in methods[n]["seeds"].values()],
            color="black",
            s=10,
            zorder=3,
        )
    ax.set_ylabel("held-out greedy accuracy (%)")
    top = max(100 * (methods[n]["mean"] + methods[n]["std"]) for n in names)
    ax.set_ylim(0, max(5.0, 1.15 * top))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_demo_accuracy(summary: dict, path: Path) -> None:
    """``rlfr demo``: held-out greedy and sampled accuracy of the raw, SFT and RL models."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    names = ["raw", "after SFT", f"after {summary['method'].upper()}"]
    width = 0.38
    bars = (("accuracy", "greedy pass@1", "#6a9fd8"),
            ("sampled_accuracy", f"sampled avg@{summary['eval_samples']}", "#2a8a4a"))  # fmt: skip
    for j, (prefix, label, color) in enumerate(bars):
        vals = [summary[f"{prefix}_before"], summary[f"{prefix}_after_sft"], summary[f"{prefix}_after"]]
        pts = [(i + (j - 0.5) * width, v) for i, v in enumerate(vals) if v is not None]  # raw: greedy only
        if not pts:  # no sampled evaluation (eval_samples=0)
            continue
        ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=label, color=color)
        for x, v in pts:
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(3), names)
    ax.set_ylabel(f"held-out accuracy ({summary['eval_problems']} problems)")
    change = summary.get("rl_minus_sft")
    if change:
        parts = [f"{label} {format_diff(change[kind])}"
                 for kind, label in (("greedy", "greedy"), ("sampled", f"avg@{summary['eval_samples']}"))
                 if kind in change]  # fmt: skip
        ax.set_title(
            f"{summary['method'].upper()} - SFT, paired (points, 95 % CI): " + ", ".join(parts), fontsize=8
        )
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _forest(
    ax, rows: Sequence[tuple[str, dict]], title: str, colours: Sequence[str], seeds: bool = False
) -> None:
    """Differences with their 95 % intervals (``{"diff", "lo", "hi"}`` fractions, drawn in points), row i at
    y = i; with ``seeds``, a difference with two or more ``per_seed`` values also shows each seed's as a small
    cross just below its row. The caller labels and orders the y axis (shared axes must be inverted once)."""
    seeds_drawn = False
    for i, ((_, d), colour) in enumerate(zip(rows, colours)):
        ax.errorbar(100 * d["diff"], i, xerr=[[100 * (d["diff"] - d["lo"])], [100 * (d["hi"] - d["diff"])]],
                    fmt="o", color=colour, capsize=3)  # fmt: skip
        per = list(d.get("per_seed", {}).values()) if seeds else []
        if len(per) >= 2:
            ax.scatter([100 * v for v in per], [i + 0.25] * len(per), marker="x", s=18, color=colour, lw=1)
            seeds_drawn = True
    if seeds_drawn:
        title += "\n(x: single seeds)"
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("points (95 % interval)")
    ax.grid(alpha=0.3, axis="x")


def plot_demo_pool(pool: dict, path: Path) -> None:
    """``rlfr demo pool=[...]``: the RL - SFT change of every run and of the pooled runs (problem bootstrap), and
    over runs (Student-t, each run one value; with two runs or more), with 95 % intervals, greedy and sampled
    side by side (``pool`` from ``rlfr.recipes.demo.pool_demos``)."""
    plt = _plt()
    fig = pool_figure(plt, pool)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pool_figure(plt, pool: dict):
    """The figure of ``plot_demo_pool``."""
    k = pool["eval_samples"]
    seeds = [s["seed"] for s in pool["runs"].values()]
    unique = len(set(seeds)) == len(seeds)  # repeats of one seed (other machines) are named by directory
    rows = [
        (f"seed {s['seed']}" if unique else Path(d).name, s["rl_minus_sft"]) for d, s in pool["runs"].items()
    ]
    rows.append(("pooled", pool["pooled"]))
    if pool["pooled"]["greedy"].get("across_seeds"):  # each run one value: covers the spread between runs
        rows.append(("over runs (t)", {kind: pool["pooled"][kind]["across_seeds"] for kind in ("greedy", "sampled")
                                       if kind in pool["pooled"]}))  # fmt: skip
    colours = ["#6a9fd8"] * len(pool["runs"]) + ["#2a8a4a", "#8a5a2a"]
    kinds = [("greedy", "greedy pass@1")] + ([("sampled", f"sampled avg@{k}")] if k else [])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 0.5 * len(rows) + 1.4), sharey=True,
                             squeeze=False)  # fmt: skip
    axes = axes[0]
    for ax, (kind, label) in zip(axes, kinds):
        _forest(ax, [(n, ch[kind]) for n, ch in rows], f"{pool['method'].upper()} - SFT, {label}", colours)
    axes[0].set_yticks(range(len(rows)), [name for name, _ in rows])
    axes[0].invert_yaxis()
    fig.tight_layout()
    return fig


def plot_paired(results: dict, path: Path) -> None:
    """``rlfr compare``: every paired comparison (``results["paired"]``) with its 95 % interval, one row of
    panels per eval set, greedy and sampled side by side."""
    if not any(results["paired"].values()):
        return  # nothing paired (a single arm): no figure
    plt = _plt()
    fig = paired_figure(plt, results)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_figure(plt, results: dict):
    """The figure of ``plot_paired``; comparisons with the base model are grey, the others blue."""
    k = results["budget"].get("eval_samples", 0)
    kinds = [("greedy", "greedy pass@1")] + ([("sampled", f"avg@{k}")] if k else [])
    sets = list(results["paired"])
    n = max(len(results["paired"][s]) for s in sets)
    fig, axes = plt.subplots(len(sets), len(kinds), figsize=(4.2 * len(kinds), (0.45 * n + 1.3) * len(sets)),
                             squeeze=False)  # fmt: skip
    for row, slug in zip(axes, sets):
        pairs = list(results["paired"][slug].items())
        colours = ["#999999" if name.endswith(" - base") else "#4C72B0" for name, _ in pairs]
        for ax, (kind, label) in zip(row, kinds):
            size = results["eval_sets"][slug]["n"]
            _forest(
                ax,
                [(name, st[kind]) for name, st in pairs],
                f"{slug} ({size} problems), {label}",
                colours,
                seeds=True,
            )
            ax.set_yticks(range(len(pairs)), [name for name, _ in pairs])
            ax.invert_yaxis()
    fig.tight_layout()
    return fig


def plot_flow_losses(pretrain_losses: Sequence[float], rl_history: Sequence[dict], path: Path) -> None:
    """``rlfr demo``: the flow-pretraining loss, and the online flow loss on correct and wrong rollouts."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(range(1, len(pretrain_losses) + 1), pretrain_losses, label="train")
    axes[0].set_title("flow pretraining loss")
    axes[0].set_xlabel("step")
    for key, label in (("flow/loss_correct", "correct rollouts"), ("flow/loss_wrong", "wrong rollouts")):
        pts = [(r["step"], r[key]) for r in rl_history if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set_title("online flow loss during RL")
    axes[1].set_xlabel("RL step")
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_selection(
    accuracy: dict[str, dict[str, float]], pass_at: dict[str, float], title: str, path: Path
) -> None:
    """``rlfr select``: accuracy against N (log2 axis) of every rule (rule -> str(N) -> accuracy) with pass@N, the
    ceiling, dashed; rules that use the flow dotted, the others solid."""
    plt = _plt()
    fig = selection_figure(plt, accuracy, pass_at, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_figure(plt, accuracy: dict[str, dict[str, float]], pass_at: dict[str, float], title: str):
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ns = sorted(int(n) for n in pass_at)
    ax.plot(ns, [100 * pass_at[str(n)] for n in ns], color="black", ls="--", lw=1.4, label="pass@N (ceiling)")
    for i, (rule, acc) in enumerate(accuracy.items()):
        flow = rule.partition(":")[2] in ("flow_mean", "flow_q", "combined")
        ax.plot(ns, [100 * acc[str(n)] for n in ns], marker="o", ms=3, lw=1.2, ls=":" if flow else "-",
                color=f"C{i % 10}", label=rule)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
