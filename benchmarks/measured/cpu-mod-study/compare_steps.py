"""Per-step error comparison of bench_mod runs (CPU study of issue 5), from their bench_mod.json.

    python3 benchmarks/measured/cpu-mod-study/compare_steps.py benchmarks/measured/cpu-mod-study/*/bench_mod.json

bench_mod's mean error is over a variant's sparse steps; a full refresh on the sparse step (step
42 here) is one of them, a dense one is not. So that schedules compare on the same steps, this
prints the mean error over the sparse steps other than 42, and over steps 43-49 (after the full
refresh), each next to the per-step oracle's.
"""
import json
import statistics
import sys

for path in sys.argv[1:]:
    rows = json.load(open(path))["per_step"]
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["step"]] = r
    for variant, steps in by_variant.items():
        sparse = [s for s, r in steps.items() if r["kind"] == "sparse"]
        common = [s for s in sparse if s != 42]
        after = [s for s in sparse if s >= 43]

        def mean(key, which):
            return statistics.mean(steps[s][key] for s in which)
        print(f"{path.split('/')[-2]:15s} {variant:15s} steps!=42: err {mean('rel_l2', common):.5f} "
              f"oracle {mean('oracle_rel_l2', common):.5f} ratio {mean('rel_l2', common) / mean('oracle_rel_l2', common):.3f}"
              f" | steps 43-49: err {mean('rel_l2', after):.5f} oracle {mean('oracle_rel_l2', after):.5f}"
              f" | step 42 {steps[42]['kind']}, density after {steps[43]['density']:.3f}")
