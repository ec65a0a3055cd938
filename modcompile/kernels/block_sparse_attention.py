"""Block-sparse flash attention, forward pass, in Triton.

Contract: :func:`modcompile.kernels.reference.block_sparse_attention_ref` (same inputs, same
outputs). Each program owns one tile of ``BLOCK_M`` queries inside one query block, walks that
block's key-block list once and keeps an online softmax over the listed blocks only. A listed key
block of ``block_size`` tokens is consumed in ``BLOCK_N``-wide chunks; the (entry, chunk) pairs are
flattened into one loop so that Triton software-pipelines the K/V loads across block boundaries.

Numerics: scores are scaled by ``scale * log2(e)`` and exponentiated with ``exp2``; the running
maximum starts at a large finite negative number instead of -inf, so a chunk that is entirely past
the end of the sequence contributes exp2(-inf) = 0 without a NaN guard in the loop. Rows whose list
is empty end with l = 0 and are written as out = 0, lse = -inf. NaN / Inf in q, k, v propagate as in
the reference (a NaN score makes l NaN, so the row's out and lse are NaN); unlisted blocks are never
loaded, so they cannot reach a row. The optional ``poison`` (B, H, Mq) flags (the dense-like rule,
kernels/nonfinite.py) make the epilogue write a query block's rows as NaN instead.

Launch configuration: on CUDA the first call per tuning key (device, head_dim, dtype, block_size,
TMA-able, ragged or not, and the number of programs in powers of two) compiles and times the
candidates (tens of seconds once; later keys reuse the compiled binaries) and caches the fastest;
later calls only look it up. ``MODCOMPILE_TUNE=0`` takes the first candidate without timing.

Block lists are trusted: entries must be in ``[0, num_key_blocks)`` and distinct (a duplicated
block is counted twice). :func:`validate_block_lists` (kernels/_common.py, the one value check)
tests this on request (``validate=True``; it synchronizes).

Gathered queries (``q_rows``): policies whose blocks are contiguous only after a token permutation
(VMoBA's 2D/3D partitions) pass k and v already permuted and q in the original order, with
``q_rows[r]`` = the token at permuted position ``r``. Row ``r`` of a program (the order the block
lists refer to) then reads q from token ``q_rows[r]`` and writes out and lse there, so out and lse come
back in the original order with no permuted copy of q and no un-permutation pass. ``q_rows`` is
trusted like the block lists: it must be a permutation of ``range(N)`` (every row written exactly
once); ``validate=True`` checks it too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (LOG2E, default_scale, device_capability, dot_precision, empty_heads_last,
                      ensure_tma_allocator, interpreting, padded_head_dim, tma_usable, tuning_enabled,
                      unit_last_stride, validate_block_lists)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

@triton.jit
def _chunk_start(idx_base, stride_ij, t, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """First key token of flattened step ``t``: chunk ``t % CHUNKS`` of the ``t // CHUNKS``-th listed block."""
    key_block = tl.load(idx_base + (t // CHUNKS) * stride_ij)
    return key_block * BLOCK_SIZE + (t % CHUNKS) * BLOCK_N


@triton.jit
def _load_k(K, k_desc, k_base, start, b32, h32, offs_n, offs_d, d_ok, N_K, stride_kn,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
            USE_TMA: tl.constexpr, HOST_TMA: tl.constexpr):
    """K^T of one chunk, (BLOCK_D, BLOCK_N); keys past N_K (and columns past the head dim) read as 0."""
    if HOST_TMA:
        k = K.load([b32, h32, start, 0]).reshape(BLOCK_N, BLOCK_D).T
    elif USE_TMA:
        k = k_desc.load([start, 0]).T
    else:
        k_ptrs = k_base + start.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
        if EVEN_K and EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=((start + offs_n) < N_K)[None, :] & d_ok[:, None], other=0.0)
    return k


@triton.jit
def _load_v(V, v_desc, v_base, start, b32, h32, offs_n, offs_d, d_ok, N_K, stride_vn,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
            USE_TMA: tl.constexpr, HOST_TMA: tl.constexpr):
    """V of one chunk, (BLOCK_N, BLOCK_D), zero past N_K and past the head dim."""
    if HOST_TMA:
        v = V.load([b32, h32, start, 0]).reshape(BLOCK_N, BLOCK_D)
    elif USE_TMA:
        v = v_desc.load([start, 0])
    else:
        v_ptrs = v_base + start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
        if EVEN_K and EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=((start + offs_n) < N_K)[:, None] & d_ok[None, :], other=0.0)
    return v


@triton.jit
def _softmax_step(s, v, start, offs_n, m_i, l_i, acc, qk_scale_log2, N_K, BLOCK_N: tl.constexpr,
                  EVEN_K: tl.constexpr, RAGGED_BRANCH: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax update with the raw scores ``s`` of the chunk that starts at ``start``."""
    cols = start + offs_n
    if EVEN_K or RAGGED_BRANCH:
        if not EVEN_K:
            if start + BLOCK_N > N_K:
                s = tl.where((cols < N_K)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
        s = s * qk_scale_log2 - m_new[:, None]
    else:
        # Keys past the end of the sequence (ragged last block) get -inf.
        bias = tl.where(cols < N_K, 0.0, float("-inf"))
        s = s * qk_scale_log2 + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        s = s - m_new[:, None]
    p = tl.math.exp2(s)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_attention_fwd_kernel(
    Q, K, V, Out, Lse, Counts, Indices, QRows, KeyBias, BiasFrom, Poison,
    qk_scale_log2, bias_to_raw,
    N_Q, N_K, H,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ij,
    stride_bb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_Q: tl.constexpr,      # N_Q % BLOCK_M == 0: no row mask on q / out
    EVEN_K: tl.constexpr,      # N_K % BLOCK_SIZE == 0: no ragged key block anywhere
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,     # K/V through tensor descriptors (Hopper TMA); OOB rows read as 0
    HOST_TMA: tl.constexpr,    # K and V arrive as host-built (B, H, N, D) descriptors
    RAGGED_BRANCH: tl.constexpr,  # mask scores only in the chunk that crosses N_K (scalar branch)
    WARP_SPEC: tl.constexpr,   # Triton's automatic warp specialization of the key loop (sm_90+)
    GATHER_Q: tl.constexpr,    # row r reads q / writes out and lse at token QRows[r] (else at r)
    QO_TMA: tl.constexpr,      # with HOST_TMA and no GATHER_Q: q loaded / out stored by descriptors
    HAS_BIAS: tl.constexpr,    # KeyBias (B, N_K) float32 is added to the scores of each key
    HAS_POISON: tl.constexpr,  # Poison (B, H, Mq) int8: nonzero writes the block's rows as NaN
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_block = pid_m // (BLOCK_SIZE // BLOCK_M)
    CHUNKS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < N_Q

    # Token of each row: itself, or QRows[row] (the lists' order is a permutation of the tokens).
    if GATHER_Q:
        if EVEN_Q:
            tok_m = tl.load(QRows + offs_m)
        else:
            tok_m = tl.load(QRows + offs_m, mask=row_ok, other=0)
    else:
        tok_m = offs_m
    if QO_TMA:
        q = Q.load([pid_bh // H, pid_bh % H, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = Q + b * stride_qb + h * stride_qh + tok_m[:, None] * stride_qn + offs_d[None, :]
        if EVEN_Q and EVEN_D:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    b32 = pid_bh // H
    h32 = pid_bh % H
    k_base = K  # placeholders where unused (the helpers read only what their flags select)
    v_base = V
    k_desc = K
    v_desc = V
    if not HOST_TMA:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        if USE_TMA:
            # One (N_K, HEAD_DIM) view per (batch, head): the copy engine zero-fills rows past N_K
            # and columns past HEAD_DIM, so the loads need no masks and no per-thread addresses.
            # Built by each program on the device (a global write and a fence per program).
            k_desc = tl.make_tensor_descriptor(k_base, shape=[N_K, HEAD_DIM], strides=[stride_kn, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(v_base, shape=[N_K, HEAD_DIM], strides=[stride_vn, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
    bias_base = KeyBias + b * stride_bb
    bias_from = N_K
    if HAS_BIAS:
        bias_from = tl.load(BiasFrom + b)  # keys before it have bias 0: their chunks skip the load
    count = tl.load(Counts + b * stride_cb + h * stride_ch + q_block * stride_cm)
    idx_base = Indices + b * stride_ib + h * stride_ih + q_block * stride_im

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for t in tl.range(0, count * CHUNKS, warp_specialize=WARP_SPEC):
        start = _chunk_start(idx_base, stride_ij, t, BLOCK_SIZE, BLOCK_N, CHUNKS)
        k = _load_k(K, k_desc, k_base, start, b32, h32, offs_n, offs_d, d_ok, N_K, stride_kn,
                    BLOCK_N, BLOCK_D, EVEN_K, EVEN_D, USE_TMA, HOST_TMA)
        v = _load_v(V, v_desc, v_base, start, b32, h32, offs_n, offs_d, d_ok, N_K, stride_vn,
                    BLOCK_N, BLOCK_D, EVEN_K, EVEN_D, USE_TMA, HOST_TMA)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if start + BLOCK_N > bias_from:
                # In raw-score units, so that the softmax step scales it with the scores.
                kb = tl.load(bias_base + start + offs_n, mask=(start + offs_n) < N_K, other=0.0)
                s = s + kb[None, :] * bias_to_raw
        m_i, l_i, acc = _softmax_step(s, v, start, offs_n, m_i, l_i, acc, qk_scale_log2, N_K,
                                      BLOCK_N, EVEN_K, RAGGED_BRANCH, DOT_PRECISION)

    has_keys = l_i != 0.0  # a NaN sum (NaN scores) must give NaN out and lse, not an empty row
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if HAS_POISON:
        # The list skips a key block holding NaN / Inf (kernels/nonfinite.py): NaN, as in dense SDPA.
        hit = tl.load(Poison + pid_bh * tl.cdiv(N_Q, BLOCK_SIZE) + q_block) != 0
        out = tl.where(hit, float("nan"), out)
        lse = tl.where(hit, float("nan"), lse)

    l_ptrs = Lse + b * stride_lb + h * stride_lh + tok_m
    if QO_TMA:  # the copy engine clips rows past N and columns past HEAD_DIM
        Out.store([pid_bh // H, pid_bh % H, pid_m * BLOCK_M, 0],
                  out.to(Out.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        o_ptrs = Out + b * stride_ob + h * stride_oh + tok_m[:, None] * stride_on + offs_d[None, :]
        if EVEN_Q and EVEN_D:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if EVEN_Q:
        tl.store(l_ptrs, lse)
    else:
        tl.store(l_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Launch configurations and the cached tuner
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters. ``block_m`` and ``block_n`` must divide the block size."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V loads through tensor descriptors (needs sm_90+ and 16-byte strides)
    host_tma: bool = False  # with tma: descriptors built once on the host, not by every program
    ragged_branch: bool = False  # mask only the chunk that crosses the sequence end
    warp_spec: bool = False  # producer/consumer warp specialization of the key loop (Triton, sm_90+)
    qo_tma: bool = False  # with host_tma: q and out through descriptors too (ignored with q_rows)

    def __post_init__(self):
        if self.host_tma and not self.tma:
            raise ValueError("KernelConfig: host_tma needs tma=True")
        if self.qo_tma and not self.host_tma:
            raise ValueError("KernelConfig: qo_tma needs host_tma=True")

    def fits(self, block_size: int) -> bool:
        return block_size % self.block_m == 0 and block_size % self.block_n == 0


# Candidates tried on CUDA (the tuner times each once per key); the first that fits is the untuned
# fallback. The warp-specialized TMA variant with the ragged branch was the fastest on Hopper;
# autoWS there needs the TMA loads, and without the scalar ragged branch it loses its gain.
# Descriptors built on the host were as fast at density 1 and faster at low density (no descriptor
# write per program), so they come first. 128x128 tiles with 4 stages need more shared memory than
# Hopper has: left out. Timings: benchmarks/measured/HISTORY.md (Kernel).
_CANDIDATES = (
    KernelConfig(128, 128, 8, 3, tma=True, host_tma=True, ragged_branch=True, warp_spec=True),
    # q and out through descriptors too: timed as a tie with the one above.
    KernelConfig(128, 128, 8, 3, tma=True, host_tma=True, ragged_branch=True, warp_spec=True, qo_tma=True),
    KernelConfig(128, 128, 8, 3, tma=True, ragged_branch=True, warp_spec=True),
    KernelConfig(128, 128, 8, 3, ragged_branch=True),
    KernelConfig(128, 128, 8, 3),
    KernelConfig(128, 128, 8, 2),
    KernelConfig(128, 64, 8, 3),
    KernelConfig(64, 64, 4, 3),
    KernelConfig(128, 128, 8, 3, tma=True),
    KernelConfig(128, 64, 8, 3, tma=True),
    KernelConfig(32, 32, 4, 2),
    KernelConfig(16, 16, 2, 1),
)

# tuning key (see _tuning_key) -> KernelConfig chosen by timing.
_TUNED: dict[tuple, KernelConfig] = {}
# MODCOMPILE_TUNE=0 skips timing and uses the first fitting candidate (kernels/_common.py).


def candidate_configs(block_size: int, head_dim: int, tma: bool = True) -> list[KernelConfig]:
    """Launch configurations worth timing for this block size and head dim (``tma``: allow TMA)."""
    block_d = padded_head_dim(head_dim)
    out = []
    smallest = min(64, block_size)  # tiles under 64 only where the block itself is smaller
    for cfg in _CANDIDATES:
        if not cfg.fits(block_size) or min(cfg.block_m, cfg.block_n) < smallest:
            continue
        if cfg.tma and not tma:
            continue
        # Large tiles with few warps would spill the fp32 accumulators.
        if cfg.block_m * max(cfg.block_n, block_d) > 64 * 128 * cfg.num_warps // 2:
            continue
        out.append(cfg)
    return out


def tuned_configs() -> dict:
    """The configurations chosen so far, for reports: ``{key: KernelConfig}``."""
    return dict(_TUNED)


def _interpreter_config(block_size: int) -> KernelConfig:
    # The interpreter is fastest with few, large programs; still chunk the key block in two so
    # that the flattened (entry, chunk) loop is exercised.
    return KernelConfig(block_size, max(16, block_size // 2), 4, 1)


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


def _check_inputs(q, k, v, kv_counts, kv_indices, block_size, out, lse, q_rows=None, key_bias=None, poison=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, D), got shape {tuple(t.shape)}")
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
    if not (q.device == k.device == v.device == kv_counts.device == kv_indices.device):
        raise ValueError("all inputs must be on one device")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} not supported (supported: {SUPPORTED_BLOCK_SIZES})")
    mq = triton.cdiv(N, block_size)
    if kv_counts.dim() != 3 or tuple(kv_counts.shape) != (B, H, mq):
        raise ValueError(f"kv_counts must be (B, H, Mq) = {(B, H, mq)}, got {tuple(kv_counts.shape)}")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, H, mq):
        raise ValueError(f"kv_indices must be (B, H, Mq, W) with (B, H, Mq) = {(B, H, mq)}, "
                         f"got {tuple(kv_indices.shape)}")
    for name, t in (("kv_counts", kv_counts), ("kv_indices", kv_indices)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32, got {t.dtype}")
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
        if tuple(poison.shape) != (B, H, mq) or poison.dtype != torch.int8 or poison.device != q.device:
            raise ValueError(f"poison must be (B, H, Mq) = {(B, H, mq)} int8 on {q.device}, got "
                             f"{tuple(poison.shape)} {poison.dtype} on {poison.device}")


def _launch(cfg: KernelConfig, q, k, v, out, lse, counts, indices, block_size, scale, q_rows=None,
            key_bias=None, poison=None):
    if cfg.tma and not cfg.host_tma and not interpreting():
        ensure_tma_allocator()  # per thread: autograd may recompute the forward on its own thread
    B, H, N, D = q.shape
    n_k = k.shape[2]
    block_d = padded_head_dim(D)
    # One program per BLOCK_M rows that exist: EVEN_Q (N % BLOCK_M == 0) then means no program
    # holds a row past N (a grid of whole blocks would read and write past the tensors there).
    grid = (triton.cdiv(N, cfg.block_m), B * H)
    k_arg, v_arg, q_arg, out_arg = k, v, q, out
    if cfg.host_tma:
        # Zero padding past N and past D, like the on-device descriptors.
        k_arg, v_arg = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, cfg.block_n, block_d])
                        for t in (k, v))
    qo_tma = cfg.qo_tma and q_rows is None and tma_usable(q, out)
    if qo_tma:  # loads past N read 0, stores past N are dropped by the copy engine
        q_arg, out_arg = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, cfg.block_m, block_d])
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
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        EVEN_Q=N % cfg.block_m == 0,
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
    """What the best configuration depends on: device, head_dim, dtype, block size, TMA, whether
    the last key block is ragged, the number of query blocks x heads in powers of two (a choice
    timed on a small ragged test shape is not reused for a 32k-token call), and a key bias."""
    B, H, N, D = q.shape
    programs = B * H * triton.cdiv(N, block_size)
    return (device_capability(q.device), D, q.dtype, block_size, tma, k.shape[2] % block_size != 0,
            programs.bit_length(), biased)


def _pick_config(q, k, v, block_size, run, biased: bool = False) -> KernelConfig:
    """The cached configuration for this (device, head_dim, dtype, block); times candidates once."""
    D = q.shape[-1]
    if interpreting() or not q.is_cuda:
        return _interpreter_config(block_size)
    tma = tma_usable(k, v)
    key = _tuning_key(q, k, block_size, tma, biased)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    candidates = candidate_configs(block_size, D, tma=tma)
    if not tuning_enabled("forward") or len(candidates) == 1:
        cfg = candidates[0]
    else:
        best = None
        for c in candidates:
            try:
                t = triton.testing.do_bench(lambda: run(c), warmup=10, rep=50, return_mode="median")
            except Exception:  # a config the compiler rejects (e.g. out of shared memory)
                continue
            # A later candidate must win by 1%: timing noise should not flip between near-ties.
            if best is None or t < 0.99 * best[0]:
                best = (t, c)
        if best is None:
            raise RuntimeError("block_sparse_attention_fwd: no kernel configuration compiled")
        cfg = best[1]
    _TUNED[key] = cfg
    return cfg


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    validate: bool = False,
    q_rows: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
):
    """Block-sparse attention forward: returns ``(out, lse)``.

    q (B, H, N, D), k/v (B, H, Nk, D), any strides with a contiguous last dim (others are copied);
    kv_counts (B, H, Mq) and kv_indices (B, H, Mq, W) int32 with Mq = ceil(N / block_size).
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
    _check_inputs(q, k, v, kv_counts, kv_indices, block_size, out, lse, q_rows, key_bias, poison)
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
        validate_block_lists(kv_counts, kv_indices, triton.cdiv(k.shape[2], block_size), q_rows=q_rows)
    counts = kv_counts if kv_counts.dtype == torch.int32 else kv_counts.to(torch.int32)
    indices = kv_indices if kv_indices.dtype == torch.int32 else kv_indices.to(torch.int32)
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
