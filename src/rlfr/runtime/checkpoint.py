"""Atomic, pickle-free checkpoints and exact resume.

A checkpoint is a directory ``<out>/checkpoints/step_XXXXXX/`` holding:

- ``policy/``      the policy in Hugging Face format (safetensors) with its tokenizer; for a LoRA run
                   (``model.lora.rank`` > 0) the adapter only, in PEFT's format (``adapter_model.safetensors``
                   + ``adapter_config.json``, which names the base model), and the optimizer state below
                   covers the adapter's parameters only
- ``flow/``        the flow field (``flow.safetensors`` + ``flow_config.json``), when there is one
- ``optim.pt``     optimizer and scheduler state dicts (tensors and numbers only; loaded with
                   ``weights_only=True``)
- ``rng_rank{r}.pt`` every process's Python / NumPy / torch RNG states
- ``state.json``   step, the run's config and the model's identity (checked on resume)
- ``manifest.json`` the size and SHA-256 of every other file (written last, checked on resume)

It is written under ``step_XXXXXX.tmp``, every file and directory is flushed to disk (fsync), then the
folder is renamed and ``latest`` (a one-line text file) replaced atomically, so a run killed at any moment,
or a machine that loses power, leaves the last complete checkpoint intact. A write that fails removes its
``.tmp`` folder (on a full disk the error names the directory and the space a checkpoint needs); the ``.tmp``
folders that kills left are removed when the next run on the directory starts (``remove_unfinished``). Old checkpoints beyond ``keep``
(>= 1) are deleted, oldest step first, only after the new one is in place.

Reading: ``find_checkpoint(out_dir)`` returns the newest checkpoint whose manifest checks out, and the
reasons it skipped newer ones (a truncated weights file, a deleted ``policy/``, garbage in ``latest`` or
``state.json``, a deleted ``latest``, a manifest that is not an object of well-formed entries or leaves out a
file); ``load_*`` errors name the file. Nothing is unpickled: tensors are
safetensors, and ``optim.pt`` / ``rng_rank*.pt`` are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from rlfr.errors import CheckpointError, PickleRefusedError
from rlfr.flow.store import FlowBundle, save_flow

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_UNFINISHED = ".tmp"  # suffix of a checkpoint folder being written


def _fsync(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary directory beside ``path`` to write into; on success it replaces ``path`` (an error leaves
    the old ``path``, or none, never a half-written one). What a kill during an earlier write left beside
    ``path`` is dealt with first (``_recover_atomic_dir``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_atomic_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    old = tmp.with_name(tmp.name + "-old")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp's is owner-only)
        if path.exists():
            path.rename(old)  # moved aside, not deleted, until the new one is in place
        tmp.rename(path)
        _fsync(path.parent)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _recover_atomic_dir(path: Path) -> list[str]:
    """Undo what a kill inside ``atomic_dir(path)`` left: a directory moved aside (``.<name>-XXXXXXXX-old``)
    whose replacement never landed goes back to ``path`` when ``path`` is missing (the newest, if several);
    unfinished temporary directories (``.<name>-XXXXXXXX``, a merged 7B model is 15 GB) are deleted.
    -> what was done, one line each (also logged)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}-[A-Za-z0-9_]{{8}}(-old)?$")
    stale = sorted(
        (p for p in path.parent.iterdir() if pattern.match(p.name) and p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    done = []
    moved_aside = [p for p in stale if p.name.endswith("-old")]
    if moved_aside and not path.exists():
        moved_aside[-1].rename(path)
        done.append(f"restored {path} from {moved_aside[-1].name} (a save into it was killed midway)")
        stale.remove(moved_aside[-1])
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"deleted {p}, left by a save into {path} that was killed midway")
    for line in done:
        log.warning(line)
    return done


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Size and SHA-256 of every file in ``ckpt`` (fsynced), then the manifest itself."""
    files = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(f)
        files[str(f.relative_to(ckpt))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    for d in sorted({f.parent for f in ckpt.rglob("*")} | {ckpt}):
        _fsync(d)
    atomic_write_text(ckpt / MANIFEST, json.dumps(files, indent=1))


# what every checkpoint holds, whatever the run (a flow, more ranks' RNG states and a policy's other files vary)
_REQUIRED = ("state.json", "optim.pt", "rng_rank0.pt")


def _manifest_problems(manifest: Path, files: Any) -> list[str]:
    """What makes a parsed manifest unusable: not an object of ``{relative path: {"size": int, "sha256":
    str}}``, or one that does not list what every checkpoint holds."""
    if not isinstance(files, dict):
        return [f"{manifest} is not a JSON object of files (it holds {type(files).__name__})"]
    for rel, meta in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return [f"{manifest} names {rel!r}, a path outside the checkpoint"]
        if not (
            isinstance(meta, dict) and type(meta.get("size")) is int and isinstance(meta.get("sha256"), str)
        ):
            return [f'{manifest}: the entry of {rel!r} is not {{"size": int, "sha256": str}}']
    missing = [rel for rel in _REQUIRED if rel not in files]
    if not any(rel.startswith("policy/") and rel.endswith(".safetensors") for rel in files):
        missing.append("policy/*.safetensors")
    if missing:
        return [f"{manifest} does not list {', '.join(missing)} (incomplete or edited)"]
    return []


def verify_checkpoint(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint directory, file by file ([] = intact). The manifest must be a
    well-formed object that lists every file of the checkpoint (a file it leaves out is not vouched for)."""
    manifest = ckpt / MANIFEST
    if not ckpt.is_dir():
        return [f"{ckpt} does not exist"]
    if not manifest.is_file():
        return [
            f"{manifest} is missing: an incomplete checkpoint, or one of rlfr < 0.2, which this version does not resume"
        ]
    try:
        files = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        return [f"{manifest} is not valid JSON ({e})"]
    problems = _manifest_problems(manifest, files)
    if problems:
        return problems
    for rel, meta in files.items():
        f = ckpt / rel
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != meta["size"]:
            problems.append(f"{f} has {f.stat().st_size} bytes, {meta['size']} were written (truncated?)")
        elif _sha256(f) != meta["sha256"]:
            problems.append(f"{f} does not match its checksum (corrupted)")
    unlisted = sorted(
        rel for f in ckpt.rglob("*") if f.is_file() and (rel := str(f.relative_to(ckpt))) not in files
    )
    unlisted.remove(MANIFEST)
    if unlisted:
        problems.append(f"{manifest} does not list {', '.join(unlisted[:3])} (incomplete or edited)")
    return problems


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
    policy_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective call (every process): returns the final checkpoint directory. ``policy_state``: the
    policy's full weights when the model in memory is sharded (FSDP, ``runtime.sharding.full_state_dict``)."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}{_UNFINISHED}"
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            given = {} if policy_state is None else {"state_dict": policy_state}
            policy.save_pretrained(tmp / "policy", safe_serialization=True, **given)
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
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)
            atomic_write_text(root / "latest", final.name + "\n")
    except Exception as e:
        if not accelerator.is_main_process:
            raise
        needed = _nbytes(policy_state or policy.state_dict()) + _nbytes(optim_state)
        needed += _nbytes(flow.field.state_dict()) if flow is not None else 0
        free = shutil.disk_usage(root).free  # before the unfinished folder is removed: what the write saw
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write must not leave gigabytes behind
        if not _disk_full(e, free, needed):
            raise
        kept = step_dirs(root)
        raise CheckpointError(
            f"no space left on the device of {root} to write the checkpoint of step {step}: it needs about "
            f"{_mb(needed)}, {_mb(free)} were free. The unfinished {tmp.name} was removed; "
            + (f"{kept[-1].name} is kept" if kept else "there is no earlier checkpoint")
            + ". Free some space (or move out_dir), then continue with --resume"
        ) from e
    if accelerator.is_main_process:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest checkpoint is never deleted), got {keep}")
        for old in step_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what writing it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _disk_full(error: BaseException, free: int, needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC from Python, or the text of it in the generic errors
    safetensors (Rust) and torch (C++) raise, or less room left than the checkpoint needs."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if e is not None and any(
            s in str(e) for s in ("No space left on device", "StorageFull", "os error 28")
        ):
            return True
    return free < needed


def remove_unfinished(out_dir: str | Path) -> list[Path]:
    """Delete the ``step_N.tmp`` folders that runs killed while writing a checkpoint left (never a complete
    checkpoint: those are renamed to ``step_N``); call with the run's lock held. -> what was removed."""
    root = checkpoint_root(out_dir)
    stale = sorted(p for p in root.glob(f"step_*{_UNFINISHED}") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed %s, the unfinished checkpoint of a run that was stopped while writing it", p)
    return stale


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(out_dir) / "checkpoints"


def step_dirs(root: Path) -> list[Path]:
    """The ``step_N`` directories under ``root``, by step number."""
    found = [
        (int(m.group(1)), p) for p in root.glob("step_*") if p.is_dir() and (m := _STEP_DIR.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest intact checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found, _ = find_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no state.json) nor a run directory with checkpoints"
        )
    return found


def find_checkpoint(out_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest intact checkpoint of a run, or None; why newer ones were skipped).

    ``latest`` names the newest; when it is missing, unreadable or points nowhere, the ``step_N`` folders
    are searched instead, and every candidate is checked against its manifest."""
    root = checkpoint_root(out_dir)
    notes: list[str] = []
    candidates = list(reversed(step_dirs(root)))
    pointer = root / "latest"
    if candidates:
        if not pointer.is_file():
            notes.append(f"{pointer} is missing; searched {root} for checkpoints")
        else:
            try:
                named = root / pointer.read_text().strip()
            except UnicodeDecodeError:
                named = None
            if named is None or named not in candidates:
                notes.append(f"{pointer} does not name a checkpoint folder; searched {root} instead")
            elif named != candidates[0]:
                notes.append(f"{pointer} names {named.name}, but {candidates[0].name} is newer")
    for ckpt in candidates:
        problems = verify_checkpoint(ckpt)
        if not problems:
            return ckpt, notes
        notes.append(f"skipped {ckpt.name}: " + "; ".join(problems[:3]))
    return None, notes


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run (or None), logging why newer ones were skipped."""
    found, notes = find_checkpoint(out_dir)
    for note in notes:
        log.warning("%s", note)
    return found


def load_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from e


def check_identity(ckpt: Path, model) -> None:
    saved = load_state(ckpt)["identity"]
    current = model_identity(model)
    if saved != current:
        raise CheckpointError(
            f"checkpoint {ckpt} was written for a different model: saved {saved}, current {current}"
        )


def read_policy_weights(ckpt: Path, model) -> dict[str, torch.Tensor]:
    """The weights in ``ckpt/policy``, named as ``model`` (the unwrapped policy) names its parameters and
    checked against them: the whole model's, or a LoRA run's adapter (PEFT's file names, which drop the
    adapter's name, mapped back). Tied weights may be absent on disk."""
    check_identity(ckpt, model)
    pdir = policy_dir(ckpt)
    adapter, peft = (pdir / "adapter_config.json").is_file(), hasattr(model, "peft_config")
    if adapter != peft:
        raise CheckpointError(
            f"{pdir} holds {'a LoRA adapter' if adapter else 'a full model'}, but the model to load it into "
            f"{'has LoRA adapters' if peft else 'has none'} (model.lora.rank differs from the run's)"
        )
    weights = {}
    files = sorted(pdir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{pdir} holds no *.safetensors weights")
    for f in files:
        try:
            weights |= load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types; name the file
            raise CheckpointError(f"{f} cannot be read: {e}") from e
    if adapter:
        trainable = [_clean(n) for n, p in model.named_parameters() if p.requires_grad]
        by_file = {_without_adapter_name(n, model.active_adapter): n for n in trainable}
        missing = sorted(set(by_file) - set(weights))
        unexpected = sorted(set(weights) - set(by_file))
        weights = {by_file[k]: v for k, v in weights.items() if k in by_file}
    else:
        names = {_clean(k) for k in model.state_dict()}
        # e.g. Qwen2.5-VL: transformers saves its legacy layout (model.layers.*)
        if not set(weights) <= names:
            saved = _saved_names(model)
            weights = {saved.get(k, k): v for k, v in weights.items()}
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = sorted(k for k in names - set(weights) if k not in tied and "lm_head" not in k)
        unexpected = sorted(set(weights) - names)
    if missing or unexpected:
        raise CheckpointError(
            f"{pdir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return weights


def _saved_names(model) -> dict[str, str]:
    """{name in the saved file: name in ``model``} for the keys ``save_pretrained`` renames (transformers 5
    reverts its load-time renamings when saving, e.g. Qwen2.5-VL's ``model.language_model.layers.*`` is saved
    as ``model.layers.*``); empty where transformers renames nothing."""
    try:
        from transformers.core_model_loading import revert_weight_conversion  # lazy: transformers 5 only
    except ImportError:  # transformers 4 saves the model's own names
        return {}
    out = {}
    for name, tensor in model.state_dict().items():
        clean = _clean(name)  # the name transformers knows (no FSDP1 / checkpoint-wrapper segments)
        saved = list(revert_weight_conversion(model, {clean: tensor}))
        if len(saved) != 1:  # e.g. fused MoE experts saved as one tensor per expert
            raise CheckpointError(
                f"{type(model).__name__} saves {clean} as {len(saved)} tensors ({saved[:3]}...): rlfr cannot map "
                "this checkpoint layout back to the model's parameters"
            )
        if saved[0] != clean:
            out[saved[0]] = clean
    return out


def _clean(name: str) -> str:
    """A parameter's name without the wrapper segments FSDP1 and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _without_adapter_name(name: str, adapter: str) -> str:
    """``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight`` (PEFT's file names)."""
    parts = name.split(".")
    return ".".join(
        p for i, p in enumerate(parts) if not (i > 0 and p == adapter and parts[i - 1].startswith("lora_"))
    )


def load_policy_weights(ckpt: Path, model) -> None:
    """Load ``ckpt/policy`` into ``model`` (the unwrapped, unsharded policy; see ``read_policy_weights``)."""
    model.load_state_dict(read_policy_weights(ckpt, model), strict=False)


def policy_dir(ckpt: Path) -> Path:
    """The checkpoint's policy: a Hugging Face model directory, or a LoRA run's PEFT adapter (both load with
    ``rlfr.policy.loading.load_model``, the adapter merged into its base model)."""
    return ckpt / "policy"


def flow_dir(ckpt: Path) -> Path:
    """The checkpoint's flow directory (read it with ``rlfr.flow.store.load_flow``)."""
    return ckpt / "flow"


def policy_and_flow(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """An RL checkpoint with a flow, or a run directory (its newest intact checkpoint) -> (its policy, its flow
    directory, the run's TrainConfig as a dict): what ``rlfr inspect`` and ``rlfr select`` read."""
    ck = resolve_checkpoint(path)
    for sub in (policy_dir(ck), flow_dir(ck)):
        if not sub.is_dir():
            raise FileNotFoundError(
                f"{ck} has no {sub.name}/: a checkpoint of an RL run of method rlfr holds policy/ and flow/ (for a "
                "policy and a flow from elsewhere give the model and the flow directory)"
            )
    return policy_dir(ck), flow_dir(ck), load_state(ck).get("config", {})


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except pickle.UnpicklingError:  # torch's refusal runs to several lines of advice to unpickle anyway
        raise PickleRefusedError(path) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, missing file...: name the file
        raise CheckpointError(f"{path} cannot be read: {e}") from e


def load_optim_state(ckpt: Path) -> dict[str, Any]:
    return _torch_load(ckpt / "optim.pt")


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by fewer processes")
    set_rng_state(_torch_load(path))
