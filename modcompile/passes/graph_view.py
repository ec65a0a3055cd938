"""Views of an FX graph for the passes: node values at compile time, and a networkx graph for
reachability questions."""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def example_value(arg):
    """A node's value at compile time (a fake tensor, a SymInt ...); non-nodes are themselves."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def hint(n) -> int | None:
    """A concrete size for decisions: the hint of a symbolic size (no new guard); None for a
    data-dependent size, which has no hint (e.g. after ``nonzero`` with
    ``capture_dynamic_output_shape_ops``)."""
    if isinstance(n, torch.SymInt):
        if n.node.hint is not None:
            return int(n.node.hint)
        try:
            return int(n.node.shape_env.size_hint(n.node.expr))
        except GuardOnDataDependentSymNode:
            return None
    return int(n)
