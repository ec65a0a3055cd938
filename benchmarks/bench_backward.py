"""Training benchmark (issue 7): block-sparse attention forward+backward vs dense SDPA and Flex.

    python benchmarks/bench_backward.py --out DIR [--quick] [--no-flex] [--no-sweep]

H100/H200, bf16, non-causal, 128x128 blocks, random block lists (own block always kept, sorted).
Times (triton.testing.do_bench medians) at (1, 12, 32760, 128):
  ours   = Triton forward (kernels/block_sparse_attention.py) + Triton backward
           (kernels/block_sparse_attention_bwd.py, list transposition included), called directly;
  SDPA   = dense scaled_dot_product_attention forward + autograd backward (default dispatch,
           cuDNN, flash);
  Flex   = FlexAttention (compiled) forward + backward with a BlockMask built from our lists.
Before timing, gradients are checked on a smaller ragged shape against a float64 reference and
against SDPA-with-the-same-mask in bf16 (rule: err <= 2 * err_sdpa_bf16 + tiny), with every
candidate backward launch configuration.

Writes DIR/backward_bench.md and DIR/backward_bench.json. Imports the kernels from the repo root
(kernels/), so it runs from a plain checkout without pip install.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import compiled_variants, cuda_environment as environment  # noqa: E402
from benchmarks.common import fmt_or_dash as fmt  # noqa: E402

try:
    import triton  # noqa: E402
    from kernels import block_sparse_attention as fwd_kernel  # noqa: E402
except Exception as e:  # noqa: BLE001
    sys.exit(f"bench_backward.py: the forward kernel kernels/block_sparse_attention.py is not importable "
             f"({type(e).__name__}: {e}); it is needed for forward+backward timings")
from kernels import block_sparse_attention_bwd as bwd_kernel  # noqa: E402
from kernels.reference import block_mask_from_lists, block_sparse_attention_ref, num_blocks  # noqa: E402
from kernels.reference_bwd import block_sparse_attention_bwd_ref  # noqa: E402

SHAPE = (1, 12, 32760, 128)
DENSITIES = [1.0, 0.5, 0.25, 0.1]
BLOCK = 128


def log(msg: str) -> None:
    print(msg, flush=True)


def make_inputs(shape, dtype, device, seed, n=4):
    """q, k, v, do as (B, H, N, D) views of (B, N, H, D) storage, the layout SDPA callers pass."""
    return common.bnhd_randn(shape, dtype, device, seed, n)


def random_block_lists(B, H, N, density, device, seed):
    """round(density * Mk) distinct key blocks per query block, own block included, sorted."""
    return common.random_block_lists(B, H, N, density, device, seed, BLOCK)


def flex_block_mask(counts, indices, N, exact_mask_mod=False):
    """A Flex BlockMask with our blocks as full blocks. Compiled Flex visits only the listed blocks;
    eager Flex ignores block lists and applies mask_mod alone, so eager use needs exact_mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask
    # Flex wants index rows as wide as the number of key blocks: selected blocks first, then the rest.
    mask = block_mask_from_lists(counts, indices, num_blocks(N, BLOCK))
    full = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    # Listed blocks are "full" blocks: the compiled kernel never evaluates mask_mod inside them.
    block = BLOCK

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, h, q_idx // block, kv_idx // block]

    zero = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(zero, full, counts, full, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod if exact_mask_mod else None, seq_lengths=(N, N))


def ours_fwd_bwd(q, k, v, do, counts, indices, config=None):
    out, lse = fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)
    return bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices, block_size=BLOCK,
                                                 config=config)


def bench_ms(fn, grad_to_none=None, rep_ms=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")


def flops_fwd_bwd(shape, density):
    """Useful FLOPs: forward 2 matmuls, backward 5 (recomputed QK^T included), 2*N*N*D each."""
    B, H, N, D = shape
    return 7 * 2.0 * B * H * N * N * D * density


# ------------------------------------------------------------------------------ correctness
def check_gradients(device, flex_fn, quick=False):
    results = []
    cases = [((1, 4, 3000, 128), torch.bfloat16, 0.25), ((2, 3, 1000, 64), torch.bfloat16, 0.5),
             ((1, 2, 2100, 128), torch.float16, 0.1)]
    if quick:
        cases = cases[:2]
    for shape, dtype, density in cases:
        B, H, N, D = shape
        q, k, v, do = make_inputs(shape, dtype, device, seed=1)
        counts, indices, _ = random_block_lists(B, H, N, density, device, seed=2)
        mk = num_blocks(N, BLOCK)
        q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
        out64, lse64 = block_sparse_attention_ref(q64, k64, v64, counts, indices, block_size=BLOCK)
        ref = block_sparse_attention_bwd_ref(do64, q64, k64, v64, out64, lse64, counts, indices, block_size=BLOCK)
        token_block = torch.arange(N, device=device) // BLOCK
        allowed = block_mask_from_lists(counts, indices, mk)[:, :, token_block][..., token_block]
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*leaves, attn_mask=allowed).backward(do)
        sdpa_err = [(t.grad.double() - r).abs().max().item() for t, r in zip(leaves, ref)]
        for cfg in bwd_kernel.gpu_configs(BLOCK):
            out, lse = fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)
            grads = bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices,
                                                          block_size=BLOCK, config=cfg)
            torch.cuda.synchronize()
            errs = [(g.double() - r).abs().max().item() for g, r in zip(grads, ref)]
            ok = all(bool(torch.isfinite(g).all()) for g in grads) and all(
                e <= 2 * s + 1e-4 for e, s in zip(errs, sdpa_err))
            results.append(dict(shape=shape, dtype=str(dtype), density=density, config=cfg,
                                err_dq_dk_dv=errs, sdpa_err_dq_dk_dv=sdpa_err, ok=ok))
            log(f"  check {shape} {dtype} d={density} cfg {cfg}: err dq/dk/dv "
                + "/".join(f"{e:.1e}" for e in errs) + " (sdpa " + "/".join(f"{e:.1e}" for e in sdpa_err)
                + f") {'OK' if ok else 'FAIL'}")
        if flex_fn is not None and dtype == torch.bfloat16:
            try:
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                flex_fn(*leaves, block_mask=flex_block_mask(counts, indices, N)).backward(do)
                ferr = [(t.grad.double() - r).abs().max().item() for t, r in zip(leaves, ref)]
                log("  flex same mask: err dq/dk/dv " + "/".join(f"{e:.1e}" for e in ferr))
            except Exception as e:  # noqa: BLE001
                log(f"  flex check failed: {type(e).__name__}: {str(e)[:200]}")
    return results


# ------------------------------------------------------------------------------ timing
def sweep_configs(shape, density, device):
    """Every backward candidate, forced, at one density (backward only): what the tuner chose from."""
    B, H, N, D = shape
    q, k, v, do = make_inputs(shape, torch.bfloat16, device, seed=3)
    counts, indices, eff = random_block_lists(B, H, N, density, device, seed=4)
    out, lse = fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)
    rows = []
    for cfg in bwd_kernel.gpu_configs(BLOCK):
        try:
            ms = bench_ms(lambda: bwd_kernel.block_sparse_attention_bwd(
                do, q, k, v, out, lse, counts, indices, block_size=BLOCK, config=cfg), rep_ms=150)
        except Exception as e:  # noqa: BLE001
            log(f"  sweep {cfg}: failed {type(e).__name__}: {str(e)[:160]}")
            continue
        tf = 5 * 2.0 * B * H * N * N * D * eff / (ms * 1e-3) / 1e12
        rows.append(dict(density=eff, config=cfg, bwd_ms=ms, bwd_tflops=tf))
        log(f"  sweep bwd d={eff:.3f} cfg {cfg}: {ms:.3f} ms ({tf:.0f} TFLOP/s)")
    return rows


def sdpa_fwd_bwd(q, k, v, do, backend=None):
    from torch.nn.attention import sdpa_kernel

    def run():
        if backend is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v)
        o.backward(do)
    return run


def time_shape(shape, densities, device, flex_fn):
    from torch.nn.attention import SDPBackend
    B, H, N, D = shape
    q, k, v, do = make_inputs(shape, torch.bfloat16, device, seed=5)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dense = {}
    for name, backend in (("sdpa", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            dense[name] = bench_ms(sdpa_fwd_bwd(*leaves, do, backend), grad_to_none=leaves)
        except Exception as e:  # noqa: BLE001
            log(f"  sdpa {name} unavailable: {type(e).__name__}: {str(e)[:160]}")
            dense[name] = None
    log(f"  dense fwd+bwd {shape}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in dense.items() if t))
    rows = []
    for density in densities:
        counts, indices, eff = random_block_lists(B, H, N, density, device, seed=6)
        ours_fwd_bwd(q, k, v, do, counts, indices)  # tuning (once per shape) stays out of the timing
        ours = bench_ms(lambda: ours_fwd_bwd(q, k, v, do, counts, indices))
        out, lse = fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)
        ours_fwd = bench_ms(lambda: fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices,
                                                                         block_size=BLOCK, out=out, lse=lse))
        ours_bwd = bench_ms(lambda: bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices,
                                                                          block_size=BLOCK))
        lists_ms = bench_ms(lambda: bwd_kernel.backward_block_lists(counts, indices, counts.shape[-1]))
        flex = None
        if flex_fn is not None:
            try:
                mask = flex_block_mask(counts, indices, N)

                def flex_run():
                    flex_fn(*leaves, block_mask=mask).backward(do)
                flex = bench_ms(flex_run, grad_to_none=leaves)
            except Exception as e:  # noqa: BLE001
                log(f"  flex failed: {type(e).__name__}: {str(e)[:200]}")
        row = dict(shape=list(shape), density=eff, ours_ms=ours, ours_fwd_ms=ours_fwd, ours_bwd_ms=ours_bwd,
                   lists_ms=lists_ms, flex_ms=flex, sdpa_ms=dense["sdpa"], cudnn_ms=dense["cudnn"],
                   flash_ms=dense["flash"], ours_tflops=flops_fwd_bwd(shape, eff) / (ours * 1e-3) / 1e12,
                   speedup_vs_sdpa=dense["sdpa"] / ours,
                   speedup_vs_best_dense=min(t for t in dense.values() if t) / ours,
                   flex_speedup_vs_sdpa=dense["sdpa"] / flex if flex else None)
        rows.append(row)
        log(f"  d={eff:.3f}: ours {ours:.2f} ms (fwd {ours_fwd:.2f} + bwd {ours_bwd:.2f}, lists {lists_ms:.3f}; "
            f"{row['ours_tflops']:.0f} TFLOP/s) {row['speedup_vs_sdpa']:.2f}x vs SDPA"
            + (f"; flex {flex:.2f} ms ({dense['sdpa'] / flex:.2f}x)" if flex else ""))
    return rows


def markdown_table(rows):
    lines = ["| density | ours fwd+bwd ms | (fwd / bwd ms) | ours TFLOP/s | Flex fwd+bwd ms | SDPA ms | cuDNN ms "
             "| flash ms | ours vs SDPA | ours vs best dense | Flex vs SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['density']:.3f} | {fmt(r['ours_ms'])} | {fmt(r['ours_fwd_ms'])} / {fmt(r['ours_bwd_ms'])} "
            f"| {fmt(r['ours_tflops'], '.0f')} | {fmt(r['flex_ms'])} | {fmt(r['sdpa_ms'])} | {fmt(r['cudnn_ms'])} "
            f"| {fmt(r['flash_ms'])} | {fmt(r['speedup_vs_sdpa'])}x | {fmt(r['speedup_vs_best_dense'])}x "
            f"| {fmt(r['flex_speedup_vs_sdpa'])}x |")
    return "\n".join(lines)


def compiled_kernel_report():
    """Registers, spills and shared memory of each compiled backward variant (best effort)."""
    lines = []
    for name in ("_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        try:
            lines.extend(compiled_variants(getattr(bwd_kernel, name), prefix=f"{name}: ", key_chars=120))
        except Exception as e:  # noqa: BLE001
            lines.append(f"  {name}: no report ({type(e).__name__}: {e})")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for the table and JSON")
    ap.add_argument("--quick", action="store_true", help="densities 1.0 and 0.25 only")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--no-sweep", action="store_true", help="skip timing every backward config")
    ap.add_argument("--no-check", action="store_true", help="skip the gradient check (not recommended)")
    ap.add_argument("--quick-check", action="store_true", help="check two shapes instead of three")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_backward.py needs a CUDA GPU")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(f"device {env['device']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, cudnn {env['cudnn']}")
    flex_fn = None if args.no_flex else common.compiled_flex_attention(log)
    t0 = time.time()
    checks = []
    if not args.no_check:
        log("gradient check (every backward candidate config):")
        checks = check_gradients("cuda", flex_fn, quick=args.quick_check)
        if not all(c["ok"] for c in checks):
            log("CORRECTNESS FAILURE: see above; timings below are of a wrong kernel")
    sweep = [] if args.no_sweep else sweep_configs(SHAPE, 0.25, "cuda")
    densities = [1.0, 0.25] if args.quick else DENSITIES
    log(f"timing {SHAPE}:")
    rows = time_shape(SHAPE, densities, "cuda", flex_fn)
    env["bwd_tuned_configs"] = {str(k): v for k, v in bwd_kernel.tuned_configs().items()}
    env["fwd_tuned_configs"] = {str(k): str(v) for k, v in fwd_kernel.tuned_configs().items()}
    env["seconds"] = round(time.time() - t0, 1)
    table = markdown_table(rows)
    (out_dir / "backward_bench.md").write_text(
        f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; cuda {env['cuda']}; "
        f"shape {SHAPE} bf16, block {BLOCK}\n\n{table}\n")
    (out_dir / "backward_bench.json").write_text(json.dumps(
        dict(environment=env, checks=checks, sweep=sweep, rows=rows), indent=1, default=str))
    log("compiled backward variants:\n" + "\n".join(compiled_kernel_report()))
    log(f"bwd tuned: {env['bwd_tuned_configs']}")
    log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} OK; {env['seconds']} s")
    log(table)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
