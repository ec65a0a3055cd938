"""Host (CPU wall) time per call of the modsparse custom ops, by schedule phase.

``python -m benchmarks.host_overhead [--device cpu|cuda] [--policies vmoba,mod,dense] [--out DIR]``

Compiles a VideoDiT with ``backend="modsparse"`` per policy, runs one denoising schedule untimed
(compilation, caches, kernel choice), then a second one in which every call of ``modcompile::plan``,
``modcompile::sparse_attention`` and ``modcompile::observe`` is timed on the host
(``time.perf_counter`` around the op's Python body; CUDA work is asynchronous, so on CUDA this is
the launch cost, not the GPU time). Calls are grouped by phase, read from the site's state:
``dense`` (warm-up / dense plan, nothing observed), ``sparse`` (block-sparse, nothing observed),
``observe`` (the observe node runs). A third, profiled schedule counts per call what the op body
issued: on CUDA the kernel launches, host->device/device->host copies and synchronizing calls, on
CPU the top-level aten ops.

CPU sizes are tiny so that the numbers reflect Python and dispatch overhead: host time on CPU is
no GPU performance claim. On CUDA the model is the demo's small preset (16x32x32 = 16384 tokens,
6 heads x 64, bf16, 128-token blocks) or, with ``--preset long``, the long video DiT (same tokens,
6 heads x 128).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import modcompile
from modcompile import ops
from modcompile.runtime import REGISTRY

# short name -> (op, index of its site argument, profiler event name)
OPS = {"plan": (ops.plan, 4, "modcompile::plan"), "attention": (ops.sparse_attention, 5, "modcompile::sparse_attention"),
       "observe": (ops.observe, 5, "modcompile::observe")}
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")
COPY_EVENTS = ("cudaMemcpyAsync", "cudaMemcpy")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _phase(site: str) -> str:
    plan = REGISTRY.current(site).plan
    if plan.observe:
        return "observe"
    return "dense" if plan.dense else "sparse"


class CallLog:
    """Per op: (phase, host seconds) of every call, in call order."""

    def __init__(self):
        self.calls = defaultdict(list)
        self.enabled = False

    def clear(self):
        self.calls = defaultdict(list)


@contextlib.contextmanager
def timed_ops(log: CallLog, device_type: str):
    """Time the Python bodies of the graph ops (a device kernel wrapping the op's own function;
    disabled again on exit, so the ops fall back to their default implementation)."""
    for name, (op, site_arg, _) in OPS.items():
        body = op._init_fn

        def wrapper(*args, _body=body, _name=name, _site_arg=site_arg):
            if not log.enabled:
                return _body(*args)
            t0 = time.perf_counter()
            result = _body(*args)
            seconds = time.perf_counter() - t0
            log.calls[_name].append((_phase(args[_site_arg]), seconds))
            return result

        op.register_kernel(device_type)(wrapper)
        op.set_kernel_enabled(device_type, True)
    try:
        yield log
    finally:
        for op, _, _ in OPS.values():
            op.set_kernel_enabled(device_type, False)


def _model(device: str, preset: str | None = None):
    """On CUDA a demo preset (default ``small``) or ``long``, the long video DiT (16384 tokens, 6 heads
    x 128); on CPU the demo's CPU preset cut to 3 layers (4x8x8 = 256 tokens, 32-token blocks: CPU
    compute stays small next to the host overhead)."""
    from dataclasses import replace

    from .demo import PRESETS, randomize_zero_init
    from .video_dit import CONFIGS, VideoDiT
    if device == "cuda":
        preset = preset or "small"
        cfg, options = (CONFIGS["long"], {"block_size": 128, "min_seq_len": 1024}) if preset == "long" \
            else PRESETS[preset]
        dtype = torch.bfloat16
    else:
        cfg, options = PRESETS["cpu"]
        cfg, dtype = replace(cfg, depth=3), torch.float32
    torch.manual_seed(0)
    model = VideoDiT(cfg)
    randomize_zero_init(model, 0)  # adaLN-zero would make every branch 0
    return model.to(device=device, dtype=dtype).eval(), cfg, options, dtype


def _run(model, noise, steps):
    from .video_dit import sample
    with torch.no_grad():
        out = sample(model, noise, steps, step_context=modcompile.denoising_step)
    if noise.is_cuda:
        torch.cuda.synchronize()
    return out


def _count_per_call(prof, op_name: str, device: str) -> list[dict]:
    """Per call of ``op_name`` (start order): launches, copies, syncs (CUDA) or top-level aten ops (CPU)."""
    events = list(prof.events())
    # an op with autograd registered shows up twice, nested: count the outer event
    calls = sorted((e for e in events if e.name == op_name and not (e.cpu_parent and e.cpu_parent.name == op_name)),
                   key=lambda e: e.time_range.start)
    if device != "cuda":
        return [{"aten_ops": sum(1 for c in e.cpu_children if c.name.startswith("aten::"))} for e in calls]
    runtime = sorted((e.time_range.start, e.name, e.thread) for e in events
                     if e.name in LAUNCH_EVENTS + COPY_EVENTS + SYNC_EVENTS)
    starts = [r[0] for r in runtime]
    out = []
    for e in calls:
        lo, hi = bisect.bisect_left(starts, e.time_range.start), bisect.bisect_right(starts, e.time_range.end)
        inside = [r for r in runtime[lo:hi] if r[2] == e.thread]
        out.append({"launches": sum(r[1] in LAUNCH_EVENTS for r in inside),
                    "copies": sum(r[1] in COPY_EVENTS for r in inside),
                    "syncs": sum(r[1] in SYNC_EVENTS for r in inside)})
    return out


def _line_profiled() -> list:
    """The functions ``--line-profile`` times line by line: the op bodies and what they call per call."""
    from modcompile import buffers, cuda_graphs, runtime
    from modcompile.policies import base, mod, vmoba
    return [ops.plan._init_fn, ops.sparse_attention._init_fn, ops.graph_lists, vmoba.VmobaPolicy.plan,
            mod.ModPolicy.plan, runtime.Registry.enter_site, runtime.Registry.call_info,
            base.SiteContext.output_lists, buffers.BufferPool.take, cuda_graphs.CallGraphs.run]


def measure(policy: str, device: str, steps: int, profile: bool = True, preset: str | None = None,
            cprofile: str | None = None, line_profile: bool = False) -> dict:
    model, cfg, options, dtype = _model(device, preset)
    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
    compiled = torch.compile(model, backend="modsparse", options={"policy": policy, "num_steps": steps, **options})
    from .video_dit import make_noise
    noise = make_noise((1, cfg.in_channels, *cfg.latent), 0, device=device, dtype=dtype)
    log = CallLog()
    with timed_ops(log, device):
        _run(compiled, noise, steps)              # compile, tune, fill caches: untimed
        modcompile.reset()
        log.enabled = True
        t0 = time.perf_counter()
        _run(compiled, noise, steps)
        total = time.perf_counter() - t0
        timed = log.calls
        if cprofile:  # where the host time of one more schedule goes, by Python function
            import cProfile
            import pstats
            modcompile.reset()
            with cProfile.Profile() as prof_py:
                _run(compiled, noise, steps)
            pstats.Stats(prof_py).sort_stats("tottime").dump_stats(f"{cprofile}.{policy}.pstats")
            print(f"== cProfile, {policy}: top functions by own time, then our functions by cumulative time")
            pstats.Stats(prof_py).sort_stats("tottime").print_stats(25)
            pstats.Stats(prof_py).sort_stats("cumulative").print_stats(r"modcompile|kernels|policies", 30)
        if line_profile:  # the same, line by line in the op bodies (the profiler's own cost inflates calls)
            from line_profiler import LineProfiler
            lines = LineProfiler(*_line_profiled())
            modcompile.reset()
            lines.enable_by_count()
            _run(compiled, noise, steps)
            lines.disable_by_count()
            print(f"== line profile, {policy}: one {steps}-step schedule")
            lines.print_stats(output_unit=1e-6, stripzeros=True)
        counts = {}
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler
            log.clear()
            modcompile.reset()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profiler(activities=activities) as prof:
                _run(compiled, noise, steps)
            for name, (_, _, event_name) in OPS.items():
                per_call = _count_per_call(prof, event_name, device)
                phases = [p for p, _ in log.calls[name]]
                if len(per_call) == len(phases):
                    counts[name] = list(zip(phases, per_call))
        log.enabled = False
    rows = {}
    for name, calls in timed.items():
        by_phase = defaultdict(list)
        for phase, seconds in calls:
            by_phase[phase].append(seconds * 1e3)
        for phase, ms in by_phase.items():
            row = {"calls": len(ms), "median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms)}
            per_call = [c for p, c in counts.get(name, []) if p == phase]
            for key in (per_call[0] if per_call else {}):
                row[key] = statistics.median(c[key] for c in per_call)
            rows[f"{name}/{phase}"] = row
    return {"policy": policy, "device": device, "steps": steps, "seq_len": cfg.seq_len, "heads": cfg.heads,
            "head_dim": cfg.head_dim, "layers": cfg.depth, "dtype": str(dtype).replace("torch.", ""),
            "block_size": options["block_size"], "schedule_s": total, "ops": rows,
            "cuda_graphs": _graphs_on(device), "site_graphs": _graphs_on(device) and not _SITE_GRAPHS_OFF,
            "last_schedule_site_calls": _site_calls()}


def _site_calls() -> dict:
    """The last schedule's site attention calls and whole plans (VMoBA's): eager, captured, replayed
    (modcompile.reset() clears)."""
    from modcompile import cuda_graphs
    calls = {"attention": cuda_graphs.SITE_CALLS, "plan": getattr(cuda_graphs, "SITE_PLANS", None)}
    return {name: {"eager": c.eager_calls, "captured": c.captures, "replayed": c.replays,
                   "failed": getattr(c, "failures", 0)}
            for name, c in calls.items() if c is not None}


_SITE_GRAPHS_OFF = False  # --no-site-graphs


def _graphs_on(device: str) -> bool:
    try:
        from modcompile import cuda_graphs
    except ImportError:  # a checkout from before the graphed selection
        return False
    return cuda_graphs.enabled(torch.device(device))


def markdown(results: list[dict]) -> str:
    device = results[0]["device"]
    label = "host time, CUDA (launch cost; GPU runs asynchronously)" if device == "cuda" else \
        "host time, CPU (not a GPU performance claim)"
    count_cols = ("launches", "copies", "syncs") if device == "cuda" else ("aten_ops",)
    r0 = results[0]
    lines = [f"{label}; {r0['layers']} layers, {r0['seq_len']} tokens, {r0['heads']} heads x {r0['head_dim']}, "
             f"{r0['dtype']}, block {r0['block_size']}, {r0['steps']} steps, CUDA graphs "
             f"{'on' if r0['cuda_graphs'] else 'off'}, site attention replayed from graphs "
             f"{'on' if r0.get('site_graphs') else 'off'}; median per layer call",
             "",
             "| policy | op | phase | calls | host ms (median) | host ms (mean) | " +
             " | ".join(f"{c} / call" for c in count_cols) + " |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in count_cols) + " |"]
    for r in results:
        for key, row in sorted(r["ops"].items()):
            op, phase = key.split("/")
            cells = " | ".join(f"{row[c]:g}" if c in row else "-" for c in count_cols)
            lines.append(f"| {r['policy']} | {op} | {phase} | {row['calls']} | {row['median_ms']:.3f} | "
                         f"{row['mean_ms']:.3f} | {cells} |")
    lines.append("")
    lines += [f"{r['policy']}, last schedule's site calls: {r['last_schedule_site_calls']}; schedule "
              f"{r['schedule_s'] * 1e3:.1f} ms" for r in results]
    for r in results:
        ms = site_call_ms(r)
        if ms is not None:
            goal = f" (issue 17: <= {SITE_CALL_GOAL_MS} ms: {'MET' if ms <= SITE_CALL_GOAL_MS else 'MISSED'})" \
                if device == "cuda" else ""
            lines.append(f"{r['policy']}: a sparse site call (plan + attention medians) takes {ms:.3f} ms of host "
                         f"time{goal}")
    return "\n".join(lines)


SITE_CALL_GOAL_MS = 0.15


def site_call_ms(result: dict) -> float | None:
    """Host ms of one sparse site call: the plan and attention ops' medians on the sparse steps."""
    ops_ = result["ops"]
    if "plan/sparse" not in ops_ or "attention/sparse" not in ops_:
        return None
    return ops_["plan/sparse"]["median_ms"] + ops_["attention/sparse"]["median_ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--policies", default="vmoba,mod,dense")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", choices=["small", "wan", "long"], default=None,
                        help="CUDA model: a demo preset (default small) or long (the long video DiT)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled schedule (op counts)")
    parser.add_argument("--no-site-graphs", action="store_true",
                        help="run every site attention call eagerly (no CallGraphs replay): the baseline of the same run")
    parser.add_argument("--tune", action="store_true",
                        help="CUDA: time kernel configurations (host time does not depend on the choice)")
    parser.add_argument("--out", default=None, help="directory for host_overhead.json / .md")
    parser.add_argument("--cprofile", default=None, metavar="PREFIX",
                        help="also cProfile one schedule per policy: top functions printed, stats in PREFIX.POLICY.pstats")
    parser.add_argument("--line-profile", action="store_true",
                        help="also time the op bodies line by line over one schedule per policy (needs line_profiler)")
    args = parser.parse_args(argv)
    if args.line_profile:
        try:
            import line_profiler  # noqa: F401
        except ImportError:
            parser.error("--line-profile needs line_profiler (pip install line_profiler)")
    if args.device == "cuda" and not args.tune:
        os.environ.setdefault("MODCOMPILE_TUNE", "0")
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only add noise (and suffer from a busy host)
    if args.no_site_graphs:
        global _SITE_GRAPHS_OFF
        _SITE_GRAPHS_OFF = True
        ops._replayable = lambda info, q: False
    results = []
    for policy in [p for p in args.policies.split(",") if p]:
        results.append(measure(policy, args.device, args.steps, profile=not args.no_profile, preset=args.preset,
                               cprofile=args.cprofile, line_profile=args.line_profile))
    table = markdown(results)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from .common import environment, write_json
        write_json(out / "host_overhead.json", {"env": environment(), "results": results})
        (out / "host_overhead.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
