"""The Triton kernels of the block-sparse attention backward: the row pre-pass, dk/dv and dq.

Launched by :mod:`.block_sparse_attention_bwd` (which documents the algorithm). Padded row
statistics (delta, lse * log2(e)) let both passes skip row masks; neither pass needs atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bwd_prepass_kernel(
    O, DO, LSE, Delta, Lse2,
    s_ob, s_oh, s_on, s_od,
    s_gb, s_gh, s_gn, s_gd,
    s_lb, s_lh, s_ln,
    H, N, D, ROW_STRIDE,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf for empty rows), written
    into (B*H, ROW_STRIDE) buffers padded to whole blocks (delta 0, lse2 +inf past N). Padded rows
    then get probability exp2(s - inf) = 0 in both passes without any mask."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*N*D may pass 2**31
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    m = row_ok[:, None] & (cols[None, :] < D)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_on + cols[None, :] * s_od, mask=m, other=0.0)
    g = tl.load(DO + b * s_gb + h * s_gh + rows[:, None] * s_gn + cols[None, :] * s_gd, mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    lse = tl.load(LSE + b * s_lb + h * s_lh + rows * s_ln, mask=row_ok, other=float("-inf")).to(tl.float32)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    in_buf = rows < ROW_STRIDE
    tl.store(Delta + bh * ROW_STRIDE + rows, delta, mask=in_buf)
    tl.store(Lse2 + bh * ROW_STRIDE + rows, lse2, mask=in_buf)


@triton.jit(do_not_specialize=["MK", "LIST_W"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse2, Delta, DK, DV, QCounts, QIndices,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    H, N_Q, N_K, D, MK, LIST_W, ROW_STRIDE,
    qk_scale_log2, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_Q: tl.constexpr,         # N_Q % BLOCK_SIZE == 0: no query row past the end in any block
    EVEN_D: tl.constexpr,         # D == BLOCK_D: no column mask
    USE_TMA: tl.constexpr,        # q / dO through tensor descriptors (rows past N_Q read as 0)
    TMA_ROWS: tl.constexpr,       # lse2 / delta through 1-d descriptors too
    RAGGED_BRANCH: tl.constexpr,  # pointer path: clamp rows instead of masking every load
    WARP_SPEC: tl.constexpr,      # Triton's automatic warp specialization of the query loop
):
    PARTS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    STEPS: tl.constexpr = BLOCK_SIZE // SUB_M
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*N*D may pass 2**31
    b = bh // H
    h = bh % H
    kb = pid // PARTS
    n_rows = kb * BLOCK_SIZE + (pid % PARTS) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok = n_rows < N_K
    d_ok = d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + n_rows[:, None] * s_kn + d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + n_rows[:, None] * s_vn + d[None, :] * s_vd, mask=kv_mask, other=0.0)

    q_base = Q + b * s_qb + h * s_qh
    g_base = DO + b * s_gb + h * s_gh
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N_Q, D], strides=[s_qn, 1], block_shape=[SUB_M, BLOCK_D])
        g_desc = tl.make_tensor_descriptor(g_base, shape=[N_Q, D], strides=[s_gn, 1], block_shape=[SUB_M, BLOCK_D])
    lse_base = Lse2 + bh * ROW_STRIDE
    delta_base = Delta + bh * ROW_STRIDE
    if TMA_ROWS:
        lse_desc = tl.make_tensor_descriptor(lse_base, shape=[ROW_STRIDE], strides=[1], block_shape=[SUB_M])
        delta_desc = tl.make_tensor_descriptor(delta_base, shape=[ROW_STRIDE], strides=[1], block_shape=[SUB_M])
    list_ptr = QIndices + (bh * MK + kb) * LIST_W
    count = tl.load(QCounts + bh * MK + kb)

    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_off = tl.arange(0, SUB_M)
    # One flat loop over (listed query block, slice of it) so the pipeliner sees a single loop.
    for it in tl.range(0, count * STEPS, warp_specialize=WARP_SPEC):
        qb = tl.load(list_ptr + it // STEPS)
        start = qb * BLOCK_SIZE + (it % STEPS) * SUB_M
        m_rows = start + m_off
        if USE_TMA:
            q = q_desc.load([start, 0])
            g = g_desc.load([start, 0])
        else:
            if EVEN_Q or RAGGED_BRANCH:
                # Rows past N_Q (ragged last block) re-read row N_Q - 1: finite values whose
                # probabilities are 0 through lse2 = +inf, so no per-row mask is needed.
                rows = m_rows if EVEN_Q else tl.minimum(m_rows, N_Q - 1)
                q_ptrs = q_base + rows[:, None] * s_qn + d[None, :] * s_qd
                g_ptrs = g_base + rows[:, None] * s_gn + d[None, :] * s_gd
                if EVEN_D:
                    q = tl.load(q_ptrs)
                    g = tl.load(g_ptrs)
                else:
                    q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                    g = tl.load(g_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                qm = (m_rows < N_Q)[:, None] & d_ok[None, :]
                q = tl.load(q_base + m_rows[:, None] * s_qn + d[None, :] * s_qd, mask=qm, other=0.0)
                g = tl.load(g_base + m_rows[:, None] * s_gn + d[None, :] * s_gd, mask=qm, other=0.0)
        if TMA_ROWS:
            lse2 = lse_desc.load([start])
            delta = delta_desc.load([start])
        else:
            lse2 = tl.load(lse_base + m_rows)  # padded buffers: always in bounds
            delta = tl.load(delta_base + m_rows)
        # Work on the transposed tile [keys, queries] so the accumulators need no transpose.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.exp2(s_t * qk_scale_log2 - lse2[None, :])
        acc_dv += tl.dot(p_t.to(g.dtype), g, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(g), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        acc_dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    acc_dk = acc_dk * scale
    dk_ptrs = DK + bh * N_K * D + n_rows[:, None] * D + d[None, :]
    dv_ptrs = DV + bh * N_K * D + n_rows[:, None] * D + d[None, :]
    tl.store(dk_ptrs, acc_dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, acc_dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["MQ", "LIST_W"])
def _bwd_dq_kernel(
    Q, K, V, DO, Lse2, Delta, DQ, KVCounts, KVIndices,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    H, N_Q, N_K, D, MQ, LIST_W, ROW_STRIDE,
    qk_scale_log2, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,         # N_K % BLOCK_SIZE == 0: no ragged key block
    EVEN_D: tl.constexpr,         # D == BLOCK_D: no column mask
    USE_TMA: tl.constexpr,        # k / v through tensor descriptors (rows past N_K read as 0)
    RAGGED_BRANCH: tl.constexpr,  # mask probabilities only in the chunk that crosses N_K
    WARP_SPEC: tl.constexpr,      # Triton's automatic warp specialization of the key loop
):
    PARTS: tl.constexpr = BLOCK_SIZE // BLOCK_M
    STEPS: tl.constexpr = BLOCK_SIZE // SUB_N
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*N*D may pass 2**31
    b = bh // H
    h = bh % H
    qb = pid // PARTS
    m_rows = qb * BLOCK_SIZE + (pid % PARTS) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok = m_rows < N_Q
    d_ok = d < D
    qm = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + m_rows[:, None] * s_qn + d[None, :] * s_qd, mask=qm, other=0.0)
    g = tl.load(DO + b * s_gb + h * s_gh + m_rows[:, None] * s_gn + d[None, :] * s_gd, mask=qm, other=0.0)
    lse2 = tl.load(Lse2 + bh * ROW_STRIDE + m_rows)  # padded: +inf past N_Q and on empty rows
    delta = tl.load(Delta + bh * ROW_STRIDE + m_rows)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[N_K, D], strides=[s_kn, 1], block_shape=[SUB_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[N_K, D], strides=[s_vn, 1], block_shape=[SUB_N, BLOCK_D])
    list_ptr = KVIndices + (bh * MQ + qb) * LIST_W
    count = tl.load(KVCounts + bh * MQ + qb)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_off = tl.arange(0, SUB_N)
    for it in tl.range(0, count * STEPS, warp_specialize=WARP_SPEC):
        kb = tl.load(list_ptr + it // STEPS)
        start = kb * BLOCK_SIZE + (it % STEPS) * SUB_N
        n_rows = start + n_off
        if USE_TMA:
            k = k_desc.load([start, 0])
            v = v_desc.load([start, 0])
        else:
            if EVEN_K or RAGGED_BRANCH:
                # Keys past N_K re-read key N_K - 1; the branch below zeroes their probabilities.
                rows = n_rows if EVEN_K else tl.minimum(n_rows, N_K - 1)
                k_ptrs = k_base + rows[:, None] * s_kn + d[None, :] * s_kd
                v_ptrs = v_base + rows[:, None] * s_vn + d[None, :] * s_vd
                if EVEN_D:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
                else:
                    k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                km = (n_rows < N_K)[:, None] & d_ok[None, :]
                k = tl.load(k_base + n_rows[:, None] * s_kn + d[None, :] * s_kd, mask=km, other=0.0)
                v = tl.load(v_base + n_rows[:, None] * s_vn + d[None, :] * s_vd, mask=km, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
        if not EVEN_K:
            # Padded keys of the ragged last block: only the chunk that crosses N_K needs the
            # mask (scalar branch); without RAGGED_BRANCH every chunk pays for it.
            if RAGGED_BRANCH:
                if start + SUB_N > N_K:
                    p = tl.where((n_rows < N_K)[None, :], p, 0.0)
            else:
                p = tl.where((n_rows < N_K)[None, :], p, 0.0)
        dp = tl.dot(g, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    acc = acc * scale
    tl.store(DQ + bh * N_Q * D + m_rows[:, None] * D + d[None, :], acc.to(DQ.dtype.element_ty), mask=qm)
