"""Sharded training (FSDP) under ``accelerate launch --config_file configs/accelerate/fsdp.yaml``, 2 processes.

On the CPU (gloo) accelerate itself never enables FSDP, so ``tests/fsdp_worker.py`` switches its state to FSDP
after the gloo set-up (the docstring there says why and how); everything from ``accelerator.prepare`` on is
torch's ``fully_shard`` as on GPUs. Checked: the policy is sharded (each rank holds about half of it), the flow
is replicated, the taps capture once per policy forward, checkpoints hold full weights gathered on the main
process, a run stopped and resumed under FSDP ends bit-identical to an uninterrupted one, checkpoints move
between FSDP and one process, LoRA (+ gradient checkpointing, + the adapter-disabled reference) and LoRA SFT
run sharded. ``test_fsdp_on_gpus`` runs the same worker under the real launch (``-m gpu``: 2 processes on 2+
GPUs, one process on a single GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_run import TINY_TRAIN_OVERRIDES, make_tiny_model_dir, tiny_train_config

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "accelerate"
RUN = (
    "steps=3",
    "save_every=1",
    "reward.funcs=[tiny_run:digit_reward]",
    "reward.correct_if=verifier",
    "policy.track_kl=true",
)
LORA = ("model.lora.rank=4", "model.gradient_checkpointing=true")


def _launch(config: Path, *args: str, timeout: int = 3600, processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", "0", *args]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _worker(
    config: Path, root: Path, model_dir: Path, mode: str, *extra: str, processes: int = 2
) -> list[dict]:
    overrides = [f"model.name_or_path={model_dir}", *TINY_TRAIN_OVERRIDES, *RUN, *extra]
    proc = _launch(config, str(HERE / "fsdp_worker.py"), str(root), mode, *overrides, processes=processes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((root / f"report_rank{r}.json").read_text()) for r in range(processes)]


def _files(ck: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ck.rglob("*.safetensors")):
        out |= {f"{f.relative_to(ck)}:{k}": v for k, v in load_file(str(f)).items()}
    return out


def _check_sharded_run(reports: list[dict], root: Path, model_dir: Path, lora: bool, version: int) -> None:
    r0, world = reports[0], len(reports)
    assert all(r["world"] == world for r in reports) and r0["fsdp_version"] == version
    assert r0["wrapper"].startswith("FSDP") or r0["wrapper"] == "FullyShardedDataParallel", r0["wrapper"]
    if world == 2:
        total = r0["local_numel"] + reports[1]["local_numel"]
        assert 0.4 * total < r0["local_numel"] < 0.6 * total  # each process holds about half of the policy
        assert r0["flow_wrapper"] == "DistributedDataParallel" and not r0["flow_sharded"]  # replicated
    else:  # one process: no DDP wrapper on the flow
        assert r0["flow_wrapper"] == "FlowField" and not r0["flow_sharded"]
    # 3 steps of 2 // world micro-batches per rank + the latent-statistics forward; the reference and
    # generation unseen
    sessions = 3 * (2 // world) + 1
    assert all(r["tap_sessions"] == sessions and r["tap_capture_count"] == [sessions] * 3 for r in reports)
    assert r0["ref"] == ("AdapterDisabled" if lora else "LlamaForCausalLM")
    full, part = (root / d / "checkpoints" / "step_000003" for d in ("full", "part"))
    a, b = _files(full), _files(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-exact"
    oa, ob = (torch.load(ck / "optim.pt", weights_only=True)["policy"] for ck in (full, part))
    assert oa["state"].keys() == ob["state"].keys()
    assert all(torch.equal(oa["state"][k]["exp_avg"], ob["state"][k]["exp_avg"]) for k in oa["state"])
    rewards = [[json.loads(x).get("reward") for x in (root / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("full", "part")]  # fmt: skip
    assert rewards[0] == rewards[1] and len(rewards[0]) == 3
    init = load_file(str(model_dir / "model.safetensors"))
    if (
        lora
    ):  # the gathered adapter (2 matrices x 7 projections x 4 blocks), trained; its optimizer state only
        assert sum(k.startswith("policy/adapter_model") for k in a) == 56 == len(oa["state"])
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    else:  # full weights, laid out as an unsharded save (the tied output layer not duplicated)
        weights = {k.split(":", 1)[1]: v for k, v in a.items() if k.startswith("policy/")}
        assert weights.keys() == init.keys()
        assert all(weights[k].shape == init[k].shape for k in init)
        assert any(not torch.equal(weights[k], init[k]) for k in init)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_fsdp2_full_fine_tuning_shards_and_resumes_bit_exact(tiny_dir, tmp_path):
    reports = _worker(CONFIGS / "fsdp.yaml", tmp_path, tiny_dir, "train")
    _check_sharded_run(reports, tmp_path, tiny_dir, lora=False, version=2)


def test_fsdp2_bfloat16_weights_train_through_float32_master_copies_and_resume_bit_exact(tiny_dir, tmp_path):
    """The presets' case: a bfloat16 policy, sharded. The optimizer keeps float32 copies of the weight shards
    (``policy.master_weights``), checkpointed gathered like the moments, and a resumed run is bit-identical."""
    reports = _worker(CONFIGS / "fsdp.yaml", tmp_path, tiny_dir, "train", "model.dtype=bfloat16")
    _check_sharded_run(reports, tmp_path, tiny_dir, lora=False, version=2)
    ck = tmp_path / "full" / "checkpoints" / "step_000003"
    state = torch.load(ck / "optim.pt", weights_only=True)["policy"]["state"]
    weights = {k: v for k, v in _files(ck).items() if k.startswith("policy/")}
    assert state and all(s["master"].dtype == torch.float32 == s["exp_avg"].dtype for s in state.values())
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert sum(s["master"].numel() for s in state.values()) == sum(v.numel() for v in weights.values())


@pytest.mark.slow  # ~25 s alone, ~55 s on a loaded 2-core machine; the full-fine-tuning FSDP tests stay default
def test_fsdp2_lora_sft_and_rl_and_checkpoints_that_move(tiny_dir, tmp_path):
    from rlfr.recipes.train import build_components, restore
    from rlfr.runtime.env import make_accelerator

    reports = _worker(CONFIGS / "fsdp.yaml", tmp_path, tiny_dir, "all", *LORA)
    _check_sharded_run(reports, tmp_path, tiny_dir, lora=True, version=2)
    # a DDP run's checkpoint (optimizer state numbered by position) resumed under FSDP ...
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "from_ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    ddp_optim = torch.load(
        tmp_path / "from_ddp" / "checkpoints" / "step_000003" / "optim.pt", weights_only=True
    )
    assert len(ddp_optim["policy"]["state"]) == 56
    # ... and an FSDP checkpoint (optimizer state by parameter name) restored in one process
    ck = tmp_path / "full" / "checkpoints" / "step_000003"
    c, _ = build_components(
        tiny_train_config(tiny_dir, tmp_path / "single", *RUN, *LORA), make_accelerator(True)
    )
    try:
        assert restore(c, ck) == 3
        saved = torch.load(ck / "optim.pt", weights_only=True)["policy"]["state"]
        names = {id(p): n for n, p in c.acc.unwrap_model(c.policy).named_parameters()}
        restored = {names[id(p)]: s for p, s in c.policy_opt.state.items()}
        assert restored.keys() == saved.keys()
        assert all(torch.equal(restored[k]["exp_avg_sq"], saved[k]["exp_avg_sq"]) for k in saved)
    finally:
        c.reward.verifier.close()
        c.flow.tap.remove()
    # LoRA SFT under FSDP: the gathered adapter and the merged model
    sft = tmp_path / "sft"
    adapter = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 56 and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    merged, init = (
        load_file(str(sft / "model" / "model.safetensors")),
        load_file(str(tiny_dir / "model.safetensors")),
    )
    changed = [k for k in init if not torch.equal(merged[k], init[k])]
    assert changed and all("proj" in k for k in changed)
    assert reports[0]["sft_accuracy"] is not None  # evaluation ran (generation below the sharded root)


def test_an_fsdp_config_is_refused_where_accelerate_would_run_ddp(tiny_dir, tmp_path):
    args = ["--module", "rlfr.cli", "train", f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, "cpu=true",
            f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = _launch(CONFIGS / "fsdp.yaml", *args, timeout=3600)
    assert proc.returncode != 0
    assert "accelerate launch was given an FSDP config" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_fsdp1_full_fine_tuning_on_cpu_and_lora_refused(tiny_dir, tmp_path):
    """FSDP1 (not shipped: FSDP2 is accelerate's and torch's way forward) trains full models; LoRA is refused."""
    fsdp1 = {  # sync_module_states needs a GPU; use_orig_params lets frozen and trainable weights share a unit
        "fsdp_version: 2": "fsdp_version: 1\n  fsdp_use_orig_params: true\n  fsdp_sync_module_states: false",
        "fsdp_reshard_after_forward: true": "fsdp_sharding_strategy: FULL_SHARD",
    }
    text = (CONFIGS / "fsdp.yaml").read_text()
    for old, new in fsdp1.items():
        text = text.replace(old, new)
    config = tmp_path / "fsdp1.yaml"
    config.write_text(text)
    reports = _worker(config, tmp_path / "full_ft", tiny_dir, "train")
    _check_sharded_run(reports, tmp_path / "full_ft", tiny_dir, lora=False, version=1)
    overrides = [f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, *RUN, *LORA]
    proc = _launch(config, str(HERE / "fsdp_worker.py"), str(tmp_path / "lora"), "train", *overrides)
    assert proc.returncode != 0 and "LoRA under FSDP needs fsdp_version: 2" in proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp-offload.yaml"])
def test_fsdp_on_gpus(tiny_dir, tmp_path, config):
    """The real launch (no switch in the worker): ``python -m pytest -m gpu tests/test_fsdp.py``; 2 processes on
    2+ GPUs, else 1 process on the one GPU (accelerate's FSDP path, sharding nothing)."""
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA device")
    n = min(2, torch.cuda.device_count())
    reports = _worker(CONFIGS / config, tmp_path, tiny_dir, "all", *LORA, processes=n)
    _check_sharded_run(reports, tmp_path, tiny_dir, lora=True, version=2)
    reports = _worker(CONFIGS / config, tmp_path / "full_ft", tiny_dir, "train", processes=n)
    _check_sharded_run(reports, tmp_path / "full_ft", tiny_dir, lora=False, version=2)
