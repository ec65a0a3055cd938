"""Harness-side block selections used as baselines next to the policies.

* ``oracle``: per query block, the key blocks that truly hold the most dense softmax mass (needs the
  dense attention, so it is an upper bound at a given density, not a usable policy);
* ``oracle_budget``: the blocks of largest true mass over all heads at a total block budget (the
  matched-density comparison: its density equals a policy's to half a block, its recall is an
  upper bound at that density);
* ``pooled``: per query block, the top key blocks by mean-pooled q . mean-pooled k (a training-free
  local top-k in the spirit of VMoBA/MoBA, in raw token order).

Both always keep the query block's own (diagonal) block and return bool block masks
(``BlockLists.from_mask`` turns one into kernel lists).
"""
from __future__ import annotations

import torch

from modcompile.policies.base import block_means


def _topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    B, H, mq, mk = scores.shape
    k = max(1, min(mk, round(density * mk)))
    scores = scores.clone().float()
    diag = torch.arange(min(mq, mk), device=scores.device)
    scores[:, :, diag, diag] = float("inf")  # own block first
    idx = scores.topk(k, dim=-1).indices
    mask = torch.zeros(B, H, mq, mk, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, True)


def oracle_mask(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Top blocks by true block mass ``[B, H, Mq, Mk]`` (from metrics.block_attention_mass)."""
    return _topk_mask(mass, density)


def oracle_budget_mask(mass: torch.Tensor, density: float) -> torch.Tensor:
    """The truly densest blocks at a block budget: the ``round(density * B*H*Mq*Mk)`` blocks of largest
    true mass over all (batch, head) maps together, own blocks first. Every map's mass sums to its
    query count, so no mask with as many blocks (own blocks included) keeps more mass: an upper bound
    on recall at that density, whatever the per-head or per-row split a policy picks."""
    B, H, mq, mk = mass.shape
    own = min(mq, mk)
    total = min(mass.numel(), max(B * H * own, round(density * mass.numel())))
    scores = mass.clone().float()
    diag = torch.arange(own, device=mass.device)
    scores[:, :, diag, diag] = float("inf")
    idx = scores.reshape(-1).topk(total).indices
    flat = torch.zeros(mass.numel(), dtype=torch.bool, device=mass.device)
    return flat.scatter_(0, idx, True).view(B, H, mq, mk)


def pooled_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean-pooled q . k per block pair (fp32), ragged last block averaged over its real tokens."""
    return block_means(q, block_size) @ block_means(k, block_size).transpose(-1, -2)


def pooled_mask(q: torch.Tensor, k: torch.Tensor, block_size: int, density: float) -> torch.Tensor:
    return _topk_mask(pooled_scores(q, k, block_size), density)


__all__ = ["oracle_mask", "oracle_budget_mask", "pooled_mask", "pooled_scores"]
