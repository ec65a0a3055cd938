"""A zoo of tiny randomly initialised diffusers video transformers, for tests.

Each `Client` builds one model class with a small config, builds the inputs of its forward, and
states the facts a test can check: the latent token grid (T, H, W) after patchify, the text tokens
that join the video tokens in self-attention and where they sit, and how many SDPA calls per
forward are self-attention over the video tokens and how many are cross-attention. The facts were
read from the diffusers source and are checked against eager runs by tests/test_clients_zoo.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

TEXT = 8        # text tokens given to every model
TEXT_DIM = 16   # their width


@dataclass
class Client:
    name: str
    cls_name: str                   # the diffusers class
    config: dict                    # tiny random config
    make_inputs: Callable           # (generator, timestep) -> forward kwargs
    grid: tuple                     # latent token grid (T, H, W) after patchify
    text_tokens: int                # text tokens inside the self-attention sequence
    text_position: str | None       # "first" | "last" | None (no text in self-attention)
    sites: tuple                    # kind of each SDPA call of one forward, in order: "video" (self-attention
                                    # over the video tokens, joint with the text ones if any), "cross" (keys
                                    # of another length: text conditioning), "text" (self-attention over text)
    masked: bool = False            # the video self-attention gets an attn_mask (text padding)
    grid_rule: str = ""             # how the grid is inferred (modcompile/layout.py; for the docs)
    slow: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2] + self.text_tokens

    def build(self) -> torch.nn.Module:
        import diffusers
        torch.manual_seed(0)
        return getattr(diffusers, self.cls_name)(**self.config).eval()

    def inputs(self, seed: int = 1, timestep: float = 500.0) -> dict:
        return self.make_inputs(torch.Generator().manual_seed(seed), timestep)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _wan_inputs(g, t, channels=4, frames=4, size=16):
    return {"hidden_states": _randn(g, 1, channels, frames, size, size), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _cogvideox_inputs(g, t):
    # (B, F, C, H, W): frames before channels
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "return_dict": False}


_COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
                  text_embed_dim=TEXT_DIM, num_layers=2, sample_width=16, sample_height=16, sample_frames=13,
                  patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT,
                  use_rotary_positional_embeddings=True)


def _ltx_inputs(g, t, frames=4, height=16, width=16):
    return {"hidden_states": _randn(g, 1, frames * height * width, 8), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "encoder_attention_mask": torch.ones(1, TEXT),
            "num_frames": frames, "height": height, "width": width, "return_dict": False}


_LTX = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
            num_layers=2, caption_channels=TEXT_DIM)


def _hunyuan_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "encoder_attention_mask": torch.ones(1, TEXT),
            "pooled_projections": _randn(g, 1, 16), "guidance": torch.tensor([3.0]), "return_dict": False}


_HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
                pooled_projection_dim=16, rope_axes_dim=(8, 12, 12))


def _mochi_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "encoder_attention_mask": torch.ones(1, TEXT), "return_dict": False}


_MOCHI = dict(patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=16,
              in_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=16, max_sequence_length=TEXT)


def _cosmos_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "timestep": torch.tensor([t / 1000.0]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "fps": 24, "return_dict": False}


_COSMOS = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
               text_embed_dim=TEXT_DIM, adaln_lora_dim=16, max_size=(8, 32, 32), patch_size=(1, 2, 2),
               rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")


def _allegro_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "return_dict": False}


_ALLEGRO = dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=32, in_channels=4,
                out_channels=4, num_layers=2, cross_attention_dim=64, sample_height=16, sample_width=16,
                sample_frames=4, caption_channels=TEXT_DIM)


def _skyreels_inputs(g, t):
    return _wan_inputs(g, t)


CLIENTS = [
    Client("wan", "WanTransformer3DModel", _WAN, _wan_inputs, grid=(4, 8, 8), text_tokens=0, text_position=None,
           sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("skyreels_v2", "SkyReelsV2Transformer3DModel", _WAN, _skyreels_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("cogvideox", "CogVideoXTransformer3DModel", _COGVIDEOX, _cogvideox_inputs, grid=(4, 8, 8),
           text_tokens=TEXT, text_position="first", sites=("video",) * 2,
           grid_rule="latents (B, F, C, H, W) / patch sizes (per-frame patch embedding)"),
    Client("ltx_video", "LTXVideoTransformer3DModel", _LTX, _ltx_inputs, grid=(4, 16, 16), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, grid_rule="num_frames, height, width arguments"),
    Client("hunyuan_video", "HunyuanVideoTransformer3DModel", _HUNYUAN, _hunyuan_inputs, grid=(4, 8, 8),
           text_tokens=TEXT, text_position="last", sites=("text", "video", "video"), masked=True,
           grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("mochi", "MochiTransformer3DModel", _MOCHI, _mochi_inputs, grid=(4, 8, 8), text_tokens=TEXT,
           text_position="last", sites=("cross", "video", "video"),
           grid_rule="latents (B, C, F, H, W) / patch sizes (per-frame patch embedding)"),
    Client("cosmos", "CosmosTransformer3DModel", _COSMOS, _cosmos_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("allegro", "AllegroTransformer3DModel", _ALLEGRO, _allegro_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2,
           grid_rule="latents (B, C, F, H, W) / patch sizes (per-frame patch embedding)"),
]

BY_NAME = {c.name: c for c in CLIENTS}


def small_inputs(client: Client, seed: int = 1, t: float = 500.0) -> dict:
    """The zoo's inputs for a step at timestep ``t`` (Cosmos takes sigma-like t / 1000); LTX at a
    quarter of its tokens (2x8x16: a non-square grid, and fast)."""
    t = t / 1000.0 if client.name == "cosmos" else t
    if client.name == "ltx_video":
        return _ltx_inputs(torch.Generator().manual_seed(seed), t, frames=2, height=8, width=16)
    return client.inputs(seed=seed, timestep=t)


small_inputs.__test__ = False


def compile_model(model, style, backend, options):
    """Whole-model torch.compile, or regional: diffusers' compile_repeated_blocks where the class
    names its blocks, else each block of its block lists compiled alike (what that method does)."""
    if style == "whole":
        return torch.compile(model, backend=backend, options=options)
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend=backend, options=options)
        return model
    blocks = [m for name, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and "blocks" in name]
    assert blocks, f"{type(model).__name__}: no block list"
    for block in (b for blocks_ in blocks for b in blocks_):
        block.compile(backend=backend, options=options)
    return model
