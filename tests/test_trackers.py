"""Experiment trackers (``report_to``): every value of ``metrics.jsonl`` reaches the trackers, sample tables go
where a tracker has tables, a resumed run's TensorBoard events after the checkpoint are purged, and a tracker
whose package is missing is a ConfigError naming the pip extra."""

from __future__ import annotations

import glob
import importlib.util
import json
import time

import pytest
from accelerate.tracking import GeneralTracker

from rlfr import capabilities
from rlfr.config import ConfigError, load_config
from rlfr.runtime.metrics import MetricsLogger, read_metrics
from rlfr.schema import FlowPretrainConfig, SFTConfig, TrainConfig
from tiny_run import make_tiny_model_dir, tiny_train_config


class FakeTracker(GeneralTracker):
    """Records what it is given (a tracker with tables, like wandb)."""

    name, requires_logging_directory, main_process_only = "fake", False, False

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    @property
    def tracker(self):
        return self

    def start(self):
        self.calls.append(("start",))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step=None, **kw):
        self.calls.append(("log", step, values))

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kw):
        self.calls.append(("table", step, table_name, columns, data))

    def finish(self):
        self.calls.append(("finish",))


def tb_events(directory):
    """(tag, step, kind) of every event under a TensorBoard directory, and the steps of session restarts."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    out, starts = [], []
    for f in sorted(glob.glob(f"{directory}/events.out.tfevents.*")):
        for e in EventFileLoader(f).Load():
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                starts.append(e.step)
            for v in e.summary.value:
                out.append((v.tag, e.step, v.metadata.plugin_data.plugin_name or "scalars"))
    return out, starts


def test_metrics_reach_every_tracker_with_the_config_and_sample_tables(tmp_path):
    fake = FakeTracker()
    log = MetricsLogger(
        tmp_path, report_to=["tensorboard", fake], config={"policy": {"lr": 1e-6}, "modes": ["a"]}
    )
    assert fake.calls == []  # nothing starts before the first row (a failed start leaves nothing)
    log.log(1, {"reward": 0.5, "flow_reward/mean": -0.01}, stage="train")
    log.log(2, {"reward": 0.75}, stage="train")
    rows = [
        {"prompt": "1+1?", "completion": "2 | two\n", "reward": 1.0, "correct": True, "flow_reward": -0.02}
    ]
    log.log_samples(2, rows, stage="train")
    log.close()
    assert fake.calls[:2] == [("start",), ("config", {"policy.lr": 1e-6, "modes": "['a']"})]
    assert fake.calls[2] == ("log", 1, {"train/reward": 0.5, "train/flow_reward/mean": -0.01})
    assert fake.calls[4] == ("table", 2, "train/samples", list(rows[0]), [list(rows[0].values())])
    assert fake.calls[-1] == ("finish",)
    assert [r["reward"] for r in read_metrics(tmp_path)] == [0.5, 0.75]  # metrics.jsonl as before
    events, _ = tb_events(tmp_path / "tensorboard")
    assert ("train/reward", 2, "scalars") in events and ("train/samples/text_summary", 2, "text") in events


def test_resume_cuts_the_log_and_purges_tensorboard_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3, 4):
        log.log(step, {"reward": float(step)})
    log.close()
    log = MetricsLogger(tmp_path, resume_step=2)  # the run died after logging step 4; checkpoint of step 2
    for step in (3, 4):
        log.log(step, {"reward": 10.0 + step})
    log.close()
    assert [(r["step"], r["reward"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 13.0),
        (4, 14.0),
    ]
    _, starts = tb_events(tmp_path / "tensorboard")
    assert starts == [3]  # TensorBoard drops the first run's events from step 3 on


def test_a_missing_tracker_package_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(capabilities.TRACKER_PACKAGES, "mlflow", ("no_such_module_rlfr", "mlflow"))
    for cls in (TrainConfig, SFTConfig, FlowPretrainConfig):
        with pytest.raises(
            ConfigError,
            match=r"report_to=mlflow needs .* pip install no_such_module_rlfr \(rlfr's mlflow extra\)",
        ):
            load_config(cls, overrides=["report_to=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(TrainConfig, overrides=["report_to=[tensorbored]"])
    assert load_config(TrainConfig, overrides=["report_to=[]"]).report_to == ()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_gets_metrics_config_and_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path, report_to=["wandb"], config={"flow": {"reward": {"beta": 0.01}}})
    log.log(1, {"reward": 0.25}, stage="train")
    log.log_samples(1, [{"completion": "42", "reward": 1.0, "flow_reward": -0.5}], stage="train")
    log.close()
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    (table,) = glob.glob(f"{run}/files/media/table/train/samples_1_*.table.json")
    assert json.loads(open(table).read()) == {"columns": ["completion", "reward", "flow_reward"],
                                              "data": [["42", 1.0, -0.5]]}  # fmt: skip
    (records,) = glob.glob(f"{run}/run-*.wandb")  # protobuf records: names are stored as they are
    # wandb's service process may still be writing after finish() returns on a loaded machine: wait for it
    # (a hang guard, generous for a slow machine; a fast one leaves the loop at once)
    deadline = time.monotonic() + 300
    while True:
        data = open(records, "rb").read()
        if (b"train/reward" in data and b"flow.reward.beta" in data) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"train/reward" in data and b"flow.reward.beta" in data


def test_rlfr_train_logs_sample_tables_every_n_steps(tmp_path):
    from rlfr.recipes.train import run_train

    model = make_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    run_train(tiny_train_config(model, out, "steps=2", "log_samples_every=2", "save_every=0"), progress=False,
              final_eval=False)  # fmt: skip
    events, _ = tb_events(out / "tensorboard")
    assert [s for tag, s, kind in events if tag == "train/samples/text_summary"] == [2]
    assert {s for tag, s, _ in events if tag == "train/reward"} == {1, 2}
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_rl_step_samples_carry_rewards_and_flow_rewards(tmp_path):
    from rlfr.recipes.train import build_components
    from rlfr.rl.step import rl_step
    from rlfr.runtime.env import make_accelerator

    cfg = tiny_train_config(make_tiny_model_dir(tmp_path / "model"), tmp_path / "run")
    c, data = build_components(cfg, make_accelerator(cpu=True))
    samples: list[dict] = []
    try:
        rl_step(c, 0, data.train[:2], data.prompts[:2], samples)
    finally:
        c.reward.verifier.close()
        c.flow.tap.remove()
    assert len(samples) == 4 and set(samples[0]) == {
        "prompt",
        "completion",
        "reward",
        "correct",
        "flow_reward",
    }
    assert [s["prompt"] for s in samples] == [data.prompts[0]] * 2 + [data.prompts[1]] * 2
    assert all(s["flow_reward"] <= 0 for s in samples) and any(s["flow_reward"] < 0 for s in samples)


def test_step_statistics_report_the_auroc_within_groups_beside_the_pooled_one():
    from rlfr.runtime.metrics import Accum

    log = Accum()
    # the hand-made case of tests/test_group_stats.py, in two micro-batches: problem A (9 of 10 correct, every
    # score 3) and problem B (1 of 10 correct, every score 1): pooled 0.9, within each problem 0.5
    scores, labels = [3.0] * 10 + [1.0] * 10, [1] * 9 + [0] + [1] + [0] * 9
    groups = [0] * 10 + [1] * 10
    log.add_samples("s", scores[:7], labels[:7], groups=groups[:7])
    log.add_samples(
        "s", scores[7:] + [9.0], labels[7:] + [1], keep=[True] * 13 + [False], groups=groups[7:] + [2]
    )
    log.add_samples("pooled only", scores, labels)
    log.add_samples("one class", [1.0, 2.0], [1, 1], groups=[0, 0])
    # a group whose classes agree with the score (within 1.0 over 1 group), the other all correct and scored low:
    # pooled, positives 2, 0.5, 0.6 against the negative 1 win once in 3
    log.add_samples("t", [2.0, 1.0, 0.5, 0.6], [1, 0, 1, 1], groups=[0, 0, 1, 1])
    # length: +1 within group 0 and -1 within group 1 (3 items each), pooled r of all six points
    log.add_pairs("c", [1, 2, 3, 3, 2, 1], [1, 2, 3, 7, 8, 9], groups=[0, 0, 0, 1, 1, 1])
    log.add_pairs("flat", [1, 1, 1], [1, 2, 3], groups=[0, 0, 0])
    m = log.means()
    assert m["s"] == pytest.approx(0.9) and m["s_within"] == 0.5 and m["s_within_groups"] == 2.0
    assert m["pooled only"] == pytest.approx(0.9) and "pooled only_within" not in m
    assert not any(k.startswith("one class") for k in m)  # no pooled AUROC, so nothing beside it
    assert m["t"] == pytest.approx(1 / 3) and m["t_within"] == 1.0 and m["t_within_groups"] == 1.0
    # pooled: x mean 2, y mean 5; sxy = (-1)(-4) + 0 + (1)(-2) + (1)(2) + 0 + (-1)(4) = 0 -> r 0
    assert m["c"] == pytest.approx(0.0) and m["c_within"] == pytest.approx(0.0)
    assert "flat" not in m and "flat_within" not in m


def test_rl_step_logs_the_flow_and_logp_auroc_within_prompts(tmp_path):
    from rlfr.recipes.train import build_components
    from rlfr.reward.outcome import Scored
    from rlfr.rl.step import rl_step
    from rlfr.runtime.env import make_accelerator

    cfg = tiny_train_config(make_tiny_model_dir(tmp_path / "model"), tmp_path / "run")
    c, data = build_components(cfg, make_accelerator(cpu=True))
    verified = c.reward

    class MixedCheck:  # prompt 0: one right, one wrong; prompt 1: both right (a random model is never right)
        verifier = verified.verifier

        def __call__(self, prompts, completions, columns):
            verified(prompts, completions, columns)  # the verifier's counts, as the step logs them
            return Scored([1.0, 0.0, 1.0, 1.0], [True, False, True, True])

    c.reward = MixedCheck()
    try:
        stats = rl_step(c, 0, data.train[:2], data.prompts[:2])
    finally:
        verified.verifier.close()
        c.flow.tap.remove()
    for key in ("flow_score/auroc", "logp/auroc"):
        # the pooled AUROC of 3 correct vs 1 wrong is a multiple of 1/3; within, only prompt 0 holds both classes,
        # and its AUROC of 1 vs 1 is 0, 1/2 or 1
        assert stats[f"{key}_within_groups"] == 1.0 and stats[f"{key}_within"] in (0.0, 0.5, 1.0)
        assert stats[key] * 3 == pytest.approx(round(stats[key] * 3))
    # every response ran to the 6-token limit: a length that does not vary has no correlation to report
    assert stats["response_len"] == 6.0 and "flow_score/len_corr" not in stats
