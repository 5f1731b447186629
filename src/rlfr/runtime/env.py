"""The process a stage runs in: accelerator, device, seeds.

- ``make_accelerator(cpu)``: one ``accelerate.Accelerator`` for single-process CPU/GPU runs and for
  ``accelerate launch`` (DDP / FSDP / DeepSpeed are configured by accelerate, not here). Training stages use
  its device. Two launches that accelerate would carry out as something else are refused: an FSDP config
  where accelerate does not enable FSDP (it does so on GPUs only; on CPU it silently runs DDP), and several
  launched processes that accelerate sets up as independent single-process runs (no GPU and no ``cpu=true``).
- ``inference_device(cpu)``: the device of the inference-only commands (eval, inspect, compare's
  evaluations): the GPU when one is visible and ``cpu`` is false.
- ``seed_everything(seed)``: Python, NumPy and torch RNGs.
- ``flow_autocast(precision, device)``: the autocast dtype of the flow (``flow.precision``), or None.
- ``set_tf32(enabled, device)``: TF32 matmuls on an Ampere+ GPU for what stays in float32.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rlfr.errors import ConfigError


def make_accelerator(cpu: bool = False):
    acc = Accelerator(cpu=cpu)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
        acc.distributed_type != DistributedType.FSDP
    ):
        raise ConfigError(
            f"accelerate launch was given an FSDP config, but accelerate runs this process as "
            f"{acc.distributed_type.value} (it enables FSDP on GPUs only{', and cpu=true is set' if cpu else ''}); "
            "launch without the FSDP config (DDP: --multi_gpu) or on GPUs"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched but accelerate set this one up as {acc.num_processes} of "
            f"{acc.num_processes} ({acc.distributed_type.value}): each would train on its own. Without a GPU, "
            "set cpu=true (gloo)"
        )
    return acc


def inference_device(cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flow_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """``flow.precision`` -> the autocast dtype (None = plain float32). ``auto`` is bfloat16 on a CUDA GPU
    that supports it (the flow is small and its scores were measured to agree within 1 %, see the README),
    float32 elsewhere (CPUs without bf16 units run bf16 autocast slower than float32)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown flow precision {precision!r}; valid: auto, float32, bfloat16")
    cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda else None


def set_tf32(enabled: bool, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
