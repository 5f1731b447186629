"""``rlfr data``: the data a run needs, made ready before the run.

    rlfr data download math500 aime24          # benchmarks into the datasets cache (all six without names)
    rlfr data prepare data.train=you/solutions model.name_or_path=Qwen/Qwen2.5-Math-1.5B \\
        data.template=authors_flow_qwen max_length=8192 out_dir=data/flow

``download`` (``DownloadConfig``) fetches the evaluation benchmarks of ``rlfr.data.benchmarks`` from the Hub into
the ``datasets`` cache, where ``data.eval=benchmark:NAME`` then finds them, offline too (``HF_DATASETS_OFFLINE=1``).
``prepare`` (``PrepareConfig``) turns a dataset of expert solutions into flow-pretraining input with the template,
cutoff and held-out split of ``rlfr.data.prepare``, printing counts, length percentiles and how many rows were cut,
and the ``rlfr flow-pretrain`` command that reads what it wrote.
"""

from __future__ import annotations

import argparse
import shlex

from rlfr.commands import DownloadConfig, PrepareConfig
from rlfr.config import add_config_arguments, describe, load_config, to_yaml
from rlfr.data.benchmarks import BENCHMARKS, download
from rlfr.data.examples import Fields, read_examples
from rlfr.data.images import IMAGE_FIELDS
from rlfr.data.prepare import prepare_flow_data, write_prepared
from rlfr.errors import ConfigError
from rlfr.policy.loading import load_tokenizer

ACTIONS = {"download": DownloadConfig, "prepare": PrepareConfig}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = settings_help()
    p.add_argument(
        "action",
        choices=tuple(ACTIONS),
        help="download: benchmarks into the cache; prepare: flow-pretraining data",
    )
    add_config_arguments(p, "benchmark names (download), data.train=my.jsonl max_length=8192 (prepare)")


def settings_help() -> str:
    """Each action's settings (key=value; default; help), as ``rlfr COMMAND --help`` lists them."""
    parts = []
    for action, cls in ACTIONS.items():
        rows = describe(cls)
        width = max(len(k) for k, _, _ in rows) + 2
        parts.append(f"settings of rlfr data {action} (key=value; default; help):\n"
                     + "\n".join(f"  {k:{width}s} {d:24s} {h}" for k, d, h in rows))  # fmt: skip
    return "\n\n".join(parts)


def run_download(cfg: DownloadConfig) -> dict[str, int]:
    """Fetch ``cfg.benchmarks``; prints one line per benchmark."""
    rows = download(cfg.benchmarks)
    for name, n in rows.items():
        b = BENCHMARKS[name]
        subset = f" ({b.subset})" if b.subset else ""
        print(f"{name}: {n} rows from {b.hub_id}{subset}, split {b.split} -> data.eval=benchmark:{name}")
    return rows


def run_prepare(cfg: PrepareConfig):
    """Read, measure, cut, split and write (module docstring); -> ``rlfr.data.prepare.Prepared``."""
    d = cfg.data
    if not d.train:
        raise ConfigError(
            "rlfr data prepare needs data.train: the expert solutions (a file, a directory or a Hub id)"
        )
    fields = Fields(prompt=d.prompt_field, solution=d.solution_field, skip_bad_rows=d.skip_bad_rows, image="none",
                    need_answer=False, system_prompt=d.system_prompt)  # fmt: skip
    examples = read_examples(d.train, fields, subset=d.subset, split=d.split)  # before the tokenizer loads
    if not examples:
        raise ConfigError(f"data.train={d.train}: no rows to prepare")
    with_images = sorted({c for e in examples for c in IMAGE_FIELDS if e.columns.get(c)})
    if with_images:  # the rows written are text-only chats: the images would be dropped
        raise ConfigError(
            f"data.train={d.train} has images (column {', '.join(with_images)}); rlfr data prepare writes text-only "
            "rows: flow-pretrain a vision-language model on the dataset itself (data.train=..., data.image_field)"
        )
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    prepared = prepare_flow_data(examples, d.template, tok, cfg.max_length, cfg.overlong, cfg.heldout_fraction,
                                 cfg.seed)  # fmt: skip
    if not prepared.splits["train"]:
        raise ConfigError(
            f"every row is longer than max_length={cfg.max_length} tokens ({prepared.stats.lines()[1]}); raise it"
        )
    paths = write_prepared(prepared, cfg.out_dir, cfg.format)
    for line in prepared.stats.lines():
        print(line)
    print("wrote " + ", ".join(map(str, paths)))
    source = [f"data.train={cfg.out_dir}/train.jsonl"] if cfg.format == "jsonl" else [
        f"data.train={cfg.out_dir}", "data.split=train"]  # fmt: skip
    # data.eval= (none): flow-pretrain then trains on every row written here (with data.eval=auto it would hold
    # data.eval_size rows out for the RL stages' evaluation); its held-out loss comes from its heldout_fraction
    words = [f"model.name_or_path={cfg.model.name_or_path}", *source, "data.eval=", "data.prompt_field=messages",
             f"data.template={d.template}"]  # fmt: skip
    print("next: rlfr flow-pretrain " + " ".join(shlex.quote(w) for w in words))
    return prepared


def run(args) -> int:
    words = [w for w in args.overrides if "=" not in w]
    settings = [w for w in args.overrides if "=" in w]
    if args.action == "download" and words:
        settings.append(f"benchmarks=[{','.join(words)}]")
    elif words:
        raise ConfigError(f"rlfr data prepare takes key=value settings, got {words}")
    cfg = load_config(ACTIONS[args.action], args.config, settings)
    if args.show_config:
        print(
            f"# rlfr data {args.action}: the resolved configuration (valid input to --config)\n{to_yaml(cfg)}",
            end="",
        )
    elif args.action == "download":
        run_download(cfg)
    else:
        run_prepare(cfg)
    return 0
