"""``rlfr inspect``: which tokens does the flow reward or penalise? An HTML page and ``stats.json``.

    rlfr inspect checkpoint=runs/demo/rl            # a run dir (latest checkpoint) or a checkpoint dir
    rlfr inspect model=runs/sft/model flow=runs/flow/flow data=embedded n_prompts=8

Samples ``num_generations`` responses for each of ``n_prompts`` problems, runs the policy once over
every rollout with a ``LatentTap`` at the flow's own block fractions (``latents.json``: fractions, modes,
shift, and ``latent_norm``: latents standardised with the flow's ``latent_norm.safetensors`` when set; with
``--checkpoint``, the modes and shift the run scored with, which ``flow.allow_mode_mismatch`` lets differ),
stopping each forward after the deepest hooked block,
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
correct rollout has a lower mean deviation than a wrong one (ties 1/2); n/a with only one class.
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
from rlfr.policy.forward import model_inputs
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import load_model, load_tokenizer
from rlfr.policy.rollout import generate
from rlfr.policy.vision import images_of
from rlfr.reward.verifier import Verifier
from rlfr.runtime import checkpoint as ckpt_io
from rlfr.runtime.env import inference_device, seed_everything
from rlfr.schema import DataConfig, RewardShapingConfig
from rlfr.stats import auroc, token_reward_stats


def resolve_inputs(cfg: InspectConfig) -> tuple[str, Path, dict]:
    """-> (policy path, flow dir, the run's TrainConfig dict or {})."""
    if cfg.checkpoint:
        if cfg.model or cfg.flow:
            raise ValueError("give either checkpoint=DIR or model=MODEL with flow=DIR, not both")
        ck = ckpt_io.resolve_checkpoint(cfg.checkpoint)  # a checkpoint or a run directory (its latest)
        for sub in ("policy", "flow"):
            if not (ck / sub).is_dir():
                raise FileNotFoundError(f"{ck} has no {sub}/ (need an RL checkpoint of method rlfr)")
        return str(ck / "policy"), ckpt_io.flow_dir(ck), ckpt_io.load_state(ck).get("config", {})
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
        rows = []
        for c0 in range(0, ro.input_ids.shape[0], 8):
            sl = slice(c0, c0 + 8)
            ids, att, mask = (
                ro.input_ids[sl].to(device),
                ro.attention_mask[sl].to(device),
                ro.response_mask[sl].to(device),
            )
            vision = None if ro.vision is None else ro.vision.select(sl).to(device)
            with torch.no_grad(), tap.latents_only():  # the latents only: no later block, no logits
                model(**model_inputs(ids, att, vision), use_cache=False)
            lat = tap.latents() if norm is None else norm(tap.latents())
            sc = token_scores(
                field,
                lat,
                tap.layer_values.to(device),
                mask,
                pairing["modes"],
                pairing["shift"],
                shaping["timesteps"],
                generator=gen,
                context_mask=att.bool(),
            )
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
                "answer": examples[g].answer,
                "prompt": prompts[g],
                "completion": ro.completions[i],
                "correct": correct[i],
                "mean_deviation": sum(scored) / len(scored) if scored else None,
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
    auc = stats.auroc
    print(
        f"{len(rollouts)} rollouts, {stats.scored_tokens} scored tokens, accuracy {stats.accuracy:.3f}, "
        f"AUROC {'n/a' if auc is None else f'{auc:.3f}'}; wrote {out / 'inspect.html'} and {out / 'stats.json'}"
    )
    return result


def compute_stats(rollouts: list[dict], reward: str, min_count: int) -> FlowTokenStats:
    toks = [t for r in rollouts for t in r["tokens"] if t["valid"]]
    scored = [r for r in rollouts if r["mean_deviation"] is not None]
    # lower deviation should mean correct: score = -mean deviation, positive class = correct
    auc = auroc([-r["mean_deviation"] for r in scored], [r["correct"] for r in scored]) if scored else None
    return FlowTokenStats(
        rollouts=len(rollouts),
        accuracy=sum(r["correct"] for r in rollouts) / max(len(rollouts), 1),
        scored_tokens=len(toks),
        auroc=auc,
        tokens=token_reward_stats([t["text"] for t in toks], [t[reward] for t in toks], min_count=min_count),
    )


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
        f"AUROC of the sequence flow score (lower mean deviation = correct): <b>{_e(auc)}</b></p>",
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
