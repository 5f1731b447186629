"""Data loaders: every format (through ``datasets`` where it reads them right), dataset directories laid out as on
the Hub, Hub ids offline, chat rows, system prompts, bad rows named by file/row/field, skip mode, benchmarks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlfr.data import BENCHMARKS, DataError, Example, load_benchmark, load_examples
from rlfr.data.benchmarks import Benchmark
from rlfr.data.sources import load_source, render_prompts, resolve_data
from rlfr.schema import BenchmarkName, DataConfig

ROWS = [
    {"id": "a", "problem": "1+1?", "answer": "2"},
    {"problem": "6*7?", "answer": 42, "sol": "6*7=42"},
    {"id": "c", "problem": "x?", "answer": ["1/2", "0.5"], "sol": "half"},
]
REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(os.environ.get("RLFR_BENCHMARK_DIR", "/nonexistent"))  # conftest.py: the development copies


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
    # a float column stores the missing answer as null (pandas showed it as NaN): named as missing
    with pytest.raises(DataError, match="f.parquet, row 2: field 'answer' is missing"):
        load_examples(write(tmp_path / "f.parquet", [{"problem": "p", "answer": 1.5}, {"problem": "q"}]))
    (tmp_path / "nan.jsonl").write_text('{"problem": "p", "answer": NaN}\n')
    with pytest.raises(DataError, match="nan.jsonl, line 1: field 'answer': non-finite"):
        load_examples(tmp_path / "nan.jsonl")


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
    assert load_examples(path, prompt_field="question", answer_field="final")[0].answer == "3.5"


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


def test_benchmark_specs_read_the_local_copies(tmp_path, monkeypatch):
    write(tmp_path / "aime24.jsonl", ROWS[:1])
    monkeypatch.setenv("RLFR_BENCHMARK_DIR", str(tmp_path))
    assert load_benchmark("aime24")[0].id == "a"
    assert (
        load_source("benchmark:aime24")[0].id == "a" and load_source("aime24")[0].id == "a"
    )  # bare name too
    with pytest.raises(DataError, match=r"aime25: .*aime25.jsonl does not exist \(RLFR_BENCHMARK_DIR="):
        load_benchmark("aime25")
    with pytest.raises(DataError, match="unknown benchmark 'gsm8k'; known: aime24, aime25, amc23, math500"):
        load_source("benchmark:gsm8k")
    assert tuple(BENCHMARKS) == BenchmarkName.__args__  # the config's choices are the table's names


def test_benchmarks_come_from_the_hub_through_datasets(tmp_path, monkeypatch):
    """Without local copies a benchmark is its Hub dataset: subset, split and column mapping go to
    ``load_dataset`` (here a directory laid out as the Hub repository); offline and never downloaded, the
    error names the dataset id and says how to fetch it or use a local file."""
    monkeypatch.delenv("RLFR_BENCHMARK_DIR", raising=False)
    repo = tmp_path / "OlympiadBench"
    (repo / "OE_TO_maths_en_COMP").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: OE_TO_maths_en_COMP\n  data_files:\n  - split: train\n"
        "    path: OE_TO_maths_en_COMP/train-*\n---\n"
    )
    write(repo / "OE_TO_maths_en_COMP" / "train-00000-of-00001.parquet",
          [{"id": 7, "question": "2+2?", "final_answer": ["4", "four"]}, {"id": 8, "question": "3+3?", "final_answer": ["6"]}])  # fmt: skip
    spec = BENCHMARKS["olympiadbench"]
    monkeypatch.setitem(BENCHMARKS, "olympiadbench", Benchmark(str(repo), spec.split, spec.prompt_field,
                                                               spec.answer_field, spec.subset))  # fmt: skip
    rows = load_source("benchmark:olympiadbench")
    assert [(r.problem, r.answer, r.id) for r in rows] == [
        ("2+2?", ("4", "four"), "7"),
        ("3+3?", ("6",), "8"),
    ]
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # conftest.py: no test reaches the Hub
    with pytest.raises(DataError) as e:
        load_source("benchmark:math500")
    msg = str(e.value)
    assert "HuggingFaceH4/MATH-500" in msg and "offline" in msg and "rlfr data download math500" in msg
    assert "local copy" in msg and "data.eval" in msg


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
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100.0%" in proc.stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="shared benchmark files not present")
def test_check_benchmark_answers_through_math_verify():
    script = REPO / "scripts" / "check_benchmark_answers.py"
    proc = subprocess.run([sys.executable, str(script), "--dir", str(BENCH_DIR), "--no-fast-path"],
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_embedded_task_names_resolve_in_every_data_setting():
    # data.train names a whole task (its train split), data.eval one of its sets; the multi-step task's
    # names resolve like the one-line task's, with its own problems and solutions
    from rlfr.data.sources import GENERATED_SETS
    from rlfr.data.tasks import EMBEDDED_SETS, embedded_task, multistep_task
    from rlfr.schema import canonical

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
    # data.eval=auto on the multi-step task is its own held-out split, as on the one-line task
    auto = DataConfig(train="embedded-multistep", train_size=30, eval_size=8, task_seed=2)
    assert resolve_data(auto) == (multistep_task(train_size=30, eval_size=8, seed=2).train, held_out)
    # and a run saved with data.eval=embedded-multistep is the same experiment as one with data.eval=auto
    saved = {"data": {"train": "embedded-multistep", "eval": "auto"}}
    assert canonical(saved)["data"]["eval"] == "embedded-multistep"
    with pytest.raises(DataError, match="does not exist; a data spec is .*embedded-multistep-transfer"):
        load_source("embedded-multistep-hard")


# ------------------------------------------------------------------ datasets: files, directories, Hub ids


def hub_repo(root: Path) -> Path:
    """A dataset repository as on the Hub: data/train-*.parquet and data/test-*.parquet with custom columns."""
    (root / "data").mkdir(parents=True)
    write(root / "data" / "train-00000-of-00001.parquet",
          [{"question": f"{i} + {i}?", "final": str(2 * i), "worked": f"{i} + {i} = {2 * i}"} for i in range(3)])  # fmt: skip
    write(
        root / "data" / "test-00000-of-00001.parquet", [{"question": "5 + 5?", "final": "10", "worked": "10"}]
    )
    return root


def test_a_hub_style_directory_with_splits_and_custom_columns(tmp_path):
    repo = hub_repo(tmp_path / "you" / "sums")
    cfg = DataConfig(train=str(repo), eval=str(repo), eval_split="test", prompt_field="question",
                     answer_field="final", solution_field="worked")  # fmt: skip
    train, evals = resolve_data(cfg, need_solution=True)
    assert [(e.problem, e.answer, e.solution) for e in train] == [
        ("0 + 0?", "0", "0 + 0 = 0"), ("1 + 1?", "2", "1 + 1 = 2"), ("2 + 2?", "4", "2 + 2 = 4")
    ]  # fmt: skip
    assert [(e.problem, e.answer) for e in evals] == [("5 + 5?", "10")]
    # the other columns travel with each example (reward functions get them as keyword arguments)
    assert train[1].columns == {"final": "2", "worked": "1 + 1 = 2"}
    with pytest.raises(DataError, match=r"no split 'validation'|Unknown split"):
        resolve_data(DataConfig(train=str(repo), split="validation", prompt_field="question", eval=""))


def test_a_missing_column_names_the_dataset_the_column_and_the_columns_found(tmp_path):
    repo = hub_repo(tmp_path / "repo")
    with pytest.raises(DataError) as e:
        resolve_data(DataConfig(train=str(repo), eval="", prompt_field="question"))  # answer_field: "answer"
    assert str(e.value) == (
        f"{repo} (split train): no column 'answer' (data.answer_field); its columns are ['question', 'final', 'worked']"
    )
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}], "answer": "1"}]
    ).save_to_disk(str(tmp_path / "chats"))
    with pytest.raises(DataError, match=r"chats: no column 'problem' \(data.prompt_field\); its columns are "
                                        r"\['messages', 'answer'\] \(chat rows: data.prompt_field=messages\)"):  # fmt: skip
        load_examples(tmp_path / "chats")
    # a JSON Lines row names its file, line, the column and the row's columns
    path = write(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"d.jsonl, line 1: field 'problem' is missing \(row has \['answer', 'question'\]; "
                                        r"data.prompt_field names the column\)"):  # fmt: skip
        load_examples(path)


def test_a_hub_id_goes_to_load_dataset_and_offline_names_the_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    with pytest.raises(DataError) as e:
        resolve_data(
            DataConfig(train="someone/math-sft", subset="main", eval="", solution_field="solution"), True
        )
    msg = str(e.value)
    assert msg.startswith(
        "Hub dataset someone/math-sft (subset main, split train) cannot be loaded (offline mode"
    )
    assert "point at a local copy: a .jsonl / .parquet file or a directory" in msg
    with pytest.raises(DataError, match="nothing.jsonl: no such file"):
        load_examples("nothing.jsonl")
    with pytest.raises(DataError, match="data 'not-a-thing' does not exist; a data spec is embedded"):
        load_source("not-a-thing")


def test_csv_cells_stay_text_and_json_values_stay_as_written(tmp_path):
    (tmp_path / "d.csv").write_text("problem,answer\nq1,007\nq2,1e5\n")
    assert [e.answer for e in load_examples(tmp_path / "d.csv")] == ["007", "1e5"]
    # a column mixing strings, numbers and lists (datasets' JSON reader would re-parse "1e5" into 100000.0)
    rows = [
        {"problem": "a", "answer": "1e5"},
        {"problem": "b", "answer": 3},
        {"problem": "c", "answer": ["x", "y"]},
    ]
    assert [e.answer for e in load_examples(write(tmp_path / "m.jsonl", rows))] == ["1e5", "3", ("x", "y")]


CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


def test_chat_rows_give_prompt_system_turn_and_solution(tmp_path):
    rows = [{"messages": CHAT, "answer": "Paris"},
            {"messages": [{"role": "user", "content": "Part one."}, {"role": "user", "content": "Part two?"}],
             "answer": "x", "solution": "from the column"}]  # fmt: skip
    exs = load_examples(write(tmp_path / "c.jsonl", rows), prompt_field="messages", solution_field="solution")
    assert (exs[0].problem, exs[0].system, exs[0].solution) == (
        "Capital of France?",
        "Answer in one word.",
        "Paris",
    )
    # two user turns are one prompt; without an assistant turn the solution comes from its column
    assert (exs[1].problem, exs[1].system, exs[1].solution) == (
        "Part one.\n\nPart two?",
        None,
        "from the column",
    )
    multi = [{"messages": [*CHAT, {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid"}],
              "answer": "Madrid"}]  # fmt: skip
    with pytest.raises(
        DataError, match="m.jsonl, line 1: column 'messages': an assistant turn before the last user turn"
    ):
        load_examples(write(tmp_path / "m.jsonl", multi), prompt_field="messages")
    # the same rows from a dataset saved with datasets (a list-of-structs column)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"messages": CHAT, "answer": "Paris"}]).save_to_disk(str(tmp_path / "saved"))
    saved = load_examples(tmp_path / "saved", prompt_field="messages", solution_field="solution")
    assert (saved[0].problem, saved[0].system, saved[0].solution) == (
        "Capital of France?",
        "Answer in one word.",
        "Paris",
    )


def test_data_system_prompt_sets_the_system_turn(tmp_path):
    from tiny_run import make_tokenizer

    tok = make_tokenizer()  # ChatML: <|im_start|>role\ncontent<|im_end|>\n
    path = write(
        tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2"}, {"messages": CHAT, "answer": "Paris"}][:1]
    )
    default, own, none = (
        render_prompts(
            resolve_data(DataConfig(train=str(path), eval="", system_prompt=sp))[0], "chat", tok, 512
        )[0]
        for sp in (None, "Be brief.", "")
    )
    assert default.startswith("<|im_start|>system\nPlease reason step by step")
    assert (
        own
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert none == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    # on the embedded task and on a benchmark too; a chat row's own system turn wins
    emb = resolve_data(DataConfig(train_size=2, eval_size=1, system_prompt="Be brief."))
    assert all(e.system == "Be brief." for e in emb[0] + emb[1])
    chats = write(tmp_path / "c.jsonl", [{"messages": CHAT, "answer": "Paris"}])
    row = resolve_data(
        DataConfig(train=str(chats), eval="", prompt_field="messages", system_prompt="Be brief.")
    )[0][0]
    assert row.system == "Answer in one word."
    with pytest.raises(ValueError, match="template 'r1' has no system turn"):
        render_prompts([row], "r1", tok, 512)


def test_a_run_saved_with_the_old_key_names_resumes_unchanged():
    """data.problem_field is now data.prompt_field and reward.functions reward.funcs: a checkpoint's config that
    says the old names is the same experiment, not a change the resume would refuse."""
    from rlfr.config import load_config, to_dict
    from rlfr.schema import TrainConfig, resume_changes

    overrides = ["data.prompt_field=question", "reward.funcs=[math,format]", "reward.weights=[1.0,0.5]"]
    new = to_dict(load_config(TrainConfig, overrides=overrides))
    old = json.loads(json.dumps(new))
    old["data"]["problem_field"] = old["data"].pop("prompt_field")
    old["reward"]["functions"] = old["reward"].pop("funcs")
    assert resume_changes(old, new) == ({}, {})
    old["data"]["problem_field"] = "other"
    assert resume_changes(old, new)[1] == {"data.prompt_field": ("other", "question")}


# ------------------------------------------------------------------ said, not silent (review of user paths)
def test_a_file_cut_to_eval_size_is_said_and_a_generated_set_needs_a_size(tmp_path, capsys):
    rows = [{"problem": f"{i}+{i}", "answer": str(2 * i)} for i in range(5)]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, evals = resolve_data(DataConfig(eval=str(path), eval_size=2))
    assert [e.answer for e in evals] == ["0", "2"]
    assert (
        f"data.eval={path}: evaluating on its first 2 of 5 rows (data.eval_size; 0 = all)"
        in capsys.readouterr().out
    )
    _, evals = resolve_data(DataConfig(eval=str(path), eval_size=0))  # 0 = all rows of a file, nothing said
    assert len(evals) == 5 and "evaluating on" not in capsys.readouterr().out
    with pytest.raises(DataError, match="data.eval=embedded is generated here.*set data.eval_size >= 1"):
        resolve_data(DataConfig(eval="embedded", eval_size=0))


def test_a_bare_benchmark_name_that_is_also_a_local_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").mkdir()
    with pytest.raises(
        DataError, match=r"names both the benchmark and the local path \./math500: write benchmark:"
    ):
        load_source("math500")


def test_evaluating_on_the_training_rows_is_said(tmp_path, capsys):
    rows = [{"problem": f"{i}+{i}", "answer": str(2 * i)} for i in range(6)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    resolve_data(DataConfig(train=str(path), eval=str(path)))
    assert f"warning: data.eval is data.train ({path}, split train)" in capsys.readouterr().out
    resolve_data(DataConfig(train=str(path), eval="auto", eval_size=2))  # rows held out: nothing to warn about
    assert "warning" not in capsys.readouterr().out
