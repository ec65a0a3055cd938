"""MOD observation kernel (kernels/block_sparsity.py): launch-config sweep on the GPU.

    python -m benchmarks.bench_observe --out DIR [--row-stride 8] [--density 0.5] [--smoke]
        [--block-n 64 --warps 8 --stages 3 --key-blocks 1000 32 8]   # a narrower sweep

Times the map kernel at (1, 12, 32760, 128) bf16, block 128, on random q/k with the lse of the dense
attention (our kernel on full lists), in both passes the MOD policy runs (``map+mass``: the sparsity map
with its mass output, for the rules that fit the map; ``mass``: the mass map alone, ``block_mass``, for
the default mass rule) and both modes: the full map (dense observed steps) and the restricted map over
random block lists (cheap refreshes). Every candidate
is checked against the default configuration's map first (same sampled rows; entries may differ
only where a score sits on the threshold, so the check is a max difference bound) and timed with
``triton.testing.do_bench`` medians. Prints a markdown table, writes it and JSON to DIR.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (bnhd_randn, environment, log, markdown_table,
                               random_block_lists, write_json)
from modcompile.config import SparsityConfig
from modcompile.kernels import block_sparsity as bs
from modcompile.kernels.tuning import LaunchConfig, map_configs
from modcompile.kernels.block_lists import BlockLists, full_block_lists, num_blocks
from modcompile.dispatch import attention_forward



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", type=int, nargs=4, default=[1, 12, 32760, 128])
    ap.add_argument("--row-stride", type=int, default=None, help="default: the MOD policy's at --block")
    ap.add_argument("--density", type=float, default=0.5, help="of the restricted mode's random lists")
    ap.add_argument("--block", type=int, default=128)
    # The sweep: every combination of these launch parameters (the key loop in parts of 32 key
    # blocks by default, as in the kernel's default configuration).
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--key-blocks", type=int, nargs="+", default=[32],
                    help="key blocks per program (the key loop split; >= Mk: one part)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU under TRITON_INTERPRET=1: a tiny float16 shape, one configuration, no timing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.block, args.block_n, args.warps, args.stages, args.key_blocks = \
            [1, 2, 256, 64], 64, [32], [4], [1], [2]
    if args.row_stride is None:
        args.row_stride = SparsityConfig(block_size=args.block).observe_row_stride
    candidates = [LaunchConfig(args.block, n, w, s, key_blocks=kb) for n in args.block_n for w in args.warps
                  for s in args.stages for kb in args.key_blocks]
    device, dtype = ("cpu", torch.float16) if args.smoke else ("cuda", torch.bfloat16)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_observe.py needs a CUDA GPU (or --smoke)")
    if args.smoke:
        def do_bench(fn, **_):
            fn()
            return float("nan")
    else:
        from triton.testing import do_bench
    B, H, N, D = args.shape
    q, k, v = bnhd_randn(tuple(args.shape), dtype, device, seed=0)
    scale = 1.0 / math.sqrt(D)
    m = num_blocks(N, args.block)
    full = BlockLists(*full_block_lists(B, H, m, m, q.device), args.block, N, N)
    _, lse = attention_forward(q, k, v, full, scale)  # dense lse
    counts, indices, eff = random_block_lists(B, H, N, args.density, device, seed=1, block_size=args.block)
    common = dict(block_size=args.block, scale=scale, row_stride=args.row_stride)
    modes = {"full": {}, f"restricted d={eff:.2f}": dict(kv_counts=counts, kv_indices=indices)}
    # Both passes the MOD policy runs: the sparsity map with the mass map (rules that fit the map), and
    # the mass map alone (block_mass: the default mass rule). Entries a pass does not write stay -1.
    mass, ref_mass = (torch.full((B, H, m, m), -1.0, device=device) for _ in range(2))
    rows = []
    for kind in ("map+mass", "mass"):
        for mode, extra in modes.items():
            ref_mass.fill_(-1.0)
            ref = bs.block_sparsity(q, k, lse, **common, **extra, mass=ref_mass)

            def call(cfg):
                if kind == "mass":
                    return None, bs.block_mass(q, k, lse, **common, **extra, out=mass, config=cfg)
                return bs.block_sparsity(q, k, lse, **common, **extra, mass=mass, config=cfg), mass
            for cfg in candidates:
                if args.block % cfg.sub:
                    continue
                row = dict(kind=kind, mode=mode, block_n=cfg.sub, warps=cfg.num_warps, stages=cfg.num_stages,
                           key_blocks=cfg.key_blocks, default=cfg == map_configs(args.block, interpreter=args.smoke)[0])
                try:
                    mass.fill_(-1.0)
                    got, _ = call(cfg)
                    row["mass_diff"] = (mass - ref_mass).nan_to_num(0.0).abs().max().item()
                    ok = row["mass_diff"] <= 1e-3 and torch.equal(mass.isnan(), ref_mass.isnan())
                    if got is not None:
                        row["max_diff"] = (got - ref).nan_to_num(0.0).abs().max().item()
                        ok = ok and torch.equal(got.isnan(), ref.isnan()) and row["max_diff"] <= 2e-3
                    row["ok"] = ok
                    row["ms"] = do_bench(lambda: call(cfg), warmup=25, rep=100, return_mode="median")
                except Exception as e:  # noqa: BLE001  (a config that does not compile: out of resources)
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
                log(f"{kind} {mode} {cfg}: {row.get('ms', float('nan')):.3f} ms ok={row.get('ok')} {row.get('error', '')}")
    dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=25, rep=100, return_mode="median")
    env = environment()
    table = markdown_table(rows, ["kind", "mode", "block_n", "warps", "stages", "key_blocks", "default", "ms", "max_diff",
                                  "mass_diff", "ok", "error"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"device {env.get('device')}; torch {env.get('torch')}; triton {env.get('triton')}; shape {tuple(args.shape)} "
            f"{str(dtype)[6:]}, block {args.block}, row_stride {args.row_stride}; dense SDPA {dense:.3f} ms\n\n{table}\n")
    (out / "bench_observe.md").write_text(text)
    write_json(out / "bench_observe.json", dict(environment=env, dense_ms=dense, rows=rows))
    print(text)


if __name__ == "__main__":
    main()
