"""Find the graph input that carries the denoising step (diffusers passes ``timestep``)."""
from __future__ import annotations

import re

import networkx as nx
import torch
import torch.fx as fx

from .attention_sites import example_value
from .graph_view import to_digraph

# Dynamo names placeholders after the argument: L_timestep_, l_timestep_, L_kwargs_timestep_ ...
_NAME = re.compile(r"(^|_)(timesteps?|t|sigmas?|noise_level)(_|$)", re.IGNORECASE)
_EMBEDDING_OPS = {torch.sin, torch.cos, torch.exp, torch.Tensor.sin, torch.Tensor.cos, torch.Tensor.exp, "sin", "cos", "exp"}


def _timestep_like(node: fx.Node, small: bool = True) -> bool:
    """A float or int tensor of at most 2 dims; ``small``: at most 64 entries (a batch of scalars).
    Inputs named like a timestep may be larger: per-token (Wan2.2 TI2V) or per-frame timesteps."""
    val = example_value(node)
    return isinstance(val, torch.Tensor) and val.dim() <= 2 and (not small or val.numel() <= 64) and (
        val.dtype.is_floating_point or val.dtype in (torch.int32, torch.int64))


def _is_weight(node: fx.Node) -> bool:
    """A module's parameter or buffer lifted to a graph input (e.g. a RoPE frequency table)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source is not None and any(s in source.name for s in ("_parameters", "_buffers"))


def _is_embedding_op(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _EMBEDDING_OPS


def find_timestep_input(gm: fx.GraphModule) -> fx.Node | None:
    """The timestep placeholder: by name first, else the small float input that feeds a
    sinusoidal embedding (sin/cos/exp reachable from it). A named input larger than a batch of
    scalars (per-token or per-frame timesteps) must feed such an embedding too: a regionally
    compiled block's ``timestep`` argument may be its adaLN modulation (Latte's
    ``BasicTransformerBlock``), whose values do not follow the schedule."""
    g = None

    def feeds_embedding(node):
        nonlocal g
        g = g or to_digraph(gm.graph)
        return any(_is_embedding_op(d) for d in nx.descendants(g, node))

    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and not _is_weight(n)]
    for node in inputs:
        # not a weight: Cosmos' learnable position table is named pos_emb_t
        if _NAME.search(node.name) and _timestep_like(node, small=False) and (
                _timestep_like(node) or feeds_embedding(node)):
            return node
    # small inputs first (a batch of scalars), then per-token or per-frame ones
    placeholders = [n for n in inputs if _timestep_like(n)]
    placeholders += [n for n in inputs if n not in placeholders and _timestep_like(n, small=False)]
    return next((n for n in placeholders if feeds_embedding(n)), None)
