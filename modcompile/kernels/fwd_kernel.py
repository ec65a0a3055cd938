"""The Triton kernel of the block-sparse attention forward and its device helpers.

Launched by :mod:`.block_sparse_attention`, whose docstring states the contract and the numerics.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
