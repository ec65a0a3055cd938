"""Harness-side block selections used as baselines next to the policies.

* ``oracle``: per query block, the key blocks that truly hold the most dense softmax mass (needs the
  dense attention, so it is an upper bound at a given density, not a usable policy);
* ``pooled``: per query block, the top key blocks by mean-pooled q . mean-pooled k (a training-free
  local top-k in the spirit of VMoBA/MoBA, in raw token order).

Both always keep the query block's own (diagonal) block and return kernel block lists.
"""
from __future__ import annotations

import torch

from modcompile.kernels.reference import lists_from_block_mask
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


def pooled_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean-pooled q . k per block pair (fp32), ragged last block averaged over its real tokens."""
    return block_means(q, block_size) @ block_means(k, block_size).transpose(-1, -2)


def pooled_mask(q: torch.Tensor, k: torch.Tensor, block_size: int, density: float) -> torch.Tensor:
    return _topk_mask(pooled_scores(q, k, block_size), density)


def mask_to_lists(mask: torch.Tensor):
    return lists_from_block_mask(mask)


__all__ = ["oracle_mask", "pooled_mask", "pooled_scores", "mask_to_lists"]
