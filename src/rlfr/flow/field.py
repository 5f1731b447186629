"""The velocity network v_phi(x_t, t, c, layer) of RLFR (docs/RLFR_METHOD.md §2).

Contract: ``FlowField(dim, width=None, depth=4, freq_dim=256, eps=1e-6)``;
``forward(x_t: (N, d), t: (N,), cond: (N, d), layer: (N,)) -> (N, d) float32``.

Architecture (the authors' ``SimpleMLPAdaLNTimePos``, itself MAR's ``SimpleMLPAdaLN`` with RMSNorm and a
layer embedding), with their state-dict key names so that released ``flow_model.bin`` files load:

    x = input_proj(x_t)                                  Linear(d, w)
    y = time_embed(t) + cond_embed(c) + layer_embed(l)   sinusoid(256) -> Linear-SiLU-Linear; Linear(d, w)
    for block in res_blocks:                             RMSNorm -> modulate(shift, scale) -> MLP,
        x = block(x, y)                                  then x + gate * h
    out = final_layer(x, y)                              RMSNorm -> modulate -> Linear(w, d)

Modulation layers and the output layer are zero-initialised, so the field is exactly 0 at init.
``eps`` is the RMSNorm epsilon; the authors set it to the policy's ``rms_norm_eps`` (1e-6 for Qwen2.5,
1e-5 for Llama), and so does rlfr when it builds a flow for a policy. It is stored in ``flow_config.json``.

Released checkpoints: the authors' ``FlowReward`` wrapper saves its ``model`` attribute, so their files
hold the keys above under ``model.`` (their conversion script turns ``flow.model.X`` into ``model.X``);
``from_official_state_dict`` strips either prefix. Their files carry no epsilon: pass the policy's.

Dtype: inputs are cast to the parameters' dtype (float32 unless the caller converts the module) and the
output is returned as float32; keep the field in float32, the latents are bf16 in RL and the flow is small.

Departures from the authors' code (docs/RLFR_METHOD.md §8.6): checkpoints are written as safetensors, never pickles;
pickled ``.bin``/``.pt`` files are read with ``torch.load(weights_only=True)``; a checkpoint whose keys or
shapes do not match raises ``ValueError`` listing every missing / unexpected / mis-shaped key instead of
being swallowed (their failed load left a zero flow in training). Target and condition must have the same
size d (their class allowed different sizes; RLFR never uses that).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "flow.safetensors"
CONFIG_NAME = "flow_config.json"
OFFICIAL_WEIGHTS_NAME = "flow_model.bin"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT): ``x * (1 + scale) + shift``, all (N, w)."""
    return x * (1 + scale) + shift


class SinusoidalEmbedder(nn.Module):
    """Embeds a scalar in [0, 1] (timestep or layer fraction): cos/sin features -> Linear-SiLU-Linear.

    ``freqs`` is a persistent buffer of shape (1, freq_dim // 2) as in the authors' checkpoints.
    """

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        if freq_dim < 2 or freq_dim % 2:
            raise ValueError(f"freq_dim must be an even number >= 2, got {freq_dim}")
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)[None]
        self.register_buffer("freqs", freqs, persistent=True)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        """value: (N,) -> (N, w). The raw value is used (no x1000 scaling), as in docs/RLFR_METHOD.md §2."""
        args = value[:, None].float() * self.freqs.float()
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.in_ln = nn.RMSNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        # RMSNorm in float32 (as the authors' RMSNorm computes it); a no-op without autocast
        return x + gate * self.mlp(modulate(self.in_ln(x.float()), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int, eps: float):
        super().__init__()
        self.norm_final = nn.RMSNorm(width, eps=eps)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x.float()), shift, scale))


class FlowField(nn.Module):
    """Conditional velocity field v_phi(x_t, t, c, layer) (docs/RLFR_METHOD.md §2)."""

    def __init__(
        self, dim: int, width: int | None = None, depth: int = 4, freq_dim: int = 256, eps: float = 1e-6
    ):
        super().__init__()
        width = dim if width is None else width
        if dim < 1 or width < 1 or depth < 0:
            raise ValueError(f"invalid FlowField sizes: dim={dim}, width={width}, depth={depth}")
        if not eps > 0:
            raise ValueError(f"FlowField eps must be > 0, got {eps}")
        self.dim, self.width, self.depth, self.freq_dim, self.eps = dim, width, depth, freq_dim, float(eps)
        self.input_proj = nn.Linear(dim, width)
        self.time_embed = SinusoidalEmbedder(width, freq_dim)
        self.cond_embed = nn.Linear(dim, width)
        self.layer_embed = SinusoidalEmbedder(width, freq_dim)
        self.res_blocks = nn.ModuleList(ResBlock(width, self.eps) for _ in range(depth))
        self.final_layer = FinalLayer(width, dim, self.eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # The authors' (MAR/DiT) init: xavier-uniform linears with zero bias, then zero the modulation and
        # output layers so the field starts at exactly 0 and each block starts as the identity.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        zeroed = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def config(self) -> dict[str, int | float]:
        return {
            "dim": self.dim, "width": self.width, "depth": self.depth, "freq_dim": self.freq_dim, "eps": self.eps,
        }  # fmt: skip

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, layer: torch.Tensor
    ) -> torch.Tensor:
        """x_t: (N, d), t: (N,) in [0, 1], cond: (N, d), layer: (N,) in [0, 1] -> velocity (N, d) float32."""
        if x_t.dim() != 2 or x_t.shape != cond.shape or x_t.shape[-1] != self.dim:
            raise ValueError(
                f"expected x_t and cond of shape (N, {self.dim}), got {tuple(x_t.shape)}, {tuple(cond.shape)}"
            )
        if t.shape != x_t.shape[:1] or layer.shape != x_t.shape[:1]:
            raise ValueError(
                f"t {tuple(t.shape)} and layer {tuple(layer.shape)} must be (N,) = ({x_t.shape[0]},)"
            )
        dtype = self.input_proj.weight.dtype
        x = self.input_proj(x_t.to(dtype))
        y = self.time_embed(t) + self.cond_embed(cond.to(dtype)) + self.layer_embed(layer)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y).float()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor], eps: float = 1e-6) -> FlowField:
        """Build a field from a state dict in the authors' key layout, inferring dim/width/depth/freq_dim.

        Keys may carry the prefix ``model.`` (the authors' saved ``FlowReward``) or ``flow.model.`` (their
        training checkpoints); ``eps`` is the RMSNorm epsilon (the policy's ``rms_norm_eps``), which the
        weights cannot tell. Raises ValueError listing every missing, unexpected and mis-shaped key.
        """
        state_dict = strip_prefix(state_dict)
        bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad_values:
            raise ValueError(f"flow state dict has non-tensor values for keys {sorted(bad_values)}")
        needed = ["input_proj.weight", "time_embed.mlp.0.weight"]
        if any(k not in state_dict for k in needed):
            raise ValueError(
                f"cannot infer the flow field's sizes: missing keys "
                f"{[k for k in needed if k not in state_dict]} "
                f"(got {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})"
            )
        width, dim = state_dict["input_proj.weight"].shape
        freq_dim = state_dict["time_embed.mlp.0.weight"].shape[1]
        block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"res_blocks\.(\d+)\.", k))}
        depth = max(block_ids) + 1 if block_ids else 0
        try:
            field = cls(dim=int(dim), width=int(width), depth=depth, freq_dim=int(freq_dim), eps=eps)
        except ValueError as err:
            raise ValueError(f"flow state dict implies an invalid field: {err}") from err
        expected = field.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        misshaped = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} != expected {tuple(expected[k].shape)}"
            for k in set(expected) & set(state_dict)
            if state_dict[k].shape != expected[k].shape
        )
        if missing or unexpected or misshaped:
            raise ValueError(
                f"flow state dict does not match FlowField({field.config}):\n"
                f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  mis-shaped keys: {misshaped}"
            )
        field.load_state_dict({k: v.detach().to(torch.float32) for k, v in state_dict.items()}, strict=True)
        return field

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``flow.safetensors`` and ``flow_config.json`` into ``directory`` atomically; return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp_weights = directory / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        tmp_config = directory / (CONFIG_NAME + ".tmp")
        tmp_config.write_text(json.dumps(self.config, indent=2) + "\n")
        # os.replace is atomic on POSIX: a crash leaves either the old or the new file, never half of one.
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike, eps: float | None = None) -> FlowField:
        """Load from a directory written by ``save`` (``eps`` comes from its ``flow_config.json``), or from
        the authors' files: a directory holding ``flow_model.bin``, or a ``.safetensors`` / ``.bin`` / ``.pt``
        file in their key layout, for which ``eps`` (the policy's ``rms_norm_eps``) must be given."""
        path = Path(path)
        config_path = None
        if path.is_dir():
            if (path / WEIGHTS_NAME).is_file():
                path, config_path = path / WEIGHTS_NAME, path / CONFIG_NAME
            elif (path / OFFICIAL_WEIGHTS_NAME).is_file():
                path = path / OFFICIAL_WEIGHTS_NAME
            else:
                raise FileNotFoundError(f"no {WEIGHTS_NAME} or {OFFICIAL_WEIGHTS_NAME} in {path}")
        elif not path.is_file():
            raise FileNotFoundError(f"flow checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path))
        elif path.suffix in (".bin", ".pt", ".pth"):
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                # weights_only refuses arbitrary pickled objects: never fall back to a full unpickle.
                # (torch's own message runs to several lines that advise unpickling anyway: one line here)
                raise ValueError(
                    f"{path} is not safetensors and holds pickled Python objects besides tensors; refused (read "
                    "with torch.load(weights_only=True) only)"
                ) from None
            if not isinstance(state_dict, Mapping):
                raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a state dict")
        else:
            raise ValueError(f"unknown flow checkpoint format {path.suffix!r} ({path})")
        config = None
        if config_path is not None:
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path} is missing next to {path}")
            config = json.loads(config_path.read_text())
            if "eps" not in config:
                raise ValueError(
                    f"{config_path} has no 'eps' (written by rlfr < 0.2, whose flows are not compatible: "
                    "re-run `rlfr flow-pretrain`, or convert the authors' weights with `rlfr convert-flow`)"
                )
            eps = config["eps"]
        elif eps is None:
            raise ValueError(
                f"{path} is a flow in the authors' format without an RMSNorm epsilon: convert it with "
                "`rlfr convert-flow src=SRC model=POLICY out=DIR`, which takes eps from the policy's config"
            )
        try:
            field = cls.from_official_state_dict(state_dict, eps=eps)
        except ValueError as err:
            raise ValueError(f"cannot load flow checkpoint {path}: {err}") from err
        if config is not None and config != field.config:
            raise ValueError(f"{config_path} says {config} but the weights imply {field.config}")
        return field


_PREFIXES = ("flow.model.", "model.", "flow.")


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the authors' wrapper prefix (``flow.model.`` or ``model.``) when every key carries it."""
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)
