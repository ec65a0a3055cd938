"""Block sparsity maps: per (batch, head, query block, key block), the fraction of the tile's
attention probabilities below a threshold (MOD-DiT's observation), in Triton, with a torch reference.

An entry (i, j) is *sparse* when its probability ``exp(s_ij * scale - lse_i)`` is below
``threshold``, i.e. when ``s_ij * scale < lse_i + ln(threshold)``; ``lse`` is the row's natural-log
log-sum-exp from the attention that just ran (a second pass over the q.k tiles, no softmax). The map
entry of a tile is ``sparse entries / valid entries``: rows and columns past the end of a ragged last
block do not count.

Key bias (``key_bias`` (B, Nk) float32, the attention's key-padding mask as an additive bias,
modcompile/passes/masks.py): the probability is ``exp(s_ij * scale + bias_j - lse_i)``, so a hidden
key (``-inf``) has probability 0 and counts as sparse, also in a row whose ``lse`` is ``-inf`` (every
key it attended was hidden). A tile of hidden keys is 1.0 (fully sparse). ``lse`` must come from
the attention with the same bias.

Restricted mode (``kv_counts``/``kv_indices`` given): only the listed (query block, key block)
entries are written; every other entry of ``out`` is left as it was (the caller pre-fills it, by
default with NaN, so that "not observed" is visible). That is the cheap refresh of the MOD policy:
observe only the blocks the sparse kernel computed. With a sparse call's lse the probabilities are
relative to the kept blocks' mass (slightly larger than the dense ones). The kernel keeps the same
query-block groups as the full map (one tile of about ``block_size`` sampled rows per program) and
visits the *union* of its blocks' lists (built on device from the lists, a few small ops), storing
an entry only where that query block lists the key block: the restricted map costs at most the
full one, instead of one 16-row tile per query block re-loading all of its key blocks.

Mass map (``mass``): per entry the attention mass of the tile, the mean over its rows of
``sum_j exp(s_ij * scale + bias_j - lse_i)``, written in the same pass; :func:`block_mass` writes it
alone, without the per-score comparisons of the sparsity map.

Row sampling (``row_stride`` s > 1): the map is *estimated* from the query rows at local offsets
``phase, phase + s, ...`` of each query block (``phase = (row_phase % s) % min(s, valid rows)``; see
:func:`sampled_rows`); the entry is then ``sparse entries / valid entries`` over those rows only.
The kernel loads and multiplies only the sampled rows (grouping ``s`` query blocks per program into
one tile of ``block_size`` rows), so its work drops by about s for power-of-two strides. The key
loop of every program is split into parts of about ``LaunchConfig.key_blocks`` key blocks
(separate programs; the entries of different key blocks are independent), so that a short
sampled pass still has enough programs for the GPU.
``row_stride=1`` is the exact map.

Non-finite inputs: an entry is NaN when one of its sampled rows has a NaN or +inf ``lse`` or a
NaN / infinite score in the tile (dense softmax gives that row NaN probabilities); such NaN is not
swallowed into a count. Callers that also use NaN for "not observed" (restricted mode's ``fill``)
should pass another ``fill`` to tell the two apart (the MOD policy passes -1). A caller that observes repeatedly can rotate ``row_phase``
so that successive observations see different rows.
"""
from __future__ import annotations

import math
import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, default_scale, dot_precision, interpreting,
                      padded_head_dim, unit_last_stride)
from .block_lists import BlockLists, mask_from_lists, num_blocks
from .tuning import LaunchConfig, choose, map_configs, tuning_key


@triton.jit(do_not_specialize=["row_phase"])
def _block_sparsity_kernel(
    Q, K, Lse, Out, Counts, Indices, Listed, KeyBias, Mass,
    inv_scale, log_threshold, row_phase, scale_log2e,
    N_Q, N_K, H, MQ, MK,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_om, stride_ok,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ij,
    stride_fb, stride_fh, stride_fm,
    stride_bb,
    stride_mb, stride_mh, stride_mm, stride_mk,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_STRIDE: tl.constexpr,
    SAMPLE_ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    SPLITS: tl.constexpr,
    RESTRICTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASS: tl.constexpr,
    HAS_COUNT: tl.constexpr,   # the sparsity map (Out); off: the mass map alone (the MOD "mass" rule)
    DOT_PRECISION: tl.constexpr,
):
    # One program per GROUP consecutive query blocks, one (batch, head) and one of SPLITS parts of
    # the key blocks (the map's entries are independent per key block, so splitting the key loop
    # needs no reduction; it only gives the GPU enough programs to fill its waves). Each query
    # block contributes SAMPLE_ROWS row slots (its sampled rows: phase, phase + stride, ...; slots
    # past the block or past N are masked), so one tile of GROUP * SAMPLE_ROWS rows (the block
    # size: full MMA tiles at any stride) meets every key tile: sampling cuts both the products and
    # the key loads by the stride. Restricted: Counts/Indices list the key blocks of the program's
    # group (the union of its query blocks' lists; with GROUP 1 the caller's own lists), and Listed
    # (B, H, MQ, MK) int8 says which query block of the group listed each one: only those are stored.
    pid_group = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    CHUNKS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    TILE_M: tl.constexpr = GROUP * SAMPLE_ROWS

    slot = tl.arange(0, TILE_M)
    slot_group = slot // SAMPLE_ROWS                       # which query block of the group
    slot_index = slot % SAMPLE_ROWS                        # which sample of that block
    q_block = pid_group * GROUP + slot_group
    rows_in_block = tl.minimum(N_Q - q_block * BLOCK_SIZE, BLOCK_SIZE)   # <= 0 past the end
    # A short ragged block (fewer valid rows than the stride) reduces the phase so that it
    # always keeps one sampled row; the torch reference does the same.
    phase = row_phase % tl.maximum(tl.minimum(rows_in_block, ROW_STRIDE), 1)
    local = phase + slot_index * ROW_STRIDE
    row_ok = local < rows_in_block
    offs_m = q_block * BLOCK_SIZE + local
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m, mask=row_ok, other=float("-inf"))
    # Entry (i, j) is sparse when s_ij * scale < lse_i + ln(threshold): compared on the raw
    # product, s_ij < (lse_i + ln(threshold)) / scale, which saves a multiply per entry (the
    # rounding differs only for scores on the bound). Unsampled / invalid slots get bound -inf:
    # no score is below it, so they never count.
    bound = (lse + log_threshold) * inv_scale
    if HAS_BIAS:
        # A hidden key's score is -inf: below any finite bound. Sampled rows whose lse is -inf
        # (every key they attended was hidden) get the lowest finite bound, so that hidden keys
        # still count there and no other key does.
        bound = tl.maximum(bound, -3.4028234663852886e38)
    bound = tl.where(row_ok, bound, float("-inf"))
    # Key columns past N_K were loaded as zeros: their product is exactly 0, counted iff the
    # row's bound is above 0. Subtracting those after the key block's loop (only the last block
    # is ragged) keeps the per-entry work to one comparison and one add.
    zero_hit = (bound > 0).to(tl.int32)
    # A row whose lse is NaN or +inf has NaN probabilities (dense softmax would too): its tiles are NaN.
    lse_bad = row_ok & ((lse != lse) | (lse == float("inf")))
    rows_sampled = tl.sum(tl.reshape(row_ok.to(tl.int32), [GROUP, SAMPLE_ROWS]), 1)
    # Mass: p_ij = 2^(s_ij * scale * log2(e) - lse_i * log2(e)); an unsampled slot or a row whose lse
    # is -inf (it attended only hidden keys) gets offset +inf, so every p of it is 0.
    lse_log2 = tl.where(row_ok & (lse > float("-inf")), lse * 1.4426950408889634, float("inf"))
    out_blocks = pid_group * GROUP + tl.arange(0, GROUP)
    block_ok = out_blocks < MQ

    k_base = K + b * stride_kb + h * stride_kh
    bias_base = KeyBias + b * stride_bb
    out_base = Out + b * stride_ob + h * stride_oh + out_blocks.to(tl.int64) * stride_om
    mass_base = Mass + b * stride_mb + h * stride_mh + out_blocks.to(tl.int64) * stride_mm
    listed_base = Listed + b * stride_fb + h * stride_fh + out_blocks.to(tl.int64) * stride_fm
    if RESTRICTED:
        n_entries = tl.load(Counts + b * stride_cb + h * stride_ch + pid_group * stride_cm)
        idx_base = Indices + b * stride_ib + h * stride_ih + pid_group * stride_im
    else:
        n_entries = MK
    e_start = (pid_split * n_entries) // SPLITS
    e_end = ((pid_split + 1) * n_entries) // SPLITS

    for e in range(e_start, e_end):
        if RESTRICTED:
            key_block = tl.load(idx_base + e * stride_ij)
        else:
            key_block = e
        below = tl.zeros([TILE_M], dtype=tl.int32)
        # A NaN or infinite score makes the row sum non-finite (one add per entry instead of a
        # test; finite scores would have to overflow float32): such a tile has NaN probabilities
        # in dense attention.
        total = tl.zeros([TILE_M], dtype=tl.float32)
        mass = tl.zeros([TILE_M], dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            cols = key_block * BLOCK_SIZE + c * BLOCK_N + offs_n
            k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                        mask=(cols < N_K)[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                # columns past N_K load 0: the ragged-tail correction below stays right
                kb = tl.load(bias_base + cols, mask=cols < N_K, other=0.0) * inv_scale
                s_biased = s + kb[None, :]
            else:
                s_biased = s
            if HAS_COUNT:
                below += tl.sum((s_biased < bound[:, None]).to(tl.int32), 1)
            if HAS_MASS:
                p = tl.exp2(s_biased * scale_log2e - lse_log2[:, None])
                if (key_block + 1) * BLOCK_SIZE > N_K:   # only the ragged last key block has columns past N_K
                    p = tl.where((cols < N_K)[None, :], p, 0.0)
                mass += tl.sum(p, 1)
            total += tl.sum(s, 1)   # the raw scores: non-finite q or k, hidden or not
        cols_valid = tl.minimum(N_K - key_block * BLOCK_SIZE, BLOCK_SIZE)
        # Unsampled slots loaded q = 0 (0 * NaN is NaN): only sampled rows count.
        bad = lse_bad | (row_ok & ~(tl.abs(total) < float("inf")))  # NaN compares false
        bad_per_block = tl.sum(tl.reshape(bad.to(tl.int32), [GROUP, SAMPLE_ROWS]), 1)
        store_ok = block_ok
        if RESTRICTED and GROUP > 1:
            store_ok = store_ok & (tl.load(listed_base + key_block, mask=block_ok, other=0) != 0)
        if HAS_COUNT:
            below -= (BLOCK_SIZE - cols_valid) * zero_hit
            below_per_block = tl.sum(tl.reshape(below, [GROUP, SAMPLE_ROWS]), 1)
            frac = below_per_block.to(tl.float32) / (tl.maximum(rows_sampled, 1) * cols_valid).to(tl.float32)
            frac = tl.where(bad_per_block > 0, float("nan"), frac)
            tl.store(out_base + key_block * stride_ok, frac, mask=store_ok)
        if HAS_MASS:
            mass_per_block = tl.sum(tl.reshape(mass, [GROUP, SAMPLE_ROWS]), 1) / tl.maximum(rows_sampled, 1)
            mass_per_block = tl.where(bad_per_block > 0, float("nan"), mass_per_block)
            tl.store(mass_base + key_block * stride_mk, mass_per_block, mask=store_ok)


def sample_layout(block_size: int, row_stride: int, restricted: bool = False) -> tuple[int, int]:
    """(SAMPLE_ROWS, GROUP): row slots per query block (a power of two >= the block's sampled rows)
    and query blocks per program, so that a program's tile holds ``block_size`` rows (>= 16, as
    tl.dot needs) at every stride: stride 16 at block 128 is 16 blocks of 8 rows. The same in
    restricted mode (``restricted`` is kept for callers; it no longer changes the layout)."""
    needed = -(-block_size // row_stride)
    sample_rows = triton.next_power_of_2(needed)
    group = max(1, block_size // sample_rows)
    return sample_rows, group


def group_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int, group: int):
    """Restricted mode's work lists: ``listed`` (B, H, Mq, Mk) bool from the block lists, and per
    group of ``group`` consecutive query blocks the union of their lists as (counts (B, H, G),
    indices (B, H, G, Mk)) int32, in increasing key-block order. On device, no host sync."""
    listed = mask_from_lists(kv_counts, kv_indices, mk)
    B, H, mq, _ = listed.shape
    n_groups = -(-mq // group)
    padded = listed.new_zeros(B, H, n_groups * group, mk)
    padded[:, :, :mq] = listed
    union = padded.view(B, H, n_groups, group, mk).any(3)
    ids = torch.arange(mk, device=listed.device, dtype=torch.int32)
    # Listed ids first in increasing order (unlisted ones shifted past mk), then back to ids.
    order = torch.where(union, ids, ids + mk).sort(dim=-1).values.remainder_(mk)
    return listed, union.sum(-1, dtype=torch.int32), order


def sampled_rows(n: int, block_size: int, row_stride: int = 1, row_phase: int = 0,
                 device=None) -> torch.Tensor:
    """Indices of the query rows the map is estimated from: in each query block the rows at local
    offsets ``phase, phase + stride, ...`` with ``phase = (row_phase % stride) % min(stride, valid
    rows of the block)``, so that a short ragged last block keeps one row. Stride 1: every row."""
    row_phase = row_phase % row_stride
    rows = torch.arange(n, device=device)
    local = rows % block_size
    valid = torch.clamp(n - (rows - local), max=block_size)     # valid rows of each row's block
    phase = row_phase % torch.clamp(valid, max=row_stride)
    keep = (local >= phase) & ((local - phase) % row_stride == 0)
    return rows[keep]


def _pick_config(q, n_k: int, block_size: int, row_stride: int, restricted: bool, count: bool) -> LaunchConfig:
    """The map kernel's configuration: its one candidate, kept per key (:mod:`.tuning`); the pass with
    the sparsity map (``count``) and the mass pass alone are keyed apart."""
    if interpreting() or not q.is_cuda:
        return map_configs(block_size, interpreter=True)[0]
    B, H, N, _ = q.shape
    key = tuning_key("map", q, block_size, N, n_k, B * H * num_blocks(N, block_size), False, row_stride, restricted,
                     count)
    return choose(key, lambda: map_configs(block_size, interpreter=False), None, direction="map")


def key_splits(mk: int, key_blocks: int) -> int:
    """Parts the key loop of every program is split into: about ``key_blocks`` key blocks each."""
    return max(1, -(-mk // max(1, key_blocks)))


def _check(q, k, lse, block_size, kv_counts, kv_indices, out, row_stride, row_phase, key_bias=None, mass=None):
    for name, value, low in (("row_stride", row_stride, 1), ("row_phase", row_phase, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"block_sparsity: {name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"block_sparsity: {name} must be >= {low}, got {value}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"block_sparsity: {name} must be a (B, H, N, D) tensor")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"block_sparsity: q, k must share a dtype in {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"block_sparsity: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, N):
        raise ValueError(f"block_sparsity: lse must be (B, H, N) = {(B, H, N)}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_sparsity: block_size {block_size} not in {SUPPORTED_BLOCK_SIZES}")
    if (kv_counts is None) != (kv_indices is None):
        raise ValueError("block_sparsity: give both kv_counts and kv_indices, or neither")
    mq, mk = num_blocks(N, block_size), num_blocks(k.shape[2], block_size)
    if kv_counts is not None:
        lists = BlockLists(kv_counts, kv_indices, block_size, N, k.shape[2])
        try:
            lists.check(B, H)
        except (TypeError, ValueError) as err:
            raise type(err)(f"block_sparsity: {err}") from None
    for name, t in (("out", out), ("mass", mass)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, H, mq, mk)
                              or t.dtype != torch.float32):
            raise ValueError(f"block_sparsity: {name} must be float32 (B, H, Mq, Mk) = {(B, H, mq, mk)}")
    if key_bias is not None and (not isinstance(key_bias, torch.Tensor) or tuple(key_bias.shape) != (B, k.shape[2])
                                 or key_bias.dtype != torch.float32):
        raise ValueError(f"block_sparsity: key_bias must be float32 (B, Nk) = {(B, k.shape[2])}")
    devices = {t.device for t in (q, k, lse, kv_counts, kv_indices, out, key_bias, mass) if t is not None}
    if len(devices) != 1:
        raise ValueError("block_sparsity: all inputs must be on one device")


def block_sparsity(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_size: int = 128,
                   threshold: float = 1e-4, scale: float | None = None,
                   kv_counts: torch.Tensor | None = None, kv_indices: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, fill: float = float("nan"),
                   row_stride: int = 1, row_phase: int = 0, key_bias: torch.Tensor | None = None,
                   mass: torch.Tensor | None = None, config: LaunchConfig | None = None) -> torch.Tensor:
    """Block sparsity map ``(B, H, Mq, Mk)`` float32 (Triton; CUDA or TRITON_INTERPRET=1).

    With ``kv_counts``/``kv_indices`` only the listed blocks are written; ``out`` (if given) keeps
    its other entries, else it is allocated filled with ``fill``. ``row_stride > 1`` estimates
    each entry from every ``row_stride``-th query row of the block, starting at ``row_phase``.
    ``key_bias`` (B, Nk) float32: added to the scaled scores (``-inf``: a hidden key, probability 0).
    ``mass`` (float32, the map's shape): also written, at the same entries, with each entry's attention
    mass: the mean over the sampled rows of the row's probabilities summed over the tile's keys (NaN
    where the map is NaN). ``config`` forces a launch configuration (benchmarks): ``sub`` keys per chunk (it must divide
    the block) and ``key_blocks`` per program part; ``tile`` is ignored (the sampling layout sets it)."""
    _check(q, k, lse, block_size, kv_counts, kv_indices, out, row_stride, row_phase, key_bias, mass)
    if threshold <= 0:
        raise ValueError("block_sparsity: threshold must be > 0")
    B, H, N, _ = q.shape
    if out is None:
        restricted = kv_counts is not None
        out = torch.full((B, H, num_blocks(N, block_size), num_blocks(k.shape[2], block_size)),
                         fill if restricted else 0.0, dtype=torch.float32, device=q.device)
    _launch(q, k, lse, block_size, threshold, scale, kv_counts, kv_indices, out, mass, row_stride, row_phase,
            key_bias, config)
    return out


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_size: int = 128,
               scale: float | None = None, kv_counts: torch.Tensor | None = None,
               kv_indices: torch.Tensor | None = None, out: torch.Tensor | None = None, fill: float = float("nan"),
               row_stride: int = 1, row_phase: int = 0, key_bias: torch.Tensor | None = None,
               config: LaunchConfig | None = None) -> torch.Tensor:
    """The mass map alone ``(B, H, Mq, Mk)`` float32: :func:`block_sparsity`'s ``mass`` output (same
    arguments, same NaN and restricted-mode rules, ``out`` takes the mass) without the sparsity
    map's per-score comparisons, for callers that rank blocks by mass only."""
    _check(q, k, lse, block_size, kv_counts, kv_indices, None, row_stride, row_phase, key_bias, out)
    B, H, N, _ = q.shape
    if out is None:
        out = torch.full((B, H, num_blocks(N, block_size), num_blocks(k.shape[2], block_size)),
                         fill if kv_counts is not None else 0.0, dtype=torch.float32, device=q.device)
    _launch(q, k, lse, block_size, 1.0, scale, kv_counts, kv_indices, None, out, row_stride, row_phase,
            key_bias, config)
    return out


def _launch(q, k, lse, block_size, threshold, scale, kv_counts, kv_indices, out, mass, row_stride, row_phase,
            key_bias, config) -> None:
    """One kernel launch writing ``out`` (the sparsity map; None: not computed) and / or ``mass``."""
    if not (q.is_cuda or interpreting()):
        raise ValueError("block_sparsity: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1); "
                         "use block_sparsity_ref on CPU")
    if scale is not None and scale <= 0:  # the kernel compares raw scores with bound / scale
        raise ValueError("block_sparsity: scale must be > 0")
    B, H, N, D = q.shape
    n_k = k.shape[2]
    mq, mk = num_blocks(N, block_size), num_blocks(n_k, block_size)
    scale = default_scale(D, scale)
    q, k = unit_last_stride(q), unit_last_stride(k)
    lse = unit_last_stride(lse.float())
    restricted = kv_counts is not None
    if B * H * N * n_k == 0:
        return
    cfg = config or _pick_config(q, n_k, block_size, row_stride, restricted, out is not None)
    if block_size % cfg.sub or cfg.key_blocks < 1:
        raise ValueError(f"block_sparsity: config {cfg.label()}: sub must divide block_size {block_size} and "
                         "key_blocks be >= 1")
    block_d = padded_head_dim(D)
    sample_rows, group = sample_layout(block_size, row_stride)
    listed = torch.zeros(1, 1, 1, 1, dtype=torch.int8, device=q.device)  # dummy: never read
    if not restricted:  # dummies: never read
        kv_counts = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
        kv_indices = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
    elif group > 1:
        listed, kv_counts, kv_indices = group_lists(kv_counts, kv_indices, mk, group)
        listed = listed.view(torch.int8)
    splits = key_splits(mk, cfg.key_blocks)
    bias = lse if key_bias is None else unit_last_stride(key_bias)   # dummy when absent: never read
    out_arg = mass if out is None else out                             # dummy when absent: never written
    mass_arg = out if mass is None else mass                           # dummy when absent: never written
    _block_sparsity_kernel[(triton.cdiv(mq, group), B * H, splits)](
        q, k, lse, out_arg, kv_counts, kv_indices, listed, bias, mass_arg,
        1.0 / scale, math.log(threshold), row_phase % row_stride, scale * math.log2(math.e),
        N, n_k, H, mq, mk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1),
        out_arg.stride(0), out_arg.stride(1), out_arg.stride(2), out_arg.stride(3),
        kv_counts.stride(0), kv_counts.stride(1), kv_counts.stride(2),
        kv_indices.stride(0), kv_indices.stride(1), kv_indices.stride(2), kv_indices.stride(3),
        listed.stride(0), listed.stride(1), listed.stride(2),
        bias.stride(0),
        mass_arg.stride(0), mass_arg.stride(1), mass_arg.stride(2), mass_arg.stride(3),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=cfg.sub,
        ROW_STRIDE=row_stride, SAMPLE_ROWS=sample_rows, GROUP=group, SPLITS=splits, RESTRICTED=restricted,
        HAS_BIAS=key_bias is not None, HAS_MASS=mass is not None, HAS_COUNT=out is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def block_sparsity_ref(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_size: int = 128,
                       threshold: float = 1e-4, scale: float | None = None,
                       kv_counts: torch.Tensor | None = None, kv_indices: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, fill: float = float("nan"),
                       row_stride: int = 1, row_phase: int = 0, key_bias: torch.Tensor | None = None,
                       mass: torch.Tensor | None = None, margin: float = 0.0,
                       compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of :func:`block_sparsity` (any device), the same estimator: only the rows
    of :func:`sampled_rows` count (``mass`` as there). ``margin`` shifts the bound
    (``s * scale + bias < lse + ln(threshold) + margin``): tests use +-margin to bracket rounding."""
    _check(q, k, lse, block_size, kv_counts, kv_indices, out, row_stride, row_phase,
           None if key_bias is None else key_bias.float(), mass)
    B, H, N, D = q.shape
    n_k = k.shape[2]
    mq, mk = num_blocks(N, block_size), num_blocks(n_k, block_size)
    scale = default_scale(D, scale)
    rows = sampled_rows(N, block_size, row_stride, row_phase, device=q.device)
    row_blocks = rows // block_size
    bound = (lse[:, :, rows].to(compute_dtype) + math.log(threshold) + margin).unsqueeze(-1)
    cols = torch.arange(mk * block_size, device=q.device)
    tile_rows = torch.bincount(row_blocks, minlength=mq).to(compute_dtype)
    tile_cols = torch.bincount(cols[:n_k] // block_size, minlength=mk).to(compute_dtype)
    sums = torch.zeros(B, H, mq, mk, dtype=compute_dtype, device=q.device)
    bad = torch.zeros(B, H, mq, mk, dtype=compute_dtype, device=q.device)
    masses = torch.zeros(B, H, mq, mk, dtype=compute_dtype, device=q.device)
    lse_rows = lse[:, :, rows]
    # a row whose lse is -inf attended only hidden keys: its probabilities are all 0
    lse_mass = lse_rows.to(compute_dtype).masked_fill(lse_rows == float("-inf"), float("inf")).unsqueeze(-1)
    row_bad = (lse_rows.isnan() | (lse_rows == float("inf"))).unsqueeze(-1)
    kc = k.to(compute_dtype)
    if key_bias is not None:
        bias = key_bias.to(compute_dtype)[:, None, None, :]
        hidden = bias == float("-inf")          # probability 0: sparse whatever the row's lse
    step = 16 * block_size  # chunks of sampled rows bound the memory
    for r0 in range(0, rows.numel(), step):
        r1 = min(rows.numel(), r0 + step)
        s = torch.matmul(q[:, :, rows[r0:r1]].to(compute_dtype), kc.transpose(-1, -2)) * scale
        below = s < bound[:, :, r0:r1] if key_bias is None else (s + bias < bound[:, :, r0:r1]) | hidden
        below = below.to(compute_dtype)
        below = torch.nn.functional.pad(below, (0, mk * block_size - n_k))
        per_col_block = below.view(B, H, r1 - r0, mk, block_size).sum(-1)
        sums.index_add_(2, row_blocks[r0:r1], per_col_block)
        nonfinite = torch.nn.functional.pad(~torch.isfinite(s), (0, mk * block_size - n_k))
        nonfinite = nonfinite.view(B, H, r1 - r0, mk, block_size).any(-1) | row_bad[:, :, r0:r1]
        bad.index_add_(2, row_blocks[r0:r1], nonfinite.to(compute_dtype))
        if mass is not None:
            p = torch.exp((s if key_bias is None else s + bias) - lse_mass[:, :, r0:r1])
            p = torch.nn.functional.pad(p, (0, mk * block_size - n_k))
            masses.index_add_(2, row_blocks[r0:r1], p.view(B, H, r1 - r0, mk, block_size).sum(-1))
    frac = (sums / (tile_rows[:, None] * tile_cols[None, :])).float()
    frac = frac.masked_fill(bad > 0, float("nan"))  # NaN probabilities in the tile, as in dense softmax
    listed = None if kv_counts is None else mask_from_lists(kv_counts, kv_indices, mk)
    if mass is not None:
        per_row = (masses / tile_rows.clamp_min(1)[:, None]).float().masked_fill(bad > 0, float("nan"))
        mass.copy_(per_row if listed is None else torch.where(listed, per_row, mass))
    if listed is None:
        if out is not None:
            out.copy_(frac)
            return out
        return frac
    if out is None:
        out = torch.full((B, H, mq, mk), fill, dtype=torch.float32, device=q.device)
    out.copy_(torch.where(listed, frac, out))
    return out


def block_mass_ref(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_size: int = 128,
                   scale: float | None = None, kv_counts: torch.Tensor | None = None,
                   kv_indices: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   fill: float = float("nan"), row_stride: int = 1, row_phase: int = 0,
                   key_bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of :func:`block_mass` (the mass output of :func:`block_sparsity_ref`)."""
    if out is None:
        B, H, N, _ = q.shape
        out = torch.full((B, H, num_blocks(N, block_size), num_blocks(k.shape[2], block_size)),
                         fill if kv_counts is not None else 0.0, dtype=torch.float32, device=q.device)
    block_sparsity_ref(q, k, lse, block_size=block_size, scale=scale, kv_counts=kv_counts, kv_indices=kv_indices,
                       row_stride=row_stride, row_phase=row_phase, key_bias=key_bias, mass=out,
                       compute_dtype=compute_dtype)
    return out


__all__ = ["block_sparsity", "block_sparsity_ref", "block_mass", "block_mass_ref", "sampled_rows", "sample_layout", "group_lists",
           "SUPPORTED_BLOCK_SIZES"]
