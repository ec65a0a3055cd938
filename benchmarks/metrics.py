"""Fidelity metrics: relative L2 error, attention-mass recall of a block mask, PSNR, SSIM, density.

Attention-mass recall is computed blockwise, chunked over query blocks, so an N x N matrix is never
held at large N (only ``chunk rows x N`` per step).
"""
from __future__ import annotations

import math

import torch

from modcompile.kernels.block_lists import mask_from_lists, num_blocks


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are zero)."""
    if x.shape != ref.shape:
        raise ValueError(f"relative_l2: shapes differ {tuple(x.shape)} vs {tuple(ref.shape)}")
    x64, r64 = x.double(), ref.double()
    den = r64.norm()
    num = (x64 - r64).norm()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, *, scale: float | None = None,
                         chunk_blocks: int = 4) -> torch.Tensor:
    """Softmax mass per (query block, key block): ``[B, H, Mq, Mk]``, float32.

    Entry (i, j) is the sum over the queries of block i of the dense softmax probabilities that fall
    in key block j, so each row i sums to the number of queries in block i.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("block_attention_mass expects q, k of shape (B, H, N, D)")
    B, H, N, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mq, mk = num_blocks(N, block_size), num_blocks(Nk, block_size)
    pad = mk * block_size - Nk
    kf = k.float()
    out = torch.empty(B, H, mq, mk, dtype=torch.float32, device=q.device)
    for b0 in range(0, mq, chunk_blocks):
        b1 = min(b0 + chunk_blocks, mq)
        r0, r1 = b0 * block_size, min(b1 * block_size, N)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale  # [B, H, rows, Nk]
        p = torch.softmax(s, dim=-1)
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        per_key_block = p.view(B, H, r1 - r0, mk, block_size).sum(-1)  # [B, H, rows, Mk]
        rows_pad = (b1 - b0) * block_size - (r1 - r0)
        if rows_pad:
            per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, rows_pad))
        out[:, :, b0:b1] = per_key_block.view(B, H, b1 - b0, block_size, mk).sum(3)
    return out


def mass_recall_from_mass(mass: torch.Tensor, block_mask: torch.Tensor, per_head: bool = False):
    """Fraction of the dense softmax mass inside ``block_mask`` (bool ``[B, H, Mq, Mk]``)."""
    if mass.shape != block_mask.shape:
        raise ValueError(f"mask shape {tuple(block_mask.shape)} != mass shape {tuple(mass.shape)}")
    kept = (mass * block_mask).sum((-1, -2))
    total = mass.sum((-1, -2))
    per = kept / total.clamp_min(1e-30)
    return per if per_head else float(kept.sum() / total.sum())


def attention_mass_recall(q, k, kv_counts, kv_indices, block_size: int, *, scale=None, per_head=False,
                          chunk_blocks: int = 4):
    """Attention-mass recall of the block lists (kernel contract) against dense softmax attention."""
    mass = block_attention_mass(q, k, block_size, scale=scale, chunk_blocks=chunk_blocks)
    mask = mask_from_lists(kv_counts, kv_indices, mass.shape[-1])
    return mass_recall_from_mass(mass, mask, per_head=per_head)


def achieved_density(kv_counts: torch.Tensor | None = None, mk: int | None = None, *,
                     block_mask: torch.Tensor | None = None) -> float:
    """Fraction of (query block, key block) pairs computed: from block lists or a dense bool mask."""
    if block_mask is not None:
        return float(block_mask.double().mean())
    if kv_counts is None or mk is None:
        raise ValueError("achieved_density needs kv_counts and mk, or block_mask")
    return float(kv_counts.double().mean() / mk)


# ---------------------------------------------------------------- image / video quality
def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's value range."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(ref.shape)}")
    x64, r64 = x.double(), ref.double()
    if data_range is None:
        data_range = float(r64.max() - r64.min()) or 1.0
    mse = float(((x64 - r64) ** 2).mean())
    if mse == 0:
        return float("inf")
    return 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_frames(x: torch.Tensor, ref: torch.Tensor, data_range: float, window: int = 11,
                sigma: float = 1.5) -> torch.Tensor:
    """SSIM per frame for ``(F, C, H, W)`` tensors (gaussian window, valid region), shape ``(F,)``."""
    F_, C, H, W = ref.shape
    size = min(window, H, W)
    size = size if size % 2 == 1 else size - 1
    g = _gaussian_window(size, sigma * size / window, torch.float64, ref.device)
    kh = g.view(1, 1, size, 1).repeat(C, 1, 1, 1)
    kw = g.view(1, 1, 1, size).repeat(C, 1, 1, 1)

    def blur(t):
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, kh, groups=C), kw, groups=C)

    a, b = x.double(), ref.double()
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean((1, 2, 3))


def ssim(x: torch.Tensor, ref: torch.Tensor, *, layout: str = "CTHW", data_range: float | None = None) -> float:
    """Frame-wise SSIM averaged over frames (and over a leading batch dim if present).

    ``layout``: ``"CTHW"`` (latents, e.g. our DiT's samples) or ``"TCHW"`` (decoded frames)."""
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(ref.shape)}")
    if layout not in ("CTHW", "TCHW"):
        raise ValueError(f"ssim: layout must be CTHW or TCHW, got {layout!r}")
    if ref.dim() == 4:
        x, ref = x.unsqueeze(0), ref.unsqueeze(0)
    if ref.dim() != 5:
        raise ValueError(f"ssim expects a video (C,T,H,W)/(T,C,H,W) or a batch of them, got {tuple(ref.shape)}")
    if layout == "CTHW":
        x, ref = x.transpose(1, 2), ref.transpose(1, 2)  # -> (B, T, C, H, W)
    if data_range is None:
        data_range = float(ref.double().max() - ref.double().min()) or 1.0
    frames_x = x.reshape(-1, *x.shape[2:])
    frames_r = ref.reshape(-1, *ref.shape[2:])
    return float(ssim_frames(frames_x, frames_r, data_range).mean())


# ---------------------------------------------------------------- log-sum-exp based recall
def dense_lse(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, chunk_rows: int = 1024) -> torch.Tensor:
    """Row log-sum-exp of the dense scaled scores, float32 ``(B, H, N)``, chunked over queries."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float().transpose(-1, -2)
    parts = [torch.logsumexp(torch.matmul(q[:, :, r:r + chunk_rows].float(), kf) * scale, dim=-1)
             for r in range(0, q.shape[2], chunk_rows)]
    return torch.cat(parts, dim=-1)


def recall_from_lse(lse_sparse: torch.Tensor, lse_dense: torch.Tensor, per_head: bool = False):
    """Attention-mass recall from log-sum-exps: a row keeps exp(lse_sparse - lse_dense) of its mass.

    Independent of how a policy orders its blocks (VMoBA permutes tokens into partition blocks)."""
    kept = torch.exp((lse_sparse.float() - lse_dense.float()).clamp(max=0.0))
    kept = torch.nan_to_num(kept, nan=0.0)
    return kept.mean(-1) if per_head else float(kept.mean())


__all__ = ["relative_l2", "block_attention_mass", "mass_recall_from_mass", "attention_mass_recall",
           "achieved_density", "psnr", "ssim", "ssim_frames", "dense_lse", "recall_from_lse"]
