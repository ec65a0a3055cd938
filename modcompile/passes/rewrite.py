"""The modsparse graph rewrite: SDPA sites -> plan / sparse attention / observe custom ops."""
from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from ..kernels._common import attention_path
from ..owners import source_path
from ..policies import policy_observes
from ..runtime import REGISTRY, compiled_frame
from ..sites import SiteInfo
from . import masks
from .attention_sites import AttentionSite, check_eligibility, example_value, find_attention_sites, module_path
from .step_metadata import find_timestep_input
from .video_grid import infer_video_grid, patch_embedding, text_tokens_for

log = logging.getLogger("modcompile")


def _support_check(block_size: int):
    """The eligibility hook: '' when a block-sparse path can run the site's head_dim, dtype and
    device at this block size (the Triton kernel, or the torch reference where that is the
    device's path), else why not (``kernels._common.attention_path`` decides)."""
    def check(head_dim: int, device: torch.device, dtype: torch.dtype) -> str:
        path, why = attention_path(device, dtype, head_dim, block_size)
        return why if path == "none" else ""
    return check


def _needs_grad(site: AttentionSite) -> bool:
    return any(getattr(example_value(site.args[n]), "requires_grad", False) for n in ("query", "key", "value"))


def rewrite_attention(gm: fx.GraphModule, config, scope: str) -> list[SiteInfo]:
    """Rewrite the eligible SDPA calls of ``gm`` in place; returns every site, rewritten or not."""
    graph = gm.graph
    sites = find_attention_sites(gm)
    grid = config.video_grid or infer_video_grid(gm)
    grid_args = _grid_args(graph, config, patch_embedding(gm) if sites else None)
    # Also in graphs without a site: after a graph break the timestep may reach another graph.
    timestep = find_timestep_input(gm)
    token = None
    if timestep is not None:
        with graph.inserting_after(timestep):
            token = graph.call_function(torch.ops.modcompile.step.default, (timestep,))

    infos = _rewrite_sites(gm, sites, config, scope, token, grid, grid_args)
    infos += _rewrite_nested_regions(gm, config, scope, token, grid)
    graph.lint()
    gm.recompile()
    return infos


def _rewrite_nested_regions(gm: fx.GraphModule, config, scope: str, token, grid) -> list[SiteInfo]:
    """Sites inside ``torch.compiler.nested_compile_region`` subgraphs: one subgraph serves every
    call of the region (each layer of a block class), like a regionally compiled block. Each
    subgraph input gets the source of what its first call passes (the anchor parameter's path,
    relative to that call's module), and the step token becomes one more input of every call."""
    infos, calls = [], {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "invoke_subgraph" \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            calls.setdefault(node.args[0].target, []).append(node)
    for target, nodes in calls.items():
        sub = getattr(gm, target)
        prefix = module_path(nodes[0])
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for placeholder, operand in zip(inputs, nodes[0].args[2:]):
            source = _source_name(operand)
            if source is not None:
                placeholder.meta["modcompile_source"] = source
                placeholder.meta["modcompile_prefix"] = prefix
                placeholder.meta["modcompile_example"] = _example(operand)
        sites = find_attention_sites(sub)
        if not sites:
            continue
        sub_token = None
        if token is not None:
            with sub.graph.inserting_after(inputs[-1]):
                sub_token = sub.graph.placeholder("modsparse_step_token")
            for call in nodes:
                call.args = (*call.args, token)
        infos += _rewrite_sites(sub, sites, config, scope, sub_token, grid,
                                tuple(config.video_grid) if config.video_grid else (-1, -1, -1), prefix=prefix,
                                calls=[module_path(n) for n in nodes])
        sub.graph.lint()
        sub.recompile()
    return infos


def _rewrite_sites(gm: fx.GraphModule, sites, config, scope: str, token, grid, grid_args,
                   prefix: str = "", calls: list | None = None) -> list[SiteInfo]:
    """Register every site of ``gm`` and replace the eligible ones. ``prefix``: the module path of
    the call that the graph's module paths start with (a nested region's first call); ``calls``:
    the module paths of all of a nested region's calls (the instances of its dense sites)."""
    graph = gm.graph
    infos, misfits = [], {}
    support = _support_check(config.block_size)
    for site in sites:
        check_eligibility(site, config.min_seq_len, support)
        text = text_tokens_for(site.seq_len, grid) if site.seq_len and not site.flex else None
        if site.eligible and config.video_grid is not None and text is None:
            site.eligible, site.reason = False, _grid_misfit(site.seq_len, config.video_grid)
            misfits.setdefault(site.reason, []).append(site.local_key)
        anchor, anchor_path = _anchor(site, prefix)
        rel = "" if site.module_path == "<root>" else _below(site.module_path, prefix)
        frame = compiled_frame(_example(anchor), anchor_path)   # one stack walk: the key and the dense rows
        info = REGISTRY.register_site(SiteInfo(
            key=f"{scope}/{_frame_class(frame, calls)}{site.local_key}", layer=-1, module_path=site.module_path,
            config=config,
            ordinal=site.ordinal, module_rel=rel,
            anchor_path=anchor_path,
            status="sparse" if site.eligible else "dense", reason=site.reason, seq_len=site.seq_len,
            heads=site.heads, head_dim=site.head_dim, dtype=str(site.dtype).replace("torch.", "") if site.dtype else None,
            grid=grid if text is not None else None, text_tokens=text or 0,
            mask=site.key_mask.description if site.eligible and site.key_mask else "",
            scale=_softmax_scale(site) if site.eligible else None))
        infos.append(info)
        if not site.eligible:
            log.info("modsparse: %s stays dense: %s", info.key, site.reason)
            REGISTRY.place_dense(info, frame, calls)
            continue
        _replace_with_sparse(graph, site, info.key, info.scale, token, anchor, grid_args, policy_observes(config))
        log.info("modsparse: %s -> block-sparse (policy %s, N=%s, H=%s, D=%s)", info.key, config.policy,
                 site.seq_len, site.heads, site.head_dim)
    for reason, keys in misfits.items():
        log.warning("modsparse: %d attention site(s) stay dense (%s): %s", len(keys), ", ".join(keys), reason)
    return infos


def _frame_class(frame: tuple | None, calls) -> str:
    """``Class:`` of the compiled frame's module when it is not the model itself (regional
    compilation, a graph after a break inside a block), else "": module paths are relative to
    the frame, and two block classes (Kandinsky 5's text and visual blocks, Latte's spatial and
    temporal ones) may have their attention at the same relative path."""
    if calls or frame is None or not frame[1]:
        return ""
    return type(frame[0].model.get_submodule(frame[1])).__name__ + ":"


def _below(path: str, prefix: str) -> str:
    """``path`` relative to the module path ``prefix`` ("" when it is that module)."""
    if not prefix:
        return path
    return "" if path == prefix else path[len(prefix) + 1:] if path.startswith(prefix + ".") else path


def _source_name(node) -> str | None:
    """The Dynamo source of a graph input (e.g. ``L['self']...._parameters['weight']``), or the one
    a nested region's input was given by its first call."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    if "modcompile_source" in node.meta:
        return node.meta["modcompile_source"]
    source = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
    return source() if callable(source) else source


def _example(node) -> torch.Tensor | None:
    """The real tensor a graph input held when Dynamo compiled (a nested region's input: its first
    call's operand), or None."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    if "modcompile_example" in node.meta:
        return node.meta["modcompile_example"]
    try:
        value = node.meta["grapharg"].example
    except (KeyError, AttributeError, AssertionError):
        return None
    return value if isinstance(value, torch.Tensor) else None


def _grid_misfit(seq_len: int, grid: tuple) -> str:
    """Why the configured ``video_grid`` does not fit a sequence (``text_tokens_for`` is the rule)."""
    video, shown = math.prod(grid), "x".join(map(str, grid))
    if video > seq_len:
        return f"video_grid {shown} has {video} tokens, more than the sequence ({seq_len})"
    return (f"video_grid {shown} covers {video} of {seq_len} tokens; the other {seq_len - video} "
            f"would be joint-attention text, as many as the video tokens or more")


def _grid_args(graph: fx.Graph, config, embedding: fx.Node | None) -> tuple:
    """The video grid as plan-node arguments: the config's constants, else the patch embedding's
    output sizes read in the graph (symbolic under dynamic shapes, so every call sees the grid of
    its own input), else -1s (unknown in this graph: the runtime uses the last grid it saw)."""
    if config.video_grid is not None:
        return tuple(config.video_grid)
    if embedding is None:
        return (-1, -1, -1)
    with graph.inserting_after(embedding):
        sizes = tuple(graph.call_function(torch.ops.aten.sym_size.int, (embedding, dim)) for dim in (4, 3, 2))
    return sizes[::-1]


def _anchor(site: AttentionSite, prefix: str = "") -> tuple:
    """(node, path below the compiled frame, or below ``prefix`` in a nested region) of the
    parameter closest to the site's query: its address at run time names the module instance
    that runs (modcompile/owners.py). When q depends on no parameter (a graph resumed after a
    break inside the attention processor: Wan-Animate-2's RoPE reads its grid on the host), the
    first parameter that the site's output meets (its output projection). (None, None) when
    neither exists: the site is then one instance."""
    def parameter(node):
        source = _source_name(node)
        path = source_path(source) if source else None
        return (node, _below(path, prefix)) if path is not None and "_parameters" in source else None

    seen, frontier = set(), [site.args["query"]]
    while frontier:
        nxt = []
        for node in frontier:
            if not isinstance(node, fx.Node) or node in seen:
                continue
            seen.add(node)
            found = parameter(node)
            if found is not None:
                return found
            nxt.extend(node.all_input_nodes)
        frontier = nxt
    seen, frontier = {site.node}, list(site.node.users)
    while frontier:
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            found = next(filter(None, map(parameter, node.all_input_nodes)), None)
            if found is not None:
                return found
            nxt.extend(node.users)
        frontier = nxt
    return None, None


def _softmax_scale(site: AttentionSite) -> float:
    """The site's softmax scale (SDPA's ``scale``, else 1/sqrt(head_dim)): its attention op's
    argument and ``SiteInfo.scale``, which the observe op reads (its schema has no scale)."""
    scale = site.args["scale"]
    return float(scale if scale is not None else 1.0 / math.sqrt(site.head_dim))


def _replace_with_sparse(graph: fx.Graph, site: AttentionSite, key: str, scale: float, token, anchor,
                         grid_args, observe: bool) -> None:
    a, node = site.args, site.node
    q, k, v = a["query"], a["key"], a["value"]
    with graph.inserting_before(node):
        # the key bias goes to the plan (VMoBA scores) and observe (MOD's map) too: padding has no mass
        bias = None if site.key_mask is None else graph.call_function(masks.key_bias, (site.key_mask.keys, q))
        # training: per graph (a site's no_grad graph and its training graph share the site's state)
        lists = graph.call_function(torch.ops.modcompile.plan.default,
                                    (q, k, token, anchor, key, *grid_args, bias, _needs_grad(site)))
        counts = graph.call_function(operator.getitem, (lists, 0))
        indices = graph.call_function(operator.getitem, (lists, 1))
        attn = graph.call_function(torch.ops.modcompile.sparse_attention.default,
                                   (q, k, v, counts, indices, key, float(scale), bias, anchor))
        out = graph.call_function(operator.getitem, (attn, 0))
        lse = graph.call_function(operator.getitem, (attn, 1))
        if observe:  # only for policies that learn from the call (MOD): one op call less per site call
            graph.call_function(torch.ops.modcompile.observe.default, (q, k, lse, counts, indices, key, bias))
        if site.key_mask is not None and site.key_mask.zero_padded_rows:
            out = graph.call_function(masks.zero_padded_rows, (out, site.key_mask.keys))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
