"""``rlfr compare``: base vs RLVR vs RLFR vs entropy shaping (and ablations), same start, same budget, seeds.

    rlfr compare start=runs/demo/sft/model flow=runs/demo/flow_pretrain/flow seeds=[0,1,2] train.steps=48 \\
        eval_sets=[embedded,embedded-transfer:200] eval_samples=4 \\
        'ablations=[beta0.05 rlfr flow.reward.beta=0.05, frozen rlfr flow.update=false]' \\
        train.rollout.prompts_per_step=8 train.save_every=8

Every RL run gets the same ``TrainConfig`` (the ``train`` section: defaults, then ``--config`` files, then the
``train.*`` words) with only ``method``, ``seed``, ``out_dir`` and ``model.name_or_path`` (= ``start``)
changed (RLFR also gets ``flow.init=<flow>`` when ``flow`` is set; without it the rlfr arms need
``train.flow.init``, ``random`` for a flow trained from scratch); an ablation adds its own overrides and runs
on ``ablation_seeds``. "base" is the start model without RL. Every run sees the same problems (the embedded
split depends on ``data.task_seed``, not on the run seed).

Evaluation, per run and eval set (``eval_sets``: ``auto`` (the runs' ``data.eval``: the embedded split when
they train on the embedded task, else the rows held out of their ``data.train``), ``embedded``,
``embedded-dev``, ``embedded-transfer``, a benchmark or a file, each optionally ``:N`` problems; default
``data.eval_size``): greedy pass@1 and, with ``eval_samples=K``, the mean accuracy of K samples at temperature 1 (avg@K), with the correctness of every
problem kept, so that methods are compared problem by problem: a paired bootstrap 95 % interval of the
difference of seed-averaged per-problem accuracy (``rlfr.stats.paired_bootstrap``), and McNemar's exact
test per seed on greedy correctness (``rlfr.stats.mcnemar``). Pairs: every arm against RLVR and against
the start model, and an ablation against the method it changes (``frozen - rlfr``), on the seeds both ran.

Outputs in ``out``: ``results.json`` (``rlfr.eval.results.CompareResult``, also what ``run_compare``
returns), ``report.md`` (tables, paired statistics, a training-signals table per
arm: reward, outcome and flow advantage sizes, flow AUROC, KL, entropy, length; budget, command),
``learning_curves.png`` (training reward and the flow's statistics per step, mean over seeds),
``accuracy.png`` and ``paired.png`` (every paired difference with its interval). Interruptions lose little:
a finished run (``compare_result.json``: ``RunResult``, with the same config) and a finished evaluation
(``eval_<set>.json``: ``ModelEval``) are reused, an interrupted run resumes from its latest checkpoint (``save_every`` sets how often one is
written), and an interrupted evaluation from its last finished chunk of generation batches
(``eval_<set>.partial.json``), with the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rlfr.commands import CompareConfig
from rlfr.config import from_dict, merge_dicts, overrides_from, parse_overrides, to_dict
from rlfr.data.sources import auto_eval, fields_of, load_source, resolve_data
from rlfr.errors import ConfigError, RlfrError
from rlfr.eval.plots import plot_accuracy, plot_curves, plot_paired
from rlfr.eval.progress import EvalProgress
from rlfr.eval.results import CompareResult, ModelEval, RunResult
from rlfr.eval.scoring import held_out_scores
from rlfr.policy.loading import load_model, load_tokenizer, resolve_dtype
from rlfr.recipes.train import run_train
from rlfr.reward.verifier import Verifier
from rlfr.runtime.checkpoint import atomic_write_text, checkpoint_root, find_checkpoint
from rlfr.runtime.env import inference_device
from rlfr.runtime.metrics import read_metrics
from rlfr.schema import TrainConfig, canonical, normalized, require_flow_init
from rlfr.stats import compare_arms, format_diff, format_mean_std, mean_std

METHODS = ("rlvr", "rlfr", "entropy")
CURVE_KEYS = (
    "reward",
    "flow_reward/mean",
    "flow_reward/nonzero_frac",
    "flow_score/auroc",
    "flow_score/auroc_within",
    "logp/auroc",
    "logp/auroc_within",
    "flow_score/len_corr_within",
    "flow/loss_correct",
    "flow/loss_wrong",
    "adv/outcome_abs",
    "adv/flow_abs",
    "response_len",
    "policy/kl",
    "policy/entropy",
    "time/step",
)


def command_line(cfg: CompareConfig) -> str:
    """The command that reruns the study: its settings that differ from the defaults, as key=value words."""
    return shlex.join(["rlfr", "compare", *overrides_from(cfg, CompareConfig())])


def arms(cfg: CompareConfig) -> dict[str, tuple[str, list[str], list[int]]]:
    """name -> (method, extra overrides, seeds): the methods, then the ablations."""
    out = {m: (m, [], list(cfg.seeds)) for m in cfg.methods}
    for spec in cfg.ablations:
        words = shlex.split(spec)
        if len(words) < 2 or words[1] not in METHODS:
            raise ConfigError(
                f"ablations: {spec!r}: expected 'NAME METHOD [key=value ...]', METHOD in {METHODS}"
            )
        name, method, *extra = words
        if name in out or name == "base":
            raise ConfigError(f"ablations: the name {name!r} is already used")
        out[name] = (method, extra, list(cfg.ablation_seeds))
    return out


def run_config(cfg: CompareConfig, method: str, seed: int, name: str | None = None, extra=()) -> TrainConfig:
    """The ``TrainConfig`` of one run: the ``train`` section, an ablation's ``extra`` overrides, then the run's
    own method, seed, out_dir, start model and (rlfr, unless the ablation sets it) flow."""
    if not cfg.start:
        raise ConfigError("rlfr compare needs start=MODEL (the start model of every run)")
    run = [f"model.name_or_path={cfg.start}", f"method={method}", f"seed={seed}",
           f"out_dir={Path(cfg.out) / (name or method) / f'seed_{seed}'}"]  # fmt: skip
    if method == "rlfr" and cfg.flow and not any(o.startswith("flow.init=") for o in extra):
        run.append(f"flow.init={cfg.flow}")
    data = merge_dicts(merge_dicts(to_dict(cfg.train), parse_overrides(extra)), parse_overrides(run))
    try:
        out = from_dict(TrainConfig, data)
        require_flow_init(out)
    except ConfigError as e:
        raise ConfigError(
            f"rlfr compare, arm {name or method}: {e}"
            + (" (flow=DIR gives every rlfr arm one)" if "flow.init" in str(e) else "")
        ) from e
    return out


def _cached(path: Path, config: dict, normalize=None) -> dict | None:
    """The saved result at ``path`` when it was made with ``config``; ``normalize`` maps the saved config to
    how this version reads it (so that fields added later with their defaults do not invalidate it)."""
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RlfrError(f"{path} is not valid JSON ({e}); delete it and rerun to redo that step") from e
        if not isinstance(saved, dict):
            raise RlfrError(f"{path} is not a saved result (a JSON object); delete it and rerun that step")
        got = saved.get("config")
        if normalize is not None and isinstance(got, dict):
            got = normalize(got)
        if got == config:
            return saved
    return None


EVAL_MODEL_FIELDS = ("dtype", "trust_remote_code")  # the ModelConfig fields that loading for evaluation uses


def _eval_key_as_now(saved: dict) -> dict:
    """A saved evaluation key as this version writes it: its model settings cut to ``EVAL_MODEL_FIELDS``
    (older versions saved the whole ModelConfig, whose other fields do not change an evaluation), its dtype
    resolved (``auto``: what it means on this machine)."""
    if isinstance(saved.get("model_cfg"), dict):
        model = {k: saved["model_cfg"].get(k) for k in EVAL_MODEL_FIELDS}
        if model.get("dtype") == "auto":
            model["dtype"] = resolve_dtype("auto", inference_device(False))
        saved = saved | {"model_cfg": model}
    return saved


def parse_eval_set(spec: str, default_size: int) -> tuple[str, str, int]:
    """'NAME' or 'NAME:N' -> (slug, name, size); NAME may hold a colon itself (``benchmark:math500:100``)."""
    m = re.fullmatch(r"(.+):(-?\d+)", spec)
    name, size = (m[1], m[2]) if m else (spec, "")
    n = int(size) if size else default_size
    if n < 0:
        raise ValueError(f"eval_sets: {spec}: the size must be >= 0")
    base = Path(name).stem if Path(name).suffix else name.removeprefix("benchmark:")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) + (f"-{n}" if size else "")
    return slug, name, n


def load_eval_examples(name: str, size: int, cfg):
    d = cfg.data
    return load_source(
        name, fields_of(d), size, d.task_seed, d.dev_size, subset=d.subset, split=d.eval_split or d.split
    )


def eval_set(spec: str, cfg: TrainConfig) -> tuple[str, str, list]:
    """(slug, what it is, examples) of one ``eval_sets`` entry for runs of ``cfg``; ``auto`` is their
    ``data.eval``: a named set, or the rows held out of their ``data.train`` (slug ``heldout``)."""
    name, colon, size = spec.partition(":")
    if name == "auto":
        name = cfg.data.eval if cfg.data.eval != "auto" else auto_eval(cfg.data.train)
        if name is None:  # every run holds out the same rows of its training data (data.task_seed)
            rows = resolve_data(cfg.data)[1]
            n = int(size) if size else len(rows)
            return "heldout" + (f"-{n}" if size else ""), f"{cfg.data.train} (held out)", rows[:n]
        spec = name + colon + size
    slug, name, n = parse_eval_set(spec, cfg.data.eval_size)
    return slug, name, load_eval_examples(name, n, cfg)


def evaluate_model(
    model_dir: str,
    cfg,
    examples,
    samples: int,
    path: Path,
    verifier,
    clock: Callable[[], float] = time.monotonic,
    bar: str | None = None,
) -> ModelEval:
    """Greedy correctness and (samples > 0) correct counts of ``samples`` samples per problem; cached.
    ``seconds`` is the time of every attempt (``clock``, injectable for tests), at full precision. ``bar``: the
    description of a progress bar over the problems (None: none)."""
    key = {
        "model": model_dir,
        "problems": [ex.id or ex.problem for ex in examples],
        "template": cfg.data.template,
        "max_new_tokens": cfg.eval_max_new_tokens,
        "samples": samples,
        "seed": cfg.seed,
        "model_cfg": {k: getattr(cfg.model, k) for k in EVAL_MODEL_FIELDS},
    }
    key["model_cfg"]["dtype"] = resolve_dtype(cfg.model.dtype, inference_device(cfg.cpu))  # what it ran in
    if (
        cfg.data.min_pixels is not None or cfg.data.max_pixels is not None
    ):  # images resized: part of the result
        key["pixels"] = [cfg.data.min_pixels, cfg.data.max_pixels]
    if (hit := _cached(path, key, _eval_key_as_now)) is not None:
        return ModelEval.from_dict(hit, str(path))
    # an interrupted evaluation continues after its last finished chunk (<name>.partial.json)
    progress = EvalProgress(path.with_name(path.stem + ".partial.json"), key, clock)
    tok = load_tokenizer(model_dir, cfg.model.trust_remote_code, cfg.data.min_pixels, cfg.data.max_pixels)
    device = inference_device(cfg.cpu)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.trust_remote_code, device).to(device).eval()
    res = held_out_scores(model, tok, examples, cfg.data.template, cfg.eval_max_new_tokens, verifier, samples,
                          cfg.seed, progress=progress, bar=bar)  # fmt: skip
    result = ModelEval(config=key, greedy=res.greedy, seconds=progress.seconds, sampled=res.sampled)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_dict()))
    progress.clear()
    return result


def _curves(out_dir: Path) -> dict[str, list[float | None]]:
    """Per-step training statistics from metrics.jsonl (the last row of a step wins after a resume)."""
    by_step: dict[int, dict] = {}
    for r in read_metrics(out_dir):
        if r.get("stage") == "train" and "reward" in r:
            by_step[int(r["step"])] = r
    steps = sorted(by_step)
    return {k: [by_step[s].get(k) for s in steps] for k in CURVE_KEYS}


def run_one(cfg, progress: bool) -> RunResult:
    """Train (or resume, or reuse) one run."""
    out = Path(cfg.out_dir)
    path = out / "compare_result.json"
    config = to_dict(cfg)
    # a run saved before the auto defaults (data.eval, model.dtype) with what they mean here is the same run
    if (hit := _cached(path, canonical(config), lambda saved: canonical(normalized(saved)))) is not None:
        # the curves from metrics.jsonl: the cached ones may predate a key
        return dataclasses.replace(RunResult.from_dict(hit, str(path)), curves=_curves(out))
    t0 = time.time()
    # an interrupted run resumes from its checkpoint (run_train refuses one of another config); a run that
    # failed before its first checkpoint starts over
    found, notes = find_checkpoint(out)
    resume = found is not None
    if not resume and checkpoint_root(out).is_dir():
        print(f"compare: starting {out} over: it has no intact checkpoint ({'; '.join(notes)})")
    res = run_train(cfg, progress=progress, resume=resume, overwrite=not resume, final_eval=False)
    result = RunResult(
        config=config, model_dir=res.model_dir, curves=_curves(out), seconds=round(time.time() - t0, 1)
    )
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2))
    return result


def arm_pairs(arm_specs: dict[str, tuple]) -> list[tuple[str, str]]:
    """The (a, b) pairs that the report compares as ``a - b``, from ``{arm: (method, overrides, seeds)}``:
    every arm against RLVR; RLFR against the entropy arm (dense shaping without a flow); an ablation against
    the method it changes (frozen - rlfr), on the seeds both ran; every arm against the start model."""
    pairs = [(a, "rlvr") for a in arm_specs if a != "rlvr" and "rlvr" in arm_specs]
    if "rlfr" in arm_specs and "entropy" in arm_specs:
        pairs.append(("rlfr", "entropy"))
    pairs += [(a, m) for a, (m, _, _) in arm_specs.items() if a != m and m != "rlvr" and m in arm_specs]
    return pairs + [(a, "base") for a in arm_specs]


def training_time(step_times: list[list[float | None]]) -> dict[str, float]:
    """Per seed, the logged seconds of each step (None where a step logged none) -> {"minutes_per_run": the
    steps' seconds summed, mean over seeds; "median_step_seconds": the median step of all seeds}, rounded to
    0.1; {} when a seed logged no step time (runs of versions before step times were logged). Step times
    are wall time within a step (other work on the machine, or a paused process, counts; the time between
    steps does not); a step run twice after a resume counts its last attempt."""
    logged = [[t for t in ts if t is not None] for ts in step_times]
    if not logged or not all(logged):
        return {}
    return {
        "minutes_per_run": round(sum(sum(ts) for ts in logged) / len(logged) / 60, 1),
        "median_step_seconds": round(statistics.median(t for ts in logged for t in ts), 1),
    }


def curve_mean(curves: list[list[float]]) -> list[float]:
    """Mean over seeds per step (over the runs that reached that step and logged a value)."""
    steps = max((len(c) for c in curves), default=0)
    out = []
    for i in range(steps):
        vals = [c[i] for c in curves if i < len(c) and c[i] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def run(cfg: CompareConfig) -> int:
    run_compare(cfg)
    return 0


def run_compare(cfg: CompareConfig) -> CompareResult:
    """The whole study (module docstring) -> what ``OUT/results.json`` holds."""
    arm_specs = arms(cfg)
    configs = {
        (name, s): run_config(cfg, method, s, name, extra)
        for name, (method, extra, seeds) in arm_specs.items()
        for s in seeds
    }  # every config is built first: a typo fails before hours of training
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = next(iter(configs.values()))
    sets = {}
    for spec in cfg.eval_sets:
        slug, name, examples = eval_set(spec, ref)
        sets[slug] = (name, examples)
    progress = cfg.progress
    evals: dict[str, dict[str, dict[str, ModelEval]]] = {"base": {}}
    runs: dict[str, dict[str, RunResult]] = {name: {} for name in arm_specs}
    with Verifier(num_workers=ref.reward.workers, timeout=ref.reward.timeout) as verifier:
        every_seed = dict.fromkeys(str(s) for _, _, seeds in arm_specs.values() for s in seeds)
        for slug, (_, examples) in sets.items():
            path = out / "base" / f"eval_{slug}.json"
            base = evaluate_model(cfg.start, ref, examples, cfg.eval_samples, path, verifier,
                                  bar=f"eval base {slug}" if progress else None)  # fmt: skip
            evals["base"][slug] = {s: base for s in every_seed}  # one model, paired with every run
        for name in arm_specs:
            evals[name] = {slug: {} for slug in sets}
        # seed by seed over the methods first, so that an interrupted study already holds paired runs
        order = [(m, s) for s in cfg.seeds for m in cfg.methods]
        order += [(n, s) for n, (_, _, seeds) in arm_specs.items() if n not in cfg.methods for s in seeds]
        for name, s in order:
            run_cfg = configs[(name, s)]
            r = run_one(run_cfg, progress)
            runs[name][str(s)] = r
            for slug, (_, examples) in sets.items():
                path = Path(run_cfg.out_dir) / f"eval_{slug}.json"
                evals[name][slug][str(s)] = evaluate_model(
                    r.model_dir,
                    run_cfg,
                    examples,
                    cfg.eval_samples,
                    path,
                    verifier,
                    bar=f"eval {name} seed {s} {slug}" if progress else None,
                )
    result = summarize(cfg, arm_specs, sets, runs, evals, ref)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plot_curves(result.arms, CURVE_KEYS, out / "learning_curves.png")
    plot_accuracy(result.methods, out / "accuracy.png")
    plot_paired(result.to_dict(), out / "paired.png")
    (out / "report.md").write_text(render_report(result))
    print((out / "report.md").read_text())
    return result


def summarize(cfg: CompareConfig, arm_specs, sets, runs, evals, ref) -> CompareResult:
    k = cfg.eval_samples
    first = next(iter(sets))
    arms_out: dict[str, dict] = {}
    for name in ["base", *arm_specs]:
        entry: dict = {"eval": {}}
        if name != "base":
            method, extra, seeds = arm_specs[name]
            entry |= {"method": method, "overrides": extra, "seeds": [str(s) for s in seeds]}
            entry["curves"] = {
                key: curve_mean([runs[name][str(s)].curves.get(key, []) for s in seeds]) for key in CURVE_KEYS
            }
            entry |= training_time([runs[name][str(s)].curves["time/step"] for s in seeds])
        for slug in sets:
            per_seed = evals[name][slug]
            e = {"greedy": {s: sum(r.greedy) / len(r.greedy) for s, r in per_seed.items()}}
            if k:
                e["sampled"] = {s: sum(r.sampled) / (k * len(r.sampled)) for s, r in per_seed.items()}
            for kind in list(e):
                e[f"{kind}_mean"], e[f"{kind}_std"] = mean_std(list(e[kind].values()))
            entry["eval"][slug] = e
        arms_out[name] = entry
    paired_out: dict[str, dict] = {}
    pairs = arm_pairs(arm_specs)
    for slug in sets:
        as_dicts = {arm: {s: r.to_dict() for s, r in evals[arm][slug].items()} for arm in evals}
        paired_out[slug] = {f"{a} - {b}": compare_arms(as_dicts[a], as_dicts[b], k) for a, b in pairs}
    # the first eval set's greedy accuracy per seed, in the layout of earlier versions
    methods = {
        name: {
            "seeds": arms_out[name]["eval"][first]["greedy"],
            "mean": arms_out[name]["eval"][first]["greedy_mean"],
            "std": arms_out[name]["eval"][first]["greedy_std"],
            "reward": arms_out[name].get("curves", {}).get("reward"),
        }
        for name in arms_out
        if name == "base" or name in cfg.methods
    }
    budget = {
        "steps": ref.steps,
        "prompts_per_step": ref.rollout.prompts_per_step,
        "num_generations": ref.rollout.num_generations,
        "max_new_tokens": ref.rollout.max_new_tokens,
        "policy_lr": ref.policy.lr,
        "train_size": ref.data.train_size,
        "eval_max_new_tokens": ref.eval_max_new_tokens,
        "eval_samples": k,
        "template": ref.data.template,
    }
    return CompareResult(
        command=command_line(cfg),
        start=cfg.start,
        flow=cfg.flow,
        seeds=list(cfg.seeds),
        budget=budget,
        eval_sets={slug: {"data": name, "n": len(ex)} for slug, (name, ex) in sets.items()},
        methods=methods,
        arms=arms_out,
        paired=paired_out,
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def signal_summary(curves: dict[str, list[float | None]], window: int = 8) -> dict[str, float | None]:
    """What an arm's training signals did, from its per-step curves (mean over seeds; None where a step did
    not log the key): the reward over the first and the last ``window`` steps; the mean over all steps of
    |outcome advantage|, |flow reward-to-go| per token (and their ratio), the fraction of response tokens with
    a non-zero flow reward, the AUROC of the flow score for correct vs wrong rollouts pooled over the step and
    within prompts (the separation GRPO can use), the same two for the mean token log-prob (the baseline), and
    the flow score's correlation with response length within prompts; KL to the start model, entropy and
    response length over the last ``window`` steps. A key no step logged gives None."""

    def mean(key: str, sl: slice = slice(None)) -> float | None:
        vals = [v for v in curves.get(key, [])[sl] if v is not None]
        return sum(vals) / len(vals) if vals else None

    first, last = slice(None, window), slice(-window, None)
    out = {
        "reward_first": mean("reward", first),
        "reward_last": mean("reward", last),
        "outcome_adv_abs": mean("adv/outcome_abs"),
        "flow_rtg_abs": mean("adv/flow_abs"),
        "flow_nonzero_frac": mean("flow_reward/nonzero_frac"),
        "flow_auroc": mean("flow_score/auroc"),
        "flow_auroc_within": mean("flow_score/auroc_within"),
        "logp_auroc": mean("logp/auroc"),
        "logp_auroc_within": mean("logp/auroc_within"),
        "flow_len_corr_within": mean("flow_score/len_corr_within"),
        "kl_last": mean("policy/kl", last),
        "entropy_last": mean("policy/entropy", last),
        "response_len_last": mean("response_len", last),
    }
    o, f = out["outcome_adv_abs"], out["flow_rtg_abs"]
    out["flow_over_outcome"] = f / o if o and f is not None else None
    return out


_SIGNAL_COLUMNS = (
    ("reward_first", "reward, first 8 steps", "{:.3f}"),
    ("reward_last", "reward, last 8 steps", "{:.3f}"),
    ("outcome_adv_abs", "mean abs A_o", "{:.3f}"),
    ("flow_rtg_abs", "mean abs flow reward-to-go", "{:.4f}"),
    ("flow_over_outcome", "flow / outcome", "{:.3f}"),
    ("flow_nonzero_frac", "tokens with a flow reward", "{:.2f}"),
    ("flow_auroc", "flow AUROC pooled (correct vs wrong)", "{:.3f}"),
    ("kl_last", "KL to start, last 8", "{:.4f}"),
    ("entropy_last", "entropy, last 8", "{:.3f}"),
    ("response_len_last", "length, last 8", "{:.1f}"),
)
# shown after the pooled flow AUROC when some arm logged them (runs of versions before them did not)
_SEPARATION_COLUMNS = (
    ("flow_auroc_within", "flow AUROC within prompts", "{:.3f}"),
    ("flow_len_corr_within", "flow score vs length, r within prompts", "{:+.2f}"),
    ("logp_auroc", "log-prob AUROC pooled", "{:.3f}"),
    ("logp_auroc_within", "log-prob AUROC within prompts", "{:.3f}"),
)
SEPARATION_NOTE = (
    "An AUROC is that of correct vs wrong rollouts by the flow score (lower mean deviation) or by the mean token "
    "log-prob, pooled over a step's rollouts or averaged over the prompts whose rollouts hold both classes. GRPO "
    "compares the rollouts of one prompt only, so the within-prompt value is the separation that can shape RL; a "
    "pooled value above it partly measures which problems are easy."
)


def render_signals(arms: dict[str, dict]) -> list[str]:
    """The markdown table of ``signal_summary`` per RL arm ('-' where an arm has no such signal); the
    within-prompt and log-prob columns, and a note on them, when some arm logged them."""
    sigs = {name: signal_summary(a["curves"]) for name, a in arms.items() if "curves" in a}
    extra = [c for c in _SEPARATION_COLUMNS if any(sig[c[0]] is not None for sig in sigs.values())]
    cut = [key for key, _, _ in _SIGNAL_COLUMNS].index("flow_auroc") + 1
    columns = [*_SIGNAL_COLUMNS[:cut], *extra, *_SIGNAL_COLUMNS[cut:]]
    lines = [
        "| arm | " + " | ".join(label for _, label, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, sig in sigs.items():
        cells = ["-" if sig[key] is None else fmt.format(sig[key]) for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + (["", SEPARATION_NOTE] if extra else [])


def render_seed_table(paired: dict[str, dict], k: int) -> list[str]:
    """Seed by seed: each pair's per-seed differences and their Student-t interval over seeds (markdown
    lines); nothing when no pair has two seeds in common (results of earlier versions have no per-seed
    differences)."""
    if not any(st["greedy"].get("across_seeds") for st in paired.values()):
        return []
    kinds = [("greedy", "greedy")] + ([("sampled", f"avg@{k}")] if k else [])
    lines = [
        "Seed by seed (each run against the other arm's run of the same seed; seed: percentage points; the mean "
        "over seeds with a Student-t 95 % interval that takes the seed as the unit, so it covers the spread between "
        "seeds, which the problem bootstrap above does not):",
        "",
        "| comparison | "
        + " | ".join(f"{lab} per seed | {lab} over seeds" for _, lab in kinds)
        + " | seeds ahead (greedy) |",
        "|---|" + "---|---|" * len(kinds) + "---|",
    ]
    for pair, st in paired.items():
        if not st["greedy"].get("across_seeds"):
            continue
        cells = []
        for kind, _ in kinds:
            per = st[kind]["per_seed"]
            cells += [
                ", ".join(f"{s}: {100 * v:+.1f}" for s, v in per.items()),
                format_diff(st[kind]["across_seeds"]),
            ]
        g = list(st["greedy"]["per_seed"].values())
        ahead = f"{sum(v > 0 for v in g)} of {len(g)}" + (
            f" ({sum(v == 0 for v in g)} tied)" if 0 in g else ""
        )
        lines.append(f"| {pair} | " + " | ".join(cells) + f" | {ahead} |")
    return lines + [""]


def render_training_time(arms: dict[str, dict]) -> list[str]:
    """The report's line of training minutes per arm (``training_time``; results of earlier versions hold
    the minutes alone); nothing when no arm has them."""
    cells = [f"{n} {a['minutes_per_run']}" + (f" ({a['median_step_seconds']} s)" if "median_step_seconds" in a else "")
             for n, a in arms.items() if "minutes_per_run" in a]  # fmt: skip
    if not cells:
        return []
    return ["Training minutes per run (the logged step times summed, mean over seeds; the median step in brackets; "
            "wall time within a step, so other work on the machine counts): " + ", ".join(cells), ""]  # fmt: skip


def render_report(result: CompareResult) -> str:
    """``report.md`` of a study, also of a ``results.json`` in the layout of earlier versions."""
    seeds = [str(s) for s in result.seeds]
    lines = [
        "# "
        + " vs ".join(result.arms or result.methods)
        + f" ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
        "",
        f"Start model: `{result.start}`" + (f"; RLFR flow: `{result.flow}`" if result.flow else ""),
        "",
    ]
    if result.arms is None:  # the layout of earlier versions: greedy accuracy of one eval set
        lines += [
            "Held-out greedy accuracy (%), mean ± std over seeds (sample std):",
            "",
            "| method | accuracy | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|---|" + "---|" * len(seeds),
        ]
        for name, e in result.methods.items():
            vals = [e["seeds"][s] for s in seeds]
            lines.append(
                f"| {name} | {format_mean_std(vals)} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |"
            )
    else:
        k = result.budget.get("eval_samples", 0)
        for slug, info in result.eval_sets.items():
            lines += [f"## {slug} ({info['n']} problems)", ""]
            head = (
                "| arm | greedy pass@1 (%) |"
                + (f" sampled avg@{k} (%) |" if k else "")
                + " per seed (greedy) |"
            )
            lines += [head, "|---|---|" + ("---|" if k else "") + "---|"]
            for name, a in result.arms.items():
                e = a["eval"][slug]
                row = f"| {name} | {format_mean_std(list(e['greedy'].values()))} |"
                if k:
                    row += f" {format_mean_std(list(e['sampled'].values()))} |"
                row += " " + ", ".join(_pct(v) for v in e["greedy"].values()) + " |"
                lines.append(row)
            lines += [
                "",
                "Paired, problem by problem (difference of seed-averaged accuracy, percentage points, "
                "bootstrap 95 % interval; McNemar's exact test per seed on greedy correctness):",
                "",
            ]
            lines += ["| comparison | greedy | " + (f"avg@{k} | " if k else "") + "McNemar p (n10/n01) per seed |",
                      "|---|---|" + ("---|" if k else "") + "---|"]  # fmt: skip
            for pair, st in result.paired[slug].items():
                g = st["greedy"]
                row = f"| {pair} | {format_diff(g)} |"
                if k:
                    sm = st["sampled"]
                    row += f" {format_diff(sm)} |"
                tests = ", ".join(
                    f"{t['p']:.3f} ({t['n10']}/{t['n01']})" for t in st["mcnemar_greedy"].values()
                )
                lines.append(row + f" {tests} |")
            lines.append("")
            lines += render_seed_table(result.paired[slug], k)
        lines += [
            "Training signals (per-step curves averaged over seeds, then over the steps named; "
            "A_o is the outcome advantage, the flow reward-to-go is per response token):",
            "",
        ]
        lines += render_signals(result.arms) + [""]
        lines += render_training_time(result.arms)
    lines += ["", "Budget (identical for every RL run):", ""]
    lines += [f"- {k}: {v}" for k, v in result.budget.items()]
    lines += [
        "",
        "![training curves](learning_curves.png)",
        "",
        "![held-out accuracy](accuracy.png)",
        "",
        *(["![paired differences](paired.png)", ""] if result.arms is not None else []),
        "Command:",
        "",
        "```",
        result.command,
        "```",
        "",
    ]
    return "\n".join(lines)
