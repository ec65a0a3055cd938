"""Level 2: one attention layer with each policy, full per-call cost over a denoising schedule.

A single SDPA module compiled with ``backend="modsparse"`` runs a whole schedule of steps
(``modcompile.denoising_step(i, n)``) on structured synthetic q/k/v, so every call pays what the
policy does on that step: pooling, selection, permutation, observation and fitting. Each call is
timed on its own (one call per step: repeating a call inside a step would be a second CFG pass).
Steps are grouped by what the policy did (dense, dense+observe, sparse, sparse+observe); the kernel
alone on the same block lists and dense SDPA are timed in the same run for the ratios.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backend as mb
from .common import Stopwatch, bench, default_device, log, parse_dtype, progress, write_results
from .fidelity import AttentionOnly


def _phase(plan) -> str:
    if plan is None:
        return "unknown"
    runtime, _ = mb.try_import("modcompile.runtime")
    state = runtime.REGISTRY.states.get((plan["site"], 0)) if runtime else None
    observe = bool(state is not None and state.plan is not None and state.plan.observe)
    return ("dense" if plan["dense"] else "sparse") + ("+observe" if observe else "")


def run(args) -> dict:
    from .synthetic import make_synthetic_attention
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    grid, bs, steps = tuple(args.grid), args.block_size, args.steps
    sa = make_synthetic_attention(grid, args.heads, args.head_dim, text_len=args.text_len, seed=args.seed,
                                  device=device, dtype=dtype)
    q, k, v = sa.q, sa.k, sa.v
    shape = tuple(q.shape)
    log(f"policy level: q/k/v {shape} {dtype} on {device}, block {bs}, {steps} steps x {args.repeats} repeats")
    dense = bench(lambda: F.scaled_dot_product_attention(q, k, v), device=device)
    dense_ms = dense["ms"]
    rows = [{"policy": "dense SDPA", "phase": "all", "steps": steps, "median_ms": dense_ms, "vs_dense": 1.0,
             "density": 1.0, "kernel_ms": None, "overhead_ms": None, "schedule_ms": dense_ms * steps,
             "schedule_vs_dense": 1.0}]
    skipped = {}
    why_backend = mb.backend_missing()
    timestep = torch.ones(shape[0], device=device)
    for name in progress(args.policies, desc="policies", enabled=not args.no_progress):
        why = why_backend or mb.policy_missing(name)
        if why:
            log(f"skip {name}: {why}")
            skipped[name] = why
            continue
        opts = {"policy": name, "block_size": bs, "video_grid": grid, "min_seq_len": 0, "num_steps": steps,
                "text_position": sa.text_position, **args.options}
        torch._dynamo.reset()
        mb.reset()
        try:
            compiled = mb.compile_model(AttentionOnly(), "modsparse", opts)
            ctx = mb.step_context()
            per_step = []
            with mb.inspectable():  # kernel_ms reruns a step's lists
                for rep in range(args.repeats):
                    per_step = []
                    for i in range(steps):
                        with ctx(i, steps), torch.no_grad(), Stopwatch(device) as sw:
                            compiled(q, k, v, timestep)
                        plan = mb.current_site_plans(name).get(0)
                        per_step.append({"step": i, "ms": sw.ms, "phase": _phase(plan), "plan": plan,
                                         "density": None if plan is None else (1.0 if plan["dense"] else plan["density"])})
        except Exception as exc:
            log(f"policy {name} FAILED: {type(exc).__name__}: {exc}")
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        total = sum(r["ms"] for r in per_step)
        for phase in sorted({r["phase"] for r in per_step}):
            sel = [r for r in per_step if r["phase"] == phase]
            med = statistics.median(r["ms"] for r in sel)
            dens = statistics.mean(r["density"] for r in sel if r["density"] is not None) if any(
                r["density"] is not None for r in sel) else None
            kernel_ms = None
            if phase.startswith("sparse"):
                plan = sel[-1]["plan"]
                kernel_ms = _kernel_ms(q, k, v, plan, device)
            rows.append({"policy": name, "phase": phase, "steps": len(sel), "median_ms": med,
                         "vs_dense": med / dense_ms, "density": dens, "kernel_ms": kernel_ms,
                         "overhead_ms": None if kernel_ms is None else med - kernel_ms,
                         "schedule_ms": total, "schedule_vs_dense": total / (dense_ms * steps)})
    settings = {"shape": shape, "grid": grid, "text_len": args.text_len, "block_size": bs, "dtype": str(dtype),
                "steps": steps, "repeats": args.repeats, "options": args.options, "skipped": skipped}
    notes = ["median_ms: one call per step (CUDA-synchronised wall time), last repeat (the first compiles); "
             "dense SDPA: do_bench median in the same run",
             "calls take the eager path (no CUDA graphs, backend.inspectable(): the lists stay readable); "
             "host_overhead measures the graphed path",
             "kernel_ms: modcompile.block_sparse_attention alone on the step's block lists; overhead = median - kernel "
             "(pooling, selection, permutation, predictor)",
             "schedule_vs_dense: the whole schedule (incl. dense warm-up) vs steps x dense SDPA"]
    notes.extend(f"skipped {k2}: {v2}" for k2, v2 in skipped.items())
    return write_results(Path(args.out), "policy", f"Attention layer with policy vs dense SDPA {shape}", rows,
                         settings=settings, notes=notes, timing="per step: CUDA-synchronised wall time; dense "
                         "SDPA and kernel_ms: triton.testing.do_bench median",
                         columns=["policy", "phase", "steps", "density", "median_ms", "vs_dense", "kernel_ms",
                                  "overhead_ms", "schedule_ms", "schedule_vs_dense"])


def _kernel_ms(q, k, v, plan, device):
    mod, _ = mb.try_import("modcompile")
    fn = getattr(mod, "block_sparse_attention", None) if mod else None
    if fn is None or plan is None:
        return None
    counts, idx, bs = plan["kv_counts"], plan["kv_indices"], plan["block_size"]
    try:  # the lists are checked once; the timed calls skip the check (a host sync, not the kernel's work)
        fn(q, k, v, counts, idx, block_size=bs)
        return bench(lambda: fn(q, k, v, counts, idx, block_size=bs, validate=False), device=device)["ms"]
    except Exception as exc:
        log(f"kernel timing failed: {exc}")
        return None
