"""Level 4: fidelity of the policies against dense attention.

Two modes:
* ``dit`` (default): the small video DiT of benchmarks/video_dit.py (trained checkpoint; trained here
  when missing and ``--train-minutes`` > 0), sampled from the same seeds with dense attention (eager)
  and with each policy (``torch.compile(backend="modsparse", options=...)``). Reports PSNR/SSIM of
  the samples vs dense, per-layer attention-output relative error, attention-mass recall and the
  achieved density. Per-layer numbers come from the compiled run itself: each self-attention call
  records (q, k, v, out); the error compares ``out`` with dense SDPA on the same q/k/v, the recall is
  exp(lse_policy - lse_dense) with the policy's own block lists (modcompile's runtime registry).
* ``--synthetic``: one attention layer on structured synthetic q/k/v (benchmarks/synthetic.py),
  a step schedule per policy, plus harness baselines (oracle and pooled top-k at matched density),
  and a matched-density block: mod and vmoba each re-run at the other's achieved density next to
  the oracle with the same block budget (JSON ``matched_density``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as mb
from .common import (Stopwatch, default_device, log, parse_dtype, progress, pyplot, write_json,
                     write_results)
from .metrics import dense_lse, psnr, recall_from_lse, relative_l2, ssim

# Knob swept per policy for the speed-vs-fidelity curve (names are modcompile.config fields).
KNOBS = {"vmoba": ("tau", [0.15, 0.25, 0.35, 0.5, 0.75]), "mod": ("coverage", [0.8, 0.9, 0.95])}


def _config_default(knob: str):
    try:
        from modcompile.config import SparsityConfig
        return getattr(SparsityConfig(), knob)
    except Exception:
        return None


def build_variants(policies, sweep: bool, base: dict, extra: dict | None = None,
                   knob_values: dict | None = None) -> dict:
    """Name -> options dict. ``base`` options go into every variant. With ``sweep``, each policy's knob
    takes ``knob_values[policy]`` (default: KNOBS); the value the plain variant already runs (the
    config default) is not run twice."""
    # every policy's default first, then the sweeps: a run cut short by a time limit keeps the defaults
    variants = {name: {"policy": name, **base} for name in policies}
    for name in policies:
        if sweep and name in KNOBS:
            knob, values = KNOBS[name]
            default = base.get(knob, _config_default(knob))
            for value in (knob_values or {}).get(name, values):
                if value != default:
                    variants[f"{name}[{knob}={value}]"] = {"policy": name, **base, knob: value}
    for name, opts in (extra or {}).items():
        variants[name] = {**base, **opts}
    return variants


def _knob_value(opts: dict):
    knob = KNOBS.get(opts.get("policy"), (None,))[0]
    if not knob:
        return None, None
    value = opts.get(knob)
    return knob, _config_default(knob) if value is None else value


# ============================================================== DiT mode
def _load_or_train(args, device):
    from .train_dit import load_checkpoint, train
    from .video_dit import VideoDiT
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(args.out) / f"dit_{args.config}.pt"
    if ckpt.exists():
        log(f"loading checkpoint {ckpt}")
        return load_checkpoint(ckpt, device), str(ckpt), True
    if args.train_minutes and args.train_minutes > 0:
        log(f"no checkpoint at {ckpt}: training {args.config} for {args.train_minutes} min")
        res = train(args.config, minutes=args.train_minutes, batch_size=args.batch_size, out=ckpt,
                    device=device, show_progress=not args.no_progress)
        return res["model"].eval(), str(ckpt), True
    log(f"WARNING: no checkpoint at {ckpt} and --train-minutes 0: RANDOM weights. Attention of a random "
        "model is near-uniform; these numbers say nothing about sparse quality.")
    torch.manual_seed(args.seed)
    return VideoDiT(args.config).to(device).eval(), None, False


class _StepMetrics:
    """Collects per-layer error / recall / density after every denoising step of one variant."""

    def __init__(self, captures: list, policy: str | None, every: int, record_masks_at: int | None):
        self.captures, self.policy, self.every = captures, policy, every
        self.record_masks_at = record_masks_at
        self.rows: list[dict] = []
        self.masks: dict = {}

    def __call__(self, step: int):
        caps, self.captures[:] = list(self.captures), []
        if step % self.every:
            return
        plans = mb.current_site_plans(self.policy) if self.policy else {}
        for layer, q, k, v, out in caps:
            qf, kf, vf = q.float(), k.float(), v.float()
            ref = F.scaled_dot_product_attention(qf, kf, vf)
            row = {"step": step, "layer": layer, "rel_err": relative_l2(out.float(), ref)}
            plan = plans.get(layer)
            if plan is None:
                row.update(recall=None, density=None, dense_step=None)
            elif plan["dense"]:
                row.update(recall=1.0, density=1.0, dense_step=True)
            else:
                _, lse = plan["attend"](q, k, v)
                row.update(recall=recall_from_lse(lse, dense_lse(q, k)), density=plan["density"], dense_step=False)
                if self.record_masks_at is not None and step >= self.record_masks_at and layer not in self.masks:
                    from modcompile.kernels.block_lists import mask_from_lists, num_blocks
                    mk = num_blocks(k.shape[2], plan["block_size"])
                    self.masks[layer] = mask_from_lists(plan["kv_counts"][:1], plan["kv_indices"][:1], mk)[0].cpu()
            self.rows.append(row)


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def run_dit(args) -> dict:
    from .video_dit import LONG_SEQ_LEN, kernel_block_size, make_noise, sample
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    out_dir = Path(args.out)
    model, ckpt, trained = _load_or_train(args, device)
    model = model.to(dtype)
    cfg = model.cfg  # the checkpoint's, which may differ from --config
    if args.block_size is None:
        args.block_size = kernel_block_size(cfg.seq_len, device.startswith("cuda"))
    shape = (1, cfg.in_channels, *cfg.latent)
    seeds = list(range(args.seed, args.seed + args.seeds))
    steps = args.steps
    base = {"block_size": args.block_size, "video_grid": tuple(cfg.grid), "min_seq_len": 0, "num_steps": steps}
    variants = build_variants(args.policies, args.sweep, base, knob_values=args.knob_values)
    noises = {s: make_noise(shape, s, device, dtype) for s in seeds}
    text = None
    if cfg.text_len:
        text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def timed_mean(times):  # the first seed of a compiled model includes compilation
        return _mean(times[1:] or times)

    # ---- fidelity reference: eager dense SDPA
    log(f"dense reference: {len(seeds)} seeds x {steps} steps, {cfg.seq_len} tokens, {dtype}")
    reference, eager_ms = {}, []
    for s in seeds:
        with Stopwatch(device) as sw:
            reference[s] = sample(model, noises[s], steps, text=text)
        eager_ms.append(sw.ms)
    eager_time = timed_mean(eager_ms)

    missing_backend = mb.backend_missing()
    summary, layer_rows, skipped, step_rows, all_masks = [], [], {}, [], {}
    summary.append({"variant": "dense (eager SDPA)", "policy": "dense", "knob": None, "psnr_db": float("inf"),
                    "ssim": 1.0, "rel_err": 0.0, "recall": 1.0, "density": 1.0, "rel_err_all": 0.0,
                    "density_all": 1.0, "sample_ms": eager_time})

    def sample_all(compiled, metrics: _StepMetrics | None = None):
        """Every seed through ``compiled`` with the capture hook on (in every compiled row, the baseline
        too, so all compiled timings carry it); ``metrics`` sees the steps of the first seed."""
        samples, times = {}, []
        captures = metrics.captures if metrics is not None else []
        model.set_capture(captures)
        try:
            for j, s in enumerate(seeds):
                on_step = metrics if j == 0 and metrics is not None else (lambda i: captures.clear())
                with Stopwatch(device) as sw:
                    samples[s] = sample(compiled, noises[s], steps, text=text, step_context=mb.step_context(),
                                        on_step=on_step)
                times.append(sw.ms)
        finally:
            model.set_capture(None)
        return samples, times

    # ---- speed baseline: the same model compiled with Inductor (what a user runs without modsparse)
    speed_base = None
    if not args.no_inductor_baseline:
        log("dense (inductor): speed baseline")
        torch._dynamo.reset()
        try:
            _, times = sample_all(mb.compile_model(model, "inductor"))
            speed_base = timed_mean(times)
            summary.append({"variant": "dense (inductor)", "policy": "dense", "knob": None, "density": 1.0,
                            "density_all": 1.0, "sample_ms": speed_base})
        except Exception as exc:
            log(f"dense (inductor) FAILED: {type(exc).__name__}: {exc}")
            skipped["dense (inductor)"] = f"failed: {type(exc).__name__}: {exc}"
    base_ms, base_name = (speed_base, "dense (inductor)") if speed_base else (eager_time, "dense (eager SDPA)")
    timing_note = (f"speed baseline: {base_name}, {base_ms:.1f} ms per {steps}-step sample in the same run; "
                   "time_vs_dense = sample_ms / baseline, speedup = its inverse; compiled rows run with the "
                   "per-layer capture hook on (the baseline too), timed on the seeds after the first")

    settings = {"mode": "dit", "config": cfg.to_dict(), "checkpoint": ckpt, "trained": trained, "seeds": seeds,
                "steps": steps, "dtype": str(dtype), "block_size": args.block_size, "variants": variants,
                "skipped": skipped, "shape": list(shape), "tokens": cfg.seq_len, "speed_baseline": base_name}

    def write(final: bool) -> dict:
        for r in summary:
            t = r.get("sample_ms")
            r["time_vs_dense"] = t / base_ms if t and base_ms else None
            r["speedup"] = base_ms / t if t and base_ms else None
        notes = [timing_note,
                 "rel_err / recall / density: mean over sparse (non-dense) steps and layers of seed "
                 f"{seeds[0]}; *_all: over all steps incl. dense warm-up/refresh; PSNR/SSIM: mean over "
                 f"{len(seeds)} seeds, latents vs the eager dense samples"]
        if cfg.seq_len < LONG_SEQ_LEN:
            notes.append(f"at {cfg.seq_len} tokens time ratios are not a speed claim (attention is a small share "
                         "and the kernels are outside their efficient regime); use the density (ideal speedup "
                         "1/density) and the e2e level for speed")
        if not trained:
            notes.append("RANDOM weights (no checkpoint): attention near-uniform, fidelity numbers not meaningful")
        if not final:
            notes.append("partial: written after each variant; the run has not finished")
        notes.extend(f"skipped {k}: {v}" for k, v in skipped.items())
        title = (f"Fidelity vs dense: video DiT ({cfg.seq_len} tokens, {cfg.depth} layers, "
                 f"{cfg.heads} heads x {cfg.dim // cfg.heads})")
        payload = write_results(out_dir, "fidelity", title, summary, settings=settings, notes=notes, quiet=not final,
                                columns=["variant", "knob", "psnr_db", "ssim", "rel_err", "recall", "density",
                                         "sparse_steps", "rel_err_all", "density_all", "sample_ms", "time_vs_dense",
                                         "speedup"],
                                extra={"per_layer": layer_rows, "per_step": step_rows},
                                timing="CUDA-synchronised wall time per sample, mean over the seeds after the first")
        if layer_rows:
            write_results(out_dir, "fidelity_layers", "Per-layer attention fidelity (sparse steps)", layer_rows,
                          settings=settings, columns=["variant", "layer", "rel_err", "recall", "density"],
                          quiet=not final)
        _plots(out_dir, summary, layer_rows, all_masks, args, measured_speed=bool(speed_base) and
               device.startswith("cuda"))
        return payload

    for name, opts in progress(list(variants.items()), desc="policies", enabled=not args.no_progress):
        why = missing_backend or mb.policy_missing(opts["policy"])
        if why:
            log(f"skip {name}: {why}")
            skipped[name] = why
            continue
        log(f"variant {name}: options {opts}")
        torch._dynamo.reset()
        mb.reset()
        metrics = _StepMetrics([], opts["policy"], args.metric_every, record_masks_at=max(steps // 2, 0))
        try:
            with Stopwatch(device) as total:
                samples, times = sample_all(mb.compile_model(model, "modsparse", opts), metrics)
        except Exception as exc:  # a policy that fails is reported, the others still run
            log(f"variant {name} FAILED: {type(exc).__name__}: {exc}")
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            continue
        sparse_rows = [r for r in metrics.rows if r.get("dense_step") is False]
        knob, value = _knob_value(opts)
        summary.append({
            "variant": name, "policy": opts["policy"], "knob": f"{knob}={value}" if knob else None,
            "psnr_db": _mean([psnr(samples[s].float(), reference[s].float()) for s in seeds]),
            "ssim": _mean([ssim(samples[s][0].float(), reference[s][0].float(), layout="CTHW") for s in seeds]),
            "rel_err": _mean([r["rel_err"] for r in sparse_rows]),
            "recall": _mean([r["recall"] for r in sparse_rows]),
            "density": _mean([r["density"] for r in sparse_rows]),
            "rel_err_all": _mean([r["rel_err"] for r in metrics.rows]),
            "density_all": _mean([r["density"] for r in metrics.rows]),
            "sparse_steps": len({r["step"] for r in sparse_rows}),
            "sample_ms": timed_mean(times),
        })
        step_rows.extend({"variant": name, **r} for r in metrics.rows)
        for layer in sorted({r["layer"] for r in metrics.rows}):
            lr = [r for r in sparse_rows if r["layer"] == layer]
            layer_rows.append({"variant": name, "layer": layer, "rel_err": _mean([r["rel_err"] for r in lr]),
                               "recall": _mean([r["recall"] for r in lr]), "density": _mean([r["density"] for r in lr])})
        all_masks[name] = metrics.masks
        rep = mb.report_rows()
        if rep:
            write_json(out_dir / f"report_{_slug(name)}.json", {"rows": rep})
        log(f"variant {name} done in {total.ms / 1e3:.0f} s (compile, metrics and {len(seeds)} samples)")
        write(final=False)
    return write(final=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ============================================================== plots
def _plots(out_dir: Path, summary, layer_rows, masks, args, synthetic: bool = False,
           measured_speed: bool = False):
    plt = pyplot()
    if plt is None:
        return
    tag = "synthetic_" if synthetic else ""
    # per-layer density
    if any(r["density"] is not None for r in layer_rows):
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant in sorted({r["variant"] for r in layer_rows}):
            rows = [r for r in layer_rows if r["variant"] == variant and r["density"] is not None]
            if rows:
                ax.plot([r["layer"] for r in rows], [r["density"] for r in rows], marker="o", label=variant)
        ax.set_xlabel("layer"), ax.set_ylabel("achieved block density (sparse steps)")
        ax.set_title("Per-layer density"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out_dir / f"{tag}density_per_layer.png", dpi=120), plt.close(fig)
    # speed-vs-fidelity curve over the knob: x = measured speedup vs the dense baseline (GPU runs with a
    # compiled dense baseline) and the ideal 1/density
    pts = [r for r in summary if r.get("density") is not None and r["density"] < 1.0]
    ycol = "rel_err" if synthetic else "psnr_db"
    axes_x = [("ideal speedup 1/density (not measured time)", lambda r: 1 / r["density"])]
    if measured_speed:
        axes_x.insert(0, ("measured speedup vs dense (whole sample)", lambda r: r.get("speedup")))
    if pts:
        fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4), squeeze=False)
        for ax, (xlabel, xof) in zip(axes[0], axes_x):
            for policy in sorted({r["policy"] for r in pts}):
                rows = sorted((r for r in pts if r["policy"] == policy and r.get(ycol) is not None
                               and xof(r) is not None), key=xof)
                if rows:
                    ax.plot([xof(r) for r in rows], [r[ycol] for r in rows], marker="o", label=policy)
                    for r in rows:
                        if r.get("knob"):
                            ax.annotate(r["knob"], (xof(r), r[ycol]), fontsize=6)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("attention-output relative error" if synthetic else "PSNR vs dense (dB)")
            ax.legend(fontsize=7), ax.grid(alpha=0.3)
        fig.suptitle("Speed vs fidelity over the policy knob")
        fig.tight_layout(), fig.savefig(out_dir / f"{tag}speed_vs_fidelity.png", dpi=120), plt.close(fig)
    # mask heatmaps: a few heads of a few layers per variant
    for variant, per_layer in masks.items():
        if not per_layer:
            continue
        layers = sorted(per_layer)[: args.heatmap_layers]
        heads = min(args.heatmap_heads, per_layer[layers[0]].shape[0])
        fig, axes = plt.subplots(len(layers), heads, figsize=(2.2 * heads, 2.2 * len(layers)), squeeze=False)
        for i, layer in enumerate(layers):
            for h in range(heads):
                ax = axes[i][h]
                ax.imshow(per_layer[layer][h].float().numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"L{layer} h{h}", fontsize=7)
        fig.suptitle(f"{variant}: block masks, black = computed block (policy's block order)", fontsize=8)
        fig.tight_layout(), fig.savefig(out_dir / f"{tag}masks_{_slug(variant)}.png", dpi=120), plt.close(fig)


# ============================================================== synthetic mode
class AttentionOnly(nn.Module):
    """One SDPA call: what the backend rewrites; ``timestep`` only marks the step input."""

    def forward(self, q, k, v, timestep):
        return F.scaled_dot_product_attention(q, k, v)


# Options that make a policy target a given density (matched-density block of the synthetic level):
# vmoba keeps ceil(d * P) partition blocks per row, mod the fewest lines per head reaching d.
MATCH_OPTIONS = {"vmoba": lambda d: {"selection": "topk", "density": d}, "mod": lambda d: {"density": d}}
MATCH_NOTES = [
    "matched density: each group re-runs the other policy at the anchor policy's achieved density (last step) "
    "and adds the oracle with the same block budget",
    "oracle here = the round(d*B*H*Mq*Mk) truly densest blocks over all heads together (own blocks kept; "
    "benchmarks/masks.oracle_budget_mask): density within half a block of d, recall an upper bound for any mask "
    "with as many blocks; the per-row oracle rows of the main table round per query row (up to 1/(2*Mk) off)",
    "granularity = density step of the row's selection: mod 1/Mk (one line holds at most Mk blocks, "
    "achieved in [d, d + 1/Mk)), vmoba top-k 1/P (one partition block of P per row, achieved in [d, d + 1/P] "
    "when partition blocks are whole kernel blocks), oracle one block of the whole tensor, 1/(B*H*Mq*Mk)",
    "oracle_rel_err / err_vs_oracle: the budget oracle at the row's own achieved density",
]


def _options_text(opts: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items())


def _vmoba_partitions(seq_len: int, device) -> int | None:
    """Partition blocks per head of the vmoba site that just ran (None when unknown)."""
    try:
        from modcompile.ops import policy_for
        from modcompile.runtime import REGISTRY
        for state in REGISTRY.states.values():
            if state.info.config.policy == "vmoba" and state.context is not None:
                layout = policy_for(state.info.config).layout(state.context, seq_len, torch.device(device))
                return layout.partition.num_blocks if layout is not None else None
    except Exception as exc:  # informational only
        log(f"vmoba partition count unavailable: {type(exc).__name__}: {exc}")
    return None


def _append_matched_block(path: Path, matched: list, type_cols: list) -> None:
    from .common import markdown_table
    cols = ["group", "role", "variant", "options", "target_density", "density", "density_gap", "granularity",
            "rel_err", "recall", "oracle_rel_err", "err_vs_oracle", *type_cols, "sparse_steps"]
    md = ("\n### Matched density (mod vs vmoba vs oracle at the same density)\n\n" + markdown_table(matched, cols)
          + "".join(f"\n- {n}" for n in MATCH_NOTES) + "\n")
    with open(path, "a") as f:
        f.write(md)
    print(md, flush=True)


def run_synthetic(args) -> dict:
    from modcompile.kernels.reference import block_sparse_attention_ref
    from modcompile.kernels.block_lists import BlockLists
    from .masks import oracle_budget_mask, oracle_mask, pooled_mask
    from .metrics import achieved_density, block_attention_mass, mass_recall_from_mass
    from .synthetic import make_synthetic_attention

    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    grid = tuple(args.grid)
    out_dir = Path(args.out)
    sa = make_synthetic_attention(grid, args.heads, args.head_dim, text_len=args.text_len, seed=args.seed,
                                  device=device, dtype=dtype)
    q, k, v = sa.q, sa.k, sa.v
    bs = args.block_size
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    lse_ref = dense_lse(q, k)
    mass = block_attention_mass(q, k, bs)
    types = sa.head_types
    log(f"synthetic: grid {grid} + {args.text_len} text, {args.heads} heads x {args.head_dim}, N={sa.seq_len}, "
        f"block {bs}, {dtype} on {device}")

    def per_type(recall_heads):
        out = {}
        for t in sorted(set(types)):
            idx = [i for i, x in enumerate(types) if x == t]
            out[f"recall_{t}"] = float(recall_heads[idx].mean())
        return out

    rows, step_rows, skipped, masks, partitions = [], [], {}, {}, {}
    base = {"block_size": bs, "video_grid": grid, "min_seq_len": 0, "num_steps": args.steps,
            "text_position": sa.text_position}
    variants = build_variants(args.policies, args.sweep, base, knob_values=args.knob_values)
    timestep = torch.ones(q.shape[0], device=device)
    why_backend = mb.backend_missing()

    def run_schedule(name: str, opts: dict):
        """One policy's step schedule on the same q/k/v: (summary row, per-step rows, last sparse mask,
        partition blocks per head or None), or None after recording why it was skipped."""
        why = why_backend or mb.policy_missing(opts["policy"])
        if why:
            log(f"skip {name}: {why}")
            skipped[name] = why
            return None
        torch._dynamo.reset()
        mb.reset()
        steps, mask, last = [], None, None
        try:
            compiled = mb.compile_model(AttentionOnly(), "modsparse", opts)
            ctx = mb.step_context()
            for i in range(args.steps):
                with ctx(i, args.steps), torch.no_grad():
                    out = compiled(q, k, v, timestep)
                plan = mb.current_site_plans(opts["policy"]).get(0)
                r = {"variant": name, "step": i, "rel_err": relative_l2(out.float(), ref)}
                if plan is None or plan["dense"]:
                    r.update(recall=1.0 if plan else None, density=1.0 if plan else None, dense_step=bool(plan))
                else:
                    _, lse = plan["attend"](q, k, v)
                    rh = recall_from_lse(lse, lse_ref, per_head=True).mean(0)
                    r.update(recall=float(rh.mean()), density=plan["density"], dense_step=False, **per_type(rh))
                    from modcompile.kernels.block_lists import mask_from_lists
                    mask = mask_from_lists(plan["kv_counts"][:1], plan["kv_indices"][:1], mass.shape[-1])[0].cpu()
                steps.append(r)
                last = r
        except Exception as exc:
            log(f"variant {name} FAILED: {type(exc).__name__}: {exc}")
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            return None
        knob, value = _knob_value(opts)
        sparse = [r for r in steps if r.get("dense_step") is False]
        row = {"variant": name, "policy": opts["policy"], "knob": f"{knob}={value}" if knob else None,
               "rel_err": last["rel_err"], "recall": last.get("recall"), "density": last.get("density"),
               "sparse_steps": len(sparse), **{kk: vv for kk, vv in last.items() if kk.startswith("recall_")}}
        return row, steps, mask, _vmoba_partitions(sa.seq_len, device) if opts["policy"] == "vmoba" else None

    for name, opts in progress(list(variants.items()), desc="policies", enabled=not args.no_progress):
        result = run_schedule(name, opts)
        if result is None:
            continue
        row, steps, mask, partitions[name] = result
        rows.append(row)
        step_rows.extend(steps)
        if mask is not None:
            masks[name] = {0: mask}

    # harness baselines at fixed densities and at each policy's achieved density
    densities = sorted({*args.baseline_densities, *[r["density"] for r in rows if r.get("density") and r["density"] < 1]})
    for d in densities:
        for label, mask in (("oracle", oracle_mask(mass, d)), ("pooled-topk", pooled_mask(q, k, bs, d))):
            out, _ = block_sparse_attention_ref(q, k, v, BlockLists.from_mask(mask, bs, q.shape[2], k.shape[2]))
            rh = mass_recall_from_mass(mass, mask, per_head=True).mean(0)
            rows.append({"variant": f"{label}@{d:.3f}", "policy": label, "knob": f"density={d:.3f}",
                         "rel_err": relative_l2(out.float(), ref), "recall": float(rh.mean()),
                         "density": achieved_density(block_mask=mask), "sparse_steps": None, **per_type(rh)})
            if label == "oracle" and d == densities[0]:
                masks[f"oracle@{d:.3f}"] = {0: mask[0].cpu()}

    # Matched density: each of mod / vmoba is run again at the other's achieved density, next
    # to the oracle with the same block budget. Block granularity keeps the densities from matching
    # exactly; "granularity" is the density step of the row's selection (MATCH_NOTES).
    nb = mass.shape[-1]
    oracle_cache: dict = {}

    def oracle_at(d: float) -> dict:
        if d not in oracle_cache:
            mask = oracle_budget_mask(mass, d)
            out, _ = block_sparse_attention_ref(q, k, v, BlockLists.from_mask(mask, bs, q.shape[2], k.shape[2]))
            rh = mass_recall_from_mass(mass, mask, per_head=True).mean(0)
            oracle_cache[d] = {"rel_err": relative_l2(out.float(), ref), "recall": float(rh.mean()),
                               "density": achieved_density(block_mask=mask), **per_type(rh)}
        return oracle_cache[d]

    def matched_row(group, role, variant, policy, options, target, row, granularity):
        own = oracle_at(row["density"]) if role != "oracle" else row
        return {"group": group, "role": role, "variant": variant, "policy": policy, "options": options,
                "target_density": target, "density": row["density"], "density_gap": row["density"] - target,
                "granularity": granularity, "rel_err": row["rel_err"], "recall": row["recall"],
                "oracle_rel_err": own["rel_err"],
                "err_vs_oracle": row["rel_err"] / own["rel_err"] if own["rel_err"] else None,
                **{kk: vv for kk, vv in row.items() if kk.startswith("recall_")},
                "sparse_steps": row.get("sparse_steps")}

    matched, groups = [], []
    by_variant = {r["variant"]: r for r in rows}
    for anchor_name, other in (("mod", "vmoba"), ("vmoba", "mod")):
        a = by_variant.get(anchor_name)
        if other not in args.policies or a is None:
            continue
        d = a.get("density")
        group = f"{anchor_name}-density"
        if d is None or d >= 1.0:
            skipped[f"{other}@{group}"] = f"{anchor_name}'s last step was not sparse (density {d})"
            continue
        opts = {"policy": other, **base, **MATCH_OPTIONS[other](d)}
        name = f"{other}@{group}"
        result = run_schedule(name, opts)
        step_rows.extend(result[1] if result else [])
        members = {anchor_name: anchor_name}
        grp_rows = [matched_row(group, "anchor", anchor_name, anchor_name, "default", d, a, None)]
        if result is not None:
            row, _, _, parts = result
            members[other] = name
            gran = 1.0 / parts if other == "vmoba" and parts else 1.0 / nb
            grp_rows.append(matched_row(group, "matched", name, other, _options_text(MATCH_OPTIONS[other](d)), d,
                                        row, gran))
        oracle_name = f"oracle@{group}"
        members["oracle"] = oracle_name
        grp_rows.append(matched_row(group, "oracle", oracle_name, "oracle", f"budget=round({d:.4f}*B*H*Mq*Mk)",
                                    d, oracle_at(d), 1.0 / mass.numel()))
        matched.extend(grp_rows)
        groups.append({"group": group, "target_density": d, "anchor": anchor_name, "variants": members,
                       "kernel_blocks": nb,
                       "vmoba_partitions": partitions.get("vmoba") or (result[3] if result else None)})

    settings = {"mode": "synthetic", "grid": grid, "text_len": args.text_len, "heads": args.heads,
                "head_dim": args.head_dim, "seq_len": sa.seq_len, "block_size": bs, "dtype": str(dtype),
                "steps": args.steps, "seed": args.seed, "head_types": types, "variants": variants, "skipped": skipped}
    type_cols = [f"recall_{t}" for t in sorted(set(types))]
    notes = ["policy rows: last step of a schedule of the same q/k/v, compiled with backend=modsparse",
             "oracle = top blocks by true dense mass (upper bound, needs dense attention); "
             "pooled-topk = top blocks by mean-pooled q.k in raw token order (harness baseline)",
             "recall = fraction of the dense softmax mass inside the computed blocks; dense baseline: SDPA (fp32) "
             "on the same inputs"]
    notes.extend(f"skipped {k2}: {v2}" for k2, v2 in skipped.items())
    payload = write_results(out_dir, "fidelity_synthetic", f"Policy fidelity on structured synthetic attention "
                            f"(N={sa.seq_len})", rows, settings=settings, notes=notes,
                            columns=["variant", "knob", "rel_err", "recall", "density", *type_cols, "sparse_steps"],
                            extra={"per_step": step_rows,
                                   "matched_density": {"groups": groups, "rows": matched, "notes": MATCH_NOTES}},
                            timing="no timings (fidelity only)")
    if matched:
        _append_matched_block(out_dir / "fidelity_synthetic.md", matched, type_cols)
    _plots(out_dir, [r for r in rows if r["policy"] not in ("oracle", "pooled-topk")] +
           [r for r in rows if r["policy"] in ("oracle", "pooled-topk")], [], masks, args, synthetic=True)
    return payload


def run(args) -> dict:
    return run_synthetic(args) if args.synthetic else run_dit(args)
