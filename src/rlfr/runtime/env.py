"""The process a stage runs in: accelerator, device, seeds.

- ``make_accelerator(cpu)``: one ``accelerate.Accelerator`` for single-process CPU/GPU runs and for
  ``accelerate launch`` (DDP / FSDP / DeepSpeed are configured by accelerate, not here). Training stages use
  its device.
- ``inference_device(cpu)``: the device of the inference-only commands (eval, inspect, compare's
  evaluations): the GPU when one is visible and ``cpu`` is false.
- ``seed_everything(seed)``: Python, NumPy and torch RNGs.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def make_accelerator(cpu: bool = False):
    from accelerate import Accelerator

    return Accelerator(cpu=cpu)


def inference_device(cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
