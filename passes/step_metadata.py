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


def _scalar_like(node: fx.Node) -> bool:
    val = example_value(node)
    return isinstance(val, torch.Tensor) and val.dim() <= 2 and val.numel() <= 64 and (
        val.dtype.is_floating_point or val.dtype in (torch.int32, torch.int64))


def _is_embedding_op(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _EMBEDDING_OPS


def find_timestep_input(gm: fx.GraphModule) -> fx.Node | None:
    """The timestep placeholder: by name first, else the small float input that feeds a
    sinusoidal embedding (sin/cos/exp reachable from it)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and _scalar_like(n)]
    for node in placeholders:
        if _NAME.search(node.name):
            return node
    if not placeholders:
        return None
    g = to_digraph(gm.graph)
    for node in placeholders:
        if any(_is_embedding_op(d) for d in nx.descendants(g, node)):
            return node
    return None
