"""Fidelity at equal density: mod, vmoba, the static peers and the oracle on one trained DiT.

``python -m benchmarks run fidelity --equal-density 0.1,0.2,0.3,0.5 [--methods ...]``

At every target density each method samples the same seeds with the same number of steps and the
same dense warm-up (the first ``--warmup-steps`` steps dense; default: mod's rule for the step
count) and runs the same block-sparse kernel:

* ``mod`` / ``mod-blocks`` / ``mod-lines`` / ``vmoba`` go through ``torch.compile(backend="modsparse")``
  with the density option (mod: the densest share of the site's blocks by observed mass, rule ``mass``;
  ``blocks``: lines per head up to the density, filled from the threshold map; the paper's ``lines``;
  vmoba: ``selection="topk"``, ceil(density * P) partition blocks per row), so their sample time
  compares with the Inductor-compiled dense model;
* ``oracle`` / ``sta`` / ``radial`` / ``svg`` (benchmarks/baselines.py) replace the DiT's SDPA
  in eager mode (``VideoDiT.set_attention_override``) with ``dispatch.attention_forward`` on the
  lists of their mask; they keep exactly ``round(density * Mq * Mk)`` blocks per head (the oracle the
  same number over all heads), and their sample time is eager (not a speed claim).

Per row: PSNR / SSIM of the samples vs eager dense (mean over seeds), and over the sparse steps of
the first seed the attention-mass recall, the achieved density and the recall of the oracle with
as many blocks (``oracle_recall``: the ceiling at that density; exact for raw-order masks, VMoBA's
permuted blocks are not bounded by it).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backend as mb
from .baselines import METHODS as BASELINES
from .baselines import method_mask, oracle_mask
from .common import Stopwatch, default_device, log, parse_dtype, pyplot, write_results
from .metrics import block_attention_mass, dense_lse, mass_recall_from_mass, psnr, recall_from_lse, relative_l2, ssim

# modsparse methods: the options that make them target a density
MODSPARSE = {
    "mod": lambda d: {"policy": "mod", "density": d},
    "mod-lines": lambda d: {"policy": "mod", "density": d, "mask_rule": "lines"},
    # the mask rule mod had by default before "mass": line budget, blocks densest in the threshold map
    "mod-blocks": lambda d: {"policy": "mod", "density": d, "mask_rule": "blocks"},
    "vmoba": lambda d: {"policy": "vmoba", "selection": "topk", "density": d},
}
METHODS = (*MODSPARSE, *BASELINES)
# policies also run once at their defaults (issue 19: mod's coverage must find a low density by itself)
DEFAULT_RUNS = ("mod", "vmoba")


def default_warmup(steps: int) -> int:
    """mod's default dense warm-up for ``steps`` (the paper's 12 of 50), used for every method."""
    from modcompile.config import SparsityConfig
    from modcompile.policies import make_policy
    return int(make_policy(SparsityConfig(policy="mod")).default_warmup(steps))


class StepClock:
    """The denoising step the sampler is in (a ``step_context`` factory), for the eager baselines."""

    def __init__(self):
        self.step = 0

    def __call__(self, i: int, n: int):
        import contextlib
        self.step = i
        return contextlib.nullcontext()


class BaselineAttention:
    """``VideoDiT`` attention override: dense SDPA during the warm-up, then the block-sparse kernel on
    ``method``'s mask at ``density``. While ``record`` is on, each sparse call appends its metrics."""

    def __init__(self, method: str, density: float, grid: tuple, block_size: int, warmup: int, clock: StepClock,
                 metric_every: int = 1):
        self.method, self.density, self.grid, self.block_size = method, density, tuple(grid), block_size
        self.warmup, self.clock, self.metric_every = warmup, clock, metric_every
        self.record = False
        self.rows: list[dict] = []

    def __call__(self, layer: int, q, k, v):
        if self.clock.step < self.warmup:
            return F.scaled_dot_product_attention(q, k, v)
        from modcompile import dispatch
        from modcompile.kernels.block_lists import BlockLists
        mask = method_mask(self.method, q, k, v, self.grid, self.block_size, self.density)
        lists = BlockLists.from_mask(mask, self.block_size, q.shape[2], k.shape[2])
        out, _ = dispatch.attention_forward(q, k, v, lists, 1.0 / math.sqrt(q.shape[-1]))
        if self.record and (self.clock.step - self.warmup) % self.metric_every == 0:
            mass = block_attention_mass(q, k, self.block_size)
            density = float(mask.float().mean())
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            self.rows.append({"step": self.clock.step, "layer": layer, "density": density,
                              "recall": mass_recall_from_mass(mass, mask),
                              "oracle_recall": mass_recall_from_mass(mass, oracle_mask(mass, blocks=int(mask.sum()))),
                              "rel_err": relative_l2(out.float(), ref)})
        return out


def _modsparse_step_rows(captures: list, policy: str, step: int, block_size: int) -> list[dict]:
    """Metrics of the sparse calls of one step of a compiled modsparse run (first pass per site)."""
    plans = mb.current_site_plans(policy)
    rows = []
    for layer, q, k, v, out in captures:
        plan = plans.get(layer)
        if plan is None or plan["dense"]:
            continue
        _, lse = plan["attend"](q, k, v)
        mass = block_attention_mass(q, k, block_size)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        counts = plan["kv_counts"]  # of these very lists: the oracle gets as many blocks
        rows.append({"step": step, "layer": layer, "density": float(counts.double().mean()) / mass.shape[-1],
                     "recall": recall_from_lse(lse, dense_lse(q, k)),
                     # mod: the kept share predicted for the mask in force after the step (at a refresh
                     # step the new mask's, not the one this call used), against the recall it got
                     "predicted_coverage": plan.get("predicted_coverage"),
                     "oracle_recall": mass_recall_from_mass(mass, oracle_mask(mass, blocks=int(counts.sum()))),
                     "rel_err": relative_l2(out.float(), ref)})
    return rows


def _row_name(method: str, density: float | None) -> str:
    return method if density is None else f"{method}@{density:g}"


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def run(args) -> dict:
    from .fidelity import _load_or_train
    from .video_dit import kernel_block_size, make_noise, sample

    if getattr(args, "synthetic", False):
        raise SystemExit("--equal-density runs on a DiT checkpoint, not with --synthetic")
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    out_dir = Path(args.out)
    model, ckpt, trained = _load_or_train(args, device)
    model = model.to(dtype)
    cfg = model.cfg
    if cfg.text_len:
        raise SystemExit("--equal-density: the baselines' masks assume video tokens only (config without text)")
    bs = args.block_size or kernel_block_size(cfg.seq_len, device.startswith("cuda"))
    steps, densities = args.steps, list(args.equal_density)
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup(steps)
    methods = list(args.methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    every = max(1, getattr(args, "metric_every", 1) or 1)
    shape = (1, cfg.in_channels, *cfg.latent)
    seeds = list(range(args.seed, args.seed + args.seeds))
    noises = {s: make_noise(shape, s, device, dtype) for s in seeds}

    captures: list = []  # (layer, q, k, v, out) of the compiled runs' calls, cleared after every step

    def sample_seeds(fn, step_context=None, on_step=None, first_seed_hook=None, capture=False, net=None):
        """Every seed through ``fn``; ``on_step`` sees the steps of the first seed. ``capture``: the
        capture hook on for every seed (compiled rows: the hook is part of the traced graph, so it stays
        on, the dense Inductor baseline's too, and every compiled timing carries it). ``net``: the model
        ``fn`` runs (default: the checkpoint's; a fine-tuned one for --finetuned rows)."""
        samples, times = {}, []
        net = model if net is None else net
        net.set_capture(captures if capture else None)
        try:
            for j, s in enumerate(seeds):
                if first_seed_hook is not None:
                    first_seed_hook(j == 0)
                captures.clear()
                inspect = j == 0 and on_step is not None  # the first seed compiles: it is not timed
                step_fn = on_step if inspect else (lambda i: captures.clear())
                with mb.inspectable(inspect), Stopwatch(device) as sw:
                    samples[s] = sample(fn, noises[s], steps, step_context=step_context, on_step=step_fn)
                times.append(sw.ms)
                if inspect and torch.device(device).type == "cuda":  # capture the CUDA graphs untimed
                    sample(fn, noises[s], steps, step_context=step_context, on_step=lambda i: captures.clear())
        finally:
            net.set_capture(None)
            captures.clear()
        return samples, times

    def timed(times):  # the first seed of a compiled model includes compilation
        return _mean(times[1:] or times)

    log(f"equal density: {cfg.seq_len} tokens, block {bs}, {steps} steps ({warmup} dense), seeds {seeds}, "
        f"densities {densities}, methods {methods}")
    reference, eager_ms = sample_seeds(model)
    rows = [{"method": "dense (eager SDPA)", "target_density": 1.0, "density": 1.0, "sample_ms": timed(eager_ms)}]
    base_ms = None
    if not args.no_inductor_baseline:
        torch._dynamo.reset()
        _, times = sample_seeds(mb.compile_model(model, "inductor"), capture=True)
        base_ms = timed(times)
        rows.append({"method": "dense (inductor)", "target_density": 1.0, "density": 1.0, "sample_ms": base_ms})
    skipped, step_rows = {}, []

    def write(final: bool) -> dict:  # after every method: a run cut short by a time limit keeps its rows
        return _write(out_dir, rows, step_rows, skipped, args, cfg, ckpt, trained, bs, warmup, densities, methods,
                      seeds, base_ms is not None and device.startswith("cuda"), every, final)

    def finish_row(method, d, samples, times, metric_rows, compiled):
        sparse = [r for r in metric_rows if r["step"] >= warmup]
        ms = timed(times)
        step_rows.extend({"method": method, "target_density": d, **r} for r in metric_rows)
        rows.append({
            "method": method, "target_density": d, "density": _mean([r["density"] for r in sparse]),
            "psnr_db": _mean([psnr(samples[s].float(), reference[s].float()) for s in seeds]),
            "ssim": _mean([ssim(samples[s][0].float(), reference[s][0].float(), layout="CTHW") for s in seeds]),
            "recall": _mean([r["recall"] for r in sparse]), "oracle_recall": _mean([r["oracle_recall"] for r in sparse]),
            "rel_err": _mean([r["rel_err"] for r in sparse]), "sample_ms": ms,
            "speedup_vs_inductor": base_ms / ms if compiled and base_ms and ms else None,
            "timing": "compiled (modsparse)" if compiled else "eager harness"})

    def modsparse_row(method, d, policy_opts, net=None):
        why = mb.backend_missing()
        if why:
            skipped[_row_name(method, d)] = why
            return
        extra = (getattr(args, "mod_options", None) or {}) if policy_opts["policy"] == "mod" else {}
        opts = {"block_size": bs, "video_grid": tuple(cfg.grid), "min_seq_len": 0, "num_steps": steps,
                "warmup_steps": warmup, **extra, **policy_opts}
        torch._dynamo.reset()
        mb.reset()
        metric_rows = []

        def on_step(i, _r=metric_rows, _p=opts["policy"]):
            if i >= warmup and (i - warmup) % every == 0:
                _r.extend(_modsparse_step_rows(captures, _p, i, bs))
            captures.clear()
        net = model if net is None else net
        samples, times = sample_seeds(mb.compile_model(net, "modsparse", opts),
                                      step_context=mb.step_context(), on_step=on_step, capture=True, net=net)
        finish_row(method, d, samples, times, metric_rows, compiled=True)

    def baseline_row(method, d):
        clock = StepClock()
        attn = BaselineAttention(method, d, cfg.grid, bs, warmup, clock, every)

        def first_seed(first, _a=attn):
            _a.record = first
        model.set_attention_override(attn)
        try:
            samples, times = sample_seeds(model, step_context=clock, first_seed_hook=first_seed)
        finally:
            model.set_attention_override(None)
        finish_row(method, d, samples, times, attn.rows, compiled=False)

    # each chosen policy at its own defaults first (no density asked: where does it land by itself?), then
    # every method at every target density
    jobs = [(f"{p} (defaults)", None, lambda p=p: modsparse_row(f"{p} (defaults)", None, {"policy": p}))
            for p in DEFAULT_RUNS if p in methods]
    # mod at other coverages and vmoba at other thresholds than their defaults, no density asked (what a
    # user would turn first)
    jobs += [(f"mod (coverage {c:g})", None, lambda c=c: modsparse_row(f"mod (coverage {c:g})", None,
                                                                        {"policy": "mod", "coverage": c}))
             for c in (getattr(args, "mod_coverage", None) or []) if "mod" in methods]
    jobs += [(f"vmoba (tau {t:g})", None, lambda t=t: modsparse_row(f"vmoba (tau {t:g})", None,
                                                                     {"policy": "vmoba", "tau": t}))
             for t in (getattr(args, "vmoba_tau", None) or []) if "vmoba" in methods]
    jobs += [(method, d, (lambda m=method, d=d: modsparse_row(m, d, MODSPARSE[m](d))) if method in MODSPARSE
              else (lambda m=method, d=d: baseline_row(m, d))) for d in densities for method in methods]
    # mod with other options beside the plain rows, in the same run (same baselines): at its defaults and
    # at every density; each variant's options go over --mod-options
    for name, extra in (getattr(args, "mod_variants", None) or {}).items():
        jobs += [(f"mod {name} (defaults)", None, lambda x=extra, n=name: modsparse_row(
                      f"mod {n} (defaults)", None, {"policy": "mod", **x}))]
        jobs += [(f"mod {name}", d, lambda x=extra, n=name, d=d: modsparse_row(
                      f"mod {n}", d, {**MODSPARSE["mod"](d), **x})) for d in densities]
    # VMoBA's training path: a sparse-fine-tuned copy of the checkpoint (train-dit --init --sparse vmoba),
    # sampled dense and with vmoba at every density, each against the original model's dense samples
    if getattr(args, "finetuned", None):
        from .train_dit import load_checkpoint
        tuned = load_checkpoint(args.finetuned, device).to(dtype).eval()
        if tuned.cfg.to_dict() != cfg.to_dict():
            raise SystemExit(f"--finetuned {args.finetuned}: its config differs from the checkpoint's")

        def tuned_dense():
            samples, times = sample_seeds(tuned, net=tuned)
            rows.append({"method": "vmoba fine-tuned, dense", "target_density": 1.0, "density": 1.0,
                         "psnr_db": _mean([psnr(samples[s].float(), reference[s].float()) for s in seeds]),
                         "ssim": _mean([ssim(samples[s][0].float(), reference[s][0].float(), layout="CTHW")
                                        for s in seeds]),
                         "sample_ms": timed(times), "timing": "eager"})
        jobs += [("vmoba fine-tuned, dense", 1.0, tuned_dense)]
        jobs += [("vmoba fine-tuned", d, lambda d=d: modsparse_row("vmoba fine-tuned", d, MODSPARSE["vmoba"](d),
                                                                    net=tuned)) for d in densities]
    for method, d, job in jobs:
        name = _row_name(method, d)
        try:
            job()
        except Exception as exc:  # one failing method is reported, the others still run
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
        log(f"{name} done")
        write(final=False)
    return write(final=True)


COLUMNS = ["method", "target_density", "density", "psnr_db", "ssim", "recall", "oracle_recall", "rel_err", "sample_ms",
           "speedup_vs_inductor", "timing"]


def _write(out_dir, rows, step_rows, skipped, args, cfg, ckpt, trained, bs, warmup, densities, methods, seeds,
           measured_speed, every, final) -> dict:
    settings = {"mode": "equal-density", "config": cfg.to_dict(), "checkpoint": ckpt, "trained": trained,
                "block_size": bs, "steps": args.steps, "warmup_steps": warmup, "metric_every": every,
                "densities": densities,
                "methods": methods, "seeds": seeds, "skipped": skipped,
                "mod_options": getattr(args, "mod_options", None), "mod_variants": getattr(args, "mod_variants", None)}
    notes = [f"every method: {args.steps} steps, the first {warmup} dense, the same seeds; PSNR/SSIM mean over "
             f"{len(seeds)} seeds vs eager dense; recall / oracle_recall / density / rel_err: mean over the layers "
             f"and the sparse steps (the first and every {every}th after it) of seed {seeds[0]}",
             "oracle_recall: the true densest blocks of each call with as many blocks as the method kept (over all "
             "heads together): the ceiling for any raw-order mask of that density; VMoBA's permuted blocks are not "
             "bounded by it",
             "mod / vmoba: compiled with backend=modsparse (density option; vmoba top-k per row of partition "
             "blocks); the static peers and the oracle: eager harness on the same kernel path, their sample_ms is "
             "not a speed claim; speedup_vs_inductor = Inductor-compiled dense sample time / the row's"]
    if not trained:
        notes.append("RANDOM weights (no checkpoint): attention near-uniform, fidelity numbers not meaningful")
    if not final:
        notes.append("partial: written after each method; the run has not finished")
    notes.extend(f"skipped {k}: {v}" for k, v in skipped.items())
    payload = write_results(out_dir, "fidelity_equal_density",
                            f"Fidelity at equal density: video DiT ({cfg.seq_len} tokens, {cfg.depth} layers, "
                            f"{cfg.heads} heads x {cfg.head_dim})", rows, settings=settings, columns=COLUMNS,
                            notes=notes, extra={"per_step": step_rows}, quiet=not final,
                            timing="CUDA-synchronised wall time per sample, mean over the seeds after the first")
    _plot(out_dir, rows, measured_speed)
    return payload


def _plot(out_dir: Path, rows: list[dict], measured_speed: bool) -> None:
    """PSNR and recall vs density per method, and PSNR vs measured speedup (compiled rows, GPU)."""
    plt = pyplot()
    pts = [r for r in rows if r.get("psnr_db") is not None and r.get("target_density") is not None]
    if plt is None or not pts:
        return
    panels = [("psnr_db", "PSNR vs dense (dB)"), ("recall", "attention-mass recall")]
    fig, axes = plt.subplots(1, len(panels) + measured_speed, figsize=(5.5 * (len(panels) + measured_speed), 4))
    for ax, (col, label) in zip(axes, panels):
        for method in dict.fromkeys(r["method"] for r in pts):
            mr = sorted((r for r in pts if r["method"] == method and r.get(col) is not None),
                        key=lambda r: r["target_density"])
            ax.plot([r["target_density"] for r in mr], [min(r[col], 99.0) for r in mr], marker="o", label=method)
        ax.set_xlabel("target block density"), ax.set_ylabel(label), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    if measured_speed:
        ax = axes[-1]
        for method in MODSPARSE:
            mr = [r for r in pts if r["method"] == method and r.get("speedup_vs_inductor")]
            if mr:
                ax.plot([r["speedup_vs_inductor"] for r in mr], [r["psnr_db"] for r in mr], marker="o", label=method)
        ax.set_xlabel("sample speedup vs Inductor dense (measured)"), ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.suptitle("Equal density: fidelity per method")
    fig.tight_layout(), fig.savefig(out_dir / "fidelity_equal_density.png", dpi=120), plt.close(fig)


__all__ = ["METHODS", "MODSPARSE", "DEFAULT_RUNS", "BaselineAttention", "StepClock", "default_warmup", "run"]
