#!/usr/bin/env bash
# One GPU session: GPU tests, the demo (compiled small DiT on the GPU), the policy benchmarks and
# the synthetic fidelity run; each part under its own time limit, logs into $OUT/gpu_suite.tgz.
# Usage (repo root, not pip-installed): OUT=results bash benchmarks/gpu_suite.sh
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-results}; R=$OUT/r; mkdir -p "$R"
PY=python3
# passes/ and kernels/ install as modcompile.passes / modcompile.kernels: an editable install maps them
$PY -c "import modcompile.kernels" 2>/dev/null ||
  $PY -m pip install -q --no-build-isolation --no-deps -e . > "$R/install.log" 2>&1 || { cat "$R/install.log"; exit 1; }
part() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$R/$name.log" 2>&1; local rc=$?
  echo "| $name | rc=$rc | $((SECONDS - t0)) s |" | tee -a "$R/summary.md"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$R/env.txt" 2>&1
cat "$R/env.txt"
# pytest/hypothesis from wheels carried in .whl/ when the machine lacks them
$PY -c "import pytest, hypothesis" 2>/dev/null || { [ -d .whl ] &&
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$R/wheels.log" 2>&1 &&
  export PYTHONPATH=$PYTHONPATH:/tmp/site; }
# tests use the untuned first config (tuning is the benchmarks' job)
part tests "${T_TESTS:-110}" env MODCOMPILE_BSA_NO_TUNE=1 MODCOMPILE_BWD_AUTOTUNE=0 $PY -m pytest -q -m gpu -p no:cacheprovider tests/
part demo "${T_DEMO:-140}" $PY -m benchmarks.demo --steps 20
part bench_mod "${T_MOD:-110}" $PY benchmarks/bench_mod.py --out "$R/mod"
part bench_mod_s8 "${T_MOD:-110}" $PY benchmarks/bench_mod.py --out "$R/mod_s8" --observe-row-stride 8
part bench_vmoba "${T_VMOBA:-90}" $PY benchmarks/bench_vmoba.py --out "$R/vmoba"
part fidelity_synthetic "${T_FID:-70}" $PY -m benchmarks run fidelity --synthetic --out "$R/fidelity" --no-progress
tar czf "$OUT/gpu_suite.tgz" -C "$OUT" r
for f in "$R"/tests.log "$R"/demo.log; do echo "== $f"; grep -v DEBUG "$f" | tail -25; done
for f in "$R"/mod/*.md "$R"/mod_s8/*.md "$R"/vmoba/*.md "$R"/fidelity/*.md; do echo "== $f"; head -30 "$f"; done
cat "$R/summary.md"
