"""Structured synthetic q/k/v with realistic attention heads (no trained model needed).

Tokens sit on a 3D latent grid (T, H, W) in raster order (frame-major, like a patch embedding's
flatten), optionally followed (or preceded) by text tokens. Each head's logits are a sum of terms:

* locality: per axis a sum of cosines of the coordinate difference at a few octave frequencies
  (a RoPE-like, bounded kernel peaked at zero offset), with per-head axis strengths, so a head is
  *spatial* (same frame, nearby in H/W), *temporal* (same place, any frame), *local3d* or nearly flat;
* content: tokens belong to a few moving "objects" (nearest moving centre); same object -> bonus;
* sinks (global heads): a few contiguous tokens (text tokens, and the first rows of frame 0) that
  every query attends, the "vertical lines" of real DiT attention maps;
* a little noise.

Features are written into disjoint dims and rotated by a random orthogonal matrix per head, then q
is scaled by sqrt(D) so that SDPA's 1/sqrt(D) scale gives exactly these logits. Deterministic in the
seed; O(N * D) work, fast on CPU at small sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

HEAD_TYPES = ("spatial", "temporal", "local3d", "global")

# Per head type: locality strength per axis (t, h, w), content strength, sink strength.
_HEAD_PARAMS = {
    "spatial": ((9.0, 6.0, 6.0), 2.0, 0.0),
    "temporal": ((1.0, 8.0, 8.0), 2.0, 0.0),
    "local3d": ((5.0, 5.0, 5.0), 2.0, 0.0),
    "global": ((0.5, 0.5, 0.5), 3.0, 6.0),
}


@dataclass
class SyntheticAttention:
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple  # (T, H, W)
    text_len: int
    text_position: str
    head_types: list = field(default_factory=list)
    sink_tokens: torch.Tensor | None = None  # indices of sink tokens

    @property
    def seq_len(self) -> int:
        return self.q.shape[2]

    def to(self, device=None, dtype=None) -> "SyntheticAttention":
        conv = lambda t: t.to(device=device, dtype=dtype)
        return SyntheticAttention(conv(self.q), conv(self.k), conv(self.v), self.grid, self.text_len,
                                  self.text_position, list(self.head_types), self.sink_tokens)


def _head_types(heads: int, head_types) -> list:
    if head_types is None:
        return [HEAD_TYPES[h % len(HEAD_TYPES)] for h in range(heads)]
    head_types = list(head_types)
    if len(head_types) != heads or any(t not in HEAD_TYPES for t in head_types):
        raise ValueError(f"head_types must list {heads} entries from {HEAD_TYPES}, got {head_types}")
    return head_types


def make_synthetic_attention(grid=(4, 8, 8), heads: int = 4, head_dim: int = 32, *, batch: int = 1,
                             text_len: int = 0, text_position: str = "last", seed: int = 0,
                             head_types=None, num_objects: int = 6, noise: float = 0.5,
                             sharpness: float = 1.0, dtype=torch.float32, device="cpu") -> SyntheticAttention:
    """Build structured q/k/v ``(batch, heads, N, head_dim)`` with ``N = T*H*W + text_len``.

    ``sharpness`` scales all logits (higher = sparser attention)."""
    if len(grid) != 3 or any(int(g) <= 0 for g in grid):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
    if head_dim < 12:
        raise ValueError(f"head_dim must be >= 12 for the structured features, got {head_dim}")
    if text_position not in ("first", "last"):
        raise ValueError(f"text_position must be 'first' or 'last', got {text_position!r}")
    T, Hg, Wg = (int(g) for g in grid)
    types = _head_types(heads, head_types)
    gen = torch.Generator().manual_seed(seed)
    n_video = T * Hg * Wg
    N = n_video + text_len

    # ---- dims: locality (3 axes x 2 x F), content (C), sink (1), noise (rest)
    C = 8 if head_dim >= 48 else 4
    F = max(1, min(4, (head_dim - C - 3) // 6))
    n_noise = head_dim - 6 * F - C - 1
    f64 = torch.float64

    # video token coordinates in raster order
    t = torch.arange(T, dtype=f64).repeat_interleave(Hg * Wg)
    y = torch.arange(Hg, dtype=f64).repeat_interleave(Wg).repeat(T)
    x = torch.arange(Wg, dtype=f64).repeat(T * Hg)
    coords = torch.stack([t, y, x], 1)  # (n_video, 3)
    extents = torch.tensor([T, Hg, Wg], dtype=f64)

    # cos/sin features per axis: frequencies from period 2*extent down by octaves
    loc_feats = []
    for axis in range(3):
        periods = [2.0 * float(extents[axis]) / (2 ** f) for f in range(F)]
        for period in periods:
            ang = 2 * math.pi * coords[:, axis] / max(period, 2.0)
            loc_feats.append(torch.stack([ang.cos(), ang.sin()], 1))
    loc = torch.cat(loc_feats, 1)  # (n_video, 6F), grouped by axis: [axis0 f0..fF-1, axis1 ..., axis2 ...]

    # moving objects -> content cluster per token (one-hot over C dims, K <= C objects)
    K = max(1, min(num_objects, C))
    start = torch.rand(K, 2, generator=gen, dtype=f64) * torch.tensor([Hg, Wg], dtype=f64)
    vel = (torch.rand(K, 2, generator=gen, dtype=f64) - 0.5) * 2.0
    centres = start.unsqueeze(0) + vel.unsqueeze(0) * torch.arange(T, dtype=f64).view(T, 1, 1)  # (T, K, 2)
    tok_centres = centres[t.long()]  # (n_video, K, 2)
    d2 = ((coords[:, None, 1:] - tok_centres) ** 2).sum(-1)
    cluster = d2.argmin(1)
    content = torch.nn.functional.one_hot(cluster, C).to(f64)

    # sinks: text tokens and the first two rows of frame 0
    sink_video = torch.arange(min(2 * Wg, Hg * Wg))
    sink_mask = torch.zeros(N, dtype=torch.bool)
    video_offset = text_len if text_position == "first" else 0
    text_offset = 0 if text_position == "first" else n_video
    sink_mask[video_offset + sink_video] = True
    sink_mask[text_offset:text_offset + text_len] = True

    q = torch.empty(batch, heads, N, head_dim, dtype=f64)
    k = torch.empty_like(q)
    for h, kind in enumerate(types):
        (s_t, s_h, s_w), s_content, s_sink = _HEAD_PARAMS[kind]
        axis_scale = torch.tensor([s_t, s_h, s_w], dtype=f64).repeat_interleave(2 * F) / F
        qf = torch.zeros(N, head_dim, dtype=f64)
        kf = torch.zeros(N, head_dim, dtype=f64)
        vid = slice(video_offset, video_offset + n_video)
        qf[vid, :6 * F] = loc * axis_scale.sqrt()
        kf[vid, :6 * F] = loc * axis_scale.sqrt()
        qf[vid, 6 * F:6 * F + C] = content * math.sqrt(s_content)
        kf[vid, 6 * F:6 * F + C] = content * math.sqrt(s_content)
        if text_len:
            txt = slice(text_offset, text_offset + text_len)
            tc = torch.nn.functional.one_hot(torch.randint(0, C, (text_len,), generator=gen), C).to(f64)
            qf[txt, 6 * F:6 * F + C] = tc * math.sqrt(s_content)
            kf[txt, 6 * F:6 * F + C] = tc * math.sqrt(s_content)
        sink_dim = 6 * F + C
        qf[:, sink_dim] = 1.0
        kf[:, sink_dim] = s_sink * sink_mask.to(f64)
        rot = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=f64))[0]
        for b in range(batch):
            nq, nk = qf.clone(), kf.clone()
            if n_noise > 0:
                sigma = math.sqrt(noise / math.sqrt(n_noise))
                nq[:, head_dim - n_noise:] = torch.randn(N, n_noise, generator=gen, dtype=f64) * sigma
                nk[:, head_dim - n_noise:] = torch.randn(N, n_noise, generator=gen, dtype=f64) * sigma
            q[b, h] = nq @ rot
            k[b, h] = nk @ rot
    q = q * math.sqrt(head_dim) * sharpness
    v = torch.randn(batch, heads, N, head_dim, generator=gen, dtype=f64)
    to = lambda a: a.to(device=device, dtype=dtype)
    return SyntheticAttention(to(q), to(k), to(v), (T, Hg, Wg), text_len, text_position, types,
                              sink_mask.nonzero().flatten())


def head_locality_stats(sa: SyntheticAttention, radius: int = 2, max_queries: int = 256, seed: int = 0) -> dict:
    """Per head: mean softmax mass within a 3D window of ``radius`` (same frame +-0 for spatial
    share), on the same (h, w) in any frame (temporal share), and on sink tokens (sink share).

    Measured on a random subset of video queries (exact softmax rows), used to check that the
    synthetic heads have the structure they claim."""
    T, Hg, Wg = sa.grid
    n_video = T * Hg * Wg
    off = sa.text_len if sa.text_position == "first" else 0
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n_video, generator=gen)[:max_queries] + off
    q = sa.q[0, :, rows].double()
    k = sa.k[0].double()
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)  # (H, R, N)
    vid = torch.arange(n_video)
    tt, yy, xx = vid // (Hg * Wg), (vid // Wg) % Hg, vid % Wg
    qt, qy, qx = tt[rows - off], yy[rows - off], xx[rows - off]
    same_frame_near = ((tt[None] == qt[:, None]) & ((yy[None] - qy[:, None]).abs() <= radius)
                       & ((xx[None] - qx[:, None]).abs() <= radius))
    same_place = ((yy[None] - qy[:, None]).abs() <= radius) & ((xx[None] - qx[:, None]).abs() <= radius)
    other_frames_same_place = same_place & (tt[None] != qt[:, None])
    pv = p[..., off:off + n_video]
    sinks = torch.zeros(sa.seq_len, dtype=torch.bool)
    sinks[sa.sink_tokens] = True
    return {
        "spatial_local": (pv * same_frame_near).sum(-1).mean(-1).tolist(),
        "temporal": (pv * other_frames_same_place).sum(-1).mean(-1).tolist(),
        "sink": (p * sinks).sum(-1).mean(-1).tolist(),
        "head_types": list(sa.head_types),
    }


__all__ = ["make_synthetic_attention", "SyntheticAttention", "head_locality_stats", "HEAD_TYPES"]
