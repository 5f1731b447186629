"""The ``rlfr`` command.

Subcommands are thin: each recipe module (``rlfr.recipes.*``) exposes ``add_arguments(parser)`` and
``run(args) -> int``. Stages with a typed config (``sft``, ``flow-pretrain``, ``train``) take
``--config FILE.yaml`` plus ``key=value`` overrides, before or after the flags, in the order given;
``rlfr <cmd> --show-config`` prints every key with its default and help text.

Errors: anything rlfr raises on purpose (``rlfr.errors``), and the usual bad-input errors of the standard
library, are printed as one line naming the file, key or step, with exit status 2; ``--debug`` shows the
traceback instead. A run stopped by SIGTERM / Ctrl-C after writing its checkpoint exits with 75 (resumable).

Only the chosen command's recipe module is imported (and with it torch, transformers, ...): ``rlfr --help``
imports no recipe, ``rlfr train --help`` only ``rlfr.recipes.train``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rlfr.errors import EXIT_ERROR, EXIT_RESUMABLE, Interrupted, RlfrError

_COMMANDS = {
    "demo": ("rlfr.recipes.demo", "the whole pipeline on the embedded model and task (the main job)"),
    "sft": ("rlfr.recipes.sft", "cold-start supervised fine-tuning on worked solutions"),
    "flow-pretrain": ("rlfr.recipes.flow_pretrain", "train the flow field on expert latents (policy frozen)"),
    "convert-flow": (
        "rlfr.recipes.convert_flow",
        "turn the authors' released flow weights into an rlfr flow directory",
    ),
    "train": ("rlfr.recipes.train", "RL: --method rlfr | rlvr | entropy"),
    "export": ("rlfr.recipes.export", "a checkpoint's policy as a Hugging Face model (LoRA adapters merged)"),
    "eval": ("rlfr.recipes.evaluate", "greedy pass@1 / sampled pass@k on benchmarks or the embedded split"),
    "compare": ("rlfr.recipes.compare", "base vs RLVR vs RLFR vs entropy shaping (and ablations) over seeds"),
    "inspect": ("rlfr.recipes.inspect_flow", "an HTML page colouring response tokens by flow reward"),
    "select": (
        "rlfr.recipes.select",
        "choose among N samples by votes, flow and log-prob scores; accuracy against N",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)  # the options before it take no value
    parser = argparse.ArgumentParser(
        prog="rlfr", description="RL for language models with flow rewards (RLFR)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (mod, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name != chosen:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.add_arguments(p)
        modules[name] = module
    # key=value overrides may come before or after flags (`train --resume steps=5`); argparse takes one
    # positional run only, so the ones after a flag arrive as unknown arguments and are put back here
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
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
    try:
        return int(modules[args.command].run(args) or 0)
    except Interrupted as e:
        print(f"rlfr {args.command}: {e}", file=sys.stderr)
        return EXIT_RESUMABLE
    except (RlfrError, ValueError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        print(f"rlfr {args.command}: error: {e} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
