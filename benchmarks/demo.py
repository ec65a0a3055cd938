"""``python -m benchmarks.demo``: compile a small video DiT with ``backend="modsparse"``, denoise,
and print speed and fidelity of each sparse policy against the same model compiled dense.

On CUDA it runs a DiT with the attention shape of Wan2.1-1.3B (12 heads x 128, 16x30x52 = 24960
tokens, 4 layers, bf16, 128-token blocks; ``--preset small`` for a 6 x 64-head one at 16384
tokens); on CPU a reduced one in float32, where the sparse path is the torch reference: CPU times
show that the integration works, not what the kernels gain (GPU numbers are in BENCHMARKS.md).
Each compiled model runs the whole schedule once untimed (compilation, kernel tuning), then timed.

With random weights a DiT's attention is close to uniform, so sparse masks lose more than on a
trained model: pass ``--checkpoint`` (from ``python -m benchmarks run train-dit``) for real fidelity.
Random weights replace the harness's zero-initialised output layers (adaLN-zero), which would
make every model output exactly 0 and every comparison trivially perfect.
"""
from __future__ import annotations

import argparse

import torch

import modcompile
from .common import Stopwatch
from .metrics import psnr, ssim
from .video_dit import DiTConfig, VideoDiT, make_noise, sample


# GPU presets: "wan" has the attention shape of Wan2.1-1.3B at a 16-frame 480p latent (12 heads x
# 128, 16x30x52 = 24960 tokens) with 4 of its 30 layers, where attention is most of a step's time;
# "small" is a 6-layer, 6 x 64-head DiT at 16384 tokens, where per-call planning costs show.
PRESETS = {
    "wan": (DiTConfig(latent=(16, 60, 104), dim=1536, depth=4, heads=12), {"block_size": 128, "min_seq_len": 1024}),
    "small": (DiTConfig(latent=(16, 64, 64), dim=384, depth=6, heads=6), {"block_size": 128, "min_seq_len": 1024}),
    "cpu": (DiTConfig(latent=(4, 16, 16), dim=64, depth=4, heads=2, freq_dim=32), {"block_size": 32, "min_seq_len": 128}),
}


def randomize_zero_init(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _timed_sample(model, noise, steps, device, profile=False) -> tuple[torch.Tensor, float]:
    sample(model, noise, steps, step_context=modcompile.denoising_step)  # compile, tune: untimed
    if profile:
        from torch.profiler import ProfilerActivity, profile as profiler
        modcompile.reset()
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sample(model, noise, steps, step_context=modcompile.denoising_step)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))
    modcompile.reset()
    with Stopwatch(device) as sw:
        out = sample(model, noise, steps, step_context=modcompile.denoising_step)
    return out, sw.ms / 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30 CUDA, 12 CPU)")
    parser.add_argument("--policies", default="mod,vmoba", help="comma-separated modsparse policies")
    parser.add_argument("--checkpoint", default=None, help="trained small-DiT checkpoint (train-dit level)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model size (default: wan on CUDA, cpu on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of each timed run")
    args = parser.parse_args(argv)

    device = args.device
    cfg, base_options = PRESETS[args.preset or ("wan" if device == "cuda" else "cpu")]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = args.steps or (30 if device == "cuda" else 12)
    torch.manual_seed(args.seed)
    model = VideoDiT(cfg)
    randomize_zero_init(model, args.seed)
    weights = "random weights"
    if args.checkpoint:
        from .train_dit import load_checkpoint
        model = load_checkpoint(args.checkpoint)
        cfg, weights = model.cfg, f"checkpoint {args.checkpoint}"
    model = model.to(device=device, dtype=dtype).eval()
    noise = make_noise((1, cfg.in_channels, *cfg.latent), args.seed, device=device, dtype=dtype)
    t, h, w = cfg.grid
    print(f"modcompile demo: VideoDiT depth {cfg.depth}, {cfg.heads} heads x {cfg.head_dim}, "
          f"{t}x{h}x{w} = {cfg.seq_len} tokens, {weights}, {device} {str(dtype).replace('torch.', '')}, "
          f"{steps} steps")

    dense = torch.compile(model, backend="inductor")
    reference, dense_time = _timed_sample(dense, noise, steps, device, args.profile)
    rows = [("dense (inductor)", dense_time, 1.0, float("inf"), 1.0, 0.0, 1.0)]
    update = (reference - noise).float()  # what denoising changed: the PSNR of samples hides it when small
    for policy in [p for p in args.policies.split(",") if p]:
        torch._dynamo.reset()
        modcompile.reset(forget_sites=True)
        compiled = torch.compile(model, backend="modsparse",
                                 options={"policy": policy, "num_steps": steps, **base_options})
        out, seconds = _timed_sample(compiled, noise, steps, device, args.profile)
        table = modcompile.report(print_table=False)
        densities = [r.density for r in table if r.density is not None]
        density = sum(densities) / len(densities) if densities else float("nan")
        update_error = ((out - noise).float() - update).norm() / update.norm()
        rows.append((f"modsparse {policy}", seconds, dense_time / seconds, psnr(out.float(), reference.float()),
                     ssim(out[0].float(), reference[0].float()), float(update_error), density))
        print(f"\nper-site report, policy {policy} (density: last step):")
        modcompile.report()

    print("\n| run | time (s) | speedup vs dense | PSNR vs dense (dB) | SSIM vs dense | rel. error of the update "
          "(sample - noise) | density (last step) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, speedup, p, s, e, d in rows:
        print(f"| {name} | {seconds:.3f} | {speedup:.2f}x | {p:.2f} | {s:.4f} | {e:.4f} | {d:.3f} |")
    if device != "cuda":
        print("\nCPU run: the sparse path is the torch reference, so CPU times are no speed claim.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
