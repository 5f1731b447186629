"""Two CPU processes (gloo) under ``accelerate launch``: two RL steps, identical weights on both ranks.

``--multi_gpu`` selects accelerate's torchrun launcher; with ``cpu=true`` the processes use gloo on the CPU
(accelerate's ``--cpu`` launcher would start a single process unless MPI is set up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tiny_run import TINY_TRAIN_OVERRIDES, make_tiny_model_dir

HERE = Path(__file__).parent


def test_two_process_rl_run_keeps_ranks_identical(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(HERE / "dist_worker.py"),
        f"model.name_or_path={model_dir}",
        *TINY_TRAIN_OVERRIDES,
        "steps=2",
        "cpu=true",
        f"out_dir={out}",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)  # a hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    d0 = json.loads((out / "digest_rank0.json").read_text())
    d1 = json.loads((out / "digest_rank1.json").read_text())
    assert d0["world"] == d1["world"] == 2
    assert d0["policy"] == d1["policy"]
    assert d0["flow"] == d1["flow"]
    # the run trained (weights moved) and checkpointed once, from the main process
    ck = out / "checkpoints" / "step_000002"
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
    init = load_file(str(model_dir / "model.safetensors"))
    final = load_file(str(ck / "policy" / "model.safetensors"))
    assert any(not (init[k] == final[k]).all() for k in init)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "reward" in r]) == 2
