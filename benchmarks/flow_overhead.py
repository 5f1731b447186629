"""Overhead of the flow on a policy update step: latent tap + flow scores + one flow-matching update.

Reproduce (CPU, default threads; about 2 minutes on 2 idle cores)::

    .venv/bin/python benchmarks/flow_overhead.py
    .venv/bin/python benchmarks/flow_overhead.py --models smollm2-135m --batch 8 --seq 256 --repeats 3

GPU (bf16 policy, float32 flow as in training; defaults there are RL micro-batches of 8 x 1024 tokens with
the last 768 the response; the 7B shape needs ``--checkpointing`` to fit 80 GB)::

    python3 benchmarks/flow_overhead.py --device cuda --dtype bfloat16 --models smollm2-135m qwen2.5-1.5b
    python3 benchmarks/flow_overhead.py --device cuda --dtype bfloat16 --models qwen2.5-7b --checkpointing

For each model (random init from a config, no download) it times, as the median over ``--repeats`` runs
after ``--warmup`` runs:

  (a) policy forward + backward (LM loss) without a tap;
  (b) the same with a ``LatentTap`` at (0.25, 0.5, 0.75) of the depth, plus
      ``rlfr.flow.token_scores`` (token_post, shift 1, t = 0.8) on the response tokens and one
      flow-matching update (flow loss backward + AdamW step) of a ``FlowField`` with width = hidden size.

The mask marks the last ``--response`` tokens of each sequence as the response (default: the second half
on CPU, 768 on GPU); the LM loss is on those tokens only. Policy optimizer steps are in neither. On CUDA
every timed call is bracketed by ``torch.cuda.synchronize()`` and the peak memory is reported.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rlfr.flow import FlowField, build_pairs, flow_matching_loss, token_scores
from rlfr.policy.latents import LatentTap

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
    # Qwen2.5-1.5B's shape (Qwen/Qwen2.5-1.5B config), random init.
    "qwen2.5-1.5b": dict(
        arch="qwen2",
        num_hidden_layers=28,
        hidden_size=1536,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-7B's shape (Qwen/Qwen2.5-7B config), random init.
    "qwen2.5-7b": dict(
        arch="qwen2",
        num_hidden_layers=28,
        hidden_size=3584,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "smollm2-135m"],
        choices=list(MODELS),
        help="model shapes (the Qwen2.5 shapes are for GPUs)",
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="policy parameter dtype (flow: fp32)"
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument(
        "--seq", type=int, default=None, help="tokens per sequence (default 128 on CPU, 1024 on GPU)"
    )
    p.add_argument(
        "--response", type=int, default=None, help="response tokens at the end of each sequence "
        "(default: half of --seq on CPU, 768 on GPU)"
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--flow-depth", type=int, default=4, help="FlowField residual blocks")
    p.add_argument("--batch-mul", type=int, default=1, help="flow-matching draws per pair")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens")
    args = p.parse_args()
    gpu = torch.device(args.device).type == "cuda"
    if args.seq is None:
        args.seq = 1024 if gpu else 128
    if args.response is None:
        args.response = min(768, args.seq - 1) if gpu else args.seq // 2
    if not 1 < args.response < args.seq:
        p.error(f"--response must be in (1, --seq = {args.seq}), got {args.response}")
    return args


def median_times(fns, repeats: int, warmup: int, sync=lambda: None) -> list[float]:
    """Median wall time of each function; the functions alternate within a repeat so that drift in the
    machine's load (other processes, allocator warm-up) hits them alike. ``sync`` waits for queued device
    work (``torch.cuda.synchronize`` on GPU) before the clock starts and before it stops."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def bench_model(name: str, args: argparse.Namespace) -> tuple[float, float]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    shape = dict(MODELS[name])
    arch = shape.pop("arch", "llama")
    shape.setdefault("tie_word_embeddings", True)
    config = CONFIGS[arch](**shape, max_position_embeddings=max(2048, args.seq))
    with torch.device(device):  # built in place: a 7B model initialised on the CPU would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    if args.checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    prompt = args.seq - args.response
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq)).to(device)
    labels = ids.clone()
    labels[:, :prompt] = -100  # LM loss on the response tokens only
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt:] = True
    field = FlowField(config.hidden_size, width=config.hidden_size, depth=args.flow_depth).to(device)
    flow_opt = torch.optim.AdamW(field.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def policy_step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()

    def policy_and_flow_step() -> None:
        tap = LatentTap(model)
        policy_step()
        latents = tap.latents()
        ctx = torch.ones_like(mask)  # no padding in the benchmark batch
        token_scores(field, latents, tap.layer_values, mask, ("token_post",), 1, (0.8,), generator=generator,
                     context_mask=ctx)  # fmt: skip
        pairs = build_pairs(latents, tap.layer_values, mask, ("token_post",), 1, context_mask=ctx)
        flow_opt.zero_grad(set_to_none=True)
        flow_matching_loss(field, pairs, batch_mul=args.batch_mul, generator=generator).backward()
        flow_opt.step()
        tap.remove()

    a, b = median_times([policy_step, policy_and_flow_step], args.repeats, args.warmup, sync)
    tap = LatentTap(model)
    tap.remove()
    n_policy = sum(p.numel() for p in model.parameters()) / 1e6
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    print(f"# {name}: policy {n_policy:.1f}M params, flow {field.num_params() / 1e6:.1f}M params, "
          f"hooked blocks {tap.indices} of {tap.num_blocks}{peak}", flush=True)  # fmt: skip
    return a, b


def main() -> None:
    args = parse_args()
    dev = torch.device(args.device)
    where = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu, torch threads {torch.get_num_threads()}"
    )
    print(f"# batch {args.batch} x {args.seq} tokens (last {args.response} response), median of {args.repeats} "
          f"(+{args.warmup} warm-up), {where}, policy {args.dtype}, "
          f"checkpointing {args.checkpointing}", flush=True)  # fmt: skip
    rows = []
    for name in args.models:
        rows.append((name, *bench_model(name, args)))
        gc.collect()  # free this model before building the next one
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n| {'model':<14} | {'a (s)':>8} | {'b (s)':>8} | {'ratio b/a':>9} |")
    print(f"|{'-' * 16}|{'-' * 10}:|{'-' * 10}:|{'-' * 11}:|".replace("-:", ":"))
    for name, a, b in rows:
        print(f"| {name:<14} | {a:>8.3f} | {b:>8.3f} | {b / a:>9.2f} |")


if __name__ == "__main__":
    main()
