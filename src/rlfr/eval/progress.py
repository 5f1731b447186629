"""The finished part of an interrupted held-out evaluation, so that a rerun continues instead of starting over.

``EvalProgress(path, key)`` keeps one JSON file: the per-problem results so far, the random state after
them, the settings the chunking depends on, and ``key`` (whatever else the result depends on: the model, the
problems, the template, ...). ``rlfr.eval.scoring.held_out_scores`` saves it after every chunk and resumes
from it (``seconds`` adds up the time of every attempt, stored at full precision: a fast attempt is not rounded to
zero; round where it is displayed); the caller removes it (``clear``) once the final result is written. A file
with another key or other settings is a leftover of another evaluation: it is reported and replaced, never reused.
``clock`` (default ``time.monotonic``) is injectable, so tests of the time bookkeeping do not depend on how fast
the machine is.

The random state is that of torch's generators only (the CPU one and the sampling device's), base64 in the
JSON file; a training checkpoint's fuller state (python, numpy, every CUDA device) is
``rlfr.runtime.checkpoint.rng_state``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlfr.runtime.checkpoint import atomic_write_text


class EvalProgress:
    def __init__(self, path: str | Path, key: dict, clock: Callable[[], float] = time.monotonic):
        self.path, self.key, self._clock = Path(path), key, clock
        self._start, self._before = clock(), 0.0

    @property
    def seconds(self) -> float:
        """Time spent on this evaluation so far: this process's and that of the interrupted ones before."""
        return self._before + self._clock() - self._start

    def load(self, settings: dict) -> dict | None:
        """The saved state when it has this key and these ``settings``; otherwise None (with a message)."""
        if not self.path.is_file():
            return None
        try:
            saved = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            print(f"eval: {self.path} is not valid JSON ({e}); starting the evaluation over")
            return None
        for what, want in (("key", self.key), ("settings", settings)):
            if saved.get(what) != want:
                print(f"eval: {self.path} is from another evaluation (its {what} differs); starting over")
                return None
        self._before = float(saved.get("seconds", 0.0))
        return saved

    def save(self, settings: dict, state: dict) -> None:
        """Write ``state`` (JSON-able) atomically, with the key and ``settings``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = {"key": self.key, "settings": settings, "seconds": self.seconds}
        atomic_write_text(self.path, json.dumps(head | state))

    def clear(self) -> None:
        """Remove the file: the evaluation's final result has been written."""
        self.path.unlink(missing_ok=True)


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def torch_rng_state(device: torch.device) -> dict[str, str]:
    """The CPU generator's state and, on a GPU (or MPS), that device's: what sampling there draws from."""
    state = {"cpu": _encode(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode(torch.cuda.get_rng_state(device))
    elif device.type == "mps":
        state["mps"] = _encode(torch.mps.get_rng_state())
    return state


def set_torch_rng_state(device: torch.device, state: dict[str, str]) -> None:
    """Restore ``torch_rng_state(device)``'s result (the device type is part of the saved settings)."""
    torch.set_rng_state(_decode(state["cpu"]))
    if device.type == "cuda":
        torch.cuda.set_rng_state(_decode(state["cuda"]), device)
    elif device.type == "mps":
        torch.mps.set_rng_state(_decode(state["mps"]))
