"""Shared harness utilities: environment record, timing, progress bars, result writers.

Every result file carries the environment (device, torch/triton versions) and the settings of the
run, so a table can always be traced back to what produced it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

CPU_LABEL = "CPU (not a performance claim)"


# ---------------------------------------------------------------- environment
def environment() -> dict:
    """Device and library versions of this run (recorded with every result)."""
    info = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "timing": "triton.testing.do_bench median" if torch.cuda.is_available() else CPU_LABEL,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device):
    """bf16 autocast on CUDA (the training runs' precision), none on CPU."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


# ---------------------------------------------------------------- timing
def bench(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, device: str | None = None) -> dict:
    """Median time of ``fn()`` in milliseconds, with the method used.

    CUDA: ``triton.testing.do_bench`` (median), CUDA events if triton is missing.
    CPU: ``time.perf_counter`` medians, labelled as not a performance claim.
    """
    device = device or default_device()
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
            ms = do_bench(fn, warmup=max(warmup, 1) * 5, rep=max(reps, 1) * 10, return_mode="median")
            return {"ms": float(ms), "method": "triton.testing.do_bench(median)"}
        except ImportError:
            return {"ms": _cuda_event_median(fn, warmup, reps), "method": "cuda events (median)"}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(samples), "method": CPU_LABEL}


def _cuda_event_median(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(max(reps, 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


class Stopwatch:
    """Wall time of a region, synchronising CUDA so device work is counted (for long single runs)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.ms = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.ms = (time.perf_counter() - self._t0) * 1e3
        return False


# ---------------------------------------------------------------- progress
def progress(iterable: Iterable, desc: str = "", total: int | None = None, enabled: bool = True):
    """tqdm progress bar when tqdm is installed (and enabled), else the plain iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ---------------------------------------------------------------- result writers
def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist()) if obj.numel() > 1 else _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; keep them readable
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")
    return path


def fmt(value, digits: int = 4) -> str:
    """Cell text: floats with a few significant digits, inf/nan spelled out, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table from a list of dicts (missing cells are n/a)."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(c for c in row if c not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def env_header(env: dict, extra: dict | None = None) -> str:
    parts = [f"device: {env.get('device')}", f"torch {env.get('torch')}", f"triton {env.get('triton')}",
             f"timing: {env.get('timing')}"]
    if extra:
        parts.extend(f"{k}: {v}" for k, v in extra.items())
    return "_" + "; ".join(parts) + "_\n"


def write_results(out_dir: str | Path, name: str, title: str, rows: list[dict], *, settings: dict,
                  columns: Sequence[str] | None = None, notes: Sequence[str] = (), extra: dict | None = None,
                  quiet: bool = False, timing: str | None = None) -> dict:
    """Print and write ``name.md`` (table) and ``name.json`` (raw numbers + environment + settings).

    ``timing`` names the timing method when it is not ``bench()``'s (e.g. synchronised wall time
    per denoising step)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    if timing and torch.cuda.is_available():
        env["timing"] = timing
    md = f"## {title}\n\n" + env_header(env) + "\n" + markdown_table(rows, columns)
    for note in notes:
        md += f"\n- {note}"
    md += "\n" if notes else ""
    (out_dir / f"{name}.md").write_text(md)
    payload = {"title": title, "environment": env, "settings": settings, "rows": rows, "notes": list(notes)}
    if extra:
        payload.update(extra)
    write_json(out_dir / f"{name}.json", payload)
    if not quiet:
        print(md, flush=True)
    return payload


# ---------------------------------------------------------------- GPU kernel scripts
# bench_kernel.py and bench_backward.py: plain scripts run from a checkout (torch + triton only).
def cuda_environment() -> dict:
    """The GPU (SMs, capability) and library versions recorded by the kernel scripts."""
    import triton
    props = torch.cuda.get_device_properties(0)
    return dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                capability=list(torch.cuda.get_device_capability(0)), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                python=platform.python_version(), time=time.strftime("%Y-%m-%d %H:%M:%S"))


def bnhd_randn(shape, dtype, device, seed: int, n: int = 3) -> list:
    """``n`` random (B, H, N, D) tensors as views of (B, N, H, D) storage, the layout SDPA callers pass."""
    B, H, N, D = shape
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, N, H, D, dtype=dtype, device=device, generator=g).transpose(1, 2) for _ in range(n)]


def random_block_lists(B, H, N, density, device, seed, block_size: int, full_width: bool = False):
    """``(counts, indices, density)``: round(density * Mk) distinct random key blocks per query
    block, the own block always included, sorted.

    With ``full_width`` the index tensor is (B, H, Mq, Mk): the selected blocks first, then the
    rest (ignored), so every density gives the same shapes (FlexAttention compiles once)."""
    mq = mk = -(-N // block_size)
    count = max(1, min(mk, round(density * mk)))
    g = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(B, H, mq, mk, device=device, generator=g)
    own = torch.arange(mq, device=device)
    score[:, :, own, own] = -1.0  # the own block always ranks first
    order = score.argsort(dim=-1)
    chosen = order[..., :count].sort(dim=-1).values
    indices = torch.cat([chosen, order[..., count:]], dim=-1) if full_width else chosen
    counts = torch.full((B, H, mq), count, dtype=torch.int32, device=device)
    return counts, indices.to(torch.int32).contiguous(), count / mk


def compiled_flex_attention(log_fn=print):
    """``torch.compile(flex_attention)``, or None (and a log line) when FlexAttention is missing."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
        return torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        log_fn(f"FlexAttention unavailable: {type(e).__name__}: {e}")
        return None


def compiled_variants(kernel, prefix: str = "", key_chars: int = 160) -> list[str]:
    """One line per compiled variant of a Triton kernel: registers, spills, shared memory, launch."""
    lines = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for key, kern in cache[0].items():
            meta = kern.metadata
            lines.append(f"  {prefix}regs {kern.n_regs} spills {kern.n_spills} smem {meta.shared} "
                         f"warps {meta.num_warps} stages {meta.num_stages} | {str(key)[-key_chars:]}")
    return lines


def fmt_or_dash(x, spec: str = ".2f") -> str:
    """Table cell of the kernel scripts: ``spec``-formatted, "-" for None."""
    return "-" if x is None else format(x, spec)


# ---------------------------------------------------------------- plots
def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log("matplotlib not installed: skipping plots")
        return None


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False")
