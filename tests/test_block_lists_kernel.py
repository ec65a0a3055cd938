"""The Triton kernel that builds the backward's block lists (kernels/block_lists_kernel.py) against
the torch reference (block_lists.sorted_sets_ref) and against plain Python sets.

Lists under test are unsorted, with duplicates, garbage past the count, ids outside [0, Mk),
empty rows, counts of 0, full, negative and past the width, and non-contiguous layouts. Tiny tile
sizes reach the multi-chunk loops on interpreter-sized shapes.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (conftest does it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from modcompile.kernels.block_lists import sorted_sets_ref  # noqa: E402
from modcompile.kernels.block_lists_kernel import block_lists_triton  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def messy_lists(gen, B, H, mq, mk, width):
    """Per row one of: empty, full (every block, shuffled), random with duplicates and out-of-range
    ids, count past the width or negative."""
    counts = torch.randint(0, width + 1, (B, H, mq), generator=gen, dtype=torch.int32)
    indices = torch.randint(-2, mk + 2, (B, H, mq, width), generator=gen, dtype=torch.int32)
    kind = torch.randint(0, 5, (B, H, mq), generator=gen)
    counts[kind == 0] = 0
    counts[kind == 3] = width + 3
    counts[kind == 4] = -1
    if width >= mk:  # full rows: a shuffled permutation of all key blocks first
        for b, h, m in (kind == 1).nonzero().tolist():
            indices[b, h, m, :mk] = torch.randperm(mk, generator=gen).to(torch.int32)
            counts[b, h, m] = mk if torch.rand(1, generator=gen).item() < 0.5 else width
    return counts, indices


def as_sets(counts, indices, mk):
    """Python-set semantics of the lists: per (b, h, m) the set of valid listed key blocks."""
    B, H, mq, width = indices.shape
    out = {}
    for b in range(B):
        for h in range(H):
            for m in range(mq):
                c = max(0, min(int(counts[b, h, m]), width))
                out[b, h, m] = {i for i in indices[b, h, m, :c].tolist() if 0 <= i < mk}
    return out


def check_against_sets(got, counts, indices, mk):
    (fc, fi), (qc, qi) = got
    B, H, mq, _ = indices.shape
    sets = as_sets(counts, indices, mk)
    for (b, h, m), s in sets.items():
        c = int(fc[b, h, m])
        assert fi[b, h, m, :c].tolist() == sorted(s), (b, h, m)
        assert (fi[b, h, m, c:] == 0).all()
    for b in range(B):
        for h in range(H):
            for kb in range(mk):
                expect = [m for m in range(mq) if kb in sets[b, h, m]]
                c = int(qc[b, h, kb])
                assert qi[b, h, kb, :c].tolist() == expect, (b, h, kb)
                assert (qi[b, h, kb, c:] == 0).all()


def assert_same(got, ref):
    for g, r in zip((*got[0], *got[1]), (*ref[0], *ref[1])):
        assert g.dtype == torch.int32 and g.shape == r.shape
        assert torch.equal(g.cpu(), r.cpu())


@needs_triton
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), H=st.integers(1, 2), mq=st.integers(1, 11), mk=st.integers(1, 11),
       width_delta=st.integers(-3, 3), tiles=st.sampled_from([(4, 2), (8, 4), (64, 16)]),
       strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_torch_reference_and_sets(B, H, mq, mk, width_delta, tiles, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    width = max(1, mk + width_delta)
    counts, indices = messy_lists(gen, B, H, mq, mk, width)
    ref = sorted_sets_ref(counts, indices, mk)
    c, i = counts.to(DEVICE), indices.to(DEVICE)
    if strided:  # same values, other layouts: (B, Mq, H) storage for counts, a slice of a wider list
        c = c.transpose(1, 2).contiguous().transpose(1, 2)
        wide = torch.full((B, H, mq, 2 * width), 7, dtype=torch.int32, device=DEVICE)
        wide[..., ::2] = i
        i = wide[..., ::2]
    got = block_lists_triton(c, i, mk, tiles=tiles)
    assert_same(got, ref)
    check_against_sets(got, counts, indices, mk)
    # Only the canonical pair: same values, no transposed lists.
    fwd, none = block_lists_triton(c, i, mk, transposed=False, tiles=tiles)
    assert none is None and torch.equal(fwd[0].cpu(), ref[0][0]) and torch.equal(fwd[1].cpu(), ref[0][1])


@needs_triton
def test_every_row_kind_once():
    """Hand-made rows: empty, full, duplicates, unsorted, out of range, garbage past the count."""
    mk = 4
    counts = torch.tensor([[[0, 4, 5, 2, 3, 9]]], dtype=torch.int32)
    indices = torch.tensor([[[[3, 3, 3, 3, 3],     # count 0: empty despite entries
                              [2, 0, 3, 1, 1],     # full, unsorted; the 5th entry is past the count
                              [1, 1, 3, 3, 1],     # duplicates -> {1, 3}
                              [-1, 4, 0, 0, 0],    # only out-of-range ids -> empty
                              [2, 9, 0, 1, 1],     # out of range in the middle -> {0, 2}
                              [0, 1, 2, 3, 0]]]],  # count past the width -> all 4
                           dtype=torch.int32)
    (fc, fi), (qc, qi) = block_lists_triton(counts.to(DEVICE), indices.to(DEVICE), mk, tiles=(2, 2))
    assert fc.tolist() == [[[0, 4, 2, 0, 2, 4]]]
    assert fi[0, 0].tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [1, 3, 0, 0], [0, 0, 0, 0], [0, 2, 0, 0], [0, 1, 2, 3]]
    assert qc.tolist() == [[[3, 3, 3, 3]]]
    assert qi[0, 0].tolist() == [[1, 4, 5, 0, 0, 0], [1, 2, 5, 0, 0, 0], [1, 4, 5, 0, 0, 0],
                                 [1, 2, 5, 0, 0, 0]]


@needs_triton
def test_degenerate_shapes():
    for shape, mk in (((1, 1, 3, 0), 2), ((0, 2, 3, 2), 2), ((1, 1, 0, 2), 2), ((1, 1, 2, 2), 0)):
        counts = torch.full(shape[:3], 2, dtype=torch.int32, device=DEVICE)
        indices = torch.zeros(shape, dtype=torch.int32, device=DEVICE)
        got = block_lists_triton(counts, indices, mk)
        assert_same(got, sorted_sets_ref(counts.cpu(), indices.cpu(), mk))


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("density,width", [(0.25, "count"), (0.25, "full"), (1.0, "count"), (0.1, "full")])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_real_size_equals_reference_without_sync(density, width):
    """(1, 12, 256, 256) block lists, as at (1,12,32760,128) with 128-token blocks: equal to the
    torch reference bit for bit, and no host synchronisation."""
    from benchmarks.common import random_block_lists
    counts, indices, _ = random_block_lists(1, 12, 32760, density, "cuda", 3, 128, full_width=width == "full")
    ref = sorted_sets_ref(counts, indices, 256)
    block_lists_triton(counts, indices, 256)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = block_lists_triton(counts, indices, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(got, ref)


# ------------------------------------------------------------------------ launch budget of a backward
class _CountLaunches:
    """Stands in for a Triton kernel: counts ``kernel[grid](...)`` launches and runs the original with
    dispatch modes off (the interpreter's own tensor copies are not what the GPU path issues)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            from torch.utils._python_dispatch import _disable_current_modes
            self.log.append(getattr(self.kernel, "__name__", str(self.kernel)))
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return run


@needs_triton
def test_backward_call_is_four_launches_and_no_torch_compute(monkeypatch):
    """One backward = list kernel, pre-pass, dk/dv, dq; the only torch ops are output allocations
    (the torch list building was ~24 device ops per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from modcompile.kernels import block_lists_kernel
    from modcompile.kernels import block_sparse_attention_bwd as bwd

    launches = []
    for mod, name in ((block_lists_kernel, "_block_lists_kernel"), (bwd, "_bwd_prepass_kernel"),
                      (bwd, "_bwd_dkdv_kernel"), (bwd, "_bwd_dq_kernel")):
        monkeypatch.setattr(mod, name, _CountLaunches(getattr(mod, name), launches))

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    B, H, N, D, bs = 1, 2, 64, 16, 16
    q, k, v, do, out = (torch.randn(B, H, N, D, generator=gen).to(DEVICE) for _ in range(5))
    lse = torch.randn(B, H, N, generator=gen).to(DEVICE)
    counts, indices = messy_lists(gen, B, H, 4, 4, 4)
    counts, indices = counts.to(DEVICE), indices.to(DEVICE)
    mode = Ops()
    with mode:
        bwd.block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices, block_size=bs,
                                       config=(16, 16, 4, 1))
    assert launches == ["_block_lists_kernel", "_bwd_prepass_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]
    assert set(mode.seen) <= {"aten.empty.memory_format"}, sorted(set(mode.seen))
