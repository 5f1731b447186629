"""Flow precision: float32 against bfloat16 autocast (float32 master weights), side by side.

Reproduce:
    .venv/bin/python benchmarks/flow_precision.py                   # CPU, d = 576 (SmolLM2 width)
    .venv/bin/python benchmarks/flow_precision.py --dim 1536 --pairs 18432 --device cuda   # Qwen2.5-1.5B width

Two identical flows (same init) are trained on the same synthetic conditional problem (x1 = A c + noise,
the structure a flow learns from latents) with the same (t, eps) draws, one in float32 and one under bf16
autocast; then both score the same pairs with the same noise. Prints
- the loss curves' largest relative gap and the final losses,
- the scores' median / 99th-percentile relative error, the rank correlation of the per-sequence scores,
  and the agreement of the shaped flow rewards (which tokens get a penalty: eta 0.6, top-k 15),
- median times of scoring and of a training forward + backward in each precision.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlfr.flow import FlowField, FlowPairs, flow_matching_loss, velocity_deviation
from rlfr.flow.shaping import shape_flow_rewards


def pairs_for(n: int, d: int, gen: torch.Generator, device) -> FlowPairs:
    a = torch.randn(d, d, generator=gen) / d**0.5
    cond = torch.randn(n, d, generator=gen)
    target = cond @ a.T + 0.1 * torch.randn(n, d, generator=gen)
    z = torch.zeros(n, dtype=torch.long)
    return FlowPairs(target.to(device), cond.to(device), torch.full((n,), 0.5, device=device), z, z, z, z)


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2048, help="pairs per training step and scored pairs")
    ap.add_argument("--steps", type=int, default=100, help="training steps of each copy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--curves", action="store_true", help="print both loss curves, step by step")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare against true float32
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    f32 = FlowField(args.dim, depth=args.depth).to(device)
    f16 = FlowField(args.dim, depth=args.depth).to(device)
    f16.load_state_dict(f32.state_dict())
    opts = {k: torch.optim.AdamW(f.parameters(), lr=1e-3) for k, f in (("f32", f32), ("bf16", f16))}
    losses: dict[str, list[float]] = {"f32": [], "bf16": []}
    data = [pairs_for(args.pairs, args.dim, gen, device) for _ in range(4)]
    for step in range(args.steps):
        batch = data[step % len(data)]
        for name, field, dtype in (("f32", f32, None), ("bf16", f16, torch.bfloat16)):
            g = torch.Generator(device=device).manual_seed(step)  # the same (t, eps) for both
            loss = flow_matching_loss(field, batch, 1, generator=g, autocast_dtype=dtype)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            losses[name].append(loss.item())
    gaps = [abs(a - b) / a for a, b in zip(losses["f32"], losses["bf16"])]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    print(f"flow d={args.dim} depth={args.depth}, {args.pairs} pairs, {args.steps} steps on {device}")
    print(f"loss curves: first {losses['f32'][0]:.4f}, final f32 {losses['f32'][-1]:.4f} / bf16 "
          f"{losses['bf16'][-1]:.4f}; relative gap median {statistics.median(gaps):.4f}, largest {gaps[worst]:.4f} "
          f"at step {worst + 1} (f32 {losses['f32'][worst]:.4f}, bf16 {losses['bf16'][worst]:.4f})")  # fmt: skip
    if args.curves:
        print("step  f32       bf16")
        for i, (a, b) in enumerate(zip(losses["f32"], losses["bf16"]), 1):
            print(f"{i:4d}  {a:8.4f}  {b:8.4f}")
    # scores of the float32-trained field, computed both ways with the same noise
    held = pairs_for(args.pairs, args.dim, gen, device)
    noise = torch.randn((1, args.pairs, args.dim), generator=gen).to(device)

    def score(dtype):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return velocity_deviation(f32, held.target, held.cond, held.layer, (0.8,), noise=noise)

    s32, s16 = score(None), score(torch.bfloat16)
    rel = ((s16 - s32).abs() / s32.abs().clamp(min=1e-8)).cpu()
    rows, per = args.pairs // 64, 64  # as if 64-token sequences
    a, b = s32[: rows * per].view(rows, per), s16[: rows * per].view(rows, per)
    rank_a, rank_b = a.argsort(1).argsort(1).float(), b.argsort(1).argsort(1).float()
    rho = torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(rank_a, rank_b)]).mean()
    valid = torch.ones_like(a, dtype=torch.bool)
    ra, rb = shape_flow_rewards(a, valid), shape_flow_rewards(b, valid)
    agree = ((ra != 0) == (rb != 0)).float().mean()
    print(f"scores: median relative error {rel.median():.4f}, 99th percentile {rel.quantile(0.99):.4f}; "
          f"rank correlation within sequences {rho:.4f}; shaped-reward selection agreement {agree:.4f}")  # fmt: skip
    t_s = {
        n: timed(lambda d=d: score(d), args.repeats, sync)
        for n, d in (("f32", None), ("bf16", torch.bfloat16))
    }

    def train_once(field, dtype):
        field.zero_grad()
        flow_matching_loss(field, data[0], 1, autocast_dtype=dtype).backward()

    t_t = {n: timed(lambda f=f, d=d: train_once(f, d), args.repeats, sync)
           for n, f, d in (("f32", f32, None), ("bf16", f16, torch.bfloat16))}  # fmt: skip
    print(f"{'precision':10s} {'scoring (ms)':>13s} {'train fwd+bwd (ms)':>19s}")
    for n in ("f32", "bf16"):
        print(f"{n:10s} {1000 * t_s[n]:13.1f} {1000 * t_t[n]:19.1f}")


if __name__ == "__main__":
    main()
