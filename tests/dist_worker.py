"""Run by ``accelerate launch`` in tests/test_distributed.py: a short RL run, then each rank writes a
digest of its final policy and flow weights so the test can check that the ranks agree."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    from rlfr.config import load_config
    from rlfr.recipes import train
    from rlfr.schema import TrainConfig

    cfg = load_config(TrainConfig, overrides=sys.argv[1:])
    captured = {}
    original = train.build_components

    def build_and_keep(cfg, acc):
        c, data = original(cfg, acc)
        captured["c"] = c
        return c, data

    train.build_components = build_and_keep
    train.run_train(cfg, progress=False)
    c = captured["c"]
    acc = c.acc
    out = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "policy": digest(acc.unwrap_model(c.policy)),
        "flow": digest(acc.unwrap_model(c.flow.field)),
    }
    Path(cfg.out_dir, f"digest_rank{acc.process_index}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
