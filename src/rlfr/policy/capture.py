"""Latents and log-probs captured while ``generate`` samples, so that scoring a rollout with the flow needs no
second policy forward (``rlfr select``; ``benchmarks/select_scoring.py`` measures what it saves).

    tap = LatentTap(model, fractions)
    ro = generate(model, tok, prompts, n, max_new_tokens, capture=tap)    # or TransformersSampler(..., capture=tap)
    ro.captured.latents      # (L, B, T, d): the tapped blocks' outputs at every prompt and response position
    ro.captured.logp         # (B, T) float32: log p(token k | tokens < k) at response positions, 0 elsewhere

Both are in the packed layout of the ``Rollout`` (``rlfr.policy.rollout``), so they stand in for the tap's
latents and ``rlfr.policy.forward.policy_forward``'s log-probs of a forward over ``ro.input_ids``.

How. ``generate`` runs the model once over each chunk's prompts (the prefill) and then once per new token (a
decode step with the KV cache, fed the token sampled last). Under ``LatentTap.recording()`` every forward's
block outputs are kept: the prefill gives the prompt positions, decode step j the position of response token
j - 1. The last sampled token is never fed back, so one more cached step (``final_step``) is run on it: its
latents (an EOS is a flow target too) and its log-prob. The log-prob of a response token comes from the logits
of the forward before it (a forward hook keeps that forward's log-softmax until the next forward's pre-hook
reads which token was fed): the policy's raw logits, before temperature or top-p, like ``policy_forward``'s.

Tolerance. KV-cached decoding is not bit-identical to one forward over the packed sequence: attention over a
cache of keys and one query is another matmul shape, hence another summation order, and the prompt's left
padding differs (a chunk pads to its longest prompt, the packed layout to the longest of all). The values agree
to float rounding: ``tests/test_capture.py`` checks, in float32, latents to 1e-5 of the largest component of each
token's vector and log-probs to 1e-4 (measured on a tiny model: 4e-6 and 1e-5). In bfloat16 (8 bits of mantissa)
expect differences around 1e-2 of the scale.

Text-only policies: a vision-language model's rotary positions come from its image grid, which the final step
would have to recompute; capture refuses images.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rlfr.policy.latents import LatentTap


@dataclass
class Captured:
    """latents: (L, B, T, d) in the model's dtype (0 at padding); layer_values: (L,) float32 (the tap's); logp:
    (B, T) float32, 0 outside the response."""

    latents: torch.Tensor
    layer_values: torch.Tensor
    logp: torch.Tensor

    def select(self, rows: torch.Tensor | slice) -> Captured:
        return Captured(self.latents[:, rows], self.layer_values, self.logp[rows])

    def to(self, device) -> Captured:
        return Captured(self.latents.to(device), self.layer_values, self.logp.to(device))


@dataclass
class RowCapture:
    """One sequence: latents (L, prompt + response, d) of its real tokens and logp (response,)."""

    latents: torch.Tensor
    logp: torch.Tensor


class _LogProbs:
    """Forward hooks on the model: the log-prob of each fed token under the previous forward's last logits."""

    def __init__(self, model: nn.Module):
        self.pending: torch.Tensor | None = None  # (b, V) log-softmax of the latest forward's last position
        self.steps: list[torch.Tensor] = []  # (b,) per forward after the first
        self.handles = [model.register_forward_pre_hook(self._fed, with_kwargs=True),
                        model.register_forward_hook(self._logits)]  # fmt: skip

    def _fed(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, ids[:, -1:].to(self.pending.device))[:, 0])
            self.pending = None

    def _logits(self, module, args, output) -> None:
        self.pending = torch.log_softmax(output.logits[:, -1].float(), dim=-1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _cache_of(out) -> tuple[str, object]:
    """(keyword, cache) of a ``generate`` output: ``cache`` in transformers 5, ``past_key_values`` before."""
    for name in ("cache", "past_key_values"):
        if getattr(out, name, None) is not None:
            return name, getattr(out, name)
    raise RuntimeError("generate returned no KV cache (use_cache=True is needed to capture latents)")


@torch.no_grad()
def final_step(model: nn.Module, out, attention_mask: torch.Tensor) -> None:
    """One cached forward on the last sampled token of ``out`` (a ``generate`` output with its cache):
    attention_mask (b, prompt width) -> nothing (the hooks record it)."""
    seqs = out.sequences
    new = seqs.shape[1] - attention_mask.shape[1]
    full = torch.cat([attention_mask, attention_mask.new_ones((seqs.shape[0], new))], 1)
    name, cache = _cache_of(out)
    params = inspect.signature(model.forward).parameters
    key = name if name in params else ("cache" if "cache" in params else "past_key_values")
    model(input_ids=seqs[:, -1:], attention_mask=full, position_ids=(full.cumsum(-1) - 1)[:, -1:],
          use_cache=True, logits_to_keep=1, **{key: cache})  # fmt: skip


@contextlib.contextmanager
def recording(model: nn.Module, tap: LatentTap) -> Iterator[tuple[list[torch.Tensor], _LogProbs]]:
    """Inside: every forward's latents (``tap.recording()``) and the fed tokens' log-probs."""
    logps = _LogProbs(model)
    try:
        with tap.recording() as steps:
            yield steps, logps
    finally:
        logps.remove()


def generate_captured(
    model: nn.Module, tap: LatentTap, input_ids, attention_mask, generation_config, **extra
):
    """``model.generate`` on one left-padded chunk, recording -> (sequences (b, width + m), per-forward latents,
    (b, m) log-probs of the m new tokens)."""
    config = copy.copy(generation_config)
    config.return_dict_in_generate = True  # for the KV cache of the final step
    with recording(model, tap) as (steps, logps):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra
        )
        final_step(model, out, attention_mask)
    m = out.sequences.shape[1] - input_ids.shape[1]
    if len(steps) != m + 1 or len(logps.steps) != m:
        raise RuntimeError(
            f"capture expected {m + 1} forwards for {m} new tokens (prefill, one per decode step, the final step), "
            f"saw {len(steps)}: this generate does not decode one token per forward"
        )
    return out.sequences, steps, torch.stack(logps.steps, 1)


def chunk_rows(
    steps: Sequence[torch.Tensor],
    logp: torch.Tensor,
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
) -> list[RowCapture]:
    """Per row of a chunk: its prompt positions from the prefill (steps[0]: (L, b, width, d), left-padded) and its
    response positions from the decode steps (steps[1:], each (L, b, 1, d): the token fed at step j is response
    token j - 1); logp (b, m)."""
    prefill, width = steps[0], steps[0].shape[2]
    decoded = torch.cat(list(steps[1:]), 2)  # (L, b, m, d)
    return [
        RowCapture(torch.cat([prefill[:, i, width - p :], decoded[:, i, :r]], 1), logp[i, :r])
        for i, (p, r) in enumerate(zip(prompt_lens, response_lens))
    ]


def assemble(rows: Sequence[RowCapture], prompt_lens: Sequence[int], tap: LatentTap) -> Captured:
    """Rows -> ``Captured`` in the packed layout of ``rlfr.policy.rollout.pack`` for the same prompts and
    responses: prompts left-padded to the longest, responses right-padded to the longest (at least 1)."""
    p_len = max(prompt_lens)
    r_lens = [r.logp.shape[0] for r in rows]
    width = p_len + max(1, max(r_lens))
    first = rows[0].latents
    lat = first.new_zeros((first.shape[0], len(rows), width, first.shape[2]))
    logp = torch.zeros((len(rows), width), dtype=torch.float32, device=first.device)
    for i, (row, p, r) in enumerate(zip(rows, prompt_lens, r_lens)):
        lat[:, i, p_len - p : p_len + r] = row.latents
        logp[i, p_len : p_len + r] = row.logp
    return Captured(lat, tap.layer_values, logp)
