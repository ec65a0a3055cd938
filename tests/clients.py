"""A zoo of tiny randomly initialised diffusers video transformers, for tests.

Each `Client` builds one model class with a small config, builds the inputs of its forward, and
states the facts a test can check: the latent token grid (T, H, W) after patchify, the text tokens
that join the video tokens in self-attention and where they sit, and how many SDPA calls per
forward are self-attention over the video tokens and how many are cross-attention. The facts were
read from the diffusers source and are checked against eager runs by tests/test_clients_zoo.py.
"""
from __future__ import annotations

import math
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
    text_position: str | int | None  # "first" | "last" | None (no text in self-attention) | the count of
                                     # non-grid tokens before the grid (the others after it)
    sites: tuple                    # kind of each SDPA call of one forward, in order: "video" (self-attention
                                    # over the video tokens, joint with the text ones if any), "cross" (keys
                                    # of another length: text conditioning), "text" (self-attention over text)
    masked: bool = False            # the video self-attention gets an attn_mask (text padding)
    grid_rule: str = ""             # how the grid is inferred (modcompile/layout.py; for the docs)
    latents: str = "BCFHW"          # the order of the latents' dims ("BFCHW": frames first; "BFHWC";
                                    # "BNCFHW": N items side by side as frames)
    other_self: dict = field(default_factory=dict)  # sequence length -> kind of the other self-attention sites
                                    # ("audio"; "frame": one frame's tokens; "temporal": one pixel's frames)
    sparse: dict | None = None      # policy -> sites of one forward that run block-sparse (None: the "video" ones)
    sparse_grid: tuple | None = ()  # the grid those sites run with: () the stated grid, None none
    flex: int = 0                   # flex_attention calls of one forward (never rewritten: listed dense)
    slow: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2] + self.text_tokens

    def sparse_sites(self, policy: str) -> int:
        return self.sites.count("video") if self.sparse is None else self.sparse[policy]

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


def _wan_vace_inputs(g, t, frames=4, size=16):
    return {"hidden_states": _randn(g, 1, 4, frames, size, size), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "control_hidden_states": _randn(g, 1, 8, frames, size, size),
            "control_hidden_states_scale": torch.tensor([1.0, 0.5]), "return_dict": False}


_WAN_VACE = dict(_WAN, vace_layers=[0, 1], vace_in_channels=8)


def _chronoedit_inputs(g, t):
    # 2 latent frames (ChronoEdit's edit without temporal reasoning: its RoPE's temporal-skip path), a non-square grid
    return {"hidden_states": _randn(g, 1, 4, 2, 16, 32), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


_CHRONOEDIT = dict(_WAN, rope_temporal_skip_len=8)
# ChronoEdit as released is image-to-video: its attention processor splits the conditioning at 512 text tokens
# (hard-coded) and gives the image tokens their own cross-attention
I2V_TEXT = 512


def _chronoedit_i2v_inputs(g, t):
    inputs = _chronoedit_inputs(g, t)
    inputs.update(encoder_hidden_states=_randn(g, 1, I2V_TEXT, TEXT_DIM), encoder_hidden_states_image=_randn(g, 1, 4, 16))
    return inputs


_CHRONOEDIT_I2V = dict(_CHRONOEDIT, image_dim=16, added_kv_proj_dim=64)


def _anyflow_inputs(g, t, frames=4):
    # latents (B, F, C, H, W), 8 channels against 4 frames (a (B, C, F, H, W) reading gives another grid);
    # per-frame source and target timesteps
    return {"hidden_states": _randn(g, 1, frames, 8, 16, 16), "timestep": torch.full((1, frames), t),
            "r_timestep": torch.full((1, frames), max(t - 100.0, 0.0)),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


_ANYFLOW = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=8, out_channels=8,
                text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)


def _helios_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


def _helios_history_inputs(g, t):
    """As HeliosPipeline passes them for a 4-frame chunk (history sizes 16, 2, 1 with the prefix
    frame): history tokens long 16 frames / (4, 8, 8) = 4 x 2 x 2, mid 2 / (2, 4, 4) = 1 x 4 x 4,
    short 2 x 8 x 8: 16 + 16 + 128 = 160, before the video tokens."""
    inputs = _helios_inputs(g, t)
    prefix, long, mid, short, hidden = torch.arange(24).split([1, 16, 2, 1, 4])
    inputs.update(indices_hidden_states=hidden[None], indices_latents_history_short=torch.cat([prefix, short])[None],
                  indices_latents_history_mid=mid[None], indices_latents_history_long=long[None],
                  latents_history_short=_randn(g, 1, 4, 2, 16, 16), latents_history_mid=_randn(g, 1, 4, 2, 16, 16),
                  latents_history_long=_randn(g, 1, 4, 16, 16, 16))
    return inputs


_HELIOS = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
               text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_dim=(12, 10, 10))
HELIOS_HISTORY = 16 + 16 + 128


def _wan_animate_inputs(g, t):
    # 2 x 4 + 4 latent channels, T + 1 frames; T pose frames; 9 face frames of 8 x 8 pixels, which the face encoder
    # turns into 4 frame groups (they must divide the 256 video tokens)
    return {"hidden_states": _randn(g, 1, 12, 4, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "pose_hidden_states": _randn(g, 1, 4, 3, 16, 16),
            "face_pixel_values": _randn(g, 1, 3, 9, 8, 8), "return_dict": False}


_WAN_ANIMATE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=12,
                    latent_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=None, rope_max_seq_len=32,
                    motion_encoder_channel_sizes={"8": 16, "4": 16}, motion_encoder_size=8, motion_style_dim=16,
                    motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
                    inject_face_latents_blocks=2, motion_encoder_batch_size=8)


def _ltx2_inputs(g, t, frames=4, height=8, width=8, audio=16):
    # packed video tokens with the latent grid as arguments (patch size 1), packed audio tokens; a text stream each
    return {"hidden_states": _randn(g, 1, frames * height * width, 8), "audio_hidden_states": _randn(g, 1, audio, 8),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "audio_encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "encoder_attention_mask": torch.ones(1, TEXT),
            "audio_encoder_attention_mask": torch.ones(1, TEXT),
            "num_frames": frames, "height": height, "width": width, "audio_num_frames": audio, "return_dict": False}


# the text is projected to each stream's attention width before its cross-attention
_LTX2 = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
             audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=32,
             audio_cross_attention_dim=64, num_layers=2, caption_channels=TEXT_DIM)


def _kandinsky5_inputs(g, t, frames=4, size=16, channels=4):
    # latents channels last (B, F, H, W, C); RoPE positions: an arange per axis of the token grid
    return {"hidden_states": _randn(g, 1, frames, size, size, channels), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "pooled_projections": _randn(g, 1, 16),
            "visual_rope_pos": [torch.arange(frames), torch.arange(size // 2), torch.arange(size // 2)],
            "text_rope_pos": torch.arange(TEXT), "return_dict": False}


# head_dim = sum(axes_dims) = 32, 2 heads; attention_type "regular" (SDPA; "nabla" is its own flex-attention mask).
# Its modulations start at zero, so in a random model the attention does not reach the output: the site check reads
# each site's own output
_KANDINSKY5 = dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=32,
                   patch_size=(1, 2, 2), model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2,
                   axes_dims=(8, 12, 12))


def _latte_inputs(g, t):
    # 16 x 16 tokens per frame: the per-frame sites need more than two 32-token blocks per row for the site check
    return {"hidden_states": _randn(g, 1, 4, 4, 32, 32), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


_LATTE = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
              cross_attention_dim=64, sample_size=32, patch_size=2, caption_channels=TEXT_DIM, video_length=4,
              norm_type="ada_norm_single")


def _sana_video_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "encoder_attention_mask": torch.ones(1, TEXT), "return_dict": False}


_SANA_VIDEO = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                   num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                   caption_channels=TEXT_DIM, sample_size=16, patch_size=(1, 2, 2), rope_max_seq_len=32)


def _easyanimate_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


# mmdit_layers=1: block 0 an MMDiT block (its own text projections), block 1 a plain one; both put the text first
_EASYANIMATE = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, patch_size=2,
                    sample_width=16, sample_height=16, num_layers=2, mmdit_layers=1, time_embed_dim=16,
                    text_embed_dim=TEXT_DIM)


def _consisid_inputs(g, t):
    # (B, F, C, H, W) as CogVideoX; no face inputs (read only with is_train_face, whose attention is not SDPA)
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM),
            "timestep": torch.tensor([t]), "return_dict": False}


_CONSISID = dict(_COGVIDEOX)     # ConsisID is CogVideoX with a face path: the same config fields


def _motif_inputs(g, t):
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "encoder_attention_mask": torch.ones(1, TEXT),
            "return_dict": False}


_MOTIF = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
              num_single_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, rope_axes_dim=(8, 12, 12))
FRAMEPACK_IMAGE = 4     # image tokens (projected SigLIP embeddings), before the text


def _framepack_inputs(g, t):
    """As the pipeline calls it (its forward needs the history inputs): 4x history (4, 16, 16) / (4, 8, 8)
    = 4 tokens, 2x history (2, 16, 16) / (2, 4, 4) = 16, clean latents (2, 16, 16) / (1, 2, 2) = 128, all
    before the latents; 1-D frame indices."""
    return {"hidden_states": _randn(g, 1, 4, 4, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "encoder_attention_mask": torch.ones(1, TEXT),
            "pooled_projections": _randn(g, 1, 16), "image_embeds": _randn(g, 1, FRAMEPACK_IMAGE, 16),
            "indices_latents": torch.arange(3, 7), "guidance": torch.tensor([3.0]),
            "latents_clean": _randn(g, 1, 4, 2, 16, 16), "indices_latents_clean": torch.tensor([0, 7]),
            "latents_history_2x": _randn(g, 1, 4, 2, 16, 16), "indices_latents_history_2x": torch.tensor([8, 9]),
            "latents_history_4x": _randn(g, 1, 4, 4, 16, 16),
            "indices_latents_history_4x": torch.tensor([10, 11, 12, 13]), "return_dict": False}


_FRAMEPACK = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
                  pooled_projection_dim=16, rope_axes_dim=(8, 12, 12), has_image_proj=True, image_proj_dim=16,
                  has_clean_x_embedder=True)
FRAMEPACK_HISTORY = 4 + 16 + 128


def _kandinsky6_inputs(g, t, frames=4, size=16, channels=9, audio=0):
    # latents channels last (B, F, H, W, C), C = 2 x in_visual_dim + 1 (visual_cond: [latent | cond latent | mask]);
    # no visual_rope_pos: the forward takes an arange per axis of the token grid
    inputs = {"hidden_states": _randn(g, 1, frames, size, size, channels),
              "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "pooled_projections": _randn(g, 1, 16),
              "timestep": torch.tensor([t]), "return_dict": False}
    if audio:
        inputs["audio_hidden_states"] = _randn(g, 1, audio, 8)
    return inputs


K6_AUDIO = 16       # Kandinsky 6 audio latents (B, L, in_audio_dim)


def _kandinsky6_audio_inputs(g, t):
    return _kandinsky6_inputs(g, t, audio=K6_AUDIO)


# head_dim = sum(axes_dims) = 32, 2 heads, the audio stream alike; attention through dispatch_attention_fn (SDPA)
_KANDINSKY6 = dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=32,
                   patch_size=(1, 2, 2), model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2,
                   axes_dims=(8, 12, 12), in_audio_dim=8, out_audio_dim=8)
MM_AUDIO = 16       # MiniMax-H3 audio rows (8 latents x 2 channels, channel-major)


def _minimax_h3_inputs(g, t, frames=4, height=8, width=8, audio_latents=8, audio_channels=2):
    """As the modular pipeline packs t2va (build_packed_sequence, no keyframes): [text | audio | video], video rows
    frame-major over the patchified grid; one timestep in [0, 1] for every row; tags 0 video, 1 text, 2 audio."""
    video, audio = frames * height * width, audio_latents * audio_channels
    n = TEXT + audio + video
    pos = torch.zeros(n, 3)
    pos[:TEXT, 0] = torch.arange(TEXT)
    pos[TEXT:TEXT + audio, 0] = (TEXT + torch.arange(audio_latents)).repeat(audio_channels)
    pos[TEXT:TEXT + audio_latents, 2], pos[TEXT + audio_latents:TEXT + audio, 2] = 0, width - 1
    tt, hh, ww = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    pos[TEXT + audio:] = torch.stack([TEXT + tt, hh, ww], -1).reshape(-1, 3).float()
    tags = torch.cat([torch.ones(TEXT), torch.full((audio,), 2), torch.zeros(video)]).long()
    return {"hidden_states": _randn(g, 1, video, 4 * 4), "audio_hidden_states": _randn(g, 1, audio, 8),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "timestep": torch.tensor([t / 1000.0]),
            "timestep_indices": torch.zeros(n, dtype=torch.long), "token_tags": tags, "position_ids": pos,
            "video_indices": torch.arange(TEXT + audio, n), "audio_indices": torch.arange(TEXT, TEXT + audio),
            "text_indices": torch.arange(TEXT), "return_dict": False}


# rotary: 2 x 3 x rope_freq_dim = 24 of the 32 head channels
_MINIMAX_H3 = dict(num_attention_heads=2, attention_head_dim=32, hidden_size=64, num_layers=2, num_refiner_layers=1,
                   ffn_dim=128, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=TEXT_DIM,
                   freq_dim=16, time_embed_hidden_dim=32, time_embed_dim=32, rope_freq_dim=4)


def _wan_animate2_reference_inputs(g, t):
    """The reference pass (``kv_cache_mode="extract"``) as the pipeline makes it once per segment: the
    driving video's latents (a list of (C, F, H, W), one per sample) and their conditioning (mask and
    latents, 8 channels) concatenated on the channels; every layer writes its pre-RoPE K/V into the
    fresh cache. The forward embeds a constant timestep here (it reads the one given only for steps)."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    return {"hidden_states": [_randn(g, 4, 4, 16, 16)], "timestep": torch.tensor([t]),
            "encoder_hidden_states": [_randn(g, TEXT, TEXT_DIM)], "condition_latents": [_randn(g, 8, 4, 16, 16)],
            "encoder_hidden_states_image": _randn(g, 1, WA2_IMAGE, 1280),
            "kv_cache": WanAnimate2KVCache(_WAN_ANIMATE2["num_layers"]), "kv_cache_mode": "extract", "seq_len": 256,
            "offset_grid_sizes": torch.tensor([[4, 8, 8]]), "return_dict": False}


def _wan_animate2_inputs(g, t):
    """A denoising step (``kv_cache_mode="cached"``) of a 12-frame segment at 128 x 128 pixels: the
    block mask is built over (12 // 4 + 1) x 64 tokens; the latents hold one more frame (the
    reference image's slot): 5 x 8 x 8 tokens, whose self-attention takes the cached reference K/V
    (4 x 8 x 8, here random) through flex_attention."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    cache = WanAnimate2KVCache(_WAN_ANIMATE2["num_layers"])
    for layer in cache.layer_caches:
        layer.store(_randn(g, 1, 256, 2, 32), _randn(g, 1, 256, 2, 32))
    return {"hidden_states": [_randn(g, 4, 5, 16, 16)], "timestep": torch.tensor([t]),
            "encoder_hidden_states": [_randn(g, TEXT, TEXT_DIM)], "condition_latents": [_randn(g, 8, 5, 16, 16)],
            "encoder_hidden_states_image": _randn(g, 1, WA2_IMAGE, 1280), "kv_cache": cache,
            "kv_cache_mode": "cached", "seq_len": 320, "reference_grid_sizes": torch.tensor([[4, 8, 8]]),
            "origin_len": 12, "origin_area": [128, 128], "return_dict": False}


# in_dim = 4 latent + 8 conditioning channels; head_dim 32; its CLIP projection takes 1280-wide image tokens
_WAN_ANIMATE2 = dict(patch_size=(1, 2, 2), text_len=TEXT, in_dim=12, dim=64, ffn_dim=64, freq_dim=16,
                     text_dim=TEXT_DIM, out_dim=4, num_heads=2, num_layers=2)
WA2_IMAGE = 4       # CLIP image tokens: a second cross-attention per block


def _anyflow_far_inputs(g, t, chunks=(1, 1)):
    """An autoregressive step as AnyFlowFARPipeline makes it: the last chunk's latents (B, F, C, H, W),
    per-frame timesteps, and the KV cache holding the earlier chunks (buffers sized as the pipeline
    sizes them, here random); its causal self-attention takes [cached keys | the chunk's keys]
    through flex_attention. 8 x 8 tokens per full frame, 4 x 4 per compressed one."""
    frames, limit = chunks[-1], _ANYFLOW_FAR["full_chunk_limit"]
    cache = {i: {"full_cache": _randn(g, 2, 1, 2, limit * max(chunks) * 64, 32),
                 "compressed_cache": _randn(g, 2, 1, 2, (len(chunks) - limit + 1) * max(chunks) * 16, 32)}
             for i in range(2)}
    return {"hidden_states": _randn(g, 1, frames, 8, 16, 16), "timestep": torch.full((1, frames), t),
            "r_timestep": torch.full((1, frames), max(t - 100.0, 0.0)),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "chunk_partition": list(chunks), "kv_cache": cache,
            "kv_cache_flag": {"num_cached_chunks": len(chunks) - 1, "is_cache_step": False}, "return_dict": False}


# full_chunk_limit 2: a third chunk's step reads the first from the compressed cache
_ANYFLOW_FAR = dict(_ANYFLOW, compressed_patch_size=(1, 4, 4), full_chunk_limit=2, chunk_partition=(1, 1))


def _joyimage_inputs(g, t, items=2):
    # (B, items, C, T, H, W): the target and a reference image, one latent frame each
    return {"hidden_states": _randn(g, 1, items, 4, 1, 16, 16), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "return_dict": False}


# head_dim 32 = sum(rope_dim_list)
_JOYIMAGE = dict(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=64, num_attention_heads=2,
                 text_dim=TEXT_DIM, mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[8, 12, 12])


def _joyimage_plus_inputs(g, t, items=((1, 8, 8), (1, 8, 8))):
    """As the Edit-Plus pipeline packs them: each item's (t, h, w) tokens patchified to (C, pt, ph, pw)
    patches, the target first, one after another (B, P, C, 1, 2, 2); the text mask marks its valid
    tokens (the image patches' part of the key mask is built from ``shape_list``)."""
    patches = sum(math.prod(i) for i in items)
    return {"hidden_states": _randn(g, 1, patches, 4, 1, 2, 2), "timestep": torch.tensor([t]),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "encoder_hidden_states_mask": torch.ones(1, TEXT),
            "shape_list": [list(items)], "return_dict": False}


CLIENTS = [
    Client("wan", "WanTransformer3DModel", _WAN, _wan_inputs, grid=(4, 8, 8), text_tokens=0, text_position=None,
           sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("skyreels_v2", "SkyReelsV2Transformer3DModel", _WAN, _skyreels_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("cogvideox", "CogVideoXTransformer3DModel", _COGVIDEOX, _cogvideox_inputs, grid=(4, 8, 8),
           text_tokens=TEXT, text_position="first", sites=("video",) * 2, latents="BFCHW",
           grid_rule="latents (B, F, C, H, W) / patch sizes (per-frame patch embedding)"),
    Client("ltx_video", "LTXVideoTransformer3DModel", _LTX, _ltx_inputs, grid=(4, 16, 16), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, grid_rule="num_frames, height, width arguments"),
    Client("hunyuan_video", "HunyuanVideoTransformer3DModel", _HUNYUAN, _hunyuan_inputs, grid=(4, 8, 8),
           text_tokens=TEXT, text_position="last", sites=("text", "video", "video"), masked=True,
           grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("mochi", "MochiTransformer3DModel", _MOCHI, _mochi_inputs, grid=(4, 8, 8), text_tokens=TEXT,
           text_position="last", sites=("cross", "video", "video"), sparse={"mod": 0, "vmoba": 0},
           grid_rule="latents (B, C, F, H, W) / patch sizes (per-frame patch embedding)"),
    Client("cosmos", "CosmosTransformer3DModel", _COSMOS, _cosmos_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("allegro", "AllegroTransformer3DModel", _ALLEGRO, _allegro_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2,
           grid_rule="latents (B, C, F, H, W) / patch sizes (per-frame patch embedding)"),
    Client("wan_vace", "WanVACETransformer3DModel", _WAN_VACE, _wan_vace_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 4,
           grid_rule="latents (B, C, F, H, W) / patch sizes (the control blocks attend over the control tokens)"),
    Client("chronoedit", "ChronoEditTransformer3DModel", _CHRONOEDIT, _chronoedit_inputs, grid=(2, 8, 16),
           text_tokens=0, text_position=None, sites=("video", "cross") * 2,
           grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("chronoedit_i2v", "ChronoEditTransformer3DModel", _CHRONOEDIT_I2V, _chronoedit_i2v_inputs, grid=(2, 8, 16),
           text_tokens=0, text_position=None, sites=("video", "cross", "cross") * 2,
           grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("anyflow", "AnyFlowTransformer3DModel", _ANYFLOW, _anyflow_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "cross") * 2, latents="BFCHW",
           grid_rule="latents (B, F, C, H, W) / patch sizes"),
    # Helios' history latents take the place of a text-first model's text: "first" (also without them)
    Client("helios", "HeliosTransformer3DModel", _HELIOS, _helios_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position="first", sites=("video", "cross") * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("helios_history", "HeliosTransformer3DModel", _HELIOS, _helios_history_inputs, grid=(4, 8, 8),
           text_tokens=HELIOS_HISTORY, text_position="first", sites=("video", "cross") * 2,
           grid_rule="latents (B, C, F, H, W) / patch sizes; history tokens first"),
    Client("wan_animate", "WanAnimateTransformer3DModel", _WAN_ANIMATE, _wan_animate_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None, sites=("video", "cross", "cross", "video", "cross"),
           grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("ltx2", "LTX2VideoTransformer3DModel", _LTX2, _ltx2_inputs, grid=(4, 8, 8), text_tokens=0,
           text_position=None, sites=("video", "audio", "cross", "cross", "cross", "cross") * 2, other_self={16: "audio"},
           grid_rule="num_frames, height, width arguments"),
    Client("kandinsky5", "Kandinsky5Transformer3DModel", _KANDINSKY5, _kandinsky5_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None, sites=("text",) + ("video", "cross") * 2, latents="BFHWC",
           grid_rule="latents (B, F, H, W, C) / patch sizes"),
    # Latte attends within a frame (batch B x F) and within a pixel's frames (batch B x H x W): no site sees the
    # video; mod runs the per-frame sites block-sparse without a grid, vmoba needs one and keeps them dense
    Client("latte", "LatteTransformer3DModel", _LATTE, _latte_inputs, grid=(4, 16, 16), text_tokens=0,
           text_position=None, sites=("frame", "cross", "temporal") * 2, other_self={256: "frame", 4: "temporal"},
           sparse={"mod": 2, "vmoba": 0}, sparse_grid=None, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    # SanaVideo's self-attention is linear attention (matrix products, no SDPA): only its cross-attention is SDPA
    Client("sana_video", "SanaVideoTransformer3DModel", _SANA_VIDEO, _sana_video_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None, sites=("cross",) * 2, grid_rule="latents (B, C, F, H, W) / patch sizes"),
    Client("easyanimate", "EasyAnimateTransformer3DModel", _EASYANIMATE, _easyanimate_inputs, grid=(4, 8, 8),
           text_tokens=TEXT, text_position="first", sites=("video",) * 2,
           grid_rule="latents (B, C, F, H, W) / patch sizes (per-frame patch embedding)"),
    Client("consisid", "ConsisIDTransformer3DModel", _CONSISID, _consisid_inputs, grid=(4, 8, 8), text_tokens=TEXT,
           text_position="first", sites=("video",) * 2, latents="BFCHW",
           grid_rule="latents (B, F, C, H, W) / patch sizes (per-frame patch embedding)"),
    Client("motif_video", "MotifVideoTransformer3DModel", _MOTIF, _motif_inputs, grid=(4, 8, 8), text_tokens=TEXT,
           text_position="last", sites=("video", "video"), masked=True,
           grid_rule="latents (B, C, F, H, W) / patch sizes"),
    # [history 4x | history 2x | clean | latents | image | text]: text_position counts the tokens before the grid;
    # at batch 1 the forward cuts the text to its valid length (no mask)
    Client("hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel", _FRAMEPACK, _framepack_inputs,
           grid=(4, 8, 8), text_tokens=FRAMEPACK_HISTORY + FRAMEPACK_IMAGE + TEXT, text_position=FRAMEPACK_HISTORY,
           sites=("text", "video", "video"), grid_rule="latents (B, C, F, H, W) / patch sizes; history tokens before them"),
    # two text branches (video, audio) run even without audio
    Client("kandinsky6", "Kandinsky6Transformer3DModel", _KANDINSKY6, _kandinsky6_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None, sites=("text", "text") + ("video", "cross") * 2, latents="BFHWC",
           grid_rule="latents (B, F, H, W, C) / patch sizes"),
    # per fused block: video self, video-text cross, audio self, audio-text cross, video<-audio, audio<-video cross
    Client("kandinsky6_audio", "Kandinsky6Transformer3DModel", _KANDINSKY6, _kandinsky6_audio_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None,
           sites=("text", "text") + ("video", "cross", "audio", "cross", "cross", "cross") * 2, latents="BFHWC",
           other_self={K6_AUDIO: "audio"}, grid_rule="latents (B, F, H, W, C) / patch sizes"),
    # one packed sequence [text 8 | audio 16 | video 4x8x8], no cross-attention: 24 non-grid tokens before the grid
    Client("minimax_h3", "MiniMaxH3Transformer3DModel", _MINIMAX_H3, _minimax_h3_inputs, grid=(4, 8, 8),
           text_tokens=TEXT + MM_AUDIO, text_position=TEXT + MM_AUDIO, sites=("text", "video", "video"),
           grid_rule="packed rows: the video_indices run that ends the sequence, over its position_ids"),
    # Wan-Animate-2's reference pass: SDPA self-attention over the driving video's tokens (per-sample list latents)
    Client("wan_animate2_reference", "WanAnimate2Transformer3DModel", _WAN_ANIMATE2, _wan_animate2_reference_inputs,
           grid=(4, 8, 8), text_tokens=0, text_position=None, sites=("video", "cross", "cross") * 2,
           grid_rule="a list of latents (C, F, H, W) / patch sizes"),
    # its denoising steps: self-attention through flex_attention with its own block mask (listed dense in report())
    Client("wan_animate2", "WanAnimate2Transformer3DModel", _WAN_ANIMATE2, _wan_animate2_inputs, grid=(5, 8, 8),
           text_tokens=0, text_position=None, sites=("cross", "cross") * 2, flex=2,
           grid_rule="a list of latents (C, F, H, W) / patch sizes"),
    # AnyFlow-FAR's causal self-attention is flex_attention (cached keys first): only its text cross-attention is SDPA
    Client("anyflow_far", "AnyFlowFARTransformer3DModel", _ANYFLOW_FAR, _anyflow_far_inputs, grid=(1, 8, 8),
           text_tokens=0, text_position=None, sites=("cross",) * 2, latents="BFCHW", flex=2,
           grid_rule="latents (B, F, C, H, W) / patch sizes (the step's chunk)"),
    # JoyImage-Edit: [target | reference] images as two frames, text last
    Client("joyimage_edit", "JoyImageEditTransformer3DModel", _JOYIMAGE, _joyimage_inputs, grid=(2, 8, 8),
           text_tokens=TEXT, text_position="last", sites=("video",) * 2, latents="BNCFHW",
           grid_rule="items (B, N, C, F, H, W): N x F frames / patch sizes"),
    Client("joyimage_edit_plus", "JoyImageEditPlusTransformer3DModel", _JOYIMAGE, _joyimage_plus_inputs,
           grid=(2, 8, 8), text_tokens=TEXT, text_position="last", sites=("video",) * 2, masked=True,
           grid_rule="patches (B, P, C, pt, ph, pw) and shape_list: items of one size as frames"),
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


def true_grid(client, inputs) -> tuple:
    """The token grid after patchify of the call with ``inputs``, from their shapes and the config's
    patch sizes (independent of modcompile/layout.py, which the tests check against it)."""
    cfg, x = client.config, inputs["hidden_states"]
    if isinstance(x, list):                                      # per-sample latents (C, F, H, W)
        x = x[0][None]
    if "shape_list" in inputs:                                   # packed patches: the items are the frames
        items = inputs["shape_list"][0]
        assert len({i[1:] for i in items}) == 1, items
        return (sum(i[0] for i in items), items[0][1], items[0][2])
    if "position_ids" in inputs:                                 # packed rows (MiniMax-H3): the rows after the audio
        pos = inputs["position_ids"][int(inputs["audio_indices"].max()) + 1:]
        return tuple(len(pos[:, i].unique()) for i in range(3))
    if "num_frames" in inputs:                                   # packed tokens: the args are the grid
        assert x.shape[1] == inputs["num_frames"] * inputs["height"] * inputs["width"]
        return (inputs["num_frames"], inputs["height"], inputs["width"])
    p = cfg["patch_size"]
    pt, ph, pw = p if isinstance(p, (tuple, list)) else (cfg.get("patch_size_t") or 1, p, p)
    f, h, w = (x.shape[client.latents.index(d)] for d in "FHW")
    f *= x.shape[client.latents.index("N")] if "N" in client.latents else 1   # items side by side as frames
    return (f // pt, h // ph, w // pw)


def sample(out) -> torch.Tensor:
    """The predicted sample of a forward's output tuple (Wan-Animate-2 returns a list, one per sample)."""
    x = out[0]
    return torch.stack(list(x)) if isinstance(x, (list, tuple)) else x


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
