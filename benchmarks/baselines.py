"""Block masks of the peer methods at a given density, for the equal-density fidelity level.

Every method here ranks the (query block, key block) pairs of one attention call by a score and
keeps the best ``budget`` pairs, the query block's own block always first; so every method spends
exactly the same number of blocks at a given density and differs only in *which* blocks it keeps.
Masks are bool ``(B, H, Mq, Mk)`` in raw token order (raster ``t, h, w``, the DiT's patch order);
``BlockLists.from_mask`` turns one into kernel lists.

* ``oracle``: the blocks of largest true softmax mass of this very call, one budget over all heads
  of the layer together: no mask with as many blocks keeps more mass;
* ``sta``: a static 3D window (sliding-tile-like): key blocks ranked by how far their tokens lie
  from the query block's in time, height and width, each axis measured in units of its extent;
* ``radial``: a static energy-decay mask (Radial-attention-like): within-frame band around the
  diagonal whose width halves each time the frame distance doubles;
* ``svg``: per head and call, the better of a spatial mask (same and nearby frames first) and a
  temporal mask (same spatial rows in every frame first), chosen on a few sampled query rows by
  the error of their attention output against dense attention (Sparse-VideoGen-like profiling).

These are the harness's reading of the published ideas at our block granularity, not ports of the
papers' kernels (which permute tokens into tiles); static ones ignore q and k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from modcompile.kernels.block_lists import num_blocks

from .metrics import block_attention_mass

METHODS = ("oracle", "sta", "radial", "svg")


# ---------------------------------------------------------------- block geometry
@dataclass(frozen=True)
class BlockGeometry:
    """Per kernel block, the range of its tokens' coordinates on the (T, H, W) grid."""

    grid: tuple
    block_size: int
    lo: torch.Tensor        # (nb, 3) smallest t, h, w of the block's tokens
    hi: torch.Tensor        # (nb, 3) largest
    s_lo: torch.Tensor      # (nb,) smallest within-frame index h * W + w
    s_hi: torch.Tensor      # (nb,) largest

    @property
    def nb(self) -> int:
        return self.lo.shape[0]

    def axis_gaps(self) -> torch.Tensor:
        """(nb, nb, 3) distance between the coordinate ranges of two blocks per axis (0: overlap)."""
        lo_q, hi_q = self.lo[:, None], self.hi[:, None]
        lo_k, hi_k = self.lo[None], self.hi[None]
        return torch.clamp(torch.maximum(lo_k - hi_q, lo_q - hi_k), min=0)

    def spatial_gap(self) -> torch.Tensor:
        """(nb, nb) distance between the within-frame index ranges (0: overlap)."""
        return torch.clamp(torch.maximum(self.s_lo[None] - self.s_hi[:, None], self.s_lo[:, None] - self.s_hi[None]),
                           min=0)


@lru_cache(maxsize=16)
def block_geometry(grid: tuple, block_size: int) -> BlockGeometry:
    T, H, W = (int(g) for g in grid)
    n = T * H * W
    idx = torch.arange(n)
    coords = torch.stack([idx // (H * W), (idx // W) % H, idx % W], 1).float()  # (n, 3)
    within = (idx % (H * W)).float()
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    if pad:  # a ragged last block: repeat its last token (ranges unchanged)
        coords = torch.cat([coords, coords[-1:].expand(pad, 3)])
        within = torch.cat([within, within[-1:].expand(pad)])
    coords = coords.view(nb, block_size, 3)
    within = within.view(nb, block_size)
    return BlockGeometry((T, H, W), block_size, coords.amin(1), coords.amax(1), within.amin(1), within.amax(1))


# ---------------------------------------------------------------- selection at a budget
def budget_per_head(mq: int, mk: int, density: float) -> int:
    """Blocks one head keeps at ``density``: round(density * Mq * Mk), at least its own blocks."""
    return min(mq * mk, max(min(mq, mk), round(density * mq * mk)))


def top_budget_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Per (batch, head): the ``budget_per_head`` pairs of highest score, own blocks first.
    ``scores`` (B, H, Mq, Mk) or (Mq, Mk) (one map for every head); ties go to the lower index."""
    mq, mk = scores.shape[-2:]
    s = scores.float().clone()
    diag = torch.arange(min(mq, mk), device=s.device)
    s[..., diag, diag] = float("inf")
    keep = budget_per_head(mq, mk, density)
    # a stable order: ties keep raster order of (query block, key block)
    order = torch.sort(s.flatten(-2), dim=-1, descending=True, stable=True).indices[..., :keep]
    mask = torch.zeros(*s.shape[:-2], mq * mk, dtype=torch.bool, device=s.device)
    return mask.scatter_(-1, order, True).view(s.shape)


def oracle_mask(mass: torch.Tensor, density: float | None = None, *, blocks: int | None = None) -> torch.Tensor:
    """The pairs of largest true mass ``(B, H, Mq, Mk)`` over all heads of the call together, own
    blocks first: ``blocks`` pairs in all, or as many as :func:`top_budget_mask` gives every head at
    ``density``. The mean recall over heads is the kept share of the total mass (every head's mass
    sums to its query count), so no mask with as many blocks, own blocks included, has a higher one."""
    B, H, mq, mk = mass.shape
    s = mass.float().clone()
    diag = torch.arange(min(mq, mk), device=s.device)
    s[..., diag, diag] = float("inf")
    keep = B * H * budget_per_head(mq, mk, density) if blocks is None else min(int(blocks), s.numel())
    order = torch.sort(s.flatten(), descending=True, stable=True).indices[:keep]
    return torch.zeros(s.numel(), dtype=torch.bool, device=s.device).scatter_(0, order, True).view(s.shape)


# ---------------------------------------------------------------- static scores
def sta_scores(geom: BlockGeometry) -> torch.Tensor:
    """(nb, nb): a 3D window that grows with the budget; each axis in units of the grid extent, so
    the window keeps the grid's aspect (ties: the smaller summed distance first)."""
    extent = torch.tensor(geom.grid, dtype=torch.float32)
    gaps = geom.axis_gaps() / extent
    return -(gaps.amax(-1) + 1e-3 * gaps.sum(-1))


def radial_scores(geom: BlockGeometry) -> torch.Tensor:
    """(nb, nb): the within-frame distance to the diagonal, scaled by 2^floor(log2(frame distance)),
    so the kept band halves in width each time the frame distance doubles (ties: nearer frames)."""
    dt = geom.axis_gaps()[..., 0]
    octave = torch.floor(torch.log2(dt.clamp(min=1.0)))
    return -(geom.spatial_gap() * torch.exp2(octave) + 1e-3 * dt)


def spatial_scores(geom: BlockGeometry) -> torch.Tensor:
    """(nb, nb): same frame first, then nearer frames; within a frame distance, nearer rows."""
    gaps = geom.axis_gaps()
    return -(gaps[..., 0] * (geom.grid[1] * geom.grid[2] + 1) + geom.spatial_gap())


def temporal_scores(geom: BlockGeometry) -> torch.Tensor:
    """(nb, nb): the same within-frame positions in every frame first, then nearer positions."""
    gaps = geom.axis_gaps()
    return -(geom.spatial_gap() * (geom.grid[0] + 1) + gaps[..., 0])


def static_mask(method: str, geom: BlockGeometry, batch: int, heads: int, density: float, device) -> torch.Tensor:
    """The method's one map for every (batch, head), built once per geometry, density and device."""
    return _static_map(method, geom.grid, geom.block_size, density, torch.device(device)).expand(
        batch, heads, geom.nb, geom.nb)


@lru_cache(maxsize=64)
def _static_map(method: str, grid: tuple, block_size: int, density: float, device: torch.device) -> torch.Tensor:
    scores = STATIC_SCORES[method](block_geometry(grid, block_size))
    return top_budget_mask(scores, density).to(device)


STATIC_SCORES = {"sta": sta_scores, "radial": radial_scores, "spatial": spatial_scores, "temporal": temporal_scores}


# ---------------------------------------------------------------- SVG: per-head choice
def _sampled_rows(n: int, rows: int, device) -> torch.Tensor:
    step = max(1, n // rows)
    return torch.arange(step // 2, n, step, device=device)[:rows]


def _masked_output(q_rows, k, v, token_mask, scale):
    s = torch.matmul(q_rows, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v)


def svg_mask(q, k, v, geom: BlockGeometry, density: float, *, rows: int = 64, return_choice: bool = False):
    """Per (batch, head): the spatial or the temporal mask at ``density``, whichever gives the
    smaller output error on ``rows`` evenly spaced query rows (exact attention on those rows)."""
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D)
    candidates = [_static_map(kind, geom.grid, geom.block_size, density, q.device) for kind in ("spatial", "temporal")]
    r = _sampled_rows(N, rows, q.device)
    qr, kf, vf = q[:, :, r].float(), k.float(), v.float()
    dense = _masked_output(qr, kf, vf, torch.ones(1, dtype=torch.bool, device=q.device), scale)
    key_block = torch.arange(N, device=q.device) // geom.block_size
    errors = []
    for cand in candidates:
        token_mask = cand[r // geom.block_size][:, key_block]  # (R, N)
        out = _masked_output(qr, kf, vf, token_mask, scale)
        errors.append(((out - dense) ** 2).mean((-1, -2)))  # (B, H)
    temporal = errors[1] < errors[0]
    mask = torch.where(temporal[..., None, None], candidates[1], candidates[0])
    return (mask, temporal) if return_choice else mask


# ---------------------------------------------------------------- one entry point
def method_mask(method: str, q, k, v, grid: tuple, block_size: int, density: float) -> torch.Tensor:
    """The bool block mask ``(B, H, Mq, Mk)`` of ``method`` for this call at ``density``."""
    B, H, N, _ = q.shape
    geom = block_geometry(tuple(grid), block_size)
    if geom.nb != num_blocks(N, block_size):
        raise ValueError(f"baselines: grid {grid} has {geom.nb} blocks of {block_size}, the call "
                         f"{num_blocks(N, block_size)} (joint text tokens are not supported here)")
    if method == "oracle":
        return oracle_mask(block_attention_mass(q, k, block_size), density)
    if method in ("sta", "radial"):
        return static_mask(method, geom, B, H, density, q.device)
    if method == "svg":
        return svg_mask(q, k, v, geom, density)
    raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")


__all__ = ["METHODS", "BlockGeometry", "block_geometry", "budget_per_head", "top_budget_mask", "sta_scores",
           "radial_scores", "oracle_mask", "spatial_scores", "temporal_scores", "static_mask", "svg_mask", "method_mask"]
