"""``rlfr train``: RL with flow rewards (``--method rlfr``), plain RLVR, or entropy-shaped advantages."""

from __future__ import annotations

import argparse
import json

from rlfr.config import add_config_arguments, load_config, print_config_help
from rlfr.schema import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "flow.reward.beta=0.02 steps=200 (presets: configs/*.yaml)")
    p.add_argument("--method", choices=["rlfr", "rlvr", "entropy"], help="shorthand for method=...")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")


def run(args) -> int:
    if args.show_config:
        print_config_help(TrainConfig)
        return 0
    overrides = list(args.overrides) + ([f"method={args.method}"] if args.method else [])
    cfg = load_config(TrainConfig, args.config, overrides)
    from rlfr.engine import run_train

    res = run_train(cfg, resume=args.resume)
    res.pop("history")
    print(json.dumps(res, indent=2))
    return 0
