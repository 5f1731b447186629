"""Nothing a user does loses a run or silently corrupts its rewards (docs/reliability.md).

Each test names the failure it guards against. Runs use the tiny offline model; the signal tests run
``rlfr train`` as a real subprocess and stop it with real signals."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfr.cli import main
from rlfr.config import ConfigError, load_config
from rlfr.data import DataError, load_examples
from rlfr.errors import CheckpointError, ModelLoadError, NonFiniteError, RunDirError
from rlfr.recipes.train import run_train
from rlfr.runtime import checkpoint as ckpt_io
from rlfr.runtime.rundir import RunLock, StopOnSignal
from rlfr.schema import TrainConfig
from tiny_run import TINY_TRAIN_OVERRIDES, make_tiny_model_dir, tiny_train_config

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _weights(out: Path, step: int) -> dict:
    ck = out / "checkpoints" / f"step_{step:06d}"
    return load_file(str(ck / "policy" / "model.safetensors")) | {
        "flow." + k: v for k, v in load_file(str(ck / "flow" / "flow.safetensors")).items()
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ 1. one run per directory


def test_a_second_run_into_a_run_directory_is_refused_or_overwrites(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=4"), progress=False)
    with pytest.raises(RunDirError, match="already holds a run; continue it with --resume"):
        run_train(tiny_train_config(tiny_dir, out, "steps=2"), progress=False)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"  # nothing was touched
    for name in ("eval_embedded.json", "eval_embedded.partial.json"):  # `rlfr compare`'s, of the old model
        (out / name).write_text("{}")
    res = run_train(tiny_train_config(tiny_dir, out, "steps=2"), progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]
    assert not list(out.glob("eval_*"))  # an evaluation of the old model is not taken for the new one's
    assert Path(res.model_dir).is_dir()
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_config(TrainConfig, overrides=["keep_checkpoints=0"])


# ------------------------------------------------------------------ 2. signals


def _cli_train(model_dir, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlfr.cli", "train", f"model.name_or_path={model_dir}", *TINY_TRAIN_OVERRIDES,
           f"out_dir={out}", *extra]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


SIGNAL_DURING_STEP = """
import os, signal, sys
sys.path.insert(0, {here!r})
from rlfr.recipes import train
original = train.rl_step
def rl_step(c, step, *args, **kwargs):
    if step == 1:  # inside the second step, as a scheduler's SIGTERM or a user's Ctrl-C arrives
        os.kill(os.getpid(), signal.{sig})
    return original(c, step, *args, **kwargs)
train.rl_step = rl_step
from rlfr.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_to_the_same_result(tiny_dir, tmp_path, sig):
    # the run signals itself inside its second step: where the signal lands does not depend on how fast
    # the machine is (a signal sent from outside could arrive after the last step on a fast one)
    full = tmp_path / "full"
    run_train(tiny_train_config(tiny_dir, full, "steps=8", "save_every=0"), progress=False)
    out = tmp_path / "run"
    args = ["train", f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, f"out_dir={out}", "steps=8",
            "save_every=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = SIGNAL_DURING_STEP.format(here=str(HERE), sig=sig.name)
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    assert proc.returncode == 75, proc.stderr[-3000:]  # EX_TEMPFAIL: resumable
    assert "checkpoint" in proc.stderr and "--resume" in proc.stderr
    stopped_at = int(ckpt_io.load_state(ckpt_io.latest_checkpoint(out))["step"])
    assert stopped_at == 2  # the step the signal came in finished; with save_every=0 only the signal saves
    proc = _cli_train(tiny_dir, out, "steps=8", "save_every=0", "--resume")
    stdout, stderr = proc.communicate(timeout=3600)
    assert proc.returncode == 0, stderr[-3000:]
    assert _same(_weights(full, 8), _weights(out, 8))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "reward" in x]
    assert steps == list(range(1, 9))  # the steps after the checkpoint are not logged twice


def test_stop_on_signal_only_sets_a_flag_until_the_second_signal():
    # the second signal goes to the handler that was there before: Python's, which raises KeyboardInterrupt
    # (set it explicitly: a process started in the background by a shell inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == "SIGINT"  # no KeyboardInterrupt yet
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, inherited)


# ------------------------------------------------------------------ kill -9 at random moments


KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {here!r})
from rlfr.runtime import checkpoint
original = checkpoint.write_manifest
def write_manifest(ckpt):
    if ckpt.name.startswith("step_000003"):  # every file of step 3 is written, the folder not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    original(ckpt)
checkpoint.write_manifest = write_manifest
from rlfr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_at_random_moments_and_during_a_checkpoint_write(tiny_dir, tmp_path):
    full = tmp_path / "full"
    run_train(tiny_train_config(tiny_dir, full, "steps=6", "save_every=1"), progress=False)
    out = tmp_path / "run"
    args = [
        "train",
        f"model.name_or_path={tiny_dir}",
        *TINY_TRAIN_OVERRIDES,
        f"out_dir={out}",
        "steps=6",
        "save_every=1",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # a SIGKILL inside the checkpoint write of step 3
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(here=str(HERE)), *args], env=env,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step_000003.tmp").is_dir() and not (
        out / "checkpoints" / "step_000003"
    ).exists()
    # then SIGKILLs at random moments of resumed runs, until one finishes
    rng = random.Random(0)
    for _ in range(6):
        proc = _cli_train(tiny_dir, out, "steps=6", "save_every=1", "--resume")
        time.sleep(rng.uniform(2.0, 8.0))
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=3600)
        if proc.returncode == 0:
            break
    else:
        proc = _cli_train(tiny_dir, out, "steps=6", "save_every=1", "--resume")
        assert proc.wait(timeout=3600) == 0
    assert _same(_weights(full, 6), _weights(out, 6))


# ------------------------------------------------------------------ 4. what may change on resume


def test_resume_refuses_changes_that_alter_the_run_and_applies_the_others(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=2"), progress=False)
    for change, key in (("method=rlvr", "method"), ("seed=5", "seed"), ("rollout.prompts_per_step=4", "prompts_per_step"),
                        ("data.train_size=8", "train_size")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key}.*--force-resume"):
            run_train(tiny_train_config(tiny_dir, out, "steps=3", change), progress=False, resume=True)
    # a new learning rate and a longer run are legitimate: applied, with the optimizer using the new lr
    run_train(tiny_train_config(tiny_dir, out, "steps=3", "policy.lr=5e-4"), progress=False, resume=True)
    optim = torch.load(out / "checkpoints" / "step_000003" / "optim.pt", weights_only=True)
    assert optim["policy"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert optim["policy_sched"]["base_lrs"] == [5e-4]
    run_train(
        tiny_train_config(tiny_dir, out, "steps=4", "seed=5"), progress=False, resume=True, force_resume=True
    )


# ------------------------------------------------------------------ 5. one process per directory


def test_a_second_process_on_the_same_directory_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            run_train(tiny_train_config(tiny_dir, out, "steps=1"), progress=False)
    assert not out.exists()  # the lock removed the empty directory it had created
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on elsewhere")  # a stale lock file: nobody holds the lock
    run_train(tiny_train_config(tiny_dir, out, "steps=1"), progress=False)
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------ 6. corrupted checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated-weights", "truncated-optim", "deleted-policy", "garbage-latest",
                                    "deleted-latest", "garbage-state"])  # fmt: skip
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(tiny_dir, tmp_path, damage):
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=4", "save_every=2"), progress=False)
    ck = out / "checkpoints" / "step_000004"
    if damage == "truncated-weights":
        _truncate(ck / "policy" / "model.safetensors")
    elif damage == "truncated-optim":
        _truncate(ck / "optim.pt")
    elif damage == "deleted-policy":
        shutil.rmtree(ck / "policy")
    elif damage == "garbage-latest":
        (out / "checkpoints" / "latest").write_bytes(b"\xff\xfe nonsense")
    elif damage == "deleted-latest":
        (out / "checkpoints" / "latest").unlink()
    else:
        (ck / "state.json").write_text("{not json")
    found, notes = ckpt_io.find_checkpoint(out)
    if damage in ("garbage-latest", "deleted-latest"):  # the checkpoints themselves are fine
        assert found == ck and notes
    else:
        assert found == out / "checkpoints" / "step_000002"
        assert any("step_000004" in n for n in notes), notes
    run_train(tiny_train_config(tiny_dir, out, "steps=5", "save_every=2"), progress=False, resume=True)
    assert (out / "checkpoints" / "step_000005" / "manifest.json").is_file()


def test_checkpoint_errors_name_the_file(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=2"), progress=False)
    ck = out / "checkpoints" / "step_000002"
    _truncate(ck / "optim.pt")
    with pytest.raises(CheckpointError, match="optim.pt cannot be read"):
        ckpt_io.load_optim_state(ck)
    _truncate(ck / "policy" / "model.safetensors")
    from rlfr.policy.loading import load_model

    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        ckpt_io.load_policy_weights(ck, load_model(str(tiny_dir)))
    assert any("optim.pt" in p for p in ckpt_io.verify_checkpoint(ck))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        run_train(tiny_train_config(tiny_dir, out, "steps=3"), progress=False, resume=True)


# ------------------------------------------------------------------ 7. errors reach users as one line


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tiny_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["train", f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, "steps=1"]
    assert main([*base, f"out_dir={afile}"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("rlfr train:")]
    assert len(lines) == 1 and "is a file" in lines[0] and "Traceback" not in err
    assert (
        main(
            [
                "train",
                "model.name_or_path=runs/no/such/model",
                "flow.init=random",
                f"out_dir={tmp_path / 'r'}",
            ]
        )
        == 2
    )
    assert "model directory 'runs/no/such/model' does not exist" in capsys.readouterr().err
    with pytest.raises(RunDirError):
        main(["train", "--debug", *base[1:], f"out_dir={afile}"])


# ------------------------------------------------------------------ 8. nonsense refused at load


def test_an_encoder_is_not_trained_as_a_causal_lm(tmp_path):
    import transformers as tf

    from rlfr.policy.loading import load_model

    cfg = tf.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    tf.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_model(str(tmp_path / "bert"))


def test_numeric_keys_are_checked_at_load():
    for bad, match in (("reward.workers=0", "reward.workers must be >= 1"), ("reward.timeout=-1", "reward.timeout must be > 0"),
                       ("flow.lr=-1", "lr must be > 0"), ("policy.max_grad_norm=-1", "max_grad_norm"),
                       ("rollout.batch_size=0", "batch_size")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config(TrainConfig, overrides=[bad])


# ------------------------------------------------------------------ 9. data errors, early and precise


def test_data_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl, line 2: not valid UTF-8"):
        load_examples(bad)
    rows = load_examples(bad, skip_bad_rows=True)
    assert len(rows) == 1 and rows.report.skipped == 1
    (tmp_path / "somedir").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with datasets.save_to_disk"):
        load_examples(tmp_path / "somedir")
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"problem": "1+" * 5_000_000 + "1", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"huge.jsonl, line 1: field 'problem' has 10,000,001 characters"):
        load_examples(huge, max_problem_chars=64 * 512)


def test_data_is_checked_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')  # no answer
    cfg = load_config(TrainConfig, overrides=["model.name_or_path=/no/such/model", f"data.train={bad}",
                                              "flow.init=random", f"out_dir={tmp_path / 'r'}"])  # fmt: skip
    with pytest.raises(DataError, match="bad.jsonl, line 1: field 'answer' is missing"):
        run_train(cfg, progress=False)


# ------------------------------------------------------------------ 10. NaN / inf


def test_a_nonfinite_loss_names_the_quantity_and_step_and_keeps_the_checkpoint(
    tiny_dir, tmp_path, monkeypatch
):
    from rlfr.flow import learner

    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=2"), progress=False)
    real = learner.token_scores

    def nan_scores(*a, **k):
        s = real(*a, **k)
        s.scores[s.valid] = float("nan")
        return s

    monkeypatch.setattr(learner, "token_scores", nan_scores)
    with pytest.raises(NonFiniteError, match="a flow score is not finite at step 3"):
        run_train(tiny_train_config(tiny_dir, out, "steps=4"), progress=False, resume=True)
    assert ckpt_io.find_checkpoint(out)[0].name == "step_000002"  # the last finite checkpoint is kept
    res = run_train(tiny_train_config(tiny_dir, out, "steps=4", "policy.skip_nonfinite_batches=2"), progress=False,
                    resume=True)  # fmt: skip
    assert [r.get("update/skipped_nonfinite") for r in res.history] == [1.0, 1.0]
    with pytest.raises(NonFiniteError, match="step 5"):  # the allowance (2) is used up: the 3rd stops the run
        run_train(tiny_train_config(tiny_dir, out, "steps=5", "policy.skip_nonfinite_batches=2"), progress=False,
                  resume=True)  # fmt: skip


# ------------------------------------------------------------------ 11. logs after resume, failed starts


def test_logs_are_cut_to_the_resumed_step_and_a_failed_start_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=4", "save_every=2"), progress=False)
    shutil.rmtree(out / "checkpoints" / "step_000004")  # as if the run died after logging step 4
    run_train(tiny_train_config(tiny_dir, out, "steps=4", "save_every=2"), progress=False, resume=True)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "reward" in x]
    assert steps == [1, 2, 3, 4]
    fresh = tmp_path / "never"
    with pytest.raises(ValueError, match="reward"):
        run_train(
            tiny_train_config(
                tiny_dir, fresh, "steps=1", "reward.funcs=[no_such_module:fn]", "reward.correct_if=verifier"
            ),
            progress=False,
        )
    assert not fresh.exists()


def test_a_row_cut_off_by_a_kill_is_left_out_and_a_damaged_row_is_named(tmp_path):
    """A kill during the append of ``metrics.jsonl`` leaves a partial last line: it was never logged, so
    reading (and resuming) leaves it out; an unreadable row anywhere else is an error naming file and line."""
    from rlfr.runtime.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.25}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    MetricsLogger(tmp_path, report_to=(), resume_step=2)  # a resume at step 2 rewrites the log whole
    assert path.read_text() == '{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.25}\n'
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON row"):
        read_metrics(tmp_path)
    path.write_text('{"step": 1}\n{"step": 2, "rew\n')  # complete lines (newline-terminated) are not forgiven
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_atomic_dir_leaves_the_old_directory_when_a_save_fails(tmp_path):
    """SFT and export write model directories through ``atomic_dir``: a save that fails midway leaves the
    previous directory as it was and no temporary one; a save that succeeds replaces it whole."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), ckpt_io.atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with ckpt_io.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    umask = os.umask(0o022)
    try:
        with ckpt_io.atomic_dir(tmp_path / "shared") as tmp:
            pass
    finally:
        os.umask(umask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # as mkdir makes it, not owner-only


def test_what_a_kill_inside_atomic_dir_left_is_restored_or_deleted(tmp_path):
    """A kill between moving the old directory aside and renaming the new one into place leaves no ``model``
    and a hidden ``.model-XXXXXXXX-old``; a kill while writing leaves a hidden ``.model-XXXXXXXX``. The next
    save to the same place puts the old one back first and deletes the unfinished one; another target's
    temporary directory (``.model-x-...``) is not touched."""
    out = tmp_path / "model"
    aside = tmp_path / ".model-abcd1234-old"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    unfinished = tmp_path / ".model-efgh_678"
    unfinished.mkdir()
    (unfinished / "half.safetensors").write_text("half")
    other = tmp_path / ".model-x-abcd1234"
    other.mkdir()
    done = ckpt_io._recover_atomic_dir(out)
    assert len(done) == 2 and done[0].startswith(f"restored {out} from .model-abcd1234-old")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-x-abcd1234", "model"]
    assert (out / "old.txt").read_text() == "old"
    assert ckpt_io._recover_atomic_dir(out) == []  # nothing left to do
    unfinished.mkdir()
    with ckpt_io.atomic_dir(out) as tmp:  # a save cleans up before it starts
        assert not unfinished.exists()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-x-abcd1234", "model"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_a_damaged_compare_result_is_an_error_naming_it(tmp_path):
    """``rlfr compare`` resumes from each run's ``compare_result.json`` (written atomically); one damaged by
    hand is a clear error naming the file, not a JSON traceback."""
    from rlfr.errors import RlfrError
    from rlfr.recipes.compare import _cached

    path = tmp_path / "compare_result.json"
    path.write_text('{"config": {"a": 1}, "model_dir"')
    with pytest.raises(RlfrError, match=r"compare_result.json is not valid JSON .*delete it"):
        _cached(path, {"a": 1})
    path.write_text('{"config": {"a": 1}, "model_dir": "m"}')
    assert _cached(path, {"a": 1})["model_dir"] == "m" and _cached(path, {"a": 2}) is None
