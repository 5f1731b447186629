"""``rlfr data download`` (benchmarks into the datasets cache) and ``rlfr data prepare`` (flow-pretraining input
with a template, a cutoff and a held-out split), on local datasets: no test reaches the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlfr.cli import main
from rlfr.commands import DownloadConfig, PrepareConfig
from rlfr.config import ConfigError, load_config
from rlfr.data import load_examples
from rlfr.data.benchmarks import BENCHMARKS, Benchmark
from rlfr.data.prepare import percentile
from rlfr.data.templates import render_prompt, response_end
from rlfr.policy.loading import load_tokenizer
from rlfr.policy.rollout import encode_solutions
from rlfr.recipes.data import run_prepare
from tiny_run import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlfr.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


# ------------------------------------------------------------------ download


def test_download_offline_names_the_dataset_and_how_to_use_a_local_file():
    env = {"HF_DATASETS_OFFLINE": "1", "RLFR_BENCHMARK_DIR": ""}
    proc = _cli("data", "download", "math500", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert (
        "benchmark math500: Hub dataset HuggingFaceH4/MATH-500 (split test) cannot be loaded (offline mode"
        in err
    )
    assert "point at a local copy: a .jsonl / .parquet file" in err and "data.eval" in err


def test_download_refuses_an_unknown_benchmark(capsys):
    assert main(["data", "download", "gsm8k"]) == 2
    assert "benchmarks[0]: 'gsm8k' is not one of ['aime24', 'aime25'" in capsys.readouterr().err


def test_download_fetches_each_benchmark_through_datasets(tmp_path, monkeypatch, capsys):
    """The Hub ids replaced by directories laid out as their repositories: what download loads and reports."""
    import datasets

    monkeypatch.delenv("RLFR_BENCHMARK_DIR", raising=False)
    for name, rows in (("aime24", 3), ("minerva", 2)):
        b = BENCHMARKS[name]
        repo = tmp_path / name
        (repo / "data").mkdir(parents=True)
        table = [{b.prompt_field: f"q{i}", b.answer_field: str(i)} for i in range(rows)]
        datasets.Dataset.from_list(table).to_parquet(str(repo / "data" / f"{b.split}-00000-of-00001.parquet"))
        monkeypatch.setitem(BENCHMARKS, name, Benchmark(str(repo), b.split, b.prompt_field, b.answer_field))
    assert main(["data", "download", "aime24", "minerva"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"aime24: 3 rows from {tmp_path / 'aime24'}, split train -> data.eval=benchmark:aime24",
        f"minerva: 2 rows from {tmp_path / 'minerva'}, split test -> data.eval=benchmark:minerva",
    ]
    assert load_config(DownloadConfig).benchmarks == tuple(BENCHMARKS)  # no names: all six
    monkeypatch.setenv("RLFR_BENCHMARK_DIR", str(tmp_path))
    with pytest.raises(
        ValueError, match="RLFR_BENCHMARK_DIR is set, so benchmarks are read from local copies"
    ):
        main(["data", "download", "aime24", "--debug"])


# ------------------------------------------------------------------ prepare

# With data.system_prompt='' and the authors' Qwen template, the character tokenizer of tiny_run counts
#   prompt   <|im_start|> "user\n" problem <|im_end|> "\n" <|im_start|> "assistant\n"  = 1 + 5 + len(p) + 1 + 1 + 1 + 10
#   response solution <|im_end|> "\n"                                                    = len(s) + 2
# so a sequence is 21 + len(problem) + len(solution) tokens: 34, 44, 64, 104 for problems of 3 characters and
# solutions of 10, 20, 40 and 80.
SOLUTION_LENGTHS = (10, 20, 40, 80)


def _solutions_dataset(path: Path) -> Path:
    import datasets

    rows = [{"problem": f"{i}+{i}", "solution": ("s" * (n - 1)) + str(i), "answer": str(2 * i)}
            for i, n in enumerate(SOLUTION_LENGTHS)]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _prepare(tiny_dir, data, out, *extra: str):
    cfg = load_config(PrepareConfig, overrides=[f"model.name_or_path={tiny_dir}", f"data.train={data}",
                                                "data.template=authors_flow_qwen", "data.system_prompt=''",
                                                "max_length=50", f"out_dir={out}", *extra])  # fmt: skip
    return run_prepare(cfg)


def test_prepare_cuts_at_max_length_and_flow_pretraining_reads_the_same_sequences(tiny_dir, tmp_path, capsys):
    data = _solutions_dataset(tmp_path / "solutions")
    prepared = _prepare(tiny_dir, data, tmp_path / "flow_data")
    s = prepared.stats
    assert (s.rows, s.kept, s.truncated, s.dropped, s.heldout) == (4, 4, 2, 0, 0)
    assert s.lengths == {50: 44, 90: 104, 99: 104, 100: 104}  # nearest rank of [34, 44, 64, 104]
    out = capsys.readouterr().out
    assert "rows: 4 read, 4 kept (4 train, 0 held out), 2 truncated, 0 dropped" in out
    assert "p50 44, p90 104, p99 104, max 104" in out
    assert (
        f"next: rlfr flow-pretrain model.name_or_path={tiny_dir} data.train={tmp_path / 'flow_data'}/train.jsonl "
        "data.eval= data.prompt_field=messages data.template=authors_flow_qwen" in out
    )
    # what flow pretraining encodes from the written rows: the measured lengths, cut to max_length = 50
    rows = load_examples(tmp_path / "flow_data" / "train.jsonl", prompt_field="messages", need_answer=False)
    tok = load_tokenizer(str(tiny_dir))
    prompts = [render_prompt("authors_flow_qwen", r.problem, tok, system=r.system) for r in rows]
    sol = encode_solutions(tok, rows, prompts, response_end("authors_flow_qwen"))
    assert [len(p) + len(r) for p, r in zip(sol.prompt_ids, sol.response_ids)] == [34, 44, 50, 50]
    assert rows[2].solution == "s" * 26 and rows[0].solution == "s" * 9 + "0"  # cut to 50 - 21 - 3 tokens
    assert rows[0].system == ""  # "no system turn" travels with the row
    # drop instead, and a held-out half
    dropped = _prepare(tiny_dir, data, tmp_path / "dropped", "overlong=drop", "heldout_fraction=0.5")
    assert (dropped.stats.kept, dropped.stats.dropped, dropped.stats.heldout) == (2, 2, 1)
    assert sorted(r["id"] for split in dropped.splits.values() for r in split) == [
        "solutions-0",
        "solutions-1",
    ]
    with pytest.raises(ConfigError, match="every row is longer than max_length=30 tokens"):
        _prepare(tiny_dir, data, tmp_path / "none", "max_length=30", "overlong=drop")


@pytest.mark.parametrize("held", ["", "heldout"])
def test_prepared_data_trains_a_flow(tiny_dir, tmp_path, capsys, held):
    """data.eval= (none), as rlfr data prepare prints it; or a named held-out file (prepare's heldout.jsonl, no
    answer column), which flow pretraining does not read and says so (before: read, and refused for lacking
    answers)."""
    from rlfr.recipes.flow_pretrain import run_flow_pretrain
    from rlfr.schema import FlowPretrainConfig

    data = _solutions_dataset(tmp_path / "solutions")
    _prepare(tiny_dir, data, tmp_path / "flow_data", "format=dataset")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"}]}) + "\n")
    cfg = load_config(FlowPretrainConfig, overrides=[
        f"model.name_or_path={tiny_dir}", f"data.train={tmp_path / 'flow_data'}", "data.split=train",
        "data.prompt_field=messages", "data.template=authors_flow_qwen", f"data.eval={heldout if held else ''}",
        "batch_size=2", "epochs=1", "heldout_fraction=0", "report_to=[]", f"out_dir={tmp_path / 'flow'}",
    ])  # fmt: skip
    res = run_flow_pretrain(cfg, progress=False)
    assert res.steps == 2 and (tmp_path / "flow" / "flow" / "flow.safetensors").is_file()
    note = f"flow-pretrain: data.eval={heldout} is not read: the held-out flow loss is measured on heldout_fraction=0.0"
    assert (note in capsys.readouterr().out) == bool(held)


def test_prepare_runs_from_the_command_line_on_a_local_file(tiny_dir, tmp_path):
    rows = [
        {"problem": "1+1", "solution": "1+1=2", "answer": "2"},
        {"problem": "2+2", "solution": "4", "answer": "4"},
    ]
    (tmp_path / "sol.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli("data", "prepare", f"model.name_or_path={tiny_dir}", f"data.train={tmp_path / 'sol.jsonl'}",
                "data.template=qwen_math_box", f"out_dir={tmp_path / 'out'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "rows: 2 read, 2 kept (2 train, 0 held out), 0 truncated, 0 dropped" in proc.stdout
    written = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert written[0] == {"id": "sol-0", "messages": [{"role": "user", "content": "1+1"},
                                                      {"role": "assistant", "content": "1+1=2"}]}  # fmt: skip


def test_prepare_takes_only_settings(capsys):
    assert main(["data", "prepare", "math500"]) == 2
    assert "rlfr data prepare takes key=value settings, got ['math500']" in capsys.readouterr().err


def test_percentile_by_hand():
    assert [percentile([1, 2, 3, 4], p) for p in (25, 50, 51, 100)] == [1, 2, 3, 4]
    assert percentile([7], 99) == 7


def test_prepare_refuses_rows_with_images_rather_than_dropping_them(tiny_dir, tmp_path):
    rows = [{"problem": "What is shown?", "solution": "A cat.", "images": ["cat.png"]}]
    (tmp_path / "vl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"has images \(column images\); rlfr data prepare writes text-only rows"):
        _prepare(tiny_dir, tmp_path / "vl.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()
