"""Evaluation statistics (pass@k, avg@k, mean ± std, AUROC, token classes) and ``rlfr eval`` end to end."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from helpers import ParityVerifier
from rlfr.cli import main
from rlfr.data import Example
from rlfr.eval.results import EvaluateResult
from rlfr.eval.scoring import Completions, evaluate, score_completions
from rlfr.reward.verifier import Verifier
from rlfr.stats import (
    TOKEN_CLASSES,
    auroc,
    avg_at_k,
    format_mean_std,
    mean_std,
    pass_at_k,
    powers_of_two,
    token_class,
    token_reward_stats,
)
from tiny_run import make_tiny_model_dir


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n,c,k",
    [(1, 0, 1), (1, 1, 1), (4, 1, 2), (5, 2, 3), (6, 0, 4), (8, 3, 4), (8, 5, 4), (10, 1, 1), (10, 9, 8)],
)
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # 1 - C(n-c, k) / C(n, k) with exact integers as the reference
    for n, c, k in [(200, 3, 100), (1000, 1, 512), (1000, 999, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_at_k_and_powers_of_two():
    assert avg_at_k(3, 8) == 0.375
    assert powers_of_two(1) == [1]
    assert powers_of_two(8) == [1, 2, 4, 8]
    assert powers_of_two(12) == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        avg_at_k(5, 4)


def test_mean_std_formatting():
    # [0.5, 0.7] -> 50, 70 percent: mean 60, sample std sqrt((100 + 100) / 1) = 14.142
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert format_mean_std([0.5, 0.7]) == "60.0 ± 14.1"
    assert format_mean_std([0.25]) == "25.0"  # one seed: no spread to show
    assert format_mean_std([]) == "n/a"
    assert format_mean_std([1.0, 2.0, 3.0], scale=1, digits=2) == "2.00 ± 1.00"


def brute_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pair_count_with_ties():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 25)
        scores = [rng.choice([0.0, 0.5, 1.0, 1.5, rng.random()]) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.5 for _ in range(n)]
        if len(set(labels)) < 2:
            assert auroc(scores, labels) is None
            continue
        assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))
    assert auroc([1, 2, 3], [True, False, True]) == 0.5  # pairs (1 vs 2): 0, (3 vs 2): 1
    assert auroc([1, 1], [True, False]) == 0.5
    assert auroc([3, 1], [True, False]) == 1.0
    assert auroc([1, 2], [True, True]) is None


def test_token_classes():
    cases = {
        "7": "digits",
        " 42": "digits",
        "3.5": "digits",
        "+": "operators",
        " =": "operators",
        "*": "operators",
        "the": "words",
        " So": "words",
        "x2": "words",
        "\\frac": "words",
        " ": "whitespace/punct",
        "\n": "whitespace/punct",
        ".": "whitespace/punct",
        "(": "whitespace/punct",
        "": "whitespace/punct",
    }
    for text, cls in cases.items():
        assert token_class(text) == cls, text
    assert set(cases.values()) == set(TOKEN_CLASSES)


def test_token_reward_stats_by_hand():
    toks = ["a", "a", "a", "1", "1", "1", "+", " ", "b"]
    rews = [-0.3, -0.1, -0.2, 0.1, 0.3, 0.2, 0.5, 0.0, 0.9]
    st = token_reward_stats(toks, rews, min_count=3, spread_top=2)
    assert [s["token"] for s in st["rewarded"]] == ["1"]  # 'b' and '+' are seen once: filtered out
    assert st["rewarded"][0]["mean"] == pytest.approx(0.2)
    assert [s["token"] for s in st["penalised"]] == ["a"]
    assert st["penalised"][0]["min"] == -0.3 and st["penalised"][0]["max"] == -0.1
    assert st["penalised"][0]["std"] == pytest.approx(math.sqrt(0.02 / 3))  # population std of .3,.1,.2
    assert st["by_class"]["digits"]["count"] == 3 and st["by_class"]["digits"]["mean"] == pytest.approx(0.2)
    assert st["by_class"]["words"]["count"] == 4 and st["by_class"]["words"]["penalised"] == 0.75
    assert st["by_class"]["operators"]["rewarded"] == 1.0
    assert st["by_class"]["whitespace/punct"]["mean"] == 0.0
    assert [s["token"] for s in st["spread"]] == ["1", "a"]  # most frequent first, ties by text


def test_score_completions_hand_worked():
    examples = [Example("1+1", "2", id="p0"), Example("2+3", "5", id="p1")]
    comps = Completions(
        texts=[["\\boxed{2}", "x", "\\boxed{3}", "so \\boxed{2}"], ["no", "no", "no", "\\boxed{5}"]],
        tokens=[[3, 1, 3, 5], [2, 2, 2, 3]],
    )
    with Verifier(num_workers=1) as v:
        res = score_completions(examples, ["P0", "P1"], comps, v)
    assert res.n == 2 and res.samples == 4 and len(res.records) == 8
    assert res.avg == pytest.approx(3 / 8)
    # c = 2 of 4: pass@2 = 1 - C(2,2)/C(4,2) = 5/6; c = 1: 1 - C(3,2)/C(4,2) = 1/2
    assert res.pass_at[1] == pytest.approx((0.5 + 0.25) / 2)
    assert res.pass_at[2] == pytest.approx((5 / 6 + 0.5) / 2)
    assert res.pass_at[4] == 1.0
    assert [r["correct"] for r in res.records] == [True, False, False, True, False, False, False, True]
    assert res.records[2]["extracted"] == "3" and res.records[1]["extracted"] is None
    assert res.mean_response_tokens == pytest.approx(21 / 8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    rows = [
        {"problem": "What is 1+1?", "answer": "2"},
        {"problem": "What is 2+3?", "answer": "5"},
        {"problem": "What is 4*2?", "answer": "8"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_cli_greedy_end_to_end(tiny_dir, data_file, tmp_path):
    out = tmp_path / "ev"
    rc = main(
        ["eval", f"model={tiny_dir}", f"data.eval={data_file}", f"out={out}", "max_new_tokens=5", "workers=1",
         "cpu=true", "dtype=float32"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    entry = res["datasets"]["tiny"]
    assert res["greedy"] and entry["n"] == 3 and entry["samples"] == 1 and 0 <= entry["pass@1"] <= 1
    # the file's keys, in order, as every version wrote them; the typed result reads it back unchanged
    # (rlfr_version, the last key, since 0.2.0)
    assert list(res) == ["model", "backend", "template", "greedy", "samples", "temperature", "top_p",
                         "max_new_tokens", "seed", "datasets", "rlfr_version"]  # fmt: skip
    assert list(entry) == [
        "data",
        "n",
        "samples",
        "mean_response_tokens",
        "seconds",
        "samples_file",
        "pass@1",
    ]
    assert EvaluateResult.from_dict(res).to_dict() == res and res["temperature"] is None
    rows = _rows(out / entry["samples_file"])
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["answer"] for r in rows] == ["2", "5", "8"]
    assert "What is 2+3?" in rows[1]["prompt"]
    for r in rows:
        assert isinstance(r["correct"], bool) and (r["extracted"] is None or isinstance(r["extracted"], str))
        assert 1 <= r["response_tokens"] <= 5
    assert entry["pass@1"] == sum(r["correct"] for r in rows) / 3
    # the CLI's greedy pass is the trainer's evaluate(): same completions
    from rlfr.data import load_examples
    from rlfr.policy.loading import load_model, load_tokenizer

    with Verifier(num_workers=1) as v:
        ref = evaluate(
            load_model(str(tiny_dir)),
            load_tokenizer(str(tiny_dir)),
            list(load_examples(data_file)),
            "chat",
            5,
            v,
        )
    assert [r["completion"] for r in ref.records] == [r["completion"] for r in rows]


def test_eval_reads_a_benchmark_by_name_and_a_hub_style_directory(tiny_dir, tmp_path, monkeypatch):
    """benchmark:NAME is the benchmark (here its local copy, RLFR_BENCHMARK_DIR); a dataset directory laid out as
    on the Hub is read through datasets like a Hub id."""
    rows = [{"id": f"b{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "aime24.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("RLFR_BENCHMARK_DIR", str(tmp_path / "copies"))
    import datasets

    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows[:2]).to_parquet(
        str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    )
    out = tmp_path / "ev"
    args = ["eval", f"model={tiny_dir}", f"data.eval=[benchmark:aime24,{tmp_path / 'hub'}]", f"out={out}",
            "max_new_tokens=3", "workers=1", "limit=2", "cpu=true"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())["datasets"]
    assert {k: (v["data"], v["n"]) for k, v in res.items()} == {
        "aime24": ("benchmark:aime24", 2), "hub": (str(tmp_path / "hub"), 2)
    }  # fmt: skip
    assert [r["answer"] for r in _rows(out / res["aime24"]["samples_file"])] == ["1", "2"]


def test_eval_cli_sampled_pass_at_k(tiny_dir, data_file, tmp_path):
    out = tmp_path / "ev"
    rc = main(
        ["eval", f"model={tiny_dir}", f"data.eval=[{data_file},embedded]", "data.eval_size=2", f"out={out}",
         "max_new_tokens=4", "workers=1", "samples=4", "limit=2", "temperature=1.0", "cpu=true"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["datasets"]) == {"tiny", "embedded"} and not res["greedy"]
    typed = EvaluateResult.from_dict(res)
    assert typed.to_dict() == res and typed.datasets["tiny"].avg == res["datasets"]["tiny"]["avg@4"]
    for entry in res["datasets"].values():
        assert entry["n"] == 2 and set(entry["pass@k"]) == {"1", "2", "4"} and "avg@4" in entry
        assert list(entry)[-2:] == ["avg@4", "pass@k"] and "pass@1" not in entry
        assert entry["pass@k"]["1"] == pytest.approx(entry["avg@4"])
        rows = _rows(out / entry["samples_file"])
        assert len(rows) == 8 and [r["sample"] for r in rows] == [0, 1, 2, 3] * 2


def test_eval_cli_errors(tiny_dir, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["eval", f"model={tiny_dir}", f"data.eval={missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlfr eval: error:") and "missing.jsonl" in err
    assert main(["eval", f"model={tiny_dir}"]) == 2  # nothing to evaluate on
    assert "needs model=MODEL and data.eval=SET" in capsys.readouterr().err
    # backend=vllm without vLLM: tests/test_rollout_engine.py::test_missing_vllm_is_one_clear_error


@pytest.mark.parametrize("samples", [2, 3])
def test_held_out_scores_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path, samples):
    """Killed in its greedy part, then in its sampled part, and rerun each time, the evaluation regenerates
    only the missing chunks and gives the same per-problem results (and texts) as an uninterrupted run, which
    in turn equal one ``evaluate`` call and one seeded ``sampled_completions`` call over all problems (the
    unchunked behaviour). Prompts of different lengths, so that another batching would pad differently;
    samples=3 does not divide the batch size (sampled chunks of 4 problems = 3 batches of 4)."""
    import torch

    from rlfr.data.templates import example_prompt
    from rlfr.eval.progress import EvalProgress
    from rlfr.eval.scoring import held_out_scores, sampled_completions
    from rlfr.policy.loading import load_model, load_tokenizer
    from rlfr.policy.sampler import SamplingParams, TransformersSampler

    tok, model = load_tokenizer(str(tiny_dir)), load_model(str(tiny_dir)).eval()
    examples = [Example(f"What is {10**i} + {i}?", str(10**i + i), id=f"p{i}") for i in range(10)]
    args = (model, tok, examples, "chat", 5)
    kw = dict(samples=samples, seed=3, batch_size=4)  # greedy chunks of 4 problems (calls 1-3)
    sampled_calls = {2: 5, 3: 3}[samples]  # chunks of 4 // gcd(4, samples) problems

    whole_v = ParityVerifier()
    whole = held_out_scores(*args, whole_v, **kw)
    assert whole_v.calls == 3 + sampled_calls and len(whole.greedy) == 10 and len(whole.sampled) == 10
    assert 0 < sum(whole.sampled) < 10 * samples  # not a constant: the comparisons below can fail

    prompts = [example_prompt("chat", ex, tok) for ex in examples]
    greedy = evaluate(model, tok, examples, "chat", 5, ParityVerifier(), batch_size=4)
    torch.manual_seed(3)
    one_call = sampled_completions(TransformersSampler(model, tok, batch_size=4), prompts,
                                   SamplingParams(n=samples, max_new_tokens=5, temperature=1.0))  # fmt: skip
    assert whole_v.texts == [r["completion"] for r in greedy.records] + [t for g in one_call.texts for t in g]

    progress = EvalProgress(tmp_path / "eval.partial.json", {"model": "tiny", "n": 10})
    with pytest.raises(ParityVerifier.Killed):  # dies in its second greedy chunk
        held_out_scores(*args, ParityVerifier(fail_on=2), progress=progress, **kw)
    assert len(json.loads(progress.path.read_text())["greedy"]) == 4
    with pytest.raises(ParityVerifier.Killed):  # resumed, dies in its second sampled chunk
        held_out_scores(*args, ParityVerifier(fail_on=4), progress=progress, **kw)
    saved = json.loads(progress.path.read_text())
    done = 4 // math.gcd(4, samples)
    assert len(saved["greedy"]) == 10 and len(saved["sampled"]) == done and "rng" in saved

    resumed_v = ParityVerifier()
    resumed = held_out_scores(*args, resumed_v, progress=progress, **kw)
    assert resumed_v.calls == sampled_calls - 1  # the sampled chunks left, nothing redone
    assert resumed_v.texts == whole_v.texts[10 + done * samples :]
    assert (resumed.greedy, resumed.sampled) == (whole.greedy, whole.sampled)

    # a partial file of another evaluation (other key, or other chunking) is not reused
    for key, batch in [({"other": 1}, 4), (progress.key, 2)]:
        fake = EvalProgress(progress.path, key)
        fake.save(dict(n=10, samples=samples, seed=3, batch_size=batch, device="cpu"),
                  {"greedy": [1] * 10, "sampled": [2] * 10, "rng": saved["rng"]})  # fmt: skip
        again = held_out_scores(*args, ParityVerifier(), progress=progress, **kw)
        assert (again.greedy, again.sampled) == (whole.greedy, whole.sampled)


# ------------------------------------------------------------------ evaluation follows the data (issue 28)
def test_evaluation_follows_the_training_data(tmp_path, capsys):
    """Before, a run on the user's own data.train evaluated on the embedded arithmetic task unless data.eval was
    also given. With data.eval=auto (the default) it holds out data.eval_size rows of the user's file (drawn
    with data.task_seed, the same in every stage), says so, and trains on the others; the embedded task stays
    the held-out set when the training data is the embedded task."""
    from rlfr.config import load_config
    from rlfr.data.sources import resolve_data
    from rlfr.errors import DataError
    from rlfr.schema import SFTConfig, TrainConfig

    mine = tmp_path / "mine.jsonl"
    rows = [
        {"problem": f"What is {i} + 1?", "answer": str(i + 1), "solution": f"\\boxed{{{i + 1}}}"}
        for i in range(20)
    ]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(TrainConfig, overrides=[f"data.train={mine}", "data.eval_size=5"])
    assert cfg.data.eval == "auto"
    train, evals = resolve_data(cfg.data)
    assert "data.eval=auto: evaluating on 5 rows held out of" in capsys.readouterr().out
    held = [e.problem for e in evals]
    assert len(held) == 5 and len(train) == 15 and not set(held) & {e.problem for e in train}
    assert set(held) <= {r["problem"] for r in rows}  # the user's rows, never the embedded task
    assert held == sorted(held, key=[r["problem"] for r in rows].index)  # in the file's order
    # the same rows for every stage (SFT holds them out too) and every run seed; another task_seed draws others
    sft = load_config(SFTConfig, overrides=[f"data.train={mine}", "data.eval_size=5"])
    assert [e.problem for e in resolve_data(sft.data, need_solution=True)[1]] == held
    assert [e.problem for e in resolve_data(load_config(TrainConfig, overrides=[
        f"data.train={mine}", "data.eval_size=5", "seed=9"]).data)[1]] == held  # fmt: skip
    other = load_config(TrainConfig, overrides=[f"data.train={mine}", "data.eval_size=5", "data.task_seed=1"])
    assert [e.problem for e in resolve_data(other.data)[1]] != held
    # an explicit held-out set, or none
    named = load_config(
        TrainConfig, overrides=[f"data.train={mine}", f"data.eval={mine}", "data.eval_size=3"]
    )
    assert [e.problem for e in resolve_data(named.data)[1]] == [r["problem"] for r in rows[:3]]
    none = load_config(TrainConfig, overrides=[f"data.train={mine}", "data.eval="])
    assert (
        resolve_data(none.data) == (resolve_data(none.data)[0], []) and len(resolve_data(none.data)[0]) == 20
    )
    # the embedded task: its own held-out split, as data.eval=embedded gave before
    emb = load_config(TrainConfig, overrides=["data.train_size=8", "data.eval_size=4"])
    explicit = load_config(
        TrainConfig, overrides=["data.train_size=8", "data.eval_size=4", "data.eval=embedded"]
    )
    assert resolve_data(emb.data) == resolve_data(explicit.data)
    # nothing to hold out, or too much: an error naming the key and the fix
    for size, match in ((0, "data.eval_size=0"), (11, "set data.eval_size <= 10")):
        bad = load_config(TrainConfig, overrides=[f"data.train={mine}", f"data.eval_size={size}"])
        with pytest.raises(DataError, match=match):
            resolve_data(bad.data)


def test_progress_bars_show_the_work_and_draw_no_random_numbers(tiny_dir, capsys):
    """Long evaluations and sampling show a bar (``rlfr eval``/``inspect``/``select``/``compare``/``demo`` with
    progress=true); the bar is display only: the same seeded results with and without it."""
    import torch

    from rlfr.eval.scoring import held_out_scores
    from rlfr.policy.loading import load_model, load_tokenizer
    from rlfr.policy.rollout import generate

    tok, model = load_tokenizer(str(tiny_dir)), load_model(str(tiny_dir)).eval()
    examples = [Example(f"What is {i} + {i}?", str(2 * i), id=f"p{i}") for i in range(6)]
    runs = [held_out_scores(model, tok, examples, "chat", 5, ParityVerifier(), samples=2, seed=1, batch_size=4,
                            bar=bar) for bar in (None, "eval tiny")]  # fmt: skip
    assert (runs[0].greedy, runs[0].sampled) == (runs[1].greedy, runs[1].sampled)
    err = capsys.readouterr().err
    # the first draw (at the start, whatever the machine's speed) names the work and its size:
    assert "eval tiny:   0%" in err and "0/12" in err  # 6 problems greedy + 6 sampled
    prompts = [f"Count to {i}" for i in range(3)]
    outs = []
    for bar in (None, "sampling"):
        torch.manual_seed(0)
        outs.append(generate(model, tok, prompts, 2, 6, batch_size=4, progress=bar).completions)
    assert outs[0] == outs[1]
    err = capsys.readouterr().err
    assert "sampling:   0%" in err and "0/6" in err  # 3 prompts x 2 samples


def test_eval_refuses_two_sets_of_one_name_and_its_seed_keeps_the_embedded_split(tiny_dir, data_file, tmp_path,
                                                                                  capsys):  # fmt: skip
    """Two files of one name (a/test.jsonl, b/test.jsonl) would share samples_test.jsonl and one results entry:
    refused. ``seed`` draws the samples only; the embedded problems are those of ``data.task_seed`` (before,
    ``rlfr eval seed=1`` evaluated another split, which held problems a run of task_seed 0 trained on)."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test.jsonl").write_text(data_file.read_text())
    words = ["eval", f"model={tiny_dir}", "max_new_tokens=2", "workers=1", "cpu=true", "dtype=float32"]
    bad = f"data.eval=[{tmp_path / 'a' / 'test.jsonl'},{tmp_path / 'b' / 'test.jsonl'}]"
    assert main([*words, bad, f"out={tmp_path / 'x'}"]) == 2
    assert "would both be reported as 'test'" in capsys.readouterr().err
    problems = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert main([*words, "data.eval=embedded", "data.eval_size=4", f"seed={seed}", f"out={out}"]) == 0
        problems.append([r["prompt"] for r in _rows(out / "samples_embedded.jsonl")])
    assert len(problems[0]) == 4 and problems[0] == problems[1]
    out = tmp_path / "task1"
    assert main([*words, "data.eval=embedded", "data.eval_size=4", "data.task_seed=1", f"out={out}"]) == 0
    moved = [r["prompt"] for r in _rows(out / "samples_embedded.jsonl")]
    assert moved != problems[0]  # the seed that moves them
