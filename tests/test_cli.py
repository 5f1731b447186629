"""The ``rlfr`` command (issue 28): every setting a ``key=value`` word, the few flags, "did you mean",
``--show-config`` that prints what the run would use and reads back through ``--config``, each warning once,
no silent random flow, and ``rlfr export``'s model card and Hub upload."""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlfr import __version__
from rlfr.cli import _COMMANDS, OnceFilter, _logging, main
from tiny_run import TINY_TRAIN_OVERRIDES, make_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "qwen2.5-math-1.5b.yaml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _out(capsys, argv: list[str], rc: int = 0) -> str:
    capsys.readouterr()
    assert main(argv) == rc, capsys.readouterr().err[-3000:]
    return capsys.readouterr().out


def _err(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_help_lists_the_commands_and_version(capsys):
    out = _out(capsys, ["--help"])
    assert all(f"  {name} " in out for name in _COMMANDS)
    assert _out(capsys, ["--version"]).strip() == f"rlfr {__version__}"
    train = _out(capsys, ["train", "--help"])
    assert "--resume" in train and "--allow-data-change" in train and "flow.reward.beta" in train
    assert re.search(r"policy\.lr\s+1\.0e-06\s+actor learning rate \(> 0\)", train)
    # the listing shows the command's own defaults (SFT's data.solution_field), not its section class's
    assert re.search(r"data\.solution_field\s+solution\s", _out(capsys, ["sft", "--help"]))
    assert "--push-to-hub REPO" in _out(capsys, ["export", "--help"])


def test_misspelt_commands_flags_and_keys_get_a_did_you_mean(capsys):
    assert "unknown command 'trian'; did you mean 'train'?" in _err(capsys, ["trian"])
    assert "unknown flag --resum; did you mean '--resume'?" in _err(capsys, ["train", "--resum"])
    err = _err(capsys, ["train", "flow.reward.bta=0.1", "--show-config"])
    assert "did you mean 'flow.reward.beta'" in err
    # the flags of before are refused with the key=value form
    for argv, want in ((["train", "--method", "rlvr"], "method=VALUE"), (["compare", "--methods", "rlvr"], "methods="),
                       (["demo", "--quick"], "quick="), (["eval", "--model", "m"], "model="),
                       (["inspect", "--n-prompts", "2"], "n_prompts="), (["export", "--merged", "x"], "merged=")):  # fmt: skip
        err = _err(capsys, argv)
        assert "is not a flag: settings are key=value words" in err and want in err, err
    assert "--push-to-hub needs a value" in _err(capsys, ["export", "--push-to-hub"])
    assert "unknown flag --resume" in _err(capsys, ["sft", "--resume"])  # a flag of another command


SUBCOMMANDS = {"data": ["data", "prepare"]}  # commands whose first word is an action


@pytest.mark.parametrize("command", list(_COMMANDS))
def test_show_config_prints_the_resolved_config_and_reads_back(command, tmp_path, capsys):
    """``--show-config`` is valid ``--config`` input: printed, read back and printed again, it is the same, with
    and without a ``--config`` file and overrides."""
    words = SUBCOMMANDS.get(command, [command])
    first = _out(capsys, [*words, "--show-config"])
    assert first.startswith(f"# rlfr {' '.join(words)}: the resolved configuration")
    saved = tmp_path / "shown.yaml"
    saved.write_text(first)
    assert _out(capsys, [*words, "--config", str(saved), "--show-config"]) == first
    changed = {"train": "steps=7", "sft": "steps=7", "flow-pretrain": "epochs=3.0", "demo": "quick=true",
               "eval": "data.eval=[embedded,math500]", "inspect": "n_prompts=3", "compare": "seeds=[4,5]",
               "convert-flow": "modes=token_post", "export": "dtype=bfloat16", "data": "max_length=4096",
               "select": "n=4"}[command]  # fmt: skip
    second = _out(capsys, [*words, f"--config={saved}", changed, "--show-config"])
    assert second != first
    saved.write_text(second)
    assert _out(capsys, [*words, "--config", str(saved), "--show-config"]) == second


def test_show_config_uses_the_config_files(tmp_path, capsys):
    """Before, ``--show-config`` ignored ``--config`` (it printed the built-in defaults, not the preset's model
    or its betas 0.9, 0.95); with a file and overrides it prints what the run would use."""
    shown = yaml.safe_load(_out(capsys, ["train", "--config", str(PRESET), "steps=5", "--show-config"]))
    preset = yaml.safe_load(PRESET.read_text())
    assert shown["model"]["name_or_path"] == preset["model"]["name_or_path"] == "Qwen/Qwen2.5-Math-1.5B"
    assert shown["policy"]["betas"] == [0.9, 0.95] and shown["steps"] == 5
    assert shown["policy"]["micro_batch_size"] == preset["policy"]["micro_batch_size"]
    more = tmp_path / "more.yaml"  # several files: later ones win, key by key
    more.write_text("policy:\n  lr: 2.0e-6\n")
    shown = yaml.safe_load(
        _out(capsys, ["train", "--config", str(PRESET), "--config", str(more), "--show-config"])
    )
    assert shown["policy"]["lr"] == 2e-6 and shown["policy"]["betas"] == [0.9, 0.95]
    # flow-pretrain on the user's data keeps the command's solution column (it showed solution_field: None)
    shown = yaml.safe_load(_out(capsys, ["flow-pretrain", "data.train=mine.jsonl", "--show-config"]))
    assert shown["data"] == {**shown["data"], "train": "mine.jsonl", "solution_field": "solution"}


def test_eval_results_record_the_rlfr_version(tiny_dir, tmp_path, capsys):
    """``rlfr eval``'s results.json names the rlfr that wrote it (its last key), and reads back unchanged; a file
    of an earlier version, without the key, still reads."""
    from rlfr.eval.results import EvaluateResult

    rows = [{"problem": f"{i}+1?", "answer": str(i + 1)} for i in range(2)]
    (tmp_path / "ev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _out(capsys, ["eval", f"model={tiny_dir}", f"data.eval={tmp_path / 'ev.jsonl'}", f"out={tmp_path / 'e'}",
                  "max_new_tokens=2", "workers=1", "cpu=true", "dtype=float32"])  # fmt: skip
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["rlfr_version"] == __version__ and list(res)[-1] == "rlfr_version"
    assert EvaluateResult.from_dict(res).to_dict() == res
    older = {k: v for k, v in res.items() if k != "rlfr_version"}
    assert (
        EvaluateResult.from_dict(older).rlfr_version is None
        and EvaluateResult.from_dict(older).to_dict() == older
    )


def test_sft_on_the_users_files_keeps_the_solution_column(tiny_dir, tmp_path, capsys):
    """The trap of before: ``rlfr sft data.train=mine.jsonl data.eval=mine_eval.jsonl`` on a file with a
    ``solution`` column failed with "field None" (the command's data.solution_field was lost)."""
    rows = [
        {"problem": f"{i}+1?", "answer": str(i + 1), "solution": f"{i}+1 = \\boxed{{{i + 1}}}"}
        for i in range(6)
    ]
    for name in ("mine.jsonl", "mine_eval.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _out(capsys, ["sft", f"model.name_or_path={tiny_dir}", f"data.train={tmp_path / 'mine.jsonl'}",
                        f"data.eval={tmp_path / 'mine_eval.jsonl'}", "steps=1", "batch_size=2", "micro_batch_size=2",
                        "eval_max_new_tokens=4", "report_to=[]", f"out_dir={tmp_path / 'sft'}"])  # fmt: skip
    assert json.loads(out[out.index("{") :])["accuracy"] is not None
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file()


def test_rlfr_without_a_flow_is_refused_and_random_is_said(tiny_dir, tmp_path, capsys):
    """Before, ``rlfr train`` (method rlfr) without flow.init trained a random flow silently; now it stops before
    any work, naming flow.init and ``rlfr flow-pretrain``; ``flow.init=random`` runs and says so."""
    rest = [o for o in TINY_TRAIN_OVERRIDES if not o.startswith("flow.init")]
    err = _err(capsys, ["train", f"model.name_or_path={tiny_dir}", *rest, f"out_dir={tmp_path / 'r'}"])
    assert (
        "method=rlfr needs flow.init" in err and "`rlfr flow-pretrain`" in err and "flow.init=random" in err
    )
    assert not (tmp_path / "r").exists()  # nothing ran
    out = _out(capsys, ["train", f"model.name_or_path={tiny_dir}", *rest, "flow.init=random", "steps=1",
                        f"out_dir={tmp_path / 'ok'}"])  # fmt: skip
    assert "flow.init=random: the flow starts from random weights" in out


def test_once_filter_lets_each_warning_through_once():
    records = [logging.LogRecord("transformers.x", level, "f", 1, msg, None, None)
               for level, msg in ((logging.WARNING, "a"), (logging.WARNING, "a"), (logging.WARNING, "b"),
                                  (logging.INFO, "i"), (logging.INFO, "i"), (logging.ERROR, "a"))]  # fmt: skip
    once = OnceFilter()
    assert [once.filter(r) for r in records] == [True, False, True, True, True, True]


def test_each_handler_sees_each_warning_once_and_keeps_its_filters():
    """One filter shared by every root handler let a warning through the first handler only, and ``main()`` left it
    on the caller's handlers: after any in-process CLI test, pytest's caplog saw no warnings (CI failed on this)."""
    root = logging.getLogger()
    first, second = (logging.handlers.BufferingHandler(100) for _ in range(2))
    root.addHandler(first), root.addHandler(second)
    try:
        with _logging(verbose=False):
            for _ in range(3):
                logging.getLogger("rlfr.test").warning("twice said")
        assert [len(h.buffer) for h in (first, second)] == [1, 1]
        assert first.filters == [] and second.filters == []
        logging.getLogger("rlfr.test").warning("twice said")  # outside a command run: nothing filters it
        assert [len(h.buffer) for h in (first, second)] == [2, 2]
    finally:
        root.removeHandler(first), root.removeHandler(second)


def test_each_warning_once(tmp_path):
    """transformers' load report of a checkpoint with an unexpected key was printed twice by ``rlfr train`` with a
    KL term: once for the policy and once for the reference model, loaded a second time. The reference model is
    now a copy of the policy, and the CLI lets each warning through once."""
    import torch
    from safetensors.torch import load_file, save_file

    model = make_tiny_model_dir(tmp_path / "model")
    weights = load_file(str(model / "model.safetensors"))
    save_file({**weights, "extra_head.weight": torch.zeros(2, 2)}, str(model / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    cmd = [sys.executable, "-m", "rlfr.cli", "train", f"model.name_or_path={model}", *TINY_TRAIN_OVERRIDES,
           "method=rlvr", "policy.track_kl=true", "steps=1", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("extra_head.weight") == 1 and "UNEXPECTED" in proc.stderr, proc.stderr[-3000:]


def test_export_writes_a_model_card_and_pushes_to_the_hub(tiny_dir, tmp_path, capsys, monkeypatch):
    """``rlfr export`` writes README.md next to the weights (base model, method, data, the resolved config, the
    run's held-out results, the rlfr version, the paper's citation); ``--push-to-hub REPO`` creates the repo and
    uploads the folder (the Hub calls are replaced here: no network)."""
    from huggingface_hub import HfApi

    run = tmp_path / "run"
    _out(
        capsys,
        ["train", f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, "steps=1", f"out_dir={run}"],
    )
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.append(("create_repo", kw)))
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)) or "url"
    )
    merged = tmp_path / "merged"
    out = _out(capsys, ["export", f"checkpoint={run}", f"merged={merged}", "--push-to-hub", "me/tiny-rlfr"])
    assert json.loads(out)["pushed"] == "url"
    assert calls == [
        ("create_repo", {"repo_id": "me/tiny-rlfr", "repo_type": "model", "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/tiny-rlfr", "folder_path": str(merged), "repo_type": "model",
                           "commit_message": "rlfr export of merged"}),
    ]  # fmt: skip
    card = (merged / "README.md").read_text()
    state = json.loads((run / "checkpoints" / "step_000001" / "state.json").read_text())
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(front) == {"library_name": "transformers", "tags": ["rlfr", "reinforcement-learning",
                                                                              "grpo", "flow-rewards"]}  # fmt: skip
    assert f"- **Base model:** `{tiny_dir}`" in body and "RLFR: GRPO with a verifiable outcome reward" in body
    assert "flow started from `random`" in body and "- **Training data:** `embedded`" in body
    accuracy = [r["eval/accuracy"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "eval/accuracy" in r]  # fmt: skip
    assert f"| held-out greedy accuracy at step 1 (rlfr train) | {accuracy[-1]:.4f} |" in body
    config = body.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config) == state["config"]
    assert (
        f"trained with rlfr {__version__} (" in body
        and "arXiv:2510.10201" in body
        and "@article{zhang2025rlfr" in body
    )


def test_model_card_metadata_names_hub_models_and_datasets():
    from rlfr.eval.card import hub_id, model_card

    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B" and hub_id("runs/sft/model/x") is None
    cfg = {
        "method": "rlvr",
        "model": {"name_or_path": "Qwen/Qwen2.5-Math-1.5B"},
        "data": {"train": "me/my-data"},
    }
    card = model_card(cfg, Path("ck"), {}, lora=True)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-Math-1.5B" and meta["datasets"] == ["me/my-data"]
    assert (
        "flow-rewards" not in meta["tags"]
        and "LoRA adapters merged" in card
        and "recorded no held-out" in card
    )


def test_cli_startup_benchmark_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cli_startup.py"), "--runs", "1"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["python -c pass", "rlfr --help", "rlfr train --help",
                                               "rlfr train --show-config"]  # fmt: skip


def test_a_command_that_parses_its_own_arguments_still_runs(tmp_path, monkeypatch, capsys):
    """An entry of the commands table without a config class hands its words to the module's own parser
    (``add_arguments`` / ``run(args)``, with ``rlfr.config.add_config_arguments`` and ``config_from_args``)."""
    (tmp_path / "own_cmd.py").write_text(
        "from rlfr.config import add_config_arguments, config_from_args\n"
        "from rlfr.commands import ExportConfig\n"
        "def add_arguments(p):\n    add_config_arguments(p, 'dtype=float32')\n"
        "def run(args):\n    cfg = config_from_args(args, ExportConfig)\n"
        "    print('ran', cfg.dtype) if cfg is not None else None\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_COMMANDS, "own", ("own_cmd", None, "a command with its own parser", ()))
    assert _out(capsys, ["own", "dtype=float16"]).strip() == "ran float16"
    assert "dtype: bfloat16" in _out(capsys, ["own", "--show-config", "dtype=bfloat16"])


@pytest.mark.parametrize("words", [["train", "--help"], ["--version"], ["data", "--help"]])
def test_a_reader_that_leaves_early_gets_no_traceback(words):
    """``rlfr train --help | head``: the reader closes the pipe; rlfr stops quietly with status 0. The read end is
    closed before rlfr writes anything, so every write meets the closed pipe, whatever the machine's speed."""
    proc = subprocess.Popen([sys.executable, "-m", "rlfr.cli", *words], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0 and "Traceback" not in err and "Exception ignored" not in err, err


def test_help_states_each_range_once_and_rlfr_data_lists_its_settings(capsys):
    """A numeric key's range is appended to its help from the field's metadata; a help text that also wrote it
    by hand printed it twice ('(> 0) (> 0)'), or contradicted it ('(>= 1) (>= 0)')."""
    twice = re.compile(r"\((?:>=?|<=?|in )[^)]*\).*\((?:>=?|<=?|in )")
    for command in [c for c in _COMMANDS if c not in SUBCOMMANDS]:
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "settings (key=value; default; help):" in out
        bad = [line.split()[0] for line in out.splitlines() if twice.search(line)]
        assert not bad, (command, bad)
    with pytest.raises(SystemExit) as e:
        main(["data", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "settings of rlfr data prepare" in out and "  overlong " in out and "heldout_fraction" in out
    assert "-v, --verbose" in out
