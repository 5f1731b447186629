"""Shared fixtures: tiny random-init Hugging Face models (the factory lives in ``tests/helpers.py``)."""

from __future__ import annotations

import pytest

from helpers import tiny_model as _tiny_model


@pytest.fixture
def tiny_model():
    """Factory ``tiny_model(arch, num_layers=4, seed=0, **config_overrides)`` -> seeded model in eval mode."""
    return _tiny_model
