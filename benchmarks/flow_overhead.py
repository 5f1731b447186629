"""Overhead of the flow on a policy update step: latent tap + flow scores + one flow-matching update.

Reproduce (CPU, default threads; about 2 minutes on 2 idle cores)::

    .venv/bin/python benchmarks/flow_overhead.py
    .venv/bin/python benchmarks/flow_overhead.py --models smollm2-135m --batch 8 --seq 256 --repeats 3

For each model (random init from a config, no download) it times, as the median over ``--repeats`` runs
after ``--warmup`` runs:

  (a) policy forward + backward (LM loss) without a tap;
  (b) the same with a ``LatentTap`` at (0.25, 0.5, 0.75) of the depth, plus
      ``rlfr.flow.token_scores`` (token_post, shift 1, t = 0.8) on the response tokens and one
      flow-matching update (flow loss backward + AdamW step) of a ``FlowField`` with width = hidden size.

The mask marks the second half of each sequence as the response. Policy optimizer steps are in neither.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlfr.flow import FlowField, build_pairs, flow_matching_loss, token_scores
from rlfr.latents import LatentTap

MODELS = {
    "tiny": dict(
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
    ),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config), random init.
    "smollm2-135m": dict(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="model shapes")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (second half = response)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--flow-depth", type=int, default=4, help="FlowField residual blocks")
    p.add_argument("--batch-mul", type=int, default=1, help="flow-matching draws per pair")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens")
    return p.parse_args()


def median_times(fns, repeats: int, warmup: int) -> list[float]:
    """Median wall time of each function; the functions alternate within a repeat so that drift in the
    machine's load (other processes, allocator warm-up) hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def bench_model(name: str, args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        **MODELS[name], max_position_embeddings=max(2048, args.seq), tie_word_embeddings=True
    )
    model = LlamaForCausalLM(config).train()
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # LM loss on the response half only
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, args.seq // 2 :] = True
    field = FlowField(config.hidden_size, width=config.hidden_size, depth=args.flow_depth)
    flow_opt = torch.optim.AdamW(field.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)

    def policy_step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()

    def policy_and_flow_step() -> None:
        tap = LatentTap(model)
        policy_step()
        latents = tap.latents()
        token_scores(field, latents, tap.layer_values, mask, ("token_post",), 1, (0.8,), generator=generator)
        pairs = build_pairs(latents, tap.layer_values, mask, ("token_post",), 1)
        flow_opt.zero_grad(set_to_none=True)
        flow_matching_loss(field, pairs, batch_mul=args.batch_mul, generator=generator).backward()
        flow_opt.step()
        tap.remove()

    a, b = median_times([policy_step, policy_and_flow_step], args.repeats, args.warmup)
    tap = LatentTap(model)
    tap.remove()
    n_policy = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# {name}: policy {n_policy:.1f}M params, flow {field.num_params() / 1e6:.1f}M params, "
          f"hooked blocks {tap.indices} of {tap.num_blocks}", flush=True)  # fmt: skip
    return a, b


def main() -> None:
    args = parse_args()
    print(f"# batch {args.batch} x {args.seq} tokens (half response), median of {args.repeats} "
          f"(+{args.warmup} warm-up), torch threads {torch.get_num_threads()}, "
          f"checkpointing {args.checkpointing}", flush=True)  # fmt: skip
    rows = [(name, *bench_model(name, args)) for name in args.models]
    print(f"\n| {'model':<14} | {'a (s)':>8} | {'b (s)':>8} | {'ratio b/a':>9} |")
    print(f"|{'-' * 16}|{'-' * 10}:|{'-' * 10}:|{'-' * 11}:|".replace("-:", ":"))
    for name, a, b in rows:
        print(f"| {name:<14} | {a:>8.3f} | {b:>8.3f} | {b / a:>9.2f} |")


if __name__ == "__main__":
    main()
