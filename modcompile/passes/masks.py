"""Attention masks that hide keys only (joint-attention text padding): those run block-sparse.

Video DiTs with joint attention pad the text tokens of each prompt to a fixed length and hide the
padding with an ``attn_mask``. Two forms occur in diffusers' models:

- a key mask, broadcast over heads and queries: ``(B, 1, 1, N)`` (HunyuanVideo), or any shape
  that broadcasts to ``(B, H, N, N)`` with size 1 on the head and query dims, bool or float;
- keys x keys, ``m & m.transpose(2, 3)`` of a key mask ``m`` repeated over the query dim
  (HunyuanVideo-1.5): the same key mask, and padded query rows attend nothing (SDPA writes 0).

Both become a ``(B, N)`` float32 key bias that the kernel adds to the scores (``-inf`` removes a
key, as a ragged tail is removed), plus, for the second form, zeroed padded query rows. Any other
mask stays dense SDPA with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_view import example_value, hint

_AND = {operator.and_, torch.logical_and, torch.bitwise_and, torch.Tensor.logical_and, torch.Tensor.bitwise_and,
        torch.Tensor.__and__, "__and__", "logical_and", "bitwise_and"}
_BROADCAST = {"repeat", "expand", torch.Tensor.repeat, torch.Tensor.expand}


@dataclass
class KeyMask:
    keys: fx.Node                  # a mask of the keys only: broadcasts to (B, 1, 1, Nk)
    zero_padded_rows: bool         # keys x keys form: query rows of hidden keys come out 0

    @property
    def description(self) -> str:
        return "key-padding mask" + (" (keys x keys)" if self.zero_padded_rows else "")


def _target(node) -> object:
    return node.target if isinstance(node, fx.Node) and node.op in ("call_function", "call_method") else None


def _is_key_only(val, batch: int, nk: int) -> bool:
    """Broadcasts to (B, H, Nq, Nk) with size 1 on the head and query dims."""
    if not isinstance(val, torch.Tensor) or not (1 <= val.dim() <= 4) or hint(val.shape[-1]) != nk:
        return False
    if not (val.dtype == torch.bool or val.dtype.is_floating_point):
        return False
    lead = [hint(s) for s in val.shape[:-1]]
    return all(s == 1 for s in lead[-2:]) and (len(lead) < 3 or lead[-3] in (1, batch))


def _strip_bool(node):
    """``x.bool()`` / ``x.to(torch.bool)`` of a bool tensor: the same values."""
    while _target(node) in ("bool", "to", torch.Tensor.bool) and isinstance(node.args[0], fx.Node):
        val = example_value(node.args[0])
        if not (isinstance(val, torch.Tensor) and val.dtype == torch.bool):
            break
        node = node.args[0]
    return node


def _transposes_queries_keys(node, of) -> bool:
    if _target(node) not in ("transpose", torch.transpose, torch.Tensor.transpose) or node.args[0] is not of:
        return False
    dims = sorted(d % 4 for d in node.args[1:3] if isinstance(d, int))
    return dims == [2, 3]


def _outer_keys(node, batch: int, nk: int):
    """``a & a.transpose(2, 3)`` with ``a`` a key mask repeated over queries: the key mask."""
    node = _strip_bool(node)
    if _target(node) not in _AND or len(node.args) != 2:
        return None
    for a, b in (node.args, node.args[::-1]):
        a, b = _strip_bool(a), _strip_bool(b)
        if not _transposes_queries_keys(b, a) or _target(a) not in _BROADCAST:
            continue
        source = a.args[0]
        if _is_key_only(example_value(source), batch, nk) and example_value(source).dtype == torch.bool:
            return source
    return None


def key_padding_mask(mask, batch: int, nk: int) -> KeyMask | None:
    """The site's mask as a key mask, or None when it is not one of the forms above."""
    if not isinstance(mask, fx.Node):
        return None
    if _is_key_only(example_value(mask), batch, nk):
        return KeyMask(keys=mask, zero_padded_rows=False)
    keys = _outer_keys(mask, batch, nk)
    return None if keys is None else KeyMask(keys=keys, zero_padded_rows=True)


# ----------------------------------------------------------------------------- graph functions

def key_bias(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, Nk) float32 additive bias of a key mask (bool: 0 kept, -inf hidden; float: itself)."""
    nk = mask.shape[-1]
    m = mask.reshape(-1, nk).expand(q.shape[0], nk)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(torch.float32)


def zero_padded_rows(out: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``out`` (B, H, N, D) with the rows of hidden tokens set to 0, as SDPA leaves a query row
    whose keys are all masked."""
    keep = keys.reshape(-1, 1, keys.shape[-1], 1)
    return torch.where(keep, out, out.new_zeros(()))
