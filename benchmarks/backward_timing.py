"""Timings of the training benchmark: ours vs dense SDPA (default dispatch, cuDNN, flash) and Flex,
forward+backward per density at the timing shape, and the interleaved ours/SDPA goal check.
"""
from __future__ import annotations

import statistics

import torch

from modcompile.kernels import block_sparse_attention_bwd as bwd_kernel

# fwd_kernel comes through backward_common, behind its import guard
from .backward_common import (BLOCK, bench_ms, flex_block_mask, flops_fwd_bwd, fwd_kernel, lists_times, log,
                              make_inputs, ours_fwd_bwd, random_block_lists, sdpa_fwd_bwd)
from .backward_report import tuned_summary


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
