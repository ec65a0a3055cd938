#!/usr/bin/env bash
# One device call: GPU tests, public vs raw kernel, host time per call of two trees (before/ = a base commit, after/ = a branch).
# Run from build/fastpath (after/ = this branch, before/ = its base commit), OUT set by the tool.
set -u
export PYTHONUNBUFFERED=1 MODCOMPILE_TUNE=0
ROOT=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/env.txt
for tree in ${TREES:-before after}; do
  cd $ROOT/$tree && python3 -m pip install -q --no-build-isolation --no-deps -e . > /dev/null 2>&1
  timeout 150 python3 -m benchmarks.host_overhead --preset long --policies vmoba,mod,dense --no-profile --steps 12 \
     --out $OUT/host_$tree > $OUT/host_$tree.log 2>&1; echo "host $tree rc=$?"
  if [ $tree = after ]; then
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_no_sync.py tests/test_kernel_forward.py tests/test_kernel_backward.py \
      tests/test_vmoba_policy.py 2>&1 | tail -150 > $OUT/tests.log; echo "tests rc=$?"
    timeout 120 python3 -m benchmarks.public_vs_kernel > $OUT/public_vs_kernel.log 2>&1; echo "public rc=$?"
  fi
done
cd $ROOT; tail -25 $OUT/tests.log; cat $OUT/public_vs_kernel.log
for t in before after; do echo "== $t"; cat $OUT/host_$t/host_overhead.md 2>/dev/null || tail -5 $OUT/host_$t.log; done
