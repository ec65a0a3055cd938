"""Training benchmark: block-sparse attention forward+backward vs dense SDPA and Flex.

    python -m benchmarks.bench_backward --out DIR [--quick] [--no-flex] [--no-sweep] [--quick-check]
    python -m benchmarks.bench_backward --out DIR --sweep-only     # backward candidates, per pass

H100/H200, bf16, non-causal, 128x128 blocks, random block lists (own block always kept, sorted).
Times (triton.testing.do_bench medians) at (1, 12, 32760, 128):
  ours   = Triton forward (modcompile/kernels/block_sparse_attention.py) + Triton backward
           (modcompile/kernels/block_sparse_attention_bwd.py, list transposition included), called directly;
  SDPA   = dense scaled_dot_product_attention forward + autograd backward (default dispatch,
           cuDNN, flash);
  Flex   = FlexAttention (compiled) forward + backward with a BlockMask built from our lists.
Before timing, gradients are checked on smaller ragged shapes against a float64 reference and
against SDPA-with-the-same-mask in bf16 (rule: err <= 2 * err_sdpa_bf16 + tiny), with every
candidate backward launch configuration; each candidate is checked in its own subprocess, in
parallel (compiling is the slow part; the Triton disk cache then serves the timing process, and a
compiler crash costs one candidate, not the run). A candidate that fails is left out of the timing
and of the tuner. The sweep times every candidate's dk/dv and dq passes separately at density
0.25 on the timing shape (``--sweep-only``: just that, plus the best pair forced end to end).

Writes DIR/backward_bench.md and DIR/backward_bench.json. Run from the repo root, it imports the
kernels from the checkout (modcompile/kernels/) without pip install.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the workers run from here

import torch
import torch.nn.functional as F

from . import common
from .common import compiled_variants, cuda_environment as environment
from .common import fmt_or_dash as fmt

try:
    import triton
    from modcompile.kernels import block_sparse_attention as fwd_kernel
except Exception as e:  # noqa: BLE001
    sys.exit(f"bench_backward.py: the forward kernel modcompile/kernels/block_sparse_attention.py is not importable "
             f"({type(e).__name__}: {e}); it is needed for forward+backward timings")
from modcompile.kernels import block_sparse_attention_bwd as bwd_kernel
from modcompile.kernels import tuning
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.block_lists import mask_from_lists, num_blocks, sorted_sets_ref
from modcompile.kernels.block_lists_kernel import block_lists_triton
from modcompile.kernels.reference_bwd import block_sparse_attention_bwd_ref

SHAPE = (1, 12, 32760, 128)
DEVICE = "cuda"
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
    mask = mask_from_lists(counts, indices, num_blocks(N, BLOCK))
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
# Check shapes: ragged N; (1, 4, 3000, 128) bf16 compiles the same kernel variants as the timing
# shape (N % 16 == 8 in both, list widths are not specialized), so its compiles are reused.
CHECK_CASES = [((1, 4, 3000, 128), torch.bfloat16, 0.25), ((2, 3, 1000, 64), torch.bfloat16, 0.5),
               ((1, 2, 2100, 128), torch.float16, 0.1)]
CHECK_SETS = {"sweep": CHECK_CASES[:1], "quick": CHECK_CASES[:2], "full": CHECK_CASES}
RESULT_TAG = "CHECK_RESULT "


def check_case(shape, dtype, density, configs, device=None):
    """Gradients of each config vs a float64 reference (forward outputs from the reference too, so
    only the backward is under test); yields one result dict per config."""
    device = device or DEVICE
    B, H, N, D = shape
    q, k, v, do = make_inputs(shape, dtype, device, seed=1)
    counts, indices, _ = random_block_lists(B, H, N, density, device, seed=2)
    mk = num_blocks(N, BLOCK)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    out64, lse64 = block_sparse_attention_ref(q64, k64, v64, counts, indices, block_size=BLOCK)
    ref = block_sparse_attention_bwd_ref(do64, q64, k64, v64, out64, lse64, counts, indices, block_size=BLOCK)
    token_block = torch.arange(N, device=device) // BLOCK
    allowed = mask_from_lists(counts, indices, mk)[:, :, token_block][..., token_block]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, attn_mask=allowed).backward(do)
    sdpa_err = [(t.grad.double() - r).abs().max().item() for t, r in zip(leaves, ref)]
    out, lse = out64.to(dtype), lse64.float()
    for cfg in configs:
        row = dict(shape=list(shape), dtype=str(dtype), density=density, config=cfg.label(), label=cfg.label(),
                   sdpa_err_dq_dk_dv=sdpa_err)
        t0 = time.time()
        try:
            grads = bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices,
                                                          block_size=BLOCK, config=cfg)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 (a config the compiler rejects)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", first_call_s=time.time() - t0)
            yield row
            continue
        errs = [(g.double() - r).abs().max().item() for g, r in zip(grads, ref)]
        ok = all(bool(torch.isfinite(g).all()) for g in grads) and all(
            e <= 2 * s_ + 1e-4 for e, s_ in zip(errs, sdpa_err))
        row.update(ok=ok, err_dq_dk_dv=errs, first_call_s=time.time() - t0)
        yield row


def worker_check(index: int, set_name: str) -> int:
    """Subprocess body: check candidate ``index`` on the cases of ``set_name``; one line per case."""
    cfg = tuning.backward_configs(BLOCK)[index]
    for shape, dtype, density in CHECK_SETS[set_name]:
        for row in check_case(shape, dtype, density, [cfg]):
            print(RESULT_TAG + json.dumps(row), flush=True)
    return 0


class ParallelChecks:
    """Every candidate checked in its own subprocess, ``jobs`` at a time, in the background."""

    def __init__(self, set_name: str, jobs: int, timeout_s: float = 300):
        self.configs = tuning.backward_configs(BLOCK)
        self.set_name = set_name
        self.t0 = time.time()
        pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.futures = [pool.submit(self._one, i, timeout_s) for i in range(len(self.configs))]
        pool.shutdown(wait=False)

    def command(self, index) -> list[str]:
        return [sys.executable, "-m", "benchmarks.bench_backward", "--worker-check", str(index),
                "--check-set", self.set_name]

    def _one(self, index, timeout_s):
        cmd = self.command(index)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
            stderr, rc = f"timed out after {timeout_s} s", "timeout"
        rows = [json.loads(line[len(RESULT_TAG):]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
        expected = len(CHECK_SETS[self.set_name])
        if len(rows) < expected:  # the worker died (compiler crash, timeout): the rest count as failed
            tail = " | ".join(stderr.strip().splitlines()[-3:])[:300]
            rows.append(dict(config=self.configs[index].label(), label=self.configs[index].label(), ok=False,
                             error=f"worker rc={rc}: {tail}"))
        return rows

    def wait(self):
        """``(results, failed configs)``; logs one line per check."""
        results, failed = [], []
        for cfg, fut in zip(self.configs, self.futures):
            rows = fut.result()
            results.extend(rows)
            if not all(r["ok"] for r in rows):
                failed.append(cfg)
            for r in rows:
                if "err_dq_dk_dv" in r:
                    log(f"  check {tuple(r['shape'])} {r['dtype']} d={r['density']} {r['label']}: err dq/dk/dv "
                        + "/".join(f"{e:.1e}" for e in r["err_dq_dk_dv"]) + " (sdpa "
                        + "/".join(f"{e:.1e}" for e in r["sdpa_err_dq_dk_dv"])
                        + f") {'OK' if r['ok'] else 'FAIL'} [first call {r['first_call_s']:.1f} s]")
                else:
                    log(f"  check {r['label']}: FAILED {r.get('error', '')}")
        log(f"  checks done in {time.time() - self.t0:.0f} s: {len(self.configs) - len(failed)}/"
            f"{len(self.configs)} candidates OK")
        return results, failed


def check_flex(device, flex_fn, cases):
    """Flex with the same mask against the float64 reference (information, not a gate)."""
    for shape, dtype, density in cases:
        if dtype != torch.bfloat16:
            continue
        B, H, N, D = shape
        q, k, v, do = make_inputs(shape, dtype, device, seed=1)
        counts, indices, _ = random_block_lists(B, H, N, density, device, seed=2)
        q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
        out64, lse64 = block_sparse_attention_ref(q64, k64, v64, counts, indices, block_size=BLOCK)
        ref = block_sparse_attention_bwd_ref(do64, q64, k64, v64, out64, lse64, counts, indices, block_size=BLOCK)
        try:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            flex_fn(*leaves, block_mask=flex_block_mask(counts, indices, N)).backward(do)
            ferr = [(t.grad.double() - r).abs().max().item() for t, r in zip(leaves, ref)]
            log(f"  flex same mask {shape}: err dq/dk/dv " + "/".join(f"{e:.1e}" for e in ferr))
        except Exception as e:  # noqa: BLE001
            log(f"  flex check failed: {type(e).__name__}: {str(e)[:200]}")


# ------------------------------------------------------------------------------ timing
def forward_outputs(q, k, v, counts, indices):
    """out, lse from our forward with its first candidate forced (one compile, no tuning)."""
    D = q.shape[-1]
    try:
        cfg = tuning.forward_configs(BLOCK, D, tma=fwd_kernel.tma_usable(k, v))[0]
        return fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK, config=cfg)
    except Exception as e:  # noqa: BLE001 (a forced config may not compile here: fall back to the tuned one)
        log(f"  forced forward config failed ({type(e).__name__}: {str(e)[:120]}); using the tuned forward")
        return fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)


def sweep_passes(shape, density, device, configs, fwd=None):
    """Every candidate, forced, each pass timed alone (the tuner's per-pass choice, made visible).

    ``fwd``: (q, k, v, do, counts, indices, eff, out, lse) prepared by the caller, else built here."""
    B, H, N, D = shape
    if fwd is None:
        q, k, v, do = make_inputs(shape, torch.bfloat16, device, seed=3)
        counts, indices, eff = random_block_lists(B, H, N, density, device, seed=4)
        out, lse = forward_outputs(q, k, v, counts, indices)
        fwd = (q, k, v, do, counts, indices, eff, out, lse)
    q, k, v, do, counts, indices, eff, out, lse = fwd
    run = bwd_kernel.prepare_backward(do, q, k, v, out, lse, counts, indices, block_size=BLOCK)
    run.prepass()
    pair_flops = 2.0 * B * H * N * N * D * eff  # one matmul over the selected blocks
    rows = []
    log(f"sweep at {shape} bf16 density {eff:.3f} (each pass alone; dk/dv = 4 matmuls, dq = 3):")
    log(f"  {'config':<58} {'dk/dv ms':>9} {'TF/s':>5} {'dq ms':>8} {'TF/s':>5}")
    for cfg in configs:
        row = dict(density=eff, config=cfg.label(), label=cfg.label())
        for kind, launch, n_mm in (("dkdv", run.dkdv, 4), ("dq", run.dq, 3)):
            try:
                ms = bench_ms(lambda: launch(cfg), rep_ms=100)
                row[f"{kind}_ms"], row[f"{kind}_tflops"] = ms, n_mm * pair_flops / (ms * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001
                row[f"{kind}_ms"] = row[f"{kind}_tflops"] = None
                row[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        log(f"  {cfg.label():<58} {fmt(row['dkdv_ms'], '.3f'):>9} {fmt(row['dkdv_tflops'], '.0f'):>5} "
            f"{fmt(row['dq_ms'], '.3f'):>8} {fmt(row['dq_tflops'], '.0f'):>5}"
            + "".join(f"  [{k}: {row[k]}]" for k in ("dkdv_error", "dq_error") if k in row))
    summary = {}
    timed = {kind: [r for r in rows if r[f"{kind}_ms"] is not None] for kind in ("dkdv", "dq")}
    if timed["dkdv"] and timed["dq"]:
        best = {kind: min(timed[kind], key=lambda r: r[f"{kind}_ms"]) for kind in timed}
        pick = {kind: tuning.parse_label(best[kind]["label"]) for kind in best}
        prepass_ms = bench_ms(run.prepass, rep_ms=50)
        lists_ms, lists_torch_ms = lists_times(counts, indices)
        full_ms = bench_ms(lambda: bwd_kernel.block_sparse_attention_bwd(
            do, q, k, v, out, lse, counts, indices, block_size=BLOCK,
            dkdv_config=pick["dkdv"], dq_config=pick["dq"]), rep_ms=150)
        summary = dict(best_dkdv=pick["dkdv"].label(), best_dkdv_ms=best["dkdv"]["dkdv_ms"],
                       best_dq=pick["dq"].label(), best_dq_ms=best["dq"]["dq_ms"], prepass_ms=prepass_ms,
                       lists_ms=lists_ms, lists_torch_ms=lists_torch_ms, full_bwd_best_pair_ms=full_ms)
        log(f"  best dk/dv {pick['dkdv'].label()} {best['dkdv']['dkdv_ms']:.3f} ms + best dq {pick['dq'].label()} "
            f"{best['dq']['dq_ms']:.3f} ms + prepass {prepass_ms:.3f} ms (+ lists {lists_ms:.3f} ms [torch ops "
            f"{lists_torch_ms:.3f}], "
            f"overlaps in a loop); whole backward with this pair forced: {full_ms:.3f} ms")
    return rows, summary


def lists_times(counts, indices):
    """The backward's list building alone: ``(Triton kernel ms, torch-ops reference ms)``; both
    outputs checked equal first."""
    mk = counts.shape[-1]  # square attention: Mk = Mq
    got = block_lists_triton(counts, indices, mk)
    ref = sorted_sets_ref(counts, indices, mk)
    if not all(torch.equal(a, b) for a, b in zip((*got[0], *got[1]), (*ref[0], *ref[1]))):
        raise AssertionError("Triton block lists differ from the torch reference")
    return (bench_ms(lambda: block_lists_triton(counts, indices, mk), rep_ms=50),
            bench_ms(lambda: sorted_sets_ref(counts, indices, mk), rep_ms=50))


def goal_check(shape, density, device, pairs, goal=3.0):
    """Ours vs dense SDPA forward+backward timed alternately ``pairs`` times (do_bench medians each):
    clock or thermal drift between the two timings hits both alike, and the spread shows."""
    B, H, N, D = shape
    q, k, v, do = make_inputs(shape, torch.bfloat16, device, seed=5)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    counts, indices, eff = random_block_lists(B, H, N, density, device, seed=6)
    sdpa = sdpa_fwd_bwd(*leaves, do)
    ours_fwd_bwd(q, k, v, do, counts, indices)  # tuned once per shape (already, in a full run)
    pairs_ms = []
    for _ in range(pairs):
        pairs_ms.append((bench_ms(sdpa, grad_to_none=leaves, rep_ms=150),
                         bench_ms(lambda: ours_fwd_bwd(q, k, v, do, counts, indices), rep_ms=150)))
    ratios = sorted(s_ / o for s_, o in pairs_ms)
    med = statistics.median(ratios)
    line = (f"GOAL fwd+bwd {tuple(shape)} bf16 d={eff:.3f}: ours vs dense SDPA median {med:.2f}x over {pairs} "
            f"interleaved pairs (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x; SDPA ms "
            + "/".join(f"{s_:.2f}" for s_, _ in pairs_ms) + ", ours ms " + "/".join(f"{o:.2f}" for _, o in pairs_ms)
            + f"); goal >= {goal:g}x: {'MET' if med >= goal else 'MISSED'}")
    log(line)
    return dict(shape=list(shape), density=eff, pairs_ms=pairs_ms, median_speedup=med, min_speedup=ratios[0],
                max_speedup=ratios[-1], goal=goal, met=med >= goal, line=line)


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
        log(f"  d={eff:.3f}: backward tuner picked " + tuned_summary())
        ours = bench_ms(lambda: ours_fwd_bwd(q, k, v, do, counts, indices))
        out, lse = fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)
        ours_fwd = bench_ms(lambda: fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices,
                                                                         block_size=BLOCK, out=out, lse=lse))
        ours_bwd = bench_ms(lambda: bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices,
                                                                          block_size=BLOCK))
        lists_ms, lists_torch_ms = lists_times(counts, indices)
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
                   lists_ms=lists_ms, lists_torch_ms=lists_torch_ms, flex_ms=flex, sdpa_ms=dense["sdpa"],
                   cudnn_ms=dense["cudnn"],
                   flash_ms=dense["flash"], ours_tflops=flops_fwd_bwd(shape, eff) / (ours * 1e-3) / 1e12,
                   speedup_vs_sdpa=dense["sdpa"] / ours,
                   speedup_vs_best_dense=min(t for t in dense.values() if t) / ours,
                   flex_speedup_vs_sdpa=dense["sdpa"] / flex if flex else None)
        rows.append(row)
        log(f"  d={eff:.3f}: ours {ours:.2f} ms (fwd {ours_fwd:.2f} + bwd {ours_bwd:.2f}, lists {lists_ms:.3f} "
            f"[torch ops {lists_torch_ms:.3f}]; "
            f"{row['ours_tflops']:.0f} TFLOP/s) {row['speedup_vs_sdpa']:.2f}x vs SDPA"
            + (f"; flex {flex:.2f} ms ({dense['sdpa'] / flex:.2f}x)" if flex else ""))
    return rows


def markdown_table(rows):
    lines = ["| density | ours fwd+bwd ms | (fwd / bwd ms) | lists ms (kernel / torch ops) | ours TFLOP/s "
             "| Flex fwd+bwd ms | SDPA ms | cuDNN ms | flash ms | ours vs SDPA | ours vs best dense | Flex vs SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['density']:.3f} | {fmt(r['ours_ms'])} | {fmt(r['ours_fwd_ms'])} / {fmt(r['ours_bwd_ms'])} "
            f"| {fmt(r['lists_ms'], '.3f')} / {fmt(r['lists_torch_ms'], '.3f')} "
            f"| {fmt(r['ours_tflops'], '.0f')} | {fmt(r['flex_ms'])} | {fmt(r['sdpa_ms'])} | {fmt(r['cudnn_ms'])} "
            f"| {fmt(r['flash_ms'])} | {fmt(r['speedup_vs_sdpa'])}x | {fmt(r['speedup_vs_best_dense'])}x "
            f"| {fmt(r['flex_speedup_vs_sdpa'])}x |")
    return "\n".join(lines)


def tuned_summary() -> str:
    """The backward tuner's choices so far, one ``pass: config`` per key."""
    picks = {**tuning.tuned_configs("dkdv"), **tuning.tuned_configs("dq")}
    # key: (pass, capability, dtype, head dim, block, tma, ragged q, ragged k, programs bucket)
    return "; ".join(f"{key[0]} {cfg.label()} (2^{key[8] - 1}+ programs)" for key, cfg in picks.items()) or "nothing yet"


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
    ap.add_argument("--out", default="results/backward", help="directory for the table and JSON")
    ap.add_argument("--quick", action="store_true", help="densities 1.0 and 0.25 only")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--no-sweep", action="store_true", help="skip timing every backward config")
    ap.add_argument("--sweep-only", action="store_true",
                    help="check every candidate on one shape, time each pass of each at density 0.25, stop")
    ap.add_argument("--no-check", action="store_true", help="skip the gradient check (not recommended)")
    ap.add_argument("--quick-check", action="store_true", help="check two shapes instead of three")
    ap.add_argument("--jobs", type=int, default=12, help="candidates checked (compiled) in parallel")
    ap.add_argument("--goal-pairs", type=int, default=5, help="interleaved ours/SDPA timings at density 0.25 "
                    "for the 3x goal (0: skip)")
    ap.add_argument("--worker-check", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-set", default="full", choices=sorted(CHECK_SETS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_backward.py needs a CUDA GPU")
    if args.worker_check is not None:
        return worker_check(args.worker_check, args.check_set)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(f"device {env['device']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, cudnn {env['cudnn']}")
    t0 = time.time()
    candidates = tuning.backward_configs(BLOCK)
    log(f"{len(candidates)} backward candidates: " + ", ".join(c.label() for c in candidates))
    check_set = "sweep" if args.sweep_only else ("quick" if args.quick_check else "full")
    checks_running = None if args.no_check else ParallelChecks(check_set, args.jobs)
    sweep_inputs = None
    if args.sweep_only or not args.no_sweep:  # the forward compiles while the checks run
        B, H, N, D = SHAPE
        q, k, v, do = make_inputs(SHAPE, torch.bfloat16, DEVICE, seed=3)
        counts, indices, eff = random_block_lists(B, H, N, 0.25, DEVICE, seed=4)
        out, lse = forward_outputs(q, k, v, counts, indices)
        sweep_inputs = (q, k, v, do, counts, indices, eff, out, lse)
    checks, failed = [], []
    if checks_running is not None:
        log(f"gradient check of every backward candidate ({check_set} set, {args.jobs} in parallel):")
        checks, failed = checks_running.wait()
        if failed:
            tuning.disable_configs(failed)
            log("left out of the sweep and the tuner: " + ", ".join(c.label() for c in failed))
    passing = [c for c in candidates if c not in failed]
    sweep, sweep_summary = [], {}
    if sweep_inputs is not None:
        sweep, sweep_summary = sweep_passes(SHAPE, 0.25, DEVICE, passing, fwd=sweep_inputs)
        del sweep_inputs
    rows = []
    flex_fn = None
    if not args.sweep_only:
        flex_fn = None if args.no_flex else common.compiled_flex_attention(log)
        if flex_fn is not None and not args.no_check:
            check_flex(DEVICE, flex_fn, CHECK_SETS[check_set])
        densities = [1.0, 0.25] if args.quick else DENSITIES
        log(f"timing {SHAPE}:")
        rows = time_shape(SHAPE, densities, DEVICE, flex_fn)
    goal = goal_check(SHAPE, 0.25, DEVICE, args.goal_pairs) if args.goal_pairs and not args.sweep_only else None
    env["bwd_tuned_configs"] = {str(k): v.label() for k, v in tuning.tuned_configs().items() if k[0] != "forward"}
    env["fwd_tuned_configs"] = {str(k): v.label() for k, v in tuning.tuned_configs("forward").items()}
    env["seconds"] = round(time.time() - t0, 1)
    name = "backward_sweep" if args.sweep_only else "backward_bench"
    table = markdown_table(rows) if rows else sweep_table(sweep, sweep_summary)
    goal_md = f"\n{goal['line']}\n" if goal else ""
    (out_dir / f"{name}.md").write_text(
        f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; cuda {env['cuda']}; "
        f"shape {SHAPE} bf16, block {BLOCK}\n\n{table}\n" + goal_md + ("" if not rows else
                                                                       "\n" + sweep_table(sweep, sweep_summary) + "\n"))
    (out_dir / f"{name}.json").write_text(json.dumps(
        dict(environment=env, checks=checks, sweep=sweep, sweep_summary=sweep_summary, rows=rows, goal=goal),
        indent=1, default=str))
    log("compiled backward variants:\n" + "\n".join(compiled_kernel_report()))
    log(f"bwd tuned: {tuned_summary()}")
    # Wrong gradients fail the run; a candidate that does not compile is only left out.
    wrong = [c for c in checks if not c["ok"] and "err_dq_dk_dv" in c]
    ok = not wrong
    log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} OK, {len(wrong)} with wrong gradients"
        f"{' (CORRECTNESS FAILURE)' if wrong else ''}; {env['seconds']} s")
    if sweep:
        log(sweep_table(sweep, sweep_summary))
    if rows:
        log(table)
    if goal:
        log(goal["line"])
    return 0 if ok else 1


def sweep_table(sweep, summary) -> str:
    if not sweep:
        return ""
    lines = ["| backward config (tile, sub, warps, stages)+flags | dk/dv ms | dq ms |", "|---|---|---|"]
    lines += [f"| {r['label']} | {fmt(r['dkdv_ms'], '.3f')} | {fmt(r['dq_ms'], '.3f')} |" for r in sweep]
    if summary:
        lines.append(f"\nbest pair: dk/dv {summary['best_dkdv']} + dq {summary['best_dq']} = "
                     f"{summary['best_dkdv_ms']:.3f} + {summary['best_dq_ms']:.3f} ms, prepass "
                     f"{summary['prepass_ms']:.3f} ms, lists {summary['lists_ms']:.3f} ms; whole backward "
                     f"forced to that pair: {summary['full_bwd_best_pair_ms']:.3f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
