"""Peak GPU memory of one RL step: full fine-tuning (DDP) against LoRA, with and without gradient checkpointing.

Reproduce (one GPU; a few minutes)::

    python benchmarks/memory.py                                  # 1.5B and 7B shapes, 32 rollouts x 1024 tokens
    python benchmarks/memory.py --sizes 7b --modes lora-gc --micro-batch 8
    python benchmarks/memory.py --tiny                           # seconds, on the CPU: checks the script works

Each row runs in a fresh subprocess (so that one configuration's peak never shows in another's) and builds,
from random weights with the dimensions of Qwen2.5-Math-1.5B / -7B (no download), in bf16:

- the policy, with ``model.lora`` and ``model.gradient_checkpointing`` as the mode says; ``full-ddp`` wraps it in
  DDP (a one-process group, so its gradient buckets are counted as on 8 GPUs);
- the flow (width = hidden size; depth 4 / 6 and batch_mul 4 / 2 as the presets) and its optimizer;
- a synthetic rollout batch: ``--rollouts`` sequences of ``--prompt`` + ``--response`` tokens, half of them
  "correct" (so the online flow update trains on them), groups of 8.

and then runs ``rlfr.rl.step.update`` once: per micro-batch the policy forward (log-probs, entropies, latents
through the tap), flow scores and rewards, the PPO loss and its backward, the online flow loss and its
backward; then the AdamW steps of the policy and the flow (their states allocated here). Generation is not
included: its KV cache (32 x 1,280 tokens x 28 blocks x 2 x 512 values x 2 bytes = 2.2 GiB for the 7B shape) is
small next to the update. Reported: peak allocated and peak reserved CUDA memory, with the parameter /
gradient / AdamW-state arithmetic next to it (docs/lora_fsdp.md); "OOM" when the step does not fit.

AdamW's state is as rlfr trains: for the bf16 policy a float32 copy and float32 moments
(``policy.master_weights``, the default since the table in docs/lora_fsdp.md was measured; before, bf16
moments), for PEFT's adapters and the flow fp32 moments. ``--tiny`` uses a 4-block, hidden-64 model and 4 rollouts x 24 tokens on the CPU (peak RSS of the
child process); without CUDA and without ``--tiny`` the script refuses to run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import torch

SIZES = {  # Qwen2.5-Math-1.5B / -7B (config.json), random init
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, flow_depth=4, batch_mul=4),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, flow_depth=6, batch_mul=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, flow_depth=2, batch_mul=2),
}  # fmt: skip
MODES = {  # name -> (LoRA rank, gradient checkpointing, DDP)
    "full-ddp": (0, False, True),
    "full-ddp-gc": (0, True, True),
    "lora": (64, False, False),
    "lora-gc": (64, True, False),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GB = 1024**3


def estimate(size: str, mode: str, master_weights: bool = True) -> dict[str, float]:
    """Bytes (GB) of the policy's weights, gradients and AdamW state, by arithmetic: bf16 weights (2 bytes per
    value) plus PEFT's adapters (fp32, 4 bytes), a gradient per trained value in its dtype, and under DDP one
    more gradient copy (its buckets); AdamW's state: for bf16 weights with ``master_weights``
    (``policy.master_weights``, the default) a float32 copy and two float32 moments (12 bytes), without it two
    bf16 moments (4 bytes); for fp32 adapters two fp32 moments (8 bytes). Activations and the flow are not in
    it."""
    d = SIZES[size]
    h, i, n_layers, v = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
    kv = d["num_key_value_heads"] * h // d["num_attention_heads"]  # k / v projection width
    # q, o: h x h; k, v: h x kv (q, k, v with biases); MLP: 3 h x i; two RMSNorms
    block = 2 * h * h + 2 * h * kv + 3 * h * i + (h + 2 * kv) + 2 * h
    total = n_layers * block + v * h * (1 if d["tie_word_embeddings"] else 2) + h
    rank, _, ddp = MODES[mode]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of the adapted Linears
    trained = n_layers * sum(rank * (a + b) for a, b in shapes) if rank else total
    per = 4 if rank else 2  # bytes per trained value
    out = {"params_B": total / 1e9, "trained_B": trained / 1e9}
    out["weights_GB"] = (2 * total + (per * trained if rank else 0)) / GB
    out["grads_GB"] = per * trained * (2 if ddp else 1) / GB
    out["adam_GB"] = (2 * per if rank or not master_weights else 12) * trained / GB
    out["static_GB"] = out["weights_GB"] + out["grads_GB"] + out["adam_GB"]
    return out


def run_one(args: argparse.Namespace) -> dict:
    """One configuration, in this process: build, one update, peak memory."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlfr.config import load_config
    from rlfr.flow.learner import FlowLearner
    from rlfr.flow.store import build_flow
    from rlfr.policy.latents import LatentTap
    from rlfr.policy.loading import enable_gradient_checkpointing
    from rlfr.policy.lora import apply_lora
    from rlfr.policy.rollout import Rollout
    from rlfr.rl.advantages import group_advantages
    from rlfr.rl.step import Batch, Components, update
    from rlfr.runtime.env import make_accelerator
    from rlfr.runtime.metrics import Accum
    from rlfr.runtime.optim import build_optimizer, optimizer_step
    from rlfr.schema import TrainConfig

    dims = dict(SIZES[args.size])
    depth, batch_mul = dims.pop("flow_depth"), dims.pop("batch_mul")
    rank, checkpointing, ddp = MODES[args.mode]
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(
        TrainConfig,
        overrides=[f"model.lora.rank={rank}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                   "model.dtype=bfloat16", f"policy.micro_batch_size={args.micro_batch}", "policy.lr=1e-6",
                   f"rollout.num_generations={args.group}", f"flow.depth={depth}", f"flow.batch_mul={batch_mul}",
                   "flow.latent_norm=none", "flow.soft_flow=0.0", f"cpu={str(not cuda).lower()}"],
    )  # fmt: skip
    acc = make_accelerator(cfg.cpu)
    torch.manual_seed(0)
    with device:
        config = Qwen2Config(**dims, rms_norm_eps=1e-6, use_cache=False)
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if checkpointing:
        enable_gradient_checkpointing(policy)
    policy = apply_lora(policy, cfg.model.lora)
    policy.train()
    tap = LatentTap(policy, cfg.flow.fractions)
    bundle = build_flow(cfg.flow, policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt, sched = build_optimizer(trainable, 1e-6, (0.9, 0.95), 0.0, 10, 0.0, "constant")
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                               world_size=1, rank=0)  # fmt: skip
        policy = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[0] if cuda else None)
    bundle.field.to(device)
    flow = FlowLearner(cfg.flow, bundle, tap, reduce=acc.reduce, backward=acc.backward,
                       optimizer_step=functools.partial(optimizer_step, acc))  # fmt: skip
    flow.attach_optimizer(
        *build_optimizer(bundle.field.parameters(), 1e-4, (0.9, 0.95), 0.0, 10, 0.0, "cosine")
    )
    c = Components(cfg=cfg, acc=acc, policy=policy, tokenizer=None, policy_opt=opt, policy_sched=sched,
                   reward=None, flow=flow)  # fmt: skip
    b, p_len, r_len = args.rollouts, args.prompt, args.response
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, dims["vocab_size"], (b, p_len + r_len), generator=g)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, p_len:] = True
    ro = Rollout(ids, torch.ones_like(ids), response, torch.arange(b) // args.group, [""] * b,
                 torch.zeros(b, dtype=torch.bool)).to(device)  # fmt: skip
    correct = (torch.arange(b) % 2 == 0).to(device)
    reward = correct.float()
    batch = Batch(ro, reward, correct, group_advantages(reward, args.group, normalize_std=True))
    static = torch.cuda.memory_allocated() / GB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    log = Accum()
    update(c, batch, 0, log)
    if cuda:
        torch.cuda.synchronize()
    out = {"size": args.size, "mode": args.mode, "seconds": time.time() - t0, "device": str(device)}
    if cuda:
        out |= {"weights_GB": static, "peak_GB": torch.cuda.max_memory_allocated() / GB,
                "reserved_GB": torch.cuda.max_memory_reserved() / GB}  # fmt: skip
    else:
        out["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    out["policy_loss"] = log.means().get("policy/loss")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1.5b", "7b"], choices=[s for s in SIZES if s != "tiny"])
    ap.add_argument("--modes", nargs="+", default=["full-ddp", "lora", "lora-gc"], choices=list(MODES))
    ap.add_argument("--rollouts", type=int, default=32, help="sequences in the step")
    ap.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    ap.add_argument("--response", type=int, default=1024, help="response tokens per sequence")
    ap.add_argument(
        "--micro-batch", type=int, default=4, help="sequences per forward/backward (the 7B preset: 4)"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="a tiny model and batch on the CPU: checks the script"
    )
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--port", type=int, default=29611, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.size, args.mode = args.one
        try:
            result = run_one(args)
        except torch.OutOfMemoryError as e:
            result = {"size": args.size, "mode": args.mode, "oom": str(e).splitlines()[0]}
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.tiny:
        args.sizes, args.cpu = ["tiny"], True
        args.rollouts, args.group, args.prompt, args.response, args.micro_batch = 4, 2, 8, 16, 2
    elif not torch.cuda.is_available():
        print("benchmarks/memory.py measures GPU memory and needs CUDA (torch.cuda.is_available() is False); "
              "`--tiny` runs a seconds-long check of the script on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", size, mode, "--rollouts", str(args.rollouts),
                   "--group", str(args.group), "--prompt", str(args.prompt), "--response", str(args.response),
                   "--micro-batch", str(args.micro_batch), "--port", str(args.port)] + (["--cpu"] if args.cpu else [])  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{size} {mode}: the measuring process failed (exit {proc.returncode})")
            rows.append(json.loads(found[0][len("RESULT ") :]) | {"estimate": estimate(size, mode)})
    print_table(rows, args)
    return 0


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    where = "CPU (peak RSS of the process)" if args.cpu else torch.cuda.get_device_name()
    print(f"\nOne RL step: {args.rollouts} rollouts x ({args.prompt} prompt + {args.response} response) tokens, "
          f"micro-batch {args.micro_batch}, bf16 policy, flow included; {where}")  # fmt: skip
    head = f"{'size':5s} {'mode':12s} {'params':>7s} {'trained':>8s} {'static est.':>11s} {'measured peak':>14s} "
    print(head + f"{'reserved':>9s} {'step s':>7s}")
    for r in rows:
        e = r["estimate"]
        peak = "OOM" if "oom" in r else _gb(r.get("peak_GB", r.get("peak_rss_GB")))
        reserved = f"{r['reserved_GB']:.2f} GiB" if "reserved_GB" in r else "-"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        print(f"{r['size']:5s} {r['mode']:12s} {_count(e['params_B']):>7s} {_count(e['trained_B']):>8s} "
              f"{_gb(e['static_GB']):>11s} {peak:>14s} {reserved:>9s} {secs:>7s}")  # fmt: skip


def _count(billions: float) -> str:
    return f"{billions:.2f}B" if billions >= 0.1 else f"{billions * 1e3:.2f}M"


def _gb(gb: float) -> str:
    return f"{gb:.1f} GiB" if gb >= 1 else f"{gb * 1024:.1f} MiB"  # GB = 1024**3 bytes


if __name__ == "__main__":
    raise SystemExit(main())
