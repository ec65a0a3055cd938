"""Block selection on pooled scores (VMoBA): global threshold, per-row threshold, top-k.

Input: ``scores`` (..., Mq, Mk), the dot products of pooled query blocks with pooled key blocks
(VMoBA scores a key block by the mean of its keys; our kernel selects per query block, so queries are
pooled too: ``mean(q) . mean(k)`` is the mean over the block's queries of ``q . mean(k)``).
Output: a bool mask (..., Mq, Mk) of kept blocks. Everything is torch ops on the scores' device:
no host synchronisation.

Normalization (how scores become the "mass" that ``tau`` is a fraction of):

* ``minmax`` (the paper's code): ``w = (s - min) / (max - min)`` over the ranked set (the whole head
  in global mode, the row in row mode); equal scores give ``w = 1`` everywhere.
* ``softmax``: ``w = softmax(scale * s)`` over the ranked set, ``scale`` the attention scale.

Threshold rule (global and row): rank the set by ``w`` descending and keep the smallest prefix whose
cumulative mass reaches ``tau`` of the set's total, i.e. keep an entry iff the mass ranked strictly
before it is ``< tau * total`` (``tau = 0`` keeps nothing but the own blocks; ties rank in sort
order). Top-k keeps the ``k`` highest scores of each row. A NaN / Inf score is always kept (with
the own block) and left out of the normalisation. A *hidden* block (``hidden``: a key block of
padding, no visible key) has no mass: it is left out of the normalisation, ranks last and is never
kept, not even as the own block or by the density floor. In every mode the own block (diagonal) is
kept and counts first; then the per-row density guard: at least ``ceil(min_density * Mk)`` and at
most ``max(1, floor(max_density * Mk))`` blocks per row, filled / trimmed by score rank.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

MODES = ("global", "row", "topk")
NORMALIZATIONS = ("minmax", "softmax")


def normalize_scores(scores: torch.Tensor, method: str, dims: tuple, scale: float = 1.0) -> torch.Tensor:
    """Non-negative weights over ``dims`` (see the module docstring), fp32."""
    s = scores.float()
    if method == "minmax":
        lo = s.amin(dim=dims, keepdim=True)
        hi = s.amax(dim=dims, keepdim=True)
        span = hi - lo
        # masked_fill with a broadcast mask: same values as where(span > 0, ..., 1), fewer launches
        return ((s - lo) / span.clamp_min(1e-30)).masked_fill_(span.gt(0).logical_not_(), 1.0)
    if method == "softmax":
        flat = (s * scale).flatten(dims[0]) if len(dims) > 1 else s * scale
        return torch.softmax(flat, dim=-1).view_as(s)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")


def threshold_prefix(weights: torch.Tensor, tau: float) -> torch.Tensor:
    """Along the last dim: keep the smallest highest-weight set whose mass reaches ``tau`` of the
    total (an entry is kept iff the mass ranked before it is < tau * total)."""
    ordered, order = weights.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered
    keep_sorted = before < tau * ordered.sum(-1, keepdim=True)
    # ``order`` is a permutation of each row: every entry is written, no zero fill needed
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)


def rank_in_row(scores: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    """0-based rank of each entry in its row by score descending, own block first."""
    s = scores.float()
    if own is not None:
        s = s.masked_fill(own, float("inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    ranks = _arange(s.shape[-1], s.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


# Per-shape constants, never evicted: CUDA graphs captured from this code (modcompile/cuda_graphs.py)
# hold their addresses.
@lru_cache(maxsize=None)
def _arange(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


@lru_cache(maxsize=None)
def _own_blocks(mq: int, mk: int, device) -> torch.Tensor:
    return torch.eye(mq, mk, dtype=torch.bool, device=device)


def own_blocks(mq: int, mk: int, device) -> torch.Tensor:
    """(Mq, Mk) bool diagonal: the own block of query block i is key block i (cached per shape and
    device: read-only)."""
    return _own_blocks(mq, mk, torch.device(device))


def select_blocks(scores: torch.Tensor, *, mode: str = "global", tau: float = 0.25,
                  normalization: str = "minmax", topk: int | None = None, density: float | None = None,
                  min_density: float = 0.0, max_density: float = 1.0, scale: float = 1.0,
                  keep_own: bool = True, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The kept-block mask (..., Mq, Mk) of ``scores`` (..., Mq, Mk); see the module docstring.

    ``topk`` mode keeps ``topk`` blocks per row, or ``ceil(density * Mk)`` when ``topk`` is None.
    ``hidden``: bool, broadcast to ``scores``: blocks of padding (their scores are ignored)."""
    if scores.dim() < 2:
        raise ValueError(f"scores must be (..., Mq, Mk), got shape {tuple(scores.shape)}")
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if not 0.0 <= min_density <= max_density <= 1.0:
        raise ValueError(f"need 0 <= min_density <= max_density <= 1, got {min_density}, {max_density}")
    mq, mk = scores.shape[-2:]
    own = own_blocks(mq, mk, scores.device) if keep_own else None
    floor = math.ceil(min_density * mk - 1e-9)
    ceiling = max(1, math.floor(max_density * mk + 1e-9))
    # A NaN / Inf score (non-finite q or k in a block) cannot be ranked: the block is kept, so the
    # attention meets the bad values as dense SDPA would, and the other scores are normalised
    # without it (it stands at the set's lowest finite score).
    bad = scores.isfinite().logical_not_()
    if hidden is not None:
        bad &= ~hidden
    out = bad if hidden is None else bad | hidden          # left out of the normalisation
    dims = (-2, -1) if mode == "global" else (-1,)
    s = scores.float()
    low = s.masked_fill(out, float("inf")).amin(dim=dims, keepdim=True)
    scores = torch.where(out, low.masked_fill_(low.isinf(), 0.0), s)
    ranked = scores if hidden is None else scores.masked_fill(hidden, float("-inf"))   # hidden: last
    # ranks cost a sort: only top-k and the density guard need them
    rank = None
    if mode == "topk" or floor > 0 or ceiling < mk:
        first = bad if own is None else own | bad if hidden is None else (own & ~hidden) | bad
        rank = rank_in_row(ranked, first)
    if mode == "topk":
        if topk is None:
            if density is None:
                raise ValueError("topk selection needs topk or density")
            topk = math.ceil(density * mk)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        keep = rank < topk
    else:
        dims = (-2, -1) if mode == "global" else (-1,)
        weights = normalize_scores(scores, normalization, dims, scale)
        if hidden is not None:  # no mass (minmax gave them 0 already; softmax did not)
            weights = weights.masked_fill(hidden, 0.0)
        if mode == "global":
            keep = threshold_prefix(weights.flatten(-2), tau).view_as(weights)
        else:
            keep = threshold_prefix(weights, tau)
    if own is not None:
        keep = keep | own
    keep = keep | bad
    if floor > 0:
        keep = keep | (rank < floor)
    if ceiling < mk:
        keep = keep & (rank < ceiling)
    return keep if hidden is None else keep & ~hidden


__all__ = ["MODES", "NORMALIZATIONS", "normalize_scores", "own_blocks", "rank_in_row", "select_blocks",
           "threshold_prefix"]
