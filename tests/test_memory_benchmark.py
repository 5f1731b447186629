"""``benchmarks/memory.py`` works end to end (``--tiny``, on the CPU) and refuses to measure without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=3600, env=env
    )


def test_tiny_runs_one_rl_step_per_mode_and_prints_the_table():
    proc = _run("--tiny", "--modes", "full-ddp", "lora-gc")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("tiny ")]
    assert [r[1] for r in rows] == ["full-ddp", "lora-gc"]
    for r in rows:
        assert r[-3] in ("MiB", "GiB")  # the measured peak, a number with its unit
        assert float(r[-4]) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_to_measure():
    proc = _run()
    assert proc.returncode == 2
    assert "needs CUDA" in proc.stderr and "--tiny" in proc.stderr


def test_the_estimates_match_the_published_parameter_counts():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import memory
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # Qwen2.5-Math-1.5B has 1.54B parameters, -7B 7.62B (their model cards); LoRA r=64 on the seven
    # projections of 28 blocks of the 7B: 28 x 64 x (2 x (3584 + 3584) + 2 x (3584 + 512) + 3 x (3584 + 18944))
    assert memory.estimate("1.5b", "lora")["params_B"] == pytest.approx(1.54, abs=0.01)
    e = memory.estimate("7b", "full-ddp")
    assert e["params_B"] == pytest.approx(7.62, abs=0.01)
    assert e["static_GB"] == pytest.approx(
        10 * 7.615e9 / 1024**3, rel=0.01
    )  # 2 + 2 x 2 + 2 x 2 bytes per weight
    assert memory.estimate("7b", "lora")["trained_B"] * 1e9 == 28 * 64 * (
        2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944)
    )
