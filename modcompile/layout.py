"""The token layout of a diffusers video model's call: latent grid (T, H, W) and text position.

Read from the model's config (patch sizes) and its forward inputs, so it works the same whether
the model's forward is compiled (whole-model ``torch.compile``) or not (regional compilation): a
forward pre-hook on the model reads it (modcompile/runtime.py). One rule per input form:

* 5-D latents ``hidden_states`` (B, C, F, H, W) divided by the patch sizes (Wan, SkyReels-V2,
  HunyuanVideo, Mochi, Cosmos, Allegro: ``config.patch_size`` as a 3-tuple, or an int with
  ``config.patch_size_t``, 1 when absent);
* frames before channels, (B, F, C, H, W), for the models that patchify per frame
  (CogVideoX, ConsisID: a Conv2d per frame, or a Linear over ``patch_size_t`` frames in 1.5);
* packed tokens (B, N, C) with ``num_frames``/``height``/``width`` arguments, which are already
  the token grid (LTX-Video).

Text position: the classes that put the text tokens before the video tokens are listed in
``TEXT_FIRST``; every other joint-attention model appends them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FRAMES_FIRST = {"CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel"}
TEXT_FIRST = {"CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel"}


@dataclass(frozen=True)
class Layout:
    grid: tuple | None          # latent token grid (T, H, W), None when it cannot be read
    text_position: str          # "first" | "last": where joint-attention text tokens sit
    rule: str                   # how it was read (for report notes and logs)


def _patch_sizes(config) -> tuple | None:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == 3 and all(isinstance(p, int) for p in patch):
        return tuple(patch)
    if isinstance(patch, int) and patch > 0:
        return (getattr(config, "patch_size_t", None) or 1, patch, patch)
    return None


def model_layout(model: torch.nn.Module, values: dict) -> Layout:
    """The layout of one call of ``model`` with forward arguments ``values`` (by name)."""
    name = type(model).__name__
    text_position = "first" if name in TEXT_FIRST else "last"
    config = getattr(model, "config", None)
    x = values.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        return Layout(None, text_position, "no hidden_states input")
    dims = [values.get(n) for n in ("num_frames", "height", "width")]
    if x.dim() == 3 and all(isinstance(d, int) and d > 0 for d in dims):
        return Layout(tuple(dims), text_position, "num_frames/height/width arguments")
    patch = _patch_sizes(config) if config is not None else None
    if x.dim() != 5 or patch is None:
        return Layout(None, text_position, f"hidden_states of rank {x.dim()}, patch size {patch}")
    frames_first = name in FRAMES_FIRST
    f, h, w = (x.shape[1], x.shape[3], x.shape[4]) if frames_first else x.shape[2:]
    # the patch embeddings floor (a frame remainder is dropped), as their reshapes do
    grid = (int(f) // patch[0], int(h) // patch[1], int(w) // patch[2])
    if min(grid) < 1:
        return Layout(None, text_position, f"latents {tuple(x.shape)} smaller than the patch {patch}")
    order = "(B, F, C, H, W)" if frames_first else "(B, C, F, H, W)"
    return Layout(grid, text_position, f"latents {order} / patch {patch}")


_LATENT_LOCALS = ("num_frames", "height", "width")


def frame_layout(model: torch.nn.Module, frame_locals: dict, params: list) -> Layout:
    """The layout of the call whose forward frame is running (a model first noticed from inside its
    forward, under regional compilation). Its arguments may be rebound by then (``hidden_states`` is
    already the token sequence); diffusers' forwards unpack the latent shape into the locals
    ``num_frames, height, width`` first, which divided by the patch sizes give the grid. Only
    locals that are not forward arguments count that way (LTX's arguments are the token grid)."""
    layout = model_layout(model, {n: v for n, v in frame_locals.items() if n in params})
    dims = [frame_locals.get(n) for n in _LATENT_LOCALS]
    config = getattr(model, "config", None)
    patch = _patch_sizes(config) if config is not None else None
    if layout.grid is not None or patch is None or any(n in params for n in _LATENT_LOCALS) \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        return layout
    grid = tuple(d // p for d, p in zip(dims, patch))
    if min(grid) < 1:
        return layout
    return Layout(grid, layout.text_position, f"the forward's latent shape (num_frames, height, width) / patch {patch}")


__all__ = ["Layout", "model_layout", "frame_layout", "FRAMES_FIRST", "TEXT_FIRST"]
