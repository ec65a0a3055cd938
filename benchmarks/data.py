"""Procedural videos: textured shapes moving over a smooth background, as latent-like tensors.

Each video is fixed by ``(seed, index)`` alone (not by the batch it is drawn in), so train and
validation sets are reproducible. Rendering is vectorized over videos, objects, frames and pixels.
Values lie roughly in [-1, 1], channels play the role of latent channels.

``texture > 0`` adds a fine-grained background texture that a per-video camera pan moves and that
slowly changes from frame to frame (``DATA_STYLES["textured"]``, the attention testbed's data).
"""
from __future__ import annotations

import math

import torch


def _reflect(p: torch.Tensor, size: float) -> torch.Tensor:
    """Bounce a coordinate inside [0, size] (triangle wave)."""
    period = 2 * size
    p = torch.remainder(p, period)
    return size - (p - size).abs()


def _video_params(seed: int, index: int, channels: int, num_objects: int, height: int, width: int,
                  frames: int = 1, texture: dict | None = None):
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))
    k = num_objects
    size = float(min(height, width))
    params = {
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
    if texture is not None:  # drawn after the rest: the other parameters stay those of the plain style
        params["texture"] = _panned_texture(g, channels, frames, height, width, **texture)
    return params


def _blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W), no padding (valid: H and W shrink by 2 * radius), unit
    output variance for white-noise input."""
    if sigma <= 0:
        return field
    r = max(1, math.ceil(2.5 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.square().sum().sqrt()).tolist()  # blurred white noise keeps variance 1 per axis
    n = len(k)
    # shifted slices ("valid" correlation): several times faster than a one-channel conv2d on the CPU
    x = sum(w * field[..., i:field.shape[-1] - n + 1 + i] for i, w in enumerate(k))
    return sum(w * x[..., i:x.shape[-2] - n + 1 + i, :] for i, w in enumerate(k))


def _panned_texture(g: torch.Generator, channels: int, frames: int, height: int, width: int, *, pan: float,
                    memory: float, sigma: float) -> torch.Tensor:
    """(C, T, H, W) unit-variance texture: Gaussian-blurred noise (correlation length ~``sigma`` pixels)
    seen through a window that pans by a per-video integer shift of up to ``pan`` pixels per frame on
    each axis, and that changes over time as an AR(1) process (frame-to-frame correlation ``memory``).

    Why: a token can then denoise its detail only from nearby tokens of nearby frames along the pan,
    the locality that makes pretrained video DiTs' attention sparse."""
    velocity = (torch.rand(2, generator=g) * 2 - 1) * pan
    shift = torch.round(velocity[:, None] * torch.arange(frames, dtype=torch.float32))  # (2, T)
    shift = (shift - shift.min(1, keepdim=True).values).long()
    margin = math.ceil(pan * (frames - 1)) + 1  # the largest shift fits for every velocity
    r = max(1, math.ceil(2.5 * sigma)) if sigma > 0 else 0
    noise = torch.randn(frames, channels, height + margin + 2 * r, width + margin + 2 * r, generator=g)
    field = _blur(noise.flatten(0, 1), sigma).view(frames, channels, height + margin, width + margin)
    keep = math.sqrt(1 - memory ** 2)
    for t in range(1, frames):  # AR(1) over frames: near frames share more of the detail than far ones
        field[t] = memory * field[t - 1] + keep * field[t]
    rows = (shift[0][:, None] + torch.arange(height))[:, :, None]  # (T, H, 1)
    cols = (shift[1][:, None] + torch.arange(width))[:, None, :]  # (T, 1, W)
    return field[torch.arange(frames)[:, None, None], :, rows, cols].permute(3, 0, 1, 2)  # (C, T, H, W)


def generate_videos(num: int, *, seed: int = 0, start: int = 0, channels: int = 4, frames: int = 8,
                    height: int = 32, width: int = 32, num_objects: int = 3, texture: float = 0.0,
                    pan: float = 1.5, texture_memory: float = 0.8, texture_sigma: float = 1.0, device="cpu",
                    dtype=torch.float32) -> torch.Tensor:
    """Videos ``start .. start+num-1`` of the stream ``seed``: ``(num, C, T, H, W)``.

    ``texture``: standard deviation of the panned background texture (0: none, the plain style);
    ``pan``, ``texture_memory``, ``texture_sigma``: its camera speed bound (pixels per frame), frame-to-
    frame correlation and blur (pixels), see :func:`_panned_texture`."""
    if min(num, channels, frames, height, width, num_objects) <= 0:
        raise ValueError("generate_videos: sizes must be positive")
    if texture and not (pan >= 0 and 0 <= texture_memory < 1 and texture_sigma >= 0):
        raise ValueError("generate_videos: texture needs pan >= 0, 0 <= texture_memory < 1, texture_sigma >= 0")
    tex = dict(pan=pan, memory=texture_memory, sigma=texture_sigma) if texture else None
    params = [_video_params(seed, start + i, channels, num_objects, height, width, frames, tex) for i in range(num)]
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
    if texture:
        video = video + texture * P["texture"]

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


__all__ = ["generate_videos", "VideoStream", "DATA_STYLES"]


# Data styles a DiT config names (``DiTConfig.data``): extra :func:`generate_videos` keywords.
DATA_STYLES = {
    "shapes": {},
    # the attention testbed: fine panned texture everywhere (local detail to copy), more objects
    "textured": dict(texture=0.4, pan=1.5, texture_memory=0.8, texture_sigma=1.0, num_objects=5),
}


def video_kwargs(cfg) -> dict:
    """:func:`generate_videos` keywords for a video DiT config (its latent grid, channels and data style)."""
    T, H, W = cfg.latent
    style = getattr(cfg, "data", "shapes")
    if style not in DATA_STYLES:
        raise ValueError(f"unknown data style {style!r}; choose from {sorted(DATA_STYLES)}")
    return dict(channels=cfg.in_channels, frames=T, height=H, width=W, **DATA_STYLES[style])


def text_tokens(cfg, batch: int, seed: int, device) -> torch.Tensor | None:
    """Text tokens for a DiT config with cross-attention (None without)."""
    # No captions for procedural videos: fixed random tokens just exercise the cross-attention path.
    if not cfg.text_len:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device)
