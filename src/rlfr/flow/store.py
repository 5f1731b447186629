"""The flow directory: the only reader and writer of a flow on disk.

A flow directory holds

- ``flow.safetensors`` + ``flow_config.json``  the field's weights and sizes (``FlowField.save``);
- ``latents.json``                            which latents it models (``FlowMeta``): block fractions,
                                              context modes, shift, the pairing convention, the
                                              standardisation, the policy's hidden size and depth, and
                                              its modality (``text`` or ``vision-language``: the latents
                                              of a VL policy are those of its language model's blocks,
                                              over response text tokens only);
- ``latent_norm.safetensors``                 per-layer statistics, when ``latent_norm`` is ``standardize``.

Contract:
- ``save_flow(directory, FlowBundle)`` writes all of it (each file atomically);
- ``build_flow(flow_cfg, model) -> FlowBundle``: a new flow for a policy (``flow_cfg.init`` None or ``random``;
  statistics None until fitted), or the one ``flow_cfg.init`` names, loaded and checked against the run's
  latents and architecture keys; ``pairing_note(meta, modes, shift)``: the line a run prints when it pairs
  latents otherwise, on purpose;
- ``load_flow(directory, expected=None, allow_mode_mismatch=None) -> FlowBundle`` reads it, refuses a directory
  written under another pairing convention or without ``latents.json``, and, given the ``FlowMeta`` a run
  expects, refuses a flow trained on other latents (``FlowMismatchError`` naming every differing key). ``rlfr
  train`` (fresh and ``--resume``), the TRL bridge, ``rlfr flow-pretrain`` (``flow.init``), ``rlfr inspect`` and
  ``rlfr convert-flow`` all go through here, so the checks hold for every reader.

Why the checks: the authors pretrained their flows with ``token_pre`` and ran RL with ``token_post``
(docs/RLFR_METHOD.md §8.7), and rlfr < 0.2 credited a pair's score to its condition position; a flow trained on
other latents, or under another convention, must never pass silently. The pairing (``modes``, ``shift``) is the
one difference a run may accept on purpose: RL with ``flow.allow_mode_mismatch=true`` scores and trains its own
pairs with a flow recorded under another pairing (the authors' setup); the flow keeps its record, so resuming
and saving check against what it was trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rlfr.errors import FlowMismatchError
from rlfr.flow.field import FlowField
from rlfr.flow.matching import PAIRING
from rlfr.flow.norm import FILE as NORM_FILE
from rlfr.flow.norm import LatentNorm

META_NAME = "latents.json"


@dataclass(frozen=True)
class FlowMeta:
    """Which latents a flow models (``latents.json``)."""

    fractions: tuple[float, ...]
    modes: tuple[str, ...]
    shift: int
    latent_norm: str  # "standardize" | "none"
    hidden_size: int
    num_hidden_layers: int
    pairing: str = PAIRING
    modality: str = "text"  # "text" | "vision-language"; absent from files written before rlfr read images

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> FlowMeta:
        if data.get("pairing") != PAIRING:
            raise FlowMismatchError(
                f"{path} was written under the pairing convention {data.get('pairing', 'condition (rlfr < 0.2)')!r}, "
                f"not {PAIRING!r}: earlier rlfr credited a pair's flow score to its condition token, so its "
                "scores and training pairs differ. Re-run `rlfr flow-pretrain` (or `rlfr convert-flow` for the "
                "authors' weights) to get a flow of this version"
            )
        names = {f.name for f in fields(cls)}
        # a latents.json without "modality" predates vision-language support: its policy was text-only
        data = {"modality": "text", **data}
        missing = sorted(names - set(data))
        if missing:
            raise FlowMismatchError(f"{path} lacks the keys {missing}")
        kw = {k: data[k] for k in names}
        return cls(**{**kw, "fractions": tuple(kw["fractions"]), "modes": tuple(kw["modes"])})


def text_config(model_or_config) -> Any:
    """The config that describes the decoder (``text_config`` of a vision-language model), from a model or
    a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", cfg)


def rms_norm_eps(model) -> float:
    """The policy's RMSNorm epsilon, which the authors give the flow's RMSNorms (1e-6 when it has none)."""
    eps = getattr(text_config(model), "rms_norm_eps", None)
    return float(eps) if eps is not None else 1e-6


def meta_for(model, fractions, modes, shift: int, latent_norm: str) -> FlowMeta:
    """The ``FlowMeta`` of a flow over the latents of ``model`` (a model or its config) with these settings."""
    cfg = text_config(model)
    full = getattr(model, "config", model)
    return FlowMeta(
        fractions=tuple(float(f) for f in fractions), modes=tuple(modes), shift=int(shift),
        latent_norm=latent_norm, hidden_size=int(cfg.hidden_size), num_hidden_layers=int(cfg.num_hidden_layers),
        modality="vision-language" if getattr(full, "vision_config", None) is not None else "text",
    )  # fmt: skip


@dataclass
class FlowBundle:
    """A flow field with the latents it models and (when standardised) their statistics."""

    field: FlowField
    meta: FlowMeta
    norm: LatentNorm | None = None

    def __post_init__(self) -> None:
        if self.field.dim != self.meta.hidden_size:
            raise FlowMismatchError(
                f"the flow models size-{self.field.dim} latents but its metadata says {self.meta.hidden_size}"
            )


def save_flow(directory: str | os.PathLike, bundle: FlowBundle) -> Path:
    """Write the flow directory (each file atomically) and return it."""
    directory = Path(directory)
    bundle.field.save(directory)
    if bundle.meta.latent_norm == "standardize":
        if bundle.norm is None:
            raise ValueError("latent_norm is 'standardize' but the bundle has no statistics to save")
        bundle.norm.save(directory)
    tmp = directory / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(bundle.meta.to_json(), indent=2) + "\n")
    os.replace(tmp, directory / META_NAME)
    return directory


PAIRING_KEYS = ("modes", "shift")  # how latents are paired: RL may differ from the flow on purpose


def check_meta(
    saved: FlowMeta, expected: FlowMeta, path: str | os.PathLike, allow_mode_mismatch: bool | None = None
) -> None:
    """Raise ``FlowMismatchError`` naming every key where the flow's latents differ from the run's.

    ``allow_mode_mismatch``: True lets a different pairing (``modes``, ``shift``) pass; False refuses it, naming
    both pairings and the option ``flow.allow_mode_mismatch=true`` (RL); None: the caller has no such option."""
    a, b = saved.to_json(), expected.to_json()
    diff = {k: (a[k], b[k]) for k in b if a.get(k) != b[k]}
    if allow_mode_mismatch:
        diff = {k: v for k, v in diff.items() if k not in PAIRING_KEYS}
    if not diff:
        return
    msg = f"flow {path} was trained on other latents than this run uses: " + "; ".join(
        f"{k}: flow {x!r} vs run {y!r}" for k, (x, y) in diff.items()
    )
    if allow_mode_mismatch is False and any(k in PAIRING_KEYS for k in diff):
        msg += (
            f". The flow was trained with modes={a['modes']} shift={a['shift']}, this run pairs latents with "
            f"modes={b['modes']} shift={b['shift']}: set flow.modes / flow.shift to the flow's, or "
            "flow.allow_mode_mismatch=true (TRL: flow_allow_mode_mismatch=True) to score and train this run's "
            "pairs with this flow on purpose, as the authors did (their flows are pretrained with token_pre, "
            "their RL pairs token_post)"
        )
    raise FlowMismatchError(msg)


def pairing_note(meta: FlowMeta, modes, shift: int) -> str | None:
    """The line to print when a run pairs latents (``modes``, ``shift``) otherwise than the flow it loaded was
    trained (``flow.allow_mode_mismatch=true``); None when they agree."""
    if tuple(meta.modes) == tuple(modes) and meta.shift == shift:
        return None
    return (
        f"flow.allow_mode_mismatch=true: the flow was trained with modes={list(meta.modes)} shift={meta.shift}; "
        f"this run scores and trains it on modes={list(modes)} shift={shift} pairs"
    )


def load_flow(
    directory: str | os.PathLike, expected: FlowMeta | None = None, allow_mode_mismatch: bool | None = None
) -> FlowBundle:
    """Read a flow directory (see the module docstring); ``expected`` is checked when given (``check_meta``)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"flow {path} is not a directory; a flow directory comes from `rlfr flow-pretrain`, a checkpoint's "
            "flow/, or `rlfr convert-flow` (for the authors' flow_model.bin)"
        )
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise FlowMismatchError(
            f"{meta_file} is missing: cannot tell which latents the flow models. For the authors' weights run "
            "`rlfr convert-flow src=SRC model=POLICY out=DIR`"
        )
    try:
        meta = FlowMeta.from_json(json.loads(meta_file.read_text()), meta_file)
    except json.JSONDecodeError as e:
        raise FlowMismatchError(f"{meta_file} is not valid JSON: {e}") from e
    if expected is not None:
        check_meta(meta, expected, path, allow_mode_mismatch)
    field = FlowField.load(path)
    norm = None
    if meta.latent_norm == "standardize":
        if not (path / NORM_FILE).is_file():
            raise FlowMismatchError(f"{path} says latent_norm=standardize but {NORM_FILE} is missing")
        norm = LatentNorm.load(path)
    return FlowBundle(field=field, meta=meta, norm=norm)


def build_flow(flow_cfg, model) -> FlowBundle:
    """The flow for ``model`` under a ``FlowLatentsConfig`` (module docstring)."""
    expected = meta_for(model, flow_cfg.fractions, flow_cfg.modes, flow_cfg.shift, flow_cfg.latent_norm)
    if flow_cfg.init in (
        None,
        "random",
    ):  # a fresh flow (rlfr train requires the choice: schema.require_flow_init)
        eps = flow_cfg.eps if flow_cfg.eps is not None else rms_norm_eps(model)
        field = FlowField(dim=expected.hidden_size, width=flow_cfg.width, depth=flow_cfg.depth, eps=eps)
        return FlowBundle(field=field, meta=expected, norm=None)
    # RL's FlowConfig has allow_mode_mismatch; flow pretraining (FlowLatentsConfig) continues a flow on its own
    # pairing only
    bundle = load_flow(flow_cfg.init, expected, getattr(flow_cfg, "allow_mode_mismatch", None))
    f = bundle.field
    for key, want, have in (("width", flow_cfg.width, f.width), ("depth", flow_cfg.depth, f.depth),
                            ("eps", flow_cfg.eps, f.eps)):  # fmt: skip
        if want is not None and want != have:
            raise ValueError(
                f"flow {flow_cfg.init} has {key}={have} but the config says flow.{key}={want}; "
                f"set flow.{key}={have} to use this flow"
            )
    return bundle
