"""VMoBA geometry: kernel-level vs partition-level density of block shapes (CPU, exact counts).

    python -m benchmarks.vmoba_geometry [--heads 12 --head-dim 128 --tau 0.25]

For each grid and partition kind it selects blocks on the structured synthetic heads
(benchmarks/synthetic.py, global min-max selection at ``tau``) and counts:

* ``part_pairs``: selected (query block, key block) pairs / P^2 (the benchmark's partition density);
* ``part_tokens``: selected token pairs / N^2 at partition level (what a perfectly aligned layout
  would cost);
* ``kernel``: selected kernel block pairs / Mk^2 (what the kernel runs); ``inflation`` = kernel /
  part_tokens; ``footprint``: kernel tokens touched per video token (kernels/partition.py).

Rows: the old defaults (raster block order), the new defaults (footprint-minimising shape, aligned
order when it helps) and the paper's Wan shapes. Device independent: no timings.
"""
from __future__ import annotations

import argparse
import math

import torch


from .synthetic import make_synthetic_attention
from modcompile.config import SparsityConfig
from modcompile.kernels import partition as P
from modcompile.kernels import pooling
from modcompile.policies.vmoba import VmobaPolicy

# The defaults before the alignment rule (the rule then: closest size to block_size, even sides).
OLD_DEFAULTS = {(21, 30, 52): {"1d": (1,), "2d": (3, 2), "3d": (4, 8, 4)},
                (16, 32, 32): {"1d": (1,), "2d": (2, 4), "3d": (4, 4, 8)}}
PAPER = {"1d": (3,), "2d": (5, 13), "3d": (7, 5, 13)}


def measure(q, k, grid, kind, shape, align, block, policy):
    part = P.build_partition(grid, kind, shape, 0, "last", align)
    _, _, q_pool, k_pool = pooling.permute_pool_ref(q, k, part.perm, part.starts)
    chosen = policy.select_partition(q_pool, k_pool, 1.0 / math.sqrt(q.shape[-1]))
    inc, text = P.kernel_incidence(part, block)
    mask = P.kernel_block_mask(chosen, inc, text)
    sizes = (part.starts[1:] - part.starts[:-1]).double()
    n = float(part.seq_len)
    tokens = torch.einsum("bhpq,p,q->bh", chosen.double(), sizes, sizes).mean().item() / n ** 2
    kernel = mask.double().mean().item()
    raster, aligned = P.layout_footprints(grid, kind, shape, block)
    return {"blocks": part.num_blocks, "part_pairs": chosen.double().mean().item(), "part_tokens": tokens,
            "kernel": kernel, "inflation": kernel / tokens, "footprint": aligned if align else raster}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--tau", type=float, default=0.25)
    args = ap.parse_args(argv)
    policy = VmobaPolicy(SparsityConfig(policy="vmoba", block_size=args.block, tau=args.tau))
    print(f"block {args.block}, tau {args.tau}, global min-max, synthetic heads {args.heads} x {args.head_dim} (CPU)")
    print("| grid | kind | variant | shape | order | blocks | footprint | part pairs | part tokens | kernel | inflation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for grid, old in OLD_DEFAULTS.items():
        sa = make_synthetic_attention(grid, heads=args.heads, head_dim=args.head_dim, seed=0)
        with torch.no_grad():
            for kind in P.KINDS:
                new = P.default_block_shape(grid, kind, args.block)
                variants = [("old default", old[kind], None),
                            ("new default", new, P.alignment_for(grid, kind, new, args.block))]
                if grid == (21, 30, 52):
                    variants.append(("paper", PAPER[kind], P.alignment_for(grid, kind, PAPER[kind], args.block)))
                for name, shape, align in variants:
                    r = measure(sa.q, sa.k, grid, kind, shape, align, args.block, policy)
                    full = "x".join(map(str, P.full_block_shape(grid, kind, shape)))
                    print(f"| {'x'.join(map(str, grid))} | {kind} | {name} | {full} | "
                          f"{'aligned' if align else 'raster'} | {r['blocks']} | {r['footprint']:.3f} | "
                          f"{r['part_pairs']:.3f} | {r['part_tokens']:.3f} | {r['kernel']:.3f} | "
                          f"{r['inflation']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
