"""Run on every "machine" by tests/test_multi_node.py through configs/launch/node.sh (accelerate launch with a
machine rank): flow pretraining in micro-batches, then two RL steps from that flow; each process writes what it
saw (its ranks, the rows of each flow-pretraining step it was given) and digests of its flow and policy weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_worker import digest


def main() -> None:
    from rlfr.config import load_config
    from rlfr.recipes import flow_pretrain, train
    from rlfr.schema import FlowPretrainConfig, TrainConfig
    from tiny_run import TINY_TRAIN_OVERRIDES

    out, model = Path(sys.argv[1]), sys.argv[2]
    kept, rows = {}, []
    prepare, shard = flow_pretrain.sharding.prepare_replicated, flow_pretrain.shard

    def keep_flow(acc, module, opt):
        kept["acc"], (kept["flow"], opt) = acc, prepare(acc, module, opt)
        return kept["flow"], opt

    def keep_rows(items, rank, world, what):
        rows.append(shard(items, rank, world, what))
        return rows[-1]

    flow_pretrain.sharding.prepare_replicated, flow_pretrain.shard = keep_flow, keep_rows
    fp = load_config(
        FlowPretrainConfig,
        overrides=[f"model.name_or_path={model}", "data.train=embedded", "data.train_size=20", "data.eval=",
                   "data.solution_field=solution", "batch_size=4", "micro_batch_size=1", "epochs=1",
                   "heldout_fraction=0.2", "flow.depth=2", "report_to=[]", "cpu=true", f"out_dir={out / 'flow'}"],
    )  # fmt: skip
    flow_pretrain.run_flow_pretrain(fp, progress=False)
    acc = kept["acc"]
    report = {
        "process_index": acc.process_index, "local_process_index": acc.local_process_index,
        "num_processes": acc.num_processes, "is_main_process": acc.is_main_process,
        "is_local_main_process": acc.is_local_main_process, "flow_wrapper": type(kept["flow"]).__name__,
        "flow_pretrain_rows": rows, "flow_pretrain": digest(acc.unwrap_model(kept["flow"])),
    }  # fmt: skip
    captured, build = {}, train.build_components

    def build_and_keep(cfg, acc):
        captured["c"], data = build(cfg, acc)
        return captured["c"], data

    train.build_components = build_and_keep
    rl = load_config(
        TrainConfig,
        overrides=[f"model.name_or_path={model}", *TINY_TRAIN_OVERRIDES, "steps=2", "cpu=true", "flow.depth=2",
                   f"flow.init={out / 'flow' / 'flow'}", "report_to=[]", f"out_dir={out / 'rl'}"],
    )  # fmt: skip
    train.run_train(rl, progress=False)
    c = captured["c"]
    report |= {
        "policy": digest(c.acc.unwrap_model(c.policy)),
        "flow": digest(c.acc.unwrap_model(c.flow.field)),
    }
    (out / f"report_rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
