"""Block lists the backward needs, built by one Triton launch.

From the forward lists ``kv_counts [B,H,Mq]`` / ``kv_indices [B,H,Mq,W]`` (int32) it writes

* the canonical forward lists ``[B,H,Mq]`` / ``[B,H,Mq,Mk]``: each row as a sorted set (what the dq
  pass iterates), and
* the transposed lists ``[B,H,Mk]`` / ``[B,H,Mk,Mq]``: per key block, the sorted query blocks whose
  list holds it (what the dk/dv pass iterates).

Same contract as the torch reference :func:`.block_lists.sorted_sets_ref`: duplicates collapse,
entries past the count and ids outside ``[0, Mk)`` are ignored, counts are clamped to ``[0, W]``,
slots past a list's count are 0. Nothing is read back to the host.

Why a kernel: the torch version is ~25 small launches (mask scatter, two sorts, wheres)
whose cost at Wan's sequence lengths is the host's, on the critical path of a training step
(BENCHMARKS.md, Forward + backward: lists ms, kernel vs torch ops). Here programs ``0 .. Mq-1``
of each (batch, head) build one canonical row and programs ``Mq .. Mq+Mk-1`` one transposed row;
every row is a membership test (compare a chunk of list entries with a chunk of candidate ids)
followed by a prefix-sum compaction, so the output is sorted by construction and duplicates cannot
appear.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes: candidate ids per membership test and list entries compared at once. Small on purpose:
# the work is tiny (Mq * Mk * density compares per head) and small tiles keep registers low.
_IDS = 64
_ENTRIES = 16


@triton.jit
def _compact_store(out_ptr, ids, hit, written):
    """Write the ids with ``hit`` at ``out_ptr[written + rank]``; returns the new ``written``."""
    pos = written + tl.cumsum(hit, axis=0) - hit  # exclusive prefix sum: rank among this chunk's hits
    tl.store(out_ptr + pos, ids, mask=hit > 0)
    return written + tl.sum(hit, axis=0)


@triton.jit
def _zero_tail(out_ptr, written, length, IDS: tl.constexpr):
    for c0 in range(0, length, IDS):
        cols = c0 + tl.arange(0, IDS)
        tl.store(out_ptr + cols, tl.zeros([IDS], dtype=tl.int32), mask=(cols >= written) & (cols < length))


@triton.jit(do_not_specialize=["MQ", "MK", "W"])
def _block_lists_kernel(
    Counts, Indices, FCounts, FIndices, QCounts, QIndices,
    s_cb, s_ch, s_cm,
    s_ib, s_ih, s_im, s_iw,
    H, MQ, MK, W,
    IDS: tl.constexpr, ENTRIES: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    counts_base = Counts + b * s_cb + h * s_ch
    lists_base = Indices + b * s_ib + h * s_ih
    if pid < MQ:
        # Canonical forward row m: which key blocks c in [0, MK) does list m hold?
        m = pid
        count = tl.minimum(tl.maximum(tl.load(counts_base + m * s_cm), 0), W)
        row = lists_base + m * s_im
        out = FIndices + (bh * MQ + m) * MK
        written = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, MK, IDS):
            cols = c0 + tl.arange(0, IDS)
            hit = tl.zeros([IDS], dtype=tl.int32)
            for j0 in range(0, count, ENTRIES):
                j = j0 + tl.arange(0, ENTRIES)
                idx = tl.load(row + j * s_iw, mask=j < count, other=-1)
                hit = tl.maximum(hit, tl.max((idx[:, None] == cols[None, :]).to(tl.int32), axis=0))
            hit = tl.where(cols < MK, hit, 0)
            written = _compact_store(out, cols, hit, written)
        _zero_tail(out, written, MK, IDS)
        tl.store(FCounts + bh * MQ + m, written)
    else:
        # Transposed row kb: which query blocks m list kb?
        kb = pid - MQ
        out = QIndices + (bh * MK + kb) * MQ
        written = tl.zeros([], dtype=tl.int32)
        for m0 in range(0, MQ, IDS):
            rows = m0 + tl.arange(0, IDS)
            row_ok = rows < MQ
            cnt = tl.load(counts_base + rows * s_cm, mask=row_ok, other=0)
            cnt = tl.minimum(tl.maximum(cnt, 0), W)
            hit = tl.zeros([IDS], dtype=tl.int32)
            for j0 in range(0, tl.max(cnt, axis=0), ENTRIES):
                j = j0 + tl.arange(0, ENTRIES)
                ok = j[None, :] < cnt[:, None]
                idx = tl.load(lists_base + rows[:, None] * s_im + j[None, :] * s_iw, mask=ok, other=-1)
                hit = tl.maximum(hit, tl.max((idx == kb).to(tl.int32), axis=1))
            written = _compact_store(out, rows, hit, written)
        _zero_tail(out, written, MQ, IDS)
        tl.store(QCounts + bh * MK + kb, written)


def block_lists_triton(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int, transposed: bool = True,
                       tiles: tuple[int, int] = (_IDS, _ENTRIES)):
    """``((counts [B,H,Mq], lists [B,H,Mq,Mk]), (q_counts [B,H,Mk], q_lists [B,H,Mk,Mq]))`` in one
    launch; with ``transposed=False`` only the canonical pair is built and the second is None.
    ``tiles``: (ids, entries) per membership test, powers of two (tests shrink them to reach the
    multi-chunk loops on tiny shapes). The lists are trusted to pass :meth:`.BlockLists.check`."""
    B, H, mq, width = kv_indices.shape
    dev = kv_indices.device
    f_counts = torch.empty(B, H, mq, dtype=torch.int32, device=dev)
    f_lists = torch.empty(B, H, mq, mk, dtype=torch.int32, device=dev)
    q_counts = torch.empty(B, H, mk, dtype=torch.int32, device=dev)
    q_lists = torch.empty(B, H, mk, mq, dtype=torch.int32, device=dev)
    if B * H == 0 or mq == 0 or mk == 0:
        # No programs to launch: every list is empty (a row of width 0 has nothing to write).
        f_counts.zero_(), q_counts.zero_()
    else:
        grid = (mq + (mk if transposed else 0), B * H)
        _block_lists_kernel[grid](
            kv_counts, kv_indices, f_counts, f_lists, q_counts, q_lists,
            *kv_counts.stride(), *kv_indices.stride(), H, mq, mk, width,
            IDS=tiles[0], ENTRIES=tiles[1], num_warps=2,
        )
    return (f_counts, f_lists), ((q_counts, q_lists) if transposed else None)
