"""Triton backward of block-sparse flash attention (dq, dk, dv).

Same contract as :mod:`modcompile.kernels.reference` (block lists per query block, lists are sets:
duplicates collapse, entries past the count are ignored, a ragged last block is masked). The
backward recomputes the probabilities from the forward's log-sum-exp, FlashAttention-2 style:

* a pre-pass writes ``delta = rowsum(dO * O)`` and ``lse * log2(e)`` (fp32) padded to whole
  blocks (padded and empty rows get lse = +inf, hence probability 0: the passes need no row mask);
* dk/dv: one program per slice of a key block, looping over the query blocks that attend that key
  block (the *transposed* lists, :meth:`.BlockLists.transposed`: one Triton launch on device);
* dq: one program per slice of a query block, looping over its own (canonicalised) key blocks.

Neither pass needs atomics, so results are deterministic. Empty rows (lse = -inf) get zero
gradients: their probabilities are forced to 0 instead of exp(-inf + inf). Launch options per
pass (:class:`BackwardConfig`): tile sizes, TMA loads of the streamed tensors, the ragged tail
handled outside the full chunks, and Triton's warp specialization of the inner loop (sm_90+).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, default_scale, device_capability, dot_precision, ensure_tma_allocator, interpreting,
                      padded_head_dim, tma_usable, tuning_enabled)
from .block_lists import BlockLists, as_block_lists

# Read once at import, like triton.jit does when it decides whether the kernels below interpret.
_INTERPRET = interpreting()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
class BackwardConfig(NamedTuple):
    """Launch configuration of one backward pass.

    ``tile`` rows per program (keys for dk/dv, queries for dq), streamed ``sub`` rows at a time;
    both must divide the block size. The flags (sm_90+ for ``tma``/``warp_spec``):
    ``tma`` streams q/dO (dk/dv) or k/v (dq) through tensor descriptors; ``ragged_branch`` keeps
    the ragged-tail handling out of the chunks that do not cross the sequence end; ``warp_spec``
    asks Triton to warp-specialize the inner loop (meant with ``tma``); ``tma_rows`` also reads
    lse/delta through descriptors in the dk/dv pass. A plain 4-tuple converts with the flags off."""

    tile: int
    sub: int
    num_warps: int
    num_stages: int
    tma: bool = False
    ragged_branch: bool = False
    warp_spec: bool = False
    tma_rows: bool = False

    def label(self) -> str:
        flags = [n for n in ("tma", "ragged_branch", "warp_spec", "tma_rows") if getattr(self, n)]
        shape = f"({self.tile},{self.sub},{self.num_warps}w,{self.num_stages}s)"
        return shape + "".join("+" + f for f in flags)


def as_config(cfg) -> BackwardConfig:
    """A :class:`BackwardConfig` from a config or a tuple ``(tile, sub, warps, stages[, flags...])``."""
    if isinstance(cfg, BackwardConfig):
        return cfg
    if not isinstance(cfg, (tuple, list)) or not 4 <= len(cfg) <= len(BackwardConfig._fields):
        raise TypeError(f"backward config must be a BackwardConfig or a (tile, sub, warps, stages, ...) tuple, "
                        f"got {cfg!r}")
    return BackwardConfig(*cfg)


_LABEL = re.compile(r"\((\d+),(\d+),(\d+)w,(\d+)s\)((?:\+\w+)*)")


def parse_label(text: str) -> BackwardConfig:
    """The config that :meth:`BackwardConfig.label` printed, e.g. ``(64,64,4w,2s)+tma+ragged_branch``."""
    m = _LABEL.fullmatch(text.strip())
    flags = m.group(5).split("+")[1:] if m else []
    if m is None or any(f not in BackwardConfig._fields[4:] for f in flags):
        raise ValueError(f"not a backward config label: {text!r} (e.g. '(64,64,4w,2s)+tma+ragged_branch')")
    return BackwardConfig(*(int(g) for g in m.groups()[:4]), **{f: True for f in flags})


_PIN_ENV = "MODCOMPILE_BWD_CONFIG"


def pinned_configs() -> dict:
    """``MODCOMPILE_BWD_CONFIG="dkdv=LABEL;dq=LABEL"`` (either part may be left out): fixed GPU configs
    instead of tuning, e.g. a tuner's earlier pick, to save the candidates' compile time."""
    return dict(_parse_pins(os.environ.get(_PIN_ENV, "").strip()))


@lru_cache(maxsize=8)  # read on every backward call: parse each setting once
def _parse_pins(text: str) -> tuple:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, label = part.partition("=")
        if kind.strip() not in ("dkdv", "dq"):
            raise ValueError(f"{_PIN_ENV}: expected 'dkdv=LABEL;dq=LABEL', got {text!r}")
        out[kind.strip()] = parse_label(label)
    return tuple(out.items())


def _fixed_config(block_size: int, head_dim_p2: int, on_gpu: bool) -> BackwardConfig:
    """The configuration used when not autotuning (interpreter, tests)."""
    if not on_gpu:
        return BackwardConfig(min(block_size, 32), min(block_size, 16), 4, 1)
    tile = min(block_size, 64)
    sub = min(block_size, 32 if head_dim_p2 >= 128 else 64)
    return BackwardConfig(tile, sub, 4, 2)


_TMA_FLAGS = dict(tma=True, ragged_branch=True)

# Tuner candidates (both passes time all of them), pruned with per-pass sweeps on Hopper at Wan's
# attention shape (BENCHMARKS.md, Forward + backward; timings in benchmarks/measured/HISTORY.md,
# Backward). Sub-tiles of 32, (64, 64) with 8 plain warps, (64, 64, 8 warps) with warp
# specialization and (128, 64, 8 warps, 2 stages) without tma_rows were slower in both passes, so
# they are no longer timed; (64, 64, 4 warps) with warp specialization does not compile with
# Triton 3.6. The flagged variants follow the forward's result (TMA + scalar ragged branch + warp
# specialization was the fastest there); the warp-specialized ones come last so that a compiler
# failure there costs the least.
_GPU_CANDIDATES = (
    BackwardConfig(64, 64, 4, 2),
    BackwardConfig(128, 64, 8, 3),
    BackwardConfig(64, 64, 4, 2, ragged_branch=True),
    BackwardConfig(128, 64, 8, 3, ragged_branch=True),
    BackwardConfig(64, 64, 4, 2, **_TMA_FLAGS),
    BackwardConfig(128, 64, 8, 3, **_TMA_FLAGS),
    BackwardConfig(128, 64, 8, 3, **_TMA_FLAGS, warp_spec=True),
    BackwardConfig(128, 64, 8, 2, **_TMA_FLAGS, warp_spec=True, tma_rows=True),
)


_DISABLED: set = set()


def disable_configs(configs) -> None:
    """Leave these candidates out of the tuner from now on (e.g. ones a benchmark's gradient check
    or compile found failing on this machine)."""
    _DISABLED.update(as_config(c) for c in configs)


def gpu_configs(block_size: int, tma: bool = True) -> list[BackwardConfig]:
    """Candidate configurations on a GPU that divide the block (``tma=False``: plain loads only)."""
    cands = [c for c in _GPU_CANDIDATES if block_size % c.tile == 0 and block_size % c.sub == 0
             and (tma or not (c.tma or c.warp_spec or c.tma_rows)) and c not in _DISABLED]
    return cands or [BackwardConfig(min(block_size, 64), min(block_size, 32), 4, 2)]


_TUNED: dict = {}


def tuned_configs() -> dict:
    """Configurations chosen so far: ``{(pass, key): BackwardConfig}``."""
    return dict(_TUNED)


def _launch_tuned(kind, launch, key, candidates):
    """Pick the fastest config once per key by timing each candidate (GPU only).

    Every launch writes (never accumulates) its outputs, so repeated timing runs are harmless."""
    cfg = _TUNED.get((kind, key))
    if cfg is None:
        from triton.testing import do_bench

        best = None
        for c in candidates:
            try:
                t = do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")
            except Exception:  # config does not compile or fit (shared memory, registers): skip it
                continue
            if best is None or t < best[0]:
                best = (t, c)
        if best is None:
            raise RuntimeError(f"no backward {kind} config could launch for key {key}")
        cfg = _TUNED[(kind, key)] = best[1]
    launch(cfg)


def _autotune_enabled() -> bool:
    return tuning_enabled("backward")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _check_inputs(do, q, k, v, out, lse, lists: BlockLists):
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
    block_size = lists.block_size
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    devs = {t.device for t in (do, q, k, v, out, lse)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {devs}")
    lists.check(B, H, q.device)


class BackwardLaunch:
    """One backward call, prepared: lists, padded row statistics and outputs allocated.

    :meth:`prepass` fills delta / lse2, then :meth:`dkdv` and :meth:`dq` run the two passes with
    a given configuration; each writes (never accumulates) its outputs, so a benchmark may time a
    pass alone and repeatedly. Built by :func:`prepare_backward`."""

    def __init__(self, do, q, k, v, out, lse, lists: BlockLists, scale):
        B, H, N, D = q.shape
        Nk = k.shape[2]
        block_size = lists.block_size
        self.block_size, self.on_gpu = block_size, q.is_cuda
        self.mq, self.mk = lists.mq, lists.mk
        transposed = lists.transposed()  # first: one launch builds both lists
        canonical = lists.canonical()
        self.f_lists, self.q_lists = (canonical.counts, canonical.indices), (transposed.counts, transposed.indices)
        self.do, self.q, self.k, self.v, self.out = do, q, k, v, out
        self.lse = lse if lse.dtype == torch.float32 else lse.to(torch.float32)
        self.scale = default_scale(D, scale)
        self.block_d = padded_head_dim(D)
        self.precision = dot_precision(q.dtype)
        # Row statistics padded to whole blocks (see _bwd_prepass_kernel).
        self.row_stride = self.mq * block_size
        self.delta = torch.empty(B * H, self.row_stride, dtype=torch.float32, device=q.device)
        self.lse2 = torch.empty(B * H, self.row_stride, dtype=torch.float32, device=q.device)
        self.dq_out = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
        self.dk_out = torch.empty(B, H, Nk, D, dtype=q.dtype, device=q.device)
        self.dv_out = torch.empty(B, H, Nk, D, dtype=q.dtype, device=q.device)
        self.strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        self.tma_ok = {"dkdv": tma_usable(q, do), "dq": tma_usable(k, v)}
        self.sm90 = _INTERPRET or not self.on_gpu or device_capability(q.device)[0] >= 9

    @property
    def grads(self):
        return self.dq_out, self.dk_out, self.dv_out

    def prepass(self) -> None:
        B, H, N, D = self.q.shape
        rows_per_prog = 64 if self.on_gpu else 32
        _bwd_prepass_kernel[(triton.cdiv(self.row_stride, rows_per_prog), B * H)](
            self.out, self.do, self.lse, self.delta, self.lse2, *self.out.stride(), *self.do.stride(),
            *self.lse.stride(), H, N, D, self.row_stride, BLOCK_M=rows_per_prog, BLOCK_D=self.block_d,
        )

    def check_config(self, kind: str, cfg) -> BackwardConfig:
        """``cfg`` as a BackwardConfig, or ValueError if it cannot run here."""
        cfg = as_config(cfg)
        bs = self.block_size
        if bs % cfg.tile or bs % cfg.sub or min(cfg.tile, cfg.sub) < 16:
            raise ValueError(f"config {cfg}: tiles must be >= 16 and divide block_size {bs}")
        if (cfg.tma or cfg.warp_spec or cfg.tma_rows) and not self.sm90:
            raise ValueError(f"config {cfg.label()} needs compute capability 9.0 (TMA / warp specialization)")
        if cfg.tma and not self.tma_ok[kind]:
            streamed = "q/do" if kind == "dkdv" else "k/v"
            raise ValueError(f"config {cfg.label()} needs TMA-readable {streamed}: unit last stride, "
                             "16-byte aligned base and strides")
        return cfg

    def candidates(self, kind: str) -> list[BackwardConfig]:
        return gpu_configs(self.block_size, tma=self.sm90 and self.tma_ok[kind])

    def _prepare_launch(self, cfg) -> None:
        if (cfg.tma or cfg.tma_rows) and self.on_gpu:
            ensure_tma_allocator()

    def dkdv(self, cfg) -> None:
        cfg = self.check_config("dkdv", cfg)
        self._prepare_launch(cfg)
        B, H, N, D = self.q.shape
        Nk = self.k.shape[2]
        q_counts, q_indices = self.q_lists
        _bwd_dkdv_kernel[(self.mk * (self.block_size // cfg.tile), B * H)](
            self.q, self.k, self.v, self.do, self.lse2, self.delta, self.dk_out, self.dv_out, q_counts, q_indices,
            *self.strides, H, N, Nk, D, self.mk, q_indices.shape[-1], self.row_stride,
            self.scale * LOG2E, self.scale,
            BLOCK_SIZE=self.block_size, BLOCK_N=cfg.tile, SUB_M=cfg.sub, BLOCK_D=self.block_d,
            PRECISION=self.precision, EVEN_Q=N % self.block_size == 0, EVEN_D=D == self.block_d,
            USE_TMA=cfg.tma, TMA_ROWS=cfg.tma_rows, RAGGED_BRANCH=cfg.ragged_branch, WARP_SPEC=cfg.warp_spec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def dq(self, cfg) -> None:
        cfg = self.check_config("dq", cfg)
        self._prepare_launch(cfg)
        B, H, N, D = self.q.shape
        Nk = self.k.shape[2]
        f_counts, f_indices = self.f_lists
        _bwd_dq_kernel[(self.mq * (self.block_size // cfg.tile), B * H)](
            self.q, self.k, self.v, self.do, self.lse2, self.delta, self.dq_out, f_counts, f_indices,
            *self.strides, H, N, Nk, D, self.mq, f_indices.shape[-1], self.row_stride,
            self.scale * LOG2E, self.scale,
            BLOCK_SIZE=self.block_size, BLOCK_M=cfg.tile, SUB_N=cfg.sub, BLOCK_D=self.block_d,
            PRECISION=self.precision, EVEN_K=Nk % self.block_size == 0, EVEN_D=D == self.block_d,
            USE_TMA=cfg.tma, RAGGED_BRANCH=cfg.ragged_branch, WARP_SPEC=cfg.warp_spec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def tune_key(self, kind: str) -> tuple:
        B, H, N, D = self.q.shape
        cap = device_capability(self.q.device) if self.on_gpu else None
        return (self.block_size, self.block_d, self.q.dtype, N, self.k.shape[2], cap, self.tma_ok[kind])


def prepare_backward(do, q, k, v, out, lse, kv_counts, kv_indices=None, *, block_size: int | None = None,
                     scale: float | None = None, q_lists=None) -> BackwardLaunch:
    """Checked inputs and buffers of one backward call, for running the passes one by one
    (benchmarks); :func:`block_sparse_attention_bwd` is the normal entry point."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    _check_inputs(do, q, k, v, out, lse, lists)
    if q_lists is not None:
        q_counts, q_indices = (t.to(torch.int32).contiguous() for t in q_lists)
        transposed = BlockLists(q_counts, q_indices, lists.block_size, lists.kv_len, lists.q_len)
        try:
            transposed.check(q.shape[0], q.shape[1], q.device)
        except (TypeError, ValueError) as err:
            raise ValueError(f"q_lists: {err}") from None
        lists = BlockLists(lists.counts, lists.indices, lists.block_size, lists.q_len, lists.kv_len,
                           transposed=transposed)
    if not q.is_cuda and not _INTERPRET:
        raise RuntimeError("the Triton backward needs a CUDA tensor or TRITON_INTERPRET=1")
    return BackwardLaunch(do, q, k, v, out, lse, lists, scale)


def block_sparse_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor | BlockLists,
    kv_indices: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    q_lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: BackwardConfig | tuple | None = None,
    dkdv_config: BackwardConfig | tuple | None = None,
    dq_config: BackwardConfig | tuple | None = None,
):
    """Gradients ``(dq, dk, dv)`` of block-sparse attention, in q's dtype, contiguous.

    ``out``/``lse`` are the forward's outputs (lse natural-log, fp32, (B, H, N)); the gradient that
    may flow into lse is not taken (lse is auxiliary). The lists as a :class:`.BlockLists`
    (``kv_indices`` None; its transposed lists are built once and kept) or the two tensors
    (``block_size`` None: 128); ``q_lists`` is the transposed lists ``(counts, indices)``, if the
    caller already has them. ``config`` forces the launch
    configuration (a :class:`BackwardConfig` or ``(tile, sub_tile, num_warps, num_stages)``) of both
    passes, ``dkdv_config`` / ``dq_config`` of one pass (benchmarks, tests); a pass not forced is
    timed once per shape key on GPUs (``MODCOMPILE_TUNE=0``: fixed configuration)."""
    run = prepare_backward(do, q, k, v, out, lse, kv_counts, kv_indices, block_size=block_size, scale=scale,
                           q_lists=q_lists)
    if q.numel() == 0 or k.numel() == 0:  # nothing attends anything: all gradients are zero
        return tuple(g.zero_() for g in run.grads)
    run.prepass()
    forced = {"dkdv": dkdv_config if dkdv_config is not None else config,
              "dq": dq_config if dq_config is not None else config}
    tune = run.on_gpu and _autotune_enabled()
    pins = pinned_configs() if run.on_gpu else {}
    for kind, launch in (("dkdv", run.dkdv), ("dq", run.dq)):
        if forced[kind] is None and kind in pins:
            try:
                forced[kind] = run.check_config(kind, pins[kind])
            except ValueError:  # cannot run on these tensors (e.g. TMA alignment): tune as usual
                pass
        if forced[kind] is not None:
            launch(forced[kind])
        elif tune:
            _launch_tuned(kind, launch, run.tune_key(kind), run.candidates(kind))
        else:
            launch(_fixed_config(run.block_size, run.block_d, run.on_gpu))
    return run.grads
