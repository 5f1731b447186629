"""``benchmarks/memory.py`` works end to end (``--tiny``, on the CPU) and refuses to measure without CUDA."""

from __future__ import annotations

import json
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
    # weights 2 + gradients 2 x 2 (DDP's buckets) + float32 copy 4 + float32 moments 2 x 4 bytes per weight
    assert e["static_GB"] == pytest.approx(18 * 7.615e9 / 1024**3, rel=0.01)
    before = memory.estimate("7b", "full-ddp", master_weights=False)  # AdamW on bf16: moments 2 x 2 bytes
    assert before["static_GB"] == pytest.approx(10 * 7.615e9 / 1024**3, rel=0.01)
    assert memory.estimate("7b", "lora")["trained_B"] * 1e9 == 28 * 64 * (
        2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944)
    )


FLOW_SCRIPT = SCRIPT.parent / "flow_pretrain_memory.py"


def _run_flow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(FLOW_SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_flow_pretrain_memory_tiny_measures_the_old_and_the_new_path():
    proc = _run_flow("--tiny", "--cpu")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("    4096")]
    # vocab tokens batch micro path peak step seconds: the old path one forward of 2, the new one 1 at a time
    assert [(r[2], r[3], r[4]) for r in rows] == [("2", "2", "old"), ("2", "1", "new")]
    assert all(float(r[5]) > 0 for r in rows)


def test_flow_pretrain_memory_logits_arithmetic():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import flow_pretrain_memory as fpm
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # the case: 16 solutions of 2,400 tokens at a 150k vocabulary, float32 logits: 23.04 GB at once
    assert fpm.logits_bytes(16, 2400, 150_000) == 16 * 2400 * 150_000 * 4 == 23_040_000_000
    # one 8,192-token sequence at Qwen2.5's 152,064 entries: 4.98 GB in float32 (2.49 GB in bf16)
    assert fpm.logits_bytes(1, 8192, 152_064) == 4_982_833_152


@pytest.mark.slow
def test_flow_pretrain_memory_e2e_runs_rlfr_flow_pretrain():
    proc = _run_flow("--e2e", "--tiny")
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert row["rc"] == 0 and row["micro_batch_size"] == 2 and row["peak_rss_GiB"] > 0
