"""The pre-registered flow-signal diagnostic of docs/results/multistep/PROTOCOL.md, from ``rlfr inspect`` outputs.

    python scripts/multistep_diagnostic.py runs/multistep/diag/inspect_sft runs/multistep/diag/inspect_rl \\
        --out docs/results/multistep [--max-new-tokens 192]

Reads nothing but each directory's ``rollouts.jsonl`` (and ``stats.json``, whose own 2,000-resample figures are
reported beside these) and computes, per pair (the directory names are the pair names, ``inspect_`` dropped):

- primary: the within-problem AUROC of the flow score (minus the response's mean token deviation) and of the mean
  token log-prob, each with its number of problems holding both classes and a 95 % percentile bootstrap interval
  over problems (10,000 resamples, seed 0); the paired difference flow - log-prob per problem, averaged over the
  problems where both are defined, with its interval (the same bootstrap);
- secondary: pooled AUROCs; the deviation's correlation with the response length (pooled, and within problems with
  its interval); a length-only baseline (within-problem AUROC of minus the length); repeatability across the
  flow's noise draws (``draw_repeatability``); the primary measures without responses cut at the generation limit
  (``response_tokens >= max_new_tokens``); accuracy (avg@samples) and the count of samples without a flow score;
- the protocol's decision: per pair "separates" iff the flow interval's lower end > 0.5, "beats log-prob" iff the
  paired interval's lower end > 0, "inconclusive" under 20 informative problems; "flow signal present" iff some
  pair separates.

Writes ``OUT/diagnostic.json`` and ``OUT/diagnostic.md`` (the table that the results README quotes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlfr.group_stats import draw_repeatability, group_rows, pearson, within_group_auroc, within_group_pearson
from rlfr.stats import auroc, percentile_interval

ITERS, SEED, MIN_GROUPS = 10_000, 0, 20


def per_group_auroc(scores: list[float], positive: list[bool], groups: list) -> dict:
    """{group: AUROC of scores for positive vs not within the group} for groups holding both classes."""
    out = {}
    for rows in group_rows(groups):
        a = auroc([scores[i] for i in rows], [positive[i] for i in rows])
        if a is not None:
            out[groups[rows[0]]] = a
    return out


def paired_difference(flow: list[float], logp: list[float], positive: list[bool], groups: list) -> dict:
    """Mean over problems (where both are defined) of AUROC_flow - AUROC_logp, with its bootstrap interval."""
    a, b = per_group_auroc(flow, positive, groups), per_group_auroc(logp, positive, groups)
    diffs = [a[g] - b[g] for g in a if g in b]
    if not diffs:
        return {"mean": None, "groups": 0, "lo": None, "hi": None}
    lo, hi = percentile_interval(diffs, ITERS, SEED, 0.95) if len(diffs) >= 2 else (None, None)
    return {"mean": sum(diffs) / len(diffs), "groups": len(diffs), "lo": lo, "hi": hi}


def primary(rollouts: list[dict]) -> dict:
    """The protocol's primary measures over ``rollouts`` (samples without a flow score left out of the flow's)."""
    scored = [r for r in rollouts if r["mean_deviation"] is not None]
    flow = [-r["mean_deviation"] for r in scored]
    logp_all = [r["mean_logp"] for r in rollouts]
    pos, groups = [bool(r["correct"]) for r in scored], [r["group"] for r in scored]
    pos_all, groups_all = [bool(r["correct"]) for r in rollouts], [r["group"] for r in rollouts]
    return {
        "flow_within": within_group_auroc(flow, pos, groups, ITERS, SEED).to_dict(),
        "logp_within": within_group_auroc(logp_all, pos_all, groups_all, ITERS, SEED).to_dict(),
        "flow_minus_logp": paired_difference(flow, [r["mean_logp"] for r in scored], pos, groups),
    }


def analyse(rollouts: list[dict], max_new_tokens: int) -> dict:
    """Every measure of the protocol for one pair's rollouts (rows of an inspect ``rollouts.jsonl``)."""
    scored = [r for r in rollouts if r["mean_deviation"] is not None]
    flow, dev = [-r["mean_deviation"] for r in scored], [r["mean_deviation"] for r in scored]
    pos, groups = [bool(r["correct"]) for r in scored], [r["group"] for r in scored]
    length = [float(r["response_tokens"]) for r in scored]
    out = primary(rollouts)
    kept = [r for r in rollouts if r["response_tokens"] < max_new_tokens]
    out |= {
        "samples": len(rollouts),
        "problems": len(group_rows([r["group"] for r in rollouts])),
        "without_flow_score": len(rollouts) - len(scored),
        "accuracy": sum(bool(r["correct"]) for r in rollouts) / len(rollouts),
        "flow_pooled": auroc(flow, pos),
        "logp_pooled": auroc([r["mean_logp"] for r in rollouts], [bool(r["correct"]) for r in rollouts]),
        "length_corr_pooled": pearson(dev, length),
        "length_corr_within": within_group_pearson(dev, length, groups, ITERS, SEED).to_dict(),
        "length_within": within_group_auroc([-v for v in length], pos, groups, ITERS, SEED).to_dict(),
        "cut_samples": len(rollouts) - len(kept),
        "without_cut": primary(kept) if kept else None,
    }
    if scored and all(r.get("deviation_draws") for r in scored):
        draws = [[-r["deviation_draws"][j] for r in scored] for j in range(len(scored[0]["deviation_draws"]))]
        out["repeatability"] = draw_repeatability(draws, pos, groups, (1, 2, 4, 8), ITERS, SEED)
    return out


def decide(result: dict) -> dict:
    """The protocol's decision rule for one pair."""
    flow, diff = result["flow_within"], result["flow_minus_logp"]
    if flow["groups"] < MIN_GROUPS:
        return {"verdict": "inconclusive", "separates": None, "beats_logp": None}
    return {
        "verdict": "separates" if flow["lo"] is not None and flow["lo"] > 0.5 else "does not separate",
        "separates": flow["lo"] is not None and flow["lo"] > 0.5,
        "beats_logp": diff["lo"] is not None and diff["lo"] > 0,
    }


def _fmt(g: dict | None) -> str:
    if not g or g.get("mean") is None:
        return "n/a"
    ci = f" [{g['lo']:.3f}, {g['hi']:.3f}]" if g.get("lo") is not None else ""
    return f"{g['mean']:.3f}{ci} ({g['groups']})"


def table(pairs: dict) -> str:
    rows = [
        "| pair | accuracy | flow within (problems) | log-prob within | flow - log-prob | length-only within "
        "| flow pooled | log-prob pooled | verdict |",
        "|---|--:|---|---|---|---|--:|--:|---|",
    ]
    for name, r in pairs.items():
        pooled = [f"{v:.3f}" if v is not None else "n/a" for v in (r["flow_pooled"], r["logp_pooled"])]
        rows.append(
            f"| {name} | {r['accuracy']:.3f} | {_fmt(r['flow_within'])} | {_fmt(r['logp_within'])} | "
            f"{_fmt(r['flow_minus_logp'])} | {_fmt(r['length_within'])} | {pooled[0]} | {pooled[1]} | "
            f"{r['decision']['verdict']} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inspect_dirs", nargs="+", type=Path, help="rlfr inspect output directories, one per pair")
    p.add_argument("--out", type=Path, required=True, help="where diagnostic.json and diagnostic.md go")
    p.add_argument("--max-new-tokens", type=int, default=192, help="the generation limit (a cut response)")
    args = p.parse_args(argv)
    pairs = {}
    for d in args.inspect_dirs:
        name = d.name.removeprefix("inspect_")
        if name in pairs:  # one pair's results would silently replace another's
            raise SystemExit(
                f"{d}: a second directory for pair '{name}' (pair names are the directory names)"
            )
        path = d / "rollouts.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (run rlfr inspect first)")
        rollouts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        result = analyse(rollouts, args.max_new_tokens)
        result["decision"] = decide(result)
        stats = d / "stats.json"
        if stats.is_file():  # inspect's own figures (2,000 resamples), reported beside these
            s = json.loads(stats.read_text())
            result["inspect_stats"] = {k: s.get(k) for k in ("auroc", "auroc_within", "logp_auroc_within")}
        pairs[name] = result
    present = any(r["decision"]["separates"] for r in pairs.values())
    inconclusive = all(r["decision"]["verdict"] == "inconclusive" for r in pairs.values())
    summary = {"pairs": pairs, "flow_signal_present": present, "all_inconclusive": inconclusive,
               "bootstrap": {"iters": ITERS, "seed": SEED}, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diagnostic.json").write_text(json.dumps(summary, indent=2))
    verdict = "present" if present else ("inconclusive" if inconclusive else "absent")
    (args.out / "diagnostic.md").write_text(table(pairs) + f"\nFlow signal on this task: **{verdict}**.\n")
    print(table(pairs) + f"flow signal: {verdict}")
    return summary


if __name__ == "__main__":
    main()
