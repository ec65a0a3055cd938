"""MOD's observation: the block sparsity and mass maps of a call, the tail that fits it and builds the
mask, and the kept share of a sparse refresh (measured by a full one, estimated by a cheap one).
Pure functions of their tensors (no policy state): :class:`.mod.ModPolicy` decides when they run
and keeps what they return.

Cost of an observation: the map kernel (a cheap refresh's restricted map visits, per group of query
blocks, the union of their lists: at most the full map's work), the coverage estimate (sparse
refreshes), then :func:`observe_tail`: merge, fit, extrapolation, mask and block lists, dozens of
small kernels on (H, nb, nb) maps. On CUDA the tail is replayed from a CUDA graph per (geometry,
batch, heads, kind), shared by all sites and CFG passes of that shape (first call eager, second
captures; ``MODCOMPILE_CUDA_GRAPHS=0`` keeps it eager); its inputs and outputs are copied in and out,
so the state holds ordinary tensors. No observation waits for the host.

Observation reads the maps from every ``config.observe_row_stride``-th query row of each block: by
default every row (the exact maps). Sampled rows cost less but misjudge heads whose rows attend
different key blocks: on the GPU testbed 8 rows per block put the mask's kept mass at 0.35-0.43
where it predicted 0.9 (BENCHMARKS.md section 8). Sampled rows are always the same ones (phase 0,
:func:`..kernels.block_sparsity.sampled_rows`): the fit extrapolates the difference of the last
two fits, and rotating rows would put sampling noise into that difference.
"""
from __future__ import annotations

import functools

import torch

from .. import dispatch
from ..kernels.block_lists import lists_from_mask, num_blocks
from .base import block_means, block_token_counts, masked_block_means
from .mod_fit import FitGeometry
from .mod_mask import predict_mask, uses_count_map

# The restricted map's value for blocks it did not compute (a fraction is never negative).
NOT_OBSERVED = -1.0


def observe_map(q, k, lse, *, block_size, threshold, scale, kv_counts=None, kv_indices=None,
                row_stride: int = 1, row_phase: int = 0, key_bias=None, with_mass: bool = False,
                with_count: bool = True):
    """Block sparsity map (B, H, Mq, Mk): Triton on CUDA / interpreter, torch reference otherwise;
    ``with_mass``: ``(map, mass map)``, the second the blocks' attention mass (the same kernel pass;
    ``with_count=False``: ``(None, mass map)``, the mass alone, without the map's per-score work);
    with block lists only the listed blocks are written, the others are ``NOT_OBSERVED`` (-1), so
    that NaN keeps one meaning: a tile with NaN probabilities (non-finite q, k or lse).
    ``row_stride > 1`` estimates it from every ``row_stride``-th query row of each block, from
    ``row_phase`` on. ``key_bias`` (B, Nk): a hidden key has probability 0 (sparse)."""
    from ..kernels.block_sparsity import block_mass, block_mass_ref, block_sparsity, block_sparsity_ref
    triton = dispatch.use_triton(q)
    sampling = dict(block_size=block_size, scale=scale, kv_counts=kv_counts, kv_indices=kv_indices,
                    row_stride=row_stride, row_phase=row_phase, fill=NOT_OBSERVED, key_bias=key_bias)
    if not with_count:
        if not with_mass:
            raise ValueError("observe_map: with_count=False needs with_mass=True")
        return None, (block_mass if triton else block_mass_ref)(q, k, lse, **sampling)
    mass = None
    if with_mass:
        B, H, n, _ = q.shape
        mass = torch.full((B, H, num_blocks(n, block_size), num_blocks(k.shape[2], block_size)), NOT_OBSERVED,
                          dtype=torch.float32, device=q.device)
    smap = (block_sparsity if triton else block_sparsity_ref)(q, k, lse, threshold=threshold, mass=mass, **sampling)
    return (smap, mass) if with_mass else smap



def observe_tail(fg: FitGeometry, config, batch: int, cheap: bool, build: bool, *inputs):
    """Everything an observation does after its map kernel, on device, as a pure function of its
    tensor inputs (static shapes, no host sync, no state): replayable from a CUDA graph.

    ``inputs``: ``raw`` (B, H, nb, nb), the observed sparsity map, when the mask rule reads it
    (:func:`.mod_mask.uses_count_map`), then ``raw_mass``, its mass map; cheap (a restricted map)
    then the old maps (the same ones); with ``build`` and the count map, then the previous
    coefficients and the (step gap, (T+1)/2) device tensor of
    :meth:`.mod.ModPolicy._extrapolation_inputs`. Entries the restricted map did not compute
    (``NOT_OBSERVED``) keep the old maps' values (a skipped block keeps its last observed mass). NaN
    entries (tiles with NaN probabilities: non-finite inputs) are never fitted: they keep the old
    map's value in a cheap refresh and count as dense (sparsity 0, mass 1: kept) otherwise, so one
    bad input does not make the predictor NaN for the rest of the run. The count map is fitted and
    the coefficients extrapolated as :func:`.mod_mask.extrapolate` does; with ``build`` the mask is
    predicted and its block lists built for ``batch``.
    Returns ``(smap, mmap, coef)`` (with the count map) or ``(mmap,)``, and with ``build`` then
    ``(mask, lines, keep_frame, predicted_coverage, counts (batch, H, nb), indices (batch, H, nb, nb))``."""
    counted = uses_count_map(config)
    rest = list(inputs)
    raw = rest.pop(0) if counted else None
    raw_mass = rest.pop(0)
    if cheap:
        # The policy's lists are the same for every batch entry: unobserved entries are -1 in all.
        def merged(new, old):
            fresh = new.mean(0) if new.shape[0] > 1 else new[0]
            return torch.where(fresh.isnan() | (fresh < 0), old, fresh)
        smap = merged(raw, rest.pop(0)) if counted else None
        mmap = merged(raw_mass, rest.pop(0))
    else:
        smap = raw.mean(0).nan_to_num(nan=0.0) if counted else None
        mmap = raw_mass.mean(0).nan_to_num(nan=1.0)
    if not counted:
        if not build:
            return (mmap,)
        mask, lines, keep_frame, coverage = predict_mask(None, fg, config, None, mmap)
        return (mmap, mask, lines, keep_frame, coverage) + _batch_lists(mask, batch)
    coef = fg.solve(smap)
    if not build:
        return smap, mmap, coef
    coef_prev, steps = rest
    slope = (coef - coef_prev) / steps[0]
    mask, lines, keep_frame, coverage = predict_mask(coef + slope * steps[1], fg, config, smap, mmap)
    return (smap, mmap, coef, mask, lines, keep_frame, coverage) + _batch_lists(mask, batch)


def _batch_lists(mask: torch.Tensor, batch: int) -> tuple:
    """The mask's block lists (counts (batch, H, nb), indices (batch, H, nb, nb)), one copy per batch entry."""
    counts, indices = lists_from_mask(mask)
    H, nb = counts.shape
    return counts.expand(batch, H, nb).contiguous(), indices.expand(batch, H, nb, nb).contiguous()


def rescale_full_refresh(mass: torch.Tensor, kept: torch.Tensor):
    """A full refresh's mass map on the dense scale, and the share of the mass its sparse call kept.

    The refresh maps every block with the sparse call's lse, which holds only the kept blocks' mass:
    each entry is then larger than the dense one by 1 / (its row's kept share), and a query block's
    entries sum to the mean of that over its rows instead of 1. Dividing by that sum gives the dense
    scale (exact when a block's rows keep equal shares), and the kept entries' part of it is the
    kept share, per (batch, head, query block): (B, H, nbq). ``mass`` (B, H, nbq, nbk) as
    :func:`observe_map` writes it (NaN: tiles with NaN probabilities, kept as they are); ``kept``
    the call's block mask, (H, nbq, nbk) or (B, H, nbq, nbk). A query block with no mass (every key
    hidden) keeps its entries and counts as fully kept."""
    finite = mass.nan_to_num(0.0).clamp_min(0.0)
    total = finite.sum(-1, keepdim=True)
    has_mass = total > 0
    scaled = torch.where(has_mass, mass / total.clamp_min(1e-30), mass)
    share = torch.where(has_mass, (finite * kept).sum(-1, keepdim=True) / total.clamp_min(1e-30), 1.0)
    return scaled, share[..., 0]


def device_scalars(values, device: torch.device) -> torch.Tensor:
    """A small float32 tensor on ``device`` from host numbers, without a host sync on CUDA (a
    pageable host-to-device copy would wait for the stream: pinned memory, non-blocking)."""
    t = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Elements of the (B, heads, rows, nb) intermediates of observed_coverage per chunk of heads.
_COVERAGE_CHUNK = 1 << 25


def observed_coverage(q, k, lse, kept, block_size: int, scale: float, row_stride: int = 1,
                      key_bias=None) -> torch.Tensor:
    """Per (batch, head): estimated fraction of the dense attention mass that a sparse call kept,
    mean over the query rows of :func:`..kernels.block_sparsity.sampled_rows` (every
    ``row_stride``-th row of each block, phase 0: those the observation samples), (B, H) float.
    ``kept`` is the call's block mask, (B, H, nb, nb) or (H, nb, nb).

    A skipped block b holds about ``|b| * exp(q . mean(k_b) * scale)`` unnormalised mass (a lower
    bound, by Jensen); relative to the kept mass ``exp(lse)`` the row keeps ``1 / (1 + missing)``.
    The estimate errs high (coverage overestimated), so a value under the bound is a real drop.
    With ``key_bias`` (B, Nk) only visible keys count: ``|b|``, the mean key and the mean bias are
    over them (Jensen again), and a block of hidden keys misses nothing.
    Cost: one pass over k (block means) and a (rows x nb) product per head, in a few batched ops
    (chunked over heads to bound memory)."""
    B, H, N, _ = q.shape
    if key_bias is None:
        sizes = block_token_counts(k.shape[2], block_size, k.device).unsqueeze(-1)   # (nbk, 1)
        pooled = block_means(k, block_size)                                    # (B, H, nbk, D)
    else:
        pooled, bias, sizes = masked_block_means(k, key_bias, block_size)
        bias, hidden, sizes = bias[:, None, None, :], (sizes == 0)[:, None, None, :], sizes[:, None, :, None]
    rows, row_blocks = _coverage_rows(N, block_size, row_stride, q.device)
    qs = q.index_select(2, rows)
    ls = lse.index_select(2, rows).float().unsqueeze(-1)
    if kept.dim() == 3:
        kept = kept.unsqueeze(0)
    heads = max(1, _COVERAGE_CHUNK // max(1, B * rows.numel() * pooled.shape[2]))
    out = []
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        s = torch.matmul(qs[:, h0:h1].float(), pooled[:, h0:h1].transpose(-1, -2))   # (B, h, R, nbk)
        s.mul_(scale)
        if key_bias is not None:
            s.add_(bias)
        mass = s.sub_(ls[:, h0:h1]).exp_()
        if key_bias is not None:
            mass.masked_fill_(hidden, 0.0)                                      # even where lse is -inf
        mass.masked_fill_(kept[:, h0:h1].index_select(2, row_blocks), 0.0)      # kept blocks: not missing
        missing = torch.matmul(mass, sizes)[..., 0]                             # (B, h, R)
        out.append(missing.add_(1.0).reciprocal_().mean(-1))
    return torch.cat(out, 1) if len(out) > 1 else out[0]


@functools.lru_cache(maxsize=64)
def _coverage_rows(n: int, block_size: int, row_stride: int, device: torch.device):
    """The sampled rows and their query blocks, built on the host (the selection is a boolean
    index: a sync on a GPU) and copied without waiting; cached."""
    from ..kernels.block_sparsity import sampled_rows
    rows = sampled_rows(n, block_size, row_stride, 0)
    both = torch.stack([rows, rows // block_size])
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    else:
        both = both.to(device)
    return both[0], both[1]


__all__ = ["NOT_OBSERVED", "device_scalars", "observe_map", "observe_tail", "observed_coverage", "rescale_full_refresh"]
