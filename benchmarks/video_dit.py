"""A small video diffusion transformer of our own, and a rectified-flow (flow matching) sampler.

The self-attention is joint spatio-temporal attention over all latent tokens through
``F.scaled_dot_product_attention`` (so the ``modsparse`` backend can rewrite it), with 3D RoPE on
q and k. The timestep is a tensor argument named ``timestep`` (the backend finds it by name).
Optional conditioning tokens go through cross-attention (SDPA with a different kv length, so it
stays dense).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    in_channels: int = 4
    latent: tuple = (8, 32, 32)  # (T, H, W) of the latent video
    patch: tuple = (1, 2, 2)
    dim: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    text_len: int = 0  # conditioning tokens (0 = unconditional)
    text_dim: int = 64
    freq_dim: int = 256
    # Fields added later keep their earlier behaviour as defaults, so older checkpoints load unchanged.
    rope_theta: float = 10000.0  # RoPE base of every axis
    data: str = "shapes"  # training data style (benchmarks.data.DATA_STYLES)
    # initial gain of the q and k RMSNorms: attention logits start qk_gain**2 times larger. A short training run
    # moves these gains by little (Adam steps ~lr), so at gain 1 the logits stay too flat to concentrate over
    # thousands of keys the way a long-trained model's do.
    qk_gain: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> tuple:
        return tuple(s // p for s, p in zip(self.latent, self.patch))

    @property
    def seq_len(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS = {
    # CPU tests: a few hundred tokens at most
    "tiny": DiTConfig(latent=(2, 8, 8), dim=64, depth=2, heads=2, text_len=0, freq_dim=32),
    "tiny-text": DiTConfig(latent=(2, 8, 8), dim=64, depth=2, heads=2, text_len=4, text_dim=16, freq_dim=32),
    # CPU tests of the block-level harness: 4 x 8 x 8 = 256 tokens (16 blocks of 16)
    "tiny-video": DiTConfig(latent=(4, 16, 16), dim=64, depth=2, heads=2, text_len=0, freq_dim=32),
    # GPU fidelity runs: 8 x 16 x 16 = 2048 tokens
    "small": DiTConfig(latent=(8, 32, 32), dim=384, depth=6, heads=6),
    # GPU training comparison in the kernels' efficient regime: 16 x 32 x 32 = 16384 tokens, head_dim 128
    # (128-token blocks), two layers of each VMoBA partition kind
    "long": DiTConfig(latent=(16, 64, 64), dim=768, depth=6, heads=6),
    # The attention testbed (issue 19): the long DiT's shape on panned fine-textured videos, whose detail can
    # only be denoised from nearby tokens of nearby frames, and RoPE base 256: more of the frequency pairs
    # turn within the 16 x 32 x 32 grid (at 10000 most are flat there), a stronger relative-position signal.
    # q/k norm gains start at 3.5: at 1 a short training run cannot concentrate attention, at 2.5 it gets
    # halfway (BENCHMARKS.md, 8).
    "video": DiTConfig(latent=(16, 64, 64), dim=768, depth=6, heads=6, rope_theta=256.0, data="textured",
                       qk_gain=3.5),
    # a CPU-sized version to study what concentrates attention (minutes per run on 2 cores): 8 x 16 x 16 = 2048 tokens
    "testbed-cpu": DiTConfig(latent=(8, 32, 32), dim=128, depth=3, heads=2, freq_dim=64, rope_theta=256.0,
                             data="textured"),
    # its CPU test size: 4 x 8 x 8 = 256 tokens
    "tiny-testbed": DiTConfig(latent=(4, 16, 16), dim=64, depth=2, heads=2, freq_dim=32, rope_theta=256.0,
                              data="textured"),
}


# From this many tokens on the kernels run in their efficient regime (128-token blocks pay off).
LONG_SEQ_LEN = 8192


def kernel_block_size(seq_len: int, cuda: bool) -> int:
    """The benchmarks' default kernel block for a DiT of ``seq_len`` tokens: 128 from LONG_SEQ_LEN on,
    else 64; 16 on the CPU (interpreter-sized runs)."""
    return (128 if seq_len >= LONG_SEQ_LEN else 64) if cuda else 16


def get_config(name_or_cfg) -> DiTConfig:
    """A config by name (``"video"``, or a variant such as ``"video:qk_gain=2,rope_theta=64"``), dict or itself."""
    if isinstance(name_or_cfg, DiTConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, dict):
        d = dict(name_or_cfg)
        d["latent"], d["patch"] = tuple(d["latent"]), tuple(d["patch"])
        return DiTConfig(**d)
    name, _, overrides = str(name_or_cfg).partition(":")
    if name not in CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; choose from {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **_parse_overrides(overrides)) if overrides else CONFIGS[name]


def _parse_overrides(text: str) -> dict:
    """``"qk_gain=2,rope_theta=64"`` -> typed DiTConfig fields (``"video:qk_gain=2"`` names a variant)."""
    types = {f.name: type(getattr(DiTConfig(), f.name)) for f in fields(DiTConfig)}
    out = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in types or types[key] is tuple:
            raise ValueError(f"bad DiT config override {item!r}: use field=value with a scalar field of "
                             f"{sorted(k for k, t in types.items() if t is not tuple)}")
        out[key] = types[key](value.strip())
    return out


# ---------------------------------------------------------------- embeddings
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (any scale; we pass t * 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_3d_tables(grid, head_dim: int, device, theta: float = 10000.0):
    """cos/sin tables ``(N, head_dim)`` for 3D RoPE: head_dim split into (t, h, w) parts."""
    d_t = 2 * (head_dim // 8)  # a quarter to time
    d_hw = (head_dim - d_t) // 2 // 2 * 2
    d_t = head_dim - 2 * d_hw
    T, H, W = grid
    parts = []
    for size, d in ((T, d_t), (H, d_hw), (W, d_hw)):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        parts.append(torch.outer(torch.arange(size, device=device, dtype=torch.float32), freqs))  # (size, d/2)
    ft = parts[0][:, None, None, :].expand(T, H, W, -1)
    fh = parts[1][None, :, None, :].expand(T, H, W, -1)
    fw = parts[2][None, None, :, :].expand(T, H, W, -1)
    ang = torch.cat([ft, fh, fw], -1).reshape(T * H * W, head_dim // 2)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, N, D) with tables (N, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------- blocks
class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, layer_index: int):
        super().__init__()
        self.heads, self.layer_index = heads, layer_index
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.capture = None  # a list: (layer, q, k, v, out) tuples are appended when set
        self.attention_override = None  # callable (layer, q, k, v) -> out in place of SDPA when set

    def forward(self, x, cos, sin):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # q/k in v's dtype: what SDPA computes in under autocast anyway (it casts its inputs), made
        # explicit so that a rewritten site sees one dtype even where autocast keeps the norms in fp32.
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        if self.attention_override is not None:
            out = self.attention_override(self.layer_index, q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        if self.capture is not None:
            self.capture.append((self.layer_index, q, k, v, out))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, text):
        B, N, C = x.shape
        L = text.shape[1]
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(text).view(B, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, layer_index: int):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.heads, layer_index)
        self.cross = CrossAttention(dim, cfg.heads, cfg.text_dim) if cfg.text_len else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cfg.text_len else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)  # adaLN: shift/scale/gate for attention and MLP

    def forward(self, x, temb, cos, sin, text=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(F.silu(temb)).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, cos, sin)
        if self.cross is not None and text is not None:
            x = x + self.cross(self.norm_cross(x), text)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class VideoDiT(nn.Module):
    """forward(x: (B, C, T, H, W) latents, timestep: (B,) in [0, 1000], encoder_hidden_states=None)."""

    def __init__(self, cfg="small"):
        super().__init__()
        cfg = get_config(cfg)
        self.cfg = cfg
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.in_channels * math.prod(cfg.patch))
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-zero: every residual branch starts closed, the output starts at zero
        for blk in self.blocks:
            nn.init.zeros_(blk.modulation.weight)
            nn.init.constant_(blk.attn.q_norm.weight, self.cfg.qk_gain)
            nn.init.constant_(blk.attn.k_norm.weight, self.cfg.qk_gain)
        nn.init.zeros_(self.out_modulation.weight)
        nn.init.zeros_(self.out.weight)

    def set_capture(self, store):
        """Record (layer, q, k, v, out) of every self-attention call into ``store`` (None to stop)."""
        for blk in self.blocks:
            blk.attn.capture = store

    def set_attention_override(self, fn):
        """Run ``fn(layer, q, k, v) -> out`` instead of SDPA in every self-attention (None: SDPA)."""
        for blk in self.blocks:
            blk.attn.attention_override = fn

    def forward(self, x, timestep, encoder_hidden_states=None):
        cfg = self.cfg
        B, C, T, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"VideoDiT: expected {cfg.in_channels} channels, got {C}")
        pt, ph, pw = cfg.patch
        if T % pt or H % ph or W % pw:
            raise ValueError(f"VideoDiT: latent {(T, H, W)} not divisible by patch {cfg.patch}")
        grid = (T // pt, H // ph, W // pw)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), raster (t, h, w)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        temb = self.time_mlp(timestep_embedding(timestep, cfg.freq_dim).to(tokens.dtype))
        cos, sin = rope_3d_tables(grid, cfg.head_dim, x.device, cfg.rope_theta)
        text = encoder_hidden_states
        for blk in self.blocks:
            tokens = blk(tokens, temb, cos, sin, text)
        shift, scale = self.out_modulation(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.out(self.norm_out(tokens) * (1 + scale) + shift)  # (B, N, C*pt*ph*pw)
        out = tokens.view(B, *grid, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(B, C, T, H, W)


# ---------------------------------------------------------------- flow matching
def flow_matching_loss(model, x0: torch.Tensor, *, generator=None, text=None) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t eps, the model predicts the velocity eps - x0."""
    B = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) if generator is not None \
        else torch.randn_like(x0)
    # logit-normal t concentrates training where sampling needs it (middle of the path)
    t = torch.sigmoid(torch.randn(B, device=x0.device, generator=generator)) if generator is not None \
        else torch.sigmoid(torch.randn(B, device=x0.device))
    xt = (1 - t.view(B, 1, 1, 1, 1)) * x0 + t.view(B, 1, 1, 1, 1) * noise
    pred = model(xt, timestep=t * 1000, encoder_hidden_states=text)
    return F.mse_loss(pred.float(), (noise - x0).float())


def make_noise(shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def timestep_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Times from 1 (noise) to 0 (data), ``steps + 1`` points, optionally shifted (SD3-style)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample(model, noise: torch.Tensor, steps: int, *, text=None, shift: float = 1.0, step_context=None,
           on_step=None, progress=None) -> torch.Tensor:
    """Euler integration of the learned velocity from t=1 to t=0. Deterministic given ``noise``.

    ``step_context(i, steps)`` returns a context manager entered around each model call (e.g.
    ``modcompile.denoising_step``); ``on_step(i)`` runs after each step (e.g. to collect captures).
    """
    ts = timestep_schedule(steps, shift).tolist()
    x = noise
    B = x.shape[0]
    it = range(steps) if progress is None else progress(range(steps))
    for i in it:
        t, t_next = ts[i], ts[i + 1]
        timestep = torch.full((B,), t * 1000.0, device=x.device, dtype=torch.float32)
        if step_context is not None:
            with step_context(i, steps):
                v = model(x, timestep=timestep, encoder_hidden_states=text)
        else:
            v = model(x, timestep=timestep, encoder_hidden_states=text)
        x = x + (t_next - t) * v.to(x.dtype)
        if on_step is not None:
            on_step(i)
    return x


__all__ = ["DiTConfig", "CONFIGS", "LONG_SEQ_LEN", "kernel_block_size", "get_config", "VideoDiT", "flow_matching_loss", "sample", "make_noise",
           "timestep_schedule", "rope_3d_tables", "apply_rope", "timestep_embedding"]
