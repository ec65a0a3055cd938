"""The DiT mode of the fidelity level: policies vs dense attention on the small video DiT.

The DiT of benchmarks/video_dit.py (trained checkpoint; trained here when missing and
``--train-minutes`` > 0) is sampled from the same seeds with dense attention (eager) and with each
policy (``torch.compile(backend="modsparse", options=...)``). Reports PSNR/SSIM of the samples vs
dense, per-layer attention-output relative error, attention-mass recall and the achieved density.
Per-layer numbers come from the compiled run itself: each self-attention call records (q, k, v,
out); the error compares ``out`` with dense SDPA on the same q/k/v, the recall is
exp(lse_policy - lse_dense) with the policy's own block lists (modcompile's runtime registry).
Writes fidelity.{md,json}, fidelity_layers.{md,json}, report_<variant>.json and the plots.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backend as mb
from .common import Stopwatch, default_device, log, parse_dtype, progress, write_json, write_results
from .fidelity_report import plots, slug
from .fidelity_variants import build_variants, knob_value
from .metrics import dense_lse, psnr, recall_from_lse, relative_l2, ssim


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
                inspect = j == 0 and metrics is not None  # the first seed compiles: it is not timed
                on_step = metrics if inspect else (lambda i: captures.clear())
                with mb.inspectable(inspect), Stopwatch(device) as sw:
                    samples[s] = sample(compiled, noises[s], steps, text=text, step_context=mb.step_context(),
                                        on_step=on_step)
                times.append(sw.ms)
                if inspect and torch.device(device).type == "cuda":  # capture the CUDA graphs untimed
                    sample(compiled, noises[s], steps, text=text, step_context=mb.step_context(),
                           on_step=lambda i: captures.clear())
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
        plots(out_dir, summary, layer_rows, all_masks, args, measured_speed=bool(speed_base) and
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
        knob, value = knob_value(opts)
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
            write_json(out_dir / f"report_{slug(name)}.json", {"rows": rep})
        log(f"variant {name} done in {total.ms / 1e3:.0f} s (compile, metrics and {len(seeds)} samples)")
        write(final=False)
    return write(final=True)

