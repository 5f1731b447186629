"""``rlfr inspect`` (HTML + statistics of flow rewards) and ``rlfr compare`` (methods x seeds report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlfr.cli import main
from rlfr.commands import CompareConfig
from rlfr.config import load_config
from rlfr.errors import RlfrError
from rlfr.eval.inspect_page import render_html
from rlfr.eval.results import CompareResult, InspectResult, ModelEval, SelectResult
from rlfr.recipes import compare
from rlfr.recipes.inspect_flow import compute_stats
from rlfr.stats import TOKEN_CLASSES
from tiny_run import make_tiny_model_dir

TINY = [
    "data.train_size=8",
    "data.eval_size=4",
    "rollout.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_new_tokens=6",
    "policy.micro_batch_size=4",
    "eval_max_new_tokens=4",
    "reward.workers=1",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """A one-step RLFR run on the tiny model: <out>/checkpoints/step_000001 with policy/ and flow/."""
    from rlfr.config import load_config
    from rlfr.recipes.train import run_train
    from rlfr.schema import TrainConfig

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(
        TrainConfig,
        overrides=[f"model.name_or_path={tiny_dir}", *TINY, "flow.init=random", "steps=1", f"out_dir={out}"],
    )
    run_train(cfg, progress=False)
    return out


def test_inspect_writes_escaped_self_contained_html(tiny_run, tmp_path):
    data = tmp_path / "evil.jsonl"
    data.write_text(json.dumps({"problem": "<script>alert('x')</script> & 1+1?", "answer": "2"}) + "\n")
    out = tmp_path / "insp"
    ck = tiny_run / "checkpoints" / "step_000001"
    rc = main(
        ["inspect", f"checkpoint={ck}", f"data={data}", "n_prompts=1", "num_generations=3", "max_new_tokens=10",
         f"out={out}", "cpu=true"]
    )  # fmt: skip
    assert rc == 0
    page = (out / "inspect.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; 1+1?" in page
    assert "http" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    assert page.count("class='roll'") == 3 and "class='tok'" in page
    stats = json.loads((out / "stats.json").read_text())
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert stats["rollouts"] == 3 and stats["scored_tokens"] > 0
    assert stats["latents"]["fractions"] == [0.25, 0.5, 0.75] and stats["reward"] == "dense"
    # no AUROC exactly when the scored rollouts are all correct or all wrong (its value: hand-worked below)
    rated = [r for r in rollouts if r["mean_deviation"] is not None]
    assert (stats["auroc"] is None) == (len({r["correct"] for r in rated}) < 2)
    assert set(stats["tokens"]["by_class"]) == set(TOKEN_CLASSES)
    # beside the pooled AUROC: within the one problem, the log-prob baseline, length and repeatability over 8 draws
    assert stats["auroc_within"]["groups"] == (0 if stats["auroc"] is None else 1)
    assert stats["repeatability"]["draws"] == 8 and [r["k"] for r in stats["repeatability"]["by_draws"]] == [
        1,
        2,
        4,
        8,
    ]
    assert all(r["mean_logp"] < 0 and len(r["deviation_draws"]) == 8 and r["group"] == 0 for r in rated)
    assert "Separation of correct and wrong rollouts" in page
    assert sum(v["count"] for v in stats["tokens"]["by_class"].values()) == stats["scored_tokens"]
    for r in rollouts:
        scored = [t for t in r["tokens"] if t["valid"]]
        # dense reward -beta (2x - 1) lies in [-beta, beta]; the shaped one is never positive (one-sided)
        assert all(abs(t["dense"]) <= 0.01 + 1e-6 and t["shaped"] <= 0 for t in scored)
        joined = "".join(t["text"] for t in r["tokens"])
        for special in ("<|im_end|>", "<|im_start|>", "<pad>"):  # decoded completions skip special tokens
            joined = joined.replace(special, "")
        assert joined == r["completion"]


def test_inspect_from_run_dir_with_shaped_reward(tiny_run, tmp_path):
    out = tmp_path / "insp"
    rc = main(
        ["inspect", f"checkpoint={tiny_run}", "data=embedded", "n_prompts=2", "num_generations=2", "max_new_tokens=8",
         "reward=shaped", f"out={out}", "cpu=true"]
    )  # fmt: skip
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rollouts"] == 4 and stats["reward"] == "shaped"
    assert not stats["tokens"]["rewarded"]  # one-sided shaping never rewards


def test_inspect_argument_errors(tiny_run, tmp_path, capsys):
    def error(argv):
        assert main(["inspect", *argv, f"out={tmp_path}"]) == 2
        return capsys.readouterr().err

    assert "give checkpoint=DIR, or both model=MODEL and flow=DIR" in error([])
    assert "not both" in error([f"checkpoint={tiny_run}", "model=x"])
    assert f"{tmp_path} is neither a checkpoint" in error([f"checkpoint={tmp_path}"])


def _tok(text, reward, score=1.0, valid=True):
    return {
        "text": text,
        "id": 0,
        "valid": valid,
        "score": score,
        "x": 0.5,
        "dense": reward,
        "shaped": reward,
    }


def test_inspect_stats_and_html_escaping_without_a_model():
    evil = "<img src=x onerror=alert(1)>"
    rollouts = [
        {
            "problem": "p",
            "answer": "<b>",
            "prompt": "<p>",
            "completion": evil,
            "correct": True,
            "mean_deviation": 1.0,
            "tokens": [_tok(evil, -0.01), _tok("7", 0.01), _tok("\n", 0.0, valid=False)],
        },
        {
            "problem": "p",
            "answer": "2",
            "prompt": "q",
            "completion": "+",
            "correct": False,
            "mean_deviation": 2.0,
            "tokens": [_tok("+", 0.005, score=2.0)],
        },
        {
            "problem": "p",
            "answer": "2",
            "prompt": "q",
            "completion": "a",
            "correct": True,
            "mean_deviation": 3.0,
            "tokens": [_tok("a", -0.005, score=3.0)],
        },
    ]
    stats = compute_stats(rollouts, "dense", min_count=1)
    # -deviation: correct -1, -3 vs wrong -2 -> pairs (win, loss) -> AUROC 0.5
    assert stats.auroc == 0.5 and stats.scored_tokens == 4 and stats.accuracy == pytest.approx(2 / 3)

    def inspected(stats, policy="p", latents=None):
        return InspectResult(stats=stats, policy=policy, flow="f", latents=latents or {}, shaping={"beta": 0.01},
                             reward="dense", template="chat", data="d", n_prompts=1, num_generations=3,
                             temperature=1.0)  # fmt: skip

    page = render_html(rollouts, inspected(stats, "<pol>", {"modes": ["<m>"]}))
    assert evil not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<code><b></code>" not in page and "<code>&lt;b&gt;</code>" in page
    assert "&lt;pol&gt;" in page and "http" not in page
    one_class = compute_stats(rollouts[:1], "dense", min_count=1)
    assert one_class.auroc is None and "n/a" in render_html(rollouts[:1], inspected(one_class))
    # records of earlier versions: grouped by problem text (all "p": one problem, within = pooled = 0.5); no
    # log-prob, length or repeatability statistics
    assert stats.auroc_within == {"mean": 0.5, "groups": 1, "lo": None, "hi": None, "level": 0.95}
    assert stats.logp_auroc is None and stats.length_corr is None and stats.repeatability is None
    assert set(stats.to_dict()) == {"rollouts", "accuracy", "scored_tokens", "auroc", "auroc_note", "tokens",
                                    "auroc_within"}  # fmt: skip


def _rollout(group, correct, deviation, logp, length, draws):
    return {"problem": f"p{group}", "group": group, "answer": "1", "prompt": "q", "completion": "c",
            "correct": correct, "mean_deviation": deviation, "mean_logp": logp, "response_tokens": length,
            "deviation_draws": draws, "tokens": [_tok("1", 0.0, score=deviation)]}  # fmt: skip


def test_inspect_separates_pooled_from_within_problem_and_reports_log_prob_length_and_repeatability():
    # problem 0 is easy (3 of 4 right) with low deviations, problem 1 hard (1 of 4) with high ones; within each
    # problem the deviation is the same for every rollout: pooled, the flow looks good; within problems it is chance.
    # The log-prob separates within problem 0 (right 3 x -0.1 vs wrong -0.5) and problem 1 (right -0.2 vs wrong -0.9).
    rows = [_rollout(0, True, 1.0, -0.1, 10, [1.0, 1.0]), _rollout(0, True, 1.0, -0.1, 20, [1.0, 2.0]),
            _rollout(0, True, 1.0, -0.1, 30, [1.0, 3.0]), _rollout(0, False, 1.0, -0.5, 40, [1.0, 4.0]),
            _rollout(1, True, 2.0, -0.2, 10, [2.0, 1.0]), _rollout(1, False, 2.0, -0.9, 20, [2.0, 2.0]),
            _rollout(1, False, 2.0, -0.9, 30, [2.0, 3.0]), _rollout(1, False, 2.0, -0.9, 40, [2.0, 4.0])]  # fmt: skip
    stats = compute_stats(rows, "dense", min_count=1)
    # pooled: right 3 x (-1), 1 x (-2) vs wrong 1 x (-1), 3 x (-2): 3 ties + 9 wins + 0 + 3 ties -> 12 / 16
    assert stats.auroc == pytest.approx(0.75)
    w = stats.auroc_within
    assert (w["mean"], w["groups"], w["lo"], w["hi"]) == (0.5, 2, 0.5, 0.5)  # every problem 0.5: no spread
    # log-prob pooled: right -0.1 x 3, -0.2 vs wrong -0.5, -0.9 x 3: every right one is higher -> 1.0
    assert stats.logp_auroc == 1.0 and stats.logp_auroc_within["mean"] == 1.0
    # the deviation does not vary within a problem: no within-problem correlation; pooled it does not vary with
    # length either (each problem has lengths 10..40): r = 0
    assert stats.length_corr["pooled"] == pytest.approx(0.0) and stats.length_corr["within"]["groups"] == 0
    rep = stats.repeatability
    # draw 0 is each problem's deviation (within chance), draw 1 the length / 10 (right rollouts shorter):
    # r of draw 0 and draw 1 = pooled r of problem deviation and length = 0
    assert rep["draws"] == 2 and [r["k"] for r in rep["by_draws"]] == [1, 2]
    assert rep["by_draws"][0]["r"] == pytest.approx(0.0) and rep["by_draws"][0]["auroc"] == pytest.approx(
        0.75
    )
    assert rep["by_draws"][1]["r"] is None
    # mean of both draws: problem 0 right (1, 1.5, 2) vs wrong 2.5 -> within 1.0; problem 1: right 1.5 vs wrong
    # 2, 2.5, 3 -> 1.0
    assert rep["by_draws"][1]["auroc_within"]["mean"] == 1.0
    page = render_html(rows, InspectResult(stats=stats, policy="p", flow="f", latents={}, shaping={"beta": 0.01},
                                           reward="dense", template="chat", data="d", n_prompts=2, num_generations=4,
                                           temperature=1.0))  # fmt: skip
    assert "within problems: <b>0.500 [0.500, 0.500] over 2 problems</b>" in page
    assert "<td>mean token log-prob</td><td>1.000</td>" in page and "Repeatability across noise draws" in page
    again = InspectResult.from_dict(json.loads(json.dumps(InspectResult(
        stats=stats, policy="p", flow="f", latents={}, shaping={}, reward="dense", template="chat", data="d",
        n_prompts=2, num_generations=4, temperature=1.0).to_dict())))  # fmt: skip
    assert again.stats == stats


def test_compare_configs_report_and_curves(tmp_path):
    args = load_config(
        CompareConfig,
        overrides=["start=m", "flow=flowdir", "methods=[rlvr,rlfr]", "seeds=[0,1]", "train.steps=3", f"out={tmp_path}",
                   "train.rollout.prompts_per_step=4"],
    )  # fmt: skip
    cfg = compare.run_config(args, "rlfr", 1)
    assert (cfg.method, cfg.seed, cfg.steps, cfg.flow.init, cfg.rollout.prompts_per_step) == (
        "rlfr",
        1,
        3,
        "flowdir",
        4,
    )
    assert cfg.out_dir == str(tmp_path / "rlfr" / "seed_1")
    assert compare.run_config(args, "rlvr", 0).flow.init is None
    assert compare.curve_mean([[1.0, 2.0], [3.0]]) == [2.0, 2.0]
    results = {
        "command": compare.command_line(args),
        "start": "m",
        "flow": "flowdir",
        "seeds": [0, 1],
        "budget": {"steps": 3},
        "methods": {"base": {"seeds": {"0": 0.25, "1": 0.75}}, "rlvr": {"seeds": {"0": 0.5, "1": 0.5}}},
    }
    md = compare.render_report(CompareResult.from_dict(results))  # the layout of earlier versions
    assert "| base | 50.0 ± 35.4 | 25.0 | 75.0 |" in md and "| rlvr | 50.0 ± 0.0 | 50.0 | 50.0 |" in md
    assert "rlfr compare start=m flow=flowdir 'methods=[rlvr, rlfr]'" in md and "- steps: 3" in md
    assert md.startswith("# base vs rlvr (2 seeds)\n")


def test_compare_refuses_rlfr_arms_without_a_flow(tmp_path, capsys):
    """Before, the rlfr arms of a study without --flow trained a random flow and said nothing; now the study
    stops before any run, naming flow= and train.flow.init; an explicit train.flow.init=random (or an
    ablation's own flow.init) is accepted."""
    assert main(["compare", "start=m", "methods=[rlvr,rlfr]", "seeds=0", f"out={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert "arm rlfr" in err and "flow.init" in err and "rlfr flow-pretrain" in err and "flow=DIR" in err
    assert not (tmp_path / "c").exists()  # nothing ran
    cfg = load_config(
        CompareConfig, overrides=["start=m", "methods=[rlvr]", "ablations=[fresh rlfr flow.init=random]"]
    )
    assert compare.arms(cfg)["fresh"] == ("rlfr", ["flow.init=random"], [0])
    assert compare.run_config(cfg, "rlfr", 0, "fresh", ["flow.init=random"]).flow.init == "random"
    with pytest.raises(RlfrError, match=r"ablations: 'x ppo'.*METHOD in"):
        compare.arms(load_config(CompareConfig, overrides=["ablations=[x ppo]"]))


def test_compare_end_to_end_two_seeds(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", f"start={tiny_dir}", "seeds=[0,1]", "train.steps=1", f"out={out}", "progress=false",
            "train.flow.init=random", *(f"train.{o}" for o in TINY)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"base", "rlvr", "rlfr", "entropy"}
    for name, e in res["methods"].items():
        assert set(e["seeds"]) == {"0", "1"} and 0 <= e["mean"] <= 1
        if name != "base":
            assert len(e["reward"]) == 1
    md = (out / "report.md").read_text()
    assert "| rlfr |" in md and "±" in md and "rollout.prompts_per_step=2" in md
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    marker = out / "rlfr" / "seed_0" / "compare_result.json"
    before = marker.stat().st_mtime_ns
    assert main(argv) == 0  # finished runs are reused
    assert marker.stat().st_mtime_ns == before


def test_compare_study_features_and_resume(tiny_dir, tmp_path, capsys):
    """Eval sets with sizes, sampled avg@K, an ablation arm, paired statistics, and an interrupted run that
    resumes from its checkpoint."""
    import shutil

    out = tmp_path / "study"
    argv = ["compare", f"start={tiny_dir}", "methods=[rlvr,rlfr]", "seeds=0", "train.steps=2",
            "eval_sets=[embedded,embedded-transfer:3]", "eval_samples=2", "ablations=[frozen rlfr flow.update=false]",
            f"out={out}", "progress=false", "train.flow.init=random", *(f"train.{o}" for o in TINY),
            "train.save_every=1", "train.policy.track_kl=true"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"base", "rlvr", "rlfr", "frozen"}
    assert res["eval_sets"] == {"embedded": {"data": "embedded", "n": 4},
                                "embedded-transfer-3": {"data": "embedded-transfer", "n": 3}}  # fmt: skip
    e = res["arms"]["rlfr"]["eval"]["embedded-transfer-3"]
    assert set(e) >= {"greedy", "sampled", "greedy_mean", "sampled_mean"} and 0 <= e["sampled_mean"] <= 1
    assert set(res["paired"]["embedded"]) == {"rlfr - rlvr", "frozen - rlvr", "frozen - rlfr", "rlvr - base",
                                              "rlfr - base", "frozen - base"}  # fmt: skip
    p = res["paired"]["embedded"]["rlfr - rlvr"]
    assert p["greedy"]["lo"] <= p["greedy"]["diff"] <= p["greedy"]["hi"] and "0" in p["mcnemar_greedy"]
    curves = res["arms"]["rlfr"]["curves"]
    assert (
        len(curves["reward"]) == 2 and len(curves["policy/kl"]) == 2 and len(curves["flow_reward/mean"]) == 2
    )
    assert res["arms"]["rlvr"]["curves"]["flow_reward/mean"] == [None, None]
    times = curves["time/step"]  # training time: the logged step times (by hand: test_training_time_by_hand)
    assert len(times) == 2 and all(isinstance(t, float) and t >= 0 for t in times)
    assert "median_step_seconds" in res["arms"]["rlfr"]
    ev = json.loads((out / "rlfr" / "seed_0" / "eval_embedded.json").read_text())
    assert len(ev["greedy"]) == 4 and all(0 <= c <= 2 for c in ev["sampled"])
    assert (out / "paired.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "## embedded-transfer-3 (3 problems)" in md and "| rlfr - rlvr |" in md and "avg@2" in md
    signals = md.split("Training signals")[1].splitlines()
    rlvr_row = next(line for line in signals if line.startswith("| rlvr |")).split("|")
    # no flow signals; the KL was tracked (no within-prompt columns: the tiny model is never right)
    assert rlvr_row[5:9] == [" - "] * 4 and rlvr_row[9] != " - " and "within prompts" not in md
    # interrupt the rlfr run after its first step: drop the result marker and the last checkpoint
    run = out / "rlfr" / "seed_0"
    (run / "compare_result.json").unlink()
    for f in run.glob("eval_*.json"):
        f.unlink()
    shutil.rmtree(run / "checkpoints" / "step_000002")
    (run / "checkpoints" / "latest").write_text("step_000001\n")
    capsys.readouterr()
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert len(again["arms"]["rlfr"]["curves"]["reward"]) == 2


def test_signal_summary_by_hand():
    # 10 steps; windows of 2 steps. reward: first two steps 0.2, 0.4 -> 0.3; last two 0.6, 0.8 -> 0.7.
    # |A_o| 0.5 everywhere, |flow rtg| 0.05 on the steps that logged it (None on step 3) -> ratio 0.1.
    curves = {
        "reward": [0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.6, 0.8],
        "adv/outcome_abs": [0.5] * 10,
        "adv/flow_abs": [0.05, 0.05, None, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],
        "flow_score/auroc": [None] * 5 + [0.6, 0.8, None, None, 0.7],
        "flow_score/auroc_within": [None] * 5 + [0.4, 0.6, None, None, None],
        "logp/auroc_within": [0.75] * 10,
        "policy/kl": [0.0] * 8 + [0.01, 0.03],
    }
    sig = compare.signal_summary(curves, window=2)
    assert sig["reward_first"] == pytest.approx(0.3) and sig["reward_last"] == pytest.approx(0.7)
    assert sig["outcome_adv_abs"] == pytest.approx(0.5) and sig["flow_rtg_abs"] == pytest.approx(0.05)
    assert sig["flow_over_outcome"] == pytest.approx(0.1)
    assert sig["flow_auroc"] == pytest.approx(0.7) and sig["kl_last"] == pytest.approx(0.02)
    assert sig["flow_auroc_within"] == pytest.approx(0.5) and sig["logp_auroc_within"] == pytest.approx(0.75)
    assert sig["logp_auroc"] is None and sig["flow_len_corr_within"] is None
    assert sig["entropy_last"] is None and sig["flow_nonzero_frac"] is None  # never logged
    rlvr = compare.signal_summary({"reward": [0.5], "adv/outcome_abs": [0.2], "adv/flow_abs": [None]})
    assert rlvr["flow_rtg_abs"] is None and rlvr["flow_over_outcome"] is None
    table = compare.render_signals({"base": {}, "rlfr": {"curves": curves}})
    # the table's windows are 8 steps: reward (0.2 + 0.4 + 6 * 0.5) / 8 = 0.45 and (6 * 0.5 + 0.6 + 0.8) / 8 =
    # 0.55; KL (0.01 + 0.03) / 8 = 0.005
    # the within-prompt flow AUROC and the log-prob one within prompts were logged: their columns follow the
    # pooled flow AUROC (the length correlation and the pooled log-prob AUROC were not: no columns)
    assert table[0].split(" | ")[7:10] == ["flow AUROC pooled (correct vs wrong)", "flow AUROC within prompts",
                                           "log-prob AUROC within prompts"]  # fmt: skip
    assert table[1:3] == [
        "|---|" + "---|" * 12,
        "| rlfr | 0.450 | 0.550 | 0.500 | 0.0500 | 0.100 | - | 0.700 | 0.500 | 0.750 | 0.0050 | - | - |",
    ]
    assert table[-1] == compare.SEPARATION_NOTE
    assert "within prompts" not in "".join(compare.render_signals({"rlfr": {"curves": {"reward": [0.5]}}}))


def test_cached_eval_from_an_older_version_is_reused(tmp_path):
    """``evaluate_model`` reuses an evaluation saved by an older version, whose key held the whole model
    config (fields such as ``lora`` that do not change an evaluation), without loading the model; a changed
    setting that does (dtype) is not reused: the model is loaded, which fails here on purpose."""
    from rlfr.config import load_config, to_dict
    from rlfr.data import Example
    from rlfr.schema import TrainConfig

    cfg = load_config(TrainConfig, overrides=["model.name_or_path=/nonexistent"])
    examples = [Example("1+1", "2", id="p0")]
    key = {"model": "/nonexistent", "problems": ["p0"], "template": cfg.data.template,
           "max_new_tokens": cfg.eval_max_new_tokens, "samples": 0, "seed": cfg.seed}  # fmt: skip
    old_model_cfg = {k: v for k, v in to_dict(cfg.model).items() if k != "lora"}
    path = tmp_path / "eval_x.json"
    path.write_text(json.dumps({"config": key | {"model_cfg": old_model_cfg}, "greedy": [1]}))
    assert compare.evaluate_model("/nonexistent", cfg, examples, 0, path, None).greedy == [1]
    path.write_text(json.dumps({"config": key | {"model_cfg": old_model_cfg | {"dtype": "bfloat16"}}}))
    with pytest.raises(Exception, match="nonexistent"):
        compare.evaluate_model("/nonexistent", cfg, examples, 0, path, None)


def test_learning_curves_keep_one_colour_per_arm():
    """A panel that only RLFR logs (flow statistics) draws RLFR in RLFR's colour, not the first colour
    of the cycle (which is RLVR's in the reward panel), and names it in its own legend."""
    from rlfr.eval.plots import _plt, curves_figure

    arms = {
        "base": {"eval": {}},
        "rlvr": {"curves": {"reward": [0.1, 0.2], "flow_reward/mean": [None, None]}},
        "rlfr": {"curves": {"reward": [0.2, 0.3], "flow_reward/mean": [-0.01, -0.02]}},
    }
    plt = _plt()
    fig = curves_figure(plt, arms, ["reward", "flow_reward/mean", "policy/kl"])
    reward, flow = fig.axes[0], fig.axes[1]
    colours = {ln.get_label(): ln.get_color() for ln in reward.lines}
    assert set(colours) == {"rlvr", "rlfr"} and colours["rlvr"] != colours["rlfr"]
    assert [(ln.get_label(), ln.get_color()) for ln in flow.lines] == [("rlfr", colours["rlfr"])]
    assert [t.get_text() for t in flow.get_legend().get_texts()] == ["rlfr"]
    assert len(fig.axes) == 2  # policy/kl: no arm logged it, no panel
    plt.close(fig)
    # 16 steps or more: pale per-step lines under a bold 3-step ((16 // 8) | 1) moving average, one legend entry
    long = {"rlfr": {"curves": {"reward": [float(i % 2) for i in range(16)], "flow_score/auroc": [0.7] * 16}}}
    fig = curves_figure(plt, long, ["reward", "flow_score/auroc"])
    reward, auroc = fig.axes
    pale, bold = reward.lines
    assert list(pale.get_ydata()) == [float(i % 2) for i in range(16)] and pale.get_alpha() == 0.3
    # centred on each step: 0,1,0 -> 1/3 and 1,0,1 -> 2/3; the windows of the first and last step are cut to 2
    assert list(bold.get_ydata()) == pytest.approx(
        [0.5] + [1 / 3 if i % 2 else 2 / 3 for i in range(1, 15)] + [0.5]
    )
    assert "centred 3-step" in fig._suptitle.get_text()
    assert [t.get_text() for t in reward.get_legend().get_texts()] == ["rlfr"]
    assert any(list(ln.get_ydata()) == [0.5, 0.5] for ln in auroc.lines)  # chance
    plt.close(fig)


def test_moving_average_by_hand():
    from rlfr.eval.plots import moving_average

    pts = [(1, 1.0), (2, 2.0), (3, 6.0), (5, 3.0)]
    assert moving_average(pts, 3) == [(1, 1.5), (2, 3.0), (3, 11 / 3), (5, 4.5)]
    assert moving_average(pts, 2) == [(1, 1.0), (2, 1.5), (3, 4.0), (5, 4.5)]
    assert moving_average(pts, 1) == pts


def test_paired_figure_draws_every_comparison_with_its_interval():
    """One row of panels per eval set, greedy and avg@K; each comparison at its difference (points)."""
    from rlfr.eval.plots import _plt, paired_figure

    d = lambda x: {"diff": x, "lo": x - 0.02, "hi": x + 0.03}  # noqa: E731
    results = {
        "budget": {"eval_samples": 4},
        "eval_sets": {"a": {"n": 10}, "b": {"n": 5}},
        "paired": {
            s: {
                "rlfr - rlvr": {"greedy": d(0.01), "sampled": d(0.02)},
                "rlvr - base": {"greedy": d(-0.05), "sampled": d(0.04)},
            }  # fmt: skip
            for s in ("a", "b")
        },
    }
    plt = _plt()
    fig = paired_figure(plt, results)
    assert len(fig.axes) == 4
    ax = fig.axes[1]  # set a, avg@4
    assert ax.get_title() == "a (10 problems), avg@4"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rlfr - rlvr", "rlvr - base"]
    xs = [float(c.lines[0].get_xdata()[0]) for c in ax.containers]  # one errorbar per comparison
    assert xs == pytest.approx([2.0, 4.0])
    from matplotlib.collections import PathCollection

    def crosses(ax):
        return [c for c in ax.collections if isinstance(c, PathCollection)]

    assert not crosses(ax)  # no per-seed differences given: no seed markers
    plt.close(fig)
    # with per-seed differences, each seed is a cross just below its comparison's row
    results["paired"]["a"]["rlfr - rlvr"]["greedy"]["per_seed"] = {"0": 0.03, "1": -0.01}
    fig = paired_figure(plt, results)
    ax = fig.axes[0]
    assert ax.get_title().endswith("(x: single seeds)")
    (seeds,) = crosses(ax)
    assert seeds.get_offsets().tolist() == [[3.0, 0.25], [-1.0, 0.25]]
    plt.close(fig)


def _clock(start: float, later: float):
    """A fake clock: ``start`` at its first reading (when the evaluation starts), ``later`` ever after."""
    readings = [start]
    return lambda: readings.pop() if readings else later


def test_evaluate_model_resumes_an_interrupted_evaluation(tiny_dir, tmp_path):
    """``rlfr compare``'s evaluation killed after its greedy part: the rerun reuses eval_x.partial.json (only
    the sampled part is generated), writes the same result as an uninterrupted evaluation, counts the time of
    both attempts, and removes the partial file. The clocks are fakes, so no figure depends on how fast the
    machine is: the killed attempt takes 3 s, the rerun 2 s, the result says 5 s."""
    from helpers import ParityVerifier
    from rlfr.config import load_config
    from rlfr.data import Example
    from rlfr.schema import TrainConfig

    cfg = load_config(TrainConfig, overrides=[f"model.name_or_path={tiny_dir}", "eval_max_new_tokens=4"])
    examples = [Example(f"What is {10**i} + 1?", str(10**i + 1), id=f"p{i}") for i in range(6)]
    whole = compare.evaluate_model(str(tiny_dir), cfg, examples, 2, tmp_path / "whole.json", ParityVerifier())

    path = tmp_path / "eval_x.json"
    with pytest.raises(ParityVerifier.Killed):  # call 1: greedy (one chunk); call 2: sampled
        compare.evaluate_model(str(tiny_dir), cfg, examples, 2, path, ParityVerifier(fail_on=2),
                               clock=_clock(100.0, 103.0))  # fmt: skip
    partial = json.loads((tmp_path / "eval_x.partial.json").read_text())
    assert len(partial["greedy"]) == 6 and partial["sampled"] == [] and partial["seconds"] == 3.0
    rerun_v = ParityVerifier()
    res = compare.evaluate_model(str(tiny_dir), cfg, examples, 2, path, rerun_v, clock=_clock(50.0, 52.0))
    assert rerun_v.calls == 1  # the greedy part was not redone
    assert (res.greedy, res.sampled) == (whole.greedy, whole.sampled)
    assert res.seconds == 3.0 + 2.0  # the interrupted attempt's time added to the rerun's
    assert not (tmp_path / "eval_x.partial.json").exists() and json.loads(path.read_text()) == res.to_dict()


def test_eval_progress_keeps_a_fast_attempts_time(tmp_path):
    """A chunk that takes 40 ms is stored as 0.04 s, not rounded to 0 (issue 31: a fast machine failed CI)."""
    from rlfr.eval.progress import EvalProgress

    p = EvalProgress(tmp_path / "x.partial.json", {"k": 1}, clock=_clock(10.0, 10.04))
    p.save({"s": 1}, {"greedy": []})
    again = EvalProgress(tmp_path / "x.partial.json", {"k": 1}, clock=_clock(0.0, 0.0))
    assert again.load({"s": 1})["seconds"] == pytest.approx(0.04) and again.seconds == pytest.approx(0.04)


def test_seed_by_seed_table_by_hand():
    """The report's seed table: per-seed differences, their t interval, and how many seeds are ahead."""
    from helpers import SEED_ARMS_A as a
    from helpers import SEED_ARMS_B as b
    from rlfr.stats import compare_arms

    lines = compare.render_seed_table({"rlfr - rlvr": compare_arms(a, b, samples=2)}, k=2)
    assert (
        "| comparison | greedy per seed | greedy over seeds | avg@2 per seed | avg@2 over seeds |" in lines[2]
    )
    assert lines[3] == "|---|---|---|---|---|---|"
    assert lines[4] == ("| rlfr - rlvr | 0: +25.0, 1: +0.0, 2: +25.0 | +16.7 [-19.2, +52.5] "
                        "| 0: +12.5, 1: +0.0, 2: +12.5 | +8.3 [-9.6, +26.3] | 2 of 3 (1 tied) |")  # fmt: skip
    # runs pair by seed name, not by position; a seed only one arm has is left out
    b_shuffled = {"9": b["0"], "2": b["2"], "0": b["0"], "1": b["1"]}
    r = compare_arms(a, b_shuffled, samples=2)
    assert r["greedy"]["per_seed"] == {"0": 0.25, "1": 0.0, "2": 0.25}
    many = {str(s): a["0"] for s in range(11)}  # seed 10 stays after seed 9
    assert list(compare_arms(many, many, samples=0)["greedy"]["per_seed"]) == [str(s) for s in range(11)]
    # one seed, or results of an earlier version without per-seed differences: no table
    one = compare_arms({"0": a["0"]}, {"0": b["0"]}, samples=2)
    assert compare.render_seed_table({"rlfr - rlvr": one}, k=2) == []
    old = {"rlfr - rlvr": {"greedy": {"diff": 0.1, "lo": 0.0, "hi": 0.2, "n": 4}, "mcnemar_greedy": {}}}
    assert compare.render_seed_table(old, k=0) == []


def test_training_time_by_hand():
    """Minutes from the logged step times (a missing step time is skipped), the median step over seeds, and
    the report line, also for results of versions that only held the minutes."""
    t = compare.training_time([[30.0, 700.0, 40.0, None], [50.0, 60.0]])
    # seed 0: 770 s, seed 1: 110 s -> 440 s a run = 7.3 min; median of 30, 40, 50, 60, 700 = 50
    assert t == {"minutes_per_run": 7.3, "median_step_seconds": 50.0}
    assert compare.training_time([[30.0], [None]]) == {}  # a seed without step times: no figure at all
    arms = {"base": {}, "rlvr": t, "rlfr": {"minutes_per_run": 35.0}}
    (line, blank) = compare.render_training_time(arms)
    assert line.endswith(": rlvr 7.3 (50.0 s), rlfr 35.0") and blank == ""
    assert compare.render_training_time({"base": {}}) == []


def test_arm_pairs_put_rlfr_against_rlvr_and_the_entropy_control():
    """Every arm against RLVR and the start model; RLFR against the entropy arm (shaping without a flow) when
    both ran; an ablation against the method it changes. Ablations of RLVR pair with RLVR once."""
    specs = {
        "rlvr": ("rlvr", [], [0, 1]),
        "rlfr": ("rlfr", [], [0, 1]),
        "entropy": ("entropy", [], [0, 1]),
        "frozen": ("rlfr", ["flow.update=false"], [0]),
        "kl": ("rlvr", ["policy.kl_coef=0.01"], [0]),
    }
    assert compare.arm_pairs(specs) == [
        ("rlfr", "rlvr"), ("entropy", "rlvr"), ("frozen", "rlvr"), ("kl", "rlvr"), ("rlfr", "entropy"),
        ("frozen", "rlfr"), ("rlvr", "base"), ("rlfr", "base"), ("entropy", "base"), ("frozen", "base"),
        ("kl", "base"),
    ]  # fmt: skip
    assert compare.arm_pairs({"rlfr": specs["rlfr"], "frozen": specs["frozen"]}) == [
        ("frozen", "rlfr"), ("rlfr", "base"), ("frozen", "base"),
    ]  # fmt: skip


RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in RESULTS.rglob("results.json") if "select" not in p.relative_to(RESULTS).parts),
    ids=lambda p: str(p.relative_to(RESULTS)),
)
def test_saved_compare_results_read_back_unchanged(path):
    """Every ``results.json`` of ``rlfr compare`` in docs/results, the layout before eval sets (compare/) and the
    current one (study/), reads into ``CompareResult`` and writes back the same JSON, key order included."""
    saved = json.loads(path.read_text())
    result = CompareResult.from_dict(saved, str(path))
    assert json.dumps(result.to_dict(), indent=2) == json.dumps(saved, indent=2)
    assert (result.arms is None) == ("arms" not in saved) and result.seeds == saved["seeds"]


@pytest.mark.parametrize(
    "path", sorted((RESULTS / "select").glob("*/results.json")), ids=lambda p: str(p.relative_to(RESULTS))
)
def test_saved_select_results_read_back_unchanged(path):
    """Every saved ``rlfr select`` result reads into ``SelectResult`` and writes back the same JSON."""
    saved = json.loads(path.read_text())
    result = SelectResult.from_dict(saved, str(path))
    assert json.dumps(result.to_dict(), indent=2) == json.dumps(saved, indent=2)
    assert result.primary["rule"] in result.flow_rules


@pytest.mark.parametrize("study", ["study", "study/token_pre_seeds"])
def test_saved_study_report_renders_from_the_typed_result(study):
    """The report of a saved study, rendered again from its results.json, is the report.md stored with it."""
    d = RESULTS / study
    result = CompareResult.from_dict(json.loads((d / "results.json").read_text()))
    assert compare.render_report(result) == (d / "report.md").read_text()


@pytest.mark.parametrize(
    "path", sorted(RESULTS.rglob("stats.json")), ids=lambda p: str(p.relative_to(RESULTS))
)
def test_saved_inspect_stats_read_back_unchanged(path):
    saved = json.loads(path.read_text())
    result = InspectResult.from_dict(saved, str(path))
    assert json.dumps(result.to_dict(), indent=2) == json.dumps(saved, indent=2)
    assert result.stats.auroc == saved["auroc"] and result.latents == saved["latents"]


def test_results_with_a_missing_or_unknown_key_are_refused():
    old = {"command": "c", "start": "m", "flow": None, "seeds": [0], "budget": {}, "methods": {}}
    assert CompareResult.from_dict(old).to_dict() == old  # flow None stays; absent optional keys stay absent
    with pytest.raises(RlfrError, match=r"x.json is not a CompareResult file: missing keys \['budget'\], unknown "
                                         r"keys \['extra'\]"):  # fmt: skip
        CompareResult.from_dict({k: v for k, v in old.items() if k != "budget"} | {"extra": 1}, "x.json")
    with pytest.raises(RlfrError, match="stats.json: expected a JSON object"):
        InspectResult.from_dict([1], "stats.json")
    ev = ModelEval.from_dict({"config": {"model": "m"}, "greedy": [1, 0]})
    assert (
        ev.seconds is None
        and ev.sampled is None
        and ev.to_dict() == {"config": {"model": "m"}, "greedy": [1, 0]}
    )
