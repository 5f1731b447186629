"""``rlfr eval``: greedy pass@1 (default) or sampled avg@k / pass@k of a model on benchmarks or data files.

    rlfr eval --model runs/demo/rl/checkpoints/step_000016/policy --data embedded math500 my.jsonl --out runs/eval
    rlfr eval --model smollm2-135m-instruct --data embedded --samples 8 --temperature 1.0

Writes ``OUT/results.json`` (``rlfr.eval.results.EvaluateResult``, also what ``run_evaluate`` returns: one
entry per dataset: n, pass@1 or avg@k and pass@k for k = 1, 2, 4, ... <= K, mean response length) and ``OUT/samples_<dataset>.jsonl`` (one row per sample: prompt, completion,
extracted answer, correct), and prints a table. ``--data embedded`` is the embedded task's held-out
split exactly as ``rlfr train`` builds it (``--eval-size``/``--seed`` as ``data.eval_size``/``seed``).
pass@k is the unbiased estimator of Chen et al. 2021 (``rlfr.stats.pass_at_k``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlfr.data.benchmarks import BENCHMARKS, benchmark_name
from rlfr.data.examples import Fields
from rlfr.data.sources import GENERATED_SETS, load_source
from rlfr.data.templates import TEMPLATES, example_prompt
from rlfr.eval.results import DatasetResult, EvaluateResult
from rlfr.eval.scoring import sampled_completions, score_completions
from rlfr.policy.loading import is_adapter_dir, load_model, load_tokenizer, model_config, resolve_model_path
from rlfr.policy.sampler import SamplingParams, build_sampler
from rlfr.policy.vision import ImageTextProcessor, images_of
from rlfr.policy.vllm_engine import VLLMSettings, check_model_len, require_vllm
from rlfr.reward.verifier import Verifier
from rlfr.runtime.env import inference_device, seed_everything
from rlfr.schema import DataConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF hub name, local model dir, or 'smollm2-135m-instruct'")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="'embedded' (held-out split), 'embedded-dev', 'embedded-transfer', 'embedded-vl', benchmark:NAME "
        f"({', '.join(BENCHMARKS)}; rlfr data download NAME), a data file, a dataset directory or a Hub dataset id",
    )
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--template", default="chat", choices=TEMPLATES, help="prompt template")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation limit per response")
    p.add_argument("--samples", type=int, default=1, help="K samples per problem: avg@K and pass@k (k <= K)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: greedy for --samples 1, else 1.0)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems of each set")
    p.add_argument(
        "--eval-size",
        type=int,
        default=DataConfig.eval_size,
        help="embedded held-out problems (as data.eval_size in training)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (embedded split and sampling)")
    p.add_argument(
        "--dev-size", type=int, default=0, help="embedded-dev: the dev split's size (data.dev_size)"
    )
    p.add_argument("--problem-field", default="problem", help="data files: field holding the problem")
    p.add_argument("--answer-field", default="answer", help="data files: field holding the answer")
    p.add_argument(
        "--backend",
        default="hf",
        choices=("hf", "vllm"),
        help="generation backend: hf (transformers generate) or vllm (the trainer's vLLM engine; CPU or GPU, "
        "pip install 'rlfr[vllm]', see docs/vllm.md)",
    )
    p.add_argument(
        "--vllm-memory-fraction",
        type=float,
        default=0.3,
        help="vllm: fraction of the GPU's memory vLLM may use (on CPU: of the RAM)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call (hf)")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype"
    )
    p.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    p.add_argument("--cpu", action="store_true", help="force CPU")
    p.add_argument(
        "--image-field", default="auto", help="data files: image column (auto: images or image; none)"
    )
    p.add_argument("--min-pixels", type=int, default=None, help="vision-language models: data.min_pixels")
    p.add_argument("--max-pixels", type=int, default=None, help="vision-language models: data.max_pixels")


def dataset_slug(spec: str) -> str:
    name = spec if spec.startswith("embedded") else benchmark_name(spec) or Path(spec).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def run(args: argparse.Namespace) -> int:
    result = run_evaluate(args)
    print_table(result)
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0


def run_evaluate(args: argparse.Namespace) -> EvaluateResult:
    """The whole command (module docstring) -> what ``OUT/results.json`` holds."""
    if args.samples < 1 or args.max_new_tokens < 1:
        raise ValueError("--samples and --max-new-tokens must be >= 1")
    greedy = args.samples == 1 and args.temperature is None
    temperature = 1.0 if args.temperature is None else args.temperature
    if not greedy and temperature <= 0:
        raise ValueError("--temperature must be > 0 when sampling")
    if args.backend == "vllm" and is_adapter_dir(resolve_model_path(args.model)):
        raise ValueError(
            f"{args.model} is a LoRA adapter and vLLM loads whole models: merge it first with "
            "rlfr export --checkpoint CHECKPOINT --merged OUT, then --model OUT (or use --backend hf)"
        )
    if args.backend == "vllm":
        require_vllm("--backend vllm")
        if not 0 < args.vllm_memory_fraction <= 1:
            raise ValueError(f"--vllm-memory-fraction must be in (0, 1], got {args.vllm_memory_fraction}")
    sets = {}
    for spec in args.data:  # load every set first: a bad path fails before the model loads
        size = args.eval_size if spec in GENERATED_SETS else 0  # files and benchmarks: all rows (--limit)
        fields = Fields(prompt=args.problem_field, answer=args.answer_field, image=args.image_field)
        rows = load_source(spec, fields, size, task_seed=args.seed, dev_size=args.dev_size)
        sets[dataset_slug(spec)] = (spec, rows[: args.limit] if args.limit > 0 else rows)
    seed_everything(args.seed)
    tok = load_tokenizer(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if args.backend == "vllm" and isinstance(tok, ImageTextProcessor):
        raise ValueError(
            f"{args.model} is a vision-language model; rlfr's vLLM backend is text-only: use --backend hf"
        )
    model, vllm = None, {}
    if args.backend == "hf":
        model = load_model(args.model, args.dtype).to(inference_device(args.cpu)).eval()
    else:
        longest = max(len(tok(example_prompt(args.template, ex, tok), add_special_tokens=False)["input_ids"])
                      for _, rows in sets.values() for ex in rows)  # fmt: skip
        max_len = check_model_len(longest + args.max_new_tokens, model_config(args.model),
                                  f"the longest prompt ({longest} tokens) + --max-new-tokens")  # fmt: skip
        settings = VLLMSettings(dtype=args.dtype, memory_fraction=args.vllm_memory_fraction,
                                max_model_len=max_len, seed=args.seed)  # fmt: skip
        vllm = dict(model_path=resolve_model_path(args.model), vllm=settings)
    sampler = build_sampler(args.backend, tok, model=model, batch_size=args.batch_size, **vllm)
    # hf samples with torch's RNG, seeded once above (each set continues it); vllm seeds every set with --seed
    seed = args.seed if args.backend == "vllm" else None
    params = SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, temperature=temperature,
                            top_p=args.top_p, greedy=greedy, seed=seed)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = {}
    with Verifier(num_workers=args.workers) as verifier:
        for slug, (spec, examples) in sets.items():
            t0 = time.time()
            prompts = [example_prompt(args.template, ex, tok) for ex in examples]
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
        model=args.model,
        backend=args.backend,
        template=args.template,
        greedy=greedy,
        samples=args.samples,
        temperature=None if greedy else temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        datasets=datasets,
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
