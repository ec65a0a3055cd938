"""GPU: what a text-padding mask and the non-finite rule cost a sparse site's attention call.

On one shape, bf16, random lists with the own block at densities 1.0, 0.2, 0.1, do_bench medians:
the kernel without and with a key bias (the last ``--text`` keys are text, ``--padded`` of them
hidden), dense SDPA without and with the (B, 1, 1, N) bool mask (what HunyuanVideo runs today),
and ``dispatch.attention_forward`` with and without ``like_dense`` (the rule that writes NaN into rows
that skip a key or value block holding a NaN / Inf). Correctness first: the biased kernel against
float32 SDPA with the mask at density 1 and against the float64 reference on sparse lists.

``python -m benchmarks.bench_masked [--shape 1,12,32760,128] [--text 256] [--padded 100]``
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from modcompile import dispatch
from modcompile.kernels.block_lists import BlockLists
from modcompile.kernels.block_sparse_attention import block_sparse_attention_fwd
from modcompile.kernels.reference import block_sparse_attention_ref

from .common import bnhd_randn, random_block_lists


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1,12,32760,128")
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--padded", type=int, default=100)
    a = p.parse_args()
    B, H, N, D = map(int, a.shape.split(","))
    q, k, v = bnhd_randn((B, H, N, D), torch.bfloat16, "cuda", seed=0)
    valid = torch.ones(B, N, dtype=torch.bool, device="cuda")
    valid[:, N - a.padded:] = False
    bias = torch.zeros(B, N, device="cuda").masked_fill(~valid, float("-inf"))
    mask = valid[:, None, None, :]
    scale = D ** -0.5
    print(f"shape {(B, H, N, D)} bf16, {a.text} text keys of which {a.padded} padded; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")

    # correctness
    counts, indices, _ = random_block_lists(B, H, N, 1.0, "cuda", 0, 128)
    out, _ = block_sparse_attention_fwd(q, k, v, counts, indices, block_size=128, key_bias=bias)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    print(f"density 1 with the mask: max |kernel - fp32 SDPA| = {(out.float() - want).abs().max().item():.2e}")
    small = (1, 2, 4096, D)
    qs, ks, vs = bnhd_randn(small, torch.bfloat16, "cuda", seed=1)
    bs_ = torch.zeros(1, 4096, device="cuda")
    bs_[:, -77:] = float("-inf")
    cs, is_, _ = random_block_lists(1, 2, 4096, 0.3, "cuda", 1, 128)
    got, _ = block_sparse_attention_fwd(qs, ks, vs, cs, is_, block_size=128, key_bias=bs_)
    ref, _ = block_sparse_attention_ref(qs.double(), ks.double(), vs.double(), cs, is_, block_size=128,
                                        key_bias=bs_.double())
    print(f"density 0.3 (1,2,4096,{D}): max |kernel - fp64 reference| = {(got.double() - ref).abs().max().item():.2e}")

    dense = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=25, rep=200)
    dense_mask = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                         warmup=25, rep=200)
    rows = []
    for density in (1.0, 0.2, 0.1):
        c, i, _ = random_block_lists(B, H, N, density, "cuda", 2, 128)
        lists = BlockLists(c, i, 128, N, N)
        fns = {
            "kernel": lambda: block_sparse_attention_fwd(q, k, v, c, i, block_size=128),
            "kernel + key bias": lambda: block_sparse_attention_fwd(q, k, v, c, i, block_size=128, key_bias=bias),
            "attention_forward": lambda: dispatch.attention_forward(q, k, v, lists, scale),
            "attention_forward like_dense": lambda: dispatch.attention_forward(q, k, v, lists, scale, like_dense=True),
        }
        for name, fn in fns.items():
            fn()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            rows.append((density, name, ms))
    print(f"\ndense SDPA: {dense:.3f} ms; dense SDPA with the (B,1,1,N) bool mask: {dense_mask:.3f} ms\n")
    # host time per call is BENCHMARKS.md section 7's measurement (benchmarks/host_overhead.py): at these sizes a
    # launch loop is bound by the GPU, not the host
    print("| density | call | ms | vs dense SDPA |\n|---|---|---|---|")
    for density, name, ms in rows:
        print(f"| {density} | {name} | {ms:.3f} | {dense / ms:.2f}x |")


if __name__ == "__main__":
    main()
