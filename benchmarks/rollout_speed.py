"""Rollout tokens per second: the vLLM engine against Hugging Face ``generate``, side by side in one process.

Reproduce (vLLM installed, docs/vllm.md):
    PYTHONPATH=src python benchmarks/rollout_speed.py                 # SmolLM2-135M, 8 prompts x 4, 64 tokens
    PYTHONPATH=src python benchmarks/rollout_speed.py --prompts 16 --n 8 --max-new-tokens 256 --dtype bfloat16

Both engines sample the same prompts (the embedded task's, rendered as ``rlfr train`` renders them) with the
same settings; the repeats alternate the engines so that machine noise hits both. Prints the median
tokens/s of each, their ratio, the engine's start time and the median weight-sync time (a forced push of the
policy's weights, as after every optimizer step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-memory-fraction", type=float, default=0.1)
    args = ap.parse_args()

    from rlfr.data.sources import render_prompts, resolve_data
    from rlfr.policy.loading import load_model, load_tokenizer, resolve_model_path
    from rlfr.policy.sampler import SamplingParams, build_sampler
    from rlfr.policy.vllm_engine import VLLMSettings
    from rlfr.schema import DataConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.model)
    train, _ = resolve_data(DataConfig(train_size=64, eval_size=0))
    prompts = render_prompts(train, "chat", tok, 512)[: args.prompts]
    model = load_model(args.model, args.dtype).to(device).eval()
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    t0 = time.perf_counter()
    settings = VLLMSettings(dtype=args.dtype, memory_fraction=args.vllm_memory_fraction,
                            max_model_len=longest + args.max_new_tokens)  # fmt: skip
    samplers = {
        "vllm": build_sampler(
            "vllm", tok, model=model, model_path=str(resolve_model_path(args.model)), vllm=settings
        ),
        "hf": build_sampler("hf", tok, model=model, batch_size=args.prompts * args.n),
    }
    t_start = time.perf_counter() - t0
    rows: dict[str, list[float]] = {"hf": [], "vllm": [], "sync": [], "hf_len": [], "vllm_len": []}
    for rep in range(args.repeats + 1):
        t = time.perf_counter()
        samplers["vllm"].sync_weights(model, version=rep)
        t_sync = time.perf_counter() - t
        for name in ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf"):
            torch.manual_seed(rep)
            t = time.perf_counter()
            # hf samples with torch's RNG (seeded above), vllm with its own seed
            seed = rep if name == "vllm" else None
            ro = samplers[name].generate(
                prompts, SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, seed=seed)
            )
            wall = time.perf_counter() - t
            if rep == 0:
                continue  # warm-up
            tokens = float(ro.response_lengths.sum())
            rows[name].append(tokens / wall)
            rows[f"{name}_len"].append(tokens / len(ro.completions))
        if rep:
            rows["sync"].append(t_sync)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\nmodel {args.model} ({args.dtype}), device {device}, {args.prompts} prompts x {args.n} samples, "
        f"{args.max_new_tokens} new tokens, median of {args.repeats} (torch threads: {torch.get_num_threads()})"
    )
    print(f"{'engine':8s} {'tokens/s':>9s} {'mean resp len':>14s}")
    for name in ("hf", "vllm"):
        print(f"{name:8s} {med[name]:9.1f} {med[name + '_len']:14.1f}")
    print(
        f"ratio vllm/hf: {med['vllm'] / med['hf']:.2f}; vLLM start {t_start:.1f} s, weight sync {med['sync']:.2f} s"
    )


if __name__ == "__main__":
    main()
