"""Output buffers that come back at the same address call after call.

The site calls' CUDA graphs (:data:`.cuda_graphs.SITE_CALLS`) are keyed by the address of every
tensor a call touches. Freshly allocated outputs (a call's block lists, out and lse, VMoBA's
permuted k) get whatever address the caching allocator has free at that moment, which moves
whenever something outlives a step (the scheduler's history, a refreshed mask) and then no key
repeats. :class:`BufferPool` keeps them instead: :meth:`BufferPool.take` hands out a new alias of a
pooled tensor that nothing references any more (its storage's use count is back to what it was
when the pool made it) and makes another only while every one of that shape is in use. The calls
of a denoising loop take and release in the same order every step, so each call gets the same
buffers every step.

An alias somebody keeps (a model output that is a view of it, a tensor saved for backward) keeps
its buffer out of the pool's hands until it is dropped: nothing handed out is overwritten while
anyone can read it. Per shape the pool keeps at most ``max_per_shape`` buffers of at most
``max_bytes`` each; beyond that ``take`` allocates as usual (such large calls are GPU-bound: their
launch cost hides behind the kernels anyway).
"""
from __future__ import annotations

import torch


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferPool:
    """Reusable output tensors per (shape, dtype, device, layout); see the module docstring."""

    def __init__(self, max_per_shape: int = 8, max_bytes: int = 1 << 29):
        self.max_per_shape = max_per_shape
        self.max_bytes = max_bytes
        self._buffers: dict = {}  # key -> list of (tensor, its storage's use count when free)

    def take(self, shape, dtype: torch.dtype, device: torch.device, heads_last: bool = False) -> torch.Tensor:
        """An uninitialised tensor nobody else holds; ``heads_last``: a (B, H, N, D) tensor stored
        (B, N, H, D), the layout of the attention outputs."""
        key = (tuple(shape), dtype, device, heads_last)
        entries = self._buffers.get(key)
        if entries is None:
            entries = self._buffers[key] = []
        for buf, free in entries:
            if _use_count(buf) == free:
                return buf.detach()  # a new alias: while it lives, the buffer is in use
        if heads_last:
            b, h, n, d = shape
            buf = torch.empty(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            buf = torch.empty(shape, dtype=dtype, device=device)
        if len(entries) >= self.max_per_shape or buf.numel() * buf.element_size() > self.max_bytes:
            return buf
        entries.append((buf, _use_count(buf)))
        return buf.detach()

    def clear(self) -> None:
        self._buffers.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._buffers.values())


# The site ops' outputs on the replayable path (modcompile/ops.py); modcompile.reset() empties it.
SITE_OUTPUTS = BufferPool()

__all__ = ["BufferPool", "SITE_OUTPUTS"]
