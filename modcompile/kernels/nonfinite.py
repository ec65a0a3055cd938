"""Which query blocks dense SDPA would spoil through a key block they skip (``nonfinite="dense"``).

Dense SDPA reads every key: a NaN / Inf in one key or value makes the rows that meet it
non-finite, a NaN all of them. Block-sparse attention reads only the listed key blocks, so a
non-finite block outside a row's list would vanish. The dense-like rule writes NaN into those rows;
it is found in two small launches before the attention kernel, which then writes the NaN in its own
epilogue (``poison`` of :func:`block_sparse_attention.block_sparse_attention_fwd`), so nothing is
proportional to the output:

1. :func:`block_flags`: one read of k and v, a flag per (batch, head, key block) that holds a NaN /
   Inf (rows past the end of the sequence and columns past the head dim are not read);
2. :func:`poisoned_query_blocks`: per (batch, head, query block), whether its list skips a flagged
   block, i.e. lists fewer flagged blocks than the head holds (entries past the count are ignored;
   listed ids must be distinct, as for the attention kernel).

A row that lists every flagged block keeps the kernel's own result (NaN where dense is NaN). For
Inf the rule is conservative: a row that dense SDPA keeps finite through a -inf score becomes NaN.

Torch references of the same contract (:func:`block_flags_ref`, :func:`poisoned_query_blocks_ref`)
are the CPU path and the tests' ground truth; this module stays importable without triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import padded_head_dim

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work
    triton = None

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a constexpr: jitted code may read only those globals


# ----------------------------------------------------------------------------- references

def block_flags_ref(k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, Mk) bool: key block j of (b, h) holds a NaN / Inf in k or v."""
    B, H, Nk, _ = k.shape
    mk = -(-Nk // block_size)
    token_bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    return F.pad(token_bad, (0, mk * block_size - Nk)).view(B, H, mk, block_size).any(-1)


def poisoned_query_blocks_ref(flags: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """(B, H, Mq) bool: the query block's list (first ``count`` entries) skips a flagged key block."""
    mk = flags.shape[-1]
    listed = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_counts.unsqueeze(-1)
    ids = kv_indices.long().clamp(0, mk - 1)
    listed_bad = (flags.unsqueeze(2).expand(*ids.shape[:3], mk).gather(-1, ids) & listed).sum(-1)
    return listed_bad < flags.sum(-1, keepdim=True)


def poison_rows_(out: torch.Tensor, lse: torch.Tensor, poison: torch.Tensor, block_size: int,
                 q_rows: torch.Tensor | None = None) -> None:
    """Torch path: NaN into ``out`` (B, H, N, D) and ``lse`` (B, H, N) on the rows of poisoned query
    blocks (in place). ``q_rows``: the lists' row ``r`` is token ``q_rows[r]`` (VMoBA)."""
    B, H, mq = poison.shape
    n = out.shape[2]
    rows = poison.unsqueeze(-1).expand(B, H, mq, block_size).reshape(B, H, mq * block_size)[..., :n]
    if q_rows is not None:
        rows = torch.empty_like(rows).index_copy_(2, q_rows.long(), rows)
    out.masked_fill_(rows.unsqueeze(-1), float("nan"))
    lse.masked_fill_(rows, float("nan"))


# ----------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _block_flags_kernel(K, V, Flags, N_K, H,
                            stride_kb, stride_kh, stride_kn, stride_kd,
                            stride_vb, stride_vh, stride_vn, stride_vd,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """One program per (key block, batch x head): the whole block of k and v, one int8 flag."""
        kb = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = kb * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < N_K)[:, None] & (cols < HEAD_DIM)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        k_ptrs = K + b * stride_kb + h * stride_kh + rows64 * stride_kn + cols[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + rows64 * stride_vn + cols[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=ok, other=0.0)
        v = tl.load(v_ptrs, mask=ok, other=0.0)
        # |x| <= FLT_MAX is false exactly for NaN and +-Inf (in fp32: FLT_MAX is Inf in bf16)
        k_bad = tl.where(tl.abs(k.to(tl.float32)) <= FLT_MAX, 0, 1)
        v_bad = tl.where(tl.abs(v.to(tl.float32)) <= FLT_MAX, 0, 1)
        bad = tl.max(tl.max(tl.maximum(k_bad, v_bad), 1), 0)
        tl.store(Flags + pid_bh * tl.num_programs(0) + kb, bad.to(tl.int8))

    @triton.jit(do_not_specialize=["MQ", "MK", "W"])  # list shapes vary per site: one compile
    def _poison_kernel(Flags, Counts, Indices, Poison, MQ, MK, W, H,
                       stride_cb, stride_ch, stride_cm,
                       stride_ib, stride_ih, stride_im, stride_ij,
                       ROWS: tl.constexpr, ENTRIES: tl.constexpr, IDS: tl.constexpr):
        """``ROWS`` query blocks of one (batch, head): flagged blocks listed < flagged blocks held."""
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        flags = Flags + pid_bh * MK
        total = 0
        for c0 in range(0, MK, IDS):  # the head's flagged blocks (recounted per program: MK is small)
            cols = c0 + tl.arange(0, IDS)
            total += tl.sum(tl.load(flags + cols, mask=cols < MK, other=0).to(tl.int32), 0)
        qb = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = qb < MQ
        count = tl.load(Counts + b * stride_cb + h * stride_ch + qb * stride_cm, mask=row_ok, other=0)
        count = tl.minimum(count, W)
        listed = tl.zeros([ROWS], dtype=tl.int32)
        for j0 in range(0, tl.max(count, 0), ENTRIES):
            j = j0 + tl.arange(0, ENTRIES)
            used = row_ok[:, None] & (j[None, :] < count[:, None])
            ids = tl.load(Indices + b * stride_ib + h * stride_ih + qb[:, None] * stride_im + j[None, :] * stride_ij,
                          mask=used, other=0)
            ids = tl.minimum(tl.maximum(ids, 0), MK - 1)
            listed += tl.sum(tl.load(flags + ids, mask=used, other=0).to(tl.int32), 1)
        tl.store(Poison + pid_bh * MQ + qb, (listed < total).to(tl.int8), mask=row_ok)


def block_flags(k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """Triton :func:`block_flags_ref`: (B, H, Mk) int8, 1 where the key block holds a NaN / Inf in k
    or v. k and v (B, H, Nk, D) with any strides (e.g. views of (B, Nk, H, D) storage)."""
    B, H, Nk, D = k.shape
    mk = triton.cdiv(Nk, block_size)
    flags = torch.empty(B, H, mk, dtype=torch.int8, device=k.device)
    if flags.numel() == 0:
        return flags
    block_d = padded_head_dim(D)
    # a block of k and v in registers: 8 warps keep that at 64 fp32 values per tensor per thread
    warps = 8 if block_size * block_d >= 128 * 128 else 4
    _block_flags_kernel[(mk, B * H)](k, v, flags, Nk, H, *k.stride(), *v.stride(),
                                     HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, num_warps=warps)
    return flags


def poisoned_query_blocks(flags: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """Triton :func:`poisoned_query_blocks_ref`: (B, H, Mq) int8, contiguous (the layout the
    attention kernel's ``poison`` reads). ``flags`` (B, H, Mk) int8 contiguous, as
    :func:`block_flags` writes it."""
    B, H, mq, width = kv_indices.shape
    mk = flags.shape[-1]
    poison = torch.empty(B, H, mq, dtype=torch.int8, device=flags.device)
    if poison.numel() == 0:
        return poison
    rows = 16
    _poison_kernel[(triton.cdiv(mq, rows), B * H)](
        flags.contiguous(), kv_counts, kv_indices, poison, mq, mk, width, H,
        *kv_counts.stride(), *kv_indices.stride(), ROWS=rows, ENTRIES=32, IDS=1024)
    return poison
