"""Infer the latent video token grid (T, H, W) from the patch embedding of a video DiT."""
from __future__ import annotations

import torch
import torch.fx as fx

from .attention_sites import example_value, hint

_CONV3D = {torch.conv3d, torch.nn.functional.conv3d}


def _conv3d_outputs(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _CONV3D:
            yield node
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Conv3d):
            yield node


def patch_embedding(gm: fx.GraphModule) -> fx.Node | None:
    """The first 3D convolution with a 5-D output: the patch embedding whose output, flattened,
    becomes the token sequence (Wan, HunyuanVideo and our harness DiT all embed this way). Not
    one whose output is one token: it embeds patches one by one, the tokens in its batch
    (JoyImage-Edit-Plus), and its (1, 1, 1) is no grid."""
    for node in _conv3d_outputs(gm):
        val = example_value(node)
        if isinstance(val, torch.Tensor) and val.dim() == 5 and not all(hint(s) == 1 for s in val.shape[2:]):
            return node
    return None


def infer_video_grid(gm: fx.GraphModule) -> tuple[int, int, int] | None:
    """(T, H, W) of the patch embedding's output at compile time (hints of symbolic sizes)."""
    node = patch_embedding(gm)
    grid = None if node is None else tuple(hint(s) for s in example_value(node).shape[2:])
    return None if grid is None or None in grid else grid


def text_tokens_for(seq_len: int, grid: tuple[int, int, int] | None) -> int | None:
    """Tokens of a joint-attention sequence that are not video tokens, or None if the grid does
    not fit the sequence: it has more tokens than the sequence, or it leaves as many tokens as it
    covers or more (a grid that does not fill the sequence is more likely wrong, e.g. another
    resolution's, than the rest a text prompt: joint-attention text is shorter than the video)."""
    if grid is None:
        return None
    video = grid[0] * grid[1] * grid[2]
    text = seq_len - video
    return text if 0 <= text < video else None
