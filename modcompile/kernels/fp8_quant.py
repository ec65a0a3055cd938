"""Quantization of q, k and v for the FP8 attention forward (:mod:`.fp8_attention`): q and k to int8
per token, v to FP8 (e4m3) per block and channel.

Why int8 for the scores: on a trained DiT's own activations the score error dominates, and e4m3's
3 mantissa bits on q and k cost several times more than int8's fixed spacing at 127 levels per token
(BENCHMARKS.md, fp8); Hopper multiplies int8 at the same tensor-core rate as fp8.

One layout for every quantized copy, padded so that the attention kernel loads whole tiles without
masks: ``(B, H, Mb * block_size, BLOCK_D)`` int8 (q, k) with zeros past N and past the head dim, and
v transposed, ``(B, H, BLOCK_D, Mb * block_size)`` e4m3 (K-major: the B operand of Hopper's FP8
``P @ V`` product must have its reduction dim contiguous).

Scales (float32):

* q: one per token, ``amax / 127`` over the token's channels rounded up to 22 significant bits (so
  that the kernel's exact int32 -> float32 trick can fold the scale into one FMA:
  :mod:`.fp8_kernel`), in the lists' row order: with ``rows``
  (VMoBA's ``q_rows``) the copy holds row ``r`` = token ``rows[r]``, so the kernel reads it
  contiguously; shape (B, H, Mq * block_size);
* k: the same per token, after subtracting k's mean over the tokens per (batch, head) (``mean``,
  float32 (B, H, D)): it adds ``q . mean`` to every score of a row, which softmax ignores; the
  kernel adds it back to the lse only;
* v: ``amax / 448`` (448 the largest finite e4m3) per (batch, head, channel) over all tokens,
  (B, H, BLOCK_D): one scale per output channel, so the kernel accumulates P.V unscaled and applies
  it once per row at the end (``v_scale``: one torch reduction, like k's mean).

int8 values are ``x / scale`` (``|x / scale| <= 127``: the scale is rounded up) rounded half away
from zero (``trunc(y + 0.5 sign(y))`` in float32);
e4m3 values round to nearest even in the float8 conversion. A token (or v channel) whose amax is 0
has scale 0 and quantizes to 0. A NaN / Inf makes its scale non-finite, so its whole token (q, k) or
v channel dequantizes to NaN: the attention of that token would be NaN; a NaN in v reaches that
channel of every row of the head, as one in k reaches every score through k's mean (never a
swallowed NaN). The int8 value of a NaN is 0 (its scale carries the NaN).

Each tensor is one launch of :func:`_quantize_kernel` (k's mean and v's scale are one torch reduction
each before it);
:func:`quantize_ref` is its torch reference, bit for bit: the scale is an IEEE division
``amax / levels`` and the scaled value ``x / scale`` (correctly rounded division in both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import padded_head_dim

E4M3_MAX = 448.0
INT8_MAX = 127.0
FP8 = torch.float8_e4m3fn
INT8 = torch.int8


@dataclass
class Fp8Operands:
    """The quantized copies and scales one FP8 attention call reads (layouts: module docstring)."""

    q: torch.Tensor          # (B, H, Npad_q, BLOCK_D) int8, rows in the lists' order
    q_scale: torch.Tensor    # (B, H, Npad_q) float32, per row
    k: torch.Tensor          # (B, H, Npad_k, BLOCK_D) int8 of k - mean
    k_scale: torch.Tensor    # (B, H, Npad_k) float32, per token
    k_mean: torch.Tensor     # (B, H, BLOCK_D) float32 (zeros past the head dim)
    k_bias: torch.Tensor     # (B, H, Npad_k) float32: -1.5 * 2^23 * k_scale, -inf past N (fp8_kernel)
    v_t: torch.Tensor        # (B, H, BLOCK_D, Npad_k) fp8, v transposed
    v_scale: torch.Tensor    # (B, H, BLOCK_D) float32, per channel
    block_size: int


def _blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IEEE division of two float32 tensors (a tensor divisor: torch divides by a scalar through its
    reciprocal on CUDA, which would not match the kernel's correctly rounded division)."""
    return torch.div(a, b)


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (scale broadcast to x), 0 where the scale is 0 (an all-zero token or channel)."""
    s = scale.expand_as(x).contiguous()
    return torch.where(s == 0, torch.zeros_like(x), _div(x, s))


def round_up_22_bits(scale: torch.Tensor) -> torch.Tensor:
    """A finite float32 >= 0 rounded up to 22 significant bits (its 2 lowest mantissa bits cleared
    upwards); inf and NaN stay as they are (a NaN's bits could wrap to -0)."""
    return torch.where(scale < float("inf"), ((scale.view(torch.int32) + 3) & ~3).view(torch.float32), scale)


def _quantize_tokens_ref(x: torch.Tensor):
    """x (B, H, Npad, Dp) float32, zero padded -> (int8 copy, scale (B, H, Npad)) per token."""
    amax = x.abs().amax(3)  # NaN propagates, as the kernel's max does
    scale = round_up_22_bits(_div(amax, torch.full_like(amax, INT8_MAX)))
    y = _scaled(x, scale[..., None])
    y = torch.where(torch.isnan(y), torch.zeros_like(y), y)
    return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).to(INT8), scale


def _quantize_channels_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, H, Npad, Dp) float32, zero padded -> its e4m3 copy at the per-channel scale (B, H, Dp)."""
    return _scaled(x, scale[:, :, None, :]).to(FP8)


def _padded(x: torch.Tensor, block_size: int, rows: torch.Tensor | None) -> torch.Tensor:
    B, H, n, d = x.shape
    npad, dp = _blocks(n, block_size) * block_size, padded_head_dim(d)
    if rows is not None:
        x = x.index_select(2, rows.long())
    out = x.new_zeros(B, H, npad, dp, dtype=torch.float32)
    out[:, :, :n, :d] = x.float()
    return out


def v_scale(v: torch.Tensor) -> torch.Tensor:
    """(B, H, BLOCK_D) float32: v's e4m3 scale per channel, ``amax / 448`` over the tokens (an IEEE
    division; NaN propagates), zero past the head dim and for no tokens."""
    B, H, n, d = v.shape
    amax = v.new_zeros(B, H, padded_head_dim(d), dtype=torch.float32)
    if n:
        lo, hi = torch.aminmax(v, dim=2)  # one pass, no |v| copy; NaN propagates
        amax[..., :d] = torch.maximum(-lo, hi).float()  # exact: the max of |v| is one of v's values
    return _div(amax, torch.full_like(amax, E4M3_MAX))


def k_mean(k: torch.Tensor) -> torch.Tensor:
    """(B, H, BLOCK_D) float32: k's mean over the tokens, zero past the head dim."""
    B, H, _, d = k.shape
    mean = k.new_zeros(B, H, padded_head_dim(d), dtype=torch.float32)
    mean[..., :d] = k.mean(2, dtype=torch.float32)
    return mean


def quantize_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                 rows: torch.Tensor | None = None) -> Fp8Operands:
    """The torch reference of :func:`quantize` (same layouts, same values)."""
    q8, q_scale = _quantize_tokens_ref(_padded(q, block_size, rows))
    mean = k_mean(k)
    kp = _padded(k, block_size, None)
    n = k.shape[2]
    kp[:, :, :n] -= mean[:, :, None, :]
    k8, k_scale = _quantize_tokens_ref(kp)
    vs = v_scale(v)
    v8 = _quantize_channels_ref(_padded(v, block_size, None), vs)
    return Fp8Operands(q8, q_scale, k8, k_scale, mean, key_bias(k_scale, n), v8.transpose(2, 3).contiguous(),
                       vs, block_size)


MAGIC = 12582912.0  # 1.5 * 2^23: the kernel reads an int32 s as the float MAGIC + s


def key_bias(k_scale: torch.Tensor, n: int) -> torch.Tensor:
    """The addend of the kernel's score FMA per key: ``-MAGIC * k_scale`` (exact: 22-bit scales),
    ``-inf`` for the padding past ``n`` keys, so that the ragged tail needs no mask in the loop."""
    bias = -MAGIC * k_scale
    bias[..., n:] = float("-inf")
    return bias


def dequantize(ops: Fp8Operands):
    """(q, k - mean, v) in float32 from the quantized copies, padded (B, H, Npad, BLOCK_D)."""
    q = ops.q.float() * ops.q_scale[..., None]
    k = ops.k.float() * ops.k_scale[..., None]
    v = ops.v_t.transpose(2, 3).float() * ops.v_scale[:, :, None, :]
    return q, k, v


# ----------------------------------------------------------------------------------------- Triton
try:
    import triton
    import triton.language as tl
except ImportError:  # the references above stay usable without triton
    triton = None

if triton is not None:
    @triton.jit
    def _quantize_kernel(X, Rows, Mean, Out, Scale, Bias, N,
                         stride_xb, stride_xh, stride_xn, H,
                         stride_on, stride_od,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         GATHER: tl.constexpr, SMOOTH: tl.constexpr, TOKENS_INT8: tl.constexpr,
                         KEY_BIAS: tl.constexpr):
        """One (batch, head, block): read the block once (rows ``Rows[r]`` with GATHER), subtract
        ``Mean`` (SMOOTH), write the copy: int8 per token (TOKENS_INT8; its scales written too, and
        with KEY_BIAS :func:`key_bias`) or e4m3 at the given per-channel ``Scale`` (v). Out is
        contiguous per (batch, head) with strides (stride_on, stride_od): (Npad, BLOCK_D) for q / k,
        (BLOCK_D, Npad) for v."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_r = pid_m * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_r < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
        if GATHER:
            tok = tl.load(Rows + offs_r, mask=offs_r < N, other=0)
        else:
            tok = offs_r
        x = tl.load(X + b * stride_xb + h * stride_xh + tok.to(tl.int64)[:, None] * stride_xn + offs_d[None, :],
                    mask=ok, other=0.0).to(tl.float32)
        if SMOOTH:
            mean = tl.load(Mean + pid_bh * BLOCK_D + offs_d)
            x = tl.where(ok, x - mean[None, :], 0.0)
        n_blocks = tl.num_programs(0)
        base = Out + pid_bh.to(tl.int64) * n_blocks * BLOCK_SIZE * BLOCK_D
        out_ptrs = base + offs_r[:, None] * stride_on + offs_d[None, :] * stride_od
        if TOKENS_INT8:
            amax = tl.max(tl.abs(x), 1)
            scale = tl.math.div_rn(amax, tl.full([BLOCK_SIZE], 127.0, tl.float32))
            up = ((scale.to(tl.int32, bitcast=True) + 3) & ~3).to(tl.float32, bitcast=True)  # 22 bits, up
            scale = tl.where(scale < float("inf"), up, scale)  # a NaN's bits could wrap to -0
            tl.store(Scale + pid_bh * n_blocks * BLOCK_SIZE + offs_r, scale)
            if KEY_BIAS:
                tl.store(Bias + pid_bh * n_blocks * BLOCK_SIZE + offs_r,
                         tl.where(offs_r < N, -12582912.0 * scale, float("-inf")))
            s = scale[:, None] + tl.zeros_like(x)
        else:
            s = tl.load(Scale + pid_bh * BLOCK_D + offs_d)[None, :] + tl.zeros_like(x)
        # 0 / 0 is NaN: an all-zero token or channel (scale 0) quantizes to 0
        y = tl.where(s == 0.0, 0.0, tl.math.div_rn(x, s))
        if TOKENS_INT8:
            y = tl.where(y == y, y, 0.0)  # a NaN stores 0: its scale keeps the NaN
            tl.store(out_ptrs, (y + tl.where(y >= 0.0, 0.5, -0.5)).to(tl.int8))
        else:
            tl.store(out_ptrs, y.to(tl.float8e4nv))

    def _quantize_one(x, block_size, rows=None, mean=None, with_bias=False, channel_scale=None):
        """(copy, scale, key bias or None) of one tensor: one launch; int8 per token, or e4m3 at
        ``channel_scale`` (v)."""
        tokens_int8 = channel_scale is None
        B, H, n, d = x.shape
        mb, dp = _blocks(n, block_size), padded_head_dim(d)
        npad = mb * block_size
        bias = None
        if tokens_int8:
            out = torch.empty((B, H, npad, dp), dtype=INT8, device=x.device)
            scale = torch.empty((B, H, npad), dtype=torch.float32, device=x.device)
            if with_bias:
                bias = torch.empty_like(scale)
        else:  # v: e4m3, transposed
            out = torch.empty((B, H, dp, npad), dtype=FP8, device=x.device)
            scale = channel_scale
        x = x if x.stride(-1) == 1 else x.contiguous()
        _quantize_kernel[(mb, B * H)](
            x, rows if rows is not None else scale, mean if mean is not None else scale, out, scale,
            bias if bias is not None else scale, n,
            x.stride(0), x.stride(1), x.stride(2), H,
            dp if tokens_int8 else 1, 1 if tokens_int8 else npad,
            HEAD_DIM=d, BLOCK_D=dp, BLOCK_SIZE=block_size, GATHER=rows is not None, SMOOTH=mean is not None,
            TOKENS_INT8=tokens_int8, KEY_BIAS=bias is not None, num_warps=4 if block_size * dp <= 64 * 128 else 8)
        return out, scale, bias


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
             rows: torch.Tensor | None = None) -> Fp8Operands:
    """The quantized copies of one call on the GPU: one Triton launch per tensor (and k's mean, v's scale)."""
    if triton is None:
        raise RuntimeError("fp8 quantization kernel needs triton")
    q8, q_scale, _ = _quantize_one(q, block_size, rows=rows)
    mean = k_mean(k)
    k8, k_scale, bias = _quantize_one(k, block_size, mean=mean, with_bias=True)
    vs = v_scale(v)
    v_t, _, _ = _quantize_one(v, block_size, channel_scale=vs)
    return Fp8Operands(q8, q_scale, k8, k_scale, mean, bias, v_t, vs, block_size)
