"""``rlfr train``: RL with flow rewards (``--method rlfr``), plain RLVR, or entropy-shaped advantages."""

from __future__ import annotations

import argparse
import json

from rlfr.config import describe, load_config
from rlfr.schema import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/ for the paper's presets)")
    p.add_argument("--method", choices=["rlfr", "rlvr", "entropy"], help="shorthand for method=...")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("--show-config", action="store_true", help="list every key with its default and help")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. flow.reward.beta=0.02 steps=200")


def run(args) -> int:
    if args.show_config:
        for key, default, help_text in describe(TrainConfig):
            print(f"{key:36s} {default:26s} {help_text}")
        return 0
    overrides = list(args.overrides) + ([f"method={args.method}"] if args.method else [])
    cfg = load_config(TrainConfig, args.config, overrides)
    from rlfr.engine import run_train

    res = run_train(cfg, resume=args.resume)
    res.pop("history")
    print(json.dumps(res, indent=2))
    return 0
