"""``python -m benchmarks run LEVEL [options] --out DIR``

Levels:
  kernel     block-sparse kernel vs dense SDPA / FlexAttention (delegates to benchmarks/bench_kernel.py)
  policy     one attention layer per policy: full per-call cost (pooling, selection, permutation,
             predictor) over a denoising schedule vs dense SDPA, on structured synthetic inputs
  e2e        Wan2.1-1.3B-shaped diffusers transformer: inductor (dense) vs modsparse, per step and
             extrapolated to a full run, plus the attention share of the dense run
  fidelity   PSNR/SSIM, per-layer error, recall, density of each policy vs dense on the trained small
             video DiT (or --synthetic: structured synthetic attention, no training)
  train-dit  train the small video DiT on procedural videos, save a checkpoint; --compare POLICY trains
             the same model through modsparse too (same data, seeds and schedule) and compares
  attention-stats  per layer / head / step: key blocks covering 90% / 95% of the attention mass and
             how local it is (own frame, spatial window, sink columns), from a trained DiT
  testbed    the attention testbed's summary: attention-stats' rows per phase (quartiles over heads,
             head kinds), the issue-19 goal verdicts, and sampled frames next to training frames
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

LEVELS = {
    "kernel": "block-sparse kernel vs dense SDPA / FlexAttention (benchmarks/bench_kernel.py)",
    "policy": "per-layer attention cost of each policy vs dense SDPA (synthetic inputs)",
    "e2e": "Wan2.1-1.3B-shaped transformer: inductor vs modsparse denoising steps",
    "fidelity": "policy fidelity vs dense on the trained small DiT (or --synthetic)",
    "train-dit": "train the small video DiT on procedural videos",
    "attention-stats": "attention concentration and locality per layer, head and step of a trained DiT",
    "testbed": "attention testbed summary: concentration per phase, goal verdicts, samples vs training frames",
}


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _common(p: argparse.ArgumentParser):
    p.add_argument("--out", default="results", help="output directory (markdown, JSON, PNG)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one level", description="\n".join(f"{k:10s} {v}" for k, v in LEVELS.items()),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    levels = run.add_subparsers(dest="level", metavar="LEVEL")
    levels.required = True

    # kernel: arguments are forwarded to bench_kernel.main
    k = levels.add_parser("kernel", help=LEVELS["kernel"])
    _common(k)
    # any other argument (e.g. --quick, --no-flex) is passed to bench_kernel.main

    p = levels.add_parser("policy", help=LEVELS["policy"])
    _common(p)
    p.add_argument("--policies", type=_csv, default=["dense", "vmoba", "mod"])
    p.add_argument("--grid", type=_ints, default=None, help="T,H,W of the latent token grid (default 21,30,52 on "
                   "CUDA, 2,8,8 on CPU)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--text-len", type=int, default=0)
    p.add_argument("--block-size", type=int, default=None, help="kernel block (default 128 on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the schedule")
    p.add_argument("--repeats", type=int, default=2, help="schedules run (the first includes compilation)")
    p.add_argument("--options", type=json.loads, default={}, help="JSON of extra modsparse options for all policies")

    e = levels.add_parser("e2e", help=LEVELS["e2e"])
    _common(e)
    e.add_argument("--layers", type=int, default=30, help="transformer layers (30 = Wan2.1-1.3B)")
    e.add_argument("--grid", type=_ints, default=[21, 60, 104], help="latent T,H,W before patch (1,2,2); "
                   "720p: 21,90,160")
    e.add_argument("--text-len", type=int, default=512)
    e.add_argument("--policies", type=_csv, default=["mod", "vmoba"])
    e.add_argument("--styles", type=_csv, default=["whole"],
                   help="compile styles: whole (torch.compile(model)), regional (compile_repeated_blocks)")
    e.add_argument("--warmup-steps", type=int, default=2, help="untimed steps (compilation, dense warm-up state)")
    e.add_argument("--timed-steps", type=int, default=3, help="timed steps per phase")
    e.add_argument("--num-steps", type=int, default=50, help="steps of the full run the timings extrapolate to")
    e.add_argument("--no-attention-share", action="store_true")
    e.add_argument("--tiny", action="store_true", help="tiny Wan config (CPU smoke test)")
    e.add_argument("--options", type=json.loads, default={})
    e.add_argument("--torchao", default="none", choices=["none", "float8"], help="quantize the linear layers with "
                   "torchao first (dense baseline and modsparse alike; float8: dynamic per-row on CUDA, weight-only "
                   "on CPU)")

    f = levels.add_parser("fidelity", help=LEVELS["fidelity"])
    _common(f)
    f.add_argument("--synthetic", action="store_true", help="structured synthetic q/k/v instead of the DiT")
    f.add_argument("--policies", type=_csv, default=["dense", "vmoba", "mod"])
    f.add_argument("--sweep", action="store_true", help="also sweep each policy's knob (vmoba tau, mod coverage)")
    f.add_argument("--knob-values", type=json.loads, default=None, help='--sweep values per policy as JSON, e.g. '
                   '\'{"vmoba": [0.5, 0.75], "mod": [0.8, 0.95]}\' (default: benchmarks/fidelity.KNOBS)')
    f.add_argument("--steps", type=int, default=None, help="denoising steps (default 30 DiT, 20 synthetic)")
    f.add_argument("--block-size", type=int, default=None, help="kernel block (CUDA: 128 synthetic and DiTs "
                   "of 8192+ tokens, else 64; CPU 16)")
    f.add_argument("--metric-every", type=int, default=1, help="per-layer metrics every n steps")
    f.add_argument("--heatmap-layers", type=int, default=3)
    f.add_argument("--heatmap-heads", type=int, default=4)
    # DiT mode
    f.add_argument("--config", default="small", help="DiT config: small (2048 tokens) | long (16384 tokens, "
                   "head_dim 128) | tiny | tiny-text | tiny-video")
    f.add_argument("--checkpoint", default=None, help="checkpoint path (default OUT/dit_CONFIG.pt)")
    f.add_argument("--no-inductor-baseline", action="store_true", help="time against eager dense SDPA instead "
                   "of the Inductor-compiled dense model (one compile fewer)")
    f.add_argument("--train-minutes", type=float, default=0.0, help="train this long when the checkpoint is missing")
    f.add_argument("--batch-size", type=int, default=16, help="training batch when training here")
    f.add_argument("--seeds", type=int, default=2, help="number of sampling seeds")
    # synthetic mode
    f.add_argument("--grid", type=_ints, default=None, help="synthetic T,H,W (default 21,30,52 CUDA / 2,8,8 CPU)")
    f.add_argument("--heads", type=int, default=None)
    f.add_argument("--head-dim", type=int, default=None)
    f.add_argument("--text-len", type=int, default=0)
    f.add_argument("--baseline-densities", type=_floats, default=[0.1, 0.2, 0.3])
    # equal-density mode (benchmarks/equal_density.py)
    f.add_argument("--equal-density", type=_floats, default=None, help="DiT mode: run every --methods entry at "
                   "these block densities (e.g. 0.1,0.2,0.3,0.5) with the same steps and dense warm-up")
    f.add_argument("--methods", type=_csv, default=None, help="--equal-density methods (default all: mod, "
                   "mod-blocks, mod-lines, vmoba, oracle, sta, radial, svg)")
    f.add_argument("--mod-coverage", type=_floats, default=None, help="--equal-density: also run mod at these "
                   "coverages with no density asked (rows 'mod (coverage C)')")
    f.add_argument("--vmoba-tau", type=_floats, default=None, help="--equal-density: also run vmoba at these "
                   "thresholds with no density asked (rows 'vmoba (tau T)')")
    f.add_argument("--mod-options", type=json.loads, default=None, help="--equal-density: extra modsparse options "
                   "of every mod row as JSON, e.g. '{\"refresh_interval\": 5}'")
    f.add_argument("--mod-variants", type=json.loads, default=None, help="--equal-density: also run mod with "
                   "these options, rows 'mod NAME', as JSON {NAME: options}, e.g. '{\"r3\": {\"refresh_interval\": 3}}'")
    f.add_argument("--finetuned", default=None, help="--equal-density: also sample this fine-tuned copy of the "
                   "checkpoint (train-dit --init CKPT --sparse vmoba), dense and with vmoba at every density, "
                   "against the checkpoint's dense samples")
    f.add_argument("--warmup-steps", type=int, default=None, help="--equal-density: dense steps first for every "
                   "method (default: mod's rule, 12 of 50)")

    a = levels.add_parser("attention-stats", help=LEVELS["attention-stats"])
    _common(a)
    a.add_argument("--config", default="small", help="DiT config when training here or without a checkpoint")
    a.add_argument("--checkpoint", default=None, help="checkpoint path (default OUT/dit_CONFIG.pt)")
    a.add_argument("--train-minutes", type=float, default=0.0, help="train this long when the checkpoint is missing")
    a.add_argument("--batch-size", type=int, default=16, help="training batch when training here")
    a.add_argument("--steps", type=int, default=30, help="denoising steps of the sample")
    a.add_argument("--stats-steps", type=_ints, default=None, help="steps analysed (default: first, middle, last)")
    a.add_argument("--block-size", type=int, default=None, help="key block (default: the kernel block for the "
                   "DiT's length, 128 from 8192 tokens on)")
    a.add_argument("--query-rows", type=int, default=512, help="queries for the token-level shares")
    a.add_argument("--window", type=int, default=None, help="spatial window half-width in latent tokens "
                   "(default: 1/8 of the smaller of H, W)")
    a.add_argument("--sinks", type=int, default=16, help="key columns counted as sinks")

    b = levels.add_parser("testbed", help=LEVELS["testbed"])
    _common(b)
    b.add_argument("--checkpoint", required=True, help="the trained testbed DiT")
    b.add_argument("--stats", default=None, help="attention-stats' JSON for it (default OUT/attention_stats.json)")
    b.add_argument("--samples", type=int, default=2, help="sampled videos shown (noise seeds SEED, SEED+1, ...)")
    b.add_argument("--sample-steps", type=int, default=30, help="Euler steps per sample")

    t = levels.add_parser("train-dit", help=LEVELS["train-dit"])
    _common(t)
    t.add_argument("--config", default="small")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--val-every", type=int, default=200)
    t.add_argument("--checkpoint", default=None, help="where to save (default OUT/dit_small.pt)")
    t.add_argument("--compile", action="store_true", help="torch.compile the training model (inductor)")
    t.add_argument("--compare", default=None, choices=["vmoba", "mod", "dense"],
                   help="then train through backend=modsparse with this policy for the same steps and data")
    t.add_argument("--block-size", type=int, default=None, help="kernel block for --compare (CUDA: 128 from "
                   "8192 tokens on, else 64; CPU 16)")
    t.add_argument("--dense-warmup", type=_floats, default=[0.0], help="--compare: fractions of the steps trained "
                   "dense before the sparse run takes over, one sparse run each (e.g. 0,0.25)")
    t.add_argument("--options", type=json.loads, default={}, help="--compare / --sparse: JSON of extra modsparse "
                   "options (e.g. '{\"tau\": 0.25}')")
    t.add_argument("--init", default=None, help="fine-tune this checkpoint (its config; --config is ignored) "
                   "instead of training from scratch; saved to --checkpoint")
    t.add_argument("--sparse", default=None, choices=["vmoba", "mod", "dense"],
                   help="--init: fine-tune through backend=modsparse with this policy (VMoBA's training path)")
    return parser


def _fill_defaults(args):
    import torch
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.level == "policy":
        args.grid = args.grid or ([21, 30, 52] if cuda else [2, 8, 8])
        args.heads = args.heads or (12 if cuda else 2)
        args.head_dim = args.head_dim or (128 if cuda else 32)
        args.block_size = args.block_size or (128 if cuda else 16)
    if args.level == "fidelity":
        if args.synthetic:
            args.grid = args.grid or ([21, 30, 52] if cuda else [2, 8, 8])
            args.heads = args.heads or (12 if cuda else 4)
            args.head_dim = args.head_dim or (128 if cuda else 32)
            args.block_size = args.block_size or (128 if cuda else 16)
            args.steps = args.steps or 20
        else:  # the block size follows the loaded checkpoint's length (fidelity.run_dit)
            args.steps = args.steps or 30
    if args.level == "train-dit":
        if args.steps is None and args.minutes is None:
            args.minutes = 3.0
        if args.block_size is None and not getattr(args, "init", None):   # --init: from the checkpoint's config
            from .video_dit import get_config, kernel_block_size
            args.block_size = kernel_block_size(get_config(args.config).seq_len, cuda)
    return args


def run_level(args):
    level = args.level
    if level == "kernel":
        return _run_kernel(args)
    module = {"policy": "benchmarks.policy", "e2e": "benchmarks.e2e", "fidelity": "benchmarks.fidelity",
              "train-dit": "benchmarks.train_dit", "attention-stats": "benchmarks.attention_stats",
              "testbed": "benchmarks.testbed"}[level]
    if level == "fidelity" and getattr(args, "equal_density", None):
        module = "benchmarks.equal_density"
    return importlib.import_module(module).run(_fill_defaults(args))


def _run_kernel(args):
    try:
        bench_kernel = importlib.import_module("benchmarks.bench_kernel")
    except ImportError as exc:
        print(f"[bench] kernel level skipped: benchmarks/bench_kernel.py cannot be imported ({exc})")
        return None
    argv = list(args.rest or [])
    if "--out" not in argv:
        argv += ["--out", args.out]
    return bench_kernel.main(argv)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "level", None) != "kernel":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.rest = extra
    if args.command != "run":
        parser.print_help()
        return 0  # "run" is the only command: no command means help
    run_level(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
