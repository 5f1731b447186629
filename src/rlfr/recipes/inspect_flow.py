"""``rlfr inspect``: which tokens does the flow reward or penalise? An HTML page and ``stats.json``.

    rlfr inspect checkpoint=runs/demo/rl            # a run dir (latest checkpoint) or a checkpoint dir
    rlfr inspect model=runs/sft/model flow=runs/flow/flow data=embedded n_prompts=8

Samples ``num_generations`` responses for each of ``n_prompts`` problems, runs the policy once over
every rollout with a ``LatentTap`` at the flow's own block fractions (``latents.json``: fractions, modes,
shift, and ``latent_norm``: latents standardised with the flow's ``latent_norm.safetensors`` when set; with
``checkpoint=``, the modes and shift the run scored with, which ``flow.allow_mode_mismatch`` lets differ),
a whole forward (not ``LatentTap.latents_only``: the log-prob baseline below needs the logits), then
scores each response token with ``rlfr.flow.token_scores`` and writes ``OUT/inspect.html``
(``rlfr.eval.inspect_page``: self-contained, all model and data text escaped),
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

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlfr.commands import InspectConfig
from rlfr.data.sources import GENERATED_SETS, load_source
from rlfr.data.templates import example_prompt
from rlfr.eval.inspect_page import render_html, separation_line
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
    # the run's problem split (its held-out problems are the ones its training left out); seed draws the samples
    task_seed = data_cfg.get("task_seed", DataConfig.task_seed)
    examples = load_source(cfg.data, size=size, task_seed=task_seed)[: cfg.n_prompts]
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
                          images=images_of(tok, examples), progress="sampling" if cfg.progress else None)  # fmt: skip
        with Verifier(num_workers=1) as verifier:
            correct = [
                s >= 1.0
                for s in verifier.verify_batch(ro.completions, [examples[int(g)].answer for g in ro.group])
            ]
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        # the repeatability draws have their own noise, so the displayed scores are those of earlier versions
        gen_draws = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        rows, seq_logp, draws = [], [], []
        chunks = range(0, ro.input_ids.shape[0], 8)
        for c0 in tqdm(chunks, desc="scoring", unit="batch", disable=not cfg.progress, leave=False):
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
