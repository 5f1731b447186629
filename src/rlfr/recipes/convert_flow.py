"""``rlfr convert-flow``: turn the authors' released flow weights into an rlfr flow directory.

    rlfr convert-flow src=result/Qwen2.5-Math-1.5B/flow_model/checkpoint-500 model=Qwen/Qwen2.5-Math-1.5B \\
        flow_config=config/flow_config_3B.json out=runs/qwen1.5b-flow-official
    rlfr train method=rlfr --config configs/qwen2.5-math-1.5b.yaml flow.init=runs/qwen1.5b-flow-official

SRC is a weights file (``.bin`` / ``.pt`` read with ``torch.load(weights_only=True)`` only, or
``.safetensors``) or a directory holding one (``flow_model.bin``, ``model.safetensors``,
``pytorch_model.bin``). Keys may carry the prefix ``model.`` (their ``FlowReward.save_pretrained`` and
conversion script) or ``flow.model.``; a whole-model checkpoint of their flow-pretraining hook model (LLM
weights next to ``flow.*``) is reduced to its ``flow.*`` keys, as their ``convert_state_dict.py`` does, and
the count of dropped keys is printed.

The policy's config (``model``, read with ``AutoConfig``: no weights are loaded) gives the hidden size,
the depth and the RMSNorm epsilon (``rms_norm_eps``; the authors build the flow with it). The directory records
``latent_norm = none`` (their flows model raw latents) and the pairing the weights were **trained** with:
``modes`` / ``shift``, by default ``token_pre`` and 1, the pairing of every published flow (their
``LLaMA-Factory/examples/train_flow/*.yaml`` set ``flow_context_mode: token_pre`` and no ``flow_shift``, whose
default is "1"). ``flow_config`` takes either of their two configs:

- their flow-pretraining YAML (``LLaMA-Factory/examples/train_flow/<model>_flow.yaml``): hooked fractions
  (``hook_layers_percentile``), depth (``num_layers_flow``) and the trained pairing (``flow_context_mode``,
  ``flow_shift``), all recorded as they are;
- their RL flow config (``config/flow_config_3B.json``, ``flow_config_7B.json``): fractions and depth only. Its
  ``flow_context_mode`` (``token_post``) is the pairing their RL *used* with a ``token_pre`` flow, not the one the
  weights learnt, so it is not recorded (earlier rlfr versions recorded it, wrongly). To run RL as they did, on
  ``token_post`` pairs with this flow, set ``flow.allow_mode_mismatch=true`` (the presets in ``configs/`` do).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig

from rlfr.commands import ConvertFlowConfig
from rlfr.errors import ConfigError, PickleRefusedError
from rlfr.flow.field import FlowField
from rlfr.flow.matching import MODES
from rlfr.flow.store import FlowBundle, meta_for, rms_norm_eps, save_flow
from rlfr.policy.loading import resolve_model_path

_SEARCH = ("flow_model.bin", "flow.safetensors", "model.safetensors", "pytorch_model.bin")


def read_state_dict(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Tensors of ``src`` (a file or a directory holding one of ``_SEARCH``) -> (state dict, file read)."""
    if src.is_dir():
        found = [src / n for n in _SEARCH if (src / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{src} holds none of {list(_SEARCH)}")
        src = found[0]
    elif not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    if src.suffix == ".safetensors":
        return load_file(str(src)), src
    if src.suffix not in (".bin", ".pt", ".pth"):
        raise ValueError(
            f"{src}: unknown weights format {src.suffix!r} (use .bin, .pt, .pth or .safetensors)"
        )
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # never fall back to a full unpickle
        raise PickleRefusedError(src) from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{src} holds a {type(sd).__name__}, expected a state dict of tensors")
    return dict(sd), src


def flow_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The flow's keys of a checkpoint that also holds other weights (their hook model: ``flow.*`` next to
    the LLM's) -> (flow state dict, number of dropped keys); a flow-only state dict is returned as is."""
    if any(k.startswith("flow.") for k in sd) and not all(k.startswith("flow.") for k in sd):
        kept = {k: v for k, v in sd.items() if k.startswith("flow.")}
        return kept, len(sd) - len(kept)
    return sd, 0


def read_authors_flow_config(path: Path) -> dict:
    """Their flow-pretraining YAML (``flow_context_mode: token_pre``, ``hook_layers_percentile``,
    ``num_layers_flow``, ``flow_shift`` default "1") -> our fractions / modes / shift / depth; their RL flow config
    JSON (``config/flow_config_*.json``) -> fractions / depth only (module docstring: its mode is RL's)."""
    if path.suffix in (".yaml", ".yml"):
        cfg = yaml.safe_load(path.read_text()) or {}
    else:
        cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping (the authors' flow config)")
    try:
        fractions = [float(x) for x in str(cfg["hook_layers_percentile"]).split("+")]
        modes = str(cfg["flow_context_mode"]).split("+")
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e} (expected the authors' flow config)") from e
    shifts = {int(x) for x in str(cfg.get("flow_shift", "1")).split("+")}  # LLaMA-Factory's default "1"
    if len(shifts) != 1:
        raise ValueError(
            f"{path}: one shift per context mode ({sorted(shifts)}) is not supported; rlfr uses one"
        )
    if path.suffix in (".yaml", ".yml"):  # how the weights were trained
        return {
            "fractions": fractions,
            "modes": modes,
            "shift": shifts.pop(),
            "depth": cfg.get("num_layers_flow"),
        }
    return {"fractions": fractions, "depth": cfg.get("num_layers_flow")}  # RL's pairing: not the weights'


def convert(
    src: str | Path,
    model: str,
    out: str | Path,
    fractions=(0.25, 0.5, 0.75),
    modes=("token_pre",),
    shift: int = 1,
    depth: int | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write an rlfr flow directory at ``out`` from the authors' weights at ``src`` (module docstring)."""
    bad = [m for m in modes if m not in MODES]
    if bad or shift < 1:
        raise ValueError(f"modes must be in {list(MODES)} and shift >= 1, got {list(modes)}, {shift}")
    sd, read = read_state_dict(Path(src))
    sd, dropped = flow_keys(sd)
    if dropped:
        print(f"kept the {len(sd)} flow.* keys of {read}, dropped {dropped} other keys (the LLM's)")
    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    eps = rms_norm_eps(config)
    field = FlowField.from_official_state_dict(sd, eps=eps)
    if depth is not None and field.depth != depth:
        raise ValueError(
            f"{read}: the weights have {field.depth} residual blocks, the flow config says {depth}"
        )
    meta = meta_for(config, fractions, modes, shift, "none")
    if field.dim != meta.hidden_size:
        raise ValueError(
            f"{read} models size-{field.dim} latents, but {model} has hidden size {meta.hidden_size}"
        )
    out = Path(out)
    save_flow(out, FlowBundle(field=field, meta=meta, norm=None))
    digest = hashlib.sha256(read.read_bytes()).hexdigest()
    (out / "converted_from.json").write_text(
        json.dumps({"source": str(read), "sha256": digest, "model": model, "eps": eps}, indent=2) + "\n"
    )
    return out


def run(cfg: ConvertFlowConfig) -> int:
    if not (cfg.src and cfg.model and cfg.out):
        raise ConfigError("rlfr convert-flow needs src=WEIGHTS model=POLICY out=DIR")
    settings = {"fractions": list(cfg.fractions), "modes": list(cfg.modes), "shift": cfg.shift, "depth": None}
    if cfg.flow_config:
        settings |= read_authors_flow_config(Path(cfg.flow_config))
    out = convert(cfg.src, cfg.model, cfg.out, trust_remote_code=cfg.trust_remote_code, **settings)
    print(
        f"wrote {out}: a flow trained with modes={settings['modes']} shift={settings['shift']} (use it with "
        f"flow.init={out} flow.latent_norm=none; RL on other modes needs flow.allow_mode_mismatch=true)"
    )
    return 0
