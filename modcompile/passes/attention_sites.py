"""Find the SDPA calls of a Dynamo graph and decide which can run block-sparse."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_view import example_value, hint
from .masks import KeyMask, key_padding_mask

# Dynamo records F.scaled_dot_product_attention as this builtin, positional or keyword args alike.
SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# flex_attention, as Dynamo records it (a higher-order op: q, k, v, score_mod, block mask, ...). Those
# calls carry the model's own mask and stay as written; they are listed so that report() says so.
FLEX_TARGETS = {t for t in (getattr(torch.ops.higher_order, "flex_attention", None),) if t is not None}
FLEX_REASON = ("flex_attention (not SDPA): runs as written, with the model's block mask if it has one; "
               "modsparse rewrites SDPA calls only")


@dataclass
class AttentionSite:
    node: fx.Node
    args: dict                      # SDPA arguments by name (defaults filled in)
    module_path: str
    ordinal: int                    # index among the sites of the same module path
    eligible: bool = False
    reason: str = ""
    seq_len: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    key_mask: KeyMask | None = None  # a text-padding mask the kernel applies (passes/masks.py)
    flex: bool = False              # a flex_attention call (listed, never rewritten)

    @property
    def local_key(self) -> str:
        # flex calls count apart: another graph of the same frame (Wan-Animate-2's reference pass) may
        # hold an SDPA site where this one holds a flex call, and the two must not share a key
        return f"{self.module_path}#{'flex' if self.flex else ''}{self.ordinal}"


def _sdpa_args(node: fx.Node) -> dict:
    args = dict(zip(SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    for name, value in defaults.items():
        args.setdefault(name, value)
    return args


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\[['\"][^'\"]+['\"]\]\.?", "", str(path))  # Dynamo's root: L['self']
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    path = re.sub(r"(__dict__\.)?_modules\.", "", path).strip(".")  # Dynamo's spelling of submodules
    return path or "<root>"


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    sites, seen = [], {}
    for node in gm.graph.nodes:
        flex = node.op == "call_function" and node.target in FLEX_TARGETS
        if flex or node.op == "call_function" and node.target in SDPA_TARGETS:
            path = module_path(node)
            ordinal = seen.get((path, flex), 0)
            seen[(path, flex)] = ordinal + 1
            args = dict(zip(("query", "key", "value"), node.args)) if flex else _sdpa_args(node)
            sites.append(AttentionSite(node=node, args=args, module_path=path, ordinal=ordinal, flex=flex))
    return sites


def check_eligibility(site: AttentionSite, min_seq_len: int, head_dim_ok=None) -> AttentionSite:
    """Fill in shapes and decide; every ineligible site gets the reason it stays dense."""
    a = site.args
    q, k, v = (example_value(a[n]) for n in ("query", "key", "value"))
    site.eligible, site.reason = False, ""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        site.reason = "q/k/v shapes unknown at compile time"
        return site
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        site.reason = f"q/k/v are not (B, H, N, D) (rank {q.dim()})"
        return site
    if any(hint(d) is None for t in (q, k, v) for d in t.shape):
        site.reason = "q/k/v sizes are data-dependent at compile time (no size hint)"
        return site
    site.heads, site.seq_len, site.head_dim = hint(q.shape[1]), hint(q.shape[2]), hint(q.shape[3])
    site.dtype, site.device = q.dtype, q.device
    if site.flex:
        site.reason = FLEX_REASON
        return site
    mask, dropout = a["attn_mask"], a["dropout_p"]
    site.key_mask = key_padding_mask(mask, hint(q.shape[0]), hint(k.shape[2])) if mask is not None else None
    if mask is not None and site.key_mask is None:
        site.reason = "attn_mask given (only key-padding masks run block-sparse, passes/masks.py)"
    elif site.key_mask is not None and any(getattr(t, "requires_grad", False) for t in (q, k, v)):
        site.reason = "attn_mask with gradients (the backward kernels take no key mask)"
    elif isinstance(dropout, fx.Node) or dropout != 0.0:
        site.reason = "dropout_p != 0"
    elif isinstance(a["is_causal"], fx.Node) or a["is_causal"]:
        site.reason = "is_causal=True"
    elif isinstance(a["scale"], fx.Node):
        site.reason = "scale is a tensor"
    elif a["enable_gqa"] or hint(k.shape[1]) != site.heads:
        site.reason = "grouped-query attention (k/v heads differ from q heads)"
    elif hint(k.shape[2]) != site.seq_len:
        site.reason = f"cross-attention (q length {site.seq_len} != k/v length {hint(k.shape[2])})"
    elif hint(v.shape[3]) != site.head_dim or hint(k.shape[3]) != site.head_dim:
        site.reason = "v or k head_dim differs from q"
    elif q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        site.reason = f"dtype {q.dtype} (supported: float16, bfloat16, float32, the same for q/k/v)"
    elif head_dim_ok is not None and (why := head_dim_ok(site.head_dim, q.device, q.dtype)):
        site.reason = why
    elif site.seq_len < min_seq_len:
        site.reason = f"sequence {site.seq_len} < min_seq_len {min_seq_len}"
    else:
        site.eligible = True
    return site
