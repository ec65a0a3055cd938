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

The level is split by concern: fidelity_dit.py (DiT mode), fidelity_synthetic.py (synthetic mode),
fidelity_variants.py (the knob sweep both share), fidelity_report.py (plots, matched-density block).
This module is the level's entry (``python -m benchmarks run fidelity``) and keeps the names other
modules import from it.
"""
from __future__ import annotations

# re-exported: benchmarks/policy.py, attention_stats.py, equal_density.py and the tests import these from here
from .fidelity_dit import _load_or_train, run_dit  # noqa: F401
from .fidelity_synthetic import MATCH_NOTES, MATCH_OPTIONS, AttentionOnly, run_synthetic  # noqa: F401
from .fidelity_variants import KNOBS, build_variants  # noqa: F401


def run(args) -> dict:
    return run_synthetic(args) if args.synthetic else run_dit(args)
