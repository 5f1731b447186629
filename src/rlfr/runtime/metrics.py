"""Run logging: one JSON line per step (``metrics.jsonl``), TensorBoard scalars, a console line, plots.

Only the main process writes. ``MetricsLogger.log(step, metrics)`` appends a line that includes the
step and wall time; ``read_metrics`` reads the file back. ``Accum`` gathers one step's statistics over
micro-batches and ``reduce_stats`` averages them over processes. (The plots are in ``rlfr.eval.plots``.)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

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


class MetricsLogger:
    """Appends to ``metrics.jsonl`` and TensorBoard (both created at the first row). ``resume_step`` (a run
    resumed from the checkpoint of that step) first drops the rows logged after it, in the file and in
    TensorBoard (``purge_step``), so the steps that are run again are not logged twice; ``fresh`` truncates
    the file (a stage that always starts over)."""

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        fresh: bool = False,
    ):
        self.enabled, self.out_dir, self.tensorboard = enabled, Path(out_dir), tensorboard
        self.path = metrics_path(out_dir)
        self.resume_step = resume_step
        self._tb = None
        self._t0 = time.time()
        if enabled and self.path.is_file():
            if fresh:
                self.path.unlink()
            elif resume_step is not None:
                kept = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step]
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(self.path)

    def _writer(self):
        if self._tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if self.resume_step is None else self.resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge)
        return self._tb

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
        tb = self._writer()
        if tb is not None:
            prefix = f"{stage}/" if stage else ""
            for k, v in row.items():
                if k not in ("step", "wall", "stage"):
                    tb.add_scalar(prefix + k, v, step)
            tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def metrics_path(out_dir: str | Path) -> Path:
    """The metrics log of a run directory."""
    return Path(out_dir) / "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics log; ``path`` is the file or its run directory."""
    p = Path(path)
    if p.is_dir():
        p = metrics_path(p)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class Accum:
    """One step's statistics over micro-batches: weighted means (``add``), sums (``total``), paired samples
    (``add_samples``: scores with 0/1 labels, reported as the AUROC over the whole step), and non-finite
    flags (``flag_nonfinite``).

    Values, weights and flags may be tensors: they stay on their device and are read (one host sync) only
    by ``means()`` / ``first_nonfinite()`` at the end of the step, so logging never stalls a GPU inside the
    micro-batch loop."""

    def __init__(self):
        self.sums: dict[str, object] = {}
        self.weights: dict[str, object] = {}
        self.totals: dict[str, float] = {}
        self.samples: dict[str, list] = {}
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

    def total(self, key: str, value: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + value

    def add_samples(self, key: str, scores, labels, keep=None) -> None:
        """Scores (n,) with 0/1 labels (n,); ``keep`` (n,) bool selects the samples that count."""
        self.samples.setdefault(key, []).append((scores, labels, keep))

    def means(self) -> dict[str, float]:
        """Weighted means, totals, and the AUROC of each sample key that has both classes."""
        from rlfr.eval.stats import auroc

        out = {}
        for k, total in self.sums.items():
            w = float(self.weights[k])
            if w > 0:
                out[k] = float(total) / w
        out |= self.totals
        for key, parts in self.samples.items():
            scores, labels = [], []
            for s, lab, keep in parts:
                s, lab = _as_list(s), _as_list(lab)
                kept = _as_list(keep) if keep is not None else [True] * len(s)
                scores += [v for v, k in zip(s, kept) if k]
                labels += [bool(v) for v, k in zip(lab, kept) if k]
            auc = auroc(scores, labels) if scores else None
            if auc is not None:
                out[key] = auc
        return out


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def reduce_stats(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Mean of each statistic over the processes that logged it. Processes may log different keys (a rank
    whose rollouts were all wrong has no ``flow/loss_correct``), so the key sets are unioned first: a
    collective over mismatched keys would hang or mix up values."""
    if accelerator.num_processes == 1:
        return {k: float(v) for k, v in stats.items()}
    import torch
    from accelerate.utils import gather_object

    keys = sorted(set().union(*gather_object([sorted(stats)])))
    vals = torch.tensor(
        [float(stats.get(k, math.nan)) for k in keys], dtype=torch.float64, device=accelerator.device
    )
    present = ~torch.isnan(vals)
    total = accelerator.reduce(torch.where(present, vals, 0.0), "sum")
    count = accelerator.reduce(present.double(), "sum")
    return {k: float(t / c) for k, t, c in zip(keys, total.tolist(), count.tolist()) if c > 0}
