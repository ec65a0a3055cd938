"""Level 3: a Wan2.1-1.3B-shaped diffusers transformer, inductor (dense) vs modsparse.

Random weights (fine for speed, meaningless for quality). Default shape: 30 layers, 12 heads x
128, latent 21x60x104 -> patch (1,2,2) -> 21x30x52 = 32760 tokens, 512 text tokens. A measured
subset of steps is run with explicit ``modcompile.denoising_step(i, num_steps)`` (twice: the
first round compiles and warms up, the second is timed); the policy's dense warm-up is shortened to ``--warmup-steps`` so that sparse
steps are reached quickly, then ``--timed-steps`` sparse steps are timed. The full run is
*extrapolated* from the per-step medians with the policy's default warm-up for ``--num-steps``
(labelled as such). The attention share of the dense run comes from a second dense compile whose
self-attention SDPA is replaced by an identity-like op.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backend as mb
from .common import Stopwatch, default_device, log, parse_dtype, progress, write_results

# Default dense warm-up of each policy for a run of n steps, when the policy can't say.
_FALLBACK_WARMUP = {"mod": lambda n: round(12 * n / 50), "vmoba": lambda n: round(0.25 * n), "dense": lambda n: n}


def wan_config(layers: int, tiny: bool) -> dict:
    if tiny:
        return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def default_warmup(policy: str, num_steps: int) -> int:
    try:
        from modcompile.config import SparsityConfig
        from modcompile.policies import make_policy
        return int(make_policy(SparsityConfig(policy=policy)).default_warmup(num_steps))
    except Exception:
        return _FALLBACK_WARMUP.get(policy, lambda n: 0)(num_steps)


@contextlib.contextmanager
def self_attention_replaced():
    """Replace self-attention SDPA (q and k of equal length) by a cheap identity-like op."""
    original = F.scaled_dot_product_attention

    def cheap(query, key, value, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:
            return value * 1.0  # same shape as the attention output, negligible cost
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = cheap
    torch.nn.functional.scaled_dot_product_attention = cheap
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original


def _time_steps(fn, steps, device, step_ctx, num_steps, phase_of=None, desc="", show=True, rounds=2,
                round_s=None):
    """Run the step schedule ``rounds`` times (a new generation each time) and keep the last round:
    the first round compiles and warms Inductor's lazily loaded kernels. ``round_s`` (a list) gets
    each round's wall time in seconds (the first minus the last: the compile time)."""
    for _ in range(rounds):
        mb.reset()
        out = []
        t0 = time.perf_counter()
        for i in progress(steps, desc=desc, enabled=show):
            with step_ctx(i, num_steps), Stopwatch(device) as sw, torch.no_grad():
                fn(i)
            out.append({"step": i, "ms": sw.ms, "phase": phase_of() if phase_of else "dense"})
        if round_s is not None:
            round_s.append(time.perf_counter() - t0)
    return out


def _site_phase(policy: str) -> str:
    plans = mb.current_site_plans(policy)
    if not plans:
        return "dense (no sparse site)"
    dense = sum(p["dense"] for p in plans.values())
    return "dense" if dense == len(plans) else ("sparse" if dense == 0 else "mixed")


def _timed_phase(name: str, fn):
    """Run one backend's compile + schedules, logging its wall time (compiles dominate a first run)."""
    t0 = time.perf_counter()
    out = fn()
    log(f"e2e: {name} done in {time.perf_counter() - t0:.0f} s (compile and both rounds)")
    return out


def quantize_linears(model, kind: str, device: str) -> str:
    """torchao float8 on the model's linear layers, before any compile (the dense baseline and every
    modsparse run use the same quantized model). CUDA: dynamic float8 activations and weights, one
    scale per row (Hopper's fp8 matmul); CPU: float8 weights only (what torchao runs there)."""
    if kind != "float8":
        raise SystemExit(f"--torchao: unknown {kind!r} (none, float8)")
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                          PerRow, quantize_)
    except Exception as exc:
        raise SystemExit(f"--torchao float8 needs torchao ({type(exc).__name__}: {exc})") from exc
    cuda = str(device).startswith("cuda")
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if cuda
              else Float8WeightOnlyConfig())
    what = "torchao float8: dynamic activations + weights, per row" if cuda else "torchao float8: weights only"
    log(f"e2e: linear layers quantized ({what})")
    return what


def run(args) -> dict:
    try:
        from diffusers import WanTransformer3DModel
    except Exception as exc:
        msg = f"e2e level skipped: diffusers is not installed here ({type(exc).__name__}: {exc})"
        log(msg)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "e2e_SKIPPED.txt").write_text(msg + "\n")
        return {"skipped": msg}
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    grid = tuple(args.grid) if not args.tiny else (2, 8, 8)
    text_len = args.text_len if not args.tiny else 4
    layers = args.layers if not args.tiny else min(args.layers, 2)
    cfg = wan_config(layers, args.tiny)
    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(**cfg).to(device=device, dtype=dtype).eval()
    linears = quantize_linears(model, args.torchao, device) if getattr(args, "torchao", "none") != "none" else None
    C = cfg["in_channels"]
    x = torch.randn(1, C, *grid, device=device, dtype=dtype)
    text = torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype)
    tok_grid = (grid[0] // 1, grid[1] // 2, grid[2] // 2)
    tokens = tok_grid[0] * tok_grid[1] * tok_grid[2]
    n = args.num_steps
    ts = torch.linspace(999, 0, n, device=device)
    log(f"e2e: Wan-shaped {layers} layers, {cfg['num_attention_heads']}x{cfg['attention_head_dim']}, latent {grid} -> "
        f"{tokens} tokens + {text_len} text, {dtype} on {device}")

    def step_fn(m):
        return lambda i: m(hidden_states=x, timestep=ts[i:i + 1], encoder_hidden_states=text, return_dict=False)

    W, T = args.warmup_steps, args.timed_steps
    if args.tiny:
        args.options = {"min_seq_len": 0, **args.options}
    no_ctx = lambda i, n_: contextlib.nullcontext()
    show = not args.no_progress
    # ---- dense: inductor
    torch._dynamo.reset()
    dense_model = torch.compile(model, backend="inductor")
    rounds = []
    dense_steps = _timed_phase("inductor", lambda: _time_steps(step_fn(dense_model), range(W + T), device, no_ctx,
                                                               n, desc="inductor", show=show, round_s=rounds))
    dense_ms = statistics.median(r["ms"] for r in dense_steps)
    rows = [{"backend": "inductor (dense)", "style": "whole", "policy": "dense", "phase": "dense",
             "steps_timed": len(dense_steps), "step_ms": dense_ms, "vs_dense": 1.0, "compile_s": rounds[0] - rounds[-1],
             "full_run_s": dense_ms * n / 1e3, "full_vs_dense": 1.0, "full_run": f"{n} x dense step (extrapolated)"}]
    attention_share = None
    if not args.no_attention_share:
        torch._dynamo.reset()
        with self_attention_replaced():
            cheap_model = torch.compile(model, backend="inductor")
            cheap = _timed_phase("no-attention", lambda: _time_steps(step_fn(cheap_model), range(W + T), device,
                                                                     no_ctx, n, desc="no-attn", show=show))
        no_attn_ms = statistics.median(r["ms"] for r in cheap)
        attention_share = max(0.0, 1.0 - no_attn_ms / dense_ms)
        rows.append({"backend": "inductor, self-attn SDPA -> identity", "policy": "-", "phase": "dense",
                     "steps_timed": len(cheap), "step_ms": no_attn_ms, "vs_dense": no_attn_ms / dense_ms,
                     "full_run": f"self-attention share of the dense step: {attention_share:.1%}"})
    skipped = {}

    def write(final: bool):
        settings = {"model": "diffusers WanTransformer3DModel (random weights)", "config": cfg, "latent": grid,
                    "linear_layers": linears or "as built (no torchao)",
                    "tokens": tokens, "text_len": text_len, "dtype": str(dtype), "warmup_steps": W,
                    "timed_steps": T, "num_steps": n, "policies": args.policies, "options": args.options,
                    "skipped": skipped, "attention_share": attention_share, "complete": final}
        notes = [f"dense baseline: the same model compiled with backend=inductor in the same run; step = one "
                 f"transformer forward (batch 1, no CFG); every schedule ({W} warm-up + {T} steps) runs twice, the "
                 f"second is timed",
                 "modsparse runs shorten the dense warm-up to --warmup-steps so sparse steps are reached; the "
                 "full-run column extrapolates with the policy's default warm-up for the run length (not measured)",
                 "attention share: 1 - step time with self-attention SDPA replaced by an identity-like op / dense "
                 "step time"]
        notes.extend(f"skipped {k2}: {v2}" for k2, v2 in skipped.items())
        if not final:
            notes.append("partial: written after each backend; the run did not finish all of them")
        return write_results(Path(args.out), "e2e", f"End to end: Wan2.1-1.3B-shaped transformer, {tokens} "
                             f"tokens, {layers} layers", rows, settings=settings, notes=notes, quiet=not final,
                             columns=["backend", "style", "policy", "phase", "steps_timed", "density", "step_ms",
                                      "vs_dense", "compile_s", "full_run_s", "full_vs_dense", "full_run"],
                             timing="CUDA-synchronised wall time per step, median of the timed steps")

    write(final=False)
    why_backend = mb.backend_missing()
    for policy in args.policies:
        why = why_backend or mb.policy_missing(policy)
        if why:
            log(f"skip {policy}: {why}")
            skipped[policy] = why
            continue
        for style in args.styles:
          opts = {"policy": policy, "warmup_steps": W, "num_steps": n, **args.options}
          torch._dynamo.reset()
          mb.reset(forget_sites=True)
          rounds = []
          try:
              if style == "regional":  # diffusers' compile_repeated_blocks: one compiled block for every layer
                  sparse_model = copy.deepcopy(model)
                  sparse_model.compile_repeated_blocks(backend="modsparse", options=opts)
              else:
                  sparse_model = mb.compile_model(model, "modsparse", opts)
              steps = _timed_phase(f"{policy} {style}", lambda: _time_steps(
                  step_fn(sparse_model), range(W + T), device, mb.step_context(), n,
                  phase_of=lambda: _site_phase(policy), desc=policy, show=show, round_s=rounds))
          except Exception as exc:
              log(f"policy {policy} {style} FAILED: {type(exc).__name__}: {exc}")
              skipped[f"{policy} {style}"] = f"failed: {type(exc).__name__}: {exc}"
              continue
          dens = [p["density"] for p in mb.current_site_plans(policy).values() if p["density"] is not None]
          by_phase = {}
          for r in steps:
              by_phase.setdefault(r["phase"], []).append(r["ms"])
          sparse_ms = statistics.median(by_phase["sparse"]) if "sparse" in by_phase else None
          dense_phase_ms = statistics.median(by_phase["dense"]) if "dense" in by_phase else dense_ms
          w_full = default_warmup(policy, n)
          full_ms = None
          if sparse_ms is not None:
              full_ms = w_full * dense_phase_ms + (n - w_full) * sparse_ms
          for phase, ms in sorted(by_phase.items()):
              med = statistics.median(ms)
              rows.append({"backend": "modsparse", "style": style, "policy": policy, "phase": phase,
                           "steps_timed": len(ms), "step_ms": med, "vs_dense": med / dense_ms,
                           "compile_s": rounds[0] - rounds[-1] if phase == "sparse" else None,
                           "density": (sum(dens) / len(dens) if dens else None) if phase == "sparse" else 1.0,
                           "full_run_s": full_ms / 1e3 if full_ms and phase == "sparse" else None,
                           "full_vs_dense": full_ms / (dense_ms * n) if full_ms and phase == "sparse" else None,
                           "full_run": (f"extrapolated: {w_full} dense + {n - w_full} sparse steps at the medians"
                                        if phase == "sparse" else None)})
          write(final=False)
    return write(final=True)
