"""Atomic, pickle-free checkpoints and exact resume.

A checkpoint is a directory ``<out>/checkpoints/step_XXXXXX/`` holding:

- ``policy/``      the policy in Hugging Face format (safetensors) with its tokenizer
- ``flow/``        the flow field (``flow.safetensors`` + ``flow_config.json``), when there is one
- ``optim.pt``     optimizer and scheduler state dicts (tensors and numbers only; loaded with
                   ``weights_only=True``)
- ``rng_rank{r}.pt`` every process's Python / NumPy / torch RNG states
- ``state.json``   step, the run's config and the model's identity (checked on resume)

It is written under ``step_XXXXXX.tmp`` and renamed when complete, then ``latest`` (a one-line
text file) is replaced atomically, so a run killed at any moment resumes from the last complete
checkpoint. Old checkpoints beyond ``keep`` are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfr.flow.store import FlowBundle, save_flow


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or belongs to another model/run."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_identity(model) -> dict[str, Any]:
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "vocab_size": getattr(text, "vocab_size", None),
    }


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    accelerator,
    policy,
    tokenizer,
    flow: FlowBundle | None = None,
    optim_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Collective call (every process): returns the final checkpoint directory."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        if flow is not None:  # written inside the not-yet-renamed folder, through the flow store
            save_flow(tmp / "flow", flow)
        torch.save(optim_state or {}, tmp / "optim.pt")
        state = {"step": step, "identity": model_identity(policy), **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[: max(0, len(steps) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no state.json) nor a run directory with checkpoints"
        )
    return latest


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def load_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def check_identity(ckpt: Path, model) -> None:
    saved = load_state(ckpt)["identity"]
    current = model_identity(model)
    if saved != current:
        raise CheckpointError(
            f"checkpoint {ckpt} was written for a different model: saved {saved}, current {current}"
        )


def load_policy_weights(ckpt: Path, model) -> None:
    """Load ``ckpt/policy`` into ``model`` (the unwrapped policy); tied weights may be absent on disk."""
    from safetensors.torch import load_file

    check_identity(ckpt, model)
    weights = {}
    for f in sorted((ckpt / "policy").glob("*.safetensors")):
        weights |= load_file(str(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}/policy does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def flow_dir(ckpt: Path) -> Path:
    """The checkpoint's flow directory (read it with ``rlfr.flow.store.load_flow``)."""
    return ckpt / "flow"


def load_optim_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True)


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by fewer processes")
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
