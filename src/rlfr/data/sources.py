"""Where problems come from: one resolver for every command.

A data *spec* is one of
- ``embedded`` / ``embedded-dev`` / ``embedded-transfer``: the procedural task (``rlfr.data.tasks``):
  its held-out split, its tuning split, its transfer set; ``embedded-multistep`` (and ``-dev``,
  ``-transfer``): the same for the multi-step task, whose worked solutions take 4-5 steps;
- ``embedded-vl``: the multimodal task (``rlfr.data.vl_task``): its held-out split (its train split when it
  is ``data.train``);
- ``benchmark:NAME`` (or the bare ``NAME``), a benchmark of ``rlfr.data.benchmarks.BENCHMARKS``;
- a data file, a dataset directory or a Hub dataset id (``rlfr.data.examples.load_examples``), with
  ``data.subset`` and ``data.split`` (``data.eval_split`` for the held-out set).

Contract:
- ``load_source(spec, fields, size, task_seed, dev_size, need_solution, subset, split)`` -> the examples of a
  held-out or training spec (``embedded`` or ``embedded-multistep`` as a *training* spec is the task's train
  split: use ``resolve_data``);
- ``resolve_data(data_cfg, need_solution, need_answer) -> (train, eval)``: the two sets of a stage's
  ``DataConfig`` (eval ``[]`` when ``data.eval`` is ``''``), truncated to ``data.eval_size``. ``data.eval=auto``
  (the default) follows the training data: the generated task's own held-out split when ``data.train`` is one,
  else ``data.eval_size`` rows held out of ``data.train`` (``hold_out``: a fixed draw with ``data.task_seed``, so
  every stage on that file holds out the same rows and none trains on them), said at the start;
- ``render_prompts(examples, template, tokenizer, max_prompt_tokens)``: the prompt strings (each example's
  system turn: ``data.system_prompt`` or its chat row's), refusing any longer than ``max_prompt_tokens``;
- ``data_fingerprints(data_cfg)``: the SHA-256 of the data files a ``DataConfig`` names (a resumed run
  refuses data that changed under the same path).
The embedded splits depend on ``data.task_seed`` (and ``data.dev_size``) only, never on the run seed, so runs
with different seeds share one set of problems. The embedded and benchmark sets carry their own columns and
system turn: ``data.*_field`` and ``data.system_prompt`` apply to files and datasets (and ``data.system_prompt``
to every set, through ``fields.system_prompt``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rlfr.data.benchmarks import BENCHMARKS, benchmark_name, load_benchmark
from rlfr.data.examples import Example, Fields, read_examples
from rlfr.data.tasks import EMBEDDED_SETS, EMBEDDED_TASKS, embedded_set, task_splits
from rlfr.data.templates import render_prompt
from rlfr.data.vl_task import vl_task
from rlfr.errors import DataError

VL_SET = "embedded-vl"
GENERATED_SETS = (*EMBEDDED_SETS, VL_SET)  # sets generated here, whose size a command chooses
DEFAULT_FIELDS = Fields()


def describe_specs() -> str:
    return (
        f"{', '.join(EMBEDDED_SETS)}, {VL_SET}, benchmark:NAME ({', '.join(BENCHMARKS)}), a data file, a "
        "dataset directory or a Hub dataset id (owner/name)"
    )


def _with_system(rows: list[Example], system_prompt: str | None) -> list[Example]:
    """``data.system_prompt`` on rows that carry no system turn of their own (generated sets, benchmarks)."""
    if system_prompt is None:
        return rows
    return [r if r.system is not None else replace(r, system=system_prompt) for r in rows]


def load_source(
    spec: str,
    fields: Fields = DEFAULT_FIELDS,
    size: int = 0,
    task_seed: int = 0,
    dev_size: int = 0,
    need_solution: bool = False,
    subset: str | None = None,
    split: str | None = "train",
) -> list[Example]:
    """The examples of ``spec`` (module docstring); ``size`` > 0 keeps the first ``size`` (and is the size
    of an embedded set)."""
    if spec in EMBEDDED_SETS:
        rows = list(embedded_set(spec, max(size, 1), task_seed, dev_size))
    elif spec == VL_SET:
        rows = vl_task(train_size=1, eval_size=max(size, 1), seed=task_seed).eval
    elif (name := benchmark_name(spec)) is not None:
        if spec == name and Path(spec).exists():
            raise DataError(
                f"data {spec!r} names both the benchmark and the local path ./{spec}: write benchmark:{name} for the "
                f"benchmark or ./{spec} for the local data"
            )
        rows = list(load_benchmark(name))
    else:
        try:
            rows = list(read_examples(spec, replace(fields, solution=fields.solution if need_solution else None),
                                      subset=subset, split=split))  # fmt: skip
        except DataError as e:
            if "no such file" in str(e):
                raise DataError(f"data {spec!r} does not exist; a data spec is {describe_specs()}") from None
            raise
    if not rows:
        raise DataError(f"data {spec!r} has no rows")
    if need_solution and any(not r.solution for r in rows):
        raise DataError(f"data {spec!r}: field {fields.solution!r} (worked solutions) is empty in some rows")
    rows = _with_system(rows, fields.system_prompt)
    return rows[:size] if size else rows


def auto_eval(train_spec: str) -> str | None:
    """The set ``data.eval=auto`` names: a generated task's own held-out split when ``data.train`` is that task,
    else None (rows held out of ``data.train``)."""
    return train_spec if train_spec in (*EMBEDDED_TASKS, VL_SET) else None


def hold_out(rows: list[Example], size: int, seed: int, spec: str) -> tuple[list[Example], list[Example]]:
    """(the rest, ``size`` held-out rows) of ``rows``: a draw with ``seed`` (``random.Random``), both in the
    file's order. Refused when nothing would be held out or fewer rows would be left to train on than held out."""
    if size < 1:
        raise DataError(
            f"data.eval=auto holds out data.eval_size rows of {spec} for evaluation, but data.eval_size=0; set "
            "data.eval_size >= 1, name a held-out set (data.eval=FILE), or data.eval='' for none"
        )
    if 2 * size > len(rows):
        raise DataError(
            f"data.eval=auto: holding out data.eval_size={size} of the {len(rows)} rows of {spec} would leave fewer "
            f"to train on than to evaluate; set data.eval_size <= {len(rows) // 2}, or name a held-out set "
            "(data.eval=FILE)"
        )
    held = set(random.Random(seed).sample(range(len(rows)), size))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def fields_of(data, need_answer: bool = True) -> Fields:
    """The ``Fields`` of a ``DataConfig``."""
    # no token spans 64 characters on average, so a longer problem cannot fit max_prompt_tokens
    return Fields(data.prompt_field, data.answer_field, data.solution_field, data.skip_bad_rows,
                  max_problem_chars=64 * data.max_prompt_tokens, image=data.image_field, need_answer=need_answer,
                  system_prompt=data.system_prompt)  # fmt: skip


def resolve_data(
    data, need_solution: bool = False, need_answer: bool = True
) -> tuple[list[Example], list[Example]]:
    """(train, eval) of a ``DataConfig`` (module docstring); ``need_answer=False`` reads no answer column from
    the training data (flow pretraining)."""
    fields = fields_of(data, need_answer)
    if data.train in EMBEDDED_TASKS:
        train = task_splits(
            data.train, data.train_size, eval_size=max(data.eval_size, 1), seed=data.task_seed,
            dev_size=data.dev_size,
        ).train  # fmt: skip
        train = _with_system(train, data.system_prompt)
    elif data.train == VL_SET:
        train = vl_task(
            train_size=data.train_size, eval_size=max(data.eval_size, 1), seed=data.task_seed
        ).train
        train = _with_system(train, data.system_prompt)
    else:
        train = load_source(
            data.train, fields, need_solution=need_solution, subset=data.subset, split=data.split
        )
    spec = auto_eval(data.train) if data.eval == "auto" else data.eval
    if data.eval == "auto" and spec is None:
        train, evals = hold_out(train, data.eval_size, data.task_seed, data.train)
        _say(
            f"data.eval=auto: evaluating on {len(evals)} rows held out of {data.train} (data.eval_size, drawn "
            f"with data.task_seed={data.task_seed}; no stage trains on them); training on the other {len(train)}"
        )
        return train, evals
    evals: list[Example] = []
    same = (spec, data.subset, data.eval_split or data.split) == (data.train, data.subset, data.split)
    if same and spec not in GENERATED_SETS:
        _say(
            f"warning: data.eval is data.train ({spec}, split {data.split}): the held-out accuracy is measured on "
            "rows this run trains on; name another split (data.eval_split=test) or data.eval=auto"
        )
    if spec in GENERATED_SETS and data.eval_size < 1:
        raise DataError(
            f"data.eval={spec} is generated here, so data.eval_size is its size: 0 ('all' rows of a file) would give "
            "it one problem; set data.eval_size >= 1"
        )
    if spec:
        generated = spec in GENERATED_SETS
        evals = load_source(spec, replace(fields, need_answer=True), data.eval_size if generated else 0,
                            data.task_seed, data.dev_size, subset=data.subset,
                            split=data.eval_split or data.split)  # fmt: skip
        if not generated and 0 < data.eval_size < len(evals):
            _say(
                f"data.eval={spec}: evaluating on its first {data.eval_size} of {len(evals)} rows (data.eval_size; "
                "0 = all)"
            )
            evals = evals[: data.eval_size]
    return train, evals


def _say(message: str) -> None:
    """Print ``message`` once per run, not once per process (rank 0 of a launcher's processes, or no launcher)."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def render_prompts(
    examples: Sequence[Example], template: str, tokenizer, max_prompt_tokens: int
) -> list[str]:
    """Prompt strings; with a vision-language processor (``rlfr.policy.vision.ImageTextProcessor``) the
    length counts the image tokens the processor expands each image into."""
    prompts = [
        render_prompt(
            template,
            ex.problem,
            tokenizer,
            len(ex.images),
            getattr(tokenizer, "image_token", None),
            ex.system,
        )
        for ex in examples
    ]
    for ex, p in zip(examples, prompts):
        if hasattr(tokenizer, "prompt_length"):
            n = tokenizer.prompt_length(p, ex.images)
        else:
            if ex.images:
                raise ValueError(
                    f"example {ex.id or ex.problem[:40]!r} has images but the model is text-only; use a "
                    "vision-language model or data.image_field=none"
                )
            n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        if n > max_prompt_tokens:
            raise ValueError(
                f"prompt of example {ex.id or ex.problem[:40]!r} has {n} tokens > data.max_prompt_tokens="
                f"{max_prompt_tokens}"
            )
    return prompts


def data_fingerprints(data) -> dict[str, str]:
    """``{"data.train": sha256, "data.eval": sha256}`` of a ``DataConfig``'s specs that are files or saved
    dataset directories (generated sets and benchmarks are left out): saved with a run's checkpoints, so a
    resume can tell that a file was rewritten under the same path."""
    out = {}
    for key in ("train", "eval"):
        spec = getattr(data, key)
        path = Path(spec)
        if not spec or spec == "auto" or spec in GENERATED_SETS or benchmark_name(spec) or not path.exists():
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        out[f"data.{key}"] = h.hexdigest()
    return out
