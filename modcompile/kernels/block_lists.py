"""Block lists: which key blocks each query block attends, the input of every block-sparse kernel.

For every (batch, head, query block) a count and a list of key blocks, ``counts (B, H, Mq)`` and
``indices (B, H, Mq, W)``, int32; entries past the count are ignored. Blocks are ``block_size``
tokens; the last block of a sequence whose length is not a multiple of it is ragged.

:class:`BlockLists` holds the two tensors with the block size and both sequence lengths, the one
shape check (:meth:`BlockLists.check`, metadata only) and the one value check
(:meth:`BlockLists.validate`, one host sync), the one conversion each way (:meth:`from_mask`,
:meth:`to_mask`) and, built on first use and kept, the lists the backward iterates: the canonical
lists (each row a sorted set) and the transposed ones (per key block, the query blocks that list
it). The tensor-level functions below are what the methods call; hot paths and CUDA-graph captures
(the policies) call them directly to skip the object.

Torch only at import: the Triton list builder (:mod:`.block_lists_kernel`) is imported on first use.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ._common import interpreting


def num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def full_block_lists(batch: int, heads: int, mq: int, mk: int, device=None):
    """``(counts, indices)`` that select every key block for every query block (density 1.0)."""
    counts = torch.full((batch, heads, mq), mk, dtype=torch.int32, device=device)
    indices = torch.arange(mk, dtype=torch.int32, device=device).expand(batch, heads, mq, mk)
    return counts, indices.contiguous()


def lists_from_mask(mask: Tensor):
    """``(counts (..., Mq), indices (..., Mq, Mk))`` int32 of a bool block mask, on device, without a
    host sync: selected blocks first in increasing order, then the skipped ones (ignored).

    One sort of ``id`` (selected) / ``Mk + id`` (not selected), then ``% Mk``. The constants are
    cached device tensors (a Python scalar in ``torch.where`` would be copied host -> device on every
    call, which a CUDA graph capture cannot hold)."""
    mk = mask.shape[-1]
    ids, shifted = _list_keys(mk, mask.device)
    counts = mask.sum(-1, dtype=torch.int32)
    ordered = torch.where(mask, ids, shifted).sort(dim=-1).values
    return counts, ordered.remainder_(mk)


@lru_cache(maxsize=None)  # never evicted: captured CUDA graphs hold the addresses (cuda_graphs.py)
def _list_keys(mk: int, device: torch.device):
    ids = torch.arange(mk, device=device, dtype=torch.int32)
    return ids, ids + mk


def mask_from_lists(counts: Tensor, indices: Tensor, mk: int) -> Tensor:
    """Bool block mask ``(..., Mq, Mk)`` of the lists as sets: duplicates collapse, counts are
    clamped to ``[0, W]``, entries past the count and ids outside ``[0, Mk)`` are ignored."""
    width = indices.shape[-1]
    idx = indices.long()
    valid = torch.arange(width, device=indices.device) < counts.unsqueeze(-1).long()
    valid &= (idx >= 0) & (idx < mk)
    # Invalid slots write to a spare column that is cut off afterwards.
    idx = torch.where(valid, idx, mk)
    mask = torch.zeros(*indices.shape[:-1], mk + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :mk]


def sorted_sets_ref(counts: Tensor, indices: Tensor, mk: int, transposed: bool = True):
    """Torch reference of :func:`.block_lists_kernel.block_lists_triton` (same contract): the
    canonical lists ``(counts (B,H,Mq), lists (B,H,Mq,Mk))`` and, with ``transposed``, the
    transposed ones ``(counts (B,H,Mk), lists (B,H,Mk,Mq))`` (else None); sorted, slots past a
    count 0."""
    mask = mask_from_lists(counts, indices, mk)
    canonical = _zero_tail(*lists_from_mask(mask))
    return canonical, (_zero_tail(*lists_from_mask(mask.transpose(-1, -2))) if transposed else None)


def _zero_tail(counts: Tensor, indices: Tensor):
    width = indices.shape[-1]
    keep = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
    return counts, torch.where(keep, indices, 0)


def _list_kernel_runs(t: Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def _sorted_sets(counts: Tensor, indices: Tensor, mk: int, transposed: bool):
    """One Triton launch on CUDA and under the interpreter, torch ops otherwise."""
    if _list_kernel_runs(indices):
        from .block_lists_kernel import block_lists_triton
        return block_lists_triton(counts, indices, mk, transposed=transposed)
    return sorted_sets_ref(counts, indices, mk, transposed=transposed)


class BlockLists:
    """Block lists of one attention call: ``counts (B, H, Mq)`` and ``indices (B, H, Mq, W)`` int32,
    ``block_size`` tokens per block, ``q_len`` queries and ``kv_len`` keys (Mq and Mk blocks).

    Building one reads only metadata (no device work, no host sync). ``transposed`` (optional): the
    transposed lists when the caller already has them."""

    __slots__ = ("counts", "indices", "block_size", "q_len", "kv_len", "_canonical", "_transposed")

    def __init__(self, counts: Tensor, indices: Tensor, block_size: int, q_len: int, kv_len: int,
                 *, transposed: BlockLists | None = None):
        self.counts, self.indices = counts, indices
        self.block_size, self.q_len, self.kv_len = int(block_size), int(q_len), int(kv_len)
        self._canonical: BlockLists | None = None
        self._transposed = transposed

    # ------------------------------------------------------------------ construction
    @classmethod
    def full(cls, batch: int, heads: int, q_len: int, kv_len: int, block_size: int, device=None) -> BlockLists:
        """Every key block for every query block."""
        counts, indices = full_block_lists(batch, heads, num_blocks(q_len, block_size),
                                           num_blocks(kv_len, block_size), device)
        return cls(counts, indices, block_size, q_len, kv_len)

    @classmethod
    def from_mask(cls, mask: Tensor, block_size: int, q_len: int | None = None,
                  kv_len: int | None = None) -> BlockLists:
        """The lists of a bool block mask ``(B, H, Mq, Mk)`` (width Mk, sorted, no host sync).
        Sequence lengths default to whole blocks."""
        mq, mk = mask.shape[-2:]
        counts, indices = lists_from_mask(mask)
        return cls(counts, indices, block_size, mq * block_size if q_len is None else q_len,
                   mk * block_size if kv_len is None else kv_len)

    # ------------------------------------------------------------------ shape
    @property
    def mq(self) -> int:
        return num_blocks(self.q_len, self.block_size)

    @property
    def mk(self) -> int:
        return num_blocks(self.kv_len, self.block_size)

    @property
    def width(self) -> int:
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def __repr__(self) -> str:
        return (f"BlockLists(B, H = {tuple(self.counts.shape[:2])}, Mq={self.mq}, Mk={self.mk}, W={self.width}, "
                f"block_size={self.block_size}, q_len={self.q_len}, kv_len={self.kv_len}, device={self.device})")

    # ------------------------------------------------------------------ checks
    def check(self, batch: int, heads: int, device: torch.device | None = None) -> None:
        """The shape check: int32 tensors, ``counts (batch, heads, Mq)``, ``indices (batch, heads,
        Mq, W)``, on ``device`` when given. Metadata only: no device work, no host sync."""
        counts, indices = self.counts, self.indices
        if not isinstance(counts, Tensor) or not isinstance(indices, Tensor):
            raise TypeError("kv_counts and kv_indices must be tensors")
        if counts.dtype != torch.int32 or indices.dtype != torch.int32:
            raise TypeError(f"kv_counts and kv_indices must be int32; got {counts.dtype}, {indices.dtype}")
        want = (batch, heads, self.mq)
        if counts.dim() != 3 or tuple(counts.shape) != want:
            raise ValueError(f"kv_counts must be (B, H, Mq) = {want} for {self.q_len} queries in blocks of "
                             f"{self.block_size}; got {tuple(counts.shape)}")
        if indices.dim() != 4 or tuple(indices.shape[:3]) != want:
            raise ValueError(f"kv_indices must be (B, H, Mq, W) with (B, H, Mq) = {want}; got {tuple(indices.shape)}")
        if device is not None and not (counts.device == indices.device == torch.device(device)):
            raise ValueError(f"kv_counts and kv_indices must be on {device}; got {counts.device}, {indices.device}")

    def validate(self, q_rows: Tensor | None = None, max_count: int | None = None) -> None:
        """The value check: raise ValueError naming the fault unless every count is in ``[0,
        max_count]`` (default: the width, at most Mk), every listed entry is in ``[0, Mk)``, no row
        lists a block twice (the kernels' softmax would count it twice) and ``q_rows``, when given,
        is a permutation of ``range(len(q_rows))``.

        The faults are reduced on the device and read back together: one host sync, so it runs only
        where asked for (``validate=True`` or ``MODCOMPILE_VALIDATE=1``), never on the default path."""
        indices, mk, width = self.indices, self.mk, self.width
        max_count = min(width, mk) if max_count is None else max_count
        counts = self.counts.long()
        bad_count = ((counts < 0) | (counts > max_count)).any()
        valid = torch.arange(width, device=indices.device) < counts.clamp(0, width).unsqueeze(-1)
        idx = indices.long()
        bad_entry = (valid & ((idx < 0) | (idx >= mk))).any()
        # Duplicates: sort each row with the unused slots pushed past every valid id.
        ordered = torch.where(valid, idx, torch.full_like(idx, mk + width)).sort(dim=-1).values
        duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] < mk)).any()
        faults = [bad_count, bad_entry, duplicate]
        if q_rows is not None:
            expected = torch.arange(q_rows.numel(), device=q_rows.device, dtype=torch.long)
            faults.append((q_rows.long().sort().values != expected).any())
        found = torch.stack(faults).tolist()  # the one host read
        messages = (f"kv_counts must lie in [0, {max_count}] (kv_indices width {width}, {mk} key blocks)",
                    f"kv_indices has entries outside [0, {mk})",
                    "kv_indices lists a key block twice in one row",
                    "q_rows must be a permutation of range(N) (every row written exactly once)")
        for fault, message in zip(found, messages):
            if fault:
                raise ValueError(message)

    # ------------------------------------------------------------------ views
    def to_mask(self) -> Tensor:
        """Bool block mask ``(B, H, Mq, Mk)`` of the lists as sets (see :func:`mask_from_lists`)."""
        return mask_from_lists(self.counts, self.indices, self.mk)

    def density(self) -> Tensor:
        """Fraction of the (query block, key block) pairs listed, a 0-dim tensor (trusts the lists).
        Counts blocks, not tokens: with a ragged last block this is the kernels' share of block work."""
        return self.counts.double().mean() / self.mk

    def canonical(self) -> BlockLists:
        """Each row as a sorted set (width Mk, slots past the count 0): what the dq pass iterates.
        Built on first use (with the transposed lists when those are wanted too) and kept."""
        if self._canonical is None:
            (counts, indices), _ = _sorted_sets(self.counts, self.indices, self.mk, transposed=False)
            self._canonical = BlockLists(counts, indices, self.block_size, self.q_len, self.kv_len)
        return self._canonical

    def transposed(self) -> BlockLists:
        """Per key block, the sorted query blocks whose list holds it: the lists of the transposed
        problem (``kv_len`` queries, ``q_len`` keys), what the dk/dv pass iterates. One launch
        builds it and the canonical lists; both are kept."""
        if self._transposed is None:
            (fc, fi), (qc, qi) = _sorted_sets(self.counts, self.indices, self.mk, transposed=True)
            if self._canonical is None:
                self._canonical = BlockLists(fc, fi, self.block_size, self.q_len, self.kv_len)
            self._transposed = BlockLists(qc, qi, self.block_size, self.kv_len, self.q_len)
        return self._transposed


def as_block_lists(kv_counts, kv_indices, block_size: int | None, q_len: int, kv_len: int) -> BlockLists:
    """The entry points' one way in: a :class:`BlockLists` as given (``kv_indices`` None,
    ``block_size`` None or its own), or one built from ``(kv_counts, kv_indices)`` (``block_size``
    None: 128). Checks only that the lengths match; shapes are :meth:`BlockLists.check`'s job."""
    if isinstance(kv_counts, BlockLists):
        lists = kv_counts
        if kv_indices is not None:
            raise TypeError("pass either a BlockLists or (kv_counts, kv_indices), not both")
        if block_size is not None and block_size != lists.block_size:
            raise ValueError(f"block_size {block_size} differs from the BlockLists' {lists.block_size}")
        if (lists.q_len, lists.kv_len) != (q_len, kv_len):
            raise ValueError(f"BlockLists are for {lists.q_len} queries and {lists.kv_len} keys; "
                             f"got {q_len} and {kv_len}")
        return lists
    if kv_indices is None:
        raise TypeError("kv_indices is required with kv_counts (or pass a BlockLists)")
    return BlockLists(kv_counts, kv_indices, 128 if block_size is None else block_size, q_len, kv_len)


__all__ = ["BlockLists", "as_block_lists", "full_block_lists", "lists_from_mask", "mask_from_lists",
           "num_blocks", "sorted_sets_ref"]
