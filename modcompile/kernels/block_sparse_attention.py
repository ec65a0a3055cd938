"""Block-sparse flash attention, forward pass, in Triton.

Contract: :func:`modcompile.kernels.reference.block_sparse_attention_ref` (same inputs, same
outputs). Each program owns one tile of ``BLOCK_M`` queries inside one query block, walks that
block's key-block list once and keeps an online softmax over the listed blocks only. A listed key
block of ``block_size`` tokens is consumed in ``BLOCK_N``-wide chunks; the (entry, chunk) pairs are
flattened into one loop so that Triton software-pipelines the K/V loads across block boundaries. The
kernel is in :mod:`.fwd_kernel`; this module checks the inputs, picks a launch configuration and
launches it.

Numerics: scores are scaled by ``scale * log2(e)`` and exponentiated with ``exp2``; the running
maximum starts at a large finite negative number instead of -inf, so a chunk that is entirely past
the end of the sequence contributes exp2(-inf) = 0 without a NaN guard in the loop. Rows whose list
is empty end with l = 0 and are written as out = 0, lse = -inf. NaN / Inf in q, k, v propagate as in
the reference (a NaN score makes l NaN, so the row's out and lse are NaN); unlisted blocks are never
loaded, so they cannot reach a row. The optional ``poison`` (B, H, Mq) flags (the dense-like rule,
kernels/nonfinite.py) make the epilogue write a query block's rows as NaN instead.

Launch configuration: on CUDA the first call per tuning key (:func:`.tuning.tuning_key`) compiles
and times the candidates (:func:`.tuning.forward_configs`) once and keeps the fastest; later calls
only look it up. ``MODCOMPILE_TUNE=0`` takes the first candidate without timing.

Block lists are trusted: entries must be in ``[0, num_key_blocks)`` and distinct (a duplicated
block is counted twice). :meth:`.BlockLists.validate` (the one value check) tests this on request
(``validate=True``; it synchronizes).

Gathered queries (``q_rows``): policies whose blocks are contiguous only after a token permutation
(VMoBA's 2D/3D partitions) pass k and v already permuted and q in the original order, with
``q_rows[r]`` = the token at permuted position ``r``. Row ``r`` of a program (the order the block
lists refer to) then reads q from token ``q_rows[r]`` and writes out and lse there, so out and lse come
back in the original order with no permuted copy of q and no un-permutation pass. ``q_rows`` is
trusted like the block lists: it must be a permutation of ``range(N)`` (every row written exactly
once); ``validate=True`` checks it too.
"""
from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (LOG2E, SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, default_scale,
                      device_capability, dot_precision, empty_heads_last, ensure_tma_allocator, interpreting,
                      padded_head_dim, tma_usable, unit_last_stride)
from .block_lists import BlockLists, as_block_lists
from .fwd_kernel import _block_sparse_attention_fwd_kernel
from .tuning import LaunchConfig, choose, forward_configs, forward_interpreter_config, tuning_key

# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def supports(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the kernel can run attention on ``q`` (B, H, N, D); returns ``(ok, reason)``."""
    if q.dim() != 4:
        return False, f"expected a 4-d (B, H, N, D) tensor, got {q.dim()}-d"
    if q.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} not supported (supported: {SUPPORTED_DTYPES})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {q.shape[-1]} not supported (supported: {SUPPORTED_HEAD_DIMS})"
    if not (q.is_cuda or interpreting()):
        return False, "needs a CUDA tensor (or TRITON_INTERPRET=1)"
    if q.is_cuda and q.dtype == torch.bfloat16 and device_capability(q.device)[0] < 8:
        return False, "bfloat16 needs compute capability 8.0 or newer"
    return True, ""


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, D), got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, lists: BlockLists, out, lse, q_rows=None, key_bias=None, poison=None):
    ok, reason = supports(q)
    if not ok:
        raise ValueError(f"block_sparse_attention_fwd: {reason}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B, H or D")
    if not (q.device == k.device == v.device):
        raise ValueError("all inputs must be on one device")
    if lists.block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {lists.block_size} not supported (supported: {SUPPORTED_BLOCK_SIZES})")
    lists.check(B, H, q.device)
    if out is not None:
        if tuple(out.shape) != (B, H, N, D) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {(B, H, N, D)} {q.dtype} on {q.device}, "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must have a contiguous last dimension")
    if lse is not None:
        if tuple(lse.shape) != (B, H, N) or lse.dtype != torch.float32 or lse.stride(-1) != 1:
            raise ValueError(f"lse must be (B, H, N) = {(B, H, N)} float32 with a contiguous last dim")
    if q_rows is not None:
        if not isinstance(q_rows, torch.Tensor) or q_rows.dim() != 1 or q_rows.numel() != N:
            raise ValueError(f"q_rows must be a (N,) = ({N},) tensor, got "
                             f"{tuple(q_rows.shape) if isinstance(q_rows, torch.Tensor) else type(q_rows)}")
        if q_rows.dtype != torch.int32 or q_rows.device != q.device:
            raise ValueError(f"q_rows must be int32 on {q.device}, got {q_rows.dtype} on {q_rows.device}")
    if key_bias is not None:
        if tuple(key_bias.shape) != (B, k.shape[2]) or key_bias.dtype != torch.float32 or key_bias.device != q.device:
            raise ValueError(f"key_bias must be (B, Nk) = {(B, k.shape[2])} float32 on {q.device}, got "
                             f"{tuple(key_bias.shape)} {key_bias.dtype} on {key_bias.device}")
    if poison is not None:
        mq = lists.mq
        if tuple(poison.shape) != (B, H, mq) or poison.dtype != torch.int8 or poison.device != q.device:
            raise ValueError(f"poison must be (B, H, Mq) = {(B, H, mq)} int8 on {q.device}, got "
                             f"{tuple(poison.shape)} {poison.dtype} on {poison.device}")


def _launch(cfg: LaunchConfig, q, k, v, out, lse, counts, indices, block_size, scale, q_rows=None,
            key_bias=None, poison=None):
    if cfg.tma and not cfg.host_tma and not interpreting():
        ensure_tma_allocator()  # per thread: autograd may recompute the forward on its own thread
    B, H, N, D = q.shape
    n_k = k.shape[2]
    block_d = padded_head_dim(D)
    # One program per BLOCK_M rows that exist: EVEN_Q (N % BLOCK_M == 0) then means no program
    # holds a row past N (a grid of whole blocks would read and write past the tensors there).
    grid = (triton.cdiv(N, cfg.tile), B * H)
    k_arg, v_arg, q_arg, out_arg = k, v, q, out
    if cfg.host_tma:
        # Zero padding past N and past D, like the on-device descriptors.
        k_arg, v_arg = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, cfg.sub, block_d])
                        for t in (k, v))
    qo_tma = cfg.qo_tma and q_rows is None and tma_usable(q, out)
    if qo_tma:  # loads past N read 0, stores past N are dropped by the copy engine
        q_arg, out_arg = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, cfg.tile, block_d])
                          for t in (q, out))
    _block_sparse_attention_fwd_kernel[grid](
        q_arg, k_arg, v_arg, out_arg, lse, counts, indices,
        q_rows if q_rows is not None else counts,  # unread when None (and the two below)
        key_bias if key_bias is not None else lse, _bias_from(key_bias) if key_bias is not None else counts,
        poison if poison is not None else counts,
        scale * LOG2E, 1.0 / scale,
        N, n_k, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        key_bias.stride(0) if key_bias is not None else 0,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_M=cfg.tile,
        BLOCK_N=cfg.sub,
        EVEN_Q=N % cfg.tile == 0,
        EVEN_K=n_k % block_size == 0,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_TMA=cfg.tma,
        HOST_TMA=cfg.host_tma,
        RAGGED_BRANCH=cfg.ragged_branch,
        WARP_SPEC=cfg.warp_spec,
        GATHER_Q=q_rows is not None,
        QO_TMA=qo_tma,
        HAS_BIAS=key_bias is not None,
        HAS_POISON=poison is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _bias_from(key_bias: torch.Tensor) -> torch.Tensor:
    """(B,) int32: the first key with a nonzero bias per batch item (Nk if none), on device. Text
    padding sits at the end of the sequence, so most chunks never load the bias."""
    nonzero = key_bias != 0
    first = nonzero.to(torch.int32).argmax(1).to(torch.int32)
    return torch.where(nonzero.any(1), first, key_bias.shape[1]).to(torch.int32)


def _tuning_key(q, k, block_size: int, tma: bool, biased: bool = False) -> tuple:
    """The forward's key (:func:`.tuning.tuning_key`): programs are query blocks x heads x batch."""
    B, H, N, _ = q.shape
    return tuning_key("forward", q, block_size, N, k.shape[2], B * H * triton.cdiv(N, block_size), tma, biased)


def _pick_config(q, k, v, block_size, run, biased: bool = False) -> LaunchConfig:
    """The launch configuration: fixed under the interpreter, else the tuner's choice for the key."""
    if interpreting() or not q.is_cuda:
        return forward_interpreter_config(block_size)
    tma = tma_usable(k, v)
    return choose(_tuning_key(q, k, block_size, tma, biased),
                  lambda: forward_configs(block_size, q.shape[-1], tma=tma), run, direction="forward")


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor | BlockLists,
    kv_indices: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    validate: bool = False,
    q_rows: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
):
    """Block-sparse attention forward: returns ``(out, lse)``.

    q (B, H, N, D), k/v (B, H, Nk, D), any strides with a contiguous last dim (others are copied);
    the lists as a :class:`.BlockLists` (``kv_indices`` None), or kv_counts (B, H, Mq) and
    kv_indices (B, H, Mq, W) int32 (int64 is converted) with Mq = ceil(N / block_size) and
    ``block_size`` (None: 128).
    ``out`` (B, H, N, D) may be preallocated with any strides; when None it is allocated as a
    (B, N, H, D) tensor viewed as (B, H, N, D), so that merging heads afterwards is free.
    ``lse`` (B, H, N) float32, natural log, -inf on rows with an empty list (whose out is 0).
    ``config`` forces a launch configuration (tests, benchmarks); otherwise a cached choice, timed
    once per tuning key (see the module docstring). ``validate`` checks the lists (synchronizes).
    ``q_rows`` (N,) int32, a permutation of ``range(N)`` (None: identity): the lists and k/v are in
    a permuted token order and q, out, lse in the original one; row ``r`` of the lists' order reads q
    from token ``q_rows[r]`` and writes out and lse there (module docstring). Trusted like the lists;
    ``validate`` checks it too.
    ``key_bias`` (B, Nk) float32: added to every query's scaled score of that key, in the lists'
    key order (``-inf`` removes the key: text padding), as in the reference.
    ``poison`` (B, H, Mq) int8, per query block of the lists' order: nonzero writes that block's rows
    of out and lse as NaN (the dense-like non-finite rule, :mod:`.nonfinite`), in the epilogue.
    """
    if isinstance(kv_counts, torch.Tensor) and kv_counts.dtype == torch.int64:
        kv_counts = kv_counts.to(torch.int32)
    if isinstance(kv_indices, torch.Tensor) and kv_indices.dtype == torch.int64:
        kv_indices = kv_indices.to(torch.int32)
    _check_tensors(q, k, v)
    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    _check_inputs(q, k, v, lists, out, lse, q_rows, key_bias, poison)
    block_size, counts, indices = lists.block_size, lists.counts, lists.indices
    B, H, N, D = q.shape
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    if q_rows is not None:
        q_rows = unit_last_stride(q_rows)  # the kernel reads it at offset r
    if key_bias is not None:
        key_bias = unit_last_stride(key_bias)
    if poison is not None:
        poison = poison.contiguous()  # the kernel reads it at (b * H + h) * Mq + query block
    scale = default_scale(D, scale)
    if validate:
        lists.validate(q_rows=q_rows)
    if out is None:
        out = empty_heads_last(q)
    if lse is None:
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return out, lse

    def run(cfg):
        _launch(cfg, q, k, v, out, lse, counts, indices, block_size, scale, q_rows, key_bias, poison)

    if config is None:
        config = _pick_config(q, k, v, block_size, run, biased=key_bias is not None)
    elif not config.fits(block_size):
        raise ValueError(f"config {config} does not divide block_size {block_size}")
    elif config.tma and not tma_usable(k, v):
        raise ValueError(f"config {config} needs TMA: sm_90+ and 16-byte aligned k/v strides")
    run(config)
    return out, lse
