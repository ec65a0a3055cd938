"""Host time of one block-sparse attention launch, layer by layer (CUDA).

``python -m benchmarks.launch_overhead [--shape B,H,N,D] [--calls 300]``

Each row times ``--calls`` back-to-back calls of one layer of the launch path on the host
(``time.perf_counter``, no synchronisation inside the loop; the GPU queue is drained before and
after), on the same q, k, v and lists, median of 5 repetitions, in microseconds per call:

- the custom-op wrappers alone: an empty ``torch.library.custom_op``, one with ``register_autograd``;
- ``modcompile.block_sparse_attention`` (the public function) and the raw entry
  ``block_sparse_attention_fwd`` (input checks, config pick, launch);
- ``_launch`` (argument list, TMA descriptors, the JIT call) with a fixed config;
- the JIT's binder alone (argument specialisation) and ``CompiledKernel.run`` alone (the C
  launcher with the arguments already bound).

The differences say where the host time of a call goes; it is no GPU time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import modcompile
from modcompile.kernels import block_sparse_attention as bsa
from modcompile.kernels.block_lists import num_blocks


def per_call_us(fn, calls: int, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def random_lists(b, h, mq, mk, density, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    width = max(1, round(density * mk))
    scores = torch.rand(b, h, mq, mk, generator=g)
    own = torch.arange(mq)[:, None] == torch.arange(mk)[None, :]
    scores[..., own] = 2.0                               # the own block first
    idx = scores.topk(width, dim=-1).indices.sort(-1).values.to(torch.int32)
    counts = torch.full((b, h, mq), width, dtype=torch.int32)
    return counts.to(device), idx.to(device)


@torch.library.custom_op("launch_bench::empty", mutates_args=())
def _empty(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(0)  # outputs may not alias inputs


@_empty.register_fake
def _(q):
    return q.new_empty(0)


@torch.library.custom_op("launch_bench::with_autograd", mutates_args=())
def _with_autograd(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(0)


@_with_autograd.register_fake
def _(q):
    return q.new_empty(0)


_with_autograd.register_autograd(lambda ctx, g: None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1,2,256,64;1,6,16384,128")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    rows = []
    for spec in args.shapes.split(";"):
        B, H, N, D = (int(x) for x in spec.split(","))
        dev = torch.device("cuda")
        q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        mq = num_blocks(N, 128)
        counts, idx = random_lists(B, H, mq, mq, args.density, dev)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, N, device=dev, dtype=torch.float32)
        cfg = bsa._pick_config(q, k, v, 128, lambda c: bsa._launch(c, q, k, v, out, lse, counts, idx, 128, 0.1))
        jit = bsa._block_sparse_attention_fwd_kernel
        captured = {}
        original_run = jit.run

        def spy(*a, **kw):
            kernel = original_run(*a, **kw)
            captured.update(args=a, kwargs=kw, kernel=kernel)
            return kernel

        jit.run = spy
        try:
            bsa._launch(cfg, q, k, v, out, lse, counts, idx, 128, 0.1)
        finally:
            jit.run = original_run
        kernel, kw = captured["kernel"], dict(captured["kwargs"])
        grid = kw.pop("grid")
        kw.pop("warmup")
        binder = jit.device_caches[torch.cuda.current_device()][4]
        bound, _, _ = binder(*captured["args"], **kw)
        values = tuple(bound.values())
        stream = torch.cuda.current_stream().cuda_stream

        def direct():
            kernel.run(grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, None, None, None,
                       *values)

        times = {
            "custom_op (empty)": lambda: torch.ops.launch_bench.empty(q),
            "custom_op + register_autograd (no_grad)": lambda: torch.ops.launch_bench.with_autograd(q),
            "public block_sparse_attention": lambda: modcompile.block_sparse_attention(q, k, v, counts, idx),
            "raw entry block_sparse_attention_fwd": lambda: bsa.block_sparse_attention_fwd(q, k, v, counts, idx,
                                                                                          out=out, lse=lse),
            "_launch (fixed config)": lambda: bsa._launch(cfg, q, k, v, out, lse, counts, idx, 128, 0.1),
            "JIT binder only": lambda: binder(*captured["args"], **kw),
            "CompiledKernel.run only": direct,
        }
        with torch.no_grad():
            for name, fn in times.items():
                rows.append((spec, name, per_call_us(fn, args.calls)))
        ref = torch.empty_like(out)
        bsa._launch(cfg, q, k, v, ref, lse, counts, idx, 128, 0.1)
        out.zero_()
        direct()
        torch.cuda.synchronize()
        rows.append((spec, "direct launch == JIT launch (max abs diff)", float((out - ref).abs().max())))
        print(f"config {cfg}", flush=True)
    print(f"\nhost time per call (us), density {args.density}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print("| shape | layer | us / call |\n|---|---|---|")
    for spec, name, t in rows:
        print(f"| {spec} | {name} | {t:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
