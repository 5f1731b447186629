"""Per-layer, per-dimension standardisation of tapped latents before they reach the flow.

Why (a departure from the paper, which feeds raw hidden states): decoder hidden states have a few
"massive activation" dimensions and per-dimension scales far from 1 (SmolLM2-135M: flow-matching loss
~90 per dimension on raw latents, dominated by those dimensions), while the flow's source noise is
N(0, I). Standardising each hooked layer's latents with statistics of the flow's training data puts
targets and noise on the same scale, so the flow (and the velocity deviation used as reward) models
the structure of the latents rather than a handful of outlier dimensions.

Contract: ``LatentNorm.fit(latents (L, B, T, d), mask (B, T) bool)`` -> statistics over the masked
tokens; ``LatentNorm.fit_batches(iterable of (latents, mask))`` -> the same over several batches, one in memory
at a time (flow pretraining's micro-batches); ``norm(latents) -> (L, B, T, d)`` float32; ``save(dir)`` / ``load(dir)`` use
``latent_norm.safetensors``. ``FlowConfig.latent_norm = "none"`` keeps raw latents (the paper's
setting, and the only choice for the authors' released flows).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILE = "latent_norm.safetensors"


class LatentNorm:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        if mean.shape != std.shape or mean.dim() != 2:
            raise ValueError(
                f"mean and std must both be (L, d), got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("latent statistics must be finite with std > 0")
        self.mean, self.std = mean.float(), std.float()

    @classmethod
    def fit(cls, latents: torch.Tensor, mask: torch.Tensor, min_std: float = 1e-3) -> LatentNorm:
        """Mean and std over the masked tokens of each layer: (L, B, T, d), (B, T) -> stats (L, d)."""
        if not mask.any():
            raise ValueError("LatentNorm.fit: the mask selects no token")
        x = latents.detach().float()[:, mask]  # (L, N, d)
        return cls(x.mean(1), x.std(1, unbiased=False).clamp(min=min_std))

    @classmethod
    def fit_batches(
        cls, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], min_std: float = 1e-3
    ) -> LatentNorm:
        """``fit`` over the masked tokens of several batches ((L, B_i, T_i, d), (B_i, T_i) each), read one at a
        time. One batch: exactly ``fit``. Several: float64 sums of x and x^2 (std = sqrt(E[x^2] - mean^2)),
        equal to ``fit`` on all tokens at once up to rounding."""
        it = iter(batches)
        head = list(itertools.islice(it, 2))
        if not head:
            raise ValueError("LatentNorm.fit_batches: no batch")
        if len(head) == 1:
            return cls.fit(*head[0], min_std=min_std)
        n, total, squares = 0, 0.0, 0.0
        for latents, mask in itertools.chain(head, it):
            x = latents.detach()[:, mask].double()  # (L, N_i, d)
            n, total, squares = n + x.shape[1], total + x.sum(1), squares + (x * x).sum(1)
        if n == 0:
            raise ValueError("LatentNorm.fit_batches: the masks select no token")
        mean = total / n
        std = (squares / n - mean * mean).clamp(min=0).sqrt()
        return cls(mean.float(), std.float().clamp(min=min_std))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[0] != self.mean.shape[0] or latents.shape[-1] != self.mean.shape[-1]:
            raise ValueError(
                f"latents {tuple(latents.shape)} do not match the statistics {tuple(self.mean.shape)}"
            )
        m = self.mean.to(latents.device)[:, None, None]
        s = self.std.to(latents.device)[:, None, None]
        return (latents.float() - m) / s

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        tmp = path.with_name(FILE + ".tmp")
        save_file({"mean": self.mean.contiguous().cpu(), "std": self.std.contiguous().cpu()}, str(tmp))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LatentNorm:
        t = load_file(str(Path(directory) / FILE))
        return cls(t["mean"], t["std"])
