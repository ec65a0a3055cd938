"""GPU: the public ``modcompile.block_sparse_attention`` (default arguments) against the raw kernel
entry ``block_sparse_attention_fwd`` on the same lists, densities 0.05-1, do_bench medians; and the
host time per call of both (perf_counter over many calls on a tiny shape, GPU time negligible).

``python -m benchmarks.public_vs_kernel [--shape 1,12,32760,128]``"""
import argparse
import time

import torch
import triton

import modcompile
from modcompile.kernels.block_sparse_attention import block_sparse_attention_fwd


def lists(b, h, mq, mk, density, gen):
    keep = torch.rand(b, h, mq, mk, generator=gen, device="cuda") < density
    keep[..., 0] = True
    counts = keep.sum(-1).to(torch.int32)
    ar = torch.arange(mk, device="cuda")
    return counts, (torch.where(keep, ar, mk + ar).sort(-1).values % mk).to(torch.int32)


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1,12,32760,128")
    a = p.parse_args()
    B, H, N, D = map(int, a.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    mq = triton.cdiv(N, 128)
    print("| density | kernel ms | public ms | public / kernel |\n|---|---|---|---|")
    for density in (0.05, 0.1, 0.25, 0.5, 1.0):
        c, i = lists(B, H, mq, mq, density, gen)
        raw = lambda: block_sparse_attention_fwd(q, k, v, c, i, block_size=128)
        pub = lambda: modcompile.block_sparse_attention(q, k, v, c, i, block_size=128)
        ref = raw()[0]
        assert torch.equal(pub(), ref), "public and raw outputs differ"
        tk = triton.testing.do_bench(raw, warmup=25, rep=200, return_mode="median")
        tp = triton.testing.do_bench(pub, warmup=25, rep=200, return_mode="median")
        tk2 = triton.testing.do_bench(raw, warmup=25, rep=200, return_mode="median")
        print(f"| {density} | {tk:.3f} (again {tk2:.3f}) | {tp:.3f} | {tp / min(tk, tk2):.3f} |")
    qs, ks, vs = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    c, i = lists(1, 2, 2, 2, 1.0, gen)
    print(f"host us per call, tiny shape: raw kernel entry {host_us(lambda: block_sparse_attention_fwd(qs, ks, vs, c, i, block_size=128)):.1f}, "
          f"public {host_us(lambda: modcompile.block_sparse_attention(qs, ks, vs, c, i, block_size=128)):.1f}, "
          f"public validate=True {host_us(lambda: modcompile.block_sparse_attention(qs, ks, vs, c, i, block_size=128, validate=True), 300):.1f}")


if __name__ == "__main__":
    main()
