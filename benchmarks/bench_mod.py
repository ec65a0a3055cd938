"""MOD-DiT policy benchmark: schedule overhead, per-step fidelity, refresh variants, oracle.

    PYTHONPATH=. python benchmarks/bench_mod.py --out DIR            # GPU, (1,12,32760,128) bf16
    PYTHONPATH=. python benchmarks/bench_mod.py --out DIR --quick    # small, runs on CPU too
    PYTHONPATH=. python benchmarks/bench_mod.py --out DIR --observe-row-stride 1   # exact observation

The policy is driven directly, one attention site, the way the custom ops call it (plan ->
attention -> observe), on structured synthetic q/k/v (benchmarks/synthetic.py) that drift over the
steps: step t uses ``(1 - a) * X_A + a * X_B`` with a = t / (steps - 1), two heads sets of different
seeds and sharpness. For each refresh variant (paper: dense refresh steps; cheap: sparse refresh
with a dense one every ``dense_refresh_every``):

* overhead: the time of every observe call (map kernel, fit, mask build, coverage estimate) plus the
  extra time of observed attention calls over what the step would otherwise cost (dense SDPA in the
  warm-up, the mean sparse step after it), as a fraction of 50 dense SDPA calls;
* per step: block density and relative L2 error of the attention output against dense SDPA, and
  the error of a per-step oracle that keeps, per head, the same number of blocks chosen from the
  true sparsity map of that step (the truly densest blocks; own block first).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log, parse_dtype, write_results  # noqa: E402
from benchmarks.metrics import relative_l2  # noqa: E402
from benchmarks.synthetic import make_synthetic_attention  # noqa: E402
from modcompile.config import SparsityConfig  # noqa: E402
from modcompile.kernels.reference import block_mask_from_lists, full_block_lists, num_blocks  # noqa: E402
from modcompile.ops import attention_forward, site_attention  # noqa: E402
from modcompile.policies import SiteContext  # noqa: E402
from modcompile.policies.mod import ModPolicy, lists_from_mask, observe_map  # noqa: E402
from modcompile.runtime import SiteInfo, SiteState  # noqa: E402


class Timer:
    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            return result, start.elapsed_time(end)
        import time
        t0 = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - t0) * 1e3


class Site:
    """One attention site driven like the ops do."""

    def __init__(self, config, grid, heads, head_dim, num_steps):
        self.policy = ModPolicy(config)
        n = grid[0] * grid[1] * grid[2]
        self.info = SiteInfo(key="bench/attn#0", layer=0, module_path="attn", config=config, status="sparse",
                             seq_len=n, heads=heads, head_dim=head_dim, grid=tuple(grid), text_tokens=0)
        self.state = SiteState(info=self.info, pass_index=0)
        self.num_steps = num_steps

    def run(self, step, q, k, v, timer):
        ctx = SiteContext(info=self.info, state=self.state, step=step, num_steps=self.num_steps,
                          config=self.info.config)
        plan, t_plan = timer(lambda: self.policy.plan(ctx, q, k))
        scale = 1.0 / math.sqrt(q.shape[-1])
        self.state.dense_now, self.state.observe_now = plan.dense, plan.observe
        (out, lse), t_attn = timer(lambda: site_attention(self.policy, ctx, q, k, v, plan.kv_counts,
                                                          plan.kv_indices, scale))
        t_obs = 0.0
        if plan.observe:
            _, t_obs = timer(lambda: self.policy.observe(ctx, q, k, lse, plan.kv_counts, plan.kv_indices))
        return out, plan, {"plan": t_plan, "attn": t_attn, "observe": t_obs}


def make_inputs(args, device, dtype):
    sets = []
    for seed, sharp in ((0, 1.0), (1, 1.3)):
        sa = make_synthetic_attention(tuple(args.grid), heads=args.heads, head_dim=args.head_dim, seed=seed,
                                      sharpness=sharp, dtype=torch.float32)
        sets.append(tuple(t.to(device) for t in (sa.q, sa.k, sa.v)))
    (qa, ka, va), (qb, kb, vb) = sets

    def at(step):
        a = step / max(args.steps - 1, 1)
        return tuple(((1 - a) * x + a * y).to(dtype).contiguous() for x, y in ((qa, qb), (ka, kb), (va, vb)))
    return at


def oracle_lists(q, k, v, counts_used, block, threshold):
    """Per head the same number of blocks as the policy used, the densest of this step's true map."""
    B, H, N, _ = q.shape
    m = num_blocks(N, block)
    fc, fi = full_block_lists(B, H, m, m, q.device)
    _, lse = attention_forward(q, k, v, fc, fi, block, 1.0 / math.sqrt(q.shape[-1]))
    smap = observe_map(q, k, lse, block_size=block, threshold=threshold, scale=1.0 / math.sqrt(q.shape[-1])).mean(0)
    score = smap - 2.0 * torch.eye(m, device=q.device)             # own block first
    keep = counts_used[0].sum(-1).long()                            # (H,) blocks per head
    order = score.reshape(H, -1).argsort(-1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(m * m, device=q.device).expand(H, -1))
    mask = (ranks < keep.unsqueeze(-1)).view(H, m, m)
    counts, indices = lists_from_mask(mask)
    return counts.expand(B, H, m).contiguous(), indices.expand(B, H, m, m).contiguous()


def run_variant(name, config, inputs, args, device, timer, dense_ms, with_quality):
    site = Site(config, args.grid, args.heads, args.head_dim, args.steps)
    warmup = site.policy.warmup_steps(SiteContext(site.info, site.state, 0, args.steps, config))
    rows, times = [], []
    for step in range(args.steps):
        q, k, v = inputs(step)
        out, plan, t = site.run(step, q, k, v, timer)
        m = plan.kv_indices.shape[-1]
        density = 1.0 if plan.dense else float(plan.kv_counts.float().mean() / m)
        row = {"variant": name, "step": step, "kind": "dense" if plan.dense else "sparse",
               "observe": plan.observe, "density": density, **{f"{k}_ms": v for k, v in t.items()}}
        if with_quality:
            ref = F.scaled_dot_product_attention(q, k, v)
            row["rel_l2"] = relative_l2(out, ref)
            if not plan.dense:
                oc, oi = oracle_lists(q, k, v, plan.kv_counts, config.block_size, config.threshold)
                o_out, _ = attention_forward(q, k, v, oc, oi, config.block_size, 1.0 / math.sqrt(q.shape[-1]))
                row["oracle_rel_l2"] = relative_l2(o_out, ref)
                row["oracle_density"] = float(oc.float().mean() / m)
        rows.append(row)
        times.append(t)
    sparse_attn = [r["attn_ms"] for r in rows if r["kind"] == "sparse" and not r["observe"]]
    sparse_ms = statistics.median(sparse_attn) if sparse_attn else dense_ms
    observe_ms = sum(r["observe_ms"] for r in rows)
    extra_ms = sum(r["attn_ms"] - (dense_ms if r["step"] < warmup else sparse_ms) for r in rows if r["observe"])
    total_attn = sum(r["attn_ms"] + r["plan_ms"] + r["observe_ms"] for r in rows)
    sparse_rows = [r for r in rows if r["kind"] == "sparse"]
    summary = {
        "variant": name, "observe_row_stride": config.observe_row_stride, "warmup": warmup,
        "dense_steps": sum(r["kind"] == "dense" for r in rows),
        "observed_steps": sum(r["observe"] for r in rows),
        "observe_ms_total": observe_ms,
        "observed_attention_extra_ms": extra_ms,
        "plan_ms_total": sum(r["plan_ms"] for r in rows),
        "overhead_fraction": (observe_ms + max(extra_ms, 0.0)) / (args.steps * dense_ms),
        "schedule_vs_dense_time": total_attn / (args.steps * dense_ms),
        "mean_sparse_density": statistics.mean(r["density"] for r in sparse_rows) if sparse_rows else 1.0,
        "sparse_step_attn_ms": sparse_ms,
    }
    if with_quality and sparse_rows:
        summary["mean_rel_l2"] = statistics.mean(r["rel_l2"] for r in rows)
        summary["mean_sparse_rel_l2"] = statistics.mean(r["rel_l2"] for r in sparse_rows)
        summary["mean_oracle_rel_l2"] = statistics.mean(r["oracle_rel_l2"] for r in sparse_rows)
        summary["mod_over_oracle_error"] = summary["mean_sparse_rel_l2"] / max(summary["mean_oracle_rel_l2"], 1e-12)
    summary["events"] = site.state.policy_state.events
    summary["observed_coverage"] = site.state.policy_state.observed_coverage
    summary["lines_per_head_last"] = site.state.policy_state.lines.tolist()
    summary["predicted_coverage_last"] = site.state.policy_state.predicted_coverage.tolist()
    return summary, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--refresh-interval", type=int, default=10)
    p.add_argument("--coverage", type=float, default=0.9)
    p.add_argument("--observe-row-stride", type=int, default=SparsityConfig().observe_row_stride,
                   help="estimate the sparsity map from every n-th query row (1 = exact)")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.grid, args.heads, args.head_dim, args.block, args.steps = [4, 8, 16], 2, 32, 32, 12
        args.refresh_interval = 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(args.dtype)
    if device == "cpu":
        dtype = torch.float32
    timer = Timer(device)
    log(f"bench_mod: grid {args.grid}, heads {args.heads}, D {args.head_dim}, {dtype}, block {args.block}, "
        f"{args.steps} steps on {device}, observe_row_stride {args.observe_row_stride}")
    inputs = make_inputs(args, device, dtype)

    q, k, v = inputs(0)
    for _ in range(3):
        timer(lambda: F.scaled_dot_product_attention(q, k, v))
    dense_ms = statistics.median(timer(lambda: F.scaled_dot_product_attention(q, k, v))[1] for _ in range(10))
    log(f"dense SDPA: {dense_ms:.3f} ms per call")

    base = dict(block_size=args.block, refresh_interval=args.refresh_interval, coverage=args.coverage,
                num_steps=args.steps, observe_row_stride=args.observe_row_stride)
    variants = {"paper": SparsityConfig(**base, cheap_refresh=False),
                "cheap": SparsityConfig(**base, cheap_refresh=True)}
    summaries, all_rows = [], []
    for name, cfg in variants.items():
        run_variant(name, cfg, inputs, args, device, timer, dense_ms, with_quality=False)  # compile, tune
        timing, _ = run_variant(name, cfg, inputs, args, device, timer, dense_ms, with_quality=False)
        quality, rows = run_variant(name, cfg, inputs, args, device, timer, dense_ms, with_quality=True)
        for key in ("mean_rel_l2", "mean_sparse_rel_l2", "mean_oracle_rel_l2", "mod_over_oracle_error"):
            timing[key] = quality.get(key)
        summaries.append(timing)
        all_rows.extend(rows)
        log(f"{name}: overhead {timing['overhead_fraction']:.4f}, schedule/dense {timing['schedule_vs_dense_time']:.3f}, "
            f"density {timing['mean_sparse_density']:.3f}, err {timing.get('mean_sparse_rel_l2')}, "
            f"oracle {timing.get('mean_oracle_rel_l2')}")

    columns = ["variant", "observe_row_stride", "warmup", "dense_steps", "observed_steps", "observe_ms_total",
               "observed_attention_extra_ms",
               "overhead_fraction", "schedule_vs_dense_time", "mean_sparse_density", "sparse_step_attn_ms",
               "mean_sparse_rel_l2", "mean_oracle_rel_l2", "mod_over_oracle_error"]
    settings = {**vars(args), "dtype": str(dtype), "device": device, "dense_sdpa_ms": dense_ms}
    notes = [f"dense SDPA {dense_ms:.3f} ms per call; goal: overhead_fraction < 0.03",
             f"observe_row_stride {args.observe_row_stride}: the policy's sparsity map is estimated from every "
             f"{args.observe_row_stride}-th query row of each block (1 = exact)",
             "overhead = observe calls + extra time of observed attention calls, over steps x dense SDPA",
             "errors: relative L2 of the attention output vs dense SDPA, mean over sparse steps; oracle = same "
             "per-head block count, densest blocks of the step's true sparsity map"]
    write_results(args.out, "bench_mod", "MOD-DiT policy: overhead and fidelity", summaries, settings=settings,
                  columns=columns, notes=notes, extra={"per_step": all_rows})
    step_cols = ["variant", "step", "kind", "observe", "density", "rel_l2", "oracle_rel_l2", "attn_ms", "observe_ms"]
    write_results(args.out, "bench_mod_steps", "MOD-DiT policy: per step", all_rows, settings=settings,
                  columns=step_cols, quiet=True)
    return summaries


if __name__ == "__main__":
    main()
