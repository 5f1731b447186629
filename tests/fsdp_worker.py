"""Run by ``accelerate launch --config_file <an FSDP config>`` in tests/test_fsdp.py: an RL run sharded with
FSDP, the same run stopped after one step and resumed, optionally a LoRA SFT run, and what each rank saw.

accelerate (1.15) turns FSDP on for GPU processes only: on a CPU machine it sets the processes up for gloo
and DDP and ignores the FSDP settings (``rlfr.runtime.env.make_accelerator`` refuses that launch). torch's
FSDP itself runs on the CPU with gloo, so on the CPU this worker switches accelerate's state to FSDP after the
gloo set-up, with the plugin built from the ``FSDP_*`` variables ``accelerate launch`` exported from the
config file: from there on ``accelerator.prepare`` shards the policy as on GPUs (FSDP1 additionally needs the
device to be ``cpu``, not accelerate's ``cpu:0``). With CUDA nothing is switched: rlfr's own accelerator.

Usage: ``fsdp_worker.py ROOT MODE key=value ...``; MODE ``train``, or ``all``: first a one-step DDP run
(``ROOT/from_ddp``, resumed under FSDP at the end), and a LoRA SFT run after the RL runs. Writes
``ROOT/report_rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def fsdp_accelerator(cpu: bool = False, fsdp: bool = True):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)  # gloo process group on the CPU
    plugin = (
        FullyShardedDataParallelPlugin() if fsdp else None
    )  # from the FSDP_* variables of the config file
    acc.state.fsdp_plugin = plugin
    # what AcceleratorState does on GPUs (a later AcceleratorState() copies the type from PartialState)
    kind = DistributedType.FSDP if fsdp else DistributedType.MULTI_CPU
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = kind
    if fsdp and plugin.fsdp_version == 1:
        acc.state.device = PartialState._shared_state["device"] = torch.device("cpu")
    return acc


def ddp_accelerator(cpu: bool = False):
    return fsdp_accelerator(cpu, fsdp=False)


def main() -> None:
    from rlfr.config import load_config
    from rlfr.recipes import sft, train
    from rlfr.schema import SFTConfig, TrainConfig

    root, mode, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cpu = not torch.cuda.is_available()
    if cpu:
        train.make_accelerator = sft.make_accelerator = fsdp_accelerator
    captured = []
    original = train.build_components

    def build_and_keep(cfg, acc):
        c, data = original(cfg, acc)
        captured.append(c)
        return c, data

    train.build_components = build_and_keep

    def cfg(name: str):
        return load_config(TrainConfig, overrides=[*overrides, f"out_dir={root / name}"])

    if mode == "all":  # a DDP run's checkpoint, to be resumed under FSDP
        train.make_accelerator = ddp_accelerator if cpu else train.make_accelerator
        train.run_train(cfg("from_ddp"), progress=False, final_eval=False, stop_after=1)
        train.make_accelerator = fsdp_accelerator if cpu else train.make_accelerator
        captured.clear()
    train.run_train(cfg("full"), progress=False, final_eval=False)
    train.run_train(cfg("part"), progress=False, final_eval=False, stop_after=1)
    train.run_train(cfg("part"), progress=False, final_eval=False, resume=True)
    if mode == "all":
        train.run_train(cfg("from_ddp"), progress=False, final_eval=False, resume=True)
    c = captured[0]
    acc, policy = c.acc, c.acc.unwrap_model(c.policy)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]
    report = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "fsdp_version": acc.state.fsdp_plugin.fsdp_version if acc.state.fsdp_plugin else None,
        "wrapper": type(c.policy).__name__,
        "local_numel": sum(p.numel() for p in local),
        "flow_wrapper": type(c.flow.field).__name__,
        "flow_sharded": any(hasattr(p, "to_local") for p in c.flow.field.parameters()),
        "tap_sessions": c.flow.tap.sessions,
        "tap_capture_count": c.flow.tap.capture_count,
        "ref": type(c.ref).__name__ if c.ref is not None else None,
    }
    if mode == "all":
        base = [o for o in overrides if o.startswith("model.")]
        sft_cfg = load_config(
            SFTConfig,
            overrides=[*base, "data.train_size=16", "data.eval_size=2", "batch_size=4", "micro_batch_size=2",
                       "steps=2", "lr=1e-2", "eval_max_new_tokens=2", f"out_dir={root / 'sft'}"],
        )  # fmt: skip
        report["sft_accuracy"] = sft.run_sft(sft_cfg, progress=False).accuracy
    Path(root, f"report_rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
