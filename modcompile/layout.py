"""The token layout of a diffusers video model's call: latent grid (T, H, W) and text position.

Read from the model's config (patch sizes) and its forward inputs, so it works the same whether
the model's forward is compiled (whole-model ``torch.compile``) or not (regional compilation): a
forward pre-hook on the model reads it (modcompile/runtime.py). One rule per input form:

* 5-D latents ``hidden_states`` (B, C, F, H, W) divided by the patch sizes (Wan, SkyReels-V2,
  HunyuanVideo, Mochi, Cosmos, Allegro: ``config.patch_size`` as a 3-tuple, or an int with
  ``config.patch_size_t``, 1 when absent);
* frames before channels, (B, F, C, H, W), for the models that patchify per frame
  (CogVideoX, ConsisID: a Conv2d per frame, or a Linear over ``patch_size_t`` frames in 1.5), and
  AnyFlow and AnyFlow-FAR, whose forwards permute them before their Conv3d;
* channels last, (B, F, H, W, C) (Kandinsky 5 and 6: a Linear over each patch; Kandinsky 6's image
  conditioning appends the reference frame as one more latent frame, which the grid counts);
* packed tokens (B, N, C) with ``num_frames``/``height``/``width`` arguments, which are already
  the token grid (LTX-Video);
* a list of per-sample latents (C, F, H, W) (Wan-Animate-2, whose forward concatenates each with its
  conditioning latents along the channels): the first sample's, when all have one shape;
* items (B, N, C, F, H, W) (JoyImage-Edit, ``ITEMS_AS_FRAMES``): the target and reference images
  side by side on the frame axis, as its forward puts them: (N x F, H, W) / patch sizes;
* patches (B, P, C, pt, ph, pw) with a ``shape_list`` of each item's (t, h, w) tokens
  (JoyImage-Edit-Plus, ``ITEM_SHAPES``): its items one after another as frames, when every item has
  one (h, w), every sample the same items and no padding; none otherwise (items of other sizes);
* packed rows (MiniMax-H3, ``PACKED_ROWS``): one sequence [text | keyframe or reference rows |
  target audio | target video] whose places (``video_indices``) and rotary (t, h, w) positions
  (``position_ids``) are inputs; the target video is the run of ``video_indices`` that ends the
  sequence (the target audio separates it from the conditioning rows), frame-major: its last frame's
  rows share their t, that frame's last row of tokens its h. Every other token is before the grid:
  the text position is their count. Read on the host once per new pair of index tensors.

Text position: the classes that put the text tokens before the video tokens are listed in
``TEXT_FIRST``; every other joint-attention model appends them. Helios has no text in its
self-attention but puts its patchified history latents (long, mid, short) before the video tokens:
they stand where text-first models put their text (attended by every row, attending every key).
HunyuanVideo-FramePack has non-grid tokens on both sides (history latents before its latents, image
and text after): its text position is the count of those before the grid (``history_tokens``).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

FRAMES_FIRST = {"CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel", "AnyFlowTransformer3DModel",
                "AnyFlowFARTransformer3DModel"}
CHANNELS_LAST = {"Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel"}
PACKED_ROWS = {"MiniMaxH3Transformer3DModel"}
ITEMS_AS_FRAMES = {"JoyImageEditTransformer3DModel"}
ITEM_SHAPES = {"JoyImageEditPlusTransformer3DModel"}
TEXT_FIRST = {"CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel", "EasyAnimateTransformer3DModel",
              "HeliosTransformer3DModel"}
# HunyuanVideo-FramePack: [history 4x | history 2x | clean | latents | image | text]. Each history input
# (embedded by its Conv3d, kernel = stride below, padded up to a multiple) joins the sequence before the
# latents only when its frame indices are given too (the forward's condition)
HISTORY_BEFORE = {"HunyuanVideoFramepackTransformer3DModel": (
    ("latents_clean", "indices_latents_clean", (1, 2, 2)),
    ("latents_history_2x", "indices_latents_history_2x", (2, 4, 4)),
    ("latents_history_4x", "indices_latents_history_4x", (4, 8, 8)))}


@dataclass(frozen=True)
class Layout:
    grid: tuple | None          # latent token grid (T, H, W), None when it cannot be read
    text_position: str | int    # "first" | "last": where joint-attention text tokens sit; an int: how
                                # many of the non-grid tokens come before the grid (the rest after it)
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
    if name in PACKED_ROWS:
        found = packed_grid(values)
        if found is not None:
            grid, before = found
            return Layout(grid, before, f"packed rows: the video_indices run that ends the sequence, over its "
                                        f"position_ids; {before} tokens before it")
    if name in ITEM_SHAPES and isinstance(x, torch.Tensor) and x.dim() == 6:
        grid, why = item_shapes_grid(values.get("shape_list"), int(x.shape[1]))
        return Layout(grid, text_position, why)
    if isinstance(x, (list, tuple)) and x and all(isinstance(u, torch.Tensor) and u.dim() == 4 for u in x):
        if any(u.shape[1:] != x[0].shape[1:] for u in x):
            return Layout(None, text_position, "per-sample latents of different sizes")
        shape = (len(x), *x[0].shape)
    elif isinstance(x, torch.Tensor):
        shape = tuple(x.shape)
    else:
        return Layout(None, text_position, "no hidden_states input")
    if name in ITEMS_AS_FRAMES and len(shape) == 6:    # (B, N, C, F, H, W) -> (B, C, N x F, H, W)
        shape = (shape[0], shape[2], shape[1] * shape[3], *shape[4:])
    dims = [values.get(n) for n in ("num_frames", "height", "width")]
    if len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in dims):
        return Layout(tuple(dims), text_position, "num_frames/height/width arguments")
    patch = _patch_sizes(config) if config is not None else None
    if len(shape) != 5 or patch is None:
        return Layout(None, text_position, f"hidden_states of rank {len(shape)}, patch size {patch}")
    if name in CHANNELS_LAST:
        order, (f, h, w) = "(B, F, H, W, C)", shape[1:4]
    elif name in FRAMES_FIRST:
        order, (f, h, w) = "(B, F, C, H, W)", (shape[1], shape[3], shape[4])
    else:
        order, (f, h, w) = "(B, C, F, H, W)", shape[2:]
    # the patch embeddings floor (a frame remainder is dropped), as their reshapes do
    grid = (int(f) // patch[0], int(h) // patch[1], int(w) // patch[2])
    if min(grid) < 1:
        return Layout(None, text_position, f"latents {shape} smaller than the patch {patch}")
    before = history_tokens(name, values)
    if before:
        return Layout(grid, before, f"latents {order} / patch {patch}, {before} history tokens before them")
    return Layout(grid, text_position, f"latents {order} / patch {patch}")


_PACKED_LAST: list = [None]   # (weak refs to the last call's two index tensors, their versions, the result)


def packed_grid(values: dict) -> tuple | None:
    """(grid, tokens before it) of a packed sequence whose video rows end it (``PACKED_ROWS``), from
    ``video_indices`` and ``position_ids`` (seq_len, 3); None when they do not give one. The read
    copies them to the host (a sync on a GPU): a pipeline passes the same tensors at every step,
    so the last call's answer is kept while they are the same, unchanged tensors."""
    pos, video = values.get("position_ids"), values.get("video_indices")
    if not (isinstance(pos, torch.Tensor) and isinstance(video, torch.Tensor) and pos.dim() == 2 and video.numel()):
        return None
    last = _PACKED_LAST[0]
    if last is not None and last[0]() is video and last[1]() is pos and last[2] == (video._version, pos._version):
        return last[3]
    found = _packed_grid(pos, video)
    _PACKED_LAST[0] = (weakref.ref(video), weakref.ref(pos), (video._version, pos._version), found)
    return found


def _packed_grid(pos: torch.Tensor, video: torch.Tensor) -> tuple | None:
    n, video = pos.shape[0], video.detach().flatten().cpu()
    if int(video[-1]) != n - 1:
        return None
    breaks = ((video[1:] - video[:-1]) != 1).nonzero().flatten()
    rows = video.numel() - (int(breaks[-1]) + 1 if breaks.numel() else 0)
    tail = pos.detach()[n - rows:].cpu()
    frame = int((tail[:, 0] == tail[-1, 0]).sum())                  # the last frame's rows (t is per frame)
    width = int((tail[-frame:, 1] == tail[-1, 1]).sum())             # its last row of tokens (h is per row)
    if rows % frame or frame % width:
        return None
    return (rows // frame, frame // width, width), n - rows


def item_shapes_grid(shape_list, patches: int) -> tuple:
    """(grid, rule) of JoyImage-Edit-Plus' packed patches: ``shape_list`` holds each sample's items
    (target first, then the references) as (t, h, w) tokens, packed one after another and padded
    to ``patches``. The items make the frames of one grid when they share (h, w)."""
    if not (isinstance(shape_list, (list, tuple)) and shape_list and all(
            isinstance(items, (list, tuple)) and items and all(len(i) == 3 for i in items) for items in shape_list)):
        return None, "no shape_list of the items' (t, h, w) tokens"
    items = [tuple(int(d) for d in i) for i in shape_list[0]]
    if any([tuple(int(d) for d in i) for i in other] != items for other in shape_list[1:]):
        return None, "samples with other items"
    if len({i[1:] for i in items}) != 1:
        return None, f"items of other sizes {items}: no one grid"
    grid = (sum(i[0] for i in items), items[0][1], items[0][2])
    if math.prod(grid) != patches:
        return None, f"items {items} fill {math.prod(grid)} of {patches} patches (padding)"
    return grid, f"shape_list: {len(items)} items of {grid[1]}x{grid[2]} tokens as frames"


def history_tokens(name: str, values: dict) -> int:
    """Tokens a model puts between the sequence start and its latents (``HISTORY_BEFORE``): a 5-D
    input counts as its embedding's output (ceil per dimension), an embedded (B, N, C) one as N (the
    forward's locals, read under regional compilation, hold it embedded)."""
    total = 0
    for key, indices, kernel in HISTORY_BEFORE.get(name, ()):
        x = values.get(key)
        if not isinstance(x, torch.Tensor) or values.get(indices) is None:
            continue
        if x.dim() == 5:
            total += math.prod(-(-int(s) // k) for s, k in zip(x.shape[2:], kernel))
        elif x.dim() == 3:
            total += int(x.shape[1])
    return total


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
    before = history_tokens(type(model).__name__, {n: v for n, v in frame_locals.items() if n in params})
    return Layout(grid, before or layout.text_position,
                  f"the forward's latent shape (num_frames, height, width) / patch {patch}")


__all__ = ["Layout", "model_layout", "frame_layout", "history_tokens", "item_shapes_grid", "packed_grid",
           "CHANNELS_LAST", "FRAMES_FIRST", "HISTORY_BEFORE", "ITEMS_AS_FRAMES", "ITEM_SHAPES", "PACKED_ROWS",
           "TEXT_FIRST"]
