"""How much of an AdamW update survives in bfloat16 weights, with and without float32 master copies.

    python benchmarks/bf16_updates.py [--n 100000] [--steps 100] [--scale 0.02] [--lrs 1e-6 1e-5 1e-4]

Weights drawn N(0, scale^2) (0.02: the usual initialisation and the order of trained LLM weights), gradients
N(0, 1) and fresh every step (seed 0), AdamW with the presets' betas (0.9, 0.95) and no weight decay, three
ways: float32 weights (the reference), bfloat16 weights updated by ``torch.optim.AdamW`` directly, and bfloat16
weights updated by ``rlfr.runtime.optim.MasterWeightAdamW`` (``policy.master_weights=true``). Printed per
learning rate: the fraction of weights that moved from their start, and the size of the total update relative
to the float32 reference's (the norm of (w_steps - w_0) over the reference's). The arithmetic is exact and runs
in seconds on a CPU; no timing is measured.
"""

from __future__ import annotations

import argparse

import torch

from rlfr.runtime.optim import MasterWeightAdamW


def run(
    start: torch.Tensor, grads: list[torch.Tensor], lr: float, dtype: torch.dtype, master: bool
) -> torch.Tensor:
    p = torch.nn.Parameter(start.clone().to(dtype))
    cls = MasterWeightAdamW if master else torch.optim.AdamW
    opt = cls([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="weights")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--scale", type=float, default=0.02, help="standard deviation of the weights")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(args.n, generator=gen) * args.scale
    grads = [torch.randn(args.n, generator=gen) for _ in range(args.steps)]
    start16 = start.to(torch.bfloat16).float()  # the bfloat16 runs start from the rounded weights
    print(f"{args.n:,} weights N(0, {args.scale}^2), {args.steps} AdamW steps, gradients N(0, 1)\n")
    print(f"{'lr':>8s} | {'moved: bf16 AdamW':>18s} {'bf16 + fp32 copy':>17s} | "
          f"{'update / fp32 ref: bf16 AdamW':>30s} {'bf16 + fp32 copy':>17s}")  # fmt: skip
    for lr in args.lrs:
        ref = run(start16, grads, lr, torch.float32, master=False) - start16
        plain = run(start16, grads, lr, torch.bfloat16, master=False) - start16
        copy = run(start16, grads, lr, torch.bfloat16, master=True) - start16
        moved = [(d != 0).float().mean().item() for d in (plain, copy)]
        size = [(d.norm() / ref.norm()).item() for d in (plain, copy)]
        print(f"{lr:>8.0e} | {moved[0]:>17.1%} {moved[1]:>17.1%} | {size[0]:>30.3f} {size[1]:>17.3f}")


if __name__ == "__main__":
    main()
