"""FP8 block-sparse attention forward: launch wrapper, torch reference and the error model.

Same contract as :func:`.block_sparse_attention.block_sparse_attention_fwd` (block lists, ragged
tails, ``q_rows``, out in q's dtype, natural-log lse with -inf and out 0 on empty lists), at
lower precision, on the 8-bit tensor cores of Hopper / Ada:

1. q and k (smoothed by its mean over tokens) are quantized to int8 per token, v to e4m3 per
   channel (:mod:`.fp8_quant`: one launch each, counted in every call);
2. scores = (q8 . k8) * k_scale * q_scale, exact int32 accumulation, scaled in float32;
3. the online softmax keeps its running maximum m exact (log2 units), so p = exp2(s - m) lies in
   (0, 1] and is 1 for the key that sets the maximum; P_SCALE p (P_SCALE = 2^8, so that the small
   probabilities stay in e4m3's normal range) is rounded to e4m3 (exact for 1) and multiplied with
   v8 (fp32 accumulation);
   l sums the unrounded P_SCALE p; out = acc * v_scale / l;
4. lse adds back q . mean(k) * scale, which the smoothing took out of every score.

Each ``tl.dot`` reduces at most ``BLOCK_D`` (scores, exact in int32) or ``BLOCK_N`` (P.V) products; each
chunk's P.V product is added to the float32 accumulator outside the dot, so Triton's default fp8
accumulation on sm_90 (the tensor core's reduced-precision sum within one dot) never spans more than
one chunk.

The kernel runs on CUDA devices of compute capability 8.9 or newer (int8 and e4m3 tensor cores), head dims
32 to 128 of the bf16 kernel's set, blocks of 32 to 128 tokens.
:func:`fp8_path` says where it cannot run and why: under the Triton interpreter (its float8
conversion is wrong: values that round up to the next power of two come out halved) and on CPU the
torch reference :func:`block_sparse_attention_fp8_ref` runs instead, which quantizes exactly as the
kernel does; on older GPUs, head dims under 32 or blocks under 32 the caller takes the bf16 kernel.

:func:`predicted_relative_error` is the error model that the accuracy tests and the benchmark
assert against: the first-order propagation of the int8 and e4m3 roundings through the attention,
derived from the formats alone (module section "Error model").
"""
from __future__ import annotations

import math

import torch

from ._common import (LOG2E, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, default_scale, device_capability,
                      ensure_tma_allocator, interpreting, padded_head_dim)
from .block_lists import BlockLists, as_block_lists
from . import fp8_quant as fq  # fq.FP8 read at call time: the reference rounds P in the format the tests pick
from .fp8_quant import E4M3_MAX, INT8_MAX, dequantize, quantize, quantize_ref
from .reference import masked_block_matmul, query_chunks
from .tuning import LaunchConfig

LN2 = math.log(2.0)
P_SCALE = 256.0  # p's factor before its e4m3 rounding: a power of two, folded into the kernel's exponent


def fp8_path(q: torch.Tensor, block_size: int) -> tuple[str, str]:
    """``("kernel", "")``, ``("reference", why)`` (CPU, or the interpreter: the fp8 torch
    reference runs) or ``("none", why)`` (a GPU the fp8 kernel cannot serve: take the bf16 kernel)."""
    if interpreting() or not q.is_cuda:
        where = "the Triton interpreter (its float8 conversion is wrong)" if interpreting() else q.device.type
        return "reference", f"fp8 kernel not run on {where}: fp8 torch reference"
    if device_capability(q.device) < (8, 9):
        return "none", "fp8 needs compute capability 8.9 or newer"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or q.shape[-1] < 32 or block_size not in SUPPORTED_BLOCK_SIZES \
            or block_size < 32:
        return "none", (f"fp8 kernel needs head_dim in {tuple(d for d in SUPPORTED_HEAD_DIMS if d >= 32)} and "
                        f"block_size >= 32, got {q.shape[-1]}, {block_size}")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "none", "triton not importable"
    return "kernel", ""


def default_config(block_size: int) -> LaunchConfig:
    """The fp8 kernel's launch configuration (fixed: not tuned). 128-token blocks: 64 query rows per
    program against whole 128-key chunks, the fastest of 13 configs on the H100 (BENCHMARKS.md
    section 9); smaller blocks: one block per program and step."""
    if block_size >= 128:
        return LaunchConfig(64, 128, 4, 3)
    return LaunchConfig(block_size, block_size, 4, 3)


# the LaunchConfig flags the fp8 kernel has (sm_90+ both; they gained at most a few percent)
FP8_FLAGS = ("tma", "warp_spec")


def block_sparse_attention_fp8(q, k, v, kv_counts, kv_indices=None, *, block_size=None, scale=None,
                               out=None, lse=None, q_rows=None, config: LaunchConfig | None = None):
    """FP8 block-sparse attention on the GPU (module docstring); returns ``(out, lse)``.

    Arguments as :func:`.block_sparse_attention.block_sparse_attention_fwd` (no key bias, no poison).
    The quantization (three launches and k's mean) is part of every call."""
    import triton

    from .fp8_kernel import _fp8_attention_fwd_kernel

    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    _check(q, k, v, lists, q_rows)
    B, H, N, D = q.shape
    bs = lists.block_size
    scale = default_scale(D, scale)
    if not scale > 0:
        raise ValueError(f"block_sparse_attention_fp8: scale must be > 0 (the kernel takes each row's maximum "
                         f"score from the largest k-scaled product), got {scale}")
    cfg = config or default_config(bs)
    if not cfg.fits(bs):
        raise ValueError(f"config {cfg} does not divide block_size {bs}")
    other = [f for f in ("ragged_branch", "tma_rows", "host_tma", "qo_tma") if getattr(cfg, f)] + \
        (["key_blocks"] if cfg.key_blocks else [])
    if other:
        raise ValueError(f"block_sparse_attention_fp8: config {cfg.label()} sets {other}; the fp8 kernel has only "
                         f"{FP8_FLAGS}")
    path, why = fp8_path(q, bs)
    if path != "kernel":
        raise ValueError(f"block_sparse_attention_fp8: {why}")
    if (cfg.tma or cfg.warp_spec) and device_capability(q.device) < (9, 0):
        raise ValueError(f"block_sparse_attention_fp8: {cfg.label()} needs compute capability 9.0 (Hopper)")
    if out is None:
        out = q.new_empty(B, N, H, D).transpose(1, 2)
    if lse is None:
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return out, lse
    if cfg.tma:
        ensure_tma_allocator()
    ops = quantize(q, k, v, bs, q_rows)
    counts, indices = lists.counts, lists.indices
    _fp8_attention_fwd_kernel[(triton.cdiv(N, cfg.tile), B * H)](
        ops.q, ops.q_scale, ops.k, ops.k_scale, ops.k_mean, ops.k_bias, ops.v_t, ops.v_scale, out, lse, counts, indices,
        q_rows if q_rows is not None else counts,
        scale * LOG2E, scale,
        N, k.shape[2], H, lists.mq, lists.mk,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        HEAD_DIM=D, BLOCK_D=padded_head_dim(D), BLOCK_SIZE=bs, BLOCK_M=cfg.tile, BLOCK_N=cfg.sub,
        GATHER_Q=q_rows is not None, USE_TMA=cfg.tma, WARP_SPEC=cfg.warp_spec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _check(q, k, v, lists: BlockLists, q_rows):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"fp8 attention: {name} must be a (B, H, N, D) tensor")
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"fp8 attention: k, v must be (B, H, Nk, D) matching q {tuple(q.shape)}; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fp8 attention: q, k, v must share a float16 / bfloat16 / float32 dtype; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    lists.check(B, H, q.device)
    if q_rows is not None and (q_rows.dim() != 1 or q_rows.numel() != N or q_rows.dtype != torch.int32):
        raise ValueError(f"fp8 attention: q_rows must be an ({N},) int32 permutation")


# --------------------------------------------------------------------------------------- reference
def block_sparse_attention_fp8_ref(q, k, v, kv_counts, kv_indices=None, *, block_size=None, scale=None,
                                   q_rows=None, key_chunk: int | None = None, chunk_blocks: int = 8):
    """The fp8 kernel's torch reference: the same quantized operands (:func:`.fp8_quant.quantize_ref`),
    the same running maximum and e4m3 rounding of ``P_SCALE p``, float32 arithmetic. Returns
    ``(out, lse)`` like the kernel (out in q's dtype, at q's tokens when ``q_rows`` is given).

    The kernel rounds each p against the row's maximum so far, so the reference follows its order:
    the lists' order, ``key_chunk`` keys at a time (the launch config's ``sub``; default: that of
    :func:`default_config`)."""
    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    _check(q, k, v, lists, q_rows)
    B, H, N, D = q.shape
    n_k, bs = k.shape[2], lists.block_size
    key_chunk = key_chunk or default_config(bs).sub
    if bs % key_chunk:
        raise ValueError(f"key_chunk {key_chunk} must divide block_size {bs}")
    scale = default_scale(D, scale)
    ops = quantize_ref(q, k, v, bs, q_rows)
    qd, kd, vd = dequantize(ops)
    qd, kd, vd = qd[:, :, :N], kd[:, :, :n_k], vd[:, :, :n_k]
    out = torch.empty(B, H, N, padded_head_dim(D), dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    v8 = ops.v_t.transpose(2, 3)[:, :, :n_k].float()
    for r0, r1, allowed in query_chunks(lists, chunk_blocks):
        s = (qd[:, :, r0:r1] @ kd.transpose(-1, -2)) * (scale * LOG2E)
        s = s.masked_fill(~allowed, float("-inf"))
        running = _running_max(s, lists, r0 // bs, key_chunk)
        m = s.amax(-1, keepdim=True)
        live = allowed & (s != float("-inf"))
        p = torch.where(live, torch.exp2(s - torch.where(torch.isinf(running), 0.0, running)), 0.0)
        # each rounded p rescaled from its running maximum to the final one (the kernel's alpha)
        to_final = torch.where(live, torch.exp2(running - m), 0.0)
        l = (p * to_final).sum(-1)
        p8 = (p * P_SCALE).to(fq.FP8).float() * to_final
        # the rounded products summed unscaled, v's per-channel scale applied at the end (as the kernel)
        num = masked_block_matmul(p8, v8, allowed[:, :, ::bs], bs) * ops.v_scale[:, :, None, :]
        has = l != 0
        l_safe = torch.where(has, l, 1.0)
        out[:, :, r0:r1] = num / (l_safe * P_SCALE)[..., None]
        shift = (qd[:, :, r0:r1] * ops.k_mean[:, :, None, :]).sum(-1) * scale
        lse[:, :, r0:r1] = torch.where(has, (m.squeeze(-1) + torch.log2(l_safe)) * LN2 + shift, float("-inf"))
    out = out[..., :D].to(q.dtype)
    if q_rows is not None:
        rows = q_rows.long()
        out = torch.empty_like(out).index_copy_(2, rows, out)
        lse = torch.empty_like(lse).index_copy_(2, rows, lse)
    return out, lse


def _running_max(s: torch.Tensor, lists: BlockLists, qb0: int, key_chunk: int) -> torch.Tensor:
    """The kernel's running row maximum at each key's chunk: ``s`` (B, H, rows, n_k) holds the scores
    (-inf where not listed) of the rows from query block ``qb0`` on; chunks of ``key_chunk`` keys
    arrive in list order, so a key sees the maximum over its own chunk and every chunk before it."""
    B, H, rows, n_k = s.shape
    bs, mk = lists.block_size, lists.mk
    per_block = bs // key_chunk
    qb1 = qb0 + -(-rows // bs)
    counts, indices = lists.counts[:, :, qb0:qb1].long(), lists.indices[:, :, qb0:qb1].long()
    pos = torch.arange(indices.shape[-1], device=s.device)
    listed = pos < counts[..., None]
    # each key block's place in its query block's list (unlisted blocks last: their scores are -inf)
    last = indices.shape[-1]
    place = torch.full((B, H, qb1 - qb0, mk), last, dtype=torch.long, device=s.device)
    place.scatter_reduce_(-1, torch.where(listed, indices, 0), torch.where(listed, pos, last), reduce="amin")
    order = (place[..., None] * per_block + torch.arange(per_block, device=s.device)).flatten(-2)
    arrival = order.argsort(-1).repeat_interleave(bs, 2)[:, :, :rows]  # every row of a block: its order
    chunk_max = torch.nn.functional.pad(s, (0, mk * bs - n_k), value=float("-inf")).unflatten(-1, (-1, key_chunk)).amax(-1)
    run = chunk_max.gather(-1, arrival).cummax(-1).values
    running = torch.empty_like(run).scatter_(-1, arrival, run)
    return running.repeat_interleave(key_chunk, -1)[..., :n_k]


# --------------------------------------------------------------------------------------- error model
# Error model. int8 (q, k): the spacing is the token's scale s = amax / 127 everywhere, so the
# rounding error, modelled as independent, zero-mean and uniform in [-s/2, s/2], has variance s^2 / 12.
# e4m3 (P, v) keeps 3 mantissa bits: round to nearest moves a normal x by at most half a spacing,
# |err| <= u |x| with u = 2^-4; below the smallest normal (2^-6, scaled) the spacing is the
# subnormal one, 2^-9, so |err| <= 2^-10 in scaled units (eta = 2^-10 * v's channel scale).
# Modelled as uniform within that half spacing, each e4m3 rounding error has variance at most
# (u^2 x^2 + eta^2) / 3, and at least u^2 x^2 / 12 for normal x (the half spacing is at least
# u |x| / 2). The key that sets a row's maximum has p = 1, exact (keys that set the running maximum
# on the way are exact too; the model counts them, so its low end may overstate a little where a
# row's record-setting keys carry weight). First order in the errors, with pi the row's softmax weights over the listed keys and
# o the exact output (kbar = k - mean(k), the tensor that is quantized):
#   v:  d o   = sum_j pi_j dv_j                         E|do|^2 = sum_j pi_j^2 sum_d Var(dv_jd)
#   p:  d o   = sum_j pi_j (dp_j / p_j) v_j             E|do|^2 = sum_j Var(dp_j / p_j) pi_j^2 |v_j|^2
#   k:  d s_j = scale sum_i q_i dk_ji                   E|do|^2 = scale^2 sum_j pi_j^2 |v_j - o|^2 sum_i q_i^2 Var(dk_ji)
#   q:  d s_j = scale sum_i dq_i kbar_ji (shared by all keys of the row, so summed before squaring)
#                                                       E|do|^2 = scale^2 sum_i Var(dq_i) |sum_j pi_j kbar_ji (v_j - o)|^2
# (a score error ds moves o by sum_j pi_j ds_j (v_j - o)). The predicted relative L2 error is
# sqrt(sum of the four over all rows / sum |o|^2); upper with the e4m3 variance bound, lower with
# u^2/12 and no subnormal term (the int8 terms are the same at both ends). Second-order terms are
# O(u^2) relative and left out.
U = 2.0 ** -4
ETA = 2.0 ** -10


def predicted_relative_error(q, k, v, kv_counts, kv_indices=None, *, block_size=None, scale=None,
                             chunk_blocks: int = 2) -> tuple[float, float]:
    """``(low, high)``: the error model's relative L2 error of the fp8 output against the exact
    attention of the same lists (float64; see the comment above). Costs O(N^2 D^2) per head: meant
    for test and benchmark shapes (a few thousand tokens)."""
    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    D = q.shape[-1]
    scale = default_scale(D, scale)
    qd, kd, vd = (t.double() for t in (q, k, v))
    kbar = kd - kd.mean(2, keepdim=True)

    def eta_v(x):  # (B, H, 1, D): eta * the scale of each channel (amax over the tokens)
        return ETA * x.abs().amax(2, keepdim=True) / E4M3_MAX

    def int8_variance(x):  # (B, H, n, 1): (s / 127)^2 / 12 per token
        return (x.abs().amax(-1, keepdim=True) / INT8_MAX) ** 2 / 12

    var_q = int8_variance(qd)
    var_k = int8_variance(kbar)
    var_v_hi = (U ** 2 * vd ** 2 + eta_v(vd) ** 2) / 3
    terms_hi = torch.zeros((), dtype=torch.float64)
    terms_lo = torch.zeros((), dtype=torch.float64)
    norm = torch.zeros((), dtype=torch.float64)
    for r0, r1, allowed in query_chunks(lists, chunk_blocks):
        s = (qd[:, :, r0:r1] @ kd.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        pi = torch.softmax(s, -1).nan_to_num(0.0)  # empty rows: no keys, no error
        o = pi @ vd
        norm = norm + (o ** 2).sum()
        pi2 = pi ** 2
        # p: relative variance of P_SCALE p rounded, plus its subnormal term relative to p (p against
        # the final maximum: at most the p the kernel rounds against its running one)
        s_max = s.amax(-1, keepdim=True)
        p_rel = torch.exp(s - s_max)
        rounded = (pi > 0) & (s < s_max)  # the key that sets the maximum has p = 1: exact in e4m3
        var_p_rel_hi = U ** 2 / 3 + torch.where(p_rel > 0, (ETA / P_SCALE) ** 2 / 3 / p_rel.clamp_min(1e-300) ** 2, 0.0)
        var_p_rel_hi = torch.where(rounded, var_p_rel_hi, 0.0)
        v2 = (vd ** 2).sum(-1)  # (B, H, Nk)
        dev2 = (v2[:, :, None, :] - 2 * (o @ vd.transpose(-1, -2)) + (o ** 2).sum(-1, keepdim=True))  # |v_j - o|^2
        term_v_hi = (pi2 @ var_v_hi).sum()
        term_v_lo = U ** 2 / 12 * (pi2 @ vd ** 2).sum()
        term_p_hi = (var_p_rel_hi * pi2 * v2[:, :, None, :]).sum()
        term_p_lo = U ** 2 / 12 * (torch.where(rounded, pi2, 0.0) * v2[:, :, None, :]).sum()
        qk = (qd[:, :, r0:r1] ** 2).sum(-1, keepdim=True) * var_k.transpose(-1, -2)  # sum_i q_i^2 Var(dk_ji)
        term_k = scale ** 2 * (pi2 * dev2 * qk).sum()
        # sum_j pi_j kbar_ji (v_jd - o_d): (B, H, rows, D_i, D_d)
        m_rows = torch.einsum("bhrj,bhji,bhjd->bhrid", pi, kbar, vd) - \
            (pi @ kbar)[..., :, None] * o[..., None, :]
        cross = (m_rows ** 2).sum(-1)  # (B, H, rows, D_i)
        term_q = scale ** 2 * (var_q[:, :, r0:r1] * cross).sum()
        terms_hi = terms_hi + term_v_hi + term_p_hi + term_k + term_q
        terms_lo = terms_lo + term_v_lo + term_p_lo + term_k + term_q
    if norm == 0:
        return 0.0, 0.0
    return math.sqrt(terms_lo / norm), math.sqrt(terms_hi / norm)
