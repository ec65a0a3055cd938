"""The interface between the runtime and a mask policy.

A policy decides, per site and per call, which key blocks each query block attends (``plan``) and,
when its plan asks for it, learns from the attention that just ran (``observe``). Policies never
touch the graph; the custom ops call them with the site's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config import SparsityConfig
from ..kernels.reference import num_blocks
from ..runtime import SiteInfo, SiteState


@dataclass
class Plan:
    kv_counts: torch.Tensor        # (B, H, Mq) int32
    kv_indices: torch.Tensor       # (B, H, Mq, Mk) int32 (width fixed to Mk: the graph's fake shape)
    dense: bool                    # every block: the attention node may call dense SDPA
    observe: bool = False          # the observe node must run on this call


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

    def full_plan(self, q: torch.Tensor, k: torch.Tensor, observe: bool = False) -> Plan:
        counts, indices = full_lists(q.shape[0], q.shape[1], self.blocks(q.shape[2]),
                                     self.blocks(k.shape[2]), q.device)
        return Plan(counts, indices, dense=True, observe=observe)


@lru_cache(maxsize=64)
def full_lists(batch: int, heads: int, mq: int, mk: int, device: torch.device):
    """Cached full block lists: dense steps return the same tensors every call.

    Callers must not write into them (the ops treat block lists as read-only)."""
    counts = torch.full((batch, heads, mq), mk, dtype=torch.int32, device=device)
    indices = torch.arange(mk, dtype=torch.int32, device=device).expand(batch, heads, mq, mk).contiguous()
    return counts, indices


class Policy:
    name = "base"

    def __init__(self, config: SparsityConfig):
        self.config = config

    def plan(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor) -> Plan:
        raise NotImplementedError

    def attention(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_counts: torch.Tensor, kv_indices: torch.Tensor, scale: float):
        """The block-sparse attention of a non-dense call; returns ``(out, lse)`` in the original
        token order. Policies whose blocks are not contiguous in that order (VMoBA's 2D/3D
        partitions) permute around the kernel here."""
        from ..ops import attention_forward
        return attention_forward(q, k, v, kv_counts, kv_indices, ctx.block_size, scale)

    def attention_backward(self, ctx: SiteContext, grad_out, q, k, v, out, lse, kv_counts, kv_indices,
                           scale: float):
        """(dq, dk, dv) of :meth:`attention` for the same lists (training). Policies that permute
        in :meth:`attention` permute here too."""
        return torch.ops.modcompile.block_sparse_attention_backward(
            grad_out, q, k, v, out, lse, kv_counts, kv_indices, ctx.block_size, scale)

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
    from . import dense  # noqa: F401  (registers the built-in policies)
    try:
        from . import vmoba  # noqa: F401
    except ImportError:
        pass
    try:
        from . import mod  # noqa: F401
    except ImportError:
        pass
    if config.policy not in _POLICIES:
        raise ValueError(f"modsparse: policy {config.policy!r} is not available "
                         f"(have {sorted(_POLICIES)})")
    return _POLICIES[config.policy](config)
