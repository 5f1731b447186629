"""``rlfr eval``: greedy pass@1 (default) or sampled avg@k / pass@k of a model on benchmarks or data files.

    rlfr eval model=runs/demo/rl/checkpoints/step_000016/policy data.eval=[embedded,math500,my.jsonl] out=runs/eval
    rlfr eval model=smollm2-135m-instruct data.eval=embedded samples=8 temperature=1.0

Writes ``OUT/results.json`` (``rlfr.eval.results.EvaluateResult``, also what ``run_evaluate`` returns: one
entry per dataset: n, pass@1 or avg@k and pass@k for k = 1, 2, 4, ... <= K, mean response length) and ``OUT/samples_<dataset>.jsonl`` (one row per sample: prompt, completion,
extracted answer, correct), and prints a table. ``data.eval=embedded`` is the embedded task's held-out
split exactly as ``rlfr train`` builds it (``data.eval_size``/``seed`` as ``data.eval_size``/``data.task_seed``).
pass@k is the unbiased estimator of Chen et al. 2021 (``rlfr.stats.pass_at_k``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlfr import __version__
from rlfr.commands import EvalConfig
from rlfr.data.benchmarks import benchmark_name
from rlfr.data.examples import Fields
from rlfr.data.sources import GENERATED_SETS, load_source
from rlfr.data.templates import example_prompt
from rlfr.errors import ConfigError
from rlfr.eval.results import DatasetResult, EvaluateResult
from rlfr.eval.scoring import sampled_completions, score_completions
from rlfr.policy.loading import (
    is_adapter_dir,
    load_model,
    load_tokenizer,
    model_config,
    resolve_dtype,
    resolve_model_path,
)
from rlfr.policy.sampler import SamplingParams, build_sampler
from rlfr.policy.vision import ImageTextProcessor, images_of
from rlfr.policy.vllm_engine import VLLMSettings, check_model_len, require_vllm
from rlfr.reward.verifier import Verifier
from rlfr.runtime.env import inference_device, seed_everything


def dataset_slug(spec: str) -> str:
    name = spec if spec.startswith("embedded") else benchmark_name(spec) or Path(spec).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def run(cfg: EvalConfig) -> int:
    result = run_evaluate(cfg)
    print_table(result)
    print(f"wrote {Path(cfg.out) / 'results.json'}")
    return 0


def run_evaluate(cfg: EvalConfig) -> EvaluateResult:
    """The whole command (module docstring) -> what ``OUT/results.json`` holds."""
    if not cfg.model or not cfg.data.eval:
        raise ConfigError(
            "rlfr eval needs model=MODEL and data.eval=SET (or a list: data.eval=[math500,my.jsonl])"
        )
    d = cfg.data
    greedy = cfg.samples == 1 and cfg.temperature is None
    temperature = 1.0 if cfg.temperature is None else cfg.temperature
    if cfg.backend == "vllm" and is_adapter_dir(resolve_model_path(cfg.model)):
        raise ValueError(
            f"{cfg.model} is a LoRA adapter and vLLM loads whole models: merge it first with "
            "rlfr export checkpoint=CHECKPOINT merged=OUT, then model=OUT (or use backend=hf)"
        )
    if cfg.backend == "vllm":
        require_vllm("backend=vllm")
    sets = {}
    for spec in d.eval:  # load every set first: a bad path fails before the model loads
        size = d.eval_size if spec in GENERATED_SETS else 0  # files and benchmarks: all rows (limit)
        fields = Fields(
            prompt=d.prompt_field, answer=d.answer_field, image=d.image_field, system_prompt=d.system_prompt
        )
        rows = load_source(
            spec, fields, size, task_seed=d.task_seed, dev_size=d.dev_size, subset=d.subset, split=d.split
        )
        slug = dataset_slug(spec)
        if slug in sets:  # their results would go to one samples_<slug>.jsonl and one entry of results.json
            raise ConfigError(
                f"data.eval: {sets[slug][0]!r} and {spec!r} would both be reported as {slug!r}; evaluate them in "
                "separate runs (out=...) or give the files different names"
            )
        sets[slug] = (spec, rows[: cfg.limit] if cfg.limit > 0 else rows)
    seed_everything(cfg.seed)
    tok = load_tokenizer(cfg.model, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    if cfg.backend == "vllm" and isinstance(tok, ImageTextProcessor):
        raise ValueError(
            f"{cfg.model} is a vision-language model; rlfr's vLLM backend is text-only: use backend=hf"
        )
    model, vllm, device = None, {}, inference_device(cfg.cpu)
    if cfg.backend == "hf":
        model = load_model(cfg.model, cfg.dtype, device=device).to(device).eval()
    else:
        longest = max(len(tok(example_prompt(d.template, ex, tok), add_special_tokens=False)["input_ids"])
                      for _, rows in sets.values() for ex in rows)  # fmt: skip
        max_len = check_model_len(longest + cfg.max_new_tokens, model_config(cfg.model),
                                  f"the longest prompt ({longest} tokens) + max_new_tokens")  # fmt: skip
        settings = VLLMSettings(dtype=resolve_dtype(cfg.dtype, device), memory_fraction=cfg.vllm_memory_fraction,
                                max_model_len=max_len, seed=cfg.seed)  # fmt: skip
        vllm = dict(model_path=resolve_model_path(cfg.model), vllm=settings)
    sampler = build_sampler(cfg.backend, tok, model=model, batch_size=cfg.batch_size,
                            progress="generating" if cfg.progress else None, **vllm)  # fmt: skip
    # hf samples with torch's RNG, seeded once above (each set continues it); vllm seeds every set with seed
    seed = cfg.seed if cfg.backend == "vllm" else None
    params = SamplingParams(n=cfg.samples, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                            top_p=cfg.top_p, greedy=greedy, seed=seed)  # fmt: skip
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = {}
    with Verifier(num_workers=cfg.workers) as verifier:
        for slug, (spec, examples) in sets.items():
            t0 = time.time()
            prompts = [example_prompt(d.template, ex, tok) for ex in examples]
            comps = sampled_completions(sampler, prompts, params, images_of(tok, examples))
            res = score_completions(examples, prompts, comps, verifier)
            path = out / f"samples_{slug}.jsonl"
            with path.open("w") as f:
                for r in res.records:
                    f.write(json.dumps(r) + "\n")
            datasets[slug] = DatasetResult(
                data=spec,
                n=res.n,
                samples=res.samples,
                mean_response_tokens=res.mean_response_tokens,
                seconds=round(time.time() - t0, 2),
                samples_file=path.name,
                pass_at_1=res.avg if greedy else None,
                avg=None if greedy else res.avg,
                pass_at_k=None if greedy else {str(k): v for k, v in res.pass_at.items()},
            )
    result = EvaluateResult(
        model=cfg.model,
        backend=cfg.backend,
        template=d.template,
        greedy=greedy,
        samples=cfg.samples,
        temperature=None if greedy else temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        datasets=datasets,
        rlfr_version=__version__,
    )
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def print_table(result: EvaluateResult) -> None:
    mode = "greedy" if result.greedy else f"T={result.temperature}"
    table = Table(title=f"{result.model} ({mode})")
    table.add_column("data")
    table.add_column("n", justify="right")
    cols: list[str] = []
    for e in result.datasets.values():
        keys = (
            ["pass@1"]
            if e.pass_at_1 is not None
            else [f"avg@{e.samples}"] + [f"pass@{k}" for k in e.pass_at_k]
        )
        cols += [k for k in keys if k not in cols]
    for c in cols:
        table.add_column(c, justify="right")
    table.add_column("resp. tokens", justify="right")
    for slug, e in result.datasets.items():
        vals = {"pass@1": e.pass_at_1, f"avg@{e.samples}": e.avg}
        vals |= {f"pass@{k}": v for k, v in (e.pass_at_k or {}).items()}
        cells = [f"{100 * vals[c]:.1f}" if vals.get(c) is not None else "" for c in cols]
        table.add_row(slug, str(e.n), *cells, f"{e.mean_response_tokens:.0f}")
    Console().print(table)
