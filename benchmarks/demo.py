"""``python -m benchmarks.demo``: compile a small video DiT with ``backend="modsparse"``, denoise,
and print speed and fidelity of each sparse policy against the same model compiled dense.

On CUDA it runs the harness's "small" DiT (8x16x16 = 2048 tokens, bf16, 64-token blocks); on CPU a
reduced one in float32, where the sparse path is the torch reference: CPU times show that the
integration works, not what the kernels gain (GPU numbers are in BENCHMARKS.md).

With random weights a DiT's attention is close to uniform, so sparse masks lose more than on a
trained model: pass ``--checkpoint`` (from ``python -m benchmarks run train-dit``) for real fidelity.
"""
from __future__ import annotations

import argparse
import time

import torch

import modcompile
from benchmarks.metrics import psnr, ssim
from benchmarks.video_dit import DiTConfig, VideoDiT, make_noise, sample


def _config(device: str) -> tuple[DiTConfig, dict]:
    if device == "cuda":
        return DiTConfig(latent=(8, 32, 32), dim=384, depth=6, heads=6), {"block_size": 64, "min_seq_len": 1024}
    return DiTConfig(latent=(4, 16, 16), dim=64, depth=4, heads=2, freq_dim=32), {"block_size": 32,
                                                                                    "min_seq_len": 128}


def _timed_sample(model, noise, steps, device) -> tuple[torch.Tensor, float]:
    modcompile.reset()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = sample(model, noise, steps, step_context=modcompile.denoising_step)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30 CUDA, 12 CPU)")
    parser.add_argument("--policies", default="mod,vmoba", help="comma-separated modsparse policies")
    parser.add_argument("--checkpoint", default=None, help="trained small-DiT checkpoint (train-dit level)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = args.device
    cfg, base_options = _config(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = args.steps or (30 if device == "cuda" else 12)
    torch.manual_seed(args.seed)
    model = VideoDiT(cfg)
    weights = "random weights"
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu")
        model = VideoDiT(DiTConfig(**state["config"]) if "config" in state else cfg)
        model.load_state_dict(state.get("model", state))
        cfg, weights = model.cfg, f"checkpoint {args.checkpoint}"
    model = model.to(device=device, dtype=dtype).eval()
    noise = make_noise((1, cfg.in_channels, *cfg.latent), args.seed, device=device, dtype=dtype)
    t, h, w = cfg.grid
    print(f"modcompile demo: VideoDiT depth {cfg.depth}, {cfg.heads} heads x {cfg.head_dim}, "
          f"{t}x{h}x{w} = {cfg.seq_len} tokens, {weights}, {device} {str(dtype).replace('torch.', '')}, "
          f"{steps} steps")

    dense = torch.compile(model, backend="inductor")
    sample(dense, noise, 2)                                   # compile outside the timing
    reference, dense_time = _timed_sample(dense, noise, steps, device)
    rows = [("dense (inductor)", dense_time, 1.0, float("inf"), 1.0, 1.0)]
    for policy in [p for p in args.policies.split(",") if p]:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="modsparse",
                                 options={"policy": policy, "num_steps": steps, **base_options})
        sample(compiled, noise, 2)                            # compile outside the timing
        out, seconds = _timed_sample(compiled, noise, steps, device)
        table = modcompile.report(print_table=False)
        densities = [r.density for r in table if r.density is not None]
        density = sum(densities) / len(densities) if densities else float("nan")
        rows.append((f"modsparse {policy}", seconds, dense_time / seconds, psnr(out.float(), reference.float()),
                     ssim(out[0].float(), reference[0].float()), density))
        print(f"\nper-site report, policy {policy} (density: last step):")
        modcompile.report()

    print("\n| run | time (s) | speedup vs dense | PSNR vs dense (dB) | SSIM vs dense | density (last step) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, seconds, speedup, p, s, d in rows:
        print(f"| {name} | {seconds:.3f} | {speedup:.2f}x | {p:.2f} | {s:.4f} | {d:.3f} |")
    if device != "cuda":
        print("\nCPU run: the sparse path is the torch reference, so CPU times are no speed claim.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
