"""Shared set-up of every stage: accelerator, seeds, data resolution, prompts, flow files.

- ``make_accelerator(cpu)``: one ``accelerate.Accelerator`` for single-process CPU/GPU runs and for
  ``accelerate launch`` (DDP / FSDP / DeepSpeed are configured by accelerate, not here).
- ``resolve_data(cfg.data)``: ``'embedded'`` -> the reasoning-gym task; a benchmark name
  (``math500``...) -> ``rlfr.data.load_benchmark``; anything else -> a data file via ``load_examples``.
- ``build_flow(flow_cfg, model)``: a new flow for the policy, or one loaded through ``rlfr.flow.store``
  (which checks that it models the latents this run uses).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rlfr.data import Example, load_benchmark, load_examples
from rlfr.flow import FlowField
from rlfr.flow.store import FlowBundle, load_flow, meta_for, rms_norm_eps
from rlfr.schema import DataConfig, FlowLatentsConfig
from rlfr.templates import render_prompt


def make_accelerator(cpu: bool = False):
    from accelerate import Accelerator

    return Accelerator(cpu=cpu)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_set(spec: str, data: DataConfig, need_solution: bool) -> list[Example]:
    from rlfr.data import BENCHMARKS

    if spec in BENCHMARKS:
        rows = list(load_benchmark(spec))
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(
                f"data {spec!r} is neither 'embedded', a benchmark name ({', '.join(BENCHMARKS)}), nor a file"
            )
        rows = list(
            load_examples(
                spec,
                problem_field=data.problem_field,
                answer_field=data.answer_field,
                solution_field=data.solution_field if need_solution else None,
                skip_bad_rows=data.skip_bad_rows,
            )
        )
    if not rows:
        raise ValueError(f"data {spec!r} has no rows")
    if need_solution and any(not r.solution for r in rows):
        raise ValueError(
            f"data {spec!r}: field {data.solution_field!r} (worked solutions) is empty in some rows"
        )
    return rows


def resolve_data(data: DataConfig, need_solution: bool = False) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples; eval is [] when ``data.eval`` is ''. The embedded task's split depends on
    ``data.task_seed`` (and ``data.dev_size``) only, so runs with different seeds share the same problems."""
    from rlfr.tasks import EMBEDDED_SETS, embedded_set, embedded_task

    if data.train == "embedded":
        train = embedded_task(
            train_size=data.train_size, eval_size=max(data.eval_size, 1), seed=data.task_seed,
            dev_size=data.dev_size,
        ).train  # fmt: skip
    else:
        train = _load_set(data.train, data, need_solution)
    evals: list[Example] = []
    if data.eval in EMBEDDED_SETS:
        size = max(data.eval_size, 1)
        evals = embedded_set(data.eval, size, data.task_seed, data.dev_size)
    elif data.eval:
        evals = _load_set(data.eval, data, need_solution=False)
    if data.eval_size and len(evals) > data.eval_size:
        evals = evals[: data.eval_size]
    return train, evals


def render_prompts(
    examples: Sequence[Example], template: str, tokenizer, max_prompt_tokens: int
) -> list[str]:
    prompts = [render_prompt(template, ex.problem, tokenizer) for ex in examples]
    for ex, p in zip(examples, prompts):
        n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        if n > max_prompt_tokens:
            raise ValueError(
                f"prompt of example {ex.id or ex.problem[:40]!r} has {n} tokens > data.max_prompt_tokens={max_prompt_tokens}"
            )
    return prompts


def build_flow(flow_cfg: FlowLatentsConfig, model) -> FlowBundle:
    """The flow for ``model``: new (statistics None until fitted), or loaded from ``flow_cfg.init`` through
    the flow store, which refuses a flow trained on other latents or under another pairing convention."""
    expected = meta_for(model, flow_cfg.fractions, flow_cfg.modes, flow_cfg.shift, flow_cfg.latent_norm)
    if flow_cfg.init is None:
        eps = flow_cfg.eps if flow_cfg.eps is not None else rms_norm_eps(model)
        field = FlowField(dim=expected.hidden_size, width=flow_cfg.width, depth=flow_cfg.depth, eps=eps)
        return FlowBundle(field=field, meta=expected, norm=None)
    bundle = load_flow(flow_cfg.init, expected)
    f = bundle.field
    for key, want, have in (("width", flow_cfg.width, f.width), ("depth", flow_cfg.depth, f.depth),
                            ("eps", flow_cfg.eps, f.eps)):  # fmt: skip
        if want is not None and want != have:
            raise ValueError(
                f"flow {flow_cfg.init} has {key}={have} but the config says flow.{key}={want}; "
                f"set flow.{key}={have} to use this flow"
            )
    return bundle
