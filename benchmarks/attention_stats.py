"""How concentrated and how local a DiT's self-attention is, per layer and head, at chosen steps.

``python -m benchmarks run attention-stats --checkpoint CKPT --out DIR`` samples one seed with dense
eager attention and, at the early / mid / late steps (default: first, middle, last), computes per
(step, layer, head):

* ``blocks90_row`` / ``blocks95_row``: mean over query blocks of the fraction of key blocks a row needs
  to cover 90% / 95% of its softmax mass (what a per-row block selection must keep);
* ``blocks90_head`` / ``blocks95_head``: the fraction of all block pairs of the head that covers 90% /
  95% of the head's mass (what a per-head budget must keep);
* ``own_frame``: the share of mass on keys in the query's frame;
* ``spatial_window``: on keys within ``--window`` rows and columns of the query, in any frame;
* ``sink``: on the ``--sinks`` key columns that receive the most mass of the head.

Block figures are exact (every query); the three token-level shares come from ``--query-rows``
evenly spaced queries. Writes ``attention_stats.md/json`` (per head), ``attention_stats_summary``
(per step: median and quartiles over heads) and a histogram of ``blocks90_row`` per step.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .common import default_device, log, parse_dtype, pyplot, write_results
from .metrics import block_attention_mass

STATS = ("blocks90_row", "blocks95_row", "blocks90_head", "blocks95_head", "own_frame", "spatial_window", "sink")


def coverage_fraction(mass: torch.Tensor, frac: float, per_row: bool) -> torch.Tensor:
    """Fraction of key blocks (``per_row``: per query block, then averaged) or of all block pairs of
    a head needed to cover ``frac`` of the mass. ``mass`` (B, H, Mq, Mk) -> (B, H)."""
    m = mass.float() if per_row else mass.float().flatten(-2)
    total = m.sum(-1, keepdim=True).clamp_min(1e-30)
    cum = (m.sort(-1, descending=True).values.cumsum(-1) / total)
    count = ((cum < frac - 1e-6).sum(-1) + 1).clamp(max=m.shape[-1]).float() / m.shape[-1]
    return count.mean(-1) if per_row else count


def locality_shares(q, k, grid: tuple, *, rows: int = 512, window: int = 2, sinks: int = 16) -> dict:
    """Token-level shares of the softmax mass of ``rows`` evenly spaced queries, per (B, H)."""
    B, H, N, D = q.shape
    T, Hg, Wg = grid
    step = max(1, N // rows)
    r = torch.arange(step // 2, N, step, device=q.device)[:rows]
    p = torch.softmax(torch.matmul(q[:, :, r].float(), k.float().transpose(-1, -2)) / math.sqrt(D), -1)  # (B,H,R,N)
    tok = torch.arange(N, device=q.device)
    t, y, x = tok // (Hg * Wg), (tok // Wg) % Hg, tok % Wg
    same_frame = t[None] == t[r][:, None]
    near = ((y[None] - y[r][:, None]).abs() <= window) & ((x[None] - x[r][:, None]).abs() <= window)
    column_mass = p.mean(2)  # (B, H, N)
    top = column_mass.topk(min(sinks, N), -1).values.sum(-1)
    return {"own_frame": (p * same_frame).sum(-1).mean(-1), "spatial_window": (p * near).sum(-1).mean(-1),
            "sink": top}


def head_stats(q, k, grid: tuple, block_size: int, **locality) -> dict:
    """Every statistic of STATS for one call, each a (B, H) tensor."""
    mass = block_attention_mass(q, k, block_size)
    out = {f"blocks{int(f * 100)}_{kind}": coverage_fraction(mass, f, kind == "row")
           for kind in ("row", "head") for f in (0.9, 0.95)}
    out.update(locality_shares(q, k, grid, **locality))
    return out


def stats_steps(steps: int, at) -> list[int]:
    """The analysed steps: ``at`` if given, else first, middle and last."""
    chosen = sorted({int(s) for s in at}) if at else sorted({0, steps // 2, steps - 1})
    bad = [s for s in chosen if not 0 <= s < steps]
    if bad:
        raise SystemExit(f"--stats-steps {bad} outside 0..{steps - 1}")
    return chosen


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def summarize(rows: list[dict]) -> list[dict]:
    """Per step: median (and quartiles of blocks90_row) over all (layer, head) rows."""
    out = []
    for step in sorted({r["step"] for r in rows}):
        rs = [r for r in rows if r["step"] == step]
        row = {"step": step, "heads": len(rs)}
        for name in STATS:
            row[f"median_{name}"] = _quantile([r[name] for r in rs], 0.5)
        row["q25_blocks90_row"] = _quantile([r["blocks90_row"] for r in rs], 0.25)
        row["q75_blocks90_row"] = _quantile([r["blocks90_row"] for r in rs], 0.75)
        out.append(row)
    return out


def run(args) -> dict:
    from .fidelity import _load_or_train
    from .video_dit import kernel_block_size, make_noise, sample

    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    model, ckpt, trained = _load_or_train(args, device)
    model = model.to(dtype)
    cfg = model.cfg
    bs = args.block_size or kernel_block_size(cfg.seq_len, device.startswith("cuda"))
    steps = args.steps
    at = stats_steps(steps, args.stats_steps)
    window = args.window if args.window is not None else max(1, min(cfg.grid[1:]) // 8)
    rows, captures = [], []
    phase = {s: ("early" if i == 0 else "late" if i == len(at) - 1 else "mid") for i, s in enumerate(at)}

    def on_step(i):
        if i in at:
            for layer, q, k, _v, _out in captures:
                st = head_stats(q, k, cfg.grid, bs, rows=args.query_rows, window=window, sinks=args.sinks)
                for h in range(q.shape[1]):
                    rows.append({"step": i, "phase": phase[i], "layer": layer, "head": h,
                                 **{name: float(v[0, h]) for name, v in st.items()}})
        captures.clear()

    log(f"attention stats: {cfg.seq_len} tokens, grid {cfg.grid}, block {bs}, steps {at} of {steps}")
    model.set_capture(captures)
    try:
        sample(model, make_noise((1, cfg.in_channels, *cfg.latent), args.seed, device, dtype), steps, on_step=on_step)
    finally:
        model.set_capture(None)
    out_dir = Path(args.out)
    settings = {"config": cfg.to_dict(), "checkpoint": ckpt, "trained": trained, "block_size": bs, "steps": steps,
                "stats_steps": at, "seed": args.seed, "query_rows": args.query_rows, "window": window,
                "sinks": args.sinks}
    notes = [f"one sample (seed {args.seed}), dense eager attention, {dtype}; block figures over every query, "
             f"own_frame / spatial_window (|dh|, |dw| <= {window}, any frame) / sink ({args.sinks} columns) over "
             f"{args.query_rows} evenly spaced queries"]
    if not trained:
        notes.append("RANDOM weights (no checkpoint): attention near-uniform, these numbers describe nothing")
    summary = summarize(rows)
    mid = [r for r in summary if r["step"] == at[len(at) // 2]]
    if mid:
        m = mid[0]["median_blocks90_row"]
        notes.append(f"video-like goal (issue 19): median head covers 90% of its mass with <= 25% of the key blocks "
                     f"at the mid step: {m:.3f} -> {'MET' if m <= 0.25 else 'MISSED'}")
    write_results(out_dir, "attention_stats_summary", f"Attention concentration and locality per step "
                  f"({cfg.seq_len} tokens, block {bs})", summary, settings=settings, notes=notes)
    payload = write_results(out_dir, "attention_stats", "Attention statistics per layer and head", rows,
                            settings=settings, notes=notes, quiet=True,
                            columns=["step", "phase", "layer", "head", *STATS], extra={"summary": summary})
    _plot(out_dir, rows, at)
    return payload


def _plot(out_dir: Path, rows: list[dict], at: list[int]) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for step in at:
        vals = [r["blocks90_row"] for r in rows if r["step"] == step]
        axes[0].hist(vals, bins=20, range=(0, 1), alpha=0.5, label=f"step {step}")
        axes[1].scatter([r["blocks90_row"] for r in rows if r["step"] == step],
                        [r["own_frame"] for r in rows if r["step"] == step], s=12, label=f"step {step}")
    axes[0].axvline(0.25, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel("fraction of key blocks covering 90% of a row's mass"), axes[0].set_ylabel("heads")
    axes[1].set_xlabel("blocks90_row"), axes[1].set_ylabel("mass in the own frame")
    for ax in axes:
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out_dir / "attention_stats.png", dpi=120), plt.close(fig)


__all__ = ["STATS", "coverage_fraction", "locality_shares", "head_stats", "stats_steps", "summarize", "run"]
