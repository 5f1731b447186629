"""``docs/own_data.md`` runs as written: its reward module and its commands, on a tiny random model and a local
copy of the example dataset laid out as on the Hub, each command with a few settings appended that shrink it to
seconds (the doc's own settings stay; a later ``key=value`` wins). Run the way a user runs ``rlfr``: a fresh
shell in a scratch directory, the package from ``src/`` and not the current directory on ``sys.path``
(``python -P``, as the ``rlfr`` script), so ``my_rewards`` must be found the way the doc says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tiny_run import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "own_data.md"
MARKER = "<!-- run: tests/test_own_data.py -->"
# appended to each command of the doc: seconds on a tiny model
SMALL = {
    "sft": "steps=2 batch_size=2 micro_batch_size=2 eval_max_new_tokens=4 data.eval_size=2 report_to=[]",
    "data prepare": "",
    "flow-pretrain": "batch_size=2 epochs=1 heldout_fraction=0 report_to=[]",
    "train": "steps=2 save_every=2 rollout.prompts_per_step=2 rollout.num_generations=2 rollout.max_new_tokens=6 "
    "policy.micro_batch_size=2 eval_max_new_tokens=4 data.eval_size=2 reward.workers=1 report_to=[]",
    "export": "",
    "eval": "max_new_tokens=4 limit=2 workers=1 cpu=true",
}


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


def doc_commands() -> list[str]:
    """The lines of the runnable block, continuation lines joined."""
    text = DOC.read_text()
    block = re.search(rf"{re.escape(MARKER)}\n```bash\n(.*?)```", text, re.S)
    assert block, f"{DOC} has no block after {MARKER}"
    return block[1].replace("\\\n", " ").splitlines()


def unit_problems(root: Path) -> Path:
    """The example dataset as its Hub repository holds it: data/{train,test}-00000-of-00001.parquet."""
    import datasets

    def row(i: int) -> dict:
        km, h = 30 * (i + 2), 2 + i % 2
        unit = None if i % 3 == 2 else "km/h"  # some rows without a unit: the reward function returns None
        return {"question": f"A train covers {km} km in {h} hours. How fast is it?", "answer": str(km // h),
                "worked": f"{km} / {h} = {km // h}, so the speed is \\boxed{{{km // h}}} km/h.", "unit": unit}  # fmt: skip

    (root / "data").mkdir(parents=True)
    for split, rows in (("train", range(8)), ("test", range(8, 12))):
        datasets.Dataset.from_list([row(i) for i in rows]).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


def test_the_worked_example_runs_as_written(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny")
    data = unit_problems(tmp_path / "hub" / "unit-problems")
    work = tmp_path / "work"
    work.mkdir()
    (reward_module,) = [b for b in doc_blocks("python") if b.startswith("# my_rewards.py")]
    (work / "my_rewards.py").write_text(reward_module)
    lines, ran = [], []
    for line in doc_commands():
        if line.startswith("MODEL="):
            line = f"MODEL={model}"
        elif line.startswith("DATA="):
            line = f"DATA={data}"
        elif line.startswith("rlfr "):
            command = next(c for c in SMALL if line.startswith(f"rlfr {c} "))
            ran.append(command)
            line = f"{line} {SMALL[command]}"
        lines.append(line)
    assert ran == ["sft", "data prepare", "flow-pretrain", "train", "export", "eval"]
    script = 'set -euo pipefail\nrlfr() { "$PYTHON" -P -m rlfr.cli "$@"; }\n' + "\n".join(lines) + "\n"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    runs = work / "runs" / "units"
    assert (runs / "sft" / "model" / "config.json").is_file()
    assert "rows: 8 read, 8 kept (8 train, 0 held out), 0 truncated, 0 dropped" in proc.stdout
    assert (runs / "flow" / "flow" / "flow.safetensors").is_file()
    steps = [
        r for r in map(json.loads, (runs / "rl" / "metrics.jsonl").read_text().splitlines()) if "reward" in r
    ]
    assert len(steps) == 2 and all(
        {"reward/math", "reward/names_the_unit", "flow/loss_wrong"} <= set(r) for r in steps
    )
    assert (runs / "model" / "config.json").is_file()
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert [(v["data"], v["n"]) for v in results["datasets"].values()] == [(str(data), 2)]
