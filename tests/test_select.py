"""``rlfr select``: the selection rules and accuracy against N by hand (``rlfr.eval.selection``), the answer key, the
sequence flow scores, the dev/test analysis with its primary comparison, and the command end to end on a tiny model
(captured latents against a second forward; bad input refused in one line)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlfr.cli import main
from rlfr.commands import SelectConfig
from rlfr.config import load_config
from rlfr.eval.results import SelectResult
from rlfr.eval.selection import (
    Sample,
    accuracy_at,
    choose,
    is_flow_rule,
    pass_at,
    rule_correct,
    rule_names,
    subsets,
)
from rlfr.flow import sequence_scores
from rlfr.recipes.select import analyse, fill_missing
from rlfr.reward.verifier import answer_key
from tiny_run import make_tiny_model_dir, tiny_train_config


def s(key, correct, logp=0.0, flow=0.0, q=0.0):
    return Sample(key, correct, {"logp": logp, "flow_mean": flow, "flow_q": q})


def test_majority_vote_ties_go_to_the_answer_seen_first_and_unanswered_samples_do_not_vote():
    samples = [s(None, False), s("7", False), s("5", True), s("5", True), s("7", False)]
    # 5 and 7 tie 2-2: 7 was seen first (sample 1)
    assert choose(samples, "majority") == 1 and rule_correct(samples, "majority") == 0.0
    assert choose(samples[:4], "majority") == 2 and rule_correct(samples[:4], "majority") == 1.0
    assert choose([s(None, False), s(None, True)], "majority") is None  # nobody answered: wrong
    assert rule_correct([s(None, False), s(None, True)], "vote:logp") == 0.0
    with pytest.raises(ValueError, match="unknown selection rule"):
        choose(samples, "best_of")


def test_best_of_n_picks_the_highest_score_among_answered_samples():
    samples = [
        s(None, True, logp=9.0),
        s("1", False, logp=-1.0),
        s("2", True, logp=-0.5),
        s("3", False, logp=-0.5),
    ]
    assert (
        choose(samples, "best:logp") == 2
    )  # the unanswered sample scores highest but is passed over; 2 ties 3
    assert choose([s(None, False, logp=1.0), s(None, True, logp=2.0)], "best:logp") == 1  # nobody answered


def test_score_weighted_vote_by_hand():
    # answers a, a, b with flow scores 0, 0, 3: z = (-1/sqrt 2, -1/sqrt 2, sqrt 2) (mean 1, population sd sqrt 2);
    # a gets 2 exp(-0.707) = 0.986, b gets exp(1.414) = 4.11: the score outvotes the majority
    samples = [s("a", False, flow=0.0), s("a", False, flow=0.0), s("b", True, flow=3.0)]
    assert choose(samples, "majority") == 0 and choose(samples, "vote:flow_mean") == 2
    # equal scores: every weight is exp(0) = 1, the majority
    flat = [s("a", False, flow=1.0), s("a", False, flow=1.0), s("b", True, flow=1.0)]
    assert choose(flat, "vote:flow_mean") == choose(flat, "majority") == 0


def test_the_combined_score_adds_standardised_scores():
    # logp z = (-1, 1); flow z = (1, -1): weight 1 ties (first wins), weight 2 follows the flow, 0.5 the log-prob
    samples = [s("a", False, logp=-2.0, flow=5.0), s("b", True, logp=-1.0, flow=3.0)]
    assert choose(samples, "best:combined", "flow_mean", 1.0) == 0
    assert choose(samples, "best:combined", "flow_mean", 2.0) == 0
    assert choose(samples, "best:combined", "flow_mean", 0.5) == 1
    assert (
        choose(samples, "best:combined", "flow_q", 2.0) == 1
    )  # flow_q is 0 for both: z 0, the log-prob decides
    assert [r for r in rule_names() if is_flow_rule(r)] == ["best:flow_mean", "vote:flow_mean", "best:flow_q",
                                                            "vote:flow_q", "best:combined", "vote:combined"]  # fmt: skip


def test_accuracy_against_n_from_subsets_and_pass_at_n():
    # 2 correct "5" of 4 samples, 2 wrong "7"; best:logp prefers the correct ones
    p = [s("5", True, logp=-1.0), s("7", False, logp=-3.0), s("5", True, logp=-2.0), s("7", False, logp=-4.0)]
    acc = accuracy_at([p], ["majority", "best:logp"], [1, 2, 4], draws=6, seed=0)
    # N = 4 (the whole set, in order): majority ties 2-2, "5" seen first -> right; best-of-4 -> right
    assert acc["majority"][4] == [1.0] and acc["best:logp"][4] == [1.0]
    # N = 1 and N = 2: every subset (4 and 6 <= 6 draws). N = 1: 2 of 4 right. N = 2, pairs in index order:
    # (0,1) tie, 5 first: right; (0,2) right; (0,3) right; (1,2) tie, 7 first: wrong; (1,3) wrong; (2,3) right -> 4/6;
    # best-of-2 is wrong only for the pair of wrong ones (1,3) -> 5/6
    assert acc["majority"][1] == [0.5] and acc["best:logp"][1] == [0.5]
    assert acc["majority"][2] == [pytest.approx(4 / 6)] and acc["best:logp"][2] == [pytest.approx(5 / 6)]
    # more subsets than draws: 5 random ones (N = 2 of 4), the same as a plain loop over the seeded draws
    sampled = accuracy_at([p], ["best:logp"], [2], draws=5, seed=0)["best:logp"][2][0]
    draws = subsets(4, 2, 5, random.Random(0))
    assert len(draws) == 5 and sampled == sum(rule_correct([p[i] for i in d], "best:logp") for d in draws) / 5
    # pass@N: 1 - C(2, N) / C(4, N): N = 1 -> 1/2, N = 2 -> 5/6, N = 4 -> 1
    assert pass_at([p], [1, 2, 4]) == {1: [0.5], 2: [pytest.approx(5 / 6)], 4: [1.0]}
    assert subsets(4, 4, 9, random.Random(0)) == [[0, 1, 2, 3]]
    assert subsets(3, 2, 3, random.Random(0)) == [[0, 1], [0, 2], [1, 2]]
    assert all(len(set(x)) == 2 for x in subsets(4, 2, 5, random.Random(0)))
    with pytest.raises(ValueError):
        subsets(4, 5, 1, random.Random(0))


def test_answer_keys_group_equal_numbers():
    assert (
        answer_key("so \\boxed{142.0}") == answer_key("\\boxed{\\frac{284}{2}}") == answer_key("Answer: 142")
    )
    assert answer_key("\\boxed{1/2}") == answer_key("\\boxed{0.5}") == "1/2"
    assert answer_key("no answer here") is None and answer_key("\\boxed{X + 1}") == "x+1"


def test_sequence_scores_by_hand():
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[False, True, True, True, True], [False, False, False, False, False]])
    mean, q = sequence_scores(scores, valid, 0.75)
    # row 0: 1..4 -> mean 2.5; the 0.75 quantile, linear: position 0.75 * 3 = 2.25 -> 3 + 0.25 = 3.25; row 1: none
    assert mean[0] == 2.5 and q[0] == pytest.approx(3.25) and math.isnan(mean[1]) and math.isnan(q[1])
    filled = fill_missing([{"flow_mean": -2.0, "flow_q": float("nan")}, {"flow_mean": float("nan"), "flow_q": float("nan")},
                           {"flow_mean": -1.0, "flow_q": float("nan")}])  # fmt: skip
    assert [x["flow_mean"] for x in filled] == [-2.0, -2.0, -1.0] and [x["flow_q"] for x in filled] == [
        0.0
    ] * 3


def test_the_best_flow_rule_on_dev_is_compared_on_test():
    # dev: the flow picks the right sample, the log-prob the wrong one; test: the same on problems 2 and 3, the
    # flow wrong on problem 4. Majority ties 1-1 on every problem and takes the first sample (wrong).
    def problem(flow_right: bool):
        return [s("7", False, logp=-1.0, flow=0.0 if flow_right else 2.0, q=0.0),
                s("5", True, logp=-2.0, flow=1.0 if flow_right else -1.0, q=0.0)]  # fmt: skip

    problems = [problem(True), problem(True), problem(True), problem(True), problem(False)]
    cfg = load_config(SelectConfig, overrides=["model=m", "flow=f", "n=2", "subset_draws=4", "bootstrap=200"])
    res = analyse(cfg, problems, {0, 1}, "m", "f", [[3, 4]] * 5)
    assert res.problems == {"dev": 2, "test": 3} and res.ns == [1, 2]
    # on dev every best/vote rule of a flow score with a z gap picks "5": best:flow_mean is first of the best ones
    assert res.accuracy["dev"]["best:flow_mean"]["2"] == 1.0 and res.accuracy["dev"]["best:logp"]["2"] == 0.0
    p = res.primary
    assert p["rule"] == "best:flow_mean" and p["dev_accuracy"] == 1.0
    # on test the flow is right on 2 of 3 problems, majority and best:logp on none: +2/3 each
    assert p["test_accuracy"] == pytest.approx(2 / 3)
    assert p["vs_majority"]["diff"] == pytest.approx(2 / 3) and p["vs_best_logp"]["diff"] == pytest.approx(
        2 / 3
    )
    assert p["vs_majority"] == res.paired["test"]["best:flow_mean - majority"]
    assert res.pass_at["test"] == {"1": 0.5, "2": 1.0}
    # flow_mean separates within 4 problems of 5 (AUROC 1) and not in the last (0): 0.8 over 5 problems
    assert res.separation["flow_mean"]["auroc_within"]["mean"] == pytest.approx(0.8)
    assert res.separation["logp"]["auroc_within"]["mean"] == 0.0
    assert SelectResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    whole = analyse(cfg, problems, set(), "m", "f", [[3, 4]] * 5)  # no split: all test, no primary comparison
    assert whole.primary is None and whole.problems == {"test": 5}


@pytest.fixture(scope="module")
def tiny_rlfr_run(tmp_path_factory):
    from rlfr.recipes.train import run_train

    root = tmp_path_factory.mktemp("select")
    model = make_tiny_model_dir(root / "model")
    run_train(
        tiny_train_config(model, root / "run", "steps=1", "save_every=0"), progress=False, final_eval=False
    )
    return root


def test_select_end_to_end_with_captured_latents_equal_to_a_second_forward(tiny_rlfr_run, tmp_path):
    run = tiny_rlfr_run / "run"
    common = [f"checkpoint={run}", "dev_problems=2", "n=4", "max_new_tokens=8", "cpu=true",
              "bootstrap=200", "subset_draws=4"]  # fmt: skip
    assert main(["select", *common, f"out={tmp_path / 'captured'}"]) == 0
    assert main(["select", *common, "scoring=forward", f"out={tmp_path / 'forward'}"]) == 0
    res = json.loads((tmp_path / "captured" / "results.json").read_text())
    # problems=0: the run's held-out split (data.eval_size=4 in tiny_run)
    assert res["problems"] == {"dev": 2, "test": 2} and res["ns"] == [1, 2, 4] and res["n"] == 4
    assert set(res["accuracy"]["test"]) == set(rule_names()) and res["primary"]["rule"] in res["flow_rules"]
    assert res["config"]["scoring"] == "captured" and res["seconds"]["generate"] > 0
    for name in ("problems.jsonl", "accuracy_vs_n.png", "accuracy_vs_n_dev.png", "report.md"):
        assert (tmp_path / "captured" / name).stat().st_size > 0
    rows = [[json.loads(x) for x in (tmp_path / d / "problems.jsonl").read_text().splitlines()]
            for d in ("captured", "forward")]  # fmt: skip
    assert [r["split"] for r in rows[0]].count("dev") == 2 and all(len(r["samples"]) == 4 for r in rows[0])
    for a, b in zip(*rows):  # the same samples, and scores equal to float tolerance (tests/test_capture.py)
        assert [x["completion"] for x in a["samples"]] == [x["completion"] for x in b["samples"]]
        for x, y in zip(a["samples"], b["samples"]):
            assert x["logp"] < 0 and x["logp"] == pytest.approx(y["logp"], abs=1e-4)
            assert x["flow_mean"] == pytest.approx(y["flow_mean"], rel=1e-4) and x["flow_q"] == pytest.approx(
                y["flow_q"], rel=1e-4
            )
        assert set(a["choice"]) == set(rule_names()) and all(c in (0, 1) for c in a["correct"].values())
    assert "Primary comparison" in (tmp_path / "captured" / "report.md").read_text()


def test_bad_input_is_refused_in_one_line(tiny_rlfr_run, tmp_path, capsys):
    from rlfr.flow import FlowBundle, FlowField, FlowMeta, save_flow

    def error(*argv):
        assert main(["select", *argv, f"out={tmp_path / 'out'}", "cpu=true"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    run = tiny_rlfr_run / "run"
    model = tiny_rlfr_run / "model"
    assert "needs a policy and its flow" in error(f"model={model}")
    assert "n must be >= 2, got 1" in error(f"checkpoint={run}", "n=1")
    # more embedded problems than the run held out (data.eval_size=4): some may have been trained on
    assert "exceeds the run's held-out split (data.eval_size=4)" in error(f"checkpoint={run}", "problems=5")
    plain = tiny_rlfr_run / "rlvr"  # a checkpoint without a flow
    (plain / "checkpoints" / "step_000001").mkdir(parents=True)
    ck = plain / "checkpoints" / "step_000001"
    (ck / "state.json").write_text("{}")
    (ck / "policy").mkdir()
    assert "has no flow/" in error(f"checkpoint={ck}")
    wide = tmp_path / "wide"  # a flow of a model with hidden size 64 (the tiny model's is 32)
    meta = FlowMeta(fractions=(0.25, 0.5, 0.75), modes=("token_post",), shift=1, latent_norm="none", hidden_size=64,
                    num_hidden_layers=4)  # fmt: skip
    save_flow(wide, FlowBundle(FlowField(dim=64, width=16, depth=1), meta))
    assert "hidden_size: flow 64 vs run 32" in error(f"model={model}", f"flow={wide}")
    assert "is not a directory" in error(f"model={model}", f"flow={tmp_path / 'nothing'}")
