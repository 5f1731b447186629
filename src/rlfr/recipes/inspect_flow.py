"""``rlfr inspect``: which tokens does the flow reward or penalise? An HTML page and ``stats.json``.

    rlfr inspect checkpoint=runs/demo/rl            # a run dir (latest checkpoint) or a checkpoint dir
    rlfr inspect model=runs/sft/model flow=runs/flow/flow data=embedded n_prompts=8

Samples ``num_generations`` responses for each of ``n_prompts`` problems, runs the policy once over
every rollout with a ``LatentTap`` at the flow's own block fractions (``latents.json``: fractions, modes,
shift, and ``latent_norm``: latents standardised with the flow's ``latent_norm.safetensors`` when set; with
``checkpoint=``, the modes and shift the run scored with, which ``flow.allow_mode_mismatch`` lets differ),
a whole forward (not ``LatentTap.latents_only``: the log-prob baseline below needs the logits), then
scores each response token with ``rlfr.flow.token_scores`` and writes ``OUT/inspect.html``
(self-contained: inline CSS, no script, no external resource; all model and data text is escaped),
``OUT/rollouts.jsonl`` (every rollout with its tokens) and ``OUT/stats.json``
(``rlfr.eval.results.InspectResult``, also what ``run_inspect`` returns).

Token rewards. ``reward=dense`` (default) colours every scored token by -beta * (2x - 1), x = the
per-sequence min-max normalised deviation: the bilateral reward before the eta threshold and top-k, so
every token's position relative to the flow is visible. ``reward=shaped`` uses exactly the run's
shaping (``rlfr.flow.shaping.shape_flow_rewards``: sparse, and never positive unless bilateral). Shaping
parameters and rewarding timesteps come from the checkpoint's config (defaults with ``model``/``flow``).

Sequence score: mean deviation over a rollout's scored tokens. The AUROC is the probability that a
correct rollout has a lower mean deviation than a wrong one (ties 1/2); n/a with only one class. It is given
twice: pooled over all rollouts, and within problems (``auroc_within``: per problem over the problems whose
rollouts hold both classes, averaged, with their count and a bootstrap 95 % interval over problems). GRPO only
compares rollouts of one problem, so the within-problem value is the signal that can shape RL; the pooled one
also credits a score for telling easy problems from hard ones. Beside them, as a baseline, the same two for the
mean token log-prob of the response under the policy (``logp_auroc``, higher = correct), and the correlation of
the sequence score with the response length (``length_corr``, pooled and within problems). Repeatability
(``repeatability``): the flow score is noisy (a fresh eps per token and rewarding timestep), so every rollout is
scored ``NOISE_DRAWS`` more times with independent noise (the policy's latents fixed): the correlation of two
independent k-draw means and the AUROCs of the k-draw mean, k = 1, 2, 4, 8. The displayed token scores come
from the first scoring, as before.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from rlfr.commands import InspectConfig
from rlfr.data.sources import GENERATED_SETS, load_source
from rlfr.data.templates import example_prompt
from rlfr.eval.results import FlowTokenStats, InspectResult
from rlfr.flow import token_scores
from rlfr.flow.shaping import minmax_normalize, shape_flow_rewards
from rlfr.flow.store import check_meta, load_flow, meta_for
from rlfr.group_stats import draw_repeatability, pearson, within_group_auroc, within_group_pearson
from rlfr.policy.forward import policy_forward
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.policy.rollout import generate
from rlfr.policy.vision import images_of
from rlfr.reward.verifier import Verifier
from rlfr.runtime import checkpoint as ckpt_io
from rlfr.runtime.env import inference_device, seed_everything
from rlfr.schema import DataConfig, RewardShapingConfig
from rlfr.stats import auroc, token_reward_stats

NOISE_DRAWS = 8  # extra scorings of every rollout with independent noise (the repeatability statistics)
BOOTSTRAP = 2000  # resamples of problems for the within-problem intervals


def resolve_inputs(cfg: InspectConfig) -> tuple[str, Path, dict]:
    """-> (policy path, flow dir, the run's TrainConfig dict or {})."""
    if cfg.checkpoint:
        if cfg.model or cfg.flow:
            raise ValueError("give either checkpoint=DIR or model=MODEL with flow=DIR, not both")
        policy, flow, config = ckpt_io.policy_and_flow(cfg.checkpoint)  # a checkpoint, or a run's latest
        return str(policy), flow, config
    if not (cfg.model and cfg.flow):
        raise ValueError("give checkpoint=DIR, or both model=MODEL and flow=DIR")
    return cfg.model, Path(cfg.flow), {}


def run(cfg: InspectConfig) -> int:
    run_inspect(cfg)
    return 0


def run_inspect(cfg: InspectConfig) -> InspectResult:
    """The whole command (module docstring) -> what ``OUT/stats.json`` holds."""
    policy_path, flow_dir, config = resolve_inputs(cfg)
    bundle = load_flow(flow_dir)  # checks the pairing convention and the statistics file
    meta = bundle.meta.to_json()
    shaping = {**RewardShapingConfig().__dict__, **config.get("flow", {}).get("reward", {})}
    # the pairs the run scored (flow.allow_mode_mismatch lets them differ from the flow's record), else the flow's
    pairing = {k: config.get("flow", {}).get(k, meta[k]) for k in ("modes", "shift")}
    data_cfg = config.get("data", {})
    template = cfg.template or data_cfg.get("template", "chat")
    size = data_cfg.get("eval_size", DataConfig.eval_size) if cfg.data in GENERATED_SETS else 0
    examples = load_source(cfg.data, size=size, task_seed=cfg.seed)[: cfg.n_prompts]
    seed_everything(cfg.seed)
    device = inference_device(cfg.cpu)
    tok = load_tokenizer(
        policy_path, min_pixels=data_cfg.get("min_pixels"), max_pixels=data_cfg.get("max_pixels")
    )
    model = load_model(policy_path).to(device).eval()
    m = bundle.meta
    check_meta(m, meta_for(model, m.fractions, m.modes, m.shift, m.latent_norm), flow_dir)  # size and depth
    field = bundle.field.to(device).eval()
    norm = bundle.norm  # the flow scores latents standardised with its own statistics when trained so
    tap = LatentTap(model, meta["fractions"])
    prompts = [example_prompt(template, ex, tok) for ex in examples]
    try:
        with tap.paused():
            ro = generate(model, tok, prompts, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                          images=images_of(tok, examples))  # fmt: skip
        with Verifier(num_workers=1) as verifier:
            correct = [
                s >= 1.0
                for s in verifier.verify_batch(ro.completions, [examples[int(g)].answer for g in ro.group])
            ]
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        # the repeatability draws have their own noise, so the displayed scores are those of earlier versions
        gen_draws = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        rows, seq_logp, draws = [], [], []
        for c0 in range(0, ro.input_ids.shape[0], 8):
            sl = slice(c0, c0 + 8)
            ids, att, mask = (
                ro.input_ids[sl].to(device),
                ro.attention_mask[sl].to(device),
                ro.response_mask[sl].to(device),
            )
            vision = None if ro.vision is None else ro.vision.select(sl).to(device)
            # a whole forward (not tap.latents_only()): the log-prob baseline needs the logits
            with torch.no_grad():
                logp, _ = policy_forward(model, ids, att, mask, need_entropy=False, vision=vision)
            seq_logp += ((logp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
            lat = tap.latents() if norm is None else norm(tap.latents())
            inputs = (
                field,
                lat,
                tap.layer_values.to(device),
                mask,
                pairing["modes"],
                pairing["shift"],
                shaping["timesteps"],
            )
            sc = token_scores(*inputs, generator=gen, context_mask=att.bool())
            chunk_draws = []
            for _ in range(NOISE_DRAWS):
                d = token_scores(*inputs, generator=gen_draws, context_mask=att.bool())
                chunk_draws.append(((d.scores * d.valid).sum(1) / d.valid.sum(1).clamp(min=1)).tolist())
            draws += [list(per_row) for per_row in zip(*chunk_draws)]  # (rows, draws)
            x = minmax_normalize(sc.scores, sc.valid)
            spread = (x * sc.valid).amax(dim=1, keepdim=True) > 0  # rows without spread carry no reward
            dense = torch.where(sc.valid & spread, -shaping["beta"] * (2 * x - 1), 0.0)
            shaped = shape_flow_rewards(
                sc.scores,
                sc.valid,
                shaping["beta"],
                shaping["eta"],
                shaping["top_k"],
                shaping["bilateral"],
                shaping["gamma"],
            )
            for b in range(ids.shape[0]):
                pos = mask[b].nonzero().flatten().tolist()
                rows.append(
                    [
                        {
                            "text": tok.decode([int(ids[b, k])]),
                            "id": int(ids[b, k]),
                            "valid": bool(sc.valid[b, k]),
                            "score": float(sc.scores[b, k]),
                            "x": float(x[b, k]),
                            "dense": float(dense[b, k]),
                            "shaped": float(shaped[b, k]),
                        }
                        for k in pos
                    ]
                )
    finally:
        tap.remove()
    rollouts = []
    for i, toks in enumerate(rows):
        scored = [t["score"] for t in toks if t["valid"]]
        g = int(ro.group[i])
        rollouts.append(
            {
                "problem": examples[g].problem,
                "group": g,
                "answer": examples[g].answer,
                "prompt": prompts[g],
                "completion": ro.completions[i],
                "correct": correct[i],
                "mean_deviation": sum(scored) / len(scored) if scored else None,
                "mean_logp": seq_logp[i],
                "response_tokens": len(toks),
                "deviation_draws": draws[i] if scored else None,
                "tokens": toks,
            }
        )
    stats = compute_stats(rollouts, cfg.reward, cfg.min_count)
    result = InspectResult(
        stats=stats,
        policy=policy_path,
        flow=str(flow_dir),
        latents=meta,
        shaping=shaping,
        reward=cfg.reward,
        template=template,
        data=cfg.data,
        n_prompts=len(examples),
        num_generations=cfg.num_generations,
        temperature=cfg.temperature,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    (out / "inspect.html").write_text(render_html(rollouts, result))
    print(
        f"{len(rollouts)} rollouts, {stats.scored_tokens} scored tokens, accuracy {stats.accuracy:.3f}; "
        f"{separation_line(stats)}; wrote {out / 'inspect.html'} and {out / 'stats.json'}"
    )
    return result


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _within(w: dict | None) -> str:
    """'0.540 [0.450, 0.620] over 70 problems' from a ``GroupMean.to_dict``."""
    if not w or w["mean"] is None:
        return "n/a (no problem with both classes)"
    ci = "" if w["lo"] is None else f" [{w['lo']:.3f}, {w['hi']:.3f}]"
    return f"{w['mean']:.3f}{ci} over {w['groups']} problem{'s' if w['groups'] != 1 else ''}"


def separation_line(stats: FlowTokenStats) -> str:
    """One line: the flow's and the log-prob's AUROC, pooled and within problems."""
    return (f"flow AUROC pooled {_f(stats.auroc)}, within problems {_within(stats.auroc_within)}; "
            f"mean log-prob AUROC pooled {_f(stats.logp_auroc)}, within {_within(stats.logp_auroc_within)}")  # fmt: skip


def compute_stats(rollouts: list[dict], reward: str, min_count: int) -> FlowTokenStats:
    """The statistics of ``stats.json`` (module docstring) from the rollout records; rollouts are grouped by
    ``group`` (their problem; by problem text in records without one), and the log-prob, length and
    repeatability statistics need the keys this version writes (``mean_logp``, ``response_tokens``,
    ``deviation_draws``)."""
    toks = [t for r in rollouts for t in r["tokens"] if t["valid"]]
    scored = [r for r in rollouts if r["mean_deviation"] is not None]
    # lower deviation should mean correct: score = -mean deviation, positive class = correct
    flow = [-r["mean_deviation"] for r in scored]
    ok = [r["correct"] for r in scored]
    groups = [r.get("group", r["problem"]) for r in scored]
    out = dict(
        rollouts=len(rollouts),
        accuracy=sum(r["correct"] for r in rollouts) / max(len(rollouts), 1),
        scored_tokens=len(toks),
        auroc=auroc(flow, ok) if scored else None,
        tokens=token_reward_stats([t["text"] for t in toks], [t[reward] for t in toks], min_count=min_count),
        auroc_within=within_group_auroc(flow, ok, groups, BOOTSTRAP).to_dict(),
    )
    if scored and all("mean_logp" in r for r in scored):
        logp = [r["mean_logp"] for r in scored]
        out |= {
            "logp_auroc": auroc(logp, ok),
            "logp_auroc_within": within_group_auroc(logp, ok, groups, BOOTSTRAP).to_dict(),
        }
    if scored and all("response_tokens" in r for r in scored):
        dev, length = [-v for v in flow], [float(r["response_tokens"]) for r in scored]
        out["length_corr"] = {"pooled": pearson(dev, length),
                              "within": within_group_pearson(dev, length, groups, BOOTSTRAP).to_dict()}  # fmt: skip
    if scored and all(r.get("deviation_draws") for r in scored):
        draws = [[-r["deviation_draws"][j] for r in scored] for j in range(len(scored[0]["deviation_draws"]))]
        out["repeatability"] = {
            "draws": len(draws),
            "by_draws": draw_repeatability(draws, ok, groups, iters=BOOTSTRAP),
        }
    return FlowTokenStats(**out)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
pre,.resp{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:13px}
.tok{background:var(--r);border-radius:2px}
#by-dev:checked ~ main .tok{background:var(--d)}
.roll{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ok{color:#1a7f37}.bad{color:#cf222e}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
"""


def _color(v: float, scale: float, diverging: bool = True) -> str:
    a = min(1.0, abs(v) / scale) * 0.75 if scale > 0 else 0.0
    if not diverging:  # deviation: white -> orange
        return f"rgba(230,120,0,{a:.3f})"
    return f"rgba(0,160,60,{a:.3f})" if v > 0 else f"rgba(220,30,30,{a:.3f})"


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return (
            f"{v:.4g}"
            if isinstance(v, float)
            else ("n/a" if v is None else _e(repr(v) if isinstance(v, str) else v))
        )

    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def separation_html(stats: FlowTokenStats) -> list[str]:
    """The separation table (flow and log-prob AUROC, pooled and within problems), the length correlation and the
    repeatability table; nothing for what the statistics lack."""
    out = ["<h2>Separation of correct and wrong rollouts</h2>",
           "<p>GRPO compares the rollouts of one problem only: the AUROC <i>within problems</i> (per problem with both "
           "correct and wrong rollouts, averaged; 95 % bootstrap interval over problems) is the signal that can shape "
           "RL. The pooled AUROC also credits telling easy problems from hard ones. The mean token log-prob is the "
           "baseline.</p>",
           "<table><tr><th>score</th><th>pooled</th><th>within problems</th></tr>",
           f"<tr><td>flow (-mean deviation)</td><td>{_e(_f(stats.auroc))}</td><td>{_e(_within(stats.auroc_within))}</td></tr>"]  # fmt: skip
    if stats.logp_auroc_within is not None:
        out.append(f"<tr><td>mean token log-prob</td><td>{_e(_f(stats.logp_auroc))}</td>"
                   f"<td>{_e(_within(stats.logp_auroc_within))}</td></tr>")  # fmt: skip
    out.append("</table>")
    if (lc := stats.length_corr) is not None:
        w = lc["within"]
        within = "n/a" if w["mean"] is None else f"{w['mean']:+.2f} over {w['groups']} problems"
        out.append(f"<p>Correlation of the mean deviation with the response length: pooled {_e(_f(lc['pooled'], '{:+.2f}'))}, "
                   f"within problems {_e(within)}.</p>")  # fmt: skip
    if (rep := stats.repeatability) is not None:
        out += [f"<h3>Repeatability across noise draws ({rep['draws']} extra scorings, latents fixed)</h3>",
                "<table><tr><th>draws averaged</th><th>r of two independent means</th><th>AUROC pooled</th>"
                "<th>AUROC within problems</th></tr>"]  # fmt: skip
        for row in rep["by_draws"]:
            out.append(f"<tr><td>{row['k']}</td><td>{_e(_f(row['r']))}</td><td>{_e(_f(row['auroc']))}</td>"
                       f"<td>{_e(_within(row['auroc_within']))}</td></tr>")  # fmt: skip
        out.append("</table>")
    return out


def render_html(rollouts: list[dict], result: InspectResult) -> str:
    """A self-contained page: inline CSS only, every piece of text escaped."""
    reward, stats = result.reward, result.stats
    vals = [t[reward] for r in rollouts for t in r["tokens"] if t["valid"]]
    devs = [t["score"] for r in rollouts for t in r["tokens"] if t["valid"]]
    rscale, dscale = max((abs(v) for v in vals), default=0.0), max(devs, default=0.0)
    ts = stats.tokens
    auc = "n/a (one class)" if stats.auroc is None else f"{stats.auroc:.3f}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlfr inspect</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Flow rewards per token</h1>",
        f"<p>policy <code>{_e(result.policy)}</code>, flow <code>{_e(result.flow)}</code>; "
        f"latents {_e(json.dumps(result.latents))}; reward shown: <b>{_e(reward)}</b> "
        f"(beta {_e(result.shaping['beta'])}). Red = penalised, green = rewarded; hover a token for its reward, "
        "normalised deviation x and raw deviation score.</p>",
        f"<p>{stats.rollouts} rollouts, accuracy {stats.accuracy:.3f}, {stats.scored_tokens} scored tokens. "
        f"AUROC of the sequence flow score (lower mean deviation = correct), pooled over rollouts: <b>{_e(auc)}</b>; "
        f"within problems: <b>{_e(_within(stats.auroc_within))}</b></p>",
        *separation_html(stats),
        "<input type='radio' name='m' id='by-rew' checked><label for='by-rew'>colour by reward</label> "
        "<input type='radio' name='m' id='by-dev'><label for='by-dev'>colour by raw deviation</label>",
        "<main>",
    ]
    for i, r in enumerate(rollouts):
        spans = []
        for t in r["tokens"]:
            if not t["valid"]:
                spans.append(f"<span title='not scored'>{_e(t['text'])}</span>")
                continue
            tip = (
                f"reward {t[reward]:+.5f} | x {t['x']:.3f} | deviation {t['score']:.4f} | token {t['text']!r}"
            )
            style = f"--r:{_color(t[reward], rscale)};--d:{_color(t['score'], dscale, diverging=False)}"
            spans.append(f"<span class='tok' style='{style}' title='{_e(tip)}'>{_e(t['text'])}</span>")
        dev = "n/a" if r["mean_deviation"] is None else f"{r['mean_deviation']:.4f}"
        verdict = "<span class='ok'>correct</span>" if r["correct"] else "<span class='bad'>wrong</span>"
        parts.append(
            f"<div class='roll'><b>#{i}</b> {verdict} &middot; answer <code>{_e(r['answer'])}</code> &middot; "
            f"mean deviation {dev}<details><summary>prompt</summary><pre>{_e(r['prompt'])}</pre></details>"
            f"<div class='resp'>{''.join(spans)}</div></div>"
        )
    cols = ["token", "count", "mean", "std", "min", "max"]
    parts += [
        "<h2>Statistics</h2>",
        f"<h3>Most rewarded tokens (mean {_e(reward)} reward, seen &ge; {ts['min_count']} times)</h3>",
        _table(ts["rewarded"], cols),
        "<h3>Most penalised tokens</h3>",
        _table(ts["penalised"], cols),
        "<h3>Reward by token class</h3>",
        _table(
            [{"class": c, **v} for c, v in ts["by_class"].items()],
            ["class", "count", "mean", "penalised", "rewarded"],
        ),
        "<h3>Same token, different contexts (most frequent tokens)</h3>",
        _table(ts["spread"], cols),
        "</main></body></html>",
    ]
    return "\n".join(parts)
