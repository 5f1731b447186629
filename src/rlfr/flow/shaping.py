"""Per-token flow rewards from velocity-deviation scores (docs/RLFR_METHOD.md §4).

Contract (all per sequence, over the ``valid`` tokens only; invalid positions always give 0):
- ``minmax_normalize(scores (B, T), valid (B, T) bool) -> (B, T)`` in [0, 1].
- ``shape_flow_rewards(scores, valid, beta, eta, top_k, bilateral, gamma) -> (B, T)``:
  x = minmax(scores) -> (bilateral: 2x - 1) -> sign(x) |x|^gamma -> keep x > eta (bilateral: |x| > eta)
  -> keep the top_k per sequence (bilateral: top_k // 2 largest positive and top_k // 2 most negative)
  -> r = -beta * x. Deviation is penalised; in bilateral mode tokens well inside the flow are rewarded.
  The power comes before the threshold, as in the authors' ``normalize_flow_score`` (so eta compares
  with x^gamma); it keeps the sign, where theirs raised negative bilateral values to a fractional power
  (NaN).

Ties in top-k are broken by the lower position first (stable sort), so the result is deterministic.

Departures from the authors' code (docs/RLFR_METHOD.md §8.4): the min is the true minimum (theirs took the second
smallest value); max - min below ``eps`` gives zeros instead of NaN; the bilateral mode can be switched on.
A row whose scores have no spread (max - min < eps, or fewer than two valid tokens) carries no information
and gets zero reward in both modes (in bilateral mode 2 * 0 - 1 would otherwise penalise every token).
"""

from __future__ import annotations

import torch


def _row_range(
    scores: torch.Tensor, valid: torch.Tensor, eps: float, check_finite: bool = True
) -> tuple[torch.Tensor, ...]:
    """-> (min (B, 1), max - min (B, 1), ok (B, 1) bool: the row has spread >= eps)."""
    if scores.shape != valid.shape or scores.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(
            f"scores and valid must be (B, T) (valid bool), got {tuple(scores.shape)}, "
            f"{tuple(valid.shape)} {valid.dtype}"
        )
    s = scores.float()
    if check_finite and not torch.isfinite(s[valid]).all():  # a host sync: callers on a GPU may check lazily
        raise ValueError("flow scores contain NaN or inf at valid positions")
    inf = torch.tensor(float("inf"), device=s.device)
    mn = torch.where(valid, s, inf).amin(dim=1, keepdim=True)
    mx = torch.where(valid, s, -inf).amax(dim=1, keepdim=True)
    span = mx - mn  # -inf for rows with no valid token
    ok = span >= eps
    return torch.where(ok, mn, 0.0), torch.where(ok, span, 1.0), ok


def minmax_normalize(
    scores: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6, check_finite: bool = True
) -> torch.Tensor:
    """Per-sequence min-max over valid tokens: (B, T), (B, T) bool -> (B, T) float32 in [0, 1].

    Rows with max - min < eps (or no valid token) give zeros; invalid positions are 0.
    """
    mn, span, ok = _row_range(scores, valid, eps, check_finite)
    x = (scores.float() - mn) / span
    return torch.where(valid & ok, x, 0.0)


def _topk_keep(key: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest ``key`` among ``candidates`` per row (ties: lower position first) -> (B, T) bool."""
    key = torch.where(candidates, key, -torch.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return candidates & (rank < k)


def shape_flow_rewards(
    scores: torch.Tensor,
    valid: torch.Tensor,
    beta: float = 0.01,
    eta: float = 0.6,
    top_k: int | None = 15,
    bilateral: bool = False,
    gamma: float = 1.0,
    eps: float = 1e-6,
    check_finite: bool = True,
) -> torch.Tensor:
    """Token flow rewards r = -beta * x: scores (B, T), valid (B, T) bool -> (B, T) float32.

    top_k None or <= 0 means no limit; rows with fewer survivors than k keep them all. ``check_finite``
    raises on NaN/inf scores (which costs a host sync); off, the caller checks instead.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    _, _, ok = _row_range(scores, valid, eps, check_finite)
    x = minmax_normalize(scores, valid, eps, check_finite)
    usable = valid & ok
    if bilateral:
        x = torch.where(usable, 2 * x - 1, 0.0)
    x = torch.sign(x) * x.abs().pow(gamma)
    if bilateral:
        pos, neg = usable & (x > eta), usable & (x < -eta)
    else:
        pos, neg = usable & (x > eta), torch.zeros_like(usable)
    if top_k is not None and top_k > 0:
        k = top_k // 2 if bilateral else top_k
        pos = _topk_keep(x, pos, k)
        neg = _topk_keep(-x, neg, k)
    keep = pos | neg
    return torch.where(keep, -beta * x, 0.0)
