"""The sampler contract (``rlfr.policy.sampler``), one test per promise, run against every implementation:
the transformers sampler everywhere (also capturing latents as it samples), the vLLM engine where vLLM is installed (skipped elsewhere; see
docs/vllm.md). On a tiny random-init Llama of 2 blocks, hidden 64 and 2 heads (vLLM's CPU attention needs
head_dim >= 32), weights drawn wide (std 0.3) so that greedy decoding is not one repeated token, and the
digits 0-4 added to the model's EOS ids so that a batch of 12-token responses holds both rollouts that stop at
an EOS and truncated ones."""

from __future__ import annotations

import pytest
import torch

from rlfr.policy.latents import LatentTap
from rlfr.policy.rollout import eos_ids, generate
from rlfr.policy.sampler import Sampler, SamplingParams, TransformersSampler, build_sampler
from tiny_run import make_tiny_model_dir

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
PROMPTS = ["<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", "Hi", "7*8=?"]
GREEDY = SamplingParams(n=2, max_new_tokens=16, greedy=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, tokenizer, HF model in eval mode) shared by the module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model_dir(
        tmp_path_factory.mktemp("sampler") / "m", num_layers=2, initializer_range=0.3, **TINY
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, *tok.convert_tokens_to_ids(list("01234"))]
    return path, tok, model


@pytest.fixture(scope="module", params=["hf", "hf-capture", "vllm"])
def sampler(request, tiny) -> Sampler:
    path, tok, model = tiny
    if request.param == "hf":  # 5 sequences per generate call: batches that straddle prompts
        yield build_sampler("hf", tok, model=model, batch_size=5)
        return
    if request.param == "hf-capture":  # latents recorded while sampling (rlfr select): the same promises
        with LatentTap(model, (0.5,)) as tap:
            yield build_sampler("hf", tok, model=model, batch_size=5, capture=tap)
        return
    pytest.importorskip("vllm")
    from rlfr.policy.vllm_engine import VLLMSettings

    engine = build_sampler("vllm", tok, model=model, model_path=str(path),
                           vllm=VLLMSettings(memory_fraction=0.05, max_model_len=256))  # fmt: skip
    engine.sync_weights(model, version=0)
    yield engine
    # free its memory: on CPU vLLM's memory fraction counts this whole process, so the next module's engine
    # (tests/test_vllm_engine.py) would not fit beside this one
    engine.close()


def _same(a, b) -> bool:
    names = ("input_ids", "attention_mask", "response_mask", "group", "truncated")
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in names) and a.completions == b.completions


def test_layout_groups_eos_and_truncation(sampler, tiny):
    _, tok, model = tiny
    assert isinstance(sampler, Sampler)
    n, max_new = 4, 12
    ro = sampler.generate(PROMPTS, SamplingParams(n=n, max_new_tokens=max_new, temperature=1.0, seed=5))
    b, t = ro.input_ids.shape
    assert b == 3 * n and ro.attention_mask.shape == ro.response_mask.shape == (b, t)
    assert ro.group.tolist() == [0] * n + [1] * n + [2] * n  # prompt-major
    assert ro.truncated.shape == (b,) and len(ro.completions) == b
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]  # no special tokens added
    p_len = max(len(p) for p in prompt_ids)
    assert t == p_len + int(ro.response_lengths.max())  # no column of padding only
    eos, pad = set(eos_ids(tok, model)), tok.pad_token_id
    stopped = 0
    for i in range(b):
        prompt, resp_len = prompt_ids[i // n], int(ro.response_lengths[i])
        row, att = ro.input_ids[i].tolist(), ro.attention_mask[i].tolist()
        start, end = p_len - len(prompt), p_len + resp_len
        # [left pad][prompt][response][right pad]
        assert row[:start] == [pad] * start and row[start:p_len] == prompt and row[end:] == [pad] * (t - end)
        assert att == [0] * start + [1] * (end - start) + [0] * (t - end)
        assert ro.response_mask[i].tolist() == [False] * p_len + [True] * resp_len + [False] * (t - end)
        resp = row[p_len:end]
        assert ro.completions[i] == tok.decode(resp, skip_special_tokens=True)
        assert 1 <= resp_len <= max_new and not any(x in eos for x in resp[:-1])  # stops at the first EOS
        if ro.truncated[i]:  # no EOS within max_new_tokens
            assert resp_len == max_new and resp[-1] not in eos
        else:  # the EOS is part of the response
            assert resp[-1] in eos
            stopped += 1
    assert 0 < stopped < b  # both cases occurred
    if sampler.holds_weights:  # its own log-probs of the sampled tokens, 0 elsewhere
        assert ro.engine_logp.shape == (b, t) and (ro.engine_logp[~ro.response_mask] == 0).all()
        assert (ro.engine_logp[ro.response_mask] <= 0).all()
    else:  # the policy itself: the update's forward gives the log-probs
        assert ro.engine_logp is None


def test_greedy_is_deterministic_and_draws_no_random_number(sampler):
    state = torch.get_rng_state()
    ro = sampler.generate(PROMPTS, GREEDY)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same(ro, sampler.generate(PROMPTS, GREEDY))
    assert _same(ro, sampler.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=16, greedy=True, seed=9)))
    for g in range(len(PROMPTS)):  # the n copies of a prompt are the same
        assert torch.equal(ro.input_ids[2 * g], ro.input_ids[2 * g + 1])
    assert len(set(ro.completions)) == len(PROMPTS)  # the prompts' greedy answers differ: not a constant


def test_a_seed_reproduces_the_samples_and_leaves_torchs_rng_alone(sampler):
    params = SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=11)
    torch.manual_seed(0)
    first = sampler.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # not advanced
    torch.manual_seed(1)  # another global state: the seed alone decides
    assert _same(sampler.generate(PROMPTS, params), first)
    other = sampler.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, temperature=1.0, seed=12))
    assert not torch.equal(other.input_ids, first.input_ids)
    assert len(set(first.completions[:4])) > 1  # the n samples of a prompt differ


def test_without_a_seed_sampling_follows_torchs_rng(sampler):
    """The trainer's case: torch's RNG is seeded once per process and checkpointed, so a resumed run
    samples as an uninterrupted one."""
    params = SamplingParams(n=4, max_new_tokens=12, temperature=1.0)
    torch.manual_seed(3)
    first = sampler.generate(PROMPTS, params)
    after = torch.get_rng_state()
    assert not torch.equal(after, torch.manual_seed(3).get_state())  # the sampling advanced it
    assert _same(sampler.generate(PROMPTS, params), first)  # from the same state: the same samples
    torch.manual_seed(4)
    assert not torch.equal(sampler.generate(PROMPTS, params).input_ids, first.input_ids)


def test_sync_weights_pushes_once_per_version(sampler, tiny):
    """After ``sync_weights`` the sampler samples the model's weights (greedy: ``generate``'s tokens). A sampler
    with its own copy keeps the old weights until a new version is pushed, and pushes a version once; the
    transformers sampler samples the live model and never pushes."""
    _, tok, model = tiny
    assert sampler.sync_weights(model, version=1000) is sampler.holds_weights
    assert sampler.sync_weights(model, version=1000) is False  # same version: nothing to push
    before = sampler.generate(PROMPTS, GREEDY)
    assert _same(before, generate(model, tok, PROMPTS, 2, 16, greedy=True))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():  # in place, as an optimizer step changes the policy
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        changed = generate(model, tok, PROMPTS, 2, 16, greedy=True)
        assert not torch.equal(changed.input_ids, before.input_ids)  # the change shows in greedy decoding
        stale = sampler.generate(PROMPTS, GREEDY)
        assert _same(stale, before if sampler.holds_weights else changed)
        assert sampler.sync_weights(model, version=1000) is False  # same version: still the old weights
        assert _same(sampler.generate(PROMPTS, GREEDY), stale)
        assert sampler.sync_weights(model, version=1001) is sampler.holds_weights
        assert _same(sampler.generate(PROMPTS, GREEDY), changed)
    finally:
        model.load_state_dict(saved)
        sampler.sync_weights(model, version=1002)
    assert _same(sampler.generate(PROMPTS, GREEDY), before)


def test_images_need_a_vision_language_tokenizer(sampler):
    with pytest.raises(ValueError, match="text-only"):
        sampler.generate(PROMPTS, GREEDY, images=[()] * len(PROMPTS))


# --- not per implementation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n and max_new_tokens must be >= 1"),
        (dict(max_new_tokens=0), "n and max_new_tokens must be >= 1"),
        (dict(temperature=0.0), "temperature must be > 0.*greedy=True"),
        (dict(top_p=1.5), r"top_p in \(0, 1\]"),
    ],
)
def test_sampling_params_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    assert SamplingParams(temperature=0.0, greedy=True).greedy  # greedy ignores temperature


def test_build_sampler_picks_by_name(tiny):
    _, tok, model = tiny
    s = build_sampler("hf", tok, model=model, batch_size=7)
    assert (
        isinstance(s, TransformersSampler) and s.batch_size == 7 and s.model is model and not s.holds_weights
    )
    with pytest.raises(ValueError, match="engine hf samples from a loaded model"):
        build_sampler("hf", tok)
    with pytest.raises(ValueError, match="engine vllm needs model_path"):
        build_sampler("vllm", tok, model=model)
    with pytest.raises(ValueError, match="unknown sampling engine 'sglang': one of hf, vllm"):
        build_sampler("sglang", tok, model=model)
