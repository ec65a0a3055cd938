"""A networkx view of an FX graph, for reachability questions in the passes."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g
