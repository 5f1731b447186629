"""Faults a new user met that rlfr did not hold up under (docs/reliability.md): a full disk, damaged manifests,
hostile data, a run killed before its first checkpoint, resumes with fewer steps or changed data, overrides
after ``--resume``, two processes racing for a run's lock, and error messages.

Each test names what went wrong before. Runs use the tiny offline model and injected faults."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfr.cli import main
from rlfr.config import ConfigError, load_config
from rlfr.data import DataError, load_examples
from rlfr.errors import ModelLoadError, PickleRefusedError, RunDirError
from rlfr.policy.loading import resolve_model_path
from rlfr.recipes.train import run_train
from rlfr.reward.verifier import Verifier
from rlfr.runtime import checkpoint as ckpt_io
from rlfr.runtime.rundir import RunLock
from rlfr.schema import TrainConfig
from tiny_run import TINY_TRAIN_OVERRIDES, make_tiny_model_dir, tiny_train_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "reward" in x]


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("rlfr ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------ 2. a full disk


DISK_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


@pytest.mark.parametrize("raised_by", ["safetensors", "python"])
def test_a_full_disk_stops_with_one_line_and_leaves_no_unfinished_checkpoint(
    tiny_dir, tmp_path, monkeypatch, capsys, raised_by
):
    """Before: safetensors' error came out as a traceback, the half-written ``step_N.tmp`` stayed (and grew with
    every attempt), and the ``.tmp`` folders that kills left were never removed."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=2", "save_every=2"), progress=False)
    stale = out / "checkpoints" / "step_000003.tmp"  # what a kill during an earlier write left
    (stale / "policy").mkdir(parents=True)
    (stale / "policy" / "model.safetensors").write_bytes(b"\0" * 1000)

    if raised_by == "safetensors":  # the Rust library raises a generic error whose text names the cause

        def save_pretrained(self, directory, *args, **kwargs):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"\0" * 4096)  # the part that fit
            raise SafetensorError(DISK_FULL)

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    else:  # Python's own writes raise OSError(ENOSPC)
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if str(path).endswith("optim.pt"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    args = ["train", f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, f"out_dir={out}", "steps=4",
            "save_every=2", "--resume"]  # fmt: skip
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"no space left on the device of {out / 'checkpoints'}" in line
    assert "checkpoint of step 4: it needs about" in line and "KiB" in line  # the tiny model's size
    assert "step_000004.tmp was removed; step_000002 is kept" in line and "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]
    assert ckpt_io.find_checkpoint(out) == (out / "checkpoints" / "step_000002", [])


# ------------------------------------------------------------------ 3. a damaged manifest


def test_a_manifest_that_is_not_a_complete_object_is_damage(tiny_dir, tmp_path):
    """Before: ``[]``, ``null`` or a number raised AttributeError, a bad entry TypeError, and ``{}`` vouched for
    files it does not list; now each is damage: the previous checkpoint is used, with a note naming the file."""
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=4", "save_every=2"), progress=False)
    manifest = out / "checkpoints" / "step_000004" / "manifest.json"
    good = json.loads(manifest.read_text())
    without_weights = {k: v for k, v in good.items() if k != "policy/model.safetensors"}
    with_a_bad_entry = {**good, "state.json": 3}
    for damaged in ("[]", "null", "3", '"x"', "{}", json.dumps(without_weights), json.dumps(with_a_bad_entry),
                    json.dumps({**good, "../../etc/passwd": good["state.json"]}), "[" * 100_000):  # fmt: skip
        manifest.write_text(damaged)
        found, notes = ckpt_io.find_checkpoint(out)
        assert found == out / "checkpoints" / "step_000002", damaged[:40]
        assert len(notes) == 1 and str(manifest) in notes[0], (damaged[:40], notes)
    manifest.write_text(json.dumps(without_weights))
    assert "does not list policy/*.safetensors" in ckpt_io.find_checkpoint(out)[1][0]
    manifest.write_text(json.dumps(good))
    assert ckpt_io.find_checkpoint(out) == (out / "checkpoints" / "step_000004", [])
    (manifest.parent / "stray.bin").write_bytes(b"x")  # a file the manifest does not vouch for
    assert "does not list stray.bin" in ckpt_io.find_checkpoint(out)[1][0]


# ------------------------------------------------------------------ 5. hostile answers


def test_hostile_ground_truth_is_named_and_hostile_model_answers_score_zero(tmp_path):
    """Before: a 100,000-deep nested answer in a data file raised RecursionError (a traceback) and a 5,000-digit
    integer a ValueError naming neither file nor row."""
    row = '{{"problem": "p{i}", "answer": {answer}}}'
    deep, big = "[" * 100_000 + "]" * 100_000, "7" * 5000
    for answer, why in (
        (deep, "nested too deeply"),
        (big, "an integer with more digits than Python converts"),
    ):
        jsonl = tmp_path / "rows.jsonl"
        jsonl.write_text(row.format(i=1, answer=1) + "\n" + row.format(i=2, answer=answer) + "\n")
        with pytest.raises(DataError, match=rf"^{re.escape(str(jsonl))}, line 2: {why}"):
            load_examples(jsonl)
        assert len(load_examples(jsonl, skip_bad_rows=True)) == 1  # a bad line can be skipped
        as_list = tmp_path / "rows.json"
        as_list.write_text(
            "[\n" + row.format(i=1, answer=1) + ",\n\n" + row.format(i=2, answer=answer) + "\n]"
        )
        with pytest.raises(DataError, match=rf"^{re.escape(str(as_list))}, item 2 \(line 4\): {why}"):
            load_examples(as_list)
    # the same shapes from the model are wrong answers: no error, no hang (the check's timeout bounds them)
    with Verifier(num_workers=1, timeout=1.0) as v:
        scores = v.verify_batch(["\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}", f"\\boxed{{{big}}}"],
                                ["1", "7"])  # fmt: skip
        assert scores == [0.0, 0.0] and v.last_counts.total == 2


# ------------------------------------------------------------------ 6. killed before the first checkpoint


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tiny_dir, tmp_path, monkeypatch):
    """Before: a fresh start said to use --resume and --resume said there was no intact checkpoint."""
    from rlfr.recipes import train

    full = tmp_path / "full"
    run_train(tiny_train_config(tiny_dir, full, "steps=2", "save_every=0"), progress=False)
    out = tmp_path / "run"
    real = train.rl_step

    def dies_in_step_2(c, step, *args, **kwargs):
        if step == 1:  # step 1 is logged, nothing is saved yet: what a kill at this moment leaves
            raise RuntimeError("killed")
        return real(c, step, *args, **kwargs)

    monkeypatch.setattr(train, "rl_step", dies_in_step_2)
    with pytest.raises(RuntimeError, match="killed"):
        run_train(tiny_train_config(tiny_dir, out, "steps=2", "save_every=0"), progress=False)
    monkeypatch.setattr(train, "rl_step", real)
    assert _steps(out) == [1] and not (out / "checkpoints").exists()
    with pytest.raises(
        RunDirError, match="stopped before its first checkpoint; continue it with --resume \\(from"
    ):
        run_train(tiny_train_config(tiny_dir, out, "steps=2", "save_every=0"), progress=False)
    run_train(tiny_train_config(tiny_dir, out, "steps=2", "save_every=0"), progress=False, resume=True)
    assert _steps(out) == [1, 2]  # the dead run's row is not kept next to the new one
    a, b = (
        load_file(str(d / "checkpoints" / "step_000002" / "policy" / "model.safetensors"))
        for d in (full, out)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted


# ------------------------------------------------------------------ 7 / 8 / 9. resume: steps, data, CLI order


def test_resume_refuses_fewer_steps_and_changed_data_and_takes_overrides_after_the_flag(
    tiny_dir, tmp_path, capsys
):
    """Before: ``--resume steps=3`` on a run at step 4 exited 0, named a model_dir that does not exist and appended
    step-3 rows; a data file rewritten in place resumed silently; overrides after --resume were refused."""
    data = tmp_path / "data.jsonl"
    rows = [{"problem": f"{i} + 1", "answer": str(i + 1)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    base = [f"data.train={data}", "data.eval=", "save_every=2"]
    run_train(tiny_train_config(tiny_dir, out, "steps=4", *base), progress=False)
    logged = (out / "metrics.jsonl").read_text()
    with pytest.raises(
        ConfigError, match=r"steps=3: the run in .* is already at step 4 \(its model: .*step_000004/policy\)"
    ):
        run_train(tiny_train_config(tiny_dir, out, "steps=3", *base), progress=False, resume=True)
    assert (out / "metrics.jsonl").read_text() == logged  # nothing appended
    # the same file, other content
    data.write_text("".join(json.dumps({**r, "answer": "0"}) + "\n" for r in rows))
    with pytest.raises(
        ConfigError,
        match=rf"--resume: {re.escape(str(data))} \(data.train\) changed since the run started.*--allow-data-change",
    ):
        run_train(tiny_train_config(tiny_dir, out, "steps=5", *base), progress=False, resume=True)
    run_train(
        tiny_train_config(tiny_dir, out, "steps=5", *base),
        progress=False,
        resume=True,
        allow_data_change=True,
    )
    # overrides before and after the flags, as a user types them
    args = ["train", f"model.name_or_path={tiny_dir}", *TINY_TRAIN_OVERRIDES, f"out_dir={out}", *base, "--resume",
            "steps=6", "policy.lr=5e-4", "--allow-data-change"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    optim = torch.load(out / "checkpoints" / "step_000006" / "optim.pt", weights_only=True)
    assert optim["policy"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    # what is neither a flag nor key=value is still refused (exit status 2, as argparse's SystemExit(2) before)
    assert main(["train", "--resume", "--no-such-flag"]) == 2
    assert "unknown flag --no-such-flag" in capsys.readouterr().err
    assert main(["train", "--resume", "steps6"]) == 2
    assert "override 'steps6' must look like key=value" in capsys.readouterr().err


# ------------------------------------------------------------------ 10. the run lock


def test_a_lock_taken_on_a_file_its_holder_unlinked_is_not_held(tmp_path, monkeypatch):
    """The interleaving that let two processes hold a run's lock: B opens ``.lock``; A, releasing, unlinks and
    unlocks it; B locks the unlinked file, and C creates and locks a new ``.lock``. Now B sees its file is gone
    and locks the new one (where C's lock refuses it) instead of running next to C."""
    from rlfr.runtime import rundir

    out = tmp_path / "run"
    out.mkdir()
    a = RunLock(out).acquire()
    real_open = os.open
    calls = []

    def open_then_a_releases(path, *args):
        fd = real_open(path, *args)
        if not calls:
            calls.append(path)
            a.release()  # between B's open and B's flock
            c.acquire()  # C takes the lock on the new file
        return fd

    c = RunLock(out)
    monkeypatch.setattr(rundir.os, "open", open_then_a_releases)
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        RunLock(out).acquire()  # B
    assert calls and c._fd is not None
    c.release()


def _race(out: str, rounds: int, q) -> None:
    overlaps = held = 0
    inside = Path(out) / "inside"
    for _ in range(rounds):
        try:
            lock = RunLock(out).acquire()
        except RunDirError:
            continue
        held += 1
        try:  # only a lock holder may be here: a second one finds the file
            os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.unlink(inside)
        except FileExistsError:
            overlaps += 1
        lock.release()
    q.put((held, overlaps))


def test_two_processes_racing_for_a_run_directory_never_hold_it_together(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep").write_text("")  # so releasing does not remove the directory
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(out), 600, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(held > 0 for held, _ in results), results  # both got the lock at times
    assert sum(overlaps for _, overlaps in results) == 0, results


# ------------------------------------------------------------------ 11. messages


def test_refusals_and_mistakes_are_one_clear_line(tiny_dir, tmp_path, capsys):
    """Before: a refused pickle printed six lines ending in torch's advice to pass weights_only=False; a file given
    as the model was said not to exist; a key given twice in a config file silently took the last value."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "flow_model.bin"
    torch.save({"w": torch.zeros(1), "x": Evil()}, evil)
    assert main(["convert-flow", f"src={evil}", f"model={tiny_dir}", f"out={tmp_path / 'o'}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{evil} is not safetensors" in line and "refused" in line and "weights_only=False" not in line
    out = tmp_path / "run"
    run_train(tiny_train_config(tiny_dir, out, "steps=1"), progress=False)
    optim = out / "checkpoints" / "step_000001" / "optim.pt"
    shutil.copy(evil, optim)
    with pytest.raises(PickleRefusedError, match=f"^{re.escape(str(optim))} is not safetensors") as err:
        ckpt_io.load_optim_state(optim.parent)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()

    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        resolve_model_path(str(evil))

    yaml_file, json_file = tmp_path / "c.yaml", tmp_path / "c.json"
    yaml_file.write_text("steps: 3\npolicy:\n  lr: 1.0e-5\n  micro_batch_size: 2\n  lr: 2.0e-5\n")
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(yaml_file))}, line 5: key 'policy.lr' is given twice \(first at line 3\)",
    ):
        load_config(TrainConfig, yaml_file)
    json_file.write_text('{"steps": 3,\n "seed": 1,\n "steps": 5}')
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(json_file))}, line 3: key 'steps' is given twice \(first at line 1\)",
    ):
        load_config(TrainConfig, json_file)
    json_file.write_text('{"steps": 3,\n "policy": {"lr": 1e-5}}')  # the same name in two sections is fine
    assert load_config(TrainConfig, json_file).steps == 3
