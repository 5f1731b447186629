"""The ``rlfr`` command: ``rlfr COMMAND [key=value ...] [--config FILE ...] [flags]``.

One way to give a setting: every setting of every command is a ``key=value`` word, read into the command's
typed config (``rlfr.schema``, ``rlfr.commands``) by ``rlfr.config.load_config``: the command's defaults, then
the ``--config`` YAML files (several allowed, later ones win), then the ``key=value`` words, merged key by key.
Values are YAML (``methods=[rlvr,rlfr]``, ``quick=true``); a scalar is a list of one (``report_to=wandb``).
``--show-config`` prints the resolved configuration (every key, its help as a comment; valid ``--config``
input); ``rlfr COMMAND --help`` lists every key with its default, range and help text.

Flags only steer the run itself: ``--config FILE``, ``--show-config``, ``--help``; ``rlfr train``'s
``--resume``, ``--force-resume``, ``--allow-data-change`` and ``--overwrite``; ``rlfr export``'s
``--overwrite`` and ``--push-to-hub REPO``; ``--debug`` (the traceback of an error) and ``-v`` (debug logging);
``rlfr --version``. A misspelt command, key or flag gets a "did you mean".

Errors: anything rlfr raises on purpose (``rlfr.errors``), and the usual bad-input errors of the standard
library, are printed as one line naming the file, key or step, with exit status 2; ``--debug`` shows the
traceback instead. A run stopped by SIGTERM / Ctrl-C after writing its checkpoint exits with 75 (resumable).

Only what the chosen command needs is imported: ``rlfr --help`` imports no config and no recipe, ``rlfr train
--help`` and ``--show-config`` the config schema only (no torch); the recipe (torch, transformers, ...) when
the command runs. (``benchmarks/cli_startup.py`` measures it.)
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Iterator

from rlfr import __version__
from rlfr.config import describe, load_config, to_yaml, valid_keys
from rlfr.errors import EXIT_ERROR, EXIT_RESUMABLE, Interrupted, RlfrError
from rlfr.schema import RESUMABLE_KEYS

# name -> (recipe module, "module:ConfigClass", help, the command's own flags)
_COMMANDS = {
    "demo": ("rlfr.recipes.demo", "rlfr.commands:DemoConfig",
             "the whole pipeline on the embedded model and task (the main job)", ()),
    "sft": ("rlfr.recipes.sft", "rlfr.schema:SFTConfig", "cold-start supervised fine-tuning on worked solutions", ()),
    "flow-pretrain": ("rlfr.recipes.flow_pretrain", "rlfr.schema:FlowPretrainConfig",
                      "train the flow field on expert latents (policy frozen)", ()),
    "convert-flow": ("rlfr.recipes.convert_flow", "rlfr.commands:ConvertFlowConfig",
                     "turn the authors' released flow weights into an rlfr flow directory", ()),
    "train": ("rlfr.recipes.train", "rlfr.schema:TrainConfig", "RL: method=rlfr | rlvr | entropy",
              ("--resume", "--force-resume", "--allow-data-change", "--overwrite")),
    "data": ("rlfr.recipes.data", None,
             "data download: benchmarks into the datasets cache; data prepare: flow-pretraining data from solutions",
             ()),
    "export": ("rlfr.recipes.export", "rlfr.commands:ExportConfig",
               "a checkpoint's policy as a Hugging Face model with a model card (LoRA adapters merged)",
               ("--overwrite", "--push-to-hub")),
    "eval": ("rlfr.recipes.evaluate", "rlfr.commands:EvalConfig",
             "greedy pass@1 / sampled pass@k on benchmarks or the embedded split", ()),
    "compare": ("rlfr.recipes.compare", "rlfr.commands:CompareConfig",
                "base vs RLVR vs RLFR vs entropy shaping (and ablations) over seeds", ()),
    "inspect": ("rlfr.recipes.inspect_flow", "rlfr.commands:InspectConfig",
                "an HTML page colouring response tokens by flow reward", ()),
    "select": ("rlfr.recipes.select", "rlfr.commands:SelectConfig",
               "choose among N samples by votes, flow and log-prob scores; accuracy against N", ()),
}  # fmt: skip
# flag -> (its value's name or None, help)
_FLAGS = {
    "--config": ("FILE", "a YAML file of settings (repeatable: later files win; key=value words win over files)"),
    "--show-config": (None, "print the resolved configuration (valid --config input) and exit"),
    "--resume": (None, "continue from the newest intact checkpoint in out_dir (from step 0 when it has none yet); "
                       "a change to a key outside the resumable ones (below) is refused"),
    "--force-resume": (None, "resume even though keys that change what the run is were changed"),
    "--allow-data-change": (None, "with --resume: continue although a data file's content changed since the run "
                                  "started (refused otherwise)"),
    "--overwrite": (None, "replace what is already in the output directory"),
    "--push-to-hub": ("REPO", "upload the exported folder (weights and model card) to this Hugging Face Hub repo"),
    "--debug": (None, "show the full traceback of an error"),
    "--verbose": (None, "debug logging (also -v)"),
}  # fmt: skip
_COMMON = ("--config", "--show-config", "--debug", "--verbose")


class UsageError(Exception):
    pass


def _suggest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def _config_class(command: str):
    module, _, name = _COMMANDS[command][1].partition(":")
    return getattr(importlib.import_module(module), name)


def parse(argv: list[str]) -> argparse.Namespace:
    """The words of a command line -> Namespace(command, files, overrides, flags, show_config, help, debug,
    verbose, version); ``UsageError`` names what is wrong."""
    ns = argparse.Namespace(command=None, files=[], overrides=[], flags={}, show_config=False, help=False,
                            debug=False, verbose=False, version=False, rest=None)  # fmt: skip
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            ns.help = True
        elif word in ("-v", "--verbose", "--debug", "--show-config"):
            setattr(ns, {"-v": "verbose"}.get(word, word[2:].replace("-", "_")), True)
        elif word == "--version" and ns.command is None:
            ns.version = True
        elif word == "--config" or word.startswith("--config="):
            ns.files.append(word.partition("=")[2] or next(words, None) or _missing(word))
        elif word.startswith("-"):
            name = word.partition("=")[0]
            allowed = _COMMANDS[ns.command][3] if ns.command else ()
            if name not in allowed:
                raise UsageError(_bad_flag(name, ns.command, allowed))
            if _FLAGS[name][0] is None:
                ns.flags[name] = True
            else:
                ns.flags[name] = word.partition("=")[2] or next(words, None) or _missing(word)
        elif ns.command is None:
            if word not in _COMMANDS:
                raise UsageError(
                    f"unknown command {word!r}{_suggest(word, _COMMANDS)} (rlfr --help lists them)"
                )
            ns.command = word
            if _COMMANDS[word][1] is None:  # parses its own arguments
                ns.rest = list(words)
        elif "=" in word and not word.startswith("="):
            ns.overrides.append(word)
        else:
            raise UsageError(
                f"override {word!r} must look like key=value, or be a flag (rlfr {ns.command} --help)"
            )
    return ns


def _missing(flag: str) -> str:
    raise UsageError(f"{flag} needs a value")


def _bad_flag(flag: str, command: str | None, allowed) -> str:
    key = flag.lstrip("-").replace("-", "_")
    leaves = {k.rpartition(".")[2]: k for k in reversed(_keys(command))} if command is not None else {}
    if key in leaves or (key.startswith("no_") and key[3:] in leaves):  # --quick, --no-progress, --eval-sets
        value = f"{leaves[key]}=VALUE" if key in leaves else f"{leaves[key[3:]]}=false"
        return f"{flag} is not a flag: settings are key=value words, e.g. {value} (rlfr {command} --help)"
    valid = [*_COMMON, *allowed]
    return f"unknown flag {flag}{_suggest(flag, valid)} (flags{f' of rlfr {command}' if command else ''}: {', '.join(valid)})"


def _keys(command: str) -> list[str]:
    return valid_keys(_config_class(command), sections=False) if _COMMANDS[command][1] else []


def print_help(command: str | None) -> None:
    if command is None:
        print("usage: rlfr COMMAND [key=value ...] [--config FILE ...] [flags]\n\n"
              "RL for language models with flow rewards (RLFR, arXiv 2510.10201)\n\ncommands:")  # fmt: skip
        for name, (_, _, text, _) in _COMMANDS.items():
            print(f"  {name:14s} {text}")
        print("\nrlfr COMMAND --help lists its settings; rlfr --version prints the version")
        return
    _, _, text, own = _COMMANDS[command]
    flags = [*_COMMON, *own]
    print(f"usage: rlfr {command} [key=value ...] " + " ".join(f"[{f}{' ' + _FLAGS[f][0] if _FLAGS[f][0] else ''}]"
                                                            for f in flags) + f"\n\n{text}\n\nflags:")  # fmt: skip
    for f in flags:
        print(f"  {f + (' ' + _FLAGS[f][0] if _FLAGS[f][0] else ''):22s} {_FLAGS[f][1]}")
    if command == "train":
        print(f"\nkeys that may change on --resume (and are applied): {', '.join(RESUMABLE_KEYS)}")
    rows = describe(load_config(_config_class(command)))
    width = max(len(k) for k, _, _ in rows) + 2
    print("\nsettings (key=value; default; help):")
    for key, default, help_text in rows:
        print(f"  {key:{width}s} {default:24s} {help_text}")


def _run_legacy(command: str, module_name: str, argv: list[str]) -> int:
    """A command whose module still parses its own arguments (``add_arguments(parser)``, ``run(args)``)."""
    parser = argparse.ArgumentParser(prog=f"rlfr {command}", description=_COMMANDS[command][2])
    parser.add_argument("--debug", action="store_true", help=_FLAGS["--debug"][1])
    parser.add_argument("-v", "--verbose", action="store_true", help=_FLAGS["--verbose"][1])
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # key=value words before or after flags
    try:
        return int(module.run(args) or 0)
    except (RlfrError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"rlfr {command}: error: {e} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


class OnceFilter(logging.Filter):
    """Lets each distinct warning (level, logger, text) through once per process: a library that warns on every
    call or every model load (transformers' load report, printed once for the policy and once for the
    reference model of a KL run) says it once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.name, record.getMessage())
        first = key not in self.seen
        self.seen.add(key)
        return first


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """INFO logging on stderr (DEBUG with -v) while a command runs; each warning once per handler, transformers'
    own handler included. Every handler gets its own filter (one shared filter would let a warning through the
    first handler only), and the filters come off again when the command ends, so a caller that runs ``main()``
    in its own process (a test, a notebook) keeps its handlers as they were."""
    import transformers.utils.logging as hf_logging  # lazy: the recipe about to run imports transformers anyway

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    added = []
    for handler in [*logging.getLogger().handlers, *hf_logging.get_logger().handlers]:
        once = OnceFilter()
        handler.addFilter(once)
        added.append((handler, once))
    try:
        yield
    finally:
        for handler, once in added:
            handler.removeFilter(once)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:  # `rlfr train --help | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush raises nothing
        return 0


def _main(argv: list[str]) -> int:
    try:
        ns = parse(argv)
    except UsageError as e:
        print(f"rlfr: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if ns.version:
        print(f"rlfr {__version__}")
        return 0
    if ns.rest is not None:  # a command that parses its own arguments (module.add_arguments, run(args))
        with _logging(ns.verbose or any(w in ("-v", "--verbose") for w in ns.rest)):
            return _run_legacy(ns.command, _COMMANDS[ns.command][0], ns.rest)
    if ns.help or ns.command is None:
        print_help(ns.command)
        return 0 if ns.help else EXIT_ERROR
    module_name, _, _, own = _COMMANDS[ns.command]
    try:
        cfg = load_config(_config_class(ns.command), ns.files, ns.overrides)
        if ns.show_config:
            print(
                f"# rlfr {ns.command}: the resolved configuration (valid input to --config)\n{to_yaml(cfg)}",
                end="",
            )
            return 0
        with _logging(ns.verbose):
            module = importlib.import_module(module_name)
            flags = {
                f[2:].replace("-", "_"): ns.flags.get(f, False if _FLAGS[f][0] is None else None) for f in own
            }
            return int(module.run(cfg, **flags) or 0)
    except Interrupted as e:
        print(f"rlfr {ns.command}: {e}", file=sys.stderr)
        return EXIT_RESUMABLE
    except (RlfrError, ValueError, OSError, FloatingPointError) as e:
        if ns.debug:
            raise
        print(f"rlfr {ns.command}: error: {e} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
