"""Multi-machine launch (configs/launch/, configs/accelerate/multi-node-*.yaml, docs/multi_node.md): the files
agree with each other, and two "machines" on this host (one CPU process each, gloo) run flow pretraining and RL
through ``configs/launch/node.sh``, the entry point the SLURM script runs on every node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tiny_run import make_tiny_model_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ACCELERATE = ROOT / "configs" / "accelerate"
LAUNCH = ROOT / "configs" / "launch"


def test_the_launch_files_agree():
    ddp = yaml.safe_load((ACCELERATE / "multi-node-ddp.yaml").read_text())
    fsdp = yaml.safe_load((ACCELERATE / "multi-node-fsdp.yaml").read_text())
    one_machine = yaml.safe_load((ACCELERATE / "fsdp.yaml").read_text())
    for cfg in (ddp, fsdp):  # 2 machines x 8 GPUs; node.sh overrides the rank, the address and the count
        assert (cfg["num_machines"], cfg["num_processes"], cfg["machine_rank"]) == (2, 16, 0)
        assert cfg["rdzv_backend"] == "static" and "main_process_port" in cfg
    assert ddp["distributed_type"] == "MULTI_GPU" and fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"] == one_machine["fsdp_config"]  # one FSDP setting, on one machine or two
    sbatch = (LAUNCH / "slurm-2x8.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert "srun --kill-on-bad-exit=1 bash configs/launch/node.sh -m rlfr.cli" in sbatch
    assert "configs/accelerate/multi-node-ddp.yaml" in (LAUNCH / "node.sh").read_text()
    for script in ("node.sh", "slurm-2x8.sbatch"):
        assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_run_flow_pretraining_and_rl_through_node_sh(tmp_path):
    model = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    out.mkdir()
    env = {
        **os.environ, "NNODES": "2", "GPUS_PER_NODE": "1", "MAIN_PROCESS_IP": "127.0.0.1",
        "MAIN_PROCESS_PORT": str(_free_port()), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    env.pop("SLURM_NODEID", None)
    env.pop("SLURM_NNODES", None)
    cmd = ["bash", str(LAUNCH / "node.sh"), str(HERE / "multi_node_worker.py"), str(out), str(model)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]  # fmt: skip
    logs = [p.communicate(timeout=3600)[0] for p in procs]  # a bound on a hang, not on speed
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    r0, r1 = (json.loads((out / f"report_rank{r}.json").read_text()) for r in (0, 1))
    # one process per machine: global ranks 0 and 1, each its machine's local rank 0; one main process in all
    assert (r0["process_index"], r1["process_index"]) == (0, 1) and r0["num_processes"] == r1[
        "num_processes"
    ] == 2
    assert r0["local_process_index"] == r1["local_process_index"] == 0
    assert (r0["is_main_process"], r1["is_main_process"]) == (True, False) and r1["is_local_main_process"]
    # flow pretraining: 16 training rows, 4 per step split 2 + 2 over the machines (then micro-batches of 1)
    for a, b in zip(r0["flow_pretrain_rows"], r1["flow_pretrain_rows"]):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    assert len(r0["flow_pretrain_rows"]) == 4
    # the flow is replicated (DDP): its gradients all-reduced once per step, after the micro-batches, keep the
    # copies identical; so do the RL run's
    assert r0["flow_wrapper"] == "DistributedDataParallel" and r0["flow_pretrain"] == r1["flow_pretrain"]
    assert (r0["policy"], r0["flow"]) == (r1["policy"], r1["flow"])
    # rank 0 wrote the flow and the checkpoint; every rank its RNG state
    assert (out / "flow" / "flow" / "latents.json").is_file()
    ck = out / "rl" / "checkpoints" / "step_000002"
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
