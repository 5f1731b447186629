"""RL step time: RLFR (flow scoring + shaping + online flow update) against plain RLVR, side by side.

Reproduce:
    .venv/bin/python benchmarks/rl_step.py                      # SmolLM2-135M, 8 prompts x 4, 64 new tokens
    .venv/bin/python benchmarks/rl_step.py --model runs/demo/sft/model --repeats 5 --soft-flow 1.0

Both trainers are built from the same model; each repeat runs one RLVR step and one RLFR step from the
same RNG seed (a tiny learning rate keeps the two policies, and so their rollouts, nearly identical),
alternating the order so that machine noise hits both. Prints the median step time per method, their
ratio, the median update-phase time (the part the flow adds to) and rollout tokens per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(method: str, args):
    from rlfr.config import load_config
    from rlfr.recipes.train import build_components
    from rlfr.runtime.env import make_accelerator
    from rlfr.schema import TrainConfig

    cfg = load_config(
        TrainConfig,
        overrides=[
            f"method={method}",
            f"model.name_or_path={args.model}",
            "data.train_size=256",
            "data.eval_size=8",
            f"rollout.prompts_per_step={args.prompts}",
            f"rollout.num_generations={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.batch_size={args.prompts * args.n}",
            f"policy.micro_batch_size={args.micro_batch}",
            "policy.lr=1e-9",
            f"flow.soft_flow={args.soft_flow}",
            f"steps={args.repeats + 1}",
            "out_dir=/tmp/rlfr-bench",
        ],
    )
    return build_components(cfg, make_accelerator(cpu=args.cpu))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (after one warm-up)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument(
        "--soft-flow",
        type=float,
        default=0.0,
        help="flow-loss weight of wrong rollouts: 0 = published (flow trained on correct ones only), 1 = worst case",
    )
    args = ap.parse_args()

    from rlfr.rl.step import rl_step

    trainers = {m: build(m, args) for m in ("rlvr", "rlfr")}
    times: dict[str, dict[str, list[float]]] = {
        m: {"step": [], "update": [], "tps": [], "len": []} for m in trainers
    }
    for rep in range(args.repeats + 1):
        order = ("rlvr", "rlfr") if rep % 2 == 0 else ("rlfr", "rlvr")
        for m in order:
            c, data = trainers[m]
            idx = list(range(rep * args.prompts, (rep + 1) * args.prompts))
            torch.manual_seed(1000 + rep)
            t = time.perf_counter()
            stats = rl_step(c, rep, [data.train[i] for i in idx], [data.prompts[i] for i in idx])
            wall = time.perf_counter() - t
            if rep == 0:
                continue  # warm-up
            times[m]["step"].append(wall)
            times[m]["update"].append(float(stats["time/update"]))
            times[m]["tps"].append(float(stats["rollout_tokens_per_s"]))
            times[m]["len"].append(float(stats["response_len"]))
    for c, _ in trainers.values():
        c.reward.verifier.close()
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    print(
        f"\nmodel {args.model}, {args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens, "
        f"soft_flow {args.soft_flow}, "
        f"median of {args.repeats} steps per method (threads: {torch.get_num_threads()})"
    )
    print(f"{'method':8s} {'step (s)':>9s} {'update (s)':>11s} {'rollout tok/s':>14s} {'resp len':>9s}")
    for m in ("rlvr", "rlfr"):
        d = med[m]
        print(f"{m:8s} {d['step']:9.2f} {d['update']:11.2f} {d['tps']:14.1f} {d['len']:9.1f}")
    print(
        f"ratio rlfr/rlvr: step {med['rlfr']['step'] / med['rlvr']['step']:.3f}, "
        f"update {med['rlfr']['update'] / med['rlvr']['update']:.3f}"
    )


if __name__ == "__main__":
    main()
