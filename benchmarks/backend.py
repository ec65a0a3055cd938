"""Lazy access to the modcompile pieces the harness measures.

Every accessor here imports on use and returns None (with a reason) when a piece cannot be
imported on this machine (e.g. no Triton), so each level can skip cleanly.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import re

import torch


def try_import(name: str):
    """(module, None) or (None, reason)."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a module that fails while importing
        return None, f"{name} unavailable: {type(exc).__name__}: {exc}"


def backend_missing() -> str | None:
    """None when ``torch.compile(backend="modsparse")`` can work, else why not."""
    mod, why = try_import("modcompile.backend")
    if mod is None:
        return why
    return None if hasattr(mod, "modsparse") else "modcompile.backend has no modsparse backend"


def policy_missing(name: str) -> str | None:
    """None when the policy is registered, else why not (dense only needs the backend)."""
    why = backend_missing()
    if why:
        return why
    policies, why = try_import("modcompile.policies")
    if policies is None:
        return why
    try:
        from modcompile.config import SparsityConfig
        policies.make_policy(SparsityConfig(policy=name))
    except Exception as exc:
        return f"policy {name!r} unavailable: {exc}"
    return None


def step_context():
    """``modcompile.denoising_step`` when available, else a no-op context factory."""
    mod, _ = try_import("modcompile")
    fn = getattr(mod, "denoising_step", None) if mod else None
    if fn is None:
        return lambda i, n: contextlib.nullcontext()
    return fn


def reset(forget_sites: bool = False) -> None:
    mod, _ = try_import("modcompile")
    if mod is not None and hasattr(mod, "reset"):
        mod.reset(forget_sites=forget_sites)


def report_rows() -> list[dict]:
    """``modcompile.report()`` rows as dicts (empty when unavailable)."""
    mod, _ = try_import("modcompile")
    if mod is None or not hasattr(mod, "report"):
        return []
    rows = mod.report(print_table=False)
    out = []
    for r in rows or []:
        if isinstance(r, dict):
            out.append(dict(r))
        elif hasattr(r, "__dataclass_fields__"):
            out.append({f: getattr(r, f) for f in r.__dataclass_fields__})
    return out


def compile_model(model, backend: str, options: dict | None = None, mode: str | None = None):
    if backend == "eager":
        return model
    kwargs = {"backend": backend}
    if options:
        kwargs["options"] = options
    if mode:
        kwargs["mode"] = mode
    return torch.compile(model, **kwargs)


# ---------------------------------------------------------------- per-site block lists
def _layer_of(info, fallback: int) -> int:
    m = re.search(r"blocks[._](\d+)[._]", getattr(info, "module_path", "") + ".")
    return int(m.group(1)) if m else fallback


@contextlib.contextmanager
def inspectable(on: bool = True):
    """Calls made inside keep their block lists for :func:`current_site_plans` (``on=False``: a
    no-op, for the passes that are timed instead).

    On CUDA, inference calls replay from CUDA graphs and their lists come from a pool that gets
    them back right after the call's attention (modcompile/buffers.py), so nothing of an earlier
    layer or step is left to read. Inside this context those calls take the eager path, whose
    results are the same (the GPU tests compare them bitwise); a harness wraps the pass it
    inspects, not the passes it times."""
    if not on:
        yield
        return
    from modcompile import cuda_graphs
    before = os.environ.get(cuda_graphs.ENV)
    os.environ[cuda_graphs.ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(cuda_graphs.ENV, None)
        else:
            os.environ[cuda_graphs.ENV] = before


def current_site_plans(options_policy: str | None = None) -> dict[int, dict]:
    """The block lists each rewritten site used in its last call, keyed by layer index.

    Reads modcompile's runtime registry (first pass of each site). Values: dict with kv_counts,
    kv_indices, dense (bool), density (float), block_size, policy, and ``attend`` — a callable
    ``(q, k, v) -> (out, lse)`` that runs the policy's own sparse attention with those lists
    (it handles partition permutations), used to measure recall from the log-sum-exp. Calls that
    replayed from CUDA graphs keep no lists (kv_counts / kv_indices None, ``attend`` raises): run
    the pass to inspect under :func:`inspectable`."""
    runtime, _ = try_import("modcompile.runtime")
    if runtime is None or not hasattr(runtime, "REGISTRY"):
        return {}
    reg = runtime.REGISTRY
    plans = {}
    # Sites of earlier compilations stay registered (other scopes) but have no state after a reset:
    # leave them out before numbering, or a re-run policy's site would not be layer 0.
    sparse_sites = [i for i in reg.sites.values() if i.status == "sparse"
                    and (options_policy is None or i.config.policy == options_policy)
                    and reg.states.get((i.key, 0)) is not None]
    sparse_sites.sort(key=lambda i: i.layer)
    for fallback, info in enumerate(sparse_sites):
        state = reg.states.get((info.key, 0))
        if state is None or state.plan is None:
            continue
        density = state.density
        density = float(density) if density is not None else None
        lists = state.plan.lists
        plans[_layer_of(info, fallback)] = {
            "site": info.key, "kv_counts": None if lists is None else lists.counts,
            "kv_indices": None if lists is None else lists.indices,
            "dense": bool(state.plan.dense), "density": density, "block_size": info.config.block_size,
            "policy": info.config.policy, "attend": _attend_fn(info, state),
            "predicted_coverage": _predicted_coverage(state),
        }
    return plans


def _predicted_coverage(state) -> float | None:
    """MOD's predicted kept share of the attention mass for its current mask (mean over heads: each
    head's mass sums to its query count), None for other policies or before the first mask."""
    cov = getattr(state.policy_state, "predicted_coverage", None)
    return None if cov is None else float(cov.float().mean())


def _attend_fn(info, state):
    def attend(q, k, v, scale=None):
        from modcompile.ops import policy_for
        if state.plan is None or state.plan.lists is None:
            raise RuntimeError(f"site {info.key}: its last call kept no block lists (it ran on the CUDA-graph "
                               "path, which hands them back to the pool); run it under backend.inspectable()")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        policy = policy_for(info.config)
        return policy.attention(state.context, q, k, v, state.plan, scale)
    return attend
