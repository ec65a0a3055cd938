"""Attention forward+backward of a trained DiT, per layer, at its training shape: dense SDPA vs what
a ``modsparse`` training step pays for the same layer.

q/k/v come from the model itself (one eager forward on a training batch, bf16 autocast), so the
lists are the policy's real selection for that layer (real density, real per-row spread), not
random lists. Per layer three timings (``benchmarks.common.bench``):

* ``dense_ms``: ``F.scaled_dot_product_attention`` forward + autograd backward;
* ``site_ms``: the sparse step's attention as the site op runs it: the policy's plan (pooling,
  selection, lists), its attention (v permutation, kernel) and its backward (permutations, list
  building, the backward kernels);
* ``kernel_ms``: the block-sparse kernels alone (forward + backward) on the same lists.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import autocast, bench
from .data import generate_videos, text_tokens, video_kwargs


def capture_qkv(model, cfg, batch: int, seed: int, device) -> list:
    """(layer, q, k, v) of every self-attention call of one eager forward on a training-like batch."""
    store = []
    x0 = generate_videos(batch, seed=seed + 777, device=device, **video_kwargs(cfg))
    t = torch.full((batch,), 500.0, device=device)
    model.set_capture(store)
    try:
        with torch.no_grad(), autocast(device):
            model(x0, timestep=t, encoder_hidden_states=text_tokens(cfg, batch, seed, device))
    finally:
        model.set_capture(None)
    return [(layer, q.detach(), k.detach(), v.detach()) for layer, q, k, v, _ in store]


def _site_context(config, grid, n: int, layer: int):
    from modcompile.policies.base import SiteContext
    from modcompile.sites import SiteInfo, SiteState
    info = SiteInfo(key=f"train-attention/layer{layer}", layer=layer, module_path="train-attention", config=config,
                    status="sparse", seq_len=n, grid=tuple(grid), text_tokens=n - math.prod(grid))
    # one step of a one-step "schedule" past any warm-up: every call is a sparse training call
    return SiteContext(info=info, state=SiteState(info=info, pass_index=0), step=10**6, num_steps=10**6 + 1,
                       config=config, training=True)


def layer_timings(model, cfg, options: dict, batch: int, seed: int, device, quick: bool = False) -> list[dict]:
    """One row per self-attention layer: density of the policy's lists and the three timings
    (``quick``: one call each, for CPU smoke runs)."""
    import modcompile
    from modcompile.config import SparsityConfig
    from modcompile.ops import policy_for
    from modcompile.kernels.block_lists import num_blocks

    config = SparsityConfig(**options)
    policy = policy_for(config)
    rows = []
    for layer, q, k, v in capture_qkv(model, cfg, batch, seed, device):
        n, d = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(d)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        do = torch.randn_like(q)
        ctx = _site_context(config, cfg.grid, n, layer)

        def dense():
            F.scaled_dot_product_attention(*leaves, scale=scale).backward(do)

        def site():
            plan = policy.plan(ctx, q, k)
            out, lse = policy.attention(ctx, q, k, v, plan, scale)
            policy.attention_backward(ctx, do, q, k, v, out, lse, plan, scale)
            return plan

        plan = site()  # warm caches, graphs and tuned configs
        counts, indices = plan.lists.counts, plan.lists.indices

        def kernel():
            modcompile.block_sparse_attention(*leaves, counts, indices, block_size=config.block_size, scale=scale,
                                              validate=False).backward(do)
        kw = dict(device=str(device), **(dict(warmup=0, reps=1) if quick else {}))
        row = {"layer": layer, "shape": "x".join(map(str, q.shape)), "dense_plan": bool(plan.dense),
               "density": float(counts.double().mean()) / num_blocks(k.shape[2], config.block_size),
               "dense_ms": bench(dense, **kw)["ms"], "site_ms": bench(site, **kw)["ms"],
               "kernel_ms": bench(kernel, **kw)["ms"]}
        row["site_speedup"] = row["dense_ms"] / row["site_ms"]
        row["kernel_speedup"] = row["dense_ms"] / row["kernel_ms"]
        rows.append(row)
    return rows


def total_row(rows: list[dict]) -> dict:
    dense, site, kernel = (sum(r[k] for r in rows) for k in ("dense_ms", "site_ms", "kernel_ms"))
    return {"layer": "all", "shape": rows[0]["shape"] if rows else "", "density": sum(r["density"] for r in rows)
            / max(len(rows), 1), "dense_ms": dense, "site_ms": site, "kernel_ms": kernel,
            "site_speedup": dense / site if site else None, "kernel_speedup": dense / kernel if kernel else None}
