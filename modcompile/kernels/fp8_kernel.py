"""The Triton kernel of the FP8 block-sparse attention forward (int8 scores, e4m3 P.V).

Launched by :mod:`.fp8_attention`, whose docstring states the numerics; the operands come from
:mod:`.fp8_quant` (zero-padded copies: no load needs a mask). The structure is the bf16 kernel's
(:mod:`.fwd_kernel`): one program per ``BLOCK_M`` rows of one query block, the (list entry, chunk)
pairs flattened into one loop (:func:`.fwd_kernel._chunk_start`), exp2, the ragged key tail's -inf
loaded with k's scale (:func:`.fp8_quant.key_bias`), rows written to their tokens (``q_rows``),
out = 0 and lse = -inf on empty lists.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .fwd_kernel import _chunk_start


@triton.jit
def _fp8_attention_fwd_kernel(
    Q8, QScale, K8, KScale, KMean, KBias, VT8, VScale, Out, Lse, Counts, Indices, QRows,
    qk_scale_log2, scale,
    N_Q, N_K, H, MQ, MK,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ij,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATHER_Q: tl.constexpr,    # row r writes out and lse at token QRows[r] (q8 is already in row order)
    USE_TMA: tl.constexpr,     # k8 / v8 chunks through tensor descriptors (Hopper TMA), built per program
    WARP_SPEC: tl.constexpr,   # Triton's automatic warp specialization of the key loop (sm_90+)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    q_block = pid_m // (BLOCK_SIZE // BLOCK_M)
    CHUNKS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    NPAD_K = MK * BLOCK_SIZE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q

    q = tl.load(Q8 + (bh * MQ * BLOCK_SIZE + offs_m)[:, None] * BLOCK_D + offs_d[None, :])
    q_scale = tl.load(QScale + bh * MQ * BLOCK_SIZE + offs_m)
    row_scale = q_scale * qk_scale_log2  # k-scaled int8 products -> log2 units
    # an all-zero q row (scale 0) has scores 0 * anything = 0: a tiny scale keeps them 0 and makes
    # the -inf of the ragged tail -inf rather than NaN (a NaN scale stays NaN)
    row_scale = tl.where(row_scale == 0.0, 1.1754943508222875e-38, row_scale)
    k_base = K8 + bh * NPAD_K * BLOCK_D
    v_base = VT8 + bh * BLOCK_D * NPAD_K
    ks_base = KScale + bh * NPAD_K
    kb_base = KBias + bh * NPAD_K
    count = tl.load(Counts + b * stride_cb + h * stride_ch + q_block * stride_cm)
    idx_base = Indices + b * stride_ib + h * stride_ih + q_block * stride_im

    k_desc = k_base  # placeholders where unused
    v_desc = v_base
    if USE_TMA:  # the operands are padded and contiguous: plain 2D views, no bounds to clip
        k_desc = tl.make_tensor_descriptor(k_base, shape=[NPAD_K, BLOCK_D], strides=[BLOCK_D, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[BLOCK_D, NPAD_K], strides=[NPAD_K, 1],
                                           block_shape=[BLOCK_D, BLOCK_N])

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for t in tl.range(0, count * CHUNKS, warp_specialize=WARP_SPEC):
        start = _chunk_start(idx_base, stride_ij, t, BLOCK_SIZE, BLOCK_N, CHUNKS)
        if USE_TMA:
            k = k_desc.load([start, 0]).T  # (D, N)
        else:
            k = tl.load(k_base + (start + offs_n).to(tl.int64)[None, :] * BLOCK_D + offs_d[:, None])  # (D, N)
        k_scale = tl.load(ks_base + start + offs_n)
        # int32 -> float32 without a conversion instruction (those run at exp2's rate, which p
        # needs): |s| < 2^22, so the bits of s + 0x4B400000 are the float 1.5 * 2^23 + s exactly; one
        # FMA then removes the bias and applies k's scale, as exactly as s * k_scale would (k_scale
        # has 22 significant bits, so 1.5 * 2^23 * k_scale is exact: fp8_quant; Triton fuses the
        # multiply-add, enable_fp_fusion being on by default)
        # Keys past N_K (the ragged tail) get -inf through that FMA's addend (fp8_quant.key_bias):
        # no mask in the loop (a per-chunk where cost about a tenth of the kernel's time).
        s_biased = (tl.dot(q, k, out_dtype=tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)
        sk = s_biased * k_scale[None, :] + tl.load(kb_base + start + offs_n)[None, :]
        # The running max (log2 units) exact: the key that sets it gets p = 1, which e4m3 holds
        # exactly (P_SCALE = 2^8 times p is the operand, that factor part of the exponent), so a
        # row's largest weight carries no rounding. The row's q scale is >= 0 (the wrapper asks
        # scale > 0), so max(s) = max(sk) * row_scale and one FMA per score forms s - m.
        m_new = tl.maximum(m_i, tl.max(sk, 1) * row_scale)
        p = tl.math.exp2(sk * row_scale[:, None] - (m_new - 8.0)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_desc.load([0, start])  # (D, N), K-major
        else:
            v = tl.load(v_base + offs_d[:, None].to(tl.int64) * NPAD_K + start + offs_n[None, :])  # (D, N), K-major
        # v's scale is per channel (fp8_quant), applied once at the end; the chunk's product gets its
        # own dot (Triton accumulates fp8 products at reduced precision on sm_90: one chunk at most),
        # added in float32 by one FMA
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(v))
        m_i = m_new

    has_keys = l_i != 0.0  # a NaN sum (NaN scores) must give NaN out and lse, not an empty row
    l_safe = tl.where(has_keys, l_i, 1.0)
    # l sums P_SCALE p: the factor cancels
    out = acc * (tl.load(VScale + bh * BLOCK_D + offs_d)[None, :] / l_safe[:, None])
    # k was smoothed by its mean: every score of the row lacks q . mean, which the lse puts back
    shift = tl.sum(q.to(tl.float32) * tl.load(KMean + bh * BLOCK_D + offs_d)[None, :], 1) * q_scale * scale
    lse = tl.where(has_keys, (m_i - 8.0 + tl.math.log2(l_safe)) * 0.6931471805599453 + shift, float("-inf"))

    if GATHER_Q:
        tok_m = tl.load(QRows + offs_m, mask=row_ok, other=0)
    else:
        tok_m = offs_m
    o_ptrs = Out + b * stride_ob + h * stride_oh + tok_m[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + tok_m, lse, mask=row_ok)
