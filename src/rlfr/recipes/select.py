"""``rlfr select``: sample N responses per problem, score each, and choose one by every rule; accuracy against N.

    rlfr select checkpoint=runs/demo/rl n=8 dev_problems=64 out=runs/select
    rlfr select model=runs/sft/model flow=runs/flow/flow data=embedded-transfer n=16

Settings: ``SelectConfig`` (``rlfr select --show-config``). For every problem, ``n`` samples at ``temperature``
(through the sampler interface, ``rlfr.policy.sampler``), checked by the verifier, each with three scores,
higher = better: ``logp``, the mean token log-prob of the response under the policy; ``flow_mean`` and
``flow_q``, minus the mean and minus the ``flow_quantile`` of the response's token deviations under the flow
(``rlfr.flow.token_scores`` on the policy's latents at the flow's own layers, standardised with the flow's
statistics when it has them; rewarding timesteps, modes and shift those the run scored with). With
``scoring=captured`` (default) the latents and log-probs are those recorded while sampling
(``rlfr.policy.capture``: no second policy forward);
``scoring=forward`` runs a second forward over the samples instead. A response without a scored token (a
one-token response under ``token_pre``) gets its problem's lowest flow score.

Rules (``rlfr.eval.selection``): majority voting, score-weighted voting and best-of-N for each score and for the
combined score z(logp) + ``combine_weight`` z(``combine_with``) (scores standardised within a problem's samples).
Accuracy at N = 1, 2, 4, ... <= n comes from subsets of the same samples (all N-subsets, or ``subset_draws`` random
ones where there are more, per problem; the same for every rule); pass@N is the ceiling.

Development and test split (``dev_problems``): the flow-including rule with the best dev accuracy at N = n is the
one reported on the test problems, against majority voting and against best-of-N by log-prob, with paired
bootstrap intervals over problems (``rlfr.stats.paired_bootstrap``): the pre-registered primary comparison. Every
rule is also compared with those two on test.

Outputs in ``out``: ``results.json`` (``rlfr.eval.results.SelectResult``, also what ``run_select`` returns),
``problems.jsonl`` (per problem: its samples with answers, correctness and scores, and each rule's choice at
N = n), ``accuracy_vs_n.png`` (test split; ``accuracy_vs_n_dev.png`` for dev) and ``report.md``.
Refused in one line: no flow, a flow of a model of another size (``latents.json`` records the hidden size and
depth), n < 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr.commands import SelectConfig
from rlfr.config import to_dict
from rlfr.data.sources import GENERATED_SETS, load_source
from rlfr.data.templates import example_prompt
from rlfr.eval.inspect_page import within_text
from rlfr.eval.plots import plot_selection
from rlfr.eval.results import SelectResult
from rlfr.eval.selection import SCORES, Sample, accuracy_at, choose, is_flow_rule, pass_at, rule_names
from rlfr.flow import sequence_scores, token_scores
from rlfr.flow.store import FlowBundle, check_meta, load_flow, meta_for
from rlfr.group_stats import pearson, within_group_auroc, within_group_pearson
from rlfr.policy.forward import policy_forward
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import load_model, load_tokenizer, model_config
from rlfr.policy.sampler import SamplingParams, build_sampler
from rlfr.reward.verifier import Verifier, answer_key
from rlfr.runtime.checkpoint import policy_and_flow
from rlfr.runtime.env import inference_device, seed_everything
from rlfr.schema import DataConfig, RewardShapingConfig
from rlfr.stats import auroc, format_diff, paired_bootstrap, powers_of_two


def run(cfg: SelectConfig) -> int:
    run_select(cfg)
    return 0


def resolve(cfg: SelectConfig) -> tuple[str, Path, dict]:
    """-> (policy, flow directory, the run's TrainConfig dict or {})."""
    if cfg.checkpoint is not None:
        policy, flow, run_cfg = policy_and_flow(cfg.checkpoint)
        return str(policy), flow, run_cfg
    if cfg.model is None or cfg.flow is None:
        raise ValueError(
            "rlfr select needs a policy and its flow: checkpoint=RUN (an RL run of method rlfr, e.g. runs/demo/rl) "
            "or model=POLICY flow=FLOW_DIR"
        )
    return cfg.model, Path(cfg.flow), {}


def run_select(cfg: SelectConfig) -> SelectResult:
    """The whole command (module docstring) -> what ``OUT/results.json`` holds."""
    policy, flow_dir, run_cfg = resolve(cfg)
    bundle = load_flow(flow_dir)
    m = bundle.meta  # a flow of another model (hidden size, depth) is refused before any weight loads
    check_meta(m, meta_for(model_config(policy), m.fractions, m.modes, m.shift, m.latent_norm), flow_dir)
    data_cfg = run_cfg.get("data", {})
    template = cfg.template or data_cfg.get("template", "chat")
    timesteps = cfg.timesteps or run_cfg.get("flow", {}).get("reward", {}).get(
        "timesteps", RewardShapingConfig.timesteps
    )
    task_seed = (
        cfg.task_seed if cfg.task_seed is not None else data_cfg.get("task_seed", DataConfig.task_seed)
    )
    held_out = data_cfg.get("eval_size", DataConfig.eval_size)
    size = (cfg.problems or held_out) if cfg.data in GENERATED_SETS else 0
    # the run's training problems exclude its held-out split of exactly data.eval_size problems; a larger embedded
    # held-out split adds problems it may have trained on
    if cfg.data == "embedded" and data_cfg.get("train") == "embedded" and size > held_out:
        raise ValueError(
            f"problems={size} exceeds the run's held-out split (data.eval_size={held_out}): a larger embedded "
            f"split holds problems the run may have trained on; use problems<={held_out}"
        )
    examples = load_source(cfg.data, size=size, task_seed=task_seed,
                           dev_size=data_cfg.get("dev_size", DataConfig.dev_size))  # fmt: skip
    examples = examples[: cfg.problems] if cfg.problems else examples
    if cfg.dev_problems >= len(examples):
        raise ValueError(
            f"dev_problems={cfg.dev_problems} leaves no test problem of the {len(examples)} in {cfg.data}"
        )
    dev = set(random.Random(cfg.seed).sample(range(len(examples)), cfg.dev_problems))
    seed_everything(cfg.seed)
    device = inference_device(cfg.cpu)
    tok = load_tokenizer(policy)
    model = load_model(policy, cfg.dtype, device=device).to(device).eval()
    prompts = [example_prompt(template, ex, tok) for ex in examples]
    # the pairs the run scored (flow.allow_mode_mismatch lets them differ from the flow's record), else the flow's
    pairing = (
        tuple(run_cfg.get("flow", {}).get("modes", m.modes)),
        run_cfg.get("flow", {}).get("shift", m.shift),
    )
    records, seconds = sample_and_score(cfg, model, tok, bundle, prompts, tuple(timesteps), pairing, device)
    with Verifier(num_workers=1) as verifier:
        flat = verifier.verify_batch([s["completion"] for r in records for s in r],
                                     [ex.answer for ex in examples for _ in range(cfg.n)])  # fmt: skip
    for i, samples in enumerate(records):
        for j, s in enumerate(samples):
            s |= {"answer": answer_key(s["completion"]), "correct": flat[i * cfg.n + j] >= 1.0}
    problems = [[Sample(s["answer"], s["correct"], {k: s[k] for k in SCORES}) for s in r] for r in records]
    result = analyse(
        cfg, problems, dev, policy, str(flow_dir), [[s["response_tokens"] for s in r] for r in records]
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dataclasses.replace(result, seconds={k: round(v, 3) for k, v in seconds.items()})
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    rules = result.rules
    rows = []
    for i, ex in enumerate(examples):
        picks = {r: choose(problems[i], r, cfg.combine_with, cfg.combine_weight) for r in rules}
        rows.append({"index": i, "split": "dev" if i in dev else "test", "id": ex.id, "problem": ex.problem,
                     "answer": ex.answer, "samples": records[i], "choice": picks,
                     "correct": {r: int(k is not None and problems[i][k].correct) for r, k in picks.items()}})  # fmt: skip
    (out / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split in result.accuracy:
        name = "accuracy_vs_n.png" if split == "test" else f"accuracy_vs_n_{split}.png"
        plot_selection(result.accuracy[split], result.pass_at[split],
                       f"{split}: {result.problems[split]} problems, N samples each", out / name)  # fmt: skip
    (out / "report.md").write_text(render_report(result))
    print((out / "report.md").read_text())
    return result


def sample_and_score(cfg: SelectConfig, model, tok, bundle: FlowBundle, prompts, timesteps, pairing, device):
    """-> (per problem: ``n`` sample records {completion, response_tokens, logp, flow_mean, flow_q}, seconds
    {"generate", "score"}); ``pairing``: (modes, shift) scored. Problems go to the sampler in chunks of about
    ``batch_size`` sequences."""
    meta, field, norm = bundle.meta, bundle.field.to(device).eval(), bundle.norm
    tap = LatentTap(model, meta.fractions)
    captured = cfg.scoring == "captured"
    sampler = build_sampler("hf", tok, model=model, device=device, batch_size=cfg.batch_size,
                            capture=tap if captured else None)  # fmt: skip
    params = SamplingParams(
        n=cfg.n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
    )
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the flow's noise
    records, seconds = [], {"generate": 0.0, "score": 0.0}
    per_call = max(1, cfg.batch_size // cfg.n)
    bar = tqdm(total=len(prompts), desc="sampling and scoring", unit="problem", disable=not cfg.progress)
    try:
        for c0 in range(0, len(prompts), per_call):
            t0 = time.perf_counter()
            if captured:
                ro = sampler.generate(prompts[c0 : c0 + per_call], params)
            else:
                with tap.paused():
                    ro = sampler.generate(prompts[c0 : c0 + per_call], params)
            t1 = time.perf_counter()
            ro = ro.to(device)
            mask, context = ro.response_mask, ro.attention_mask.bool()
            if captured:
                lat, logp = ro.captured.latents, ro.captured.logp
            else:
                with torch.no_grad():
                    logp, _ = policy_forward(model, ro.input_ids, ro.attention_mask, mask, need_entropy=False)
                lat = tap.latents()
            lat = lat if norm is None else norm(lat)
            sc = token_scores(field, lat, tap.layer_values.to(device), mask, *pairing,
                              timesteps, generator=gen, context_mask=context)  # fmt: skip
            dev_mean, dev_q = sequence_scores(sc.scores, sc.valid, cfg.flow_quantile)
            mean_logp = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
            seconds["generate"] += t1 - t0
            seconds["score"] += time.perf_counter() - t1
            lens = ro.response_lengths.tolist()
            for g in range(len(ro.completions) // cfg.n):
                rows = range(g * cfg.n, (g + 1) * cfg.n)
                records.append(fill_missing([{"completion": ro.completions[i], "response_tokens": int(lens[i]),
                                              "logp": float(mean_logp[i]), "flow_mean": -float(dev_mean[i]),
                                              "flow_q": -float(dev_q[i])} for i in rows]))  # fmt: skip
            bar.update(len(ro.completions) // cfg.n)
    finally:
        bar.close()
        tap.remove()
    return records, seconds


def fill_missing(samples: list[dict]) -> list[dict]:
    """A flow score that is NaN (a response without a scored token) becomes its problem's lowest (module docstring)."""
    for key in ("flow_mean", "flow_q"):
        finite = [s[key] for s in samples if not math.isnan(s[key])]
        for s in samples:
            if math.isnan(s[key]):
                s[key] = min(finite) if finite else 0.0
    return samples


def _paired(a: list[float], b: list[float], iters: int, seed: int) -> dict:
    d = paired_bootstrap(a, b, iters=iters, seed=seed)
    return {"diff": d.mean, "lo": d.lo, "hi": d.hi, "n": d.n}


def analyse(cfg: SelectConfig, problems: list[list[Sample]], dev: set[int], policy: str, flow: str,
            lengths: list[list[int]]) -> SelectResult:  # fmt: skip
    """Accuracy against N per split and rule, pass@N, the paired comparisons on test, the primary comparison
    and the separation statistics (``SelectResult``; ``seconds`` left empty)."""
    rules, ns = rule_names(), powers_of_two(cfg.n)
    ns = ns if ns[-1] == cfg.n else [*ns, cfg.n]
    flow_rules = [r for r in rules if is_flow_rule(r)]
    splits = {"dev": [p for i, p in enumerate(problems) if i in dev]} if dev else {}
    splits["test"] = [p for i, p in enumerate(problems) if i not in dev]
    per_problem = {s: accuracy_at(ps, rules, ns, cfg.subset_draws, cfg.seed, cfg.combine_with, cfg.combine_weight)
                   for s, ps in splits.items()}  # fmt: skip
    accuracy = {s: {r: {str(n): sum(v) / len(v) for n, v in acc.items()} for r, acc in per.items()}
                for s, per in per_problem.items()}  # fmt: skip
    ceiling = {s: {str(n): sum(v) / len(v) for n, v in pass_at(ps, ns).items()} for s, ps in splits.items()}
    test = {r: per_problem["test"][r][cfg.n] for r in rules}
    paired = {f"{r} - {ref}": _paired(test[r], test[ref], cfg.bootstrap, cfg.seed)
              for ref in ("majority", "best:logp") for r in rules if r != ref}  # fmt: skip
    primary = None
    if dev:
        best = max(flow_rules, key=lambda r: (accuracy["dev"][r][str(cfg.n)], -flow_rules.index(r)))
        primary = {"rule": best, "dev_accuracy": accuracy["dev"][best][str(cfg.n)],
                   "test_accuracy": accuracy["test"][best][str(cfg.n)],
                   "vs_majority": paired[f"{best} - majority"], "vs_best_logp": paired[f"{best} - best:logp"]}  # fmt: skip
    return SelectResult(config=to_dict(cfg), policy=policy, flow=flow, n=cfg.n, ns=ns,
                        problems={s: len(ps) for s, ps in splits.items()}, rules=rules, flow_rules=flow_rules,
                        accuracy=accuracy, pass_at=ceiling, paired={"test": paired}, primary=primary,
                        separation=separation(problems, lengths, cfg.seed), seconds={})  # fmt: skip


def separation(problems: list[list[Sample]], lengths: list[list[int]], seed: int) -> dict:
    """How well each score tells correct from wrong samples over all problems: pooled AUROC and within problems
    (``GroupMean``); and the correlation of the mean deviation with response length, pooled and within problems."""
    flat = [s for p in problems for s in p]
    groups = [i for i, p in enumerate(problems) for _ in p]
    ok = [s.correct for s in flat]
    out = {k: {"auroc": auroc([s.scores[k] for s in flat], ok),
               "auroc_within": within_group_auroc([s.scores[k] for s in flat], ok, groups, seed=seed).to_dict()}
           for k in SCORES}  # fmt: skip
    dev, length = [-s.scores["flow_mean"] for s in flat], [float(x) for p in lengths for x in p]
    out["length_corr"] = {"pooled": pearson(dev, length),
                          "within": within_group_pearson(dev, length, groups, seed=seed).to_dict()}  # fmt: skip
    return out


def render_report(result: SelectResult) -> str:
    """``report.md``: accuracy against N per split, the paired comparisons and the primary one, the separation."""
    c, n = result.config, result.n
    lines = [f"# rlfr select: {n} samples per problem", "",
             f"Policy `{result.policy}`, flow `{result.flow}`; data `{c['data']}`, temperature {c['temperature']}, "
             f"scoring {c['scoring']}; scores standardised within a problem's samples, combined = z(logp) + "
             f"{c['combine_weight']} z({c['combine_with']}); accuracy at N < {n} averaged over the N-subsets of each "
             f"problem's samples (all, or {c['subset_draws']} random ones where there are more).", ""]  # fmt: skip
    for split, acc in result.accuracy.items():
        lines += [f"## {split} ({result.problems[split]} problems): accuracy (%) against N", "",
                  "| rule | " + " | ".join(f"N={k}" for k in result.ns) + " |", "|---|" + "---|" * len(result.ns),
                  "| pass@N (ceiling) | " + " | ".join(f"{100 * result.pass_at[split][str(k)]:.1f}" for k in result.ns) + " |"]  # fmt: skip
        lines += [
            f"| {r} | " + " | ".join(f"{100 * a[str(k)]:.1f}" for k in result.ns) + " |"
            for r, a in acc.items()
        ]
        lines.append("")
    paired = result.paired["test"]
    lines += [f"Paired on the test problems at N = {n} (percentage points, bootstrap 95 % interval over problems):", "",
              "| rule | minus majority | minus best:logp |", "|---|---|---|"]  # fmt: skip
    for r in result.rules:
        cells = [
            format_diff(paired[f"{r} - {ref}"]) if f"{r} - {ref}" in paired else "-"
            for ref in ("majority", "best:logp")
        ]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines.append("")
    if (p := result.primary) is not None:
        lines += [f"**Primary comparison**: the flow-including rule with the best dev accuracy at N = "
                  f"{n}, `{p['rule']}` ({100 * p['dev_accuracy']:.1f} % on dev), on test {100 * p['test_accuracy']:.1f} %: "
                  f"minus majority voting {format_diff(p['vs_majority'])}, minus best-of-N by log-prob "
                  f"{format_diff(p['vs_best_logp'])}.", ""]  # fmt: skip
    sep = result.separation
    lines += ["Separation of correct and wrong samples (all problems; within problems: per problem with both classes, "
              "averaged, bootstrap 95 % interval over problems):", "", "| score | AUROC pooled | AUROC within problems |",
              "|---|---|---|"]  # fmt: skip
    for k in SCORES:
        pooled = "n/a" if sep[k]["auroc"] is None else f"{sep[k]['auroc']:.3f}"
        lines.append(f"| {k} | {pooled} | {within_text(sep[k]['auroc_within'])} |")
    lc, w = sep["length_corr"], sep["length_corr"]["within"]
    pooled = "n/a" if lc["pooled"] is None else f"{lc['pooled']:+.2f}"
    within = "n/a" if w["mean"] is None else f"{w['mean']:+.2f} ({w['groups']} problems)"
    lines += ["", f"Mean deviation against response length: r pooled {pooled}, within problems {within}.", ""]
    sec = result.seconds
    if sec.get("generate"):
        lines += [f"Seconds: generating {sec['generate']:.1f}, scoring {sec['score']:.1f} "
                  f"({sec['score'] / sec['generate']:.2f} of the generation time).", ""]  # fmt: skip
    return "\n".join(lines)
