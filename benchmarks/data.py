"""Procedural videos: textured shapes moving over a smooth background, as latent-like tensors.

Each video is fixed by ``(seed, index)`` alone (not by the batch it is drawn in), so train and
validation sets are reproducible. Rendering is vectorized over videos, objects, frames and pixels.
Values lie roughly in [-1, 1], channels play the role of latent channels.
"""
from __future__ import annotations

import math

import torch


def _reflect(p: torch.Tensor, size: float) -> torch.Tensor:
    """Bounce a coordinate inside [0, size] (triangle wave)."""
    period = 2 * size
    p = torch.remainder(p, period)
    return size - (p - size).abs()


def _video_params(seed: int, index: int, channels: int, num_objects: int, height: int, width: int):
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))
    k = num_objects
    size = float(min(height, width))
    return {
        "pos": torch.rand(k, 2, generator=g) * torch.tensor([height, width], dtype=torch.float32),
        "vel": (torch.rand(k, 2, generator=g) - 0.5) * (0.12 * size),
        "radius": size * (0.08 + 0.12 * torch.rand(k, generator=g)),
        "square": torch.rand(k, generator=g) < 0.5,
        "color": torch.rand(k, channels, generator=g) * 2 - 1,
        "tex_angle": torch.rand(k, generator=g) * math.pi,
        "tex_freq": 0.4 + 1.2 * torch.rand(k, generator=g),
        "tex_amp": 0.15 + 0.35 * torch.rand(k, generator=g),
        "bg_color": (torch.rand(2, channels, generator=g) * 2 - 1) * 0.5,
        "bg_angle": torch.rand(1, generator=g) * 2 * math.pi,
    }


def generate_videos(num: int, *, seed: int = 0, start: int = 0, channels: int = 4, frames: int = 8,
                    height: int = 32, width: int = 32, num_objects: int = 3, device="cpu",
                    dtype=torch.float32) -> torch.Tensor:
    """Videos ``start .. start+num-1`` of the stream ``seed``: ``(num, C, T, H, W)``."""
    if min(num, channels, frames, height, width, num_objects) <= 0:
        raise ValueError("generate_videos: sizes must be positive")
    params = [_video_params(seed, start + i, channels, num_objects, height, width) for i in range(num)]
    P = {key: torch.stack([p[key] for p in params]).to(device) for key in params[0]}
    t = torch.arange(frames, dtype=torch.float32, device=device)
    yy = torch.arange(height, dtype=torch.float32, device=device).view(1, 1, 1, height, 1) + 0.5
    xx = torch.arange(width, dtype=torch.float32, device=device).view(1, 1, 1, 1, width) + 0.5

    # background: linear gradient between two colours, (num, C, 1, H, W)
    ang = P["bg_angle"].view(num, 1, 1)
    ramp = ((yy[:, 0] / height - 0.5) * torch.sin(ang.unsqueeze(-1)) +
            (xx[:, 0] / width - 0.5) * torch.cos(ang.unsqueeze(-1))) + 0.5  # (num,1,H,W) via broadcast
    ramp = ramp.clamp(0, 1).view(num, 1, 1, height, width)
    c0, c1 = P["bg_color"][:, 0].view(num, -1, 1, 1, 1), P["bg_color"][:, 1].view(num, -1, 1, 1, 1)
    video = (c0 * (1 - ramp) + c1 * ramp).expand(num, channels, frames, height, width).clone()

    # objects: centres over time (num, K, T), reflecting at the borders
    cy = _reflect(P["pos"][..., 0:1] + P["vel"][..., 0:1] * t, float(height))
    cx = _reflect(P["pos"][..., 1:2] + P["vel"][..., 1:2] * t, float(width))
    dy = yy - cy.unsqueeze(-1).unsqueeze(-1)  # (num, K, T, H, W)
    dx = xx - cx.unsqueeze(-1).unsqueeze(-1)
    r = P["radius"].view(num, -1, 1, 1, 1)
    dist = torch.where(P["square"].view(num, -1, 1, 1, 1), torch.maximum(dy.abs(), dx.abs()),
                       torch.sqrt(dy * dy + dx * dx))
    alpha = torch.sigmoid((r - dist) * 2.0)  # soft edge
    # stripe texture in object coordinates (moves with the object)
    ta = P["tex_angle"].view(num, -1, 1, 1, 1)
    stripes = torch.sin((dy * torch.cos(ta) + dx * torch.sin(ta)) * P["tex_freq"].view(num, -1, 1, 1, 1))
    shade = 1 + P["tex_amp"].view(num, -1, 1, 1, 1) * stripes  # (num, K, T, H, W)
    for obj in range(num_objects):  # painter's order: later objects cover earlier ones
        a = alpha[:, obj].unsqueeze(1)  # (num, 1, T, H, W)
        colour = P["color"][:, obj].view(num, channels, 1, 1, 1) * shade[:, obj].unsqueeze(1)
        video = video * (1 - a) + colour * a
    return video.to(dtype)


class VideoStream:
    """Endless deterministic batches for training: batch i holds videos [i*B, (i+1)*B) of the seed."""

    def __init__(self, batch_size: int, seed: int = 0, **video_kwargs):
        self.batch_size, self.seed, self.kwargs = batch_size, seed, video_kwargs
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        out = generate_videos(self.batch_size, seed=self.seed, start=self.index * self.batch_size, **self.kwargs)
        self.index += 1
        return out


__all__ = ["generate_videos", "VideoStream"]


def video_kwargs(cfg) -> dict:
    """:func:`generate_videos` keywords for a video DiT config (its latent grid and channels)."""
    T, H, W = cfg.latent
    return dict(channels=cfg.in_channels, frames=T, height=H, width=W)


def text_tokens(cfg, batch: int, seed: int, device) -> torch.Tensor | None:
    """Text tokens for a DiT config with cross-attention (None without)."""
    # No captions for procedural videos: fixed random tokens just exercise the cross-attention path.
    if not cfg.text_len:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device)
