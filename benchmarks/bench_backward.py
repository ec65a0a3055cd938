"""Training benchmark: block-sparse attention forward+backward vs dense SDPA and Flex.

    python -m benchmarks.bench_backward --out DIR [--quick] [--no-flex] [--no-sweep] [--quick-check]
    python -m benchmarks.bench_backward --out DIR --sweep-only     # backward candidates, per pass

H100/H200, bf16, non-causal, 128x128 blocks, random block lists (own block always kept, sorted).
Times (triton.testing.do_bench medians) at (1, 12, 32760, 128):
  ours   = Triton forward (modcompile/kernels/block_sparse_attention.py) + Triton backward
           (modcompile/kernels/block_sparse_attention_bwd.py, list transposition included), called directly;
  SDPA   = dense scaled_dot_product_attention forward + autograd backward (default dispatch,
           cuDNN, flash);
  Flex   = FlexAttention (compiled) forward + backward with a BlockMask built from our lists.
Before timing, gradients are checked on smaller ragged shapes against a float64 reference and
against SDPA-with-the-same-mask in bf16 (rule: err <= 2 * err_sdpa_bf16 + tiny), with every
candidate backward launch configuration; each candidate is checked in its own subprocess, in
parallel (compiling is the slow part; the Triton disk cache then serves the timing process, and a
compiler crash costs one candidate, not the run). A candidate that fails is left out of the timing
and of the tuner. The sweep times every candidate's dk/dv and dq passes separately at density
0.25 on the timing shape (``--sweep-only``: just that, plus the best pair forced end to end).

Writes DIR/backward_bench.md and DIR/backward_bench.json. Run from the repo root, it imports the
kernels from the checkout (modcompile/kernels/) without pip install.

Modules: backward_common.py (inputs, timed callables), backward_checks.py (gradient checks),
backward_sweep.py (config sweep), backward_timing.py (timings, goal check), backward_report.py (tables).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import common
from .backward_common import (BLOCK, DENSITIES, DEVICE, SHAPE, log, make_inputs,  # first: the kernel import guard
                              random_block_lists)
from .backward_checks import CHECK_SETS, ParallelChecks, check_flex, worker_check
from .backward_report import compiled_kernel_report, markdown_table, sweep_table, tuned_summary
from .backward_sweep import forward_outputs, sweep_passes
from .backward_timing import goal_check, time_shape
from .common import cuda_environment as environment
from modcompile.kernels import tuning  # after backward_common: its guard explains a missing kernel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/backward", help="directory for the table and JSON")
    ap.add_argument("--quick", action="store_true", help="densities 1.0 and 0.25 only")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--no-sweep", action="store_true", help="skip timing every backward config")
    ap.add_argument("--sweep-only", action="store_true",
                    help="check every candidate on one shape, time each pass of each at density 0.25, stop")
    ap.add_argument("--no-check", action="store_true", help="skip the gradient check (not recommended)")
    ap.add_argument("--quick-check", action="store_true", help="check two shapes instead of three")
    ap.add_argument("--jobs", type=int, default=12, help="candidates checked (compiled) in parallel")
    ap.add_argument("--goal-pairs", type=int, default=5, help="interleaved ours/SDPA timings at density 0.25 "
                    "for the 3x goal (0: skip)")
    ap.add_argument("--worker-check", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-set", default="full", choices=sorted(CHECK_SETS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_backward.py needs a CUDA GPU")
    if args.worker_check is not None:
        return worker_check(args.worker_check, args.check_set)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(f"device {env['device']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, cudnn {env['cudnn']}")
    t0 = time.time()
    candidates = tuning.backward_configs(BLOCK)
    log(f"{len(candidates)} backward candidates: " + ", ".join(c.label() for c in candidates))
    check_set = "sweep" if args.sweep_only else ("quick" if args.quick_check else "full")
    checks_running = None if args.no_check else ParallelChecks(check_set, args.jobs)
    sweep_inputs = None
    if args.sweep_only or not args.no_sweep:  # the forward compiles while the checks run
        B, H, N, D = SHAPE
        q, k, v, do = make_inputs(SHAPE, torch.bfloat16, DEVICE, seed=3)
        counts, indices, eff = random_block_lists(B, H, N, 0.25, DEVICE, seed=4)
        out, lse = forward_outputs(q, k, v, counts, indices)
        sweep_inputs = (q, k, v, do, counts, indices, eff, out, lse)
    checks, failed = [], []
    if checks_running is not None:
        log(f"gradient check of every backward candidate ({check_set} set, {args.jobs} in parallel):")
        checks, failed = checks_running.wait()
        if failed:
            tuning.disable_configs(failed)
            log("left out of the sweep and the tuner: " + ", ".join(c.label() for c in failed))
    passing = [c for c in candidates if c not in failed]
    sweep, sweep_summary = [], {}
    if sweep_inputs is not None:
        sweep, sweep_summary = sweep_passes(SHAPE, 0.25, DEVICE, passing, fwd=sweep_inputs)
        del sweep_inputs
    rows = []
    flex_fn = None
    if not args.sweep_only:
        flex_fn = None if args.no_flex else common.compiled_flex_attention(log)
        if flex_fn is not None and not args.no_check:
            check_flex(DEVICE, flex_fn, CHECK_SETS[check_set])
        densities = [1.0, 0.25] if args.quick else DENSITIES
        log(f"timing {SHAPE}:")
        rows = time_shape(SHAPE, densities, DEVICE, flex_fn)
    goal = goal_check(SHAPE, 0.25, DEVICE, args.goal_pairs) if args.goal_pairs and not args.sweep_only else None
    env["bwd_tuned_configs"] = {str(k): v.label() for k, v in tuning.tuned_configs().items() if k[0] != "forward"}
    env["fwd_tuned_configs"] = {str(k): v.label() for k, v in tuning.tuned_configs("forward").items()}
    env["seconds"] = round(time.time() - t0, 1)
    name = "backward_sweep" if args.sweep_only else "backward_bench"
    table = markdown_table(rows) if rows else sweep_table(sweep, sweep_summary)
    goal_md = f"\n{goal['line']}\n" if goal else ""
    (out_dir / f"{name}.md").write_text(
        f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; cuda {env['cuda']}; "
        f"shape {SHAPE} bf16, block {BLOCK}\n\n{table}\n" + goal_md + ("" if not rows else
                                                                       "\n" + sweep_table(sweep, sweep_summary) + "\n"))
    (out_dir / f"{name}.json").write_text(json.dumps(
        dict(environment=env, checks=checks, sweep=sweep, sweep_summary=sweep_summary, rows=rows, goal=goal),
        indent=1, default=str))
    log("compiled backward variants:\n" + "\n".join(compiled_kernel_report()))
    log(f"bwd tuned: {tuned_summary()}")
    # Wrong gradients fail the run; a candidate that does not compile is only left out.
    wrong = [c for c in checks if not c["ok"] and "err_dq_dk_dv" in c]
    ok = not wrong
    log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} OK, {len(wrong)} with wrong gradients"
        f"{' (CORRECTNESS FAILURE)' if wrong else ''}; {env['seconds']} s")
    if sweep:
        log(sweep_table(sweep, sweep_summary))
    if rows:
        log(table)
    if goal:
        log(goal["line"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
