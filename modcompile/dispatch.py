"""Which implementation runs a block-sparse attention call: the Triton kernel (CUDA, or the CPU
interpreter) or the torch reference, cuDNN for dense calls that need the lse. The ops and the
policies call these; nothing here knows about graphs or sites."""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch import Tensor

from .kernels import nonfinite
from .kernels._common import attention_path, empty_heads_last
from .kernels.block_lists import BlockLists
from .kernels.fp8_attention import block_sparse_attention_fp8, block_sparse_attention_fp8_ref, fp8_path
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


PRECISIONS = ("auto", "fp8")


def fp8_route(q: Tensor, block_size: int, key_bias: Optional[Tensor] = None,
              scale: Optional[float] = None) -> tuple[str, str]:
    """Where a ``precision="fp8"`` call runs: ``("kernel", "")``, ``("reference", why)`` (CPU and
    the interpreter: the fp8 torch reference) or ``("none", why)``: the input-dtype path instead."""
    if key_bias is not None:
        return "none", "fp8 attention takes no key-padding mask"
    if scale is not None and not scale > 0:
        return "none", f"fp8 attention needs scale > 0, got {scale}"
    return fp8_path(q, block_size)


@KERNEL_STATE.memo
@functools.lru_cache(maxsize=None)
def _warn_fp8(why: str) -> None:
    log.warning("modcompile: precision='fp8': %s", why)  # once per reason (reset(kernels=True) re-arms it)


def attention_forward(q, k, v, lists: BlockLists, scale: float, q_rows: Optional[Tensor] = None,
                      key_bias: Optional[Tensor] = None, like_dense: bool = False, precision: str = "auto",
                      out: Optional[Tensor] = None, lse: Optional[Tensor] = None):
    """Block-sparse attention of q to the key blocks ``lists`` names, on the best available path;
    returns ``(out, lse)``.

    ``key_bias`` (B, Nk) float32, in k's order: added to the scaled scores of each key (``-inf``
    removes it), as SDPA adds a (B, 1, 1, Nk) float mask.

    ``q_rows`` (N,) int32 permutation (VMoBA): the lists, k and v are in permuted token order, q and
    the returned out / lse in the original one; permuted row ``r`` is token ``q_rows[r]``. The kernel
    gathers q and scatters out / lse itself; the torch path permutes q and un-permutes around the
    reference. ``like_dense`` (the rewritten sites): NaN also on the rows that dense SDPA would make
    non-finite through a key or value block they do not list (:mod:`.kernels.nonfinite`: flags from
    one read of k and v, written as NaN by the kernel's epilogue; no host sync).

    ``precision="fp8"``: the 8-bit kernel (:mod:`.kernels.fp8_attention`) where :func:`fp8_route`
    allows it, its torch reference on CPU and under the interpreter, else this function's usual
    path; the reason is logged once (a warning). ``"auto"``: the inputs' dtype.

    ``out`` (B, H, N, D) and ``lse`` (B, H, N) float32: where to write (allocated when None)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8":
        route, why = fp8_route(q, lists.block_size, key_bias, scale)
        if why:
            _warn_fp8(why)
        if route != "none":
            return _fp8_forward(q, k, v, lists, scale, q_rows, like_dense, route == "kernel", out, lse)
    out = out_like(q) if out is None else out
    triton_path = use_triton(q)
    kv_counts, kv_indices, block_size = lists.counts, lists.indices, lists.block_size
    poison = nonfinite_poison(k, v, lists, triton_path) if like_dense else None
    if triton_path:
        out, lse = _triton_forward()(q, k, v, lists, scale=scale, out=out, lse=lse, q_rows=q_rows,
                                     key_bias=key_bias, poison=poison)
    else:
        rows = None if q_rows is None else q_rows.to(torch.int64)
        q_in = q if rows is None else q.index_select(2, rows)
        ref_out, ref_lse = block_sparse_attention_ref(q_in, k, v, kv_counts, kv_indices, block_size=block_size,
                                                      scale=scale, key_bias=key_bias)
        lse = torch.empty_like(ref_lse) if lse is None else lse
        if rows is None:
            out, lse = out.copy_(ref_out), lse.copy_(ref_lse)
        else:
            out, lse = out.index_copy_(2, rows, ref_out.to(out.dtype)), lse.index_copy_(2, rows, ref_lse)
        if poison is not None:
            nonfinite.poison_rows_(out, lse, poison, block_size, q_rows)
    return out, lse


def _fp8_forward(q, k, v, lists: BlockLists, scale: float, q_rows, like_dense: bool, on_kernel: bool,
                 out=None, lse=None):
    """The fp8 path of :func:`attention_forward`; the dense-like non-finite rule as on the torch path
    (a masked fill after the call)."""
    out = out_like(q) if out is None else out
    if on_kernel:
        out, lse = block_sparse_attention_fp8(q, k, v, lists, scale=scale, q_rows=q_rows, out=out, lse=lse)
    else:
        ref, ref_lse = block_sparse_attention_fp8_ref(q, k, v, lists, scale=scale, q_rows=q_rows)
        out, lse = out.copy_(ref), (ref_lse if lse is None else lse.copy_(ref_lse))
    if like_dense:
        poison = nonfinite_poison(k, v, lists, on_kernel)
        nonfinite.poison_rows_(out, lse, poison != 0, lists.block_size, q_rows)
    return out, lse


def nonfinite_poison(k: Tensor, v: Tensor, lists: BlockLists, triton_path: bool) -> Tensor:
    """(B, H, Mq) int8 (Triton) or bool: whether each query block's list skips a key block holding a NaN / Inf in k or v
    (in the lists' token order). Dense SDPA reads every key, so such a block makes those rows
    non-finite; rows that list every such block keep the kernel's own result. Triton: two small
    launches (:func:`.kernels.nonfinite.block_flags`, :func:`.kernels.nonfinite.poisoned_query_blocks`);
    else their torch references."""
    if triton_path:
        return nonfinite.poisoned_query_blocks(nonfinite.block_flags(k, v, lists.block_size), lists.counts,
                                               lists.indices)
    return nonfinite.poisoned_query_blocks_ref(nonfinite.block_flags_ref(k, v, lists.block_size), lists.counts,
                                               lists.indices)


def dense_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, out=None, lse=None):
    """Dense attention and its natural-log lse (B, H, N) from cuDNN's fused SDPA, for dense calls
    that observe (MOD's dense steps): faster than our kernel at density 1. None where cuDNN cannot
    run (CPU, unsupported shape or dtype): the caller then takes the block-sparse kernel. Writes
    into ``out`` / ``lse`` when given."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or KERNEL_STATE.cudnn_lse_broken:
        return None
    out, lse = outputs_like(q) if out is None else (out, lse)
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
