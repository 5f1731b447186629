"""The ``rlfr`` command.

Subcommands are thin: each module that owns a stage exposes ``add_arguments(parser)`` and
``run(args) -> int``. Stages with a typed config (``sft``, ``flow-pretrain``, ``train``) take
``--config FILE.yaml`` plus ``key=value`` overrides; ``rlfr <cmd> --show-config`` prints every key with
its default and help text.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

_COMMANDS = {
    "demo": ("rlfr.recipes.demo", "the whole pipeline on the embedded model and task (the main job)"),
    "sft": ("rlfr.recipes.sft", "cold-start supervised fine-tuning on worked solutions"),
    "flow-pretrain": ("rlfr.recipes.flow_pretrain", "train the flow field on expert latents (policy frozen)"),
    "convert-flow": (
        "rlfr.recipes.convert_flow",
        "turn the authors' released flow weights into an rlfr flow directory",
    ),
    "train": ("rlfr.recipes.train", "RL: --method rlfr | rlvr | entropy"),
    "eval": ("rlfr.recipes.evaluate", "greedy pass@1 / sampled pass@k on benchmarks or the embedded split"),
    "compare": ("rlfr.recipes.compare", "base vs RLVR vs RLFR vs entropy shaping over several seeds"),
    "inspect": ("rlfr.recipes.inspect_flow", "an HTML page colouring response tokens by flow reward"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlfr", description="RL for language models with flow rewards (RLFR)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (mod, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command not in modules:
        parser.error(f"'{args.command}' is not available in this installation")
    from rlfr.config import ConfigError
    from rlfr.policy.loading import ModelLoadError
    from rlfr.runtime.checkpoint import CheckpointError

    try:
        return int(modules[args.command].run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError, ModelLoadError) as e:
        print(f"rlfr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
