"""Gradient checks of the training benchmark: every backward launch candidate against a float64
reference and against SDPA-with-the-same-mask in bf16 (rule: err <= 2 * err_sdpa_bf16 + tiny), on
smaller ragged shapes; each candidate in its own subprocess (``python -m benchmarks.bench_backward
--worker-check I``), in parallel. Also Flex with the same mask, for information.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from modcompile.kernels import block_sparse_attention_bwd as bwd_kernel
from modcompile.kernels import tuning
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.block_lists import mask_from_lists, num_blocks
from modcompile.kernels.reference_bwd import block_sparse_attention_bwd_ref

from .backward_common import BLOCK, DEVICE, flex_block_mask, log, make_inputs, random_block_lists

REPO = Path(__file__).resolve().parent.parent  # the workers run from here

# Check shapes: ragged N; (1, 4, 3000, 128) bf16 compiles the same kernel variants as the timing
# shape (N % 16 == 8 in both, list widths are not specialized), so its compiles are reused.
CHECK_CASES = [((1, 4, 3000, 128), torch.bfloat16, 0.25), ((2, 3, 1000, 64), torch.bfloat16, 0.5),
               ((1, 2, 2100, 128), torch.float16, 0.1)]
CHECK_SETS = {"sweep": CHECK_CASES[:1], "quick": CHECK_CASES[:2], "full": CHECK_CASES}
RESULT_TAG = "CHECK_RESULT "


def check_case(shape, dtype, density, configs, device=None):
    """Gradients of each config vs a float64 reference (forward outputs from the reference too, so
    only the backward is under test); yields one result dict per config."""
    device = device or DEVICE
    B, H, N, D = shape
    q, k, v, do = make_inputs(shape, dtype, device, seed=1)
    counts, indices, _ = random_block_lists(B, H, N, density, device, seed=2)
    mk = num_blocks(N, BLOCK)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    out64, lse64 = block_sparse_attention_ref(q64, k64, v64, counts, indices, block_size=BLOCK)
    ref = block_sparse_attention_bwd_ref(do64, q64, k64, v64, out64, lse64, counts, indices, block_size=BLOCK)
    token_block = torch.arange(N, device=device) // BLOCK
    allowed = mask_from_lists(counts, indices, mk)[:, :, token_block][..., token_block]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, attn_mask=allowed).backward(do)
    sdpa_err = [(t.grad.double() - r).abs().max().item() for t, r in zip(leaves, ref)]
    out, lse = out64.to(dtype), lse64.float()
    for cfg in configs:
        row = dict(shape=list(shape), dtype=str(dtype), density=density, config=cfg.label(), label=cfg.label(),
                   sdpa_err_dq_dk_dv=sdpa_err)
        t0 = time.time()
        try:
            grads = bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices,
                                                          block_size=BLOCK, config=cfg)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 (a config the compiler rejects)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", first_call_s=time.time() - t0)
            yield row
            continue
        errs = [(g.double() - r).abs().max().item() for g, r in zip(grads, ref)]
        ok = all(bool(torch.isfinite(g).all()) for g in grads) and all(
            e <= 2 * s_ + 1e-4 for e, s_ in zip(errs, sdpa_err))
        row.update(ok=ok, err_dq_dk_dv=errs, first_call_s=time.time() - t0)
        yield row


def worker_check(index: int, set_name: str) -> int:
    """Subprocess body: check candidate ``index`` on the cases of ``set_name``; one line per case."""
    cfg = tuning.backward_configs(BLOCK)[index]
    for shape, dtype, density in CHECK_SETS[set_name]:
        for row in check_case(shape, dtype, density, [cfg]):
            print(RESULT_TAG + json.dumps(row), flush=True)
    return 0


class ParallelChecks:
    """Every candidate checked in its own subprocess, ``jobs`` at a time, in the background."""

    def __init__(self, set_name: str, jobs: int, timeout_s: float = 300):
        self.configs = tuning.backward_configs(BLOCK)
        self.set_name = set_name
        self.t0 = time.time()
        pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.futures = [pool.submit(self._one, i, timeout_s) for i in range(len(self.configs))]
        pool.shutdown(wait=False)

    def command(self, index) -> list[str]:
        return [sys.executable, "-m", "benchmarks.bench_backward", "--worker-check", str(index),
                "--check-set", self.set_name]

    def _one(self, index, timeout_s):
        cmd = self.command(index)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
            stderr, rc = f"timed out after {timeout_s} s", "timeout"
        rows = [json.loads(line[len(RESULT_TAG):]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
        expected = len(CHECK_SETS[self.set_name])
        if len(rows) < expected:  # the worker died (compiler crash, timeout): the rest count as failed
            tail = " | ".join(stderr.strip().splitlines()[-3:])[:300]
            rows.append(dict(config=self.configs[index].label(), label=self.configs[index].label(), ok=False,
                             error=f"worker rc={rc}: {tail}"))
        return rows

    def wait(self):
        """``(results, failed configs)``; logs one line per check."""
        results, failed = [], []
        for cfg, fut in zip(self.configs, self.futures):
            rows = fut.result()
            results.extend(rows)
            if not all(r["ok"] for r in rows):
                failed.append(cfg)
            for r in rows:
                if "err_dq_dk_dv" in r:
                    log(f"  check {tuple(r['shape'])} {r['dtype']} d={r['density']} {r['label']}: err dq/dk/dv "
                        + "/".join(f"{e:.1e}" for e in r["err_dq_dk_dv"]) + " (sdpa "
                        + "/".join(f"{e:.1e}" for e in r["sdpa_err_dq_dk_dv"])
                        + f") {'OK' if r['ok'] else 'FAIL'} [first call {r['first_call_s']:.1f} s]")
                else:
                    log(f"  check {r['label']}: FAILED {r.get('error', '')}")
        log(f"  checks done in {time.time() - self.t0:.0f} s: {len(self.configs) - len(failed)}/"
            f"{len(self.configs)} candidates OK")
        return results, failed


def check_flex(device, flex_fn, cases):
    """Flex with the same mask against the float64 reference (information, not a gate)."""
    for shape, dtype, density in cases:
        if dtype != torch.bfloat16:
            continue
        B, H, N, D = shape
        q, k, v, do = make_inputs(shape, dtype, device, seed=1)
        counts, indices, _ = random_block_lists(B, H, N, density, device, seed=2)
        q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
        out64, lse64 = block_sparse_attention_ref(q64, k64, v64, counts, indices, block_size=BLOCK)
        ref = block_sparse_attention_bwd_ref(do64, q64, k64, v64, out64, lse64, counts, indices, block_size=BLOCK)
        try:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            flex_fn(*leaves, block_mask=flex_block_mask(counts, indices, N)).backward(do)
            ferr = [(t.grad.double() - r).abs().max().item() for t, r in zip(leaves, ref)]
            log(f"  flex same mask {shape}: err dq/dk/dv " + "/".join(f"{e:.1e}" for e in ferr))
        except Exception as e:  # noqa: BLE001
            log(f"  flex check failed: {type(e).__name__}: {str(e)[:200]}")
