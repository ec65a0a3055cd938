"""Output of the training benchmark: the markdown tables (timings, config sweep), the backward
tuner's picks and the compiled kernels' registers / spills / shared memory.
"""
from __future__ import annotations

from modcompile.kernels import block_sparse_attention_bwd as bwd_kernel
from modcompile.kernels import tuning

from .common import compiled_variants
from .common import fmt_or_dash as fmt


def markdown_table(rows):
    """The timing rows of time_shape as a markdown table."""
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


def sweep_table(sweep, summary) -> str:
    """The config sweep (sweep_passes) as a markdown table and its best-pair line; "" without a sweep."""
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

