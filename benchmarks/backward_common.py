"""Shared pieces of the training benchmark (bench_backward.py): the timing shape and densities,
inputs and random block lists, the timed callables (ours and dense SDPA forward+backward), the
do_bench wrapper, useful FLOPs and the timing of the backward's list building.

Importing it needs the Triton forward kernel: without it the benchmark stops here with the reason.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import common

try:
    import triton
    from modcompile.kernels import block_sparse_attention as fwd_kernel
except Exception as e:  # noqa: BLE001
    sys.exit(f"bench_backward.py: the forward kernel modcompile/kernels/block_sparse_attention.py is not importable "
             f"({type(e).__name__}: {e}); it is needed for forward+backward timings")
from modcompile.kernels import block_sparse_attention_bwd as bwd_kernel
from modcompile.kernels.block_lists import mask_from_lists, num_blocks, sorted_sets_ref
from modcompile.kernels.block_lists_kernel import block_lists_triton

SHAPE = (1, 12, 32760, 128)
DEVICE = "cuda"
DENSITIES = [1.0, 0.5, 0.25, 0.1]
BLOCK = 128


def log(msg: str) -> None:
    print(msg, flush=True)


def make_inputs(shape, dtype, device, seed, n=4):
    """q, k, v, do as (B, H, N, D) views of (B, N, H, D) storage, the layout SDPA callers pass."""
    return common.bnhd_randn(shape, dtype, device, seed, n)


def random_block_lists(B, H, N, density, device, seed):
    """round(density * Mk) distinct key blocks per query block, own block included, sorted."""
    return common.random_block_lists(B, H, N, density, device, seed, BLOCK)


def flex_block_mask(counts, indices, N, exact_mask_mod=False):
    """A Flex BlockMask with our blocks as full blocks. Compiled Flex visits only the listed blocks;
    eager Flex ignores block lists and applies mask_mod alone, so eager use needs exact_mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask
    # Flex wants index rows as wide as the number of key blocks: selected blocks first, then the rest.
    mask = mask_from_lists(counts, indices, num_blocks(N, BLOCK))
    full = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    # Listed blocks are "full" blocks: the compiled kernel never evaluates mask_mod inside them.
    block = BLOCK

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, h, q_idx // block, kv_idx // block]

    zero = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(zero, full, counts, full, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod if exact_mask_mod else None, seq_lengths=(N, N))


def ours_fwd_bwd(q, k, v, do, counts, indices, config=None):
    out, lse = fwd_kernel.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=BLOCK)
    return bwd_kernel.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices, block_size=BLOCK,
                                                 config=config)


def bench_ms(fn, grad_to_none=None, rep_ms=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")


def flops_fwd_bwd(shape, density):
    """Useful FLOPs: forward 2 matmuls, backward 5 (recomputed QK^T included), 2*N*N*D each."""
    B, H, N, D = shape
    return 7 * 2.0 * B * H * N * N * D * density


def sdpa_fwd_bwd(q, k, v, do, backend=None):
    from torch.nn.attention import sdpa_kernel

    def run():
        if backend is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v)
        o.backward(do)
    return run


def lists_times(counts, indices):
    """The backward's list building alone: ``(Triton kernel ms, torch-ops reference ms)``; both
    outputs checked equal first."""
    mk = counts.shape[-1]  # square attention: Mk = Mq
    got = block_lists_triton(counts, indices, mk)
    ref = sorted_sets_ref(counts, indices, mk)
    if not all(torch.equal(a, b) for a, b in zip((*got[0], *got[1]), (*ref[0], *ref[1]))):
        raise AssertionError("Triton block lists differ from the torch reference")
    return (bench_ms(lambda: block_lists_triton(counts, indices, mk), rep_ms=50),
            bench_ms(lambda: sorted_sets_ref(counts, indices, mk), rep_ms=50))

