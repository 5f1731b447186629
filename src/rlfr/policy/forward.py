"""The policy's forward pass over a packed batch: per-token log-probs and entropies (and, through a
``LatentTap`` on the model, the latents) from one pass.

Alignment (the trainer and the losses of ``rlfr.rl.losses`` rely on it): every per-token tensor is (B, T)
aligned with ``input_ids``; ``logp[b, k] = log p(input_ids[b, k] | input_ids[b, :k])``, so position 0 is
never scored (0 there), and ``entropy[b, k]`` is the entropy of the distribution that produced token k.

- ``logprobs_from_logits(logits (B, T, V), input_ids (B, T)) -> (B, T)`` float32.
- ``entropy_from_logits(logits (B, T, V)) -> (B, T)`` float32.
- ``position_ids(attention_mask (B, T)) -> (B, T)``: positions that skip left padding, as ``generate`` uses.
- ``model_inputs(input_ids, attention_mask, vision=None) -> dict``: the forward's inputs. Text: the 2-D
  ``position_ids`` above. With images (``rlfr.policy.vision.VisionBatch``): the image inputs and no
  ``position_ids``, so a Qwen2.5-VL model computes its own 3-D rotary positions from the image grid (with
  left padding skipped through the attention mask, as in its ``generate``).
- ``policy_forward(model, input_ids, attention_mask, response_mask, need_entropy, vision=None) -> (logp,
  entropy)``: (B, T) float32 each, aligned with ``input_ids`` as above; only the logits that score
  response tokens are computed.
"""

from __future__ import annotations

import torch

from rlfr.policy.vision import VisionBatch, vision_inputs


def _check_logits(logits: torch.Tensor, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
    """(B, T, V), (B, T) long -> (B, T) float32 with out[:, 0] = 0 and out[:, k] = log p(ids[k] | ids[:k]).

    Computed as gather - logsumexp in float32, ``chunk_size`` rows at a time, so no (B, T, V) float32
    log-softmax is materialised at once. Differentiable.
    """
    _check_logits(logits, chunk_size)
    if input_ids.shape != logits.shape[:2]:
        raise ValueError(f"input_ids must be {tuple(logits.shape[:2])}, got {tuple(input_ids.shape)}")
    rows = []
    for start in range(0, logits.shape[0], chunk_size):
        lg = logits[start : start + chunk_size, :-1].float()
        ids = input_ids[start : start + chunk_size, 1:]
        picked = lg.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1)
        rows.append(torch.nn.functional.pad(picked, (1, 0)))
    return torch.cat(rows)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
    """(B, T, V) -> (B, T) float32: out[:, k] = H(softmax(logits[:, k - 1])), out[:, 0] = 0."""
    _check_logits(logits, chunk_size)
    rows = []
    for start in range(0, logits.shape[0], chunk_size):
        lg = logits[start : start + chunk_size, :-1].float()
        # H = logsumexp(z) - sum softmax(z) * z
        ent = torch.logsumexp(lg, dim=-1) - (torch.softmax(lg, dim=-1) * lg).sum(dim=-1)
        rows.append(torch.nn.functional.pad(ent, (1, 0)))
    return torch.cat(rows)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what ``generate`` used: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: VisionBatch | None = None
) -> dict[str, torch.Tensor]:
    """Keyword inputs of the policy's forward over a packed batch (module docstring)."""
    extra = vision_inputs(vision, input_ids)
    if extra is None:
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids(attention_mask),
        }
    return {"input_ids": input_ids, "attention_mask": attention_mask, **extra}


def policy_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    need_entropy: bool,
    vision: VisionBatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the tokens of a packed batch: -> ((B, T), (B, T) or None).

    Only the logits that score response tokens are computed (``logits_to_keep``): the LM head and the
    softmax over the vocabulary dominate a small model's cost, and prompt positions need neither.
    Positions before the first response token are 0 (never valid under ``response_mask``).
    """
    bsz, seq = input_ids.shape
    cols = response_mask.any(0).nonzero()
    first = int(cols[0]) if len(cols) else seq - 1
    keep = seq - first + 1  # logits at positions first-1 .. T-1 score tokens first .. T-1
    out = model(**model_inputs(input_ids, attention_mask, vision), use_cache=False, logits_to_keep=keep)
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
