"""``rlfr flow-pretrain`` at scale: micro-batches whose accumulated gradient is the one-shot batch's, ``max_length``
with ``overlong=truncate|drop``, and the policy forward that stops after the deepest hooked block."""

from __future__ import annotations

import json

import pytest
import torch

from rlfr.config import ConfigError, load_config
from rlfr.flow.field import FlowField
from rlfr.policy.latents import LatentTap
from rlfr.policy.rollout import Solutions
from rlfr.recipes import flow_pretrain
from rlfr.recipes.flow_pretrain import backward_step, chunks, cut_to_length, run_flow_pretrain
from rlfr.schema import FlowLatentsConfig, FlowPretrainConfig
from tiny_run import make_tiny_model_dir, make_tokenizer


def test_chunks_and_cut_to_length_by_hand():
    assert chunks([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
    assert chunks([5, 6, 7], None) == [[5, 6, 7]]
    # prompt + solution lengths 2 + 3 = 5, 1 + 6 = 7, 3 + 1 = 4 with max_length 5: only row 1 is too long
    sol = Solutions([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [1, 2, 3, 4, 5, 6], [7]])
    cut, n = cut_to_length(sol, 5, "truncate")
    assert n == 1 and cut.prompt_ids == sol.prompt_ids
    assert cut.response_ids == [[7, 8, 9], [1, 2, 3, 4], [7]]  # 5 - 1 prompt token = 4 solution tokens kept
    kept, n = cut_to_length(sol, 5, "drop")
    assert n == 1 and kept.prompt_ids == [[1, 2], [4, 5, 6]] and kept.response_ids == [[7, 8, 9], [7]]
    assert cut_to_length(sol, None, "drop") == (sol, 0) and cut_to_length(sol, 7, "drop") == (sol, 0)


def test_max_length_must_leave_room_for_a_solution_token():
    with pytest.raises(ConfigError, match="max_length=512 must exceed data.max_prompt_tokens=512"):
        load_config(FlowPretrainConfig, overrides=["max_length=512"])
    cfg = load_config(FlowPretrainConfig, overrides=["max_length=null", "micro_batch_size=2"])
    assert cfg.max_length is None and cfg.micro_batch_size == 2
    assert load_config(FlowPretrainConfig).max_length == 8192  # the authors' cutoff_len


def _keyed_loss(field, pairs, batch_mul, autocast_dtype=None):
    """The flow-matching loss of ``rlfr.flow.matching`` written out, with each pair's (t, eps) a fixed function
    of its own latents instead of fresh draws: a pair gets the same noise whichever micro-batch it is in."""
    t = torch.sigmoid(pairs.target.sum(-1) + pairs.layer)  # (N,)
    eps = torch.sin(3.0 * pairs.target + pairs.cond)  # (N, d)
    x_t = t[:, None] * pairs.target + (1 - t[:, None]) * eps
    v = field(x_t, t, pairs.cond, pairs.layer)
    return ((v - (pairs.target - eps)) ** 2).mean(-1).mean()


@pytest.fixture(scope="module")
def tiny():
    from helpers import tiny_model

    tok = make_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    g = torch.Generator().manual_seed(0)
    lengths = [
        (3, 9),
        (5, 2),
        (2, 14),
        (4, 6),
        (6, 3),
    ]  # (prompt, solution): the micro-batches' pair counts differ
    sol = Solutions(
        [torch.randint(3, len(tok), (p,), generator=g).tolist() for p, _ in lengths],
        [torch.randint(3, len(tok), (r,), generator=g).tolist() for _, r in lengths],
    )
    return tok, model, sol


def _gradient(tiny, sizes, monkeypatch, scale_by_pairs=True):
    tok, model, sol = tiny
    monkeypatch.setattr(flow_pretrain, "flow_matching_loss", _keyed_loss)
    torch.manual_seed(0)
    field = FlowField(dim=32, width=16, depth=2)
    for (
        p
    ) in field.parameters():  # away from the zero-initialised output layers, so every weight gets gradient
        torch.nn.init.normal_(p, std=0.2)
    cfg = FlowLatentsConfig(modes=("token_post", "token_pre"), batch_mul=1)
    batches, start = [], 0
    for n in sizes:
        batches.append(sol.pack(tok, list(range(start, start + n))))
        start += n
    with LatentTap(model, cfg.fractions) as tap:

        def latents_of(batch):
            return flow_pretrain._latents(model, tap, batch, "cpu")

        if scale_by_pairs:
            loss = backward_step(
                field, latents_of, batches, cfg, tap.layer_values, None, torch.Tensor.backward
            )
        else:  # the naive accumulation: each micro-batch's mean loss divided by the number of micro-batches
            loss = torch.zeros(())
            for b in batches:
                lat, mask, ctx = latents_of(b)
                pairs = flow_pretrain.build_pairs(lat, tap.layer_values, mask, cfg.modes, 1, context_mask=ctx)
                part = _keyed_loss(field, pairs, 1) / len(batches)
                part.backward()
                loss = loss + part.detach()
    return loss, torch.cat([p.grad.flatten() for p in field.parameters()])


def test_micro_batched_gradient_equals_the_one_shot_batch(tiny, monkeypatch):
    loss_one, grad_one = _gradient(tiny, [5], monkeypatch)
    assert (grad_one != 0).float().mean() > 0.9  # the check below compares real gradients, not zeros
    for sizes in ([2, 2, 1], [1, 1, 1, 1, 1], [4, 1]):
        loss, grad = _gradient(tiny, sizes, monkeypatch)
        torch.testing.assert_close(loss, loss_one, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_one, rtol=1e-4, atol=1e-6)
    # the weighting is what makes it so: averaging the micro-batches' means instead gives another gradient
    _, naive = _gradient(tiny, [2, 2, 1], monkeypatch, scale_by_pairs=False)
    assert not torch.allclose(naive, grad_one, rtol=1e-2, atol=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


def _solutions_file(path, lengths):
    rows = [{"problem": f"add {i}", "answer": str(i), "solution": "1+1=2. " * (n // 7) + "x" * (n % 7)}
            for i, n in enumerate(lengths)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, out, *extra):
    return load_config(
        FlowPretrainConfig,
        overrides=[
            f"model.name_or_path={model_dir}", f"data.train={data}", "data.eval=", "data.solution_field=solution",
            "data.max_prompt_tokens=128", "data.template=qwen_math_box", "epochs=1", "heldout_fraction=0",
            "flow.depth=2", "report_to=[]", f"out_dir={out}", *extra,
        ],
    )  # fmt: skip


def test_policy_forwards_see_at_most_micro_batch_size_sequences(model_dir, tmp_path, monkeypatch, capsys):
    # prompts of 104 tokens (qwen_math_box, character-level tokenizer), solutions of n tokens + EOS: 115 ... 355
    data = _solutions_file(tmp_path / "d.jsonl", [10, 20, 30, 40, 50, 60, 150, 250])
    seen = []
    real = flow_pretrain._latents

    def recording(policy, tap, batch, device, norm=None):
        seen.append(tuple(batch.input_ids.shape))
        return real(policy, tap, batch, device, norm)

    monkeypatch.setattr(flow_pretrain, "_latents", recording)
    res = run_flow_pretrain(
        _cfg(model_dir, data, tmp_path / "a", "batch_size=4", "micro_batch_size=3", "max_length=200"),
        progress=False,
    )
    # 8 rows, 2 steps of 4 sequences in micro-batches of 3 + 1; the statistics: 8 rows in micro-batches 3, 3, 2
    assert res.steps == 2 and [s[0] for s in seen] == [3, 3, 2, 3, 1, 3, 1]
    assert max(s[1] for s in seen) == 200  # the two longest rows were cut to max_length
    assert (
        res.overlong_rows == 2
        and "2 of 8 rows are longer than max_length=200: truncated" in capsys.readouterr().out
    )
    seen.clear()
    res = run_flow_pretrain(
        _cfg(model_dir, data, tmp_path / "b", "batch_size=3", "max_length=200", "overlong=drop"),
        progress=False,
    )
    assert res.overlong_rows == 2 and res.steps == 2  # 6 rows left: 2 steps of 3, each in one forward
    assert [s[0] for s in seen] == [6, 3, 3] and max(s[1] for s in seen) <= 200
    assert "2 of 8 rows are longer than max_length=200: dropped" in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"4 training sequences \(4 rows over max_length dropped\) < batch_size=6"
    ):
        run_flow_pretrain(
            _cfg(model_dir, data, tmp_path / "c", "batch_size=6", "max_length=150", "overlong=drop"),
            progress=False,
        )
