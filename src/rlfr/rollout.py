"""Rollouts: batched sampling with Hugging Face ``generate`` and the packed layout the update uses.

Layout (``Rollout``): every sequence is ``[left padding][prompt][response][right padding]`` in one
(B, T) tensor, so all per-token tensors (log-probs, latents, rewards) share the positions of
``input_ids``. Groups are contiguous: rows ``g*n .. g*n+n-1`` are the n samples of prompt g.
A response ends at (and includes) the first EOS, or at ``max_new_tokens``.

Sampling is plain temperature / top-p sampling: the model's own generation config (top-k 50,
repetition penalty, ...) is deliberately not used, so rollouts follow the policy's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    response_mask: torch.Tensor  # (B, T) bool
    group: torch.Tensor  # (B,) long, index of the prompt in the step's prompt list
    completions: list[str]  # decoded responses (special tokens removed)
    truncated: torch.Tensor  # (B,) bool, hit max_new_tokens without EOS

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        idx = rows if isinstance(rows, slice) else rows.tolist()
        comps = self.completions[idx] if isinstance(idx, slice) else [self.completions[i] for i in idx]
        return Rollout(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.response_mask[rows],
            self.group[rows],
            comps,
            self.truncated[rows],
        )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what ``generate`` used: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token; generation would never stop")
    return sorted(ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    num_generations: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
) -> Rollout:
    """Sample ``num_generations`` responses per prompt; returns the packed layout described above."""
    eos = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    expanded = [(g, ids) for g, ids in enumerate(prompt_ids) for _ in range(num_generations)]
    responses: list[list[int]] = []
    truncated: list[bool] = []
    try:
        for start in range(0, len(expanded), batch_size):
            chunk = [ids for _, ids in expanded[start : start + batch_size]]
            width = max(len(c) for c in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, c in enumerate(chunk):
                inp[i, width - len(c) :] = torch.tensor(c)
                att[i, width - len(c) :] = 1
            out = model.generate(
                input_ids=inp.to(device), attention_mask=att.to(device), generation_config=gen_cfg
            )
            for row in out[:, width:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
                responses.append(row[:cut] if cut is not None else row)
                truncated.append(cut is None)
    finally:
        model.train(was_training)
    return pack(tokenizer, [ids for _, ids in expanded], responses, [g for g, _ in expanded], truncated)


def pack(
    tokenizer,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    group: Sequence[int],
    truncated: Sequence[bool] | None = None,
) -> Rollout:
    """Token lists -> the packed (B, T) layout (prompts left-padded, responses right-padded)."""
    pad = tokenizer.pad_token_id
    p_len = max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in responses))
    b = len(prompts)
    ids = torch.full((b, p_len + r_len), pad, dtype=torch.long)
    att = torch.zeros((b, p_len + r_len), dtype=torch.long)
    resp = torch.zeros((b, p_len + r_len), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        att[i, p_len - len(p) : p_len + len(r)] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            resp[i, p_len : p_len + len(r)] = True
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    trunc = torch.tensor(list(truncated) if truncated is not None else [False] * b, dtype=torch.bool)
    return Rollout(ids, att, resp, torch.tensor(list(group), dtype=torch.long), completions, trunc)


def policy_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    need_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the tokens of a packed batch: -> ((B, T), (B, T) or None).

    Only the logits that score response tokens are computed (``logits_to_keep``): the LM head and the
    softmax over the vocabulary dominate a small model's cost, and prompt positions need neither.
    Positions before the first response token are 0 (never valid under ``response_mask``).
    """
    from rlfr.losses import entropy_from_logits, logprobs_from_logits

    bsz, seq = input_ids.shape
    cols = response_mask.any(0).nonzero()
    first = int(cols[0]) if len(cols) else seq - 1
    keep = seq - first + 1  # logits at positions first-1 .. T-1 score tokens first .. T-1
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=keep,
    )
    logits = out.logits
    if logits.shape[1] != min(keep, seq):
        raise RuntimeError(
            f"{type(model).__name__} ignored logits_to_keep={keep}: got {logits.shape[1]} positions"
        )
    start = seq - logits.shape[1]
    pad = input_ids.new_zeros((bsz, start), dtype=torch.float32)
    logp = torch.cat([pad, logprobs_from_logits(logits, input_ids[:, start:])], 1)
    ent = None
    if need_entropy:
        ent = torch.cat([pad, entropy_from_logits(logits.detach())], 1)
    return logp, ent
