"""The video-like attention testbed (issue 19): is a trained DiT's attention as concentrated and local as
that of published video DiTs, and are its samples recognisable?

``python -m benchmarks run testbed --checkpoint CKPT --out DIR`` reads the per-head rows that
``attention-stats`` wrote for CKPT (``--stats``, default ``DIR/attention_stats.json``) and writes
``testbed.md/json``: per phase (early / mid / late step) the median and quartiles over heads of the key
blocks covering 90% / 95% of a row's mass, the locality shares, the heads' kinds (spatial / temporal /
other, the split SVG reports for HunyuanVideo) and the goal verdicts; and ``testbed_samples.png``:
frames of a few samples next to training frames, with how much detail the samples keep.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .common import default_device, log, parse_dtype, pyplot, write_results

# Published video DiTs (Wan2.1, HunyuanVideo) need about 10-25% of the blocks for 90-95% of the mass.
GOAL_BLOCKS90 = 0.25
# SVG's split of HunyuanVideo's heads by dominant pattern (benchmarks/published_figures.md)
PUBLISHED_KINDS = {"spatial": 0.292, "temporal": 0.667, "other": 0.041}
KIND_SHARE = 0.5  # a head is of a kind when at least this much of its mass follows the pattern


def head_kind(row: dict) -> str:
    """``spatial``: the head keeps to the query's frame; ``temporal``: to the query's place across frames."""
    if row["own_frame"] >= KIND_SHARE:
        return "spatial"
    if row["spatial_window"] >= KIND_SHARE:
        return "temporal"
    return "other"


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return tuple(float(t.quantile(q)) for q in (0.25, 0.5, 0.75))


def phase_summary(rows: list[dict]) -> list[dict]:
    """One row per analysed step (in step order) from attention-stats' per-head rows."""
    out = []
    for step in sorted({r["step"] for r in rows}):
        rs = [r for r in rows if r["step"] == step]
        row = {"phase": rs[0].get("phase", ""), "step": step, "heads": len(rs)}
        for name in ("blocks90_row", "blocks95_row"):
            q25, med, q75 = _quartiles([r[name] for r in rs])
            row.update({f"{name}_median": med, f"{name}_q25": q25, f"{name}_q75": q75})
        row["blocks90_row_min"] = min(r["blocks90_row"] for r in rs)
        row["blocks90_row_max"] = max(r["blocks90_row"] for r in rs)
        for name in ("own_frame", "spatial_window", "sink"):
            row[f"{name}_median"] = statistics.median(r[name] for r in rs)
        kinds = [head_kind(r) for r in rs]
        row.update({kind: kinds.count(kind) / len(kinds) for kind in PUBLISHED_KINDS})
        out.append(row)
    return out


def mid_row(summary: list[dict]) -> dict:
    """The mid step's row (the middle of the analysed steps when none is labelled mid)."""
    mids = [r for r in summary if r["phase"] == "mid"]
    return mids[0] if mids else summary[len(summary) // 2]


def goals(summary: list[dict], limit: float = GOAL_BLOCKS90) -> dict:
    """The testbed's two checks at the mid step: concentration (median head's blocks90_row <= ``limit``)
    and a spread like the published one (our proxy: spatial and temporal heads both present)."""
    mid = mid_row(summary)
    value = mid["blocks90_row_median"]
    concentrated = value <= limit
    varied = mid["spatial"] > 0 and mid["temporal"] > 0
    kinds = " / ".join(f"{mid[k]:.0%} {k}" for k in PUBLISHED_KINDS)
    published = " / ".join(f"{v:.0%}" for v in PUBLISHED_KINDS.values())
    return {
        "step": mid["step"], "blocks90_row_median": value, "limit": limit, "concentrated": concentrated,
        "varied": varied,
        "lines": [
            f"GOAL concentration (issue 19): at the mid step ({mid['step']}) the median head covers 90% of a row's "
            f"mass with {value:.1%} of the key blocks (goal <= {limit:.0%}; quartiles {mid['blocks90_row_q25']:.1%}"
            f"-{mid['blocks90_row_q75']:.1%}): {'MET' if concentrated else 'MISSED'}",
            f"GOAL spread: heads at the mid step {kinds} (SVG on HunyuanVideo: {published}); spatial and temporal "
            f"heads both present: {'MET' if varied else 'MISSED'}",
        ]}


# ---------------------------------------------------------------- samples
@torch.no_grad()
def sample_videos(model, seeds: list[int], steps: int, device, dtype) -> torch.Tensor:
    """Dense samples ``(S, C, T, H, W)`` (float32, CPU), one per noise seed."""
    from .video_dit import make_noise, sample
    cfg = model.cfg
    outs = [sample(model, make_noise((1, cfg.in_channels, *cfg.latent), s, device, dtype), steps) for s in seeds]
    return torch.cat(outs).float().cpu()


def detail_ratios(samples: torch.Tensor, data: torch.Tensor) -> dict:
    """Samples vs training videos: ratios of the standard deviation, of the mean |difference| between
    horizontal neighbours (fine detail) and between consecutive frames (motion). Near 1: the samples
    keep the data's detail; far below 1: blurred or washed out."""
    def stats(v):
        return {"std": float(v.std()), "dx": float((v[..., 1:] - v[..., :-1]).abs().mean()),
                "dt": float((v[:, :, 1:] - v[:, :, :-1]).abs().mean())}
    s, d = stats(samples), stats(data)
    return {f"{k}_ratio": s[k] / d[k] for k in s}


def _rgb(frame: torch.Tensor):
    """(C, H, W) in about [-1, 1] -> an (H, W, 3) image of the first three channels."""
    return ((frame[:3].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def plot_samples(path: Path, data: torch.Tensor, samples: torch.Tensor, frames: list[int]) -> bool:
    """Rows: training videos, then samples; columns: ``frames``. False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    videos = [("training", v) for v in data] + [("sample", v) for v in samples]
    fig, axes = plt.subplots(len(videos), len(frames), figsize=(2 * len(frames), 2 * len(videos)), squeeze=False)
    for i, (label, video) in enumerate(videos):
        for j, t in enumerate(frames):
            ax = axes[i][j]
            ax.imshow(_rgb(video[:, t]), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {t}", fontsize=8)
        axes[i][0].set_ylabel(label, fontsize=8)
    fig.suptitle("training videos (top) and dense samples (bottom), channels 0-2 as RGB", fontsize=9)
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
    return True


# ---------------------------------------------------------------- the level
def _training_record(path: Path) -> dict:
    """What the checkpoint says about its training (steps, settings, validation losses)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    history = ckpt.get("history") or []
    return {"steps": ckpt.get("steps"), "settings": ckpt.get("settings", {}),
            "val_loss_init": history[0]["val_loss"] if history else None,
            "val_loss": history[-1]["val_loss"] if history else None}


def _table_rows(summary: list[dict]) -> list[dict]:
    """The compact table: one row per phase, percentages of key blocks and of mass."""
    return [{"phase": r["phase"], "step": r["step"], "heads": r["heads"],
             "blocks90 median": f"{r['blocks90_row_median']:.1%}",
             "blocks90 q25-q75": f"{r['blocks90_row_q25']:.1%}-{r['blocks90_row_q75']:.1%}",
             "blocks90 min-max": f"{r['blocks90_row_min']:.1%}-{r['blocks90_row_max']:.1%}",
             "blocks95 median": f"{r['blocks95_row_median']:.1%}",
             "blocks95 q25-q75": f"{r['blocks95_row_q25']:.1%}-{r['blocks95_row_q75']:.1%}",
             "own frame": f"{r['own_frame_median']:.2f}", "spatial window": f"{r['spatial_window_median']:.2f}",
             "sink": f"{r['sink_median']:.2f}",
             "spatial/temporal/other": f"{r['spatial']:.0%}/{r['temporal']:.0%}/{r['other']:.0%}"} for r in summary]


def run(args) -> dict:
    import json

    from .data import generate_videos, video_kwargs
    from .train_dit import load_checkpoint

    out_dir = Path(args.out)
    stats_path = Path(args.stats) if args.stats else out_dir / "attention_stats.json"
    stats = json.loads(stats_path.read_text())
    if not stats["settings"].get("trained"):
        raise SystemExit(f"{stats_path}: attention statistics of a RANDOM model; the testbed needs a trained one")
    summary = phase_summary(stats["rows"])
    verdict = goals(summary)
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    ckpt = Path(args.checkpoint)
    model = load_checkpoint(ckpt, device).to(dtype)
    training = _training_record(ckpt)
    cfg = model.cfg
    seeds = list(range(args.seed, args.seed + args.samples))
    samples = sample_videos(model, seeds, args.sample_steps, device, dtype)
    data = generate_videos(len(seeds), seed=training["settings"].get("seed", 0), **video_kwargs(cfg))
    detail = detail_ratios(samples, data)
    frames = sorted({0, cfg.latent[0] // 2, cfg.latent[0] - 1})
    png = out_dir / "testbed_samples.png"
    plotted = plot_samples(png, data, samples, frames)
    notes = [*verdict["lines"],
             f"block size {stats['settings']['block_size']}, {stats['settings']['steps']} sampling steps, "
             f"analysed steps {stats['settings']['stats_steps']}; blocks90/95: mean over query blocks of the "
             "fraction of key blocks covering 90% / 95% of the row's mass; own frame / spatial window / sink: "
             "share of the mass (attention-stats)",
             f"head kinds: spatial = own_frame >= {KIND_SHARE}, else temporal = spatial_window >= {KIND_SHARE}, "
             "else other",
             f"training: {training['steps']} steps, validation loss {training['val_loss_init']} -> "
             f"{training['val_loss']}",
             f"samples (seeds {seeds}, {args.sample_steps} Euler steps, dense) vs training videos: std ratio "
             f"{detail['std_ratio']:.2f}, horizontal detail ratio {detail['dx_ratio']:.2f}, frame-difference "
             f"ratio {detail['dt_ratio']:.2f}" + (f"; frames in {png.name}" if plotted else "")]
    settings = {"config": cfg.to_dict(), "checkpoint": str(ckpt), "stats": str(stats_path), "training": training,
                "sample_seeds": seeds, "sample_steps": args.sample_steps, "goal_blocks90": GOAL_BLOCKS90}
    payload = write_results(out_dir, "testbed", f"Attention testbed: {cfg.seq_len} tokens, grid {cfg.grid}",
                            _table_rows(summary), settings=settings, notes=notes,
                            extra={"summary": summary, "goals": verdict, "detail": detail,
                                   "published_kinds": PUBLISHED_KINDS})
    for line in verdict["lines"]:
        log(line)
    return payload


__all__ = ["GOAL_BLOCKS90", "PUBLISHED_KINDS", "head_kind", "phase_summary", "mid_row", "goals", "sample_videos",
           "detail_ratios", "plot_samples", "run"]
