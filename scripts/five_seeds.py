"""The five-seed RLVR vs RLFR statistics of docs/results/study/PROTOCOL.md ("Extension to five seeds") from the
per-problem records committed in docs/results/study/five_seeds/.

    python scripts/five_seeds.py docs/results/study/five_seeds [--seeds 0 1 2 3 4] [--out DIR]
        [--recorded docs/results/study/results.json]

Reads ``<dir>/<method>/seed_<n>/eval_<set>.json`` (``rlfr compare``'s record of one model on one held-out set:
``greedy`` 0/1 per problem, ``sampled`` correct counts of ``config.samples`` samples) for the methods ``rlvr``
and ``rlfr``, and ``<dir>/base/eval_<set>.json`` for the start model. Every record of a set must be on the same
problems in the same order, with the same number of samples; a record that is not is refused, naming the file.

Reports, per set: each run's greedy accuracy and avg@k; per seed present in both arms, RLFR - RLVR and McNemar's
exact test on greedy correctness (the protocol's per-seed secondary). The primary statistic (the paired bootstrap
over problems of the seed-averaged per-problem accuracy, 10,000 resamples, seed 0) and the Student-t interval
over seeds are computed only when both arms hold every seed of ``--seeds``: the protocol fixes the seeds, so a
partial set is not reported as the result.

With ``--recorded`` (the three-seed study's ``results.json``, which kept per-seed accuracies but no per-problem
records), the protocol's seed-level secondary is computed as soon as every seed of ``--seeds`` has an accuracy in
both arms: each seed's greedy and avg@k from its record where one exists, else the recorded one (the table says
which). A seed with both is the protocol's reproduction check: its rerun must give the recorded accuracies
exactly, and any difference is reported. Writes ``OUT/five_seeds.json`` and ``OUT/five_seeds.md``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rlfr.stats import compare_arms, format_diff, mcnemar, seed_interval

METHODS = ("rlvr", "rlfr")


def load_records(root: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """root -> {set: {run: record}} with runs "base" and "<method>/seed_<n>"; records checked alike per set."""
    found: dict[str, dict[str, dict]] = {}
    paths = sorted(root.glob("base/eval_*.json")) + sorted(root.glob("*/seed_*/eval_*.json"))
    for path in paths:
        run = "base" if path.parent.name == "base" else f"{path.parent.parent.name}/{path.parent.name}"
        if run != "base" and (
            path.parent.parent.name not in METHODS or not re.fullmatch(r"seed_\d+", path.parent.name)
        ):
            raise ValueError(f"{path}: expected <dir>/{{{','.join(METHODS)}}}/seed_<n>/eval_<set>.json")
        rec = json.loads(path.read_text())
        for key in ("config", "greedy"):
            if key not in rec:
                raise ValueError(f"{path}: no {key!r}: not an rlfr compare evaluation record")
        found.setdefault(path.stem.removeprefix("eval_"), {})[run] = rec
    if not found:
        raise ValueError(f"{root}: no evaluation records (<method>/seed_<n>/eval_<set>.json)")
    for name, runs in found.items():
        (ref_run, ref), *rest = runs.items()
        for run, rec in rest:
            for key in ("problems", "samples"):
                if rec["config"][key] != ref["config"][key]:
                    raise ValueError(
                        f"{root / run / f'eval_{name}.json'}: config.{key} differs from {ref_run}'s"
                    )
    return found


def seed_of(run: str) -> int:
    return int(run.rsplit("_", 1)[1])


def load_recorded(path: Path) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """The study's results.json -> {set: {method: {seed: {"greedy", "sampled"}}}} for the methods compared."""
    try:
        arms = json.loads(path.read_text())["arms"]
        return {name: {m: {int(s): {"greedy": g, "sampled": arms[m]["eval"][name]["sampled"][s]}
                           for s, g in arms[m]["eval"][name]["greedy"].items()} for m in METHODS}
                for name in arms[METHODS[0]]["eval"]}  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a study results.json with per-seed accuracies (missing {e})") from None


def seed_level(
    acc: dict, arm: dict, recorded: dict[str, dict[int, dict]], seeds: list[int], primary: dict | None = None
) -> dict:
    """Per seed and arm the accuracy used (record first, else recorded) and the reproduction check; the
    Student-t interval over seeds of RLFR - RLVR once every seed has both arms: the ``primary``'s "over seeds"
    interval when every seed has records (one computation, so the report cannot round one mean two ways)."""
    used: dict[str, dict[int, dict]] = {}
    checks = []
    for m in METHODS:
        used[m] = {}
        for s in seeds:
            rec = recorded.get(m, {}).get(s)
            if s in arm[m]:
                a = acc[f"{m}/seed_{s}"]
                used[m][s] = {**a, "source": "record"}
                if rec is not None:
                    checks.append({"run": f"{m}/seed_{s}", "rerun": a, "recorded": rec,
                                   "same": all(abs(a[k] - rec[k]) < 1e-9 for k in ("greedy", "sampled"))})  # fmt: skip
            elif rec is not None:
                used[m][s] = {**rec, "source": "recorded"}
    complete = all(s in used[m] for m in METHODS for s in seeds)
    interval = None
    if complete:
        interval = {k: primary[k]["across_seeds"] if primary is not None and k in primary
                    else seed_interval([used["rlfr"][s][k] - used["rlvr"][s][k] for s in seeds])
                    for k in ("greedy", "sampled")}  # fmt: skip
    return {"accuracy": used, "reproduction": checks, "t_interval": interval}


def analyse(records: dict[str, dict[str, dict]], seeds: list[int], recorded: dict | None = None) -> dict:
    """{set: {"runs": {run: {greedy, sampled}}, "per_seed": {seed: {diff_greedy, mcnemar}}, "primary": ... | None,
    "seed_level": ... (with ``recorded``)}}."""
    out = {}
    for name, runs in sorted(records.items()):
        k = next(iter(runs.values()))["config"]["samples"]
        acc = {run: {"greedy": sum(r["greedy"]) / len(r["greedy"]),
                     "sampled": sum(r["sampled"]) / (k * len(r["sampled"])) if k else None}
               for run, r in runs.items()}  # fmt: skip
        arm = {m: {seed_of(run): r for run, r in runs.items() if run.startswith(m + "/")} for m in METHODS}
        per_seed = {}
        for s in sorted(set(arm["rlfr"]) & set(arm["rlvr"])):
            a, b = arm["rlfr"][s], arm["rlvr"][s]
            m = mcnemar([bool(x) for x in a["greedy"]], [bool(x) for x in b["greedy"]])
            per_seed[s] = {"diff_greedy": (sum(a["greedy"]) - sum(b["greedy"])) / len(a["greedy"]),
                           "mcnemar": {"n10": m.n10, "n01": m.n01, "p": m.p_value}}  # fmt: skip
        complete = all(s in arm[m] for m in METHODS for s in seeds)
        primary = None
        if complete:
            pick = {m: {str(s): arm[m][s] for s in seeds} for m in METHODS}
            primary = compare_arms(pick["rlfr"], pick["rlvr"], k)
        missing = {m: [s for s in seeds if s not in arm[m]] for m in METHODS}
        out[name] = {"samples": k, "runs": acc, "per_seed": per_seed, "primary": primary, "missing": missing}
        if recorded is not None:
            if name not in recorded:
                raise ValueError(f"the recorded results have no set {name!r} (they have {sorted(recorded)})")
            out[name]["seed_level"] = seed_level(acc, arm, recorded[name], seeds, primary)
    return out


def render(res: dict, seeds: list[int]) -> str:
    lines = ["# RLVR vs RLFR, five seeds (docs/results/study/PROTOCOL.md)", ""]
    for name, r in res.items():
        k = r["samples"]
        lines += [f"## {name}", "", f"| run | greedy | avg@{k} |", "|---|--:|--:|"]
        for run, a in sorted(r["runs"].items(), key=lambda x: (x[0] != "base", x[0])):
            sampled = "" if a["sampled"] is None else f"{a['sampled']:.4f}"
            lines.append(f"| {run} | {a['greedy']:.3f} | {sampled} |")
        lines.append("")
        for s, p in r["per_seed"].items():
            m = p["mcnemar"]
            lines.append(f"- seed {s}: RLFR - RLVR greedy {100 * p['diff_greedy']:+.1f} points; McNemar p = "
                         f"{m['p']:.3f} ({m['n10']} problems only RLFR solved, {m['n01']} only RLVR)")  # fmt: skip
        if r["primary"] is None:
            wait = "; ".join(f"{m} seeds {v}" for m, v in r["missing"].items() if v)
            lines.append(
                f"- primary statistic over seeds {seeds}: not computed, the runs are missing ({wait})"
            )
        else:
            p = r["primary"]
            for kind in ("greedy", "sampled"):
                if kind in p:
                    t = p[kind]["across_seeds"]
                    seed_ci = "" if t is None else f"; over seeds (t): {format_diff(t)}"
                    lines.append(f"- RLFR - RLVR {kind}, paired over {p[kind]['n']} problems: "
                                 f"{format_diff(p[kind])}{seed_ci}")  # fmt: skip
        if "seed_level" in r:
            lines += _render_seed_level(r["seed_level"], seeds, k)
        lines.append("")
    return "\n".join(lines)


def _render_seed_level(sl: dict, seeds: list[int], k: int) -> list[str]:
    lines = [
        "",
        f"Seed level (greedy / avg@{k}; *recorded*: the three-seed study's results.json, no record here):",
        "",
        "| seed | RLVR | RLFR | RLFR - RLVR (greedy) |",
        "|--:|--:|--:|--:|",
    ]
    for s in seeds:
        cells = []
        for m in METHODS:
            a = sl["accuracy"][m].get(s)
            mark = "*" if a is not None and a["source"] == "recorded" else ""
            cells.append("missing" if a is None else f"{mark}{a['greedy']:.3f} / {a['sampled']:.4f}{mark}")
        both = all(s in sl["accuracy"][m] for m in METHODS)
        diff = sl["accuracy"]["rlfr"][s]["greedy"] - sl["accuracy"]["rlvr"][s]["greedy"] if both else None
        lines.append(f"| {s} | {cells[0]} | {cells[1]} | {'' if diff is None else f'{100 * diff:+.1f}'} |")
    lines.append("")
    for c in sl["reproduction"]:
        verdict = (
            "reproduced exactly"
            if c["same"]
            else (
                f"NOT reproduced: rerun {c['rerun']['greedy']:.3f} / {c['rerun']['sampled']:.4f}, recorded "
                f"{c['recorded']['greedy']:.3f} / {c['recorded']['sampled']:.4f}"
            )
        )
        lines.append(f"- {c['run']}: recorded accuracies {verdict}")
    t = sl["t_interval"]
    if t is None:
        lines.append(
            f"- Student-t interval over seeds {seeds}: not computed, a seed has no accuracy in an arm"
        )
    else:
        lines.append(f"- RLFR - RLVR over seeds {seeds} (Student-t, df {len(seeds) - 1}): greedy "
                     f"{format_diff(t['greedy'])}, avg@{k} {format_diff(t['sampled'])}")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--recorded",
        type=Path,
        default=None,
        help="the three-seed study's results.json (per-seed accuracies of seeds without records)",
    )
    args = ap.parse_args(argv)
    recorded = None if args.recorded is None else load_recorded(args.recorded)
    res = analyse(load_records(args.records), args.seeds, recorded)
    text = render(res, args.seeds)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "five_seeds.json").write_text(json.dumps(res, indent=2))
        (args.out / "five_seeds.md").write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
