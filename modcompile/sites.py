"""What the runtime records per attention site: the compile-time facts of a site (:class:`SiteInfo`)
and the mutable state of one (site instance, pass) (:class:`SiteState`). Plain records: the
registry (modcompile/runtime.py) creates and finds them, the policies read and write them."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .config import SparsityConfig


@dataclass
class SiteInfo:
    """What the compiler pass learnt about one SDPA call site (static across steps)."""

    key: str
    layer: int                      # attention layer index: order of registration within its scope
    module_path: str
    config: SparsityConfig
    status: str                     # "sparse" (rewritten) or "dense" (left as SDPA)
    reason: str = ""                # why a site stayed dense
    seq_len: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    dtype: str | None = None
    grid: tuple | None = None       # latent (T, H, W) of the video tokens, when known
    text_tokens: int = 0            # joint-attention text tokens (the rest of the sequence)
    ordinal: int = 0                # index among the sites of one module
    module_rel: str = ""            # the site's module path below the compiled frame's module
    anchor_path: str | None = None  # path of the anchor parameter below the compiled frame ("" none)
    model: str = ""                 # the model instance a site instance belongs to (report)
    spec_key: str = ""              # a site instance's compiled site (its key before it ran)
    inferred_text_position: str | int | None = None  # the model's (modcompile/layout.py), when known
    mask: str = ""                  # the attn_mask a sparse site applies in the kernel (text padding)
    scale: float | None = None      # softmax scale of a rewritten site: its attention op's argument (observe has none)

    @property
    def text_position(self) -> str | int:
        """Where joint-attention text sits: the option when given, else the model's, else last."""
        return self.config.text_position or self.inferred_text_position or "last"


@dataclass
class SiteState:
    """Mutable state of one (site, pass): what the policy remembers and what it used last."""

    info: SiteInfo
    pass_index: int
    policy_state: Any = None
    context: Any = None             # the policy's SiteContext of the last plan (policies/base.py)
    plan: Any = None                # the last plan (policies/base.py): read by its attention and observe ops
    steps_seen: int = 0
    last_step: int = -1
    geometry: tuple | None = None   # (seq_len, grid) of the last call: policy state is per geometry
    note: str = ""                  # the policy's word on this site (e.g. why it planned dense), shown by report()
    sparse_calls: int = 0           # calls whose plan was not dense (report(): status "sparse" once > 0)
    dense_why: str = ""             # the last dense plan's reason (report(): "dense (warm-up)")

    density_sum: Any = None         # 0-dim float32 device tensor: the last sparse plan's listed blocks
    density_blocks: int = 0         # ... out of this many
    density_of: Any = None          # weak reference to the counts density_sum was taken from
    resolved_info: tuple | None = None  # (info, call fields, info with them): Registry.call_info's last answer

    def record_density(self, plan, now: bool = True) -> None:
        """Keep a sparse plan's block density, but not its lists: those go after the call's attention
        (``ops.sparse_attention``), so that nothing of one step outlives it and the next step's
        tensors get the same addresses (the site calls' CUDA graphs are keyed by them). One small
        reduction per sparse plan with new lists, into a buffer made once; ``now=False``: the
        caller runs it (:meth:`sum_density`) inside the call's CUDA graph instead."""
        if plan.dense:
            return
        counts = plan.lists.counts
        if self.density_sum is None or self.density_sum.device != counts.device:
            self.density_sum = torch.zeros((), dtype=torch.float32, device=counts.device)
        self.density_blocks = counts.numel() * plan.lists.width
        if not now:
            self.density_of = None
        elif self.density_of is None or self.density_of() is not counts:  # not the same lists again (MOD)
            self.density_of = weakref.ref(counts)
            self.sum_density(counts)

    def lists_rewritten(self) -> None:
        """A policy rewrote its list buffers in place (MOD at a refresh): the same counts tensor
        now holds other lists, so the next plan's density is summed again."""
        self.density_of = None

    def sum_density(self, counts) -> None:
        torch.sum(counts, dim=tuple(range(counts.dim())), dtype=torch.float32, out=self.density_sum)

    @property
    def density(self):
        """Block density of the last call's lists (1.0 for dense plans; a 0-dim device tensor
        otherwise, read by report())."""
        if self.plan is None:
            return None
        return 1.0 if self.plan.dense else self.density_sum / self.density_blocks


__all__ = ["SiteInfo", "SiteState"]
