"""The vLLM rollout engine against Hugging Face ``generate`` on a tiny random-init Llama (needs vLLM: runs
where it is installed, e.g. ``PYTHONPATH=src /work/venv-vllm/bin/python -m pytest tests/test_vllm_engine.py``;
skipped elsewhere). vLLM's CPU attention needs head_dim >= 32, so the model is 2 blocks of hidden 64 with
2 heads; its weights are drawn wide (std 0.3) so that greedy decoding is not one repeated token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from rlfr.policy.forward import policy_forward  # noqa: E402
from rlfr.policy.rollout import eos_ids, generate  # noqa: E402
from rlfr.policy.sampler import SamplingParams  # noqa: E402
from rlfr.policy.vllm_engine import VLLMEngine, VLLMSettings  # noqa: E402
from tiny_run import make_tiny_model_dir  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
GREEDY_16 = SamplingParams(n=1, max_new_tokens=16, greedy=True)
PROMPTS = ["<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", "Hi", "7*8=?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, HF model, tokenizer, engine) shared by the module: one vLLM engine (its start is slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model_dir(
        tmp_path_factory.mktemp("vllm") / "m", num_layers=2, initializer_range=0.3, **TINY
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = VLLMEngine(path, tok, eos_ids(tok, model), VLLMSettings(memory_fraction=0.05, max_model_len=256))
    return path, model, tok, engine


def _same_layout(a, b) -> None:
    for name in ("input_ids", "attention_mask", "response_mask", "group", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.completions == b.completions


def test_greedy_matches_hf_generate(tiny):
    _, model, tok, engine = tiny
    engine.sync_weights(model, version=0)
    hf = generate(model, tok, PROMPTS, 2, 24, greedy=True)
    ro = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=24, greedy=True))
    _same_layout(ro, hf)
    assert len(set(ro.completions)) > 1  # not a degenerate model
    logp, _ = policy_forward(model.eval(), ro.input_ids, ro.attention_mask, ro.response_mask, False)
    mask = ro.response_mask
    assert torch.allclose(ro.engine_logp[mask], logp[mask], atol=1e-4)
    assert (ro.engine_logp[~mask] == 0).all()


def test_weights_follow_an_optimizer_step(tiny):
    _, model, tok, engine = tiny
    engine.sync_weights(model, version=0)
    before = engine.generate(PROMPTS, GREEDY_16)
    # one AdamW step that raises the log-prob of a sampled continuation: the greedy output moves
    torch.manual_seed(0)
    target = generate(model, tok, PROMPTS, 1, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    logp, _ = policy_forward(model, target.input_ids, target.attention_mask, target.response_mask, False)
    (-(logp * target.response_mask).sum()).backward()
    opt.step()
    model.eval()
    hf_after = generate(model, tok, PROMPTS, 1, 16, greedy=True)
    assert not torch.equal(hf_after.input_ids, before.input_ids)  # the step changed the policy's output
    assert engine.sync_weights(model, version=0) is False  # same version: nothing pushed
    _same_layout(engine.generate(PROMPTS, GREEDY_16), before)
    assert engine.sync_weights(model, version=1) is True
    _same_layout(engine.generate(PROMPTS, GREEDY_16), hf_after)


def test_lora_policies_push_merged_weights(tiny):
    from transformers import AutoModelForCausalLM

    from rlfr.policy.lora import apply_lora
    from rlfr.schema import LoraConfig

    path, _, tok, engine = tiny
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = apply_lora(base, LoraConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj")))
    with torch.no_grad():  # adapters with B != 0, so that the merged model differs from the base
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.eval()
    hf = generate(peft, tok, PROMPTS, 1, 16, greedy=True)
    engine.sync_weights(peft, version=100)
    _same_layout(engine.generate(PROMPTS, GREEDY_16), hf)


def test_sampled_layout_eos_and_truncation(tiny):
    _, model, tok, engine = tiny
    engine.sync_weights(model, version=200)  # whatever the earlier tests pushed
    model.eval()
    ro = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=20, temperature=1.0, seed=3))
    assert ro.input_ids.shape[0] == 24 and ro.group.tolist() == [g for g in range(3) for _ in range(8)]
    eos = set(eos_ids(tok, model))
    n_trunc = 0
    for i in range(24):
        resp = ro.input_ids[i][ro.response_mask[i]].tolist()
        assert ro.completions[i] == tok.decode(resp, skip_special_tokens=True)
        assert not any(t in eos for t in resp[:-1])  # the response stops at the first EOS
        if ro.truncated[i]:
            n_trunc += 1
            assert len(resp) == 20 and resp[-1] not in eos
        else:
            assert resp[-1] in eos  # EOS included
    assert 0 < n_trunc < 24  # both cases occurred (seeded)
    # right padding after the response, left padding before the prompt
    p_len = ro.input_ids.shape[1] - int(ro.response_lengths.max())
    assert (
        ro.attention_mask[:, :p_len].flip(1).cummin(1).values == ro.attention_mask[:, :p_len].flip(1)
    ).all()
    assert not ro.response_mask[:, :p_len].any()
    # seeded: the same seed gives the same rollouts, another seed others
    _same_layout(
        engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=20, temperature=1.0, seed=3)), ro
    )
    assert not torch.equal(
        engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=20, temperature=1.0, seed=4)).input_ids,
        ro.input_ids,
    )
    logp, _ = policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, False)
    assert (ro.engine_logp - logp).abs()[ro.response_mask].max() < 1e-3


def test_train_and_eval_with_the_engine(tmp_path):
    """``rlfr train rollout.engine=vllm`` (two steps, with the IS correction) and ``rlfr eval backend=vllm``,
    in a fresh process (one vLLM engine per process)."""
    # 4 blocks: the 3 hooked fractions need distinct blocks
    model = make_tiny_model_dir(tmp_path / "m", num_layers=4, initializer_range=0.3, **TINY)
    from tiny_run import TINY_TRAIN_OVERRIDES

    run = tmp_path / "run"
    train = ["train", "method=rlfr", f"model.name_or_path={model}", *TINY_TRAIN_OVERRIDES, "steps=2",
             "rollout.max_new_tokens=8", f"out_dir={run}", "rollout.engine=vllm", "rollout.vllm_memory_fraction=0.05",
             "rollout.vllm_is_correction=true", "data.max_prompt_tokens=200", "report_to=[]"]  # fmt: skip
    evaluate = ["eval", f"model={model}", "data.eval=embedded", "limit=2", "max_new_tokens=8", "backend=vllm",
                "vllm_memory_fraction=0.05", f"out={tmp_path / 'eval'}"]  # fmt: skip
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)])}
    for argv in (train, evaluate):
        proc = subprocess.run([sys.executable, "-m", "rlfr.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=3600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/logp_diff_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rollout/logp_diff_max"] < 1e-3 and r["rollout/weights_pushed"] == 1.0
        assert r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)  # same weights: ratio 1
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["backend"] == "vllm" and res["datasets"]["embedded"]["n"] == 2
