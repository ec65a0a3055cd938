"""The interface between the runtime and a mask policy.

A policy decides, per site and per call, which key blocks each query block attends (``plan``) and,
when its plan asks for it, learns from the attention that just ran (``observe``). Policies never
touch the graph; the custom ops call them with the site's state.

Per call, the :class:`Plan` is the one channel from ``plan`` to ``attention`` and ``observe``: its
block lists, whether the call is dense or observes, and the policy's own per-call data.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from .. import dispatch
from ..config import SparsityConfig
from ..kernels.block_lists import BlockLists, full_block_lists, num_blocks
from ..kernels.block_lists import lists_from_mask  # noqa: F401  (vmoba imports it from here)
from ..sites import SiteInfo, SiteState


@dataclass
class Plan:
    """What a policy decided for one call, and everything the call's attention and observation need
    from its plan."""

    lists: BlockLists              # counts (B, H, Mq), indices (B, H, Mq, Mk): width fixed to Mk (the graph's fake shape)
    dense: bool                    # every block: the attention node may call dense SDPA
    observe: bool = False          # the observe node must run on this call
    why: str = ""                  # dense plans: a few words on why (report() status: "dense (warm-up)")
    data: Any = None               # the policy's own per-call data for its attention / observe
    lists_are_outputs: bool = False  # the lists were taken from ``SiteContext.outputs``: the graph gets them as they are
    copy_from: Any = None          # set by the plan op on the replayable path: (counts, indices) the attention
                                   # call copies into the graph's lists first, inside its CUDA graph

    def with_lists(self, lists: BlockLists) -> Plan:
        """This plan with other lists of the same shape (the graph hands the ops copies). A shallow
        copy: ``dataclasses.replace`` re-runs ``__init__``, a cost paid on every site call."""
        plan = object.__new__(type(self))
        plan.__dict__.update(self.__dict__)
        plan.lists = lists
        return plan


@dataclass
class SiteContext:
    """Everything a policy sees about one call of one site."""

    info: SiteInfo
    state: SiteState
    step: int                      # denoising step (per-site call count without step metadata)
    num_steps: int
    config: SparsityConfig
    outputs: Any = None            # a .buffers.BufferPool on the replayable path (CUDA inference): where a
                                   # policy may take the call's lists and its own outputs from
    training: bool = False         # the call's graph needs gradients: a valid lse for the backward

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def blocks(self, n: int) -> int:
        return num_blocks(n, self.config.block_size)

    def lists(self, counts: torch.Tensor, indices: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> BlockLists:
        """This call's :class:`BlockLists` of ``(counts, indices)`` (metadata only)."""
        return BlockLists(counts, indices, self.config.block_size, q.shape[2], k.shape[2])

    def output_lists(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised (counts, indices) of this call's shape from ``outputs``, for a policy that
        writes its lists in place (its plan then sets ``lists_are_outputs``)."""
        B, H = q.shape[:2]
        mq, mk = self.blocks(q.shape[2]), self.blocks(k.shape[2])
        return (self.outputs.take((B, H, mq), torch.int32, q.device),
                self.outputs.take((B, H, mq, mk), torch.int32, q.device))

    def full_plan(self, q: torch.Tensor, k: torch.Tensor, observe: bool = False, why: str = "", data=None) -> Plan:
        counts, indices = full_lists(q.shape[0], q.shape[1], self.blocks(q.shape[2]),
                                     self.blocks(k.shape[2]), q.device)
        return Plan(self.lists(counts, indices, q, k), dense=True, observe=observe, why=why, data=data)


@lru_cache(maxsize=64)
def full_lists(batch: int, heads: int, mq: int, mk: int, device: torch.device):
    """Cached full block lists: dense steps return the same tensors every call.

    Callers must not write into them (the ops treat block lists as read-only)."""
    return full_block_lists(batch, heads, mq, mk, device)


def block_token_counts(n: int, block_size: int, device=None) -> torch.Tensor:
    """(nb,) float32 tokens per block of an ``n``-token sequence (the last block may be ragged).
    Cached per (n, block_size, device): treat it as read-only."""
    return _block_token_counts(n, block_size, torch.device(device) if device is not None else torch.device("cpu"))


@lru_cache(maxsize=None)  # never evicted: captured CUDA graphs may hold the address (cuda_graphs.py)
def _block_token_counts(n: int, block_size: int, device: torch.device) -> torch.Tensor:
    nb = num_blocks(n, block_size)
    sizes = torch.full((nb,), float(block_size), device=device)
    sizes[-1] = n - (nb - 1) * block_size
    return sizes


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block's tokens, (B, H, nb, D) float32, from x (B, H, N, D); a ragged last
    block is averaged over its real tokens. Sums in float32 straight from x's storage (no float
    or padded copy of x: one pass over it)."""
    B, H, N, D = x.shape
    nb = num_blocks(N, block_size)
    full = N // block_size
    parts = []
    if full:
        parts.append(x[:, :, :full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32))
    if full < nb:
        parts.append(x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32))
    sums = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return sums / block_token_counts(N, block_size, x.device).view(nb, 1)


def masked_block_means(x: torch.Tensor, key_bias: torch.Tensor, block_size: int):
    """Block statistics over the keys a key bias does not hide (``-inf``): ``(means (B, H, nb, D)
    float32 of x over each block's visible keys, the mean bias over them (B, nb) (-inf for a block
    of hidden keys), visible keys per block (B, nb) float32)``. A block of hidden keys has mean 0
    and count 0. One masked copy of x (used on masked sites' observations only)."""
    B, H, N, D = x.shape
    nb = num_blocks(N, block_size)
    pad = nb * block_size - N
    visible = key_bias > float("-inf")
    count = F.pad(visible.float(), (0, pad)).view(B, nb, block_size).sum(-1)
    bias_sum = F.pad(torch.where(visible, key_bias.float(), 0.0), (0, pad)).view(B, nb, block_size).sum(-1)
    sums = F.pad(x * visible[:, None, :, None].to(x.dtype), (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    denom = count.clamp_min(1.0)
    return (sums.sum(3, dtype=torch.float32) / denom[:, None, :, None],
            torch.where(count > 0, bias_sum / denom, float("-inf")), count)


def like_dense(ctx: SiteContext, plan: Plan) -> bool:
    """Whether this call applies the dense non-finite rule (``dispatch.nonfinite_poison``, written by
    the kernel's epilogue)."""
    return ctx.config.nonfinite == "dense" and not plan.dense


def call_precision(ctx: SiteContext, plan: Plan) -> str:
    """The call's ``precision`` for :func:`dispatch.attention_forward`: ``"fp8"`` for inference calls
    that the options put on the fp8 kernel (sparse ones with ``precision="fp8"``, dense ones with
    ``fp8_dense``), else ``"auto"``."""
    if ctx.training:
        return "auto"
    return "fp8" if (ctx.config.fp8_dense if plan.dense else ctx.config.precision == "fp8") else "auto"


class Policy:
    name = "base"
    # Whether plans may ask for the observe op: the rewrite pass leaves it out of the graph otherwise.
    observes = False

    def __init__(self, config: SparsityConfig):
        self.config = config

    def plan(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, key_bias=None) -> Plan:
        """This call's block lists. ``key_bias`` (B, Nk) float32: the site's key-padding mask as an
        additive bias (``-inf``: a hidden key), given on masked sites only."""
        raise NotImplementedError

    def attention(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan,
                  scale: float, key_bias=None, out=None, lse=None):
        """The block-sparse attention of ``plan.lists`` (the call's plan, with the lists the graph
        passed); returns ``(out, lse)`` in the original token order. Policies whose blocks are not
        contiguous in that order (VMoBA's 2D/3D partitions) permute around the kernel here (k, v and
        ``key_bias`` (B, Nk) alike), with what their plan left in ``plan.data``. With
        ``nonfinite="dense"`` sparse calls pass ``like_dense``: a NaN / Inf in a key or value block
        a row skips still makes that row NaN, as dense SDPA would. ``out`` / ``lse``: where to write
        (allocated when None)."""
        return dispatch.attention_forward(q, k, v, plan.lists, scale, key_bias=key_bias,
                                          like_dense=like_dense(ctx, plan), precision=call_precision(ctx, plan),
                                          out=out, lse=lse)

    def attention_tensors(self, plan: Plan, k: torch.Tensor) -> tuple:
        """The tensors :meth:`attention` reads besides its arguments (from ``plan.data``): a CUDA graph
        of the call is keyed by their addresses."""
        return ()

    def attention_done(self, plan: Plan) -> None:
        """After the call's attention (run or replayed): drop what ``plan.data`` held only for it."""

    def attention_backward(self, ctx: SiteContext, grad_out, q, k, v, out, lse, plan: Plan, scale: float):
        """(dq, dk, dv) of :meth:`attention` for the same plan (training). Policies that permute
        in :meth:`attention` permute here too."""
        from ..autograd import backward_grads  # already inside the opaque site op: no second dispatch
        return backward_grads(grad_out, q, k, v, out, lse, plan.lists, scale)

    def observe(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, plan: Plan,
                key_bias=None) -> None:
        """Called after the attention of a call whose plan had ``observe=True`` (``key_bias`` as
        in :meth:`plan`; ``lse`` includes it). The softmax scale is the site's (``ctx.info.scale``)."""

    def warmup_steps(self, ctx: SiteContext) -> int:
        """Dense steps at the start of a run (config override, else the policy's default)."""
        if self.config.warmup_steps is not None:
            return self.config.warmup_steps
        return self.default_warmup(ctx.num_steps)

    def default_warmup(self, num_steps: int) -> int:
        return 0


_POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    _POLICIES[cls.name] = cls
    return cls
