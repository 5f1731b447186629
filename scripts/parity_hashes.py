"""Fingerprints of three tiny fixed-seed runs, to show that a refactor changed no result bit.

    .venv/bin/python scripts/parity_hashes.py [OUT_DIR]

On a tiny random-init Llama (tests/tiny_run.py) it runs, each as a user would:
1. ``rlfr flow-pretrain`` on the embedded task's worked solutions;
2. ``rlfr train method=rlfr`` from that flow (4 steps, online flow updates);
3. the TRL bridge (``RLFRGRPOTrainer``, 2 steps) with that flow.
and prints one SHA-256 per run over its logged metrics (timings removed) and its final weights (policy and
flow), bit for bit. Same code, same machine type -> same hashes; compare them before and after a change.
Single-threaded (OMP_NUM_THREADS=1) so that CPU kernels reduce in one order.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
TIMING = ("time/", "seconds", "tokens_per_s", "_runtime", "per_second", "step_time", "wall")


def _timing(key: str) -> bool:
    return any(t in key for t in TIMING)


def _digest(rows: list[dict], weight_files: list[Path]) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps({k: v for k, v in row.items() if not _timing(k)}, sort_keys=True).encode())
    for f in weight_files:
        for k, v in sorted(load_file(str(f)).items()):
            h.update(k.encode())
            h.update(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _rlfr(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "rlfr.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def flow_pretrain(model: Path, out: Path) -> str:
    _rlfr("flow-pretrain", f"model.name_or_path={model}", "data.train=embedded", "data.train_size=32",
          "data.solution_field=solution", "batch_size=8", "epochs=1", "seed=0", f"out_dir={out}")  # fmt: skip
    return _digest(_metrics(out / "metrics.jsonl"), [out / "flow" / "flow.safetensors"])


def train(model: Path, flow: Path, out: Path) -> str:
    from tiny_run import TINY_TRAIN_OVERRIDES

    _rlfr("train", "method=rlfr", f"model.name_or_path={model}", *TINY_TRAIN_OVERRIDES, "steps=4", "save_every=4",
          "seed=0", f"flow.init={flow}", f"out_dir={out}")  # fmt: skip
    final = out / "checkpoints" / "step_000004"
    return _digest(_metrics(out / "metrics.jsonl"),
                   [final / "policy" / "model.safetensors", final / "flow" / "flow.safetensors"])  # fmt: skip


def trl_bridge(model: Path, flow: Path, out: Path) -> str:
    import torch

    torch.set_num_threads(1)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    import rlfr.integrations.trl as bridge

    def has_digit(completions, **_):
        return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]

    rows = [[{"role": "user", "content": f"what is {i} + {i}?"}] for i in range(8)]
    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                max_steps=2, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", learning_rate=1e-3,
                bf16=False, seed=0, disable_tqdm=True)  # fmt: skip
    if hasattr(bridge, "RLFRGRPOConfig"):  # the TRL-shaped configuration (issue 26)
        args, kw = bridge.RLFRGRPOConfig(**base, flow_init=str(flow), flow_correctness="has_digit"), {}
    else:
        args, kw = GRPOConfig(**base), {"flow": str(flow), "correctness": "has_digit"}
    tr = bridge.RLFRGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=[has_digit], args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": rows}),
        processing_class=AutoTokenizer.from_pretrained(model), **kw,
    )  # fmt: skip
    tr.train()
    tr.save_model(str(out / "final"))
    logs = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in tr.state.log_history]
    return _digest(logs, [out / "final" / "model.safetensors", out / "final" / "flow" / "flow.safetensors"])


def main() -> None:
    from tiny_run import make_tiny_model_dir

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="rlfr-parity-"))
    model = make_tiny_model_dir(out / "model")
    print(f"flow-pretrain  {flow_pretrain(model, out / 'flow')}")
    print(f"train rlfr     {train(model, out / 'flow' / 'flow', out / 'train')}")
    print(f"trl bridge     {trl_bridge(model, out / 'flow' / 'flow', out / 'trl')}")


if __name__ == "__main__":
    main()
