"""Latents and log-probs captured during ``generate`` (``rlfr.policy.capture``) equal those of one forward over the
packed rollout, to float tolerance, with left padding (prompts of different lengths, chunks that pad differently
from the packed layout), responses that stop at an EOS and truncated ones; capturing leaves the samples unchanged.

Tolerance (float32). KV-cached decoding attends with a cache and one query, another matmul shape than the full
forward's and so another summation order, and a chunk's left padding differs from the packed layout's: the results
agree to rounding, not bit for bit. A latent may differ by 1e-5 of the largest component of its token's vector
(float32 keeps 24 bits, about 6e-8 relative, and the differences build up over the blocks; measured here: 4e-6 of
latents up to about 120 in size, i.e. 2e-4 absolute); a log-prob by 1e-4 (measured 1e-5)."""

from __future__ import annotations

import pytest
import torch

from rlfr.flow import FlowField, token_scores
from rlfr.policy.forward import policy_forward
from rlfr.policy.latents import LatentTap
from rlfr.policy.rollout import generate
from rlfr.policy.sampler import SamplingParams, TransformersSampler, build_sampler
from tiny_run import make_tiny_model_dir

TOL = dict(atol=1e-4, rtol=1e-4)


def assert_latents_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """got, ref: (L, N, d): |got - ref| <= 1e-5 of each vector's largest component (module docstring)."""
    scale = ref.abs().amax(-1, keepdim=True)
    worst = ((got - ref).abs() / scale.clamp(min=1e-6)).max()
    assert worst <= 1e-5, f"latents differ by {worst:.2e} of their scale"


PROMPTS = ["<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", "Hi", "7*8=?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-block random Llama with wide weights (greedy decoding is not one repeated token) whose EOS ids include
    the digits 0-4, so 12-token responses hold both stopped and truncated rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model_dir(tmp_path_factory.mktemp("capture") / "m", initializer_range=0.3, hidden_size=64,
                               intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, *tok.convert_tokens_to_ids(list("01234"))]
    return tok, model


def full_forward(model, ro, fractions=(0.25, 0.5, 0.75)):
    """The reference: one forward over the packed rollout -> (latents (L, B, T, d), logp (B, T))."""
    with LatentTap(model, fractions) as tap, torch.no_grad():
        logp, _ = policy_forward(model, ro.input_ids, ro.attention_mask, ro.response_mask, need_entropy=False)
        return tap.latents(), logp


@pytest.mark.parametrize("params", [SamplingParams(n=3, max_new_tokens=12, temperature=1.0, seed=5),
                                    SamplingParams(n=2, max_new_tokens=12, greedy=True)], ids=["sampled", "greedy"])  # fmt: skip
def test_captured_latents_and_logprobs_equal_a_full_forward(tiny, params):
    tok, model = tiny
    with LatentTap(model) as tap:
        # 4 sequences per generate call: chunks straddle prompts and pad to their own longest prompt
        ro = TransformersSampler(model, tok, batch_size=4, capture=tap).generate(PROMPTS, params)
        plain = TransformersSampler(model, tok, batch_size=4).generate(PROMPTS, params)
    assert plain.captured is None and ro.completions == plain.completions
    assert torch.equal(ro.input_ids, plain.input_ids) and torch.equal(ro.response_mask, plain.response_mask)
    lens = ro.response_lengths
    if (
        not params.greedy
    ):  # sampled: EOS-stopped and truncated rows (greedy decoding of this model never stops)
        assert ro.truncated.any() and (~ro.truncated).any() and (lens < 12).any()
    assert ro.attention_mask[:, 0].eq(0).any()  # left padding in the packed layout
    ref_lat, ref_logp = full_forward(model, ro)
    real = ro.attention_mask.bool()
    cap = ro.captured
    assert cap.latents.shape == ref_lat.shape and torch.equal(cap.layer_values, torch.tensor([1, 2, 3]) / 4)
    assert_latents_close(cap.latents[:, real], ref_lat[:, real])
    assert (cap.latents[:, ~real] == 0).all()  # padding holds nothing
    resp = ro.response_mask
    torch.testing.assert_close(cap.logp[resp], ref_logp[resp], **TOL)
    assert (cap.logp[~resp] == 0).all() and (cap.logp[resp] < 0).all()
    # the EOS token that ends a stopped row has its latent (the final cached step) and its log-prob
    last = [int(resp[i].nonzero().max()) for i in range(len(lens))]
    stopped = [i for i in range(len(lens)) if not ro.truncated[i]]
    for i in stopped:
        assert_latents_close(cap.latents[:, i, last[i] : last[i] + 1], ref_lat[:, i, last[i] : last[i] + 1])
    # and flow scores of the two agree for the same noise
    field = FlowField(dim=64, width=32, depth=2)
    for p in field.parameters():  # a non-zero field, so the velocities depend on the latents
        torch.nn.init.normal_(p, std=0.1)
    scores = [token_scores(field, lat, cap.layer_values, resp, context_mask=real,
                           generator=torch.Generator().manual_seed(0)).scores for lat in (cap.latents, ref_lat)]  # fmt: skip
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


def test_selected_and_moved_rollouts_keep_their_captures(tiny):
    tok, model = tiny
    with LatentTap(model, (0.5,)) as tap:
        ro = generate(model, tok, PROMPTS[:2], num_generations=2, max_new_tokens=6, greedy=True, capture=tap)
    part = ro.select(torch.tensor([3, 0])).to("cpu")
    assert torch.equal(part.captured.latents, ro.captured.latents[:, [3, 0]])
    assert torch.equal(part.captured.logp, ro.captured.logp[[3, 0]]) and part.captured.latents.shape[0] == 1


def test_the_tap_records_one_capture_per_forward_and_refuses_inside_paused(tiny):
    tok, model = tiny
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with LatentTap(model, (0.25, 0.75)) as tap:
        with tap.recording() as steps, torch.no_grad():
            model(input_ids=ids)
            model(input_ids=ids[:, :1])
        assert [tuple(s.shape) for s in steps] == [(2, 2, 3, 64), (2, 2, 1, 64)]
        with tap.paused(), pytest.raises(RuntimeError, match="inside paused"):
            with tap.recording():
                pass
        with torch.no_grad():
            model(input_ids=ids)  # outside recording: the usual one capture
        assert tap.latents().shape == (2, 2, 3, 64)


def test_engines_that_cannot_capture_refuse(tiny):
    tok, model = tiny
    with LatentTap(model) as tap, pytest.raises(ValueError, match="cannot capture latents"):
        build_sampler("vllm", tok, model=model, capture=tap)
