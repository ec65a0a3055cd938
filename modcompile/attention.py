"""The public block-sparse attention function and the custom op behind it (with its backward)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .autograd import attach_autograd
from .dispatch import PRECISIONS, attention_forward, outputs_like
from .kernels._common import validation_requested
from .kernels.block_lists import BlockLists, as_block_lists


@torch.library.custom_op("modcompile::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_counts: Tensor, kv_indices: Tensor,
                               block_size: int, scale: float, precision: str = "auto") -> tuple[Tensor, Tensor]:
    return attention_forward(q, k, v, BlockLists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2]), scale,
                             precision=precision)


@_block_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, block_size, scale, precision="auto"):
    return outputs_like(q)


attach_autograd(_block_sparse_attention_op)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, lists: BlockLists) -> None:
    """Clear errors for shapes, dtypes and devices the kernel cannot take. Reads only tensor
    metadata: no host sync (the list values are :meth:`BlockLists.validate`'s job)."""
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"k, v must be (B, H, Nk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape[3] != D:
        raise ValueError("v must have the head_dim of q")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must be floating point; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v and the block lists must be on one device")
    block_size = lists.block_size
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    lists.check(B, H, q.device)
    if lists.width < 1:
        raise ValueError(f"kv_indices must be (B, H, Mq, Mk_max) with Mk_max >= 1; got {tuple(lists.indices.shape)}")


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_counts: Tensor | BlockLists,
                           kv_indices: Tensor | None = None, *, block_size: int | None = None,
                           scale: float | None = None, return_lse: bool = False, validate: bool | None = None,
                           precision: str = "auto"):
    """Attention of every query block to its listed key blocks only.

    q, k, v: (B, H, N, D). The lists: a :class:`BlockLists` (``kv_indices`` None), or kv_counts
    (B, H, Mq) int32 and kv_indices (B, H, Mq, Mk_max) int32, entries past the count ignored, with
    ``block_size`` (None: 128). Runs the Triton kernel on CUDA (and on CPU under
    TRITON_INTERPRET=1), the torch reference otherwise. Shapes, dtypes and devices are always
    checked (no host sync). The list values (counts in range, entries in range and distinct per
    row) are trusted unless ``validate=True``, or ``validate=None`` with ``MODCOMPILE_VALIDATE=1``:
    then :meth:`BlockLists.validate` raises a ValueError naming the fault, at the cost of one host
    sync.

    ``precision``: ``"auto"`` computes in the inputs' dtype; ``"fp8"`` quantizes q and k to int8 per
    token and v to e4m3 per block and channel and runs the 8-bit kernel (P in e4m3; compute
    capability 8.9+; the fp8 torch reference on CPU and
    under TRITON_INTERPRET=1; elsewhere the input-dtype kernel, with a logged reason). Forward only:
    a ValueError when gradients are needed."""
    if precision not in PRECISIONS:
        raise ValueError(f"block_sparse_attention: precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("block_sparse_attention: precision='fp8' has no backward; call it under "
                         "torch.no_grad() or with inputs that do not require grad")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    check_attention_inputs(q, k, v, lists)
    if validation_requested(validate):
        lists.validate()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.modcompile.block_sparse_attention(q, k, v, lists.counts, lists.indices,
                                                           lists.block_size, scale, precision)
    return (out, lse) if return_lse else out
