"""scripts/multistep_diagnostic.py (the pre-registered diagnostic of docs/results/multistep/PROTOCOL.md) on a
hand-made pair of inspect outputs whose statistics are worked out by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "multistep_diagnostic", ROOT / "scripts" / "multistep_diagnostic.py"
)
diag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diag)

# (group, correct, mean deviation, mean log-prob, response tokens)
ROWS = [
    (0, True, 1.0, -1.0, 10), (0, True, 2.0, -3.0, 20), (0, False, 3.0, -2.0, 30), (0, False, 4.0, -4.0, 192),
    (1, True, 3.0, -1.0, 40), (1, True, 4.0, -1.0, 50), (1, False, 1.0, -2.0, 60), (1, False, 2.0, -2.0, 70),
    (2, True, 1.0, -1.0, 10), (2, True, 2.0, -2.0, 10), (2, True, None, -2.0, 0), (2, True, 3.0, -3.0, 10),
]  # fmt: skip


def _write(d: Path, rows) -> Path:
    d.mkdir(parents=True)
    lines = [{"group": g, "problem": f"p{g}", "correct": c, "mean_deviation": dev, "mean_logp": lp,
              "response_tokens": n, "deviation_draws": None if dev is None else [dev] * 8}
             for g, c, dev, lp, n in rows]  # fmt: skip
    (d / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


def test_the_diagnostic_computes_the_pre_registered_measures(tmp_path):
    """Problem 0: correct samples have the lower deviations (flow AUROC 1) and log-probs -1, -3 against -2, -4
    (3 of 4 pairs: 0.75); problem 1: correct samples have the higher deviations (flow 0) and the higher log-probs
    (1); problem 2 is all correct (not informative). So flow within 0.5, log-prob within 0.875, flow - log-prob
    mean(0.25, -1) = -0.375, over 2 problems: under 20, inconclusive. Without the one cut response (192 tokens)
    problem 0 keeps both classes: flow 1 and 0 again."""
    d = _write(tmp_path / "inspect_sft", ROWS)
    out = diag.main([str(d), "--out", str(tmp_path / "res")])
    r = out["pairs"]["sft"]
    assert r["flow_within"]["mean"] == 0.5 and r["flow_within"]["groups"] == 2
    assert r["logp_within"]["mean"] == 0.875
    assert r["flow_minus_logp"]["mean"] == -0.375 and r["flow_minus_logp"]["groups"] == 2
    assert (
        r["flow_minus_logp"]["lo"] == -1.0 and r["flow_minus_logp"]["hi"] == 0.25
    )  # two values: their range
    assert (
        r["without_flow_score"] == 1 and r["samples"] == 12 and r["problems"] == 3 and r["accuracy"] == 8 / 12
    )
    assert r["cut_samples"] == 1 and r["without_cut"]["flow_within"]["mean"] == 0.5
    # length-only: in both problems the correct samples are the shorter ones (10, 20 vs 30, 192; 40, 50 vs 60, 70)
    assert r["length_within"]["mean"] == 1.0 and r["length_within"]["groups"] == 2
    assert r["repeatability"][0]["k"] == 1 and r["repeatability"][0]["auroc_within"]["mean"] == 0.5
    assert (
        r["decision"]["verdict"] == "inconclusive"
        and out["all_inconclusive"]
        and not out["flow_signal_present"]
    )
    assert "inconclusive" in (tmp_path / "res" / "diagnostic.md").read_text()


def test_the_decision_rule():
    many = {"flow_within": {"mean": 0.6, "groups": 40, "lo": 0.52, "hi": 0.68},
            "flow_minus_logp": {"mean": -0.05, "groups": 40, "lo": -0.1, "hi": 0.01}}  # fmt: skip
    assert diag.decide(many) == {"verdict": "separates", "separates": True, "beats_logp": False}
    many["flow_within"]["lo"] = 0.5  # the interval reaches 0.5: not separated
    assert diag.decide(many)["verdict"] == "does not separate"
    many["flow_within"]["groups"] = 19
    assert diag.decide(many)["verdict"] == "inconclusive"


def test_two_directories_with_one_pair_name_are_refused(tmp_path):
    """Pair names are directory names: a second `sft` would replace the first's results in the report."""
    a = _write(tmp_path / "a" / "inspect_sft", ROWS)
    b = _write(tmp_path / "b" / "sft", ROWS)
    with pytest.raises(SystemExit, match=r"second directory for pair 'sft'"):
        diag.main([str(a), str(b), "--out", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()  # nothing written
