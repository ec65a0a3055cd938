"""The config sweep of the training benchmark: every backward launch candidate forced, its dk/dv
and dq passes timed alone (the tuner's per-pass choice, made visible), then the best pair forced
end to end.
"""
from __future__ import annotations

import torch

from modcompile.kernels import block_sparse_attention_bwd as bwd_kernel
from modcompile.kernels import tuning

# fwd_kernel comes through backward_common, behind its import guard
from .backward_common import BLOCK, bench_ms, fwd_kernel, lists_times, log, make_inputs, random_block_lists
from .common import fmt_or_dash as fmt


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

