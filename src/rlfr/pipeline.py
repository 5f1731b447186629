"""Shared set-up of every stage: accelerator, seeds, data resolution, prompts, flow files.

- ``make_accelerator(cpu)``: one ``accelerate.Accelerator`` for single-process CPU/GPU runs and for
  ``accelerate launch`` (DDP / FSDP / DeepSpeed are configured by accelerate, not here).
- ``resolve_data(cfg.data)``: ``'embedded'`` -> the reasoning-gym task; a benchmark name
  (``math500``...) -> ``rlfr.data.load_benchmark``; anything else -> a data file via ``load_examples``.
- ``save_flow`` / ``load_flow``: a flow directory also stores which latents it models
  (``latents.json``: block fractions, context modes, shift, the policy's hidden size and depth), and
  loading it for a run with other settings is an error. The authors pretrained with ``token_pre`` and
  ran RL with ``token_post`` (RLFR_METHOD §8.7); here such a mismatch cannot pass silently.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfr.data import Example, load_benchmark, load_examples
from rlfr.flow import FlowField
from rlfr.latent_norm import LatentNorm
from rlfr.schema import DataConfig, FlowConfig
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
    ``data.task_seed`` only, so runs with different seeds share the same problems."""
    train: list[Example]
    evals: list[Example] = []
    if data.train == "embedded" or data.eval == "embedded":
        from rlfr.tasks import embedded_task

        task = embedded_task(
            train_size=data.train_size, eval_size=max(data.eval_size, 1), seed=data.task_seed
        )
    train = task.train if data.train == "embedded" else _load_set(data.train, data, need_solution)
    if data.eval == "embedded":
        evals = task.eval
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


def hidden_size(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(cfg.hidden_size)


def flow_meta(flow_cfg: FlowConfig, model) -> dict[str, Any]:
    cfg = getattr(model.config, "text_config", None) or model.config
    return {
        "fractions": list(flow_cfg.fractions),
        "modes": list(flow_cfg.modes),
        "shift": flow_cfg.shift,
        "latent_norm": flow_cfg.latent_norm,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
    }


def save_flow(
    directory: str | Path, field: FlowField, meta: dict[str, Any], norm: LatentNorm | None = None
) -> Path:
    directory = Path(directory)
    field.save(directory)
    if norm is not None:
        norm.save(directory)
    tmp = directory / "latents.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(directory / "latents.json")
    return directory


def build_flow(flow_cfg: FlowConfig, model) -> tuple[FlowField, LatentNorm | None]:
    """(field, latent statistics) for ``model``: new (statistics None until fitted), or loaded from
    ``flow_cfg.init`` and checked against this run's settings."""
    d = hidden_size(model)
    if flow_cfg.init is None:
        return FlowField(dim=d, width=flow_cfg.width, depth=flow_cfg.depth), None
    path = Path(flow_cfg.init)
    field = FlowField.load(path)  # raises on missing / malformed files; never continues with a zero flow
    if field.config["dim"] != d:
        raise ValueError(f"flow {path} models latents of size {field.config['dim']}, the policy's are {d}")
    meta_file = (path if path.is_dir() else path.parent) / "latents.json"
    if meta_file.is_file():
        saved = json.loads(meta_file.read_text())
        current = flow_meta(flow_cfg, model)
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"flow {path} was trained on other latents than this run uses: "
                + "; ".join(f"{k}: flow {a!r} vs run {b!r}" for k, (a, b) in diff.items())
            )
    norm = None
    if flow_cfg.latent_norm == "standardize":
        folder = path if path.is_dir() else path.parent
        if not (folder / "latent_norm.safetensors").is_file():
            raise ValueError(
                f"flow {path} has no latent statistics (latent_norm.safetensors); it was trained on raw "
                "latents, so set flow.latent_norm=none"
            )
        norm = LatentNorm.load(folder)
    return field, norm
