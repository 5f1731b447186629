"""Shared fixtures: tiny random-init Hugging Face models (the factory lives in ``tests/helpers.py``).

Also, before anything imports ``datasets`` or ``huggingface_hub``: no test reaches the Hub (offline mode: only
the local cache is read), and the benchmarks are read from the local copies beside the development checkout
(``<ancestor>/shared/data/benchmarks``, through ``RLFR_BENCHMARK_DIR``, ``rlfr.data.benchmarks``) when there are
any; tests that need them are skipped otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
BENCHMARK_COPIES = next(
    (p / "shared" / "data" / "benchmarks" for p in Path(__file__).resolve().parents
     if (p / "shared" / "data" / "benchmarks").is_dir()),
    None,
)  # fmt: skip
if BENCHMARK_COPIES is not None:
    os.environ.setdefault("RLFR_BENCHMARK_DIR", str(BENCHMARK_COPIES))

from helpers import tiny_model as _tiny_model  # noqa: E402


@pytest.fixture
def tiny_model():
    """Factory ``tiny_model(arch, num_layers=4, seed=0, **config_overrides)`` -> seeded model in eval mode."""
    return _tiny_model
