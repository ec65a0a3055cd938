"""Triton backward of block-sparse flash attention (dq, dk, dv).

Same contract as :mod:`modcompile.kernels.reference` (block lists per query block, lists are sets:
duplicates collapse, entries past the count are ignored, a ragged last block is masked). The
backward recomputes the probabilities from the forward's log-sum-exp, FlashAttention-2 style:

* ``delta = rowsum(dO * O)`` (fp32), one small kernel;
* dk/dv: one program per slice of a key block, looping over the query blocks that attend that key
  block (the *transposed* lists, built on device by :func:`transpose_block_lists`);
* dq: one program per slice of a query block, looping over its own (canonicalised) key blocks.

Neither pass needs atomics, so results are deterministic. Empty rows (lse = -inf) get zero
gradients: their probabilities are forced to 0 instead of exp(-inf + inf).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import LOG2E, default_scale, device_capability, dot_precision, interpreting, padded_head_dim
from .reference import num_blocks

# Read once at import, like triton.jit does when it decides whether the kernels below interpret.
_INTERPRET = interpreting()


# --------------------------------------------------------------------------------------------
# Block-list transposition (torch ops on device, no host sync)
# --------------------------------------------------------------------------------------------
def _block_mask(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int) -> torch.Tensor:
    """Boolean ``[B, H, Mq, Mk]`` mask from lists; out-of-range ids are dropped, not trusted."""
    width = kv_indices.shape[-1]
    idx = kv_indices.long()
    valid = torch.arange(width, device=kv_indices.device) < kv_counts.unsqueeze(-1).long()
    valid &= (idx >= 0) & (idx < mk)
    # Invalid slots write to a spare column that is cut off afterwards.
    idx = torch.where(valid, idx, mk)
    mask = torch.zeros(*kv_indices.shape[:-1], mk + 1, dtype=torch.bool, device=kv_indices.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :mk]


def _compact(mask: torch.Tensor):
    """Sorted int32 lists of the True columns of each row; width = number of columns."""
    width = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    # Unselected columns get a key past every selected one; one row sort puts the list first.
    cols = torch.arange(width, dtype=torch.int32, device=mask.device)
    keys = torch.where(mask, cols, width)
    lists = torch.sort(keys, dim=-1).values
    return counts, torch.where(lists < width, lists, 0).contiguous()


def transpose_block_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int):
    """Key block -> query blocks that attend it: ``(q_counts [B,H,Mk], q_indices [B,H,Mk,Mq])``.

    Exact set semantics (duplicates in a forward list count once), lists sorted ascending, slots
    past the count are 0. Built with torch ops on the lists' device, without a host sync."""
    mask = _block_mask(kv_counts, kv_indices, mk)
    return _compact(mask.transpose(-1, -2))


def canonical_block_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int):
    """The forward lists as sorted sets (width Mk): what the dq pass iterates."""
    return _compact(_block_mask(kv_counts, kv_indices, mk))


def backward_block_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int):
    """Both lists the backward needs, from one mask: ``(canonical forward, transposed)``."""
    mask = _block_mask(kv_counts, kv_indices, mk)
    return _compact(mask), _compact(mask.transpose(-1, -2))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(
    O, DO, Delta,
    s_ob, s_oh, s_on, s_od,
    s_gb, s_gh, s_gn, s_gd,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*N*D may pass 2**31
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_on + cols[None, :] * s_od, mask=m, other=0.0)
    g = tl.load(DO + b * s_gb + h * s_gh + rows[:, None] * s_gn + cols[None, :] * s_gd, mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    tl.store(Delta + bh * N + rows, delta, mask=rows < N)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, QCounts, QIndices,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    H, N_Q, N_K, D, MK, LIST_W,
    qk_scale_log2, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
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
    row_base = bh * N_Q
    list_ptr = QIndices + (bh * MK + kb) * LIST_W
    count = tl.load(QCounts + bh * MK + kb)

    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_off = tl.arange(0, SUB_M)
    # One flat loop over (listed query block, slice of it) so the pipeliner sees a single loop.
    for it in range(0, count * STEPS):
        qb = tl.load(list_ptr + it // STEPS)
        m_rows = qb * BLOCK_SIZE + (it % STEPS) * SUB_M + m_off
        m_ok = m_rows < N_Q
        qm = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + m_rows[:, None] * s_qn + d[None, :] * s_qd, mask=qm, other=0.0)
        g = tl.load(g_base + m_rows[:, None] * s_gn + d[None, :] * s_gd, mask=qm, other=0.0)
        lse = tl.load(LSE + row_base + m_rows, mask=m_ok, other=float("inf"))
        # Empty or padded rows: +inf makes their probabilities exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(Delta + row_base + m_rows, mask=m_ok, other=0.0)
        # Work on the transposed tile [keys, queries] so the accumulators need no transpose.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.exp2(s_t * qk_scale_log2 - lse[None, :] * 1.4426950408889634)
        acc_dv += tl.dot(p_t.to(g.dtype), g, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(g), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        acc_dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    acc_dk = acc_dk * scale
    dk_ptrs = DK + bh * N_K * D + n_rows[:, None] * D + d[None, :]
    dv_ptrs = DV + bh * N_K * D + n_rows[:, None] * D + d[None, :]
    tl.store(dk_ptrs, acc_dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, acc_dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, KVCounts, KVIndices,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    H, N_Q, N_K, D, MQ, LIST_W,
    qk_scale_log2, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
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
    lse = tl.load(LSE + bh * N_Q + m_rows, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    lse2 = lse * 1.4426950408889634
    delta = tl.load(Delta + bh * N_Q + m_rows, mask=m_ok, other=0.0)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    list_ptr = KVIndices + (bh * MQ + qb) * LIST_W
    count = tl.load(KVCounts + bh * MQ + qb)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_off = tl.arange(0, SUB_N)
    for it in range(0, count * STEPS):
        kb = tl.load(list_ptr + it // STEPS)
        n_rows = kb * BLOCK_SIZE + (it % STEPS) * SUB_N + n_off
        n_ok = n_rows < N_K
        km = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n_rows[:, None] * s_kn + d[None, :] * s_kd, mask=km, other=0.0)
        v = tl.load(v_base + n_rows[:, None] * s_vn + d[None, :] * s_vd, mask=km, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)  # padded keys of a ragged block
        dp = tl.dot(g, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    acc = acc * scale
    tl.store(DQ + bh * N_Q * D + m_rows[:, None] * D + d[None, :], acc.to(DQ.dtype.element_ty), mask=qm)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _fixed_config(block_size: int, head_dim_p2: int, on_gpu: bool):
    """(tile, sub_tile, num_warps, num_stages) used when not autotuning (interpreter, tests)."""
    if not on_gpu:
        return min(block_size, 32), min(block_size, 16), 4, 1
    tile = min(block_size, 64)
    sub = min(block_size, 32 if head_dim_p2 >= 128 else 64)
    return tile, sub, 4, 2


def gpu_configs(block_size: int):
    """Candidate (tile, sub_tile, num_warps, num_stages) on a GPU, filtered to divide the block."""
    # The set measured on H100 (BENCHMARKS.md, Backward); the tuner picked (64, 64, 4, 2) for dk/dv
    # and (64, 32, 4, 3) for dq at (1, 12, 32760, 128) bf16.
    # 8-warp (64, 64) and (128, 64, 3 stages) added to test the register-spill lead of that run.
    cands = [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3),
             (64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 3)]
    return [c for c in cands if block_size % c[0] == 0 and block_size % c[1] == 0] or [
        (min(block_size, 64), min(block_size, 32), 4, 2)
    ]


_TUNED: dict = {}


def tuned_configs() -> dict:
    """Configurations chosen so far: ``{(pass, key): (tile, sub_tile, num_warps, num_stages)}``."""
    return dict(_TUNED)


def _launch_tuned(kind, launch, key, block_size):
    """Pick the fastest config once per key by timing each candidate (GPU only).

    Every launch writes (never accumulates) its outputs, so repeated timing runs are harmless."""
    cfg = _TUNED.get((kind, key))
    if cfg is None:
        from triton.testing import do_bench

        best = None
        for c in gpu_configs(block_size):
            try:
                t = do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")
            except Exception:  # config does not fit (shared memory, registers): skip it
                continue
            if best is None or t < best[0]:
                best = (t, c)
        if best is None:
            raise RuntimeError(f"no backward {kind} config could launch for key {key}")
        cfg = _TUNED[(kind, key)] = best[1]
    launch(cfg)


def _autotune_enabled() -> bool:
    return os.environ.get("MODCOMPILE_BWD_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _check_inputs(do, q, k, v, out, lse, kv_counts, kv_indices, block_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, H, Nk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if do.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"do and out must have q's shape {tuple(q.shape)}; got {tuple(do.shape)}, {tuple(out.shape)}")
    if lse.shape != (B, H, N):
        raise ValueError(f"lse must be (B, H, N) = {(B, H, N)}; got {tuple(lse.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {q.dtype}; expected float16, bfloat16 or float32")
    if any(t.dtype != q.dtype for t in (k, v, do)):
        raise TypeError("q, k, v and do must share one dtype")
    if kv_counts.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise TypeError("kv_counts and kv_indices must be int32")
    mq = num_blocks(N, block_size)
    if kv_counts.shape != (B, H, mq) or kv_indices.shape[:3] != (B, H, mq) or kv_indices.dim() != 4:
        raise ValueError(f"block lists must be (B, H, Mq={mq}) and (B, H, Mq, W); got "
                         f"{tuple(kv_counts.shape)}, {tuple(kv_indices.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    devs = {t.device for t in (do, q, k, v, out, lse, kv_counts, kv_indices)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {devs}")


def block_sparse_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    q_lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: tuple[int, int, int, int] | None = None,
):
    """Gradients ``(dq, dk, dv)`` of block-sparse attention, in q's dtype, contiguous.

    ``out``/``lse`` are the forward's outputs (lse natural-log, fp32, (B, H, N)); the gradient that
    may flow into lse is not taken (lse is auxiliary). ``q_lists`` is the transposed lists from
    :func:`transpose_block_lists`, if the caller already has them. ``config`` forces the launch
    configuration ``(tile, sub_tile, num_warps, num_stages)`` of both passes (benchmarks, tests);
    otherwise GPUs time the candidates once per shape key (``MODCOMPILE_BWD_AUTOTUNE=0``: fixed)."""
    _check_inputs(do, q, k, v, out, lse, kv_counts, kv_indices, block_size)
    B, H, N, D = q.shape
    Nk = k.shape[2]
    scale = default_scale(D, scale)
    mq, mk = num_blocks(N, block_size), num_blocks(Nk, block_size)
    on_gpu = q.is_cuda
    if not on_gpu and not _INTERPRET:
        raise RuntimeError("the Triton backward needs a CUDA tensor or TRITON_INTERPRET=1")

    if q_lists is None:
        (f_counts, f_indices), q_lists = backward_block_lists(kv_counts, kv_indices, mk)
    else:
        f_counts, f_indices = canonical_block_lists(kv_counts, kv_indices, mk)
    q_counts, q_indices = (t.to(torch.int32).contiguous() for t in q_lists)
    if q_counts.shape != (B, H, mk) or q_indices.shape[:3] != (B, H, mk):
        raise ValueError(f"q_lists must be (B, H, Mk={mk}) and (B, H, Mk, W); got "
                         f"{tuple(q_counts.shape)}, {tuple(q_indices.shape)}")

    lse = lse.to(torch.float32).contiguous()
    bd = padded_head_dim(D)
    precision = dot_precision(q.dtype)

    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    rows_per_prog = 64 if on_gpu else 32
    _bwd_delta_kernel[(triton.cdiv(N, rows_per_prog), B * H)](
        out, do, delta, *out.stride(), *do.stride(), H, N, D, BLOCK_M=rows_per_prog, BLOCK_D=bd,
    )

    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, Nk, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, Nk, D, dtype=q.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    qk_scale_log2 = scale * LOG2E

    def launch_dkdv(cfg):
        tile, sub, warps, stages = cfg
        grid = (mk * (block_size // tile), B * H)
        _bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, q_counts, q_indices, *strides,
            H, N, Nk, D, mk, q_indices.shape[-1], qk_scale_log2, scale,
            BLOCK_SIZE=block_size, BLOCK_N=tile, SUB_M=sub, BLOCK_D=bd, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )

    def launch_dq(cfg):
        tile, sub, warps, stages = cfg
        grid = (mq * (block_size // tile), B * H)
        _bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq, f_counts, f_indices, *strides,
            H, N, Nk, D, mq, f_indices.shape[-1], qk_scale_log2, scale,
            BLOCK_SIZE=block_size, BLOCK_M=tile, SUB_N=sub, BLOCK_D=bd, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )

    if config is not None:
        tile, sub = config[0], config[1]
        if block_size % tile or block_size % sub or min(tile, sub) < 16:
            raise ValueError(f"config {config}: tiles must be >= 16 and divide block_size {block_size}")
        launch_dkdv(config)
        launch_dq(config)
    elif on_gpu and _autotune_enabled():
        key = (block_size, bd, q.dtype, N, Nk, device_capability(q.device))
        _launch_tuned("dkdv", launch_dkdv, key, block_size)
        _launch_tuned("dq", launch_dq, key, block_size)
    else:
        cfg = _fixed_config(block_size, bd, on_gpu)
        launch_dkdv(cfg)
        launch_dq(cfg)
    return dq, dk, dv
