"""MOD-DiT policy benchmark: schedule overhead, per-step fidelity, refresh variants, oracle.

    python -m benchmarks.bench_mod --out DIR            # GPU, (1,12,32760,128) bf16
    python -m benchmarks.bench_mod --out DIR --quick    # small, runs on CPU too
    python -m benchmarks.bench_mod --out DIR --observe-row-stride 1   # exact observation

The policy is driven directly, one attention site, the way the custom ops call it (plan ->
attention -> observe), on structured synthetic q/k/v (benchmarks/synthetic.py) that drift over the
steps: step t uses ``(1 - a) * X_A + a * X_B`` with a = t / (steps - 1), two heads sets of different
seeds and sharpness. Variants: paper (the published method: dense refresh steps, whole-line masks);
paper-blocks (dense refreshes, ``mask_rule="blocks"``); cheap (the default: refreshes on the sparse
step, restricted to its blocks, every ``full_refresh_every``-th one observing every block from the
sparse call's lse; blocks); cheap-s8 / cheap-s16 (the same at observe_row_stride 8 / 16); cheap-dense (the full
refresh is a dense step) and cheap-dense-s8 (that at stride 8: the previous default); cheap-lines
(cheap with whole lines); all-full (every refresh a full one on the sparse step); cheap-guarded
(no scheduled full refresh; a dense one only when the observed coverage falls under
``min_observed_coverage``). ``--quality-only`` (CPU studies) runs each variant once for the
errors, without warm-up runs or timings.

Each variant's policy object lives across its runs (two warm-up runs, timing, quality), as
``modcompile.ops.policy_for`` keeps one policy per config in a compiled model: the observation
tails' CUDA graphs are captured in the warm-up runs (each kind on its second call; in a model, by
the second site of the first generation) and replayed in the timed one. The timed run is the policy's exact stateful sequence;
every call of it is timed once with CUDA events (``*_ms`` columns, noisy). For each observed step
the same calls are then repeated with ``do_bench`` (median) on the same inputs, the observe call on
a copy of the policy state as it was before the real call, so the sequence is untouched:

* ``observe_rep_ms``: the observe call (map kernel, coverage estimate, fit, mask build);
* ``attn_rep_ms``: the step's attention as run (dense observed steps: cuDNN with lse);
* ``map_rep_ms``: the map kernel alone, as that observation calls it (the rest of observe_rep_ms is
  the coverage estimate and the graphed tail);
* ``baseline_ms``: what the step would have cost without the observation: dense SDPA in the
  warm-up, the sparse attention with the lists in force after it (refreshes on the sparse step,
  cheap or full, run exactly that call, so their baseline is their own attention).

overhead = (sum of observe_rep_ms + max(0, sum of attn_rep_ms - baseline_ms)) over the observed
steps / (steps x dense SDPA), dense SDPA timed with ``do_bench`` too. ``overhead_sequence`` is the
same formula from the single timings (baseline: the median sparse step of the run).

Per step: block density and relative L2 error of the attention output against dense SDPA, and the
error of a per-step oracle that keeps, per head, the same number of blocks chosen from the true
sparsity map of that step (the truly densest blocks; own block first).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
import torch.nn.functional as F


from .common import bench, log, parse_dtype, write_results
from .metrics import relative_l2
from .synthetic import make_synthetic_attention
from modcompile.config import SparsityConfig
from modcompile.kernels.block_lists import BlockLists, full_block_lists, lists_from_mask, num_blocks
from modcompile.dispatch import attention_forward
from modcompile.ops import site_attention
from modcompile.policies import Plan, SiteContext
from modcompile.policies.mod import ModPolicy
from modcompile.policies.mod_mask import uses_count_map
from modcompile.policies.mod_observe import observe_map
from modcompile.sites import SiteInfo, SiteState


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

    def __init__(self, policy, config, grid, heads, head_dim, num_steps):
        self.policy = policy
        n = grid[0] * grid[1] * grid[2]
        self.info = SiteInfo(key="bench/attn#0", layer=0, module_path="attn", config=config, status="sparse",
                             seq_len=n, heads=heads, head_dim=head_dim, grid=tuple(grid), text_tokens=0)
        self.state = SiteState(info=self.info, pass_index=0)
        self.num_steps = num_steps

    def context(self, state, step):
        return SiteContext(info=self.info, state=state, step=step, num_steps=self.num_steps, config=self.info.config)

    def run(self, step, q, k, v, timer, repeat=None):
        """One step; with ``repeat`` (a timing function) observed steps are also timed by repeats."""
        ctx = self.context(self.state, step)
        plan, t_plan = timer(lambda: self.policy.plan(ctx, q, k))
        scale = 1.0 / math.sqrt(q.shape[-1])
        (out, lse), t_attn = timer(lambda: site_attention(self.policy, ctx, q, k, v, plan, scale))
        times = {"plan": t_plan, "attn": t_attn, "observe": 0.0}
        if plan.observe:
            before = self._snapshot(q.shape[0]) if repeat else None
            _, times["observe"] = timer(lambda: self.policy.observe(ctx, q, k, lse, plan))
            if repeat:
                times.update(self._repeats(before, step, q, k, v, lse, plan, scale, repeat))
        return out, plan, times

    # ---- repeated timings of an observed step, on a copy of the state (the sequence is untouched)
    _LIST_FIELDS = ("fits", "events", "fit_steps", "observed_coverage")

    def _snapshot(self, batch):
        """The policy state's fields before the real observe (it replaces tensors and appends to
        lists, never writes tensors in place) and the block lists in force for ``batch``."""
        st = self.state.policy_state
        fields = dict(vars(st))
        for name in self._LIST_FIELDS:
            fields[name] = list(fields[name])
        fields["lists"] = dict(fields["lists"])
        in_force = st.lists.get(batch)
        if in_force is None and st.head_lists is not None:
            counts, indices = st.head_lists
            in_force = (counts.expand(batch, *counts.shape).contiguous(),
                        indices.expand(batch, *indices.shape).contiguous())
        return {"fields": fields, "in_force": in_force}

    def _repeats(self, before, step, q, k, v, lse, plan, scale, repeat):
        state = copy.copy(self.state)
        st = state.policy_state = copy.copy(self.state.policy_state)
        ctx = self.context(state, step)

        def restore():
            vars(st).update(before["fields"])
            for name in self._LIST_FIELDS:
                setattr(st, name, list(before["fields"][name]))
            st.lists = dict(before["fields"]["lists"])

        def observe():
            restore()
            self.policy.observe(ctx, q, k, lse, plan)

        # The map kernel alone, as this observation calls it (restricted on cheap refreshes): the
        # rest of observe_rep is the coverage estimate and the tail.
        cfg = self.policy.config
        restricted = plan.data == "cheap" and before["fields"]["mmap"] is not None
        lists = dict(kv_counts=plan.lists.counts, kv_indices=plan.lists.indices) if restricted else {}

        def map_only():
            observe_map(q, k, lse, block_size=cfg.block_size, threshold=cfg.threshold, scale=scale,
                        row_stride=cfg.observe_row_stride, with_mass=True, with_count=uses_count_map(cfg), **lists)

        out = {"observe_rep": repeat(observe), "map_rep": repeat(map_only),
               "attn_rep": repeat(lambda: site_attention(self.policy, ctx, q, k, v, plan, scale))}
        in_force = before["in_force"]
        warmup = self.policy.warmup_steps(ctx)
        if step < warmup or in_force is None:
            out["baseline"] = None                       # dense SDPA: the caller's dense time
        elif not plan.dense:
            out["baseline"] = out["attn_rep"]            # a cheap refresh: the sparse step's own call
        else:
            # the sparse step this observation replaced: the lists in force, not observed
            base = Plan(BlockLists(*in_force, self.policy.config.block_size, q.shape[2], k.shape[2]), dense=False)
            out["baseline"] = repeat(lambda: site_attention(self.policy, self.context(self.state, step), q, k, v,
                                                            base, scale))
        return out


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
    _, lse = attention_forward(q, k, v, BlockLists(fc, fi, block, q.shape[2], k.shape[2]), 1.0 / math.sqrt(q.shape[-1]))
    smap = observe_map(q, k, lse, block_size=block, threshold=threshold, scale=1.0 / math.sqrt(q.shape[-1])).mean(0)
    score = smap - 2.0 * torch.eye(m, device=q.device)             # own block first
    keep = counts_used[0].sum(-1).long()                            # (H,) blocks per head
    order = score.reshape(H, -1).argsort(-1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(m * m, device=q.device).expand(H, -1))
    mask = (ranks < keep.unsqueeze(-1)).view(H, m, m)
    counts, indices = lists_from_mask(mask)
    return counts.expand(B, H, m).contiguous(), indices.expand(B, H, m, m).contiguous()


def run_variant(name, policy, inputs, args, device, timer, dense_ms, with_quality, repeat=None):
    config = policy.config
    site = Site(policy, config, args.grid, args.heads, args.head_dim, args.steps)
    warmup = site.policy.warmup_steps(SiteContext(site.info, site.state, 0, args.steps, config))
    rows = []
    for step in range(args.steps):
        q, k, v = inputs(step)
        out, plan, t = site.run(step, q, k, v, timer, repeat=repeat)
        m = plan.lists.indices.shape[-1]
        density = 1.0 if plan.dense else float(plan.lists.counts.float().mean() / m)
        row = {"variant": name, "step": step, "kind": "dense" if plan.dense else "sparse",
               "observe": plan.observe, "density": density,
               **{f"{k}_ms": (dense_ms if k == "baseline" and v is None else v) for k, v in t.items()}}
        if with_quality:
            ref = F.scaled_dot_product_attention(q, k, v)
            row["rel_l2"] = relative_l2(out, ref)
            if not plan.dense:
                oc, oi = oracle_lists(q, k, v, plan.lists.counts, config.block_size, config.threshold)
                o_out, _ = attention_forward(q, k, v, BlockLists(oc, oi, config.block_size, q.shape[2], k.shape[2]), 1.0 / math.sqrt(q.shape[-1]))
                row["oracle_rel_l2"] = relative_l2(o_out, ref)
                row["oracle_density"] = float(oc.float().mean() / m)
        rows.append(row)
    observed = [r for r in rows if r["observe"]]
    sparse_attn = [r["attn_ms"] for r in rows if r["kind"] == "sparse" and not r["observe"]]
    sparse_ms = statistics.median(sparse_attn) if sparse_attn else dense_ms
    # The single timings of the sequence (as before the repeats existed) ...
    observe_seq = sum(r["observe_ms"] for r in observed)
    extra_seq = sum(r["attn_ms"] - (dense_ms if r["step"] < warmup else sparse_ms) for r in observed)
    total_attn = sum(r["attn_ms"] + r["plan_ms"] + r["observe_ms"] for r in rows)
    sparse_rows = [r for r in rows if r["kind"] == "sparse"]
    summary = {
        "variant": name, "observe_row_stride": config.observe_row_stride, "warmup": warmup,
        "full_refresh_every": config.full_refresh_every if config.cheap_refresh else None,
        "full_refresh": config.full_refresh if config.cheap_refresh else "dense",
        "dense_steps": sum(r["kind"] == "dense" for r in rows),
        "observed_steps": len(observed),
        "plan_ms_total": sum(r["plan_ms"] for r in rows),
        "overhead_sequence": (observe_seq + max(extra_seq, 0.0)) / (args.steps * dense_ms),
        "schedule_vs_dense_time": total_attn / (args.steps * dense_ms),
        "mean_sparse_density": statistics.mean(r["density"] for r in sparse_rows) if sparse_rows else 1.0,
        "sparse_step_attn_ms": sparse_ms,
    }
    if repeat is not None:
        # ... and the repeated (median) timings of the observed steps: the overhead reported.
        observe_ms = sum(r["observe_rep_ms"] for r in observed)
        extra_ms = sum(r["attn_rep_ms"] - r["baseline_ms"] for r in observed)
        summary.update({
            "observe_ms_total": observe_ms,
            "map_ms_total": sum(r["map_rep_ms"] for r in observed),
            "observe_ms_per_step": [round(r["observe_rep_ms"], 3) for r in observed],
            "observed_attention_extra_ms": extra_ms,
            "overhead_fraction": (observe_ms + max(extra_ms, 0.0)) / (args.steps * dense_ms),
        })
    if with_quality and sparse_rows:
        summary["mean_rel_l2"] = statistics.mean(r["rel_l2"] for r in rows)
        summary["mean_sparse_rel_l2"] = statistics.mean(r["rel_l2"] for r in sparse_rows)
        summary["mean_oracle_rel_l2"] = statistics.mean(r["oracle_rel_l2"] for r in sparse_rows)
        summary["mod_over_oracle_error"] = summary["mean_sparse_rel_l2"] / max(summary["mean_oracle_rel_l2"], 1e-12)
        summary["max_sparse_rel_l2"] = max(r["rel_l2"] for r in sparse_rows)
    st = site.state.policy_state
    summary["events"] = st.events
    summary["observed_coverage"] = st.observed_coverage
    summary["lines_per_head_last"] = st.lines.tolist()
    summary["predicted_coverage_last"] = st.predicted_coverage.tolist()
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
                   help="observe the maps from every n-th query row (1 = exact, the config's default)")
    p.add_argument("--full-refresh-every", type=int, default=SparsityConfig().full_refresh_every,
                   help="the cheap variants' full refresh period (in refreshes)")
    p.add_argument("--min-observed-coverage", type=float, default=SparsityConfig().min_observed_coverage,
                   help="the cheap variants' coverage guard")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-repeat", action="store_true",
                   help="skip the repeated timings of observed steps (report only the single timings)")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--quality-only", action="store_true",
                   help="one run per variant for the errors, no warm-up runs or repeated timings (CPU studies)")
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

    def repeat(fn):
        return bench(fn, warmup=3, reps=10, device=device)["ms"]

    q, k, v = inputs(0)
    dense_ms = (timer(lambda: F.scaled_dot_product_attention(q, k, v))[1] if args.quality_only
                else repeat(lambda: F.scaled_dot_product_attention(q, k, v)))
    log(f"dense SDPA: {dense_ms:.3f} ms per call")

    base = dict(block_size=args.block, refresh_interval=args.refresh_interval, coverage=args.coverage,
                num_steps=args.steps, observe_row_stride=args.observe_row_stride,
                min_observed_coverage=args.min_observed_coverage)
    summaries, all_rows = [], []
    for name in args.variants:
        cfg = SparsityConfig(**{**base, **VARIANTS[name](args)})
        policy = ModPolicy(cfg)  # one per variant, across its runs: graphs captured once (see the notes)
        if args.quality_only:  # CPU: the timings mean nothing there; one run gives the errors
            quality, rows = run_variant(name, policy, inputs, args, device, timer, dense_ms, with_quality=True)
            timing, timed_rows = dict(quality), rows
        else:
            for _ in range(2):  # compile, tune; every tail kind runs twice: its CUDA graph is captured
                run_variant(name, policy, inputs, args, device, timer, dense_ms, with_quality=False)
            timing, timed_rows = run_variant(name, policy, inputs, args, device, timer, dense_ms,
                                             with_quality=False, repeat=None if args.no_repeat else repeat)
            quality, rows = run_variant(name, policy, inputs, args, device, timer, dense_ms, with_quality=True)
        for row, timed in zip(rows, timed_rows):  # same schedule; the timings of the timed run
            row.update({key: value for key, value in timed.items() if key.endswith("_ms")})
        for key in ("mean_rel_l2", "mean_sparse_rel_l2", "max_sparse_rel_l2", "mean_oracle_rel_l2",
                    "mod_over_oracle_error"):
            timing[key] = quality.get(key)
        summaries.append(timing)
        all_rows.extend(rows)
        log(f"{name}: overhead {timing.get('overhead_fraction', float('nan')):.4f} "
            f"(sequence {timing['overhead_sequence']:.4f}), schedule/dense {timing['schedule_vs_dense_time']:.3f}, "
            f"density {timing['mean_sparse_density']:.3f}, err {timing.get('mean_sparse_rel_l2')}, "
            f"oracle {timing.get('mean_oracle_rel_l2')}")

    columns = ["variant", "observe_row_stride", "full_refresh_every", "full_refresh", "warmup", "dense_steps", "observed_steps",
               "observe_ms_total", "map_ms_total", "observed_attention_extra_ms", "overhead_fraction", "overhead_sequence",
               "schedule_vs_dense_time", "mean_sparse_density", "sparse_step_attn_ms",
               "mean_sparse_rel_l2", "max_sparse_rel_l2", "mean_oracle_rel_l2", "mod_over_oracle_error"]
    settings = {**vars(args), "dtype": str(dtype), "device": device, "dense_sdpa_ms": dense_ms}
    notes = [f"dense SDPA {dense_ms:.3f} ms per call (median of repeats); goal: overhead_fraction < 0.03",
             f"observe_row_stride (column; {args.observe_row_stride} unless the variant sets it): the policy's "
             f"sparsity map is estimated from every n-th query row of each block (1 = exact)",
             "overhead_fraction = (observe calls + max(0, extra attention time of observed steps)) / (steps x dense "
             "SDPA), from medians of repeated calls of each observed step on the same inputs (observe on a copy of "
             "the state as it was); extra = the step's attention minus what it would cost unobserved (dense SDPA "
             "in the warm-up, the sparse attention with the lists in force after it; 0 for refreshes on the sparse step: "
             "cheap ones and full_refresh='sparse')",
             "overhead_sequence: the same formula from the single CUDA-event timings of the stateful run "
             "(baseline after the warm-up: the median sparse step); schedule_vs_dense_time from those too",
             "each variant's policy lives across its runs (one policy per config, as in a compiled model): the "
             "observation tails' CUDA graphs are captured in two warm-up runs and replayed in the timed run",
             "errors: relative L2 of the attention output vs dense SDPA over sparse steps (mean, max); oracle = same "
             "per-head block count, densest blocks of the step's true sparsity map"]
    write_results(args.out, "bench_mod", "MOD-DiT policy: overhead and fidelity", summaries, settings=settings,
                  columns=columns, notes=notes, extra={"per_step": all_rows})
    step_cols = ["variant", "step", "kind", "observe", "density", "rel_l2", "oracle_rel_l2", "attn_ms", "observe_ms",
                 "attn_rep_ms", "observe_rep_ms", "map_rep_ms", "baseline_ms"]
    write_results(args.out, "bench_mod_steps", "MOD-DiT policy: per step (quality run; timings: timed run)",
                  all_rows, settings=settings, columns=step_cols, quiet=True)
    return summaries


# Variants: name -> SparsityConfig overrides. "paper" is the published method (dense refreshes,
# whole lines); the others use the default mask rule unless their name says "lines".
VARIANTS = {
    "paper": lambda args: dict(cheap_refresh=False, mask_rule="lines"),
    "paper-blocks": lambda args: dict(cheap_refresh=False, mask_rule="blocks"),
    "cheap": lambda args: dict(cheap_refresh=True, full_refresh_every=args.full_refresh_every),
    # the full refresh on a dense step; with rows sampled at stride 8 that is the previous default
    "cheap-dense": lambda args: dict(cheap_refresh=True, full_refresh_every=args.full_refresh_every,
                                     full_refresh="dense"),
    "cheap-dense-s8": lambda args: dict(cheap_refresh=True, full_refresh_every=args.full_refresh_every,
                                        full_refresh="dense", observe_row_stride=8),
    # the default schedule at sampled strides (16: 8 rows per block, the previous default)
    "cheap-s8": lambda args: dict(cheap_refresh=True, full_refresh_every=args.full_refresh_every,
                                  observe_row_stride=8),
    "cheap-s16": lambda args: dict(cheap_refresh=True, full_refresh_every=args.full_refresh_every,
                                   observe_row_stride=16),
    "cheap-lines": lambda args: dict(cheap_refresh=True, full_refresh_every=args.full_refresh_every,
                                     mask_rule="lines"),
    # every refresh full (on the sparse step): no restricted maps, no history
    "all-full": lambda args: dict(cheap_refresh=True, full_refresh_every=1),
    # no scheduled full refresh: only the coverage guard triggers a (dense) one
    "cheap-guarded": lambda args: dict(cheap_refresh=True, full_refresh_every=10 ** 6),
}


if __name__ == "__main__":
    main()
