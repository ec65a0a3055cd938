"""VMoBA policy benchmark: overhead of pooling + selection + permutation against dense SDPA, and
fidelity (output error, attention-mass recall, density) against dense attention at several tau.

    python -m benchmarks.bench_vmoba --out results/vmoba            # GPU: (1,12,32760,128) bf16, 21x30x52
    python -m benchmarks.bench_vmoba --out /tmp/vmoba_cpu --small   # CPU smoke run (tiny)

Inputs are the structured synthetic heads of benchmarks/synthetic.py (spatial, temporal, local3d and
global heads on the video grid). Each layer kind (1D / 2D / 3D partition: the policy picks it by
``layer % 3``) is measured with our default block shapes (about ``block_size`` tokens) and with the
paper's Wan 480p shapes (1D 3 frames, 2D 5x13, 3D 7x5x13).

Overhead = (plan: fused pass that mean-pools q and k and writes the permuted k, pooled scores,
selection, block lists) + (permute v), as a fraction of dense SDPA time in the same run. The kernel
gathers q rows and writes out and lse in the original token order itself (``q_rows``), so there is
no permuted q and no un-permutation; ``kernel_ms`` is the kernel as the policy calls it. The
``old_*`` columns time the previous flow in the same run (the fused pass writing permuted q and k;
the kernel on permuted q, k, v; v gather + un-permutation of out and lse), and ``max_diff_old``
checks that both flows give the same out and lse (the benchmark fails when they differ).
Writes ``vmoba_overhead.{md,json}`` and ``vmoba_fidelity.{md,json}`` under ``--out``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


from .common import bench, default_device, log, parse_dtype, write_results
from .metrics import (achieved_density, block_attention_mass, mass_recall_from_mass,
                                relative_l2)
from .synthetic import make_synthetic_attention
from modcompile.config import SparsityConfig
from modcompile.kernels import pooling
from modcompile.kernels.block_lists import mask_from_lists
from modcompile.dispatch import attention_forward, out_like
from modcompile.policies.base import SiteContext
from modcompile.policies.vmoba import VmobaPolicy, _use_triton
from modcompile.sites import SiteInfo, SiteState

PAPER_BLOCKS = {"1d": (3,), "2d": (5, 13), "3d": (7, 5, 13)}
KIND_OF_LAYER = {0: "1d", 1: "2d", 2: "3d"}


def make_ctx(config: SparsityConfig, grid, n: int, layer: int) -> SiteContext:
    info = SiteInfo(key=f"bench/layer{layer}", layer=layer, module_path="bench", config=config, status="sparse",
                    seq_len=n, grid=tuple(grid), text_tokens=n - math.prod(grid))
    # step far past the warm-up: every call is a sparse step
    return SiteContext(info=info, state=SiteState(info=info, pass_index=0), step=10**6, num_steps=10**6 + 1,
                       config=config)


def run_policy(policy, ctx, q, k, v, scale):
    plan = policy.plan(ctx, q, k)
    out, lse = policy.attention(ctx, q, k, v, plan, scale)
    return plan, out, lse


def old_flow(policy, layout, q, k, v, plan, block, scale):
    """The previous permutation flow, for comparison: permuted q, k, v into the kernel, out and lse
    un-permuted after it. Returns ``(out, lse, fns)``, fns = the timed pieces of the flow."""
    qp, kp, vp = (policy.gather(t, layout.perm) for t in (q, k, v))
    out_p, lse_p = attention_forward(qp, kp, vp, plan.lists, scale)
    out = policy.gather(out_p, layout.inv, out=out_like(q))
    lse = lse_p.index_select(2, layout.inv)

    def pool():  # the fused pass as the plan used to call it: both permuted copies written
        if _use_triton(q):
            pooling.permute_pool(q, k, layout.segments, write_permuted=True)
        else:
            policy.permute_pool(q, k, layout)

    def permute():
        policy.gather(v, layout.perm)
        policy.gather(out_p, layout.inv, out=out_like(q))
        lse_p.index_select(2, layout.inv)

    def kernel():
        attention_forward(qp, kp, vp, plan.lists, scale)

    return out, lse, {"pool": pool, "permute": permute, "kernel": kernel}


def max_diff(a, b, relative: bool = False) -> float:
    """max |a - b| over finite entries (optionally over max |b|); inf where the -inf entries differ."""
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    a, b = a[finite].double(), b[finite].double()
    diff = (a - b).abs().max().item()
    return diff / max(b.abs().max().item(), 1e-30) if relative else diff


def overhead_rows(args, sa, device) -> list[dict]:
    q, k, v = sa.q, sa.k, sa.v
    n, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D)
    dense_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v), device=device)["ms"]
    rows = []
    for blocks_name, blocks in (("default", None), ("paper", PAPER_BLOCKS)):
        for layer, kind in KIND_OF_LAYER.items():
            cfg = SparsityConfig(policy="vmoba", block_size=args.block, tau=args.tau, partition_blocks=blocks)
            policy = VmobaPolicy(cfg)
            ctx = make_ctx(cfg, sa.grid, n, layer)
            layout = policy.layout(ctx, n, q.device)
            plan, out, lse = run_policy(policy, ctx, q, k, v, scale)  # warm caches and kernels
            plan_ms = bench(lambda: policy.plan(ctx, q, k), device=device)["ms"]
            pool_ms = bench(lambda: policy.permute_pool(q, k, layout), device=device)["ms"]
            ctx.state.policy_state = None
            row = {"blocks": blocks_name, "kind": kind, "block_shape": "x".join(map(str, layout.partition.block)),
                   "partitions": layout.partition.num_blocks, "identity_perm": layout.identity,
                   "density": achieved_density(plan.lists.counts, plan.lists.indices.shape[-1]), "dense_ms": dense_ms,
                   "plan_ms": plan_ms}
            if layout.identity:
                kp, vp, q_rows = k, v, None
                row["permute_ms"] = 0.0
                row.update(old_permute_ms=0.0, old_kernel_ms=None, pool_ms=pool_ms, old_pool_ms=pool_ms,
                           out_diff_old=0.0, lse_diff_old=0.0, check="identity")
            else:
                _, kp, _, _ = policy.permute_pool(q, k, layout)  # what the plan stashes
                vp, q_rows = policy.gather(v, layout.perm), layout.perm
                row["permute_ms"] = bench(lambda: policy.gather(v, layout.perm), device=device)["ms"]
                old_out, old_lse, old = old_flow(policy, layout, q, k, v, plan, args.block, scale)
                # Same arithmetic on the same rows (0 expected with one launch configuration); a wrong
                # gather or scatter moves whole rows: differences of order 1.
                out_diff, lse_diff = max_diff(out, old_out, relative=True), max_diff(lse, old_lse)
                ok = out_diff <= args.check_tol and lse_diff <= args.check_tol
                row.update(old_permute_ms=bench(old["permute"], device=device)["ms"],
                           old_kernel_ms=bench(old["kernel"], device=device)["ms"],
                           pool_ms=pool_ms, old_pool_ms=bench(old["pool"], device=device)["ms"],
                           out_diff_old=out_diff, lse_diff_old=lse_diff, check="ok" if ok else "FAILED")
            row["kernel_ms"] = bench(lambda: attention_forward(q, kp, vp, plan.lists, scale, q_rows=q_rows),
                                     device=device)["ms"]
            row["total_ms"] = bench(lambda: run_policy(policy, ctx, q, k, v, scale), device=device)["ms"]
            row["overhead_frac"] = (plan_ms + row["permute_ms"]) / dense_ms
            row["old_overhead_frac"] = (plan_ms - pool_ms + row["old_pool_ms"] + row["old_permute_ms"]) / dense_ms
            row["speedup"] = dense_ms / row["total_ms"]
            rows.append(row)
            log(f"overhead {blocks_name} {kind}: {row['overhead_frac']:.4f} of dense (previous flow "
                f"{row['old_overhead_frac']:.4f}), density {row['density']:.3f}; vs previous flow: out rel. diff "
                f"{row['out_diff_old']:.2e}, lse diff {row['lse_diff_old']:.2e}: {row['check']}")
    return rows


COLUMNS = ["blocks", "kind", "block_shape", "density", "dense_ms", "plan_ms", "permute_ms", "overhead_frac",
           "kernel_ms", "total_ms", "speedup", "pool_ms", "old_pool_ms", "old_permute_ms", "old_kernel_ms",
           "old_overhead_frac", "out_diff_old", "lse_diff_old", "check"]


def fidelity_rows(args, sa, device) -> list[dict]:
    q, k, v = sa.q, sa.k, sa.v
    n, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    dense_err = relative_l2(F.scaled_dot_product_attention(q, k, v), ref)
    selections = [("global", "minmax"), ("global", "softmax"), ("row", "minmax")]
    rows = []
    for blocks_name, blocks in (("default", None), ("paper", PAPER_BLOCKS)):
        for layer, kind in KIND_OF_LAYER.items():
            base = SparsityConfig(policy="vmoba", block_size=args.block, partition_blocks=blocks)
            layout = VmobaPolicy(base).layout(make_ctx(base, sa.grid, n, layer), n, q.device)
            perm = layout.perm
            # mass per (query block, key block) of the dense softmax, in the permuted order
            mass = block_attention_mass(q.index_select(2, perm), k.index_select(2, perm), args.block)
            for mode, norm in selections:
                for tau in args.taus:
                    cfg = base.replace(tau=tau, selection=mode, normalization=norm)
                    policy = VmobaPolicy(cfg)
                    ctx = make_ctx(cfg, sa.grid, n, layer)
                    plan, out, _ = run_policy(policy, ctx, q, k, v, scale)
                    _, _, q_pool, k_pool = policy.permute_pool(q, k, layout)
                    chosen = policy.select_partition(q_pool, k_pool, scale)
                    bmask = mask_from_lists(plan.lists.counts, plan.lists.indices, mass.shape[-1])
                    rows.append({
                        "blocks": blocks_name, "kind": kind, "selection": mode, "norm": norm, "tau": tau,
                        "partition_density": chosen.double().mean().item(),
                        "density": achieved_density(plan.lists.counts, plan.lists.indices.shape[-1]),
                        "mass_recall": mass_recall_from_mass(mass, bmask),
                        "rel_err": relative_l2(out, ref), "dense_rel_err": dense_err,
                    })
            log(f"fidelity {blocks_name} {kind} done")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized problem (smoke test)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.25, help="tau of the overhead runs")
    parser.add_argument("--taus", type=float, nargs="+", default=(0.15, 0.25, 0.35, 0.5))
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-tol", type=float, default=1e-2,
                        help="largest difference allowed between the q-gather flow and the previous permute / "
                             "un-permute flow (out: relative to max |out|; lse: absolute); 0 expected")
    args = parser.parse_args(argv)
    device = default_device()
    if args.small:
        args.heads, args.head_dim, args.grid, args.block = 4, 32, (3, 8, 8), 16
        if device == "cpu":
            args.dtype = "fp32"
    dtype = parse_dtype(args.dtype)
    grid = tuple(args.grid)
    log(f"synthetic inputs: grid {grid}, heads {args.heads}, head_dim {args.head_dim}, {dtype}, {device}")
    sa = make_synthetic_attention(grid, heads=args.heads, head_dim=args.head_dim, seed=args.seed, dtype=dtype,
                                  device=device)
    settings = {"shape": [1, args.heads, sa.seq_len, args.head_dim], "grid": grid, "dtype": str(dtype),
                "block_size": args.block, "tau_overhead": args.tau, "taus": list(args.taus),
                "paper_blocks": PAPER_BLOCKS, "inputs": "benchmarks/synthetic.py structured heads"}
    with torch.no_grad():
        rows = overhead_rows(args, sa, device)
        write_results(args.out, "vmoba_overhead",
                      f"VMoBA overhead vs dense SDPA ({tuple(settings['shape'])}, grid {grid}, tau {args.tau})",
                      rows, settings=settings, columns=COLUMNS,
                      notes=["overhead_frac = (plan_ms + permute_ms) / dense_ms; goal < 0.05",
                             "plan = fused pass (fp32 mean-pool of q,k + permuted k), pooled scores, selection, "
                             "block lists; pool = that fused pass alone",
                             "permute = permute v (0 when the permutation is the identity); the kernel gathers "
                             "q rows and writes out / lse in the original order (kernel_ms includes that)",
                             "total = plan + attention as the policy runs it; speedup = dense_ms / total_ms",
                             "old_*: the previous flow in the same run (fused pass writing permuted q and k; "
                             "kernel on permuted q; permute v + un-permute out and lse); old_overhead_frac = "
                             "(plan_ms - pool_ms + old_pool_ms + old_permute_ms) / dense_ms",
                             "out_diff_old (relative to max |out|), lse_diff_old (absolute): the two flows' "
                             "outputs compared; check = ok when both <= --check-tol"])
        failed = [f"{r['blocks']} {r['kind']}" for r in rows if r["check"] == "FAILED"]
        if not args.skip_fidelity:
            rows = fidelity_rows(args, sa, device)
            write_results(args.out, "vmoba_fidelity", f"VMoBA fidelity vs dense attention (grid {grid})", rows,
                          settings=settings,
                          notes=["rel_err: relative L2 of the output against fp32 dense SDPA; dense_rel_err: "
                                 "the same for dense SDPA in the input dtype (the floor)",
                                 "mass_recall: share of the dense softmax mass inside the kernel block lists",
                                 "partition_density: selected (query block, key block) pairs at VMoBA-block level; "
                                 "density: at kernel-block level (straddling kernel blocks count for both)"])
    if failed:
        raise SystemExit(f"bench_vmoba: the q-gather flow differs from the permute / un-permute flow: {failed}")


if __name__ == "__main__":
    main()
