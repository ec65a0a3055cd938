"""The interface between the runtime and a mask policy.

A policy decides, per site and per call, which key blocks each query block attends (``plan``) and,
when its plan asks for it, learns from the attention that just ran (``observe``). Policies never
touch the graph; the custom ops call them with the site's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .. import dispatch
from ..config import SparsityConfig
from ..kernels.reference import full_block_lists, num_blocks
from ..runtime import SiteInfo, SiteState


@dataclass
class Plan:
    kv_counts: torch.Tensor        # (B, H, Mq) int32
    kv_indices: torch.Tensor       # (B, H, Mq, Mk) int32 (width fixed to Mk: the graph's fake shape)
    dense: bool                    # every block: the attention node may call dense SDPA
    observe: bool = False          # the observe node must run on this call
    why: str = ""                  # dense plans: a few words on why (report() status: "dense (warm-up)")


@dataclass
class SiteContext:
    """Everything a policy sees about one call of one site."""

    info: SiteInfo
    state: SiteState
    step: int                      # denoising step (per-site call count without step metadata)
    num_steps: int
    config: SparsityConfig

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def blocks(self, n: int) -> int:
        return num_blocks(n, self.config.block_size)

    def full_plan(self, q: torch.Tensor, k: torch.Tensor, observe: bool = False, why: str = "") -> Plan:
        counts, indices = full_lists(q.shape[0], q.shape[1], self.blocks(q.shape[2]),
                                     self.blocks(k.shape[2]), q.device)
        return Plan(counts, indices, dense=True, observe=observe, why=why)


@lru_cache(maxsize=64)
def full_lists(batch: int, heads: int, mq: int, mk: int, device: torch.device):
    """Cached full block lists: dense steps return the same tensors every call.

    Callers must not write into them (the ops treat block lists as read-only)."""
    return full_block_lists(batch, heads, mq, mk, device)


def lists_from_mask(mask: torch.Tensor):
    """(counts int32 (..., Mq), indices int32 (..., Mq, Mk)) of a bool block mask, on device, without
    a host sync: selected blocks first in increasing order, then the skipped ones (ignored).

    One sort of ``id`` (selected) / ``Mk + id`` (not selected), then ``% Mk``: 4 ops. The constants
    are cached device tensors (a Python scalar in ``torch.where`` would be copied host -> device on
    every call)."""
    mk = mask.shape[-1]
    ids, shifted = _list_keys(mk, mask.device)
    counts = mask.sum(-1, dtype=torch.int32)
    ordered = torch.where(mask, ids, shifted).sort(dim=-1).values
    return counts, ordered.remainder_(mk)


@lru_cache(maxsize=None)  # never evicted: captured CUDA graphs hold the addresses (cuda_graphs.py)
def _list_keys(mk: int, device: torch.device):
    ids = torch.arange(mk, device=device, dtype=torch.int32)
    return ids, ids + mk


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


def like_dense(ctx: SiteContext) -> bool:
    """Whether this call applies the dense non-finite rule (``dispatch.nonfinite_poison``, written by
    the kernel's epilogue)."""
    return ctx.config.nonfinite == "dense" and not ctx.state.dense_now


class Policy:
    name = "base"

    def __init__(self, config: SparsityConfig):
        self.config = config

    def plan(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor) -> Plan:
        raise NotImplementedError

    def attention(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_counts: torch.Tensor, kv_indices: torch.Tensor, scale: float, key_bias=None):
        """The block-sparse attention of a non-dense call; returns ``(out, lse)`` in the original
        token order. Policies whose blocks are not contiguous in that order (VMoBA's 2D/3D
        partitions) permute around the kernel here (k, v and ``key_bias`` (B, Nk) alike). With
        ``nonfinite="dense"`` sparse calls pass ``like_dense``: a NaN / Inf in a key or value block
        a row skips still makes that row NaN, as dense SDPA would."""
        return dispatch.attention_forward(q, k, v, kv_counts, kv_indices, ctx.block_size, scale, key_bias=key_bias,
                                 like_dense=like_dense(ctx))

    def attention_backward(self, ctx: SiteContext, grad_out, q, k, v, out, lse, kv_counts, kv_indices,
                           scale: float):
        """(dq, dk, dv) of :meth:`attention` for the same lists (training). Policies that permute
        in :meth:`attention` permute here too."""
        from ..autograd import backward_grads  # already inside the opaque site op: no second dispatch
        return backward_grads(grad_out, q, k, v, out, lse, kv_counts, kv_indices, ctx.block_size, scale)

    def observe(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> None:
        """Called after the attention of a call whose plan had ``observe=True``."""

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


def make_policy(config: SparsityConfig) -> Policy:
    # Importing the built-in policies registers them; here, not at the top, because they import this module.
    from . import dense, mod, vmoba  # noqa: F401
    if config.policy not in _POLICIES:
        raise ValueError(f"modsparse: policy {config.policy!r} is not available "
                         f"(have {sorted(_POLICIES)})")
    return _POLICIES[config.policy](config)
