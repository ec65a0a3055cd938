"""VMoBA partition geometry: 1D / 2D / 3D blocks of a video token grid, the permutation that makes
every block contiguous, and how partition blocks overlap the attention kernel's fixed-size blocks.

Tokens of the video sit in raster order (frame-major: t, then y, then x), as a patch embedding's
``flatten(2)`` leaves them. Text tokens of joint attention sit before or after the video tokens.

* ``1d`` (temporal): a block is ``t`` consecutive frames x the full H x W.
* ``2d`` (spatial): a block is an ``h x w`` tile, over all frames.
* ``3d`` (spatio-temporal): a block is a ``t x h x w`` cube.

Grids that a block shape does not divide get smaller blocks at the far edges. The permutation orders
the blocks in raster order of the block grid (or, with ``align``, blocks of a multiple of the kernel
block size first: see "Alignment" below) and keeps raster order inside each block; text tokens
keep their place (first or last). ``perm[i]`` is the original index of the token at permuted
position ``i`` and ``inv`` is its inverse, so ``x_perm = x[perm]`` and ``x = x_perm[inv]``.

Partition blocks rarely line up with the kernel's blocks (``block_size`` tokens in permuted order).
The rule (exact: every token is attended once or not at all, never twice, never dropped from a
selected block): a kernel block *belongs to* every partition block it overlaps, and a query kernel
block attends a key kernel block iff some partition block of the query block selected some
partition block of the key block. Every token of a selected partition block is therefore attended,
plus the tokens that share a kernel block with it (a superset; listing a key block once per row
keeps the softmax exact). Kernel blocks that hold a text token attend everything and are attended
by every query block.

Alignment (why the default shapes are what they are): a partition block that straddles kernel
blocks drags their other tokens along, so the kernel-level density exceeds the partition-level
one. ``kernel_footprint`` measures it exactly from the layout (kernel tokens touched per video
token; 1.0 iff every block is a union of whole kernel blocks). Padding the permuted layout is not
an option (the kernel cannot mask padding keys), so we (1) choose default shapes with the smallest
footprint among shapes of ``block_size/2 .. 2*block_size`` tokens, preferring sizes that are
multiples of ``block_size``, and (2) order the blocks aligned-first when that helps: full blocks of a
multiple of ``block_size`` tokens first, the ragged edge blocks after them, so the ragged edges no
longer shift every later block off the kernel grid. Text placed first with a length that is not a
multiple of ``block_size`` shifts the whole video; the footprint accounts for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .state import KERNEL_STATE

KINDS = ("1d", "2d", "3d")
_SHAPE_LEN = {"1d": 1, "2d": 2, "3d": 3}


def kind_for_layer(layer: int) -> str:
    """VMoBA cycles the partition with the attention layer: 0 temporal, 1 spatial, 2 cubes."""
    return KINDS[layer % 3]


def check_block_shape(kind: str, shape) -> tuple:
    """Validate a configured block shape (``(t,)``, ``(h, w)`` or ``(t, h, w)``); returns it as ints."""
    if kind not in KINDS:
        raise ValueError(f"vmoba: partition kind must be one of {KINDS}, got {kind!r}")
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"vmoba: {kind} block shape must be a tuple of {_SHAPE_LEN[kind]} ints, got {shape!r}") from None
    if len(shape) != _SHAPE_LEN[kind] or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                 for s in shape):
        raise ValueError(f"vmoba: {kind} block shape must be {_SHAPE_LEN[kind]} positive ints, got {shape!r}")
    return shape


def full_block_shape(grid, kind: str, shape) -> tuple:
    """The (t, h, w) extent of one block, clipped to the grid."""
    T, H, W = grid
    shape = check_block_shape(kind, shape)
    if kind == "1d":
        bt, bh, bw = shape[0], H, W
    elif kind == "2d":
        bt, bh, bw = T, shape[0], shape[1]
    else:
        bt, bh, bw = shape
    return min(bt, T), min(bh, H), min(bw, W)


def block_sizes(grid, kind: str, shape) -> np.ndarray:
    """(P,) int64 token counts of the video blocks, in raster order of the block grid (numpy: the
    default-shape search scores thousands of candidates, where torch's per-op overhead dominates)."""
    def axis(g, b):
        n = -(-g // b)
        sizes = np.full(n, b, dtype=np.int64)
        sizes[-1] = g - b * (n - 1)
        return sizes

    st, sh, sw = (axis(g, b) for g, b in zip(grid, full_block_shape(grid, kind, shape)))
    return (st[:, None, None] * sh[None, :, None] * sw[None, None, :]).reshape(-1)


def aligned_first(sizes: np.ndarray, align: int) -> np.ndarray:
    """Block order (indices into raster order): blocks whose size is a multiple of ``align`` first,
    then the others, each group in raster order."""
    return np.argsort(sizes % align != 0, kind="stable")


def kernel_footprint(sizes: np.ndarray, offset: int, block_size: int) -> float:
    """Kernel tokens per video token of blocks laid out back to back from ``offset`` in this order:
    ``block_size * sum_p (kernel blocks block p overlaps) / sum_p size_p``. 1.0 iff every block is a
    union of whole kernel blocks; with independent selections the kernel-level density is about
    ``footprint**2`` times the token-level partition density."""
    end = offset + np.cumsum(sizes)
    start = end - sizes
    touched = (end + block_size - 1) // block_size - start // block_size
    return block_size * int(touched.sum()) / int(sizes.sum())


def video_offset(text_tokens: int, text_position) -> int:
    """Non-grid tokens before the video grid: all of them when the text comes first, none when it
    comes last, or the given count when ``text_position`` is an int (tokens both before and after
    the grid: FramePack's history latents before its latents, image and text tokens after them)."""
    if isinstance(text_position, int) and not isinstance(text_position, bool):
        return min(max(text_position, 0), text_tokens)
    return text_tokens if text_position == "first" else 0


def layout_footprints(grid, kind: str, shape, block_size: int, text_tokens: int = 0,
                      text_position: str = "last") -> tuple[float, float]:
    """(footprint in raster block order, footprint in aligned-first order)."""
    sizes = block_sizes(grid, kind, shape)
    offset = video_offset(text_tokens, text_position)
    raster = kernel_footprint(sizes, offset, block_size)
    if kind == "1d":  # 1D keeps the identity permutation: no reordering
        return raster, raster
    return raster, kernel_footprint(sizes[aligned_first(sizes, block_size)], offset, block_size)


def alignment_for(grid, kind: str, shape, block_size: int, text_tokens: int = 0,
                  text_position: str = "last") -> int | None:
    """``block_size`` when the aligned-first block order wastes fewer kernel tokens than raster order
    (pass it to :func:`build_partition` as ``align``), else None."""
    raster, aligned = layout_footprints(grid, kind, shape, block_size, text_tokens, text_position)
    return block_size if aligned < raster - 1e-9 else None


def default_block_shape(grid, kind: str, target_tokens: int, text_tokens: int = 0,
                        text_position: str = "last") -> tuple:
    """The default block shape for kernel blocks of ``target_tokens`` tokens.

    Rule: among shapes whose full block holds ``target/2 .. 2*target`` tokens (1D: whole frames),
    take the smallest kernel footprint (:func:`kernel_footprint`, best of raster and aligned-first
    order, rounded to 0.01), then the size closest to the target in log scale, then the most even
    sides, then the fewest ragged edges. Blocks that are unions of whole kernel blocks (footprint
    1.0) therefore win whenever the grid allows them; otherwise larger blocks within the window
    straddle relatively less. Without any shape in the window (tiny or odd grids) the closest
    size wins."""
    T, H, W = grid
    lo, hi = target_tokens / 2, 2 * target_tokens

    def footprint(shape):
        return round(min(layout_footprints(grid, kind, shape, target_tokens, text_tokens, text_position)), 2)

    if kind == "1d":
        fallback = (max(1, min(T, round(target_tokens / (H * W)))),)
        window = [(t,) for t in range(1, T + 1) if lo <= t * H * W <= hi]
        if not window:
            return fallback
        return min(window, key=lambda s: (footprint(s), round(abs(math.log(s[0] * H * W / target_tokens)), 6)))

    def closeness(bt, bh, bw, sides):
        size = bt * bh * bw
        ragged = sum(g % s != 0 for g, s in zip(grid, (bt, bh, bw)))
        aspect = math.log(max(sides) / min(sides))
        return (round(abs(math.log(size / target_tokens)), 6), round(aspect, 6), ragged)

    best_window, best_any = None, None
    ts = [T] if kind == "2d" else range(1, T + 1)
    for bt in ts:
        for bh in range(1, H + 1):
            for bw in range(1, W + 1):
                sides = (bh, bw) if kind == "2d" else (bt, bh, bw)
                c = closeness(bt, bh, bw, sides)
                if best_any is None or c < best_any[0]:
                    best_any = (c, sides)
                if lo <= bt * bh * bw <= hi:
                    cw = (footprint(sides),) + c
                    if best_window is None or cw < best_window[0]:
                        best_window = (cw, sides)
    return (best_window or best_any)[1]


@dataclass(frozen=True)
class Partition:
    """A partition of a token sequence (video grid + text) into blocks, in permuted order."""

    grid: tuple                 # (T, H, W)
    kind: str
    block: tuple                # (bt, bh, bw) extent of a full block
    text_tokens: int
    text_position: str
    perm: torch.Tensor          # (N,) int64: original index of the token at permuted position i
    inv: torch.Tensor           # (N,) int64: permuted position of original token j
    starts: torch.Tensor        # (P + 1,) int64: video block p spans [starts[p], starts[p+1]) permuted
    identity: bool              # the permutation is the identity (e.g. every 1D partition)
    align: int | None = None    # blocks of a multiple of ``align`` tokens come first (None: raster order)

    @property
    def num_blocks(self) -> int:
        return self.starts.numel() - 1

    @property
    def seq_len(self) -> int:
        return self.perm.numel()

    @property
    def video_range(self) -> tuple[int, int]:
        return int(self.starts[0]), int(self.starts[-1])

    def block_of_position(self) -> torch.Tensor:
        """(N,) int64: partition block of each permuted position, -1 for text."""
        n = self.seq_len
        ids = torch.full((n,), -1, dtype=torch.int64)
        sizes = self.starts[1:] - self.starts[:-1]
        lo, hi = self.video_range
        ids[lo:hi] = torch.repeat_interleave(torch.arange(self.num_blocks), sizes)
        return ids


def build_partition(grid, kind: str, shape, text_tokens: int = 0, text_position: str = "last",
                    align: int | None = None) -> Partition:
    """The partition of a ``grid`` video (plus ``text_tokens``) into ``kind`` blocks of ``shape``.

    ``align`` (the kernel block size, see :func:`alignment_for`) orders the blocks whose size is a
    multiple of it first, then the rest, each group in raster order: with the video starting on a
    kernel-block boundary, every block of the first group is then a union of whole kernel blocks.
    The blocks themselves (the sets of tokens) do not change."""
    if len(grid) != 3 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"vmoba: grid must be three positive ints (T, H, W), got {grid!r}")
    if text_tokens < 0:
        raise ValueError(f"vmoba: text_tokens must be >= 0, got {text_tokens}")
    if text_position not in ("first", "last") and not (isinstance(text_position, int) and 0 <= text_position <= text_tokens):
        raise ValueError(f"vmoba: text_position must be 'first' or 'last', got {text_position!r}")
    T, H, W = grid
    bt, bh, bw = full_block_shape(grid, kind, shape)
    n_video = T * H * W
    t = torch.arange(T).repeat_interleave(H * W)
    y = torch.arange(H).repeat_interleave(W).repeat(T)
    x = torch.arange(W).repeat(T * H)
    nbh, nbw = -(-H // bh), -(-W // bw)
    block_id = ((t // bt) * nbh + y // bh) * nbw + x // bw
    if align is not None:
        if not isinstance(align, int) or align <= 0:
            raise ValueError(f"vmoba: align must be a positive int or None, got {align!r}")
        order = torch.from_numpy(aligned_first(block_sizes(grid, kind, shape), align))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        block_id = rank[block_id]
    # A stable sort keeps raster order inside each block.
    video_perm = torch.argsort(block_id, stable=True)
    sizes = torch.bincount(block_id, minlength=int(block_id.max()) + 1)
    offset = video_offset(text_tokens, text_position)
    before, after = torch.arange(offset), torch.arange(offset + n_video, n_video + text_tokens)
    video_perm = video_perm + offset
    perm = torch.cat([before, video_perm, after])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]) + offset
    identity = bool((perm == torch.arange(perm.numel())).all())
    return Partition(tuple(grid), kind, (bt, bh, bw), text_tokens, text_position, perm, inv, starts, identity,
                     align)


@KERNEL_STATE.memo
@lru_cache(maxsize=128)
def cached_partition(grid: tuple, kind: str, shape: tuple, text_tokens: int, text_position: str,
                     align: int | None = None) -> Partition:
    return build_partition(grid, kind, shape, text_tokens, text_position, align)


def kernel_incidence(partition: Partition, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which partition blocks each kernel block overlaps, and which kernel blocks hold text.

    Returns ``(incidence, text)``: incidence (Mk, P) bool, text (Mk,) bool, Mk = ceil(N / block_size)."""
    n = partition.seq_len
    mk = -(-n // block_size)
    k_lo = torch.arange(mk) * block_size
    k_hi = torch.clamp(k_lo + block_size, max=n)
    p_lo, p_hi = partition.starts[:-1], partition.starts[1:]
    incidence = (p_lo[None, :] < k_hi[:, None]) & (p_hi[None, :] > k_lo[:, None])
    v_lo, v_hi = partition.video_range
    text = (k_lo < v_lo) | (k_hi > v_hi)
    return incidence, text


def kernel_block_mask(selection: torch.Tensor, incidence: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Kernel-level block mask from a partition-level selection (the rule in the module docstring).

    selection (..., P, P) bool; incidence (Mk, P) bool or 0/1 float; text (Mk,) bool, or the (Mk, Mk)
    bool ``text[:, None] | text[None, :]`` (one op fewer per call) -> (..., Mk, Mk) bool."""
    a = incidence if incidence.dtype == torch.float32 else incidence.to(torch.float32)
    # Small integer counts: exact in fp32.
    reach = torch.matmul(torch.matmul(a, selection.to(torch.float32)), a.transpose(0, 1))
    if text.dim() == 2:  # precomputed (Mk, Mk) "row or column holds text"
        return (reach > 0.5) | text
    return (reach > 0.5) | text[:, None] | text[None, :]


def permute_tokens(x: torch.Tensor, partition: Partition, dim: int = 2) -> torch.Tensor:
    """Reference permutation into block-contiguous order along ``dim``."""
    return x.index_select(dim, partition.perm.to(x.device))


def unpermute_tokens(x: torch.Tensor, partition: Partition, dim: int = 2) -> torch.Tensor:
    """Reference inverse permutation back to the original token order along ``dim``."""
    return x.index_select(dim, partition.inv.to(x.device))


__all__ = ["KINDS", "Partition", "aligned_first", "alignment_for", "block_sizes", "build_partition",
           "cached_partition", "check_block_shape", "default_block_shape", "kernel_footprint", "layout_footprints", "full_block_shape", "kernel_block_mask", "kernel_incidence",
           "kind_for_layer", "permute_tokens", "unpermute_tokens"]
