"""Run logging: one JSON line per step (``metrics.jsonl``), experiment trackers, a console line, plots.

Only the main process writes. ``MetricsLogger.log(step, metrics)`` appends a line that includes the
step and wall time, and logs the same values to the trackers named in ``report_to`` (accelerate's tracker
classes: TensorBoard by default, wandb, trackio, MLflow, Comet); ``log_samples`` logs a table of sample
completions where a tracker has tables; ``read_metrics`` reads the file back. The tracker objects are made
here rather than through ``Accelerator(log_with=...)``: the run directory (TensorBoard's ``purge_step`` on
resume) is known only here, and ``Accelerator.end_training`` would also tear down the process group.
``Accum`` gathers one step's statistics over micro-batches and ``reduce_stats`` averages them over processes. (The plots are in ``rlfr.eval.plots``.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import gather_object

from rlfr.capabilities import check_trackers
from rlfr.group_stats import pearson, within_group_auroc, within_group_pearson
from rlfr.stats import auroc

log = logging.getLogger(__name__)

_CONSOLE_KEYS = (
    ("reward", "rew", "{:.3f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("eval/accuracy", "held-out acc", "{:.3f}"),
    ("response_len", "len", "{:.1f}"),
    ("flow/loss_correct", "flow+", "{:.4f}"),
    ("flow/loss_wrong", "flow-", "{:.4f}"),
    ("flow_reward/mean", "fr", "{:+.5f}"),
    ("policy/kl", "kl", "{:.4f}"),
    ("policy/entropy", "ent", "{:.3f}"),
    ("time/rollout", "t_roll", "{:.1f}s"),
    ("time/update", "t_upd", "{:.1f}s"),
    ("time/flow", "t_flow", "{:.1f}s"),
    ("time/step", "t_step", "{:.1f}s"),
)


def format_step(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}"]
    for key, short, fmt in _CONSOLE_KEYS:
        if key in metrics and metrics[key] is not None:
            parts.append(f"{short} {fmt.format(metrics[key])}")
    return " | ".join(parts)


PROJECT = "rlfr"  # the tracker project (wandb / trackio / comet project, MLflow experiment)


def make_tracker(name: str, out_dir: Path, run_name: str, resume_step: int | None):
    """The accelerate tracker ``name`` for a run directory (the classes ``Accelerator(log_with=...)`` builds):
    TensorBoard writes ``out_dir/tensorboard`` and, on resume, purges the events after ``resume_step``;
    wandb keeps its files in ``out_dir/wandb`` (``WANDB_MODE=offline`` works); the others log to their
    server or local store under project ``PROJECT`` (or ``$WANDB_PROJECT`` / ``$MLFLOW_EXPERIMENT_NAME``)."""
    check_trackers([name])
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        purge = None if resume_step is None else resume_step + 1
        return cls("tensorboard", str(out_dir), purge_step=purge)
    if name == "wandb":
        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return cls(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, dir=str(out_dir))
    if name == "mlflow":
        return cls(PROJECT, run_name=run_name)
    if name == "trackio":
        return cls(PROJECT, name=run_name)
    return cls(PROJECT)


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config dict as the flat ``{"policy.lr": 1e-6, ...}`` of scalars that trackers accept (lists and
    None become strings)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flat_config(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class MetricsLogger:
    """Appends to ``metrics.jsonl`` and logs to the experiment trackers of ``report_to`` (accelerate's tracker
    classes, or ``GeneralTracker`` instances; all started at the first row, so a run that fails before it
    leaves nothing). ``resume_step`` (a run resumed from the checkpoint of that step) first drops the rows
    logged after it, in the file and in TensorBoard (``purge_step``), so the steps that are run again are not
    logged twice; ``fresh`` truncates the file (a stage that always starts over). ``config`` (a nested dict)
    is stored with each tracker's run; ``run_name`` names it (default: the run directory's name)."""

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        report_to: Sequence = ("tensorboard",),
        resume_step: int | None = None,
        fresh: bool = False,
        config: dict | None = None,
        run_name: str | None = None,
    ):
        self.enabled, self.out_dir, self.report_to = enabled, Path(out_dir), tuple(report_to)
        self.path = metrics_path(out_dir)
        self.resume_step, self.config = resume_step, config
        self.run_name = run_name or self.out_dir.resolve().name
        self.trackers: list | None = None  # started at the first row
        self._t0 = time.time()
        if enabled:
            check_trackers([t for t in self.report_to if isinstance(t, str)])
        if enabled and self.path.is_file():
            if fresh:
                self.path.unlink()
            elif resume_step is not None:
                kept = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step]
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(self.path)

    def _trackers(self) -> list:
        if self.trackers is None:
            PartialState()  # accelerate's trackers log through its logger, which needs the (singleton) state
            self.trackers = [
                make_tracker(t, self.out_dir, self.run_name, self.resume_step) if isinstance(t, str) else t
                for t in self.report_to
            ]
            for t in self.trackers:
                t.start()
                if self.config is not None:
                    t.store_init_configuration(flat_config(self.config))
        return self.trackers

    def log(self, step: int, metrics: dict[str, float], stage: str | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, "wall": round(time.time() - self._t0, 3)}
        if stage is not None:
            row["stage"] = stage
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if not math.isfinite(v):
                raise FloatingPointError(f"metric {k!r} is {v} at step {step}")
            row[k] = v
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        prefix = f"{stage}/" if stage else ""
        values = {prefix + k: v for k, v in row.items() if k not in ("step", "wall", "stage")}
        for t in self._trackers():
            t.log(values, step=step)

    def log_samples(self, step: int, rows: list[dict], stage: str | None = None, max_rows: int = 64) -> None:
        """A table of sample completions (``rows``: one dict per completion, same keys) to every tracker that
        has tables (``log_table``: wandb, ClearML, ...); TensorBoard gets it as a markdown text. Others skip it."""
        if not self.enabled or not rows:
            return
        rows = rows[:max_rows]
        columns = list(rows[0])
        data = [[r[c] for c in columns] for r in rows]
        key = f"{stage}/samples" if stage else "samples"
        for t in self._trackers():
            if hasattr(t, "log_table"):
                t.log_table(key, columns=columns, data=data, step=step)
            elif getattr(t, "name", None) == "tensorboard":
                t.log({key: markdown_table(columns, data)}, step=step)

    def close(self) -> None:
        for t in self.trackers or []:
            t.finish()
        self.trackers = None


def markdown_table(columns: list[str], data: list[list]) -> str:
    """A markdown table (TensorBoard renders text summaries as markdown); cells on one line, pipes escaped."""

    def cell(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in data])


def metrics_path(out_dir: str | Path) -> Path:
    """The metrics log of a run directory."""
    return Path(out_dir) / "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics log; ``path`` is the file or its run directory. A last row cut off by a kill
    during its append (no newline after it, not valid JSON) was never logged and is left out; any other
    unreadable row is an error naming the file and line."""
    p = Path(path)
    if p.is_dir():
        p = metrics_path(p)
    if not p.is_file():
        return []
    text = p.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                log.warning("%s: leaving out its last line, cut off by an interrupted write", p)
                break
            raise ValueError(f"{p}, line {i}: not a JSON row ({e})") from e
    return rows


class Accum:
    """One step's statistics over micro-batches: weighted means (``add``), sums (``total``), maxima
    (``maximum``; across processes ``reduce_stats`` takes the maximum of keys ending in ``_max``), paired samples
    (``add_samples``: scores with 0/1 labels, reported as the AUROC over the whole step and, given the rollouts'
    group ids, the AUROC within groups beside it; ``add_pairs``: two values per rollout, reported as their
    correlation, pooled and within groups), non-finite flags (``flag_nonfinite``), and per-rollout values
    (``put_rows``: row index -> value, for the sample tables; not part of ``means``).

    Values, weights and flags may be tensors: they stay on their device and are read (one host sync) only
    by ``means()`` / ``first_nonfinite()`` / ``row_values()`` at the end of the step, so logging never
    stalls a GPU inside the micro-batch loop."""

    def __init__(self):
        self.sums: dict[str, object] = {}
        self.weights: dict[str, object] = {}
        self.totals: dict[str, float] = {}
        self.samples: dict[str, list] = {}
        self.pairs: dict[str, list] = {}
        self.rows: dict[str, list] = {}
        self.maxima: dict[str, list] = {}
        self._flags: list[tuple[str, object]] = []

    def flag_nonfinite(self, quantity: str, flag) -> None:
        """Record whether ``quantity`` went NaN/inf (a bool or a 0-d bool tensor, read later)."""
        self._flags.append((quantity, flag))

    def first_nonfinite(self) -> str | None:
        """The first quantity flagged non-finite this step, or None."""
        return next((q for q, f in self._flags if bool(f)), None)

    def add(self, key: str, value, weight=1.0) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def maximum(self, key: str, value) -> None:
        """The largest ``value`` of the step (scalars or 0-d tensors, read at the end)."""
        self.maxima.setdefault(key, []).append(value)

    def total(self, key: str, value: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + value

    def add_samples(self, key: str, scores, labels, keep=None, groups=None) -> None:
        """Scores (n,) with 0/1 labels (n,); ``keep`` (n,) bool selects the samples that count; ``groups`` (n,)
        the group id of each (the prompt of a rollout), for ``<key>_within`` (see ``means``)."""
        self.samples.setdefault(key, []).append((scores, labels, keep, groups))

    def add_pairs(self, key: str, x, y, keep=None, groups=None) -> None:
        """Two values per sample, x (n,) and y (n,), for their correlation (``means``); ``keep``, ``groups`` as
        in ``add_samples``."""
        self.pairs.setdefault(key, []).append((x, y, keep, groups))

    def put_rows(self, key: str, rows, values) -> None:
        """Per-rollout values: ``rows`` (n,) row indices of the step's batch, ``values`` (n,) (tensors or lists)."""
        self.rows.setdefault(key, []).append((rows, values))

    def row_values(self, key: str) -> dict[int, float]:
        """Row index -> value of ``key`` (read at the end of the step)."""
        return {
            int(r): float(v)
            for rows, vals in self.rows.get(key, [])
            for r, v in zip(_as_list(rows), _as_list(vals))
        }

    def means(self) -> dict[str, float]:
        """Weighted means, totals, the AUROC of each sample key that has both classes and, where the samples came
        with group ids, ``<key>_within`` (``rlfr.stats.within_group_auroc``, no interval: over the groups with both
        classes; absent when there is none) and ``<key>_within_groups`` (their count, also 0); the Pearson
        correlation of each pair key (when both vary) and ``<key>_within`` (``within_group_pearson``)."""
        out = {}
        for k, total in self.sums.items():
            w = float(self.weights[k])
            if w > 0:
                out[k] = float(total) / w
        out |= self.totals
        out |= {k: max(float(v) for v in values) for k, values in self.maxima.items()}
        for key, parts in self.samples.items():
            scores, labels, groups = _kept(parts)
            positive = [bool(v) for v in labels]
            auc = auroc(scores, positive) if scores else None
            if auc is not None:
                out[key] = auc
                if groups is not None:  # beside the pooled value, also when no group holds both classes
                    within = within_group_auroc(scores, positive, groups, iters=0)
                    out[f"{key}_within_groups"] = float(within.groups)
                    if within.mean is not None:
                        out[f"{key}_within"] = within.mean
        for key, parts in self.pairs.items():
            x, y, groups = _kept(parts)
            if (r := pearson(x, y) if x else None) is not None:
                out[key] = r
            if groups is not None and (w := within_group_pearson(x, y, groups, iters=0)).mean is not None:
                out[f"{key}_within"] = w.mean
        return out


def _kept(parts: list[tuple]) -> tuple[list, list, list | None]:
    """(a, b, keep, groups) parts of one key -> the kept a values, b values and group ids (None unless every
    part has them)."""
    a_out, b_out, groups = [], [], []
    for a, b, keep, grp in parts:
        a, b = _as_list(a), _as_list(b)
        kept = _as_list(keep) if keep is not None else [True] * len(a)
        a_out += [float(v) for v, k in zip(a, kept) if k]
        b_out += [float(v) for v, k in zip(b, kept) if k]
        if groups is not None and grp is not None:
            groups += [int(g) for g, k in zip(_as_list(grp), kept) if k]
        else:
            groups = None
    return a_out, b_out, groups


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def reduce_stats(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Mean of each statistic over the processes that logged it (the maximum for keys ending in ``_max``).
    Processes may log different keys (a rank whose rollouts were all wrong has no ``flow/loss_correct``), so
    the key sets are unioned first: a collective over mismatched keys would hang or mix up values."""
    if accelerator.num_processes == 1:
        return {k: float(v) for k, v in stats.items()}
    keys = sorted(set().union(*gather_object([sorted(stats)])))
    vals = torch.tensor(
        [float(stats.get(k, math.nan)) for k in keys], dtype=torch.float64, device=accelerator.device
    )
    table = accelerator.gather(vals[None]).reshape(accelerator.num_processes, len(keys))  # (P, K)
    present = ~torch.isnan(table)
    count = present.sum(0)
    mean = torch.where(present, table, 0.0).sum(0) / count.clamp(min=1)
    largest = torch.where(present, table, -math.inf).amax(0)
    # keys ending in "_max" are maxima over processes, the others means
    return {
        k: float(largest[i] if k.endswith("_max") else mean[i]) for i, k in enumerate(keys) if count[i] > 0
    }
