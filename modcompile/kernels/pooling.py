"""Fused token permutation + per-block mean pooling of q and k (Triton), a row-gather kernel, and
their torch references.

VMoBA scores key blocks by the mean of their keys (and, since our kernel selects per query block,
query blocks by the mean of their queries). The blocks are contiguous only after a permutation
(kernels/partition.py), so one kernel reads q and k once, writes the permuted copies that the
attention kernel needs, and accumulates the fp32 means on the way: one pass over memory instead of
three. Each copy is optional (``write_permuted``): the attention kernel can gather q rows itself
(``q_rows``), so VMoBA asks only for the permuted k. v is not seen by the plan (it arrives with the
attention op), so its permutation stays a separate gather (:func:`gather_rows`).

Work is split into *segments*: runs of permuted positions that stay inside one partition block and
hold at most ``seg_rows`` tokens (text runs carry partition -1: permuted, not pooled). A program
owns one segment of one (batch, head), sums its rows in fp32 and adds ``sum / block size`` into the
pooled output with one atomic add per channel, so long blocks (1D: thousands of tokens) still spread
over many programs. The order of the atomic adds is not fixed: pooled values may differ in the last
bits from run to run when a block has several segments.

Key bias (``key_bias`` (B, N) float32, the attention's key-padding mask as an additive bias): the
pooled k of a block is the mean over its visible keys only (bias ``> -inf``), and a fifth output
gives each block's mean bias over them, ``-inf`` for a block of hidden keys (no visible key: its
pooled k is 0). q is pooled over every token (padded queries still attend).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import empty_heads_last, interpreting, padded_head_dim, unit_last_stride

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work
    triton = None


@dataclass(frozen=True)
class Segments:
    """Device tensors describing the pooling work of one partition."""

    perm: torch.Tensor        # (N,) int32: original index of each permuted position
    part: torch.Tensor        # (S,) int32: partition block of the segment, -1 for text
    start: torch.Tensor       # (S,) int32: first permuted position
    length: torch.Tensor      # (S,) int32: positions in the segment (<= seg_rows)
    inv_count: torch.Tensor   # (P,) float32: 1 / tokens of each partition block
    num_parts: int
    seq_len: int


def make_segments(perm: torch.Tensor, starts: torch.Tensor, seg_rows: int = 256, device=None) -> Segments:
    """Segments covering every permuted position once. ``starts`` (P + 1,) bounds the video blocks;
    positions before ``starts[0]`` and after ``starts[-1]`` are text."""
    n = perm.numel()
    starts = [int(s) for s in starts]
    runs = []  # (part, lo, hi)
    if starts[0] > 0:
        runs.append((-1, 0, starts[0]))
    runs += [(p, starts[p], starts[p + 1]) for p in range(len(starts) - 1)]
    if starts[-1] < n:
        runs.append((-1, starts[-1], n))
    part, start, length = [], [], []
    for p, lo, hi in runs:
        for s in range(lo, hi, seg_rows):
            part.append(p)
            start.append(s)
            length.append(min(seg_rows, hi - s))
    sizes = torch.tensor([starts[p + 1] - starts[p] for p in range(len(starts) - 1)], dtype=torch.float32)
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
    return Segments(perm.to(device=device, dtype=torch.int32), as_i32(part), as_i32(start), as_i32(length),
                    (1.0 / sizes).to(device), len(starts) - 1, n)


def _check_qk(q: torch.Tensor, k: torch.Tensor, n: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, H, N, D) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] != n:
        raise ValueError(f"the partition covers {n} tokens but q has {q.shape[2]}")
    if not q.dtype.is_floating_point or q.dtype != k.dtype:
        raise TypeError(f"q and k must share a floating dtype; got {q.dtype}, {k.dtype}")


# ----------------------------------------------------------------------------- torch references

def _write_flags(write_permuted) -> tuple[bool, bool]:
    """``write_permuted`` as (write q, write k): one bool for both or a pair."""
    if isinstance(write_permuted, bool):
        return write_permuted, write_permuted
    try:
        write_q, write_k = write_permuted
    except (TypeError, ValueError):
        raise TypeError(f"write_permuted must be a bool or a (q, k) pair of bools, got {write_permuted!r}") from None
    return bool(write_q), bool(write_k)


def permute_pool_ref(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, starts: torch.Tensor,
                     write_permuted=True, key_bias: torch.Tensor | None = None):
    """Reference: ``(q_perm, k_perm, q_pool, k_pool)``; pools (B, H, P, D) float32 means over each
    partition block's tokens. A permuted copy not asked for by ``write_permuted`` (bool, or a
    (q, k) pair) is None, as in :func:`permute_pool`. With ``key_bias`` (B, N, original order):
    k pooled over visible keys and a fifth output, the mean bias (B, P) (see the module docstring)."""
    _check_qk(q, k, perm.numel())
    write_q, write_k = _write_flags(write_permuted)
    perm = perm.to(q.device, torch.int64)
    starts = starts.to(torch.int64)
    qp, kp = q.index_select(2, perm), k.index_select(2, perm)
    sizes = (starts[1:] - starts[:-1]).to(q.device)
    ids = torch.repeat_interleave(torch.arange(sizes.numel(), device=q.device), sizes)
    lo, hi = int(starts[0]), int(starts[-1])

    def pool(x):
        B, H, _, D = x.shape
        total = torch.zeros(B, H, sizes.numel(), D, dtype=torch.float32, device=x.device)
        total.index_add_(2, ids, x[:, :, lo:hi].float())
        return total / sizes.to(torch.float32)[:, None]

    out = (qp if write_q else None, kp if write_k else None, pool(qp))
    if key_bias is None:
        return (*out, pool(kp))
    return (*out, *masked_pool(kp, key_bias.index_select(1, perm), ids, lo, hi, sizes.numel()))


def masked_pool(kp: torch.Tensor, bias_p: torch.Tensor, ids: torch.Tensor, lo: int, hi: int, parts: int):
    """(k pooled over visible keys (B, H, P, D), mean bias (B, P)) from permuted k and bias: the
    video positions ``lo:hi`` belong to partition ``ids``. Torch, any device."""
    B, H, _, D = kp.shape
    bias = bias_p[:, lo:hi].float()
    visible = bias > float("-inf")
    total = torch.zeros(B, H, parts, D, dtype=torch.float32, device=kp.device)
    total.index_add_(2, ids, kp[:, :, lo:hi].float() * visible[:, None, :, None])
    stats = torch.zeros(2, B, parts, dtype=torch.float32, device=kp.device)
    stats.index_add_(2, ids, torch.stack([visible.float(), torch.where(visible, bias, 0.0)]))
    return finish_masked_pool(total, stats[0], stats[1])


def finish_masked_pool(k_sum: torch.Tensor, count: torch.Tensor, bias_sum: torch.Tensor):
    """Sums over the visible keys -> (means (B, H, P, D), mean bias (B, P), -inf with no visible key)."""
    denom = count.clamp_min(1.0)
    return k_sum / denom[:, None, :, None], torch.where(count > 0, bias_sum / denom, float("-inf"))


def gather_rows_ref(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``out[:, :, i] = x[:, :, index[i]]``."""
    y = x.index_select(2, index.to(x.device, torch.int64))
    if out is None:
        return y
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _permute_pool_kernel(
        Q, K, QP, KP, QPool, KPool, Perm, SegPart, SegStart, SegLen, InvCount, Bias, Stats,
        H,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_qpb, stride_qph, stride_qpn,
        stride_kpb, stride_kph, stride_kpn,
        stride_pb, stride_ph, stride_pp,
        stride_bb, stride_sk, stride_sb,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        WRITE_Q: tl.constexpr,     # store the permuted q
        WRITE_K: tl.constexpr,     # store the permuted k
        HAS_BIAS: tl.constexpr,    # KPool gets sums over visible keys; Stats (2, B, P) their count and bias sum
    ):
        seg = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        part = tl.load(SegPart + seg)
        start = tl.load(SegStart + seg)
        length = tl.load(SegLen + seg)

        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        qp_base = QP + b * stride_qpb + h * stride_qph
        kp_base = KP + b * stride_kpb + h * stride_kph
        acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_k = tl.zeros([BLOCK_D], dtype=tl.float32)
        n_visible = tl.zeros([BLOCK_T], dtype=tl.float32)
        bias_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, length, BLOCK_T):
            row_ok = (t0 + offs_t) < length
            rows = (start + t0 + offs_t).to(tl.int64)
            src = tl.load(Perm + rows, mask=row_ok, other=0).to(tl.int64)
            mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + src[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
            k = tl.load(k_base + src[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
            if WRITE_Q:
                tl.store(qp_base + rows[:, None] * stride_qpn + offs_d[None, :], q, mask=mask)
            if WRITE_K:
                tl.store(kp_base + rows[:, None] * stride_kpn + offs_d[None, :], k, mask=mask)
            acc_q += tl.sum(q.to(tl.float32), 0)
            if HAS_BIAS:
                kb = tl.load(Bias + b * stride_bb + src, mask=row_ok, other=float("-inf"))
                visible = kb > float("-inf")
                acc_k += tl.sum(tl.where(visible[:, None], k.to(tl.float32), 0.0), 0)
                n_visible += visible.to(tl.float32)
                bias_sum += tl.where(visible, kb, 0.0)
            else:
                acc_k += tl.sum(k.to(tl.float32), 0)
        if part >= 0:
            w = tl.load(InvCount + part)
            p_off = b * stride_pb + h * stride_ph + part.to(tl.int64) * stride_pp + offs_d
            tl.atomic_add(QPool + p_off, acc_q * w, mask=d_ok)
            if HAS_BIAS:  # sums: divided by the visible count after the kernel
                tl.atomic_add(KPool + p_off, acc_k, mask=d_ok)
                if h == 0:
                    s_off = b * stride_sb + part.to(tl.int64)
                    tl.atomic_add(Stats + s_off, tl.sum(n_visible, 0))
                    tl.atomic_add(Stats + stride_sk + s_off, tl.sum(bias_sum, 0))
            else:
                tl.atomic_add(KPool + p_off, acc_k * w, mask=d_ok)

    @triton.jit
    def _gather_rows_kernel(
        X, Y, Index, N, H,
        stride_xb, stride_xh, stride_xn,
        stride_yb, stride_yh, stride_yn,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < N
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        src = tl.load(Index + rows, mask=row_ok, other=0).to(tl.int64)
        x = tl.load(X + b * stride_xb + h * stride_xh + src[:, None] * stride_xn + offs_d[None, :],
                    mask=mask, other=0.0)
        tl.store(Y + b * stride_yb + h * stride_yh + rows.to(tl.int64)[:, None] * stride_yn + offs_d[None, :],
                 x, mask=mask)


def triton_available(x: torch.Tensor) -> bool:
    """The Triton kernels can run on ``x``: CUDA, or CPU under TRITON_INTERPRET=1 (not bf16 there)."""
    if triton is None:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and interpreting() and x.dtype != torch.bfloat16


def permute_pool(q: torch.Tensor, k: torch.Tensor, segments: Segments, write_permuted=True,
                 block_t: int | None = None, key_bias: torch.Tensor | None = None,
                 out_k: torch.Tensor | None = None):
    """Triton: ``(q_perm, k_perm, q_pool, k_pool)`` in one pass over q and k. ``write_permuted``: a
    bool for both copies or a (q, k) pair; a copy not written is None (identity permutations need
    only the pools; VMoBA's attention gathers q in the kernel and needs only k permuted). With
    ``key_bias`` (B, N) float32 in the original order: k pooled over the visible keys and a fifth
    output, the mean bias (B, P) (module docstring). ``out_k``: where to write the permuted k (k's
    shape and dtype, contiguous last dim; allocated (B, N, H, D)-strided when None)."""
    _check_qk(q, k, segments.seq_len)
    if key_bias is not None and (tuple(key_bias.shape) != (q.shape[0], q.shape[2]) or key_bias.dtype != torch.float32):
        raise ValueError(f"permute_pool: key_bias must be float32 (B, N) = {(q.shape[0], q.shape[2])}")
    write_q, write_k = _write_flags(write_permuted)
    if not triton_available(q):
        raise ValueError(f"permute_pool: the Triton kernel cannot run on {q.device} {q.dtype}; use permute_pool_ref")
    q, k = unit_last_stride(q), unit_last_stride(k)
    B, H, N, D = q.shape
    # One zero fill for both pools; permuted copies in the (B, N, H, D) layout the attention ops produce.
    pool_q, pool_k = torch.zeros(2, B, H, segments.num_parts, D, dtype=torch.float32, device=q.device).unbind(0)
    qp = empty_heads_last(q) if write_q else q  # the input itself stands in for an unwritten copy
    if out_k is not None and (tuple(out_k.shape) != tuple(k.shape) or out_k.dtype != k.dtype
                              or out_k.stride(-1) != 1):
        raise ValueError("permute_pool: out_k must match k in shape and dtype, with a contiguous last dim")
    kp = (empty_heads_last(k) if out_k is None else out_k) if write_k else k
    n_seg = segments.part.numel()
    stats = torch.zeros(2, B, segments.num_parts, dtype=torch.float32, device=q.device) if key_bias is not None \
        else pool_q  # dummy when absent: never read
    bias = unit_last_stride(key_bias) if key_bias is not None else pool_q
    if B * H * N == 0 or n_seg == 0:
        return (qp if write_q else None), (kp if write_k else None), pool_q, \
            *(finish_masked_pool(pool_k, stats[0], stats[1]) if key_bias is not None else (pool_k,))
    if block_t is None:
        block_t = 32 if interpreting() else 64
    _permute_pool_kernel[(n_seg, B * H)](
        q, k, qp, kp, pool_q, pool_k, segments.perm, segments.part, segments.start, segments.length,
        segments.inv_count, bias, stats, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        qp.stride(0), qp.stride(1), qp.stride(2),
        kp.stride(0), kp.stride(1), kp.stride(2),
        pool_q.stride(0), pool_q.stride(1), pool_q.stride(2),
        bias.stride(0), stats.stride(0), stats.stride(1),
        HEAD_DIM=D, BLOCK_D=padded_head_dim(D), BLOCK_T=block_t, WRITE_Q=write_q, WRITE_K=write_k,
        HAS_BIAS=key_bias is not None, num_warps=4,
    )
    out = (qp if write_q else None), (kp if write_k else None), pool_q
    if key_bias is None:
        return (*out, pool_k)
    return (*out, *finish_masked_pool(pool_k, stats[0], stats[1]))


def gather_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None,
                block_t: int | None = None) -> torch.Tensor:
    """Triton: ``out[:, :, i] = x[:, :, index[i]]`` for x (B, H, N, D); ``out`` any strides with a
    contiguous last dim (allocated (B, N, H, D)-strided when None). index int32 on x's device."""
    if x.dim() != 4:
        raise ValueError(f"gather_rows: x must be (B, H, N, D), got {tuple(x.shape)}")
    if not triton_available(x):
        return gather_rows_ref(x, index, out)
    x = unit_last_stride(x)
    B, H, N, D = x.shape
    if index.numel() != N:
        raise ValueError(f"gather_rows: index has {index.numel()} entries for {N} rows")
    if out is None:
        out = empty_heads_last(x)
    elif tuple(out.shape) != tuple(x.shape) or out.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError("gather_rows: out must match x in shape and dtype, with a contiguous last dim")
    if B * H * N == 0:
        return out
    if block_t is None:
        block_t = 32 if interpreting() else 64
    _gather_rows_kernel[(triton.cdiv(N, block_t), B * H)](
        x, out, index, N, H,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=D, BLOCK_D=padded_head_dim(D), BLOCK_T=block_t, num_warps=4,
    )
    return out


__all__ = ["Segments", "make_segments", "permute_pool", "permute_pool_ref", "gather_rows", "gather_rows_ref",
           "masked_pool", "finish_masked_pool", "triton_available"]
