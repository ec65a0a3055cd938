#!/usr/bin/env bash
# One GPU session: GPU tests, the demo, the kernel/backward/policy benchmarks and the synthetic
# fidelity run; each part under its own time limit, logs into $OUT/gpu_suite.tgz.
# Usage (repo root, not pip-installed): OUT=results bash benchmarks/gpu_suite.sh
#   PARTS="tests demo" picks parts (default: tests demo bench_mod bench_vmoba fidelity_synthetic; also
#   suite (the README test command, every test), demo_small kernel kernel_quick backward_quick backward_sweep host_overhead
#   launch_overhead train_compare fidelity_dit fidelity_long fidelity_equal policy policy_long e2e
#   bench_observe nonfinite fp8 testbed);
#   T_<PART> (e.g. T_DEMO=200) overrides a part's time limit in seconds; PYTEST_ARGS narrows the tests;
#   BENCH_MOD_ARGS / OBSERVE_ARGS pass flags to benchmarks.bench_mod / benchmarks.bench_observe.
# A machine without network gets pytest/hypothesis from .whl/*.whl and diffusers (e2e part) from
# .whl/e2e/, made beforehand with e.g. `pip download --only-binary=:all: --python-version 3.12
#   --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --no-deps -d .whl/e2e diffusers==0.42.1
#   importlib_metadata==8.7.0 zipp` (the H200 image has the rest; importlib_metadata 10 needs lazy-importer).
#   The suite part takes pytest-xdist from .whl/xdist/ (`pip download --no-deps -d .whl/xdist pytest-xdist execnet`).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-results}; R=$OUT/r; mkdir -p "$R"
PY=${PY:-python3}
# knob values of the fidelity_long part's sweep (JSON per policy)
KNOB_VALUES=${KNOB_VALUES:-'{"vmoba": [0.5, 0.75], "mod": [0.8, 0.95]}'}
# every command runs as `python -m` from the repo root, so modcompile and benchmarks import from the
# checkout; the entry point (backend="modsparse" without an import) needs the editable install
# (SKIP_INSTALL=1: a CPU smoke run in an environment that must not change)
[ -n "${SKIP_INSTALL:-}" ] ||
  $PY -m pip install -q --no-build-isolation --no-deps -e . > "$R/install.log" 2>&1 || { cat "$R/install.log"; exit 1; }
# pytest/hypothesis from wheels carried in .whl/ when the machine lacks them
$PY -c "import pytest, hypothesis" 2>/dev/null || { [ -d .whl ] &&
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$R/wheels.log" 2>&1 &&
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$R/env.txt" 2>&1
cat "$R/env.txt"

part() { local name=$1 default=$2; shift 2; local var="T_${name^^}" t0=$SECONDS
  timeout "${!var:-$default}" "$@" > "$R/$name.log" 2>&1; local rc=$?
  echo "| $name | rc=$rc | $((SECONDS - t0)) s |" | tee -a "$R/summary.md"; }

for p in ${PARTS:-tests demo bench_mod bench_vmoba fidelity_synthetic}; do
  case $p in
    # tests use the untuned first config (tuning is the benchmarks' job)
    tests) part tests 110 env MODCOMPILE_TUNE=0 \
             $PY -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:-tests/} ;;
    # the README's test command as a user runs it here: gpu tests on the GPU, the rest in a child pytest
    # under the interpreter (tests/conftest.py); diffusers/transformers for the real-client tests
    suite) $PY -c "import diffusers, transformers" 2>/dev/null || $PY -m pip install -q --no-index \
             --find-links .whl --find-links .whl/e2e diffusers transformers > "$R/suite_wheels.log" 2>&1
           # pytest-xdist spreads the CPU child over 8 workers (tests/conftest.py): wheels carried in .whl/xdist/
           $PY -c "import xdist" 2>/dev/null || { [ -d .whl/xdist ] && $PY -m pip install -q --no-index --no-deps \
             --target /tmp/site .whl/xdist/*.whl > "$R/xdist_wheels.log" 2>&1 &&
             export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; }
           $PY -c "import numpy; print('numpy', numpy.__version__)" >> "$R/env.txt"
           part suite 560 $PY -m pytest -q -m "not slow" -p no:cacheprovider ${PYTEST_ARGS:-tests/} ;;
    demo) part demo 140 $PY -m benchmarks.demo --steps 20 ;;
    demo_small) part demo_small 120 $PY -m benchmarks.demo --steps 20 --preset small ;;
    kernel) part kernel 200 $PY -m benchmarks.bench_kernel --out "$R/kernel" ${KERNEL_ARGS:---no-sweep} ;;
    kernel_quick) part kernel_quick 200 $PY -m benchmarks.bench_kernel --out "$R/kernel" --quick --no-flex ;;
    backward_quick) part backward_quick 200 $PY -m benchmarks.bench_backward --out "$R/backward" --quick --no-flex --quick-check --no-sweep ;;
    backward_sweep) part backward_sweep 280 $PY -m benchmarks.bench_backward --sweep-only --jobs 12 --out "$R/bwd_sweep" ;;
    host_overhead) part host_overhead 150 $PY -m benchmarks.host_overhead --out "$R/host" ${HOST_ARGS:-} ;;
    launch_overhead) part launch_overhead 90 $PY -m benchmarks.launch_overhead ;;
    # issue 7 (B): the long DiT (16384 tokens, head_dim 128), dense (Inductor) vs vmoba from step 0 and after a
    # 25% dense warm-up; kernel configs pinned to the H100 tuner's picks so the run does not compile ~25 candidates
    train_compare) part train_compare 570 env MODCOMPILE_TUNE=0 \
             MODCOMPILE_BWD_CONFIG="dkdv=(64,64,4w,2s)+tma+ragged_branch;dq=(128,64,8w,3s)+tma+ragged_branch" \
             $PY -m benchmarks run train-dit --config long --steps "${TRAIN_STEPS:-800}" --batch-size 2 --val-every 200 \
             --compare vmoba --dense-warmup "${TRAIN_WARMUP:-0,0.25}" --checkpoint /tmp/dit_long.pt \
             --out "$R/train" --no-progress ;;
    # the small DiT for the fidelity level: trained here when /tmp/dit_small.pt is missing
    fidelity_dit) part fidelity_dit 220 $PY -m benchmarks run fidelity --checkpoint /tmp/dit_small.pt \
             --train-minutes 1.2 --out "$R/fidelity_dit" --no-progress ;;
    # issue 6: the fidelity level where speed is real: the long DiT (16384 tokens, head_dim 128) trained here,
    # then sampled dense and with each policy and knob value, timed against the Inductor-compiled dense model
    fidelity_long) part train_long 170 $PY -m benchmarks run train-dit --config long --minutes "${TRAIN_MINUTES:-1.5}" \
             --batch-size 2 --compile --checkpoint /tmp/dit_long.pt --out "$R/train_long" --no-progress
         part fidelity_long 380 env MODCOMPILE_TUNE=0 $PY -m benchmarks run fidelity \
             --checkpoint /tmp/dit_long.pt --policies vmoba,mod --sweep --knob-values "$KNOB_VALUES" --seeds 3 \
             --out "$R/fidelity_long" --no-progress ;;
    # issue 19: the long DiT trained here for a fixed number of steps (seed 0: the same model every run), its
    # attention statistics (early / mid / late steps), then mod, mod-lines, vmoba, the oracle and the static peers
    # at equal densities, 3 seeds; per-step metrics every 5th step. EQUAL_CONFIG / EQUAL_TRAIN_STEPS /
    # EQUAL_DENSITIES / EQUAL_ARGS change it (CPU smoke: EQUAL_CONFIG=tiny-video EQUAL_TRAIN_STEPS=2 ...)
    # EQUAL_CKPT: the testbed part's checkpoint (/tmp/dit_video_testbed.pt) instead, no training or statistics here
    fidelity_equal) ckpt=${EQUAL_CKPT:-/tmp/dit_${EQUAL_CONFIG:-long}_equal.pt}
         [ -n "${EQUAL_CKPT:-}" ] || part train_equal 170 $PY -m benchmarks run train-dit \
             --config "${EQUAL_CONFIG:-long}" --steps "${EQUAL_TRAIN_STEPS:-600}" --batch-size 2 --compile \
             --checkpoint "$ckpt" --out "$R/train_equal" --no-progress
         [ -n "${EQUAL_CKPT:-}" ] || part attention_stats 60 $PY -m benchmarks run attention-stats --checkpoint "$ckpt" \
             --out "$R/attention_stats" --no-progress ${STATS_ARGS:-}
         part fidelity_equal 330 env MODCOMPILE_TUNE=0 $PY -m benchmarks run fidelity --checkpoint "$ckpt" \
             --equal-density "${EQUAL_DENSITIES:-0.1,0.2,0.3,0.5}" --seeds 3 --metric-every 5 \
             --out "$R/fidelity_equal" --no-progress ${EQUAL_ARGS:-} ;;
    # issue 19 item 2: the attention testbed. The `video` DiT (the long DiT's shape on panned fine-textured videos,
    # RoPE base 256) trained here for a fixed number of steps at seed 0 (bf16, Inductor), its attention statistics
    # (first / middle / last of 30 steps), then the summary: concentration and locality per phase, head kinds,
    # the goal verdicts (GOAL lines in testbed.log) and testbed_samples.png. TESTBED_CONFIG / TESTBED_STEPS /
    # TESTBED_TRAIN_ARGS (e.g. --lr 5e-4) / TESTBED_STATS_ARGS / TESTBED_ARGS change it (CPU smoke:
    # TESTBED_CONFIG=tiny-testbed TESTBED_STEPS=2 TESTBED_STATS_ARGS="--steps 4" TESTBED_ARGS="--sample-steps 4")
    testbed) ckpt=/tmp/dit_${TESTBED_CONFIG:-video}_testbed.pt
         part train_testbed 480 $PY -m benchmarks run train-dit --config "${TESTBED_CONFIG:-video}" --seed 0 \
             --steps "${TESTBED_STEPS:-2200}" --batch-size 2 --val-every 500 --compile --checkpoint "$ckpt" \
             --out "$R/testbed" --no-progress ${TESTBED_TRAIN_ARGS:-}
         part testbed_stats 120 $PY -m benchmarks run attention-stats --checkpoint "$ckpt" --out "$R/testbed" \
             --no-progress ${TESTBED_STATS_ARGS:-}
         part testbed 120 $PY -m benchmarks run testbed --checkpoint "$ckpt" --out "$R/testbed" --no-progress \
             ${TESTBED_ARGS:-}
         grep -h "^\[bench\] GOAL" "$R/testbed.log" | tee -a "$R/summary.md" ;;
    # issue 6 level 2: one attention layer per policy over a 50-step schedule, Wan 480p shape and the long DiT's
    policy) part policy 150 env MODCOMPILE_TUNE=0 $PY -m benchmarks run policy --out "$R/policy" --no-progress ;;
    policy_long) part policy_long 120 env MODCOMPILE_TUNE=0 $PY -m benchmarks run policy --grid 16,32,32 \
             --heads 6 --out "$R/policy_long" --no-progress ;;
    bench_mod) part bench_mod 240 $PY -m benchmarks.bench_mod --out "$R/mod" ${BENCH_MOD_ARGS:-} ;;
    bench_observe) part bench_observe 200 $PY -m benchmarks.bench_observe --out "$R/observe" ${OBSERVE_ARGS:-} ;;
    bench_vmoba) part bench_vmoba 90 $PY -m benchmarks.bench_vmoba --out "$R/vmoba" ;;
    # issue 16: the fused dense-like non-finite rule against the old torch rule (stops itself under 3 min)
    # issue 18: the fp8 kernel's accuracy against float64 and its speed against our bf16 kernel, cuDNN and Flex
    fp8) part fp8 240 $PY -m benchmarks.bench_fp8 --out "$R/fp8" ${FP8_ARGS:-} ;;
    nonfinite) part nonfinite 200 $PY -m benchmarks.bench_nonfinite --out "$R/nonfinite" ${NONFINITE_ARGS:-} ;;
    e2e) # diffusers and what it needs, from wheels carried in .whl/e2e/ when the machine lacks them
         $PY -c "import diffusers" 2>/dev/null || $PY -m pip install -q --no-index --find-links .whl/e2e \
           diffusers > "$R/e2e_wheels.log" 2>&1
         # the first candidate config (the tuner's pick at these shapes) instead of tuning inside the run
         part e2e 540 env MODCOMPILE_TUNE=0 $PY -m benchmarks run e2e --out "$R/e2e" --no-progress ${E2E_ARGS:-} ;;
    fidelity_synthetic) part fidelity_synthetic 70 $PY -m benchmarks run fidelity --synthetic --out "$R/fidelity" --no-progress ;;
    *) echo "unknown part $p" ;;
  esac
done
tar czf "$OUT/gpu_suite.tgz" -C "$OUT" r
for f in "$R"/*.log; do echo "== $f"; grep -v DEBUG "$f" | tail -${TAIL:-25}; done
cat "$R/summary.md"
