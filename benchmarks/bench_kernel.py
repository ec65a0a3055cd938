"""Kernel benchmark: our block-sparse attention forward vs dense SDPA and FlexAttention.

    python -m benchmarks.bench_kernel --out DIR [--quick] [--no-sweep]

H100/H200, bf16, non-causal, 128x128 blocks, random block lists that always keep the query
block's own key block. For each shape and density it times (triton.testing.do_bench medians):
our kernel's raw entry (``block_sparse_attention_fwd``), the public ``modcompile.block_sparse_attention``
(default arguments: its custom op and checks, no value check), FlexAttention with the same blocks (a BlockMask built from our lists, compiled once),
and dense SDPA (default dispatch, cuDNN, flash). Effective TFLOP/s = 4*B*H*N*N*D*density / t.
Before timing, the kernel is checked against a float64 reference and SDPA-with-mask on a smaller
ragged shape, with every candidate launch configuration.

Writes DIR/kernel_bench.md, DIR/kernel_bench.json and DIR/kernel_speedup.png (when matplotlib is
importable). Needs only torch, triton and optionally matplotlib; run from the repo root, it imports
the kernel from the checkout (modcompile/kernels/).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


import torch
import triton
from triton.runtime.errors import OutOfResources
import torch.nn.functional as F

from . import common
from .common import compiled_variants, cuda_environment as environment
from .common import fmt_or_dash as fmt
import modcompile
from modcompile.kernels import block_sparse_attention as bsa
from modcompile.kernels import tuning
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.block_lists import mask_from_lists, num_blocks

SHAPES = [(1, 12, 32760, 128), (1, 40, 32760, 128), (1, 24, 75600, 128)]
QUICK_SHAPES = [(1, 40, 32760, 128)]
DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]
QUICK_DENSITIES = [1.0, 0.1]
BLOCK = 128


def log(msg: str) -> None:
    print(msg, flush=True)


def make_inputs(shape, dtype, device, seed):
    """q, k, v as (B, H, N, D) views of (B, N, H, D) tensors, as SDPA callers pass them."""
    return common.bnhd_randn(shape, dtype, device, seed)


def random_block_lists(B, H, N, density, device, seed, full_width=True):
    """Random sorted lists, own block included (:func:`benchmarks.common.random_block_lists`);
    full width by default, so every density gives the same shapes (FlexAttention compiles once)."""
    return common.random_block_lists(B, H, N, density, device, seed, BLOCK, full_width=full_width)


def flex_block_mask(counts, indices, N):
    from torch.nn.attention.flex_attention import BlockMask
    # Our blocks are all "full" blocks for FlexAttention (no mask_mod evaluated inside them); the
    # partial-block list is empty. Keys past N in a ragged last block are masked by Flex itself.
    zero = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(zero, indices, counts, indices, BLOCK_SIZE=BLOCK, seq_lengths=(N, N))


def sdpa_backend_ms(q, k, v, timer) -> dict:
    """Dense SDPA's time per named backend (``timer(fn) -> ms``), None (logged) where one is unavailable."""
    out = {}
    for name, backend in sdpa_backends().items():
        try:
            out[name] = timer(sdpa_call(q, k, v, backend))
        except Exception as e:  # noqa: BLE001
            log(f"  sdpa {name} unavailable: {type(e).__name__}: {str(e)[:120]}")
            out[name] = None
    return out


def flex_ms(flex_fn, q, k, v, counts, indices, timer):
    """FlexAttention's time on the same blocks (``timer(fn) -> ms``), or None (logged) where it fails."""
    if flex_fn is None:
        return None
    try:
        mask = flex_block_mask(counts, indices, q.shape[2])
        return timer(lambda: flex_fn(q, k, v, block_mask=mask))
    except Exception as e:  # noqa: BLE001
        log(f"  flex failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa_call(q, k, v, backend=None):
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def bench_ms(fn, rep_ms=400):
    return triton.testing.do_bench(fn, warmup=100, rep=rep_ms, return_mode="median")


def tflops(shape, density, ms):
    B, H, N, D = shape
    return 4.0 * B * H * N * N * D * density / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------ correctness
def check_correctness(device, flex_fn):
    """Kernel vs float64 reference and vs SDPA-with-mask (bf16) on a small ragged shape."""
    results = []
    torch.manual_seed(0)
    cases = [((1, 4, 3000, 128), torch.bfloat16, 0.25), ((2, 3, 1000, 64), torch.bfloat16, 0.5),
             ((1, 2, 2048, 128), torch.bfloat16, 0.1),
             ((1, 4, 3000, 128), torch.float16, 1.0)]
    for shape, dtype, density in cases:
        B, H, N, D = shape
        q, k, v = make_inputs(shape, dtype, device, seed=1)
        counts, indices, _ = random_block_lists(B, H, N, density, device, seed=2, full_width=False)
        ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), counts, indices,
                                                  block_size=BLOCK)
        mk = num_blocks(N, BLOCK)
        token_block = torch.arange(N, device=device) // BLOCK
        allowed = mask_from_lists(counts, indices, mk)[:, :, token_block][..., token_block]
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        sdpa_err = (sdpa.double() - ref).abs().max().item()
        bound = 2 * sdpa_err + 1e-5
        for cfg in tuning.forward_configs(BLOCK, D):
            out = torch.full_like(q, float("nan"))
            try:
                out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK,
                                                          out=out, config=cfg)
                torch.cuda.synchronize()
            except OutOfResources as e:  # the tuner skips these too
                log(f"  check {shape} {cfg}: skipped, {e}")
                continue
            err = (out.double() - ref).abs().max().item()
            lse_err = (lse.double() - ref_lse).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and err <= bound and lse_err <= 1e-3
            results.append(dict(shape=shape, dtype=str(dtype), density=density, config=cfg.label(),
                                err=err, sdpa_err=sdpa_err, lse_err=lse_err, ok=ok))
            log(f"  check {shape} {dtype} d={density} {cfg}: err {err:.2e} (bound {bound:.2e}) "
                f"lse_err {lse_err:.1e} {'OK' if ok else 'FAIL'}")
        if flex_fn is not None and dtype == torch.bfloat16:
            fcounts, findices, _ = random_block_lists(B, H, N, density, device, seed=2, full_width=True)
            try:
                fout = flex_fn(q, k, v, block_mask=flex_block_mask(fcounts, findices, N))
                ferr = (fout.double() - ref).abs().max().item()
                log(f"  flex same mask: err {ferr:.2e} (sdpa bf16 {sdpa_err:.2e})")
            except Exception as e:  # noqa: BLE001
                log(f"  flex check failed: {type(e).__name__}: {e}")
    return results


# ------------------------------------------------------------------------------ timing
def sweep_configs(shape, densities, device):
    """Time every candidate configuration (forced) on one shape: shows what the tuner chose from."""
    rows = []
    B, H, N, D = shape
    q, k, v = make_inputs(shape, torch.bfloat16, device, seed=3)
    out = torch.empty_like(q)
    for density in densities:
        counts, indices, eff = random_block_lists(B, H, N, density, device, seed=4)
        for cfg in tuning.forward_configs(BLOCK, D):
            try:
                ms = bench_ms(lambda: bsa.block_sparse_attention_fwd(
                    q, k, v, counts, indices, block_size=BLOCK, out=out, config=cfg), rep_ms=200)
            except Exception as e:  # noqa: BLE001
                log(f"  sweep {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append(dict(shape=shape, density=eff, config=cfg.label(), ms=ms,
                             tflops=tflops(shape, eff, ms)))
            log(f"  sweep {shape} d={eff:.3f} {cfg}: {ms:.3f} ms {tflops(shape, eff, ms):.0f} TFLOP/s")
    del q, k, v, out
    return rows


def time_shape(shape, densities, device, flex_fn):
    B, H, N, D = shape
    q, k, v = make_inputs(shape, torch.bfloat16, device, seed=5)
    row_common = dict(shape=list(shape))
    dense = {}
    dense["sdpa"] = bench_ms(sdpa_call(q, k, v))
    dense.update(sdpa_backend_ms(q, k, v, bench_ms))
    log(f"  dense {shape}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in dense.items() if t))
    rows = []
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=device).transpose(1, 2)
    for density in densities:
        counts, indices, eff = random_block_lists(B, H, N, density, device, seed=6)
        ours = bench_ms(lambda: bsa.block_sparse_attention_fwd(q, k, v, counts, indices,
                                                               block_size=BLOCK, out=out))
        public = bench_ms(lambda: modcompile.block_sparse_attention(q, k, v, counts, indices, block_size=BLOCK))
        flex = flex_ms(flex_fn, q, k, v, counts, indices, bench_ms)
        row = dict(row_common, density=eff, ours_ms=ours, public_ms=public, flex_ms=flex,
                   sdpa_ms=dense["sdpa"], cudnn_ms=dense["cudnn"], flash_ms=dense["flash"],
                   ours_tflops=tflops(shape, eff, ours),
                   flex_tflops=tflops(shape, eff, flex) if flex else None,
                   sdpa_tflops=tflops(shape, 1.0, dense["sdpa"]),
                   speedup_vs_sdpa=dense["sdpa"] / ours,
                   flex_speedup_vs_sdpa=dense["sdpa"] / flex if flex else None,
                   ours_vs_cudnn=(ours / dense["cudnn"]) if dense["cudnn"] else None)
        rows.append(row)
        log(f"  {shape} d={eff:.3f}: ours {ours:.2f} ms ({row['ours_tflops']:.0f} TFLOP/s, "
            f"{row['speedup_vs_sdpa']:.2f}x)" + (f", flex {flex:.2f} ms ({dense['sdpa'] / flex:.2f}x)" if flex else ""))
    del q, k, v, out
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ reporting
def markdown_table(rows):
    lines = ["| shape (B,H,N,D) | density | ours ms | public API ms | ours TFLOP/s | Flex ms | Flex TFLOP/s | SDPA ms "
             "| cuDNN ms | flash ms | ours speedup vs SDPA | Flex speedup vs SDPA | ours / cuDNN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['density']:.3f} | {fmt(r['ours_ms'])} | {fmt(r.get('public_ms'))} "
            f"| {fmt(r['ours_tflops'], '.0f')} "
            f"| {fmt(r['flex_ms'])} | {fmt(r['flex_tflops'], '.0f')} | {fmt(r['sdpa_ms'])} | {fmt(r['cudnn_ms'])} "
            f"| {fmt(r['flash_ms'])} | {fmt(r['speedup_vs_sdpa'])}x | {fmt(r['flex_speedup_vs_sdpa'])}x "
            f"| {fmt(r['ours_vs_cudnn'])} |")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        log(f"matplotlib not importable ({type(e).__name__}); skipping the plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    shapes = sorted({tuple(r["shape"]) for r in rows})
    for i, shape in enumerate(shapes):
        rs = sorted((r for r in rows if tuple(r["shape"]) == shape), key=lambda r: r["density"])
        d = [r["density"] for r in rs]
        color = f"C{i}"
        ax.plot(d, [r["speedup_vs_sdpa"] for r in rs], "o-", color=color, label=f"ours {shape}")
        if all(r["flex_speedup_vs_sdpa"] for r in rs):
            ax.plot(d, [r["flex_speedup_vs_sdpa"] for r in rs], "s--", color=color, alpha=0.6,
                    label=f"Flex {shape}")
    grid = [0.04 + i * 0.01 for i in range(97)]
    ax.plot(grid, [1 / x for x in grid], "k:", label="ideal 1/density")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("block density")
    ax.set_ylabel("speedup vs dense SDPA (default backend)")
    ax.set_title("block-sparse attention forward, bf16, 128x128 blocks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def compiled_kernel_report():
    """Registers, spills and shared memory of every compiled variant of our kernel (best effort)."""
    try:
        return compiled_variants(bsa._block_sparse_attention_fwd_kernel)
    except Exception as e:  # noqa: BLE001
        return [f"  (no report: {type(e).__name__}: {e})"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the table, JSON and plot")
    ap.add_argument("--quick", action="store_true", help="one shape, densities 1.0 and 0.1")
    ap.add_argument("--no-sweep", action="store_true", help="skip timing every launch config")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--sweep-heads", type=lambda s: [int(x) for x in s.split(",")], default=[40],
                    help="heads of the (1, H, 32760, 128) shapes the config sweep times, e.g. 12,40")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA GPU")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda"
    env = environment()
    log(f"device {env['device']} ({env['sms']} SMs, sm_{env['capability'][0]}{env['capability'][1]}), "
        f"torch {env['torch']}, triton {env['triton']}, cuda {env['cuda']}, cudnn {env['cudnn']}")

    flex_fn = None if args.no_flex else common.compiled_flex_attention(log)

    t0 = time.time()
    log("correctness (every candidate config):")
    checks = check_correctness(device, flex_fn)
    if not all(c["ok"] for c in checks):
        log("CORRECTNESS FAILURE: see above; timings below are of a wrong kernel")

    shapes = QUICK_SHAPES if args.quick else SHAPES
    densities = QUICK_DENSITIES if args.quick else DENSITIES
    sweep = []
    if not args.no_sweep:
        log("config sweep:")
        for heads in args.sweep_heads:
            sweep += sweep_configs((1, heads, 32760, 128), [1.0, 0.1], device)

    rows = []
    for shape in shapes:
        log(f"timing {shape}:")
        rows.extend(time_shape(shape, densities, device, flex_fn))
    env["tuned_configs"] = {str(k): v.label() for k, v in tuning.tuned_configs("forward").items()}
    env["seconds"] = round(time.time() - t0, 1)

    table = markdown_table(rows)
    (out_dir / "kernel_bench.md").write_text(
        f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; cuda {env['cuda']}\n\n"
        f"{table}\n")
    (out_dir / "kernel_bench.json").write_text(json.dumps(
        dict(environment=env, checks=checks, sweep=sweep, rows=rows), indent=1, default=str))
    if sweep:
        sweep_md = ["| shape | density | config | ms | TFLOP/s |", "|---|---|---|---|---|"]
        sweep_md += [f"| {tuple(r['shape'])} | {r['density']:.3f} | {r['config']} | {r['ms']:.3f} | {r['tflops']:.0f} |"
                     for r in sweep]
        (out_dir / "kernel_sweep.md").write_text("\n".join(sweep_md) + "\n")
        log("\n".join(sweep_md))
    plotted = plot(rows, out_dir / "kernel_speedup.png")
    log("compiled variants:\n" + "\n".join(compiled_kernel_report()))
    log(f"tuned configs: {env['tuned_configs']}")
    log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} OK; plot {'written' if plotted else 'skipped'}; "
        f"{env['seconds']} s")
    log(table)


if __name__ == "__main__":
    main()
