"""Data loaders: every format, bad rows named by file/row/field, skip mode, benchmarks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlfr.data import BENCHMARKS, DataError, Example, load_benchmark, load_examples
from rlfr.data.benchmarks import benchmark_search_dirs

ROWS = [
    {"id": "a", "problem": "1+1?", "answer": "2"},
    {"problem": "6*7?", "answer": 42, "sol": "6*7=42"},
    {"id": "c", "problem": "x?", "answer": ["1/2", "0.5"], "sol": "half"},
]
REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO.parent / "shared" / "data" / "benchmarks"


def write(path: Path, rows) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        df = pd.DataFrame(rows)
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_formats(tmp_path, suffix):
    exs = load_examples(write(tmp_path / f"d{suffix}", ROWS))
    assert exs[0] == Example("1+1?", "2", None, "a")
    assert exs[1] == Example("6*7?", "42", None, "d-1")  # number -> str, id from file stem and row index
    assert exs[2].answer == ("1/2", "0.5")
    assert exs.report.loaded == 3 and exs.report.skipped == 0


def test_parquet(tmp_path):
    # parquet columns have one type: lists in one file, ints in another
    lists = load_examples(
        write(tmp_path / "l.parquet", [{"problem": "p", "answer": ["1/2", "0.5"], "id": None}])
    )
    assert lists[0] == Example("p", ("1/2", "0.5"), None, "l-0")
    ints = load_examples(
        write(tmp_path / "i.parquet", [{"problem": "p", "answer": 42}, {"problem": "q", "answer": 7}])
    )
    assert [e.answer for e in ints] == ["42", "7"]
    with pytest.raises(DataError, match="f.parquet, row 2: field 'answer': non-finite"):
        load_examples(write(tmp_path / "f.parquet", [{"problem": "p", "answer": 1.5}, {"problem": "q"}]))


def test_csv_and_solution_field(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answer"} | {"answer": "7"} for r in ROWS]
    rows[0]["sol"] = "s"
    exs = load_examples(write(tmp_path / "d.csv", rows), solution_field="sol")
    assert [e.answer for e in exs] == ["7"] * 3 and exs[1].solution == "6*7=42"


def test_saved_dataset_dir(tmp_path):
    import datasets

    rows = [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": "2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [e.answer for e in load_examples(tmp_path / "ds")] == ["1", "2"]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="splits \\['test'\\]; pass split="):
        load_examples(tmp_path / "dd")
    assert len(load_examples(tmp_path / "dd", split="test")) == 2


def test_custom_field_names(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"question": "q", "final": 3.5}])
    assert load_examples(path, problem_field="question", answer_field="final")[0].answer == "3.5"


BAD_JSONL = "\n".join(
    [
        json.dumps({"problem": "ok", "answer": "1"}),
        "{not json",
        json.dumps({"problem": "no answer"}),
        "",
        json.dumps({"problem": "", "answer": "1"}),
        json.dumps({"problem": "bool", "answer": True}),
        json.dumps([1, 2]),
        json.dumps({"problem": "ok2", "answer": "2"}),
    ]
)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        (0, r"line 2: invalid JSON"),
        (1, r"line 3: field 'answer' is missing"),
        (2, r"line 5: field 'problem' must be a non-empty string"),
        (3, r"line 6: field 'answer': expected a string, number or list"),
        (4, r"line 7: expected an object, got list"),
    ],
)
def test_bad_rows_named(tmp_path, drop, match):
    lines = BAD_JSONL.split("\n")
    bad_lines = [1, 2, 4, 5, 6]  # 0-based indices of the bad lines; keep only the first `drop`-th one
    keep = [line if i not in bad_lines or i == bad_lines[drop] else json.dumps({"problem": "f", "answer": "0"})
            for i, line in enumerate(lines)]  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(keep))
    with pytest.raises(DataError, match=f"bad.jsonl, {match}"):
        load_examples(path)


def test_skip_bad_rows_counts(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_JSONL)
    exs = load_examples(path, skip_bad_rows=True)
    assert [e.problem for e in exs] == ["ok", "ok2"]
    assert exs.report.skipped == 5 and exs.report.rows == 7 and len(exs.report.errors) == 5
    assert "skipped 5 bad rows of 7" in caplog.text


def test_csv_bad_row_line_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("problem,answer\nq1,1\n,2\n")
    with pytest.raises(DataError, match="d.csv, row 2 \\(line 3\\): field 'problem'"):
        load_examples(path)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported format '.txt'"):
        load_examples(tmp_path / "x.txt")
    (tmp_path / "o.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_examples(tmp_path / "o.json")


def test_benchmark_lookup(tmp_path, monkeypatch):
    write(tmp_path / "aime24.jsonl", ROWS[:1])
    monkeypatch.setenv("RLFR_BENCHMARK_DIR", str(tmp_path))
    assert benchmark_search_dirs()[0] == tmp_path
    assert load_benchmark("aime24")[0].id == "a"
    assert len(load_benchmark(str(tmp_path / "aime24.jsonl"))) == 1
    monkeypatch.setenv("RLFR_BENCHMARK_DIR", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    if not BENCH_DIR.is_dir():
        with pytest.raises(FileNotFoundError, match="searched: .*empty"):
            load_benchmark("aime25")
    with pytest.raises(FileNotFoundError, match="neither a benchmark name"):
        load_benchmark("gsm8k")


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="shared benchmark files not present")
def test_benchmark_files_load():
    sizes = {name: len(load_benchmark(name)) for name in BENCHMARKS}
    assert sizes == {
        "aime24": 30,
        "aime25": 30,
        "amc23": 83,
        "math500": 500,
        "minerva": 272,
        "olympiadbench": 675,
    }


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="shared benchmark files not present")
def test_check_benchmark_answers_script():
    # Every ground truth, boxed, must verify against its own row (the fast path decides most of them).
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_benchmark_answers.py"), "--dir", str(BENCH_DIR)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100.0%" in proc.stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="shared benchmark files not present")
def test_check_benchmark_answers_through_math_verify():
    script = REPO / "scripts" / "check_benchmark_answers.py"
    proc = subprocess.run([sys.executable, str(script), "--dir", str(BENCH_DIR), "--no-fast-path"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_embedded_task_names_resolve_in_every_data_setting():
    # data.train names a whole task (its train split), data.eval one of its sets; the multi-step task's
    # names resolve like the one-line task's, with its own problems and solutions
    from rlfr.data.sources import GENERATED_SETS, load_source, resolve_data
    from rlfr.data.tasks import EMBEDDED_SETS, embedded_task, multistep_task
    from rlfr.schema import DataConfig

    assert EMBEDDED_SETS == ("embedded", "embedded-dev", "embedded-transfer", "embedded-multistep",
                             "embedded-multistep-dev", "embedded-multistep-transfer")  # fmt: skip
    assert set(EMBEDDED_SETS) <= set(GENERATED_SETS)
    cfg = DataConfig(train="embedded-multistep", eval="embedded-multistep-dev", train_size=30, eval_size=8,
                     dev_size=6, task_seed=2)  # fmt: skip
    train, evals = resolve_data(cfg, need_solution=True)
    splits = multistep_task(train_size=30, eval_size=8, seed=2, dev_size=6)
    assert train == splits.train and evals == splits.dev
    assert all(e.solution.startswith("First, ") for e in train)
    held_out = load_source("embedded-multistep", size=8, task_seed=2)
    assert held_out == splits.eval
    # the one-line task is unchanged by the new names
    short = DataConfig(train="embedded", eval="embedded", train_size=30, eval_size=8)
    assert resolve_data(short) == tuple(embedded_task(train_size=30, eval_size=8, seed=0)[:2])
    with pytest.raises(FileNotFoundError, match="embedded-multistep-transfer"):
        load_source("embedded-multistep-hard")
