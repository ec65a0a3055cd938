"""Which implementation runs a block-sparse attention call: the Triton kernel (CUDA, or the CPU
interpreter) or the torch reference, cuDNN for dense calls that need the lse. The ops and the
policies call these; nothing here knows about graphs or sites."""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels._common import attention_path, empty_heads_last
from .kernels.block_lists import num_blocks
from .kernels.reference import block_sparse_attention_ref
from .kernels.state import KERNEL_STATE

log = logging.getLogger("modcompile")


@KERNEL_STATE.memo
@functools.lru_cache(maxsize=1)
def _triton_forward():
    try:
        from .kernels.block_sparse_attention import block_sparse_attention_fwd
    except ImportError:
        return None
    return block_sparse_attention_fwd


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels run on ``t`` (B, H, N, D): :func:`kernels._common.attention_path`
    says "triton" for its device, dtype and head_dim (CUDA; CPU only under TRITON_INTERPRET=1 and
    not for bf16). Anything else takes the torch references. The one switch between Triton and
    the references: tests that want the reference paths patch this function (toggling
    TRITON_INTERPRET inside a process confuses Triton's launcher)."""
    if _triton_forward() is None:
        return False
    return attention_path(t.device, t.dtype, t.shape[-1])[0] == "triton"


def use_triton_backward(q: Tensor, block_size: int) -> bool:
    """Whether the Triton backward runs on ``q``: :func:`use_triton`, and a block size and head dim
    the backward kernels cover (others take the torch reference)."""
    if block_size < 16 or block_size & (block_size - 1) or q.shape[-1] > 256:
        return False
    return use_triton(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


# (B, N, H, D) storage viewed as (B, H, N, D), as with the flash SDPA backends.
out_like = empty_heads_last


def attention_forward(q, k, v, kv_counts, kv_indices, block_size: int, scale: float,
                      q_rows: Optional[Tensor] = None, key_bias: Optional[Tensor] = None,
                      like_dense: bool = False):
    """Block-sparse attention on the best available path; returns ``(out, lse)``.

    ``key_bias`` (B, Nk) float32, in k's order: added to the scaled scores of each key (``-inf``
    removes it), as SDPA adds a (B, 1, 1, Nk) float mask.

    ``q_rows`` (N,) int32 permutation (VMoBA): the lists, k and v are in permuted token order, q and
    the returned out / lse in the original one; permuted row ``r`` is token ``q_rows[r]``. The kernel
    gathers q and scatters out / lse itself; the torch path permutes q and un-permutes around the
    reference. ``like_dense`` (the rewritten sites): NaN also on the rows that dense SDPA would make
    non-finite through a key or value block they do not list (:func:`nonfinite_like_dense`)."""
    out = out_like(q)
    if use_triton(q):
        out, lse = _triton_forward()(q, k, v, kv_counts, kv_indices, block_size=block_size, scale=scale, out=out,
                                     q_rows=q_rows, key_bias=key_bias)
    else:
        rows = None if q_rows is None else q_rows.to(torch.int64)
        q_in = q if rows is None else q.index_select(2, rows)
        ref_out, lse = block_sparse_attention_ref(q_in, k, v, kv_counts, kv_indices, block_size=block_size,
                                                  scale=scale, key_bias=key_bias)
        if rows is None:
            out = out.copy_(ref_out)
        else:
            out, lse = out.index_copy_(2, rows, ref_out.to(out.dtype)), torch.empty_like(lse).index_copy_(2, rows, lse)
    if like_dense:
        nonfinite_like_dense(out, lse, k, v, kv_counts, kv_indices, block_size, q_rows)
    return out, lse


def nonfinite_like_dense(out: Tensor, lse: Tensor, k: Tensor, v: Tensor, kv_counts: Tensor, kv_indices: Tensor,
                         block_size: int, q_rows: Optional[Tensor] = None) -> None:
    """Write NaN into the rows of ``out`` / ``lse`` whose query block does not list every key
    block holding a NaN / Inf in k or v (in place, on device, no host sync).

    Dense SDPA reads every key: one NaN key or value makes every row NaN, an infinite one makes
    the rows that meet it NaN or Inf. Block-sparse attention propagates what its listed blocks
    hold; without this a NaN outside a row's list would vanish into a finite output. Rows that
    list all such blocks keep the kernel's own result (NaN where dense is NaN); for Inf the rule
    is conservative (a row that dense SDPA leaves finite through a -inf score becomes NaN). Cost:
    one read of k and v and a few small ops on the lists."""
    B, H, Nk, _ = k.shape
    N = out.shape[2]
    mk = num_blocks(Nk, block_size)
    # A row sum is non-finite iff the row holds a NaN or Inf (finite values would have to overflow).
    token_bad = (k.sum(-1, dtype=torch.float32) + v.sum(-1, dtype=torch.float32)).isfinite().logical_not_()
    block_bad = F.pad(token_bad, (0, mk * block_size - Nk)).view(B, H, mk, block_size).any(-1)  # (B, H, Mk)
    width = kv_indices.shape[-1]
    listed = torch.arange(width, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    ids = kv_indices.long().clamp(0, mk - 1)
    mq = ids.shape[2]
    listed_bad = (block_bad.unsqueeze(2).expand(B, H, mq, mk).gather(-1, ids) & listed).sum(-1)
    missing = listed_bad < block_bad.sum(-1, keepdim=True)                                      # (B, H, Mq)
    rows = missing.unsqueeze(-1).expand(B, H, mq, block_size).reshape(B, H, mq * block_size)[..., :N]
    if q_rows is not None:  # permuted row r is token q_rows[r]
        rows = torch.empty_like(rows).index_copy_(2, q_rows.long(), rows)
    out.masked_fill_(rows.unsqueeze(-1), float("nan"))
    lse.masked_fill_(rows, float("nan"))


def dense_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float):
    """Dense attention and its natural-log lse (B, H, N) from cuDNN's fused SDPA, for dense calls
    that observe (MOD's dense steps): faster than our kernel at density 1. None where cuDNN cannot
    run (CPU, unsupported shape or dtype): the caller then takes the block-sparse kernel."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or KERNEL_STATE.cudnn_lse_broken:
        return None
    out, lse = outputs_like(q)
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
        lse.copy_(res[1].reshape(lse.shape))
    except RuntimeError as err:
        KERNEL_STATE.cudnn_lse_broken = True
        log.info("cuDNN attention with lse unavailable (%s): dense observed calls use the Triton kernel", err)
        return None
    return out.copy_(res[0]), lse



def outputs_like(q: Tensor):
    B, H, N, D = q.shape
    return out_like(q), q.new_empty(B, H, N, dtype=torch.float32)
