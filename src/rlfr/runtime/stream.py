"""Seeded, resumable orders over a dataset: the one data stream of every stage.

``EpochStream(n, seed, reseed_each_epoch)``: positions 0, 1, 2, ... run through epochs of ``n`` items; item
``i`` is ``perm_e[i % n]`` with ``e = i // n``. ``take(start, count)`` gives the items at positions
``start .. start + count - 1``, so a stage that resumes at step s asks for the same positions again and gets
the same items, without replaying the stream.

Two seedings, kept as they were when each stage was written (so that results stay reproducible):
- ``reseed_each_epoch=True`` (RL): ``perm_e = randperm(n, Generator(seed * 100003 + e))``;
- ``False`` (SFT, flow pretraining): ``perm_e`` is the e-th ``randperm(n)`` of one ``Generator(seed)``.

``shard(items, rank, world)`` splits one step's items over processes (every ``world``-th item).
"""

from __future__ import annotations

import torch


class EpochStream:
    def __init__(self, n: int, seed: int, reseed_each_epoch: bool):
        if n < 1:
            raise ValueError(f"an epoch stream needs at least one item, got n={n}")
        self.n, self.seed, self.reseed = n, seed, reseed_each_epoch
        self._perms: list[list[int]] = []
        self._gen = None if reseed_each_epoch else torch.Generator().manual_seed(seed)

    def _perm(self, epoch: int) -> list[int]:
        if self.reseed:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            return torch.randperm(self.n, generator=g).tolist()
        while len(self._perms) <= epoch:  # successive draws of one generator: cache them in order
            self._perms.append(torch.randperm(self.n, generator=self._gen).tolist())
        return self._perms[epoch]

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch, pos = divmod(i, self.n)
            out.append(self._perm(epoch)[pos])
        return out


def shard(items: list, rank: int, world: int, what: str = "items per step") -> list:
    """This process's share of one step's items; ``what`` names the config key in the error."""
    if len(items) % world:
        raise ValueError(f"{what}={len(items)} must be divisible by the {world} processes")
    return items[rank::world]
