"""The ``vmoba`` policy (VMoBA, arXiv 2506.23858): mixture of block attention over 1D / 2D / 3D
partitions of the video grid.

Per call of a sparse step:

1. the partition of this layer (``layer % 3``: 1D temporal, 2D spatial, 3D cubes; block shapes from
   ``config.partition_blocks`` or defaults of about ``block_size`` tokens) gives a permutation that
   makes every partition block contiguous (kernels/partition.py; cached per geometry and device);
2. one fused pass reads q and k in permuted order, mean-pools them per partition block in fp32 and
   writes the permuted copy of k (kernels/pooling.py), handed with the layout to the attention op of
   the same call in the plan (``Plan.data``: a :class:`Permuted`);
3. pooled scores ``mean(q) . mean(k)`` (with a key-padding mask: k pooled over the visible keys
   plus their mean bias over the scale, so a block of padding scores -inf and is never selected)
   are selected per head (modcompile/policies/selection.py:
   global / row threshold on the normalized mass, or top-k; own block kept; density guard);
4. the partition-level selection becomes kernel block lists in permuted order (a kernel block
   straddling two partition blocks belongs to both; text blocks attend and are attended by all);
5. ``attention`` permutes v and runs the block-sparse kernel on the permuted k and v with q in the
   original order and ``q_rows = perm``: the kernel reads each query row from its original token and
   writes out and the log-sum-exp there, so nothing is un-permuted afterwards (permutation traffic
   per call: write k' in the pooling pass, read v + write v'; no permuted q, no un-permutation of out
   and lse; v is not an input of the plan, so it cannot join the pooling pass). The torch path (CPU)
   computes the same values by permuting q and un-permuting around the reference. The backward
   (training) permutes all its inputs and un-permutes the gradients.

The first 25% of the denoising steps run dense (``config.warmup_steps`` overrides). Sites without a
usable video grid run dense and say why in ``modcompile.report()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from .. import cuda_graphs, dispatch
from ..kernels import partition as part_lib
from ..kernels import pooling
from .base import Plan, Policy, SiteContext, call_precision, like_dense, lists_from_mask, register_policy
from .selection import select_blocks

WARMUP_FRACTION = 0.25
_SEG_ROWS = 256
_MAX_GRAPHS = 64  # captured selection tails kept per policy (one per layout and pooled shape)


def parse_partition_blocks(value) -> dict:
    """``config.partition_blocks`` (dict or sorted items) -> {kind: shape} of the given kinds."""
    if value is None:
        return {}
    items = value.items() if isinstance(value, dict) else value
    out = {}
    for item in items:
        try:
            kind, shape = item
        except (TypeError, ValueError):
            raise ValueError(f"vmoba: partition_blocks entries must be (kind, shape), got {item!r}") from None
        if kind not in part_lib.KINDS:
            raise ValueError(f"vmoba: partition_blocks keys must be in {part_lib.KINDS}, got {kind!r}")
        out[kind] = part_lib.check_block_shape(kind, shape)
    return out


@lru_cache(maxsize=128)
def default_shape(grid: tuple, kind: str, block_size: int, text_tokens: int = 0,
                  text_position: str = "last") -> tuple:
    return part_lib.default_block_shape(grid, kind, block_size, text_tokens, text_position)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a CUDA graph key holds the layout itself
class Layout:
    """Everything a call needs about one partition, on one device (cached)."""

    partition: part_lib.Partition
    segments: pooling.Segments
    perm: torch.Tensor          # (N,) int32 on device
    inv: torch.Tensor           # (N,) int32 on device
    incidence: torch.Tensor     # (Mk, P) float32 0/1 on device
    text_blocks: torch.Tensor   # (Mk,) bool on device
    text_pairs: torch.Tensor    # (Mk, Mk) bool on device: the row or the column holds text
    pool_ids: torch.Tensor      # (video tokens,) int64 on device: partition block of each permuted video position
    block_sizes: torch.Tensor   # (P,) float32 on device: tokens per partition block
    video: tuple                # (first, end) permuted positions of the video tokens; stored, since
                                # reading them from the partition's tensor costs a scalar read per call

    @property
    def identity(self) -> bool:
        return self.partition.identity

    @cached_property  # the site's note, set on every call
    def description(self) -> str:
        p = self.partition
        return f"vmoba {p.kind} blocks {'x'.join(map(str, p.block))} ({p.num_blocks} per head)"


@lru_cache(maxsize=64)
def layout_for(grid: tuple, kind: str, shape: tuple, text_tokens: int, text_position: str,
               block_size: int, device: torch.device) -> Layout:
    align = part_lib.alignment_for(grid, kind, shape, block_size, text_tokens, text_position)
    partition = part_lib.cached_partition(grid, kind, shape, text_tokens, text_position, align)
    incidence, text = part_lib.kernel_incidence(partition, block_size)
    segments = pooling.make_segments(partition.perm, partition.starts, _SEG_ROWS, device)
    text = text.to(device)
    return Layout(partition, segments, partition.perm.to(device, torch.int32),
                  partition.inv.to(device, torch.int32), incidence.to(device, torch.float32), text,
                  text[:, None] | text[None, :],
                  partition.block_of_position()[slice(*partition.video_range)].to(device),
                  (partition.starts[1:] - partition.starts[:-1]).to(device, torch.float32),
                  partition.video_range)


def _use_triton(x: torch.Tensor) -> bool:
    return dispatch.use_triton(x) and pooling.triton_available(x)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


@dataclass
class Permuted:
    """What a sparse plan with a permuting layout hands its attention (``Plan.data``): the lists are
    in the layout's token order."""

    layout: Layout
    stash: tuple | None = None      # (key of k, permuted k) from the fused pass; the attention takes it

    def permuted_k(self, k: torch.Tensor) -> torch.Tensor | None:
        """The plan's permuted copy of ``k``, or None when it is gone or was made from another tensor.
        The attention drops it afterwards (:meth:`VmobaPolicy.attention_done`: its memory goes)."""
        stash = self.stash
        return stash[1] if stash is not None and stash[0] == _tensor_key(k) else None


@register_policy
class VmobaPolicy(Policy):
    name = "vmoba"

    def __init__(self, config):
        super().__init__(config)
        self.blocks = parse_partition_blocks(config.partition_blocks)
        self._graphs: dict = {}  # (id(layout), pooled shape, dtype, device) -> (layout, GraphedCall)
        # topk / density / partition_blocks are validated by the config schema (modcompile/config.py)

    def default_warmup(self, num_steps: int) -> int:
        return int(WARMUP_FRACTION * num_steps)

    # ------------------------------------------------------------------ geometry
    def block_shape(self, grid: tuple, kind: str, text_tokens: int = 0, text_position: str = "last") -> tuple:
        return self.blocks.get(kind) or default_shape(tuple(grid), kind, self.config.block_size, text_tokens,
                                                      text_position)

    def layout(self, ctx: SiteContext, n: int, device: torch.device) -> Layout | None:
        """The layout of this site, or None (and a note on the site) when the grid does not fit."""
        grid = ctx.info.grid
        if grid is None:
            ctx.state.note = "vmoba: dense, no video grid (not inferred or does not fit the sequence)"
            return None
        video = grid[0] * grid[1] * grid[2]
        if not 0 <= n - video < n:
            ctx.state.note = f"vmoba: dense, sequence {n} does not fit grid {tuple(grid)}"
            return None
        kind = part_lib.kind_for_layer(ctx.info.layer)
        return layout_for(tuple(grid), kind, self.block_shape(grid, kind, n - video, ctx.info.text_position), n - video,
                          ctx.info.text_position, self.config.block_size, device)

    # ------------------------------------------------------------------ plan
    def plan(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, key_bias=None) -> Plan:
        layout = self.layout(ctx, q.shape[2], q.device)
        if layout is None:
            return ctx.full_plan(q, k, why="no grid" if ctx.info.grid is None else "grid does not fit")
        if ctx.step < self.warmup_steps(ctx):
            ctx.state.note = layout.description + "; dense warm-up step"
            return ctx.full_plan(q, k, why="warm-up")
        ctx.state.note = layout.description
        masked, pool = key_bias is not None, ctx.outputs
        if pool is None:
            _, kp, q_pool, *pooled_k = self.permute_pool(q, k, layout, key_bias=key_bias)
            counts, indices = self.lists_fn(layout, q_pool, masked=masked)(q_pool, *pooled_k)
        else:  # replayable call: every output in a pooled buffer, the whole plan one CUDA graph
            counts, indices = ctx.output_lists(q, k)
            kp = None if layout.identity else pool.take(k.shape, k.dtype, k.device, heads_last=True)

            def fill():
                _, _, q_pool, *pooled_k = self.permute_pool(q, k, layout, key_bias=key_bias, out_k=kp)
                self.lists_fn(layout, q_pool, masked=masked)(q_pool, *pooled_k, out=(counts, indices))

            if cuda_graphs.enabled(q.device):
                key = ("vmoba plan", self, layout, cuda_graphs.tensors_key(q, k, key_bias, kp, counts, indices))
                cuda_graphs.SITE_PLANS.run(key, fill, q.device)
            else:
                fill()
        permuted = None if layout.identity else Permuted(layout, (_tensor_key(k), kp))
        return Plan(ctx.lists(counts, indices, q, k), dense=False, data=permuted, lists_are_outputs=pool is not None)

    def lists_fn(self, layout: Layout, q_pool: torch.Tensor, masked: bool = False):
        """``(q_pool, k_pool[, bias_pool]) -> (counts, indices)`` for this layout and pooled shape
        (``bias_pool`` on masked sites): on CUDA replayed from a CUDA graph after the first call
        (the selection is ~30 tiny kernels whose launches cost more host time than their GPU
        time), else :meth:`block_lists`."""
        scale = 1.0 / math.sqrt(q_pool.shape[-1])
        if not cuda_graphs.enabled(q_pool.device):
            return lambda qp, kp, *bp, out=None: cuda_graphs.copy_into(out, self.block_lists(qp, kp, layout, scale, *bp))
        key = (id(layout), tuple(q_pool.shape), q_pool.dtype, q_pool.device, masked)
        entry = self._graphs.get(key)
        if entry is None or entry[0] is not layout:  # `is`: an evicted layout's id may be reused
            if len(self._graphs) >= _MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            call = cuda_graphs.GraphedCall(lambda qp, kp, *bp: self.block_lists(qp, kp, layout, scale, *bp),
                                           name=f"the {layout.description} selection")
            entry = self._graphs[key] = (layout, call)
        return entry[1]

    def permute_pool(self, q, k, layout: Layout, key_bias=None, out_k=None):
        """``(None, permuted k or None, q_pool, k_pool)``: the attention kernel gathers q rows itself,
        so only k is permuted (and only when the permutation is not the identity; into ``out_k``
        when given). With ``key_bias`` (B, N): k pooled over the visible keys and a fifth output,
        the mean bias of each partition block (B, P), -inf for a block of padding
        (kernels/pooling.py)."""
        if _use_triton(q):
            return pooling.permute_pool(q, k, layout.segments, write_permuted=(False, not layout.identity),
                                        key_bias=key_bias, out_k=out_k)
        # torch path (CPU): pooling.permute_pool_ref's arithmetic with the layout's cached index tensors
        lo, hi = layout.video
        qp, kp = q.index_select(2, layout.perm), k.index_select(2, layout.perm)
        if out_k is not None and not layout.identity:
            kp = out_k.copy_(kp)

        def pool(x):
            B, H, _, D = x.shape
            total = torch.zeros(B, H, layout.block_sizes.numel(), D, dtype=torch.float32, device=x.device)
            total.index_add_(2, layout.pool_ids, x[:, :, lo:hi].float())
            return total / layout.block_sizes[:, None]

        if key_bias is None:
            pooled_k = (pool(kp),)
        else:
            pooled_k = pooling.masked_pool(kp, key_bias.index_select(1, layout.perm), layout.pool_ids, lo, hi,
                                           layout.block_sizes.numel())
        return (None, None if layout.identity else kp, pool(qp), *pooled_k)

    def select(self, scores: torch.Tensor, scale: float, hidden=None) -> torch.Tensor:
        c = self.config
        return select_blocks(scores, mode=c.selection, tau=c.tau, normalization=c.normalization, topk=c.topk,
                             density=c.density, min_density=c.min_density, max_density=c.max_density,
                             scale=scale, hidden=hidden)

    def select_partition(self, q_pool, k_pool, scale: float, bias_pool=None) -> torch.Tensor:
        """Partition-level selection (B, H, P, P) bool from the pooled blocks. ``bias_pool`` (B, P):
        each key block's mean bias over its visible keys, added in score units (a score is q . k,
        the logit that times ``scale``); -inf marks a block of padding, which is never selected."""
        scores = torch.matmul(q_pool, k_pool.transpose(-1, -2))
        if bias_pool is None:
            return self.select(scores, scale)
        hidden = bias_pool.isneginf()[:, None, None, :]
        scores = scores + (bias_pool / scale).masked_fill(hidden[:, 0, 0], 0.0)[:, None, None, :]
        return self.select(scores, scale, hidden=hidden)

    def block_lists(self, q_pool, k_pool, layout: Layout, scale: float, bias_pool=None):
        """Kernel block lists (permuted order) from the pooled blocks; width exactly Mk."""
        chosen = self.select_partition(q_pool, k_pool, scale, bias_pool)
        mask = part_lib.kernel_block_mask(chosen, layout.incidence, layout.text_pairs)
        return lists_from_mask(mask)

    # ------------------------------------------------------------------ attention
    def attention(self, ctx: SiteContext, q, k, v, plan: Plan, scale: float, key_bias=None, out=None, lse=None):
        """(out, lse) in the original order. Lists in a permuted order (``plan.data``, a
        :class:`Permuted`): k and v permuted, q gathered by the kernel (``q_rows``). Other plans (no
        grid, an identity permutation, full lists: dense plans such as warm-up steps of training,
        which do not depend on the token order) run as they are."""
        permuted = plan.data
        dense_rule = like_dense(ctx, plan)
        if permuted is None:
            return dispatch.attention_forward(q, k, v, plan.lists, scale, key_bias=key_bias, like_dense=dense_rule,
                                              precision=call_precision(ctx, plan), out=out, lse=lse)
        layout = permuted.layout
        kp = permuted.permuted_k(k)
        if kp is None:  # the plan's copy does not match (should not happen in a rewritten graph)
            kp = self.gather(k, layout.perm)
        vp = self.gather(v, layout.perm)
        if key_bias is not None:
            key_bias = key_bias.index_select(1, layout.perm)
        return dispatch.attention_forward(q, kp, vp, plan.lists, scale, q_rows=layout.perm, key_bias=key_bias,
                                          like_dense=dense_rule, precision=call_precision(ctx, plan), out=out, lse=lse)

    def attention_tensors(self, plan: Plan, k) -> tuple:
        permuted = plan.data
        return () if permuted is None else (permuted.layout.perm, permuted.permuted_k(k))

    def attention_done(self, plan: Plan) -> None:
        if plan.data is not None:
            plan.data.stash = None

    def attention_backward(self, ctx: SiteContext, grad_out, q, k, v, out, lse, plan: Plan, scale: float):
        """(dq, dk, dv) in the original order: the backward kernel runs on the permuted tensors with
        the lists the forward used."""
        if plan.data is None:
            return super().attention_backward(ctx, grad_out, q, k, v, out, lse, plan, scale)
        perm, inv = plan.data.layout.perm, plan.data.layout.inv
        from ..autograd import backward_grads  # already inside the opaque site op: no second dispatch
        dq, dk, dv = backward_grads(
            self.gather(grad_out, perm), self.gather(q, perm), self.gather(k, perm), self.gather(v, perm),
            self.gather(out, perm), lse.index_select(2, perm), plan.lists, scale)
        return self.gather(dq, inv), self.gather(dk, inv), self.gather(dv, inv)

    @staticmethod
    def gather(x, index, out=None):
        if _use_triton(x):
            return pooling.gather_rows(x, index, out=out)
        return pooling.gather_rows_ref(x, index, out=out)


__all__ = ["VmobaPolicy", "Layout", "Permuted", "layout_for", "lists_from_mask", "parse_partition_blocks"]
