"""scripts/five_seeds.py (the five-seed statistics of docs/results/study/PROTOCOL.md) on hand-made records whose
figures are worked out by hand, and on the records committed in docs/results/study/five_seeds/."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("five_seeds", ROOT / "scripts" / "five_seeds.py")
five = importlib.util.module_from_spec(spec)
spec.loader.exec_module(five)

PROBLEMS = ["p0", "p1", "p2", "p3"]


def _record(d: Path, run: str, greedy, sampled, problems=PROBLEMS) -> None:
    (d / run).mkdir(parents=True, exist_ok=True)
    rec = {"config": {"problems": problems, "samples": 2}, "greedy": greedy, "sampled": sampled}
    (d / run / "eval_embedded.json").write_text(json.dumps(rec))


def _records(d: Path) -> Path:
    _record(d, "base", [1, 0, 0, 0], [1, 0, 0, 0])
    _record(d, "rlfr/seed_0", [1, 1, 0, 0], [2, 1, 0, 0])
    _record(d, "rlvr/seed_0", [1, 0, 0, 0], [2, 0, 0, 0])
    _record(d, "rlfr/seed_1", [1, 1, 1, 0], [2, 2, 1, 0])
    _record(d, "rlvr/seed_1", [0, 1, 0, 0], [1, 1, 0, 0])
    return d


def test_per_seed_figures_and_the_primary_only_when_every_seed_exists(tmp_path):
    """Seed 0: RLFR solves p0, p1 and RLVR p0: +25 points, discordant 1-0 (McNemar p 1). Seed 1: RLFR p0-p2,
    RLVR p1: +50 points, discordant 2-0 (p = 2 x 1/4 = 0.5). Over seeds 0, 1 the seed-averaged per-problem
    accuracies are (1, 1, .5, 0) and (.5, .5, 0, 0): +37.5 points; sampled (avg@2) seed-averaged per problem
    (1, .75, .25, 0) against (.75, .25, 0, 0): +25 points."""
    res = five.main([str(_records(tmp_path / "r")), "--seeds", "0", "1", "--out", str(tmp_path / "out")])
    r = res["embedded"]
    assert r["runs"]["base"] == {"greedy": 0.25, "sampled": 0.125}
    assert r["runs"]["rlfr/seed_1"] == {"greedy": 0.75, "sampled": 5 / 8}
    s0, s1 = r["per_seed"][0], r["per_seed"][1]
    assert s0["diff_greedy"] == 0.25 and s0["mcnemar"] == {"n10": 1, "n01": 0, "p": 1.0}
    assert s1["diff_greedy"] == 0.5 and s1["mcnemar"] == {"n10": 2, "n01": 0, "p": 0.5}
    p = r["primary"]
    assert p["greedy"]["diff"] == pytest.approx(0.375) and p["sampled"]["diff"] == pytest.approx(0.25)
    assert p["greedy"]["lo"] <= 0.375 <= p["greedy"]["hi"] and p["greedy"]["n"] == 4
    t = p["greedy"]["across_seeds"]  # two seeds: mean 0.375, the t interval (df 1) is wide
    assert t["n"] == 2 and t["diff"] == pytest.approx(0.375) and t["lo"] < 0 < t["hi"]
    md = (tmp_path / "out" / "five_seeds.md").read_text()
    assert "seed 1: RLFR - RLVR greedy +50.0 points; McNemar p = 0.500" in md and "+37.5" in md
    # the protocol's seeds 0-2: seed 2 does not exist, so no primary is reported
    partial = five.main([str(tmp_path / "r"), "--seeds", "0", "1", "2"])["embedded"]
    assert partial["primary"] is None and partial["missing"] == {"rlvr": [2], "rlfr": [2]}
    assert partial["per_seed"].keys() == {0, 1}


def test_records_on_other_problems_or_in_the_wrong_place_are_refused(tmp_path):
    d = _records(tmp_path / "r")
    _record(d, "rlfr/seed_2", [1, 1, 0, 0], [2, 1, 0, 0], problems=["p0", "p1", "p3", "p2"])
    with pytest.raises(
        ValueError, match=r"rlfr/seed_2/eval_embedded.json: config.problems differs from base"
    ):
        five.main([str(d)])
    with pytest.raises(ValueError, match="no evaluation records"):
        five.main([str(tmp_path / "empty")])
    e = tmp_path / "e"
    _record(e, "grpo/seed_0", [1, 0, 0, 0], [1, 0, 0, 0])
    with pytest.raises(ValueError, match="grpo/seed_0/eval_embedded.json: expected"):
        five.main([str(e)])


def test_the_committed_records_read():
    res = five.main([str(ROOT / "docs" / "results" / "study" / "five_seeds")])
    r = res["embedded"]
    assert len(r["runs"]) >= 2 and r["runs"]["base"]["greedy"] == pytest.approx(0.522)


def _recorded(path: Path, greedy: dict, sampled: dict) -> Path:
    """A study results.json with per-seed accuracies only (arms.<method>.eval.<set>.greedy/sampled)."""
    arms = {m: {"eval": {"embedded": {"greedy": greedy[m], "sampled": sampled[m]}}} for m in ("rlvr", "rlfr")}
    path.write_text(json.dumps({"arms": arms}))
    return path


def test_seed_level_interval_mixes_records_and_recorded_accuracies_and_checks_reruns(tmp_path):
    """Records hold seeds 0 and 1 (greedy: RLFR .5 and .75, RLVR .25 and .25); results.json holds seeds 0-2,
    where seed 0 equals its rerun, seed 1's RLFR greedy differs (.5 recorded against .75 rerun) and seed 2 has
    no record (RLFR .5, RLVR .5). Diffs used: .25, .5 (the record wins), 0 -> mean .25, sample sd .25, t(0.975,
    df 2) = 4.3027: half-width 4.3027 x .25 / sqrt(3) = .6210."""
    d = _records(tmp_path / "r")
    rec = _recorded(
        tmp_path / "results.json",
        {"rlfr": {"0": 0.5, "1": 0.5, "2": 0.5}, "rlvr": {"0": 0.25, "1": 0.25, "2": 0.5}},
        {"rlfr": {"0": 0.375, "1": 0.625, "2": 0.5}, "rlvr": {"0": 0.25, "1": 0.25, "2": 0.25}},
    )
    res = five.main([str(d), "--seeds", "0", "1", "2", "--recorded", str(rec), "--out", str(tmp_path / "o")])
    r = res["embedded"]
    assert r["primary"] is None  # seed 2 has no per-problem records
    sl = r["seed_level"]
    assert sl["accuracy"]["rlfr"][1] == {"greedy": 0.75, "sampled": 0.625, "source": "record"}
    assert sl["accuracy"]["rlvr"][2] == {"greedy": 0.5, "sampled": 0.25, "source": "recorded"}
    same = {c["run"]: c["same"] for c in sl["reproduction"]}
    assert same == {"rlvr/seed_0": True, "rlvr/seed_1": True, "rlfr/seed_0": True, "rlfr/seed_1": False}
    t = sl["t_interval"]["greedy"]
    assert t["n"] == 3 and t["diff"] == pytest.approx(0.25)
    assert t["lo"] == pytest.approx(0.25 - 0.6210, abs=1e-3) and t["hi"] == pytest.approx(
        0.25 + 0.6210, abs=1e-3
    )
    md = (tmp_path / "o" / "five_seeds.md").read_text()
    assert (
        "rlfr/seed_1: recorded accuracies NOT reproduced: rerun 0.750 / 0.6250, recorded 0.500 / 0.6250" in md
    )
    assert "| 2 | *0.500 / 0.2500* | *0.500 / 0.5000* | +0.0 |" in md
    # every seed has records: the seed-level interval is the primary's "over seeds" one (one computation, so the
    # two lines of the report cannot round the same mean differently); greedy diffs .25, .5 -> mean .375
    full = five.main([str(d), "--seeds", "0", "1", "--recorded", str(rec)])["embedded"]
    assert full["seed_level"]["t_interval"]["greedy"] is full["primary"]["greedy"]["across_seeds"]
    assert full["seed_level"]["t_interval"]["greedy"]["diff"] == pytest.approx(0.375)
    # a seed with neither a record nor a recorded accuracy: no interval
    part = five.main([str(d), "--seeds", "0", "1", "3", "--recorded", str(rec)])["embedded"]["seed_level"]
    assert part["t_interval"] is None
    (tmp_path / "bad.json").write_text(json.dumps({"methods": {}}))
    with pytest.raises(ValueError, match=r"bad.json: not a study results.json .*'arms'"):
        five.main([str(d), "--recorded", str(tmp_path / "bad.json")])
