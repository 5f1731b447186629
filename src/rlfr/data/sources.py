"""Where problems come from: one resolver for every command.

A data *spec* is one of
- ``embedded`` / ``embedded-dev`` / ``embedded-transfer``: the procedural task (``rlfr.data.tasks``):
  its held-out split, its tuning split, its transfer set; ``embedded-multistep`` (and ``-dev``,
  ``-transfer``): the same for the multi-step task, whose worked solutions take 4-6 steps;
- ``embedded-vl``: the multimodal task (``rlfr.data.vl_task``): its held-out split (its train split when it
  is ``data.train``);
- a benchmark name (``rlfr.data.benchmarks.BENCHMARKS``), read from the shared benchmark directory;
- a data file or saved dataset directory (``rlfr.data.examples.load_examples``).

Contract:
- ``load_source(spec, fields, size, task_seed, dev_size, need_solution)`` -> the examples of a held-out or
  training spec (``embedded`` or ``embedded-multistep`` as a *training* spec is the task's train split: use
  ``resolve_data``);
- ``resolve_data(data_cfg, need_solution) -> (train, eval)``: the two sets of a stage's ``DataConfig``
  (eval ``[]`` when ``data.eval`` is ``''``), truncated to ``data.eval_size``;
- ``render_prompts(examples, template, tokenizer, max_prompt_tokens)``: the prompt strings, refusing any
  longer than ``max_prompt_tokens`` (naming the example);
- ``data_fingerprints(data_cfg)``: the SHA-256 of the data files a ``DataConfig`` names (a resumed run
  refuses data that changed under the same path).
The embedded splits depend on ``data.task_seed`` (and ``data.dev_size``) only, never on the run seed, so runs
with different seeds share one set of problems.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlfr.data.benchmarks import BENCHMARKS, load_benchmark
from rlfr.data.examples import Example, load_examples
from rlfr.data.tasks import EMBEDDED_SETS, EMBEDDED_TASKS, embedded_set, task_splits
from rlfr.data.templates import render_prompt
from rlfr.data.vl_task import vl_task

VL_SET = "embedded-vl"
GENERATED_SETS = (*EMBEDDED_SETS, VL_SET)  # sets generated here, whose size a command chooses


@dataclass(frozen=True)
class Fields:
    """Column names of data files, and what to do with a bad row."""

    problem: str = "problem"
    answer: str = "answer"
    solution: str | None = None
    skip_bad_rows: bool = False
    max_problem_chars: int | None = None  # refuse longer problems while reading, before any tokenizer runs
    image: str = "auto"  # the image column: auto (images or image), none, or a column name


def describe_specs() -> str:
    return f"{', '.join(EMBEDDED_SETS)}, {VL_SET}, a benchmark ({', '.join(BENCHMARKS)}), or a data file"


def load_source(
    spec: str,
    fields: Fields = Fields(),
    size: int = 0,
    task_seed: int = 0,
    dev_size: int = 0,
    need_solution: bool = False,
) -> list[Example]:
    """The examples of ``spec`` (module docstring); ``size`` > 0 keeps the first ``size`` (and is the size
    of an embedded set)."""
    if spec in EMBEDDED_SETS:
        rows = list(embedded_set(spec, max(size, 1), task_seed, dev_size))
    elif spec == VL_SET:
        rows = vl_task(train_size=1, eval_size=max(size, 1), seed=task_seed).eval
    elif spec in BENCHMARKS:
        rows = list(load_benchmark(spec))
    elif Path(spec).exists():
        rows = list(
            load_examples(
                spec,
                problem_field=fields.problem,
                answer_field=fields.answer,
                solution_field=fields.solution if need_solution else None,
                skip_bad_rows=fields.skip_bad_rows,
                max_problem_chars=fields.max_problem_chars,
                image_field=fields.image,
            )
        )
    else:
        raise FileNotFoundError(f"data {spec!r} does not exist; a data spec is {describe_specs()}")
    if not rows:
        raise ValueError(f"data {spec!r} has no rows")
    if need_solution and any(not r.solution for r in rows):
        raise ValueError(f"data {spec!r}: field {fields.solution!r} (worked solutions) is empty in some rows")
    return rows[:size] if size else rows


def resolve_data(data, need_solution: bool = False) -> tuple[list[Example], list[Example]]:
    """(train, eval) of a ``DataConfig`` (module docstring)."""
    # no token spans 64 characters on average, so a longer problem cannot fit max_prompt_tokens
    fields = Fields(data.problem_field, data.answer_field, data.solution_field, data.skip_bad_rows,
                    max_problem_chars=64 * data.max_prompt_tokens, image=data.image_field)  # fmt: skip
    if data.train in EMBEDDED_TASKS:
        train = task_splits(
            data.train, data.train_size, eval_size=max(data.eval_size, 1), seed=data.task_seed,
            dev_size=data.dev_size,
        ).train  # fmt: skip
    elif data.train == VL_SET:
        train = vl_task(
            train_size=data.train_size, eval_size=max(data.eval_size, 1), seed=data.task_seed
        ).train
    else:
        train = load_source(data.train, fields, need_solution=need_solution)
    evals: list[Example] = []
    if data.eval:
        evals = load_source(data.eval, fields, data.eval_size, data.task_seed, data.dev_size)
    return train, evals


def render_prompts(
    examples: Sequence[Example], template: str, tokenizer, max_prompt_tokens: int
) -> list[str]:
    """Prompt strings; with a vision-language processor (``rlfr.policy.vision.ImageTextProcessor``) the
    length counts the image tokens the processor expands each image into."""
    prompts = [
        render_prompt(
            template, ex.problem, tokenizer, len(ex.images), getattr(tokenizer, "image_token", None)
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
        if not spec or spec in GENERATED_SETS or spec in BENCHMARKS or not path.exists():
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
