"""GPU: what the dense-like non-finite rule (``nonfinite="dense"``) costs a sparse call.

    python -m benchmarks.bench_nonfinite --out DIR [--tune] [--smoke]

At (1,12,32760,128) and (1,24,75600,128) bf16 (views of (B, N, H, D) storage), random sorted block
lists with the own block at densities 0.05, 0.1, 0.25, 1.0, do_bench medians (the smaller of two
interleaved rounds) of ``dispatch.attention_forward``:

* ``off``: no rule (the default ``nonfinite="listed"``);
* ``old``: the previous torch rule after the call (row sums of k and v, a gather on the lists, a
  masked_fill over out and lse; :func:`old_torch_rule`, kept here only);
* ``fused``: ``like_dense=True``: flags kernel + poison step + the kernel's epilogue
  (modcompile/kernels/nonfinite.py);
* ``flags+poison``: the two small launches alone, and the flags kernel's read rate of k and v.

Correctness, with NaN / Inf planted in k and v: the fused rule against the old one (same NaN rows in
out and lse; the other rows as the plain call's, also reported whether bit for bit) on a small
ragged shape with and without a token permutation (``q_rows``) before timing, once per timed shape,
and after timing for every candidate launch configuration of the forward kernel (as time allows).
Writes DIR/bench_nonfinite.md and .json and prints the table last. ``--tune``: let the forward
kernel time its candidates per tuning key (else ``MODCOMPILE_TUNE=0``: its first candidate, as the
GPU tests run, and no tuning time in the run).
``--smoke``: CPU under TRITON_INTERPRET=1, tiny fp16 shapes, to exercise this script's code.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(1, 12, 32760, 128), (1, 24, 75600, 128)]
DENSITIES = [0.05, 0.1, 0.25, 1.0]
BLOCK = 128
CHECK_SHAPE = (1, 4, 4000, 128)  # ragged: 4000 = 31 * 128 + 32
SMOKE_SHAPES = [(1, 2, 200, 32)]
SMOKE_CHECK_SHAPE = (2, 2, 150, 32)
SMOKE_BLOCK = 32
# seconds from the start: timing rows, then the all-configuration check, are skipped past these
# (and say so), so that the run stays under 3 minutes whatever the compile times
TIMING_BUDGET_S = 100
CHECK_BUDGET_S = 160


def old_torch_rule(out, lse, k, v, kv_counts, kv_indices, block_size: int, q_rows=None) -> None:
    """The rule as it was before the fused one (dispatch.nonfinite_like_dense), for comparison:
    NaN into the rows of out / lse whose query block skips a key block holding a NaN / Inf."""
    B, H, Nk, _ = k.shape
    N = out.shape[2]
    mk = -(-Nk // block_size)
    token_bad = (k.sum(-1, dtype=torch.float32) + v.sum(-1, dtype=torch.float32)).isfinite().logical_not_()
    block_bad = F.pad(token_bad, (0, mk * block_size - Nk)).view(B, H, mk, block_size).any(-1)
    width = kv_indices.shape[-1]
    listed = torch.arange(width, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    ids = kv_indices.long().clamp(0, mk - 1)
    mq = ids.shape[2]
    listed_bad = (block_bad.unsqueeze(2).expand(B, H, mq, mk).gather(-1, ids) & listed).sum(-1)
    missing = listed_bad < block_bad.sum(-1, keepdim=True)
    rows = missing.unsqueeze(-1).expand(B, H, mq, block_size).reshape(B, H, mq * block_size)[..., :N]
    if q_rows is not None:
        rows = torch.empty_like(rows).index_copy_(2, q_rows.long(), rows)
    out.masked_fill_(rows.unsqueeze(-1), float("nan"))
    lse.masked_fill_(rows, float("nan"))


def make_timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_median(fn, reps=3):  # smoke only: not a performance claim
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return cpu_median


def plant(k, v, seed: int):
    """Copies of k and v with a NaN and an Inf in each of a few (head, key block)s, one in the ragged
    last token; returns them and the number of blocks hit."""
    k, v = k.clone(), v.clone()
    B, H, N, D = k.shape
    g = torch.Generator().manual_seed(seed)
    spots = [(0, 0, N - 1)] + [(int(torch.randint(B, (1,), generator=g)), int(torch.randint(H, (1,), generator=g)),
                               int(torch.randint(N, (1,), generator=g))) for _ in range(4)]
    for i, (b, h, n) in enumerate(spots):
        d = int(torch.randint(D, (1,), generator=g))
        (k if i % 2 else v)[b, h, n, d] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    return k, v, len(spots)


def finite_diff(a, b) -> float:
    """Max |a - b| where both are finite; inf where only one of them is (the Inf of a row that
    lists an Inf value must stay)."""
    ok_a, ok_b = a.isfinite(), b.isfinite()
    if not torch.equal(ok_a, ok_b):
        return float("inf")
    return (a[ok_a].float() - b[ok_b].float()).abs().max().item() if ok_a.any() else 0.0


def compare(q, k, v, counts, indices, block_size, rows=None, config=None):
    """The fused rule vs the old one on the same launch configuration. Returns a dict; ``ok`` when
    the NaN rows of out and lse are the same and every other row is the plain call's (up to
    rounding: the two are separate compiles of the kernel)."""
    from modcompile import dispatch
    from modcompile.kernels.block_lists import BlockLists
    from modcompile.kernels.block_sparse_attention import block_sparse_attention_fwd

    scale = q.shape[-1] ** -0.5
    kw = dict(block_size=block_size, scale=scale, q_rows=rows, config=config)
    plain, plain_lse = block_sparse_attention_fwd(q, k, v, counts, indices, **kw)
    want, want_lse = plain.clone(), plain_lse.clone()
    old_torch_rule(want, want_lse, k, v, counts, indices, block_size, rows)
    triton_path = dispatch.use_triton(q)
    poison = dispatch.nonfinite_poison(k, v, BlockLists(counts, indices, block_size, q.shape[2], k.shape[2]),
                                       triton_path)
    got, got_lse = block_sparse_attention_fwd(q, k, v, counts, indices, poison=poison, **kw)
    want_nan, got_nan = want.isnan().any(-1), got.isnan().any(-1)
    fine = ~want_nan
    same_rows = torch.equal(want_nan, got_nan) and torch.equal(want_lse.isnan(), got_lse.isnan())
    bit_exact = torch.equal(got[fine], plain[fine]) and torch.equal(got_lse[fine], plain_lse[fine])
    diff = max(finite_diff(got[fine], plain[fine]), finite_diff(got_lse[fine], plain_lse[fine]))
    listed_nan = plain.isnan().any(-1)
    return dict(ok=bool(same_rows and diff <= 1e-2), nan_rows=int(want_nan.sum()),
                rows_only_the_rule_spoils=int((want_nan & ~listed_nan).sum()),
                same_nan_rows=bool(same_rows), rest_max_abs_diff=diff, rest_bit_exact=bool(bit_exact))


def correctness(device, dtype, shape, block_size, log, all_configs=False, deadline=float("inf")):
    """Planted NaN / Inf on a small ragged shape: the default configuration with and without
    q_rows, or (``all_configs``) every candidate the tuner would time, without q_rows, until
    ``deadline``."""
    from benchmarks.common import bnhd_randn, random_block_lists
    from modcompile.kernels import block_sparse_attention as bsa
    from modcompile.kernels._common import interpreting, tma_usable
    from modcompile.kernels.tuning import forward_configs, forward_interpreter_config

    B, H, N, D = shape
    q, k, v = bnhd_randn(shape, dtype, device, seed=1)
    k, v, _ = plant(k, v, seed=2)
    counts, indices, _ = random_block_lists(B, H, N, 0.25, device, 3, block_size)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=torch.int32)
    if not all_configs:
        cases = [(None, None), (None, perm)]
    elif interpreting():
        cases = [(forward_interpreter_config(block_size), None)]
    else:
        cases = [(cfg, None) for cfg in forward_configs(block_size, D, tma=tma_usable(k, v))]
    results = []
    for cfg, rows in cases:
        name = f"{shape} config {cfg or 'default'} q_rows {'perm' if rows is not None else 'none'}"
        if time.monotonic() > deadline:
            results.append(dict(config=name, ok=None, note="not checked: time budget"))
            continue
        try:
            bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=block_size, q_rows=rows, config=cfg)
        except Exception as err:  # noqa: BLE001  the plain kernel does not build: not this rule's fault
            results.append(dict(config=name, ok=None, note=f"plain config fails: {type(err).__name__}"))
            continue
        try:
            res = compare(q, k, v, counts, indices, block_size, rows, cfg)
        except Exception as err:  # noqa: BLE001
            res = dict(ok=False, note=f"{type(err).__name__}: {err}"[:300])
        results.append(dict(config=name, **res))
        log(f"check {name}: {res}")
    return results


def time_shape(shape, dtype, device, block_size, timer, deadline, log):
    from benchmarks.common import bnhd_randn, random_block_lists
    from modcompile import dispatch
    from modcompile.kernels import nonfinite
    from modcompile.kernels.block_lists import BlockLists

    B, H, N, D = shape
    q, k, v = bnhd_randn(shape, dtype, device, seed=0)
    scale = D ** -0.5
    rows, checks = [], []
    for density in DENSITIES:
        if time.monotonic() > deadline:
            rows.append(dict(shape=str(shape), density=density, note="skipped: time budget"))
            continue
        c, i, real = random_block_lists(B, H, N, density, device, 5, block_size)
        lists = BlockLists(c, i, block_size, N, N)
        if density == 0.1:  # the planted check at full size, default configuration
            kp, vp, _ = plant(k, v, seed=6)
            checks.append(dict(config=f"{shape} density {density} config default q_rows none",
                               **compare(q, kp, vp, c, i, block_size)))
            log(f"check {shape} density {density}: {checks[-1]}")
            del kp, vp

        def old():
            out, lse = dispatch.attention_forward(q, k, v, lists, scale)
            old_torch_rule(out, lse, k, v, c, i, block_size)

        fns = {"off": lambda: dispatch.attention_forward(q, k, v, lists, scale),
               "old": old,
               "fused": lambda: dispatch.attention_forward(q, k, v, lists, scale, like_dense=True),
               "flags+poison": lambda: dispatch.nonfinite_poison(k, v, lists, True),
               "flags": lambda: nonfinite.block_flags(k, v, block_size)}
        ms = {name: [] for name in fns}
        for _ in range(2):  # interleaved rounds: clock drift hits every variant alike
            for name, fn in fns.items():
                ms[name].append(timer(fn))
        best = {name: min(t) for name, t in ms.items()}
        read_gb = 2 * k.numel() * k.element_size() / 1e9
        rows.append(dict(shape=str(shape), density=round(real, 3), off_ms=best["off"], old_ms=best["old"],
                         old_pct=100 * (best["old"] / best["off"] - 1), fused_ms=best["fused"],
                         fused_pct=100 * (best["fused"] / best["off"] - 1), flags_poison_ms=best["flags+poison"],
                         flags_ms=best["flags"], flags_read_gb_s=read_gb / (best["flags"] / 1e3)))
        log(f"{shape} density {real:.3f}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in best.items()))
    return rows, checks


COLUMNS = [("shape", "shape", "{}"), ("density", "density", "{}"), ("off_ms", "off ms", "{:.3f}"),
           ("old_ms", "old rule ms", "{:.3f}"), ("old_pct", "old +%", "{:+.1f}"), ("fused_ms", "fused ms", "{:.3f}"),
           ("fused_pct", "fused +%", "{:+.1f}"), ("flags_poison_ms", "flags+poison ms", "{:.3f}"),
           ("flags_ms", "flags ms", "{:.3f}"), ("flags_read_gb_s", "flags k+v read GB/s", "{:.0f}")]


def table(rows) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [spec.format(r[key]) if key in r else (r.get("note", "") if key == "off_ms" else "")
                 for key, _, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tune", action="store_true", help="forward kernel tunes its launch config per key")
    p.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny fp16 shapes")
    p.add_argument("--timing-budget", type=float, default=TIMING_BUDGET_S,
                   help="seconds from the start after which timing rows are skipped")
    p.add_argument("--check-budget", type=float, default=CHECK_BUDGET_S,
                   help="seconds from the start after which the all-configuration check stops")
    a = p.parse_args(argv)
    if a.smoke:
        # before triton is imported (modcompile's kernels are imported lazily below)
        os.environ["TRITON_INTERPRET"] = "1"
    if not a.tune:
        os.environ["MODCOMPILE_TUNE"] = "0"
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --smoke)")
    import triton

    dtype = torch.float16 if a.smoke else torch.bfloat16
    shapes, check_shape, block = ((SMOKE_SHAPES, SMOKE_CHECK_SHAPE, SMOKE_BLOCK) if a.smoke
                                  else (SHAPES, CHECK_SHAPE, BLOCK))
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)  # noqa: E731
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1, smoke)",
               torch=torch.__version__, triton=triton.__version__, dtype=str(dtype), block=block,
               tuning="on" if a.tune else "off (MODCOMPILE_TUNE=0: first candidate)",
               timing="triton.testing.do_bench median, min of 2 interleaved rounds" if device == "cuda"
               else "CPU perf_counter (not a performance claim)")
    log(f"environment: {env}")

    checks = correctness(device, dtype, check_shape, block, log)
    timer = make_timer(device)
    rows, errors = [], []
    for shape in shapes:
        try:
            r, c = time_shape(shape, dtype, device, block, timer, t0 + a.timing_budget, log)
            rows += r
            checks += c
        except Exception as err:  # noqa: BLE001  keep the other shape's numbers
            errors.append(f"{shape}: {type(err).__name__}: {err}"[:500])
            log(f"ERROR {errors[-1]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    checks += correctness(device, dtype, check_shape, block, log, all_configs=True, deadline=t0 + a.check_budget)

    all_checks = checks
    failed = [c for c in all_checks if c.get("ok") is False]
    skipped = [c for c in all_checks if c.get("ok") is None]
    verdict = (f"correctness: {len(all_checks) - len(failed) - len(skipped)} ok, {len(failed)} FAILED, "
               f"{len(skipped)} not run (config does not build without the rule either, or time budget)")
    md = (f"## Dense-like non-finite rule: cost per sparse call\n\n"
          + "".join(f"- {k_}: {v_}\n" for k_, v_ in env.items())
          + f"- {verdict}\n" + "".join(f"- FAILED: {c}\n" for c in failed)
          + "".join(f"- ERROR: {e}\n" for e in errors)
          + "- +% columns: time over `off` (the call without the rule)\n\n" + table(rows))
    (out_dir / "bench_nonfinite.md").write_text(md)
    (out_dir / "bench_nonfinite.json").write_text(json.dumps(
        dict(environment=env, checks=checks, rows=rows, errors=errors),
        indent=2, default=str) + "\n")
    log(f"wrote {out_dir / 'bench_nonfinite.md'}")
    print("\n" + md, flush=True)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
