"""The block-lists value type (modcompile/kernels/block_lists.py): conversions, checks, the lazily
built canonical and transposed lists, and every entry point taking it in place of the two tensors."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (conftest does it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import modcompile  # noqa: E402
from modcompile.kernels import block_lists as bl  # noqa: E402
from modcompile.kernels.block_lists import BlockLists, as_block_lists, num_blocks  # noqa: E402
from modcompile.kernels.reference import block_sparse_attention_ref  # noqa: E402
from modcompile.kernels.reference_bwd import block_sparse_attention_bwd_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def messy(gen, B, H, mq, mk, width):
    """Unsorted rows with duplicates, ids outside [0, mk), garbage past the count, counts negative
    and past the width."""
    counts = torch.randint(-1, width + 3, (B, H, mq), generator=gen, dtype=torch.int32)
    indices = torch.randint(-2, mk + 2, (B, H, mq, width), generator=gen, dtype=torch.int32)
    return counts, indices


def as_sets(counts, indices, mk):
    B, H, mq, width = indices.shape
    return {(b, h, m): {i for i in indices[b, h, m, :max(0, min(int(counts[b, h, m]), width))].tolist() if 0 <= i < mk}
            for b in range(B) for h in range(H) for m in range(mq)}


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), mq=st.integers(1, 9), mk=st.integers(1, 9),
       p=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_from_mask_to_mask_round_trip(B, H, mq, mk, p, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, mq, mk, generator=gen) < p
    lists = BlockLists.from_mask(mask, 16)
    assert (lists.q_len, lists.kv_len, lists.mq, lists.mk, lists.width) == (mq * 16, mk * 16, mq, mk, mk)
    assert lists.counts.dtype == lists.indices.dtype == torch.int32
    assert torch.equal(lists.counts, mask.sum(-1, dtype=torch.int32))
    for (b, h, m), s in as_sets(lists.counts, lists.indices, mk).items():
        c = int(lists.counts[b, h, m])
        assert lists.indices[b, h, m, :c].tolist() == sorted(s) == mask[b, h, m].nonzero().flatten().tolist()
    assert torch.equal(lists.to_mask(), mask)
    assert lists.density().item() == pytest.approx(mask.double().mean().item())


@settings(max_examples=40, deadline=None)
@given(mq=st.integers(1, 7), mk=st.integers(1, 7), width=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_to_mask_is_the_lists_as_sets(mq, mk, width, seed):
    gen = torch.Generator().manual_seed(seed)
    counts, indices = messy(gen, 2, 2, mq, mk, width)
    mask = BlockLists(counts, indices, 32, mq * 32 - 5, mk * 32 - 7).to_mask()
    assert mask.shape == (2, 2, mq, mk)
    for (b, h, m), s in as_sets(counts, indices, mk).items():
        assert set(mask[b, h, m].nonzero().flatten().tolist()) == s


@needs_triton
@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), mq=st.integers(1, 9), mk=st.integers(1, 9),
       width=st.integers(1, 11), seed=st.integers(0, 2**31 - 1))
def test_transposed_and_canonical_are_exact_sets(B, H, mq, mk, width, seed):
    gen = torch.Generator().manual_seed(seed)
    counts, indices = messy(gen, B, H, mq, mk, width)
    lists = BlockLists(counts.to(DEVICE), indices.to(DEVICE), 16, mq * 16, mk * 16 - 3)
    t, c = lists.transposed(), lists.canonical()
    assert (t.q_len, t.kv_len, t.counts.shape, t.indices.shape) == (mk * 16 - 3, mq * 16, (B, H, mk), (B, H, mk, mq))
    assert c.indices.shape == (B, H, mq, mk)
    sets = as_sets(counts, indices, mk)
    for (b, h, m), s in sets.items():
        n = int(c.counts[b, h, m])
        assert c.indices[b, h, m, :n].tolist() == sorted(s) and (c.indices[b, h, m, n:] == 0).all()
    for b in range(B):
        for h in range(H):
            for kb in range(mk):
                n = int(t.counts[b, h, kb])
                assert t.indices[b, h, kb, :n].tolist() == [m for m in range(mq) if kb in sets[b, h, m]]
                assert (t.indices[b, h, kb, n:] == 0).all()
    # Transposing twice gives the canonical lists back.
    back = t.transposed()
    assert torch.equal(back.counts, c.counts) and torch.equal(back.indices, c.indices)
    assert (back.q_len, back.kv_len) == (lists.q_len, lists.kv_len)
    # The torch reference agrees with what ran (the Triton kernel here).
    (fc, fi), (qc, qi) = bl.sorted_sets_ref(counts, indices, mk)
    for got, want in ((c.counts, fc), (c.indices, fi), (t.counts, qc), (t.indices, qi)):
        assert torch.equal(got.cpu(), want)


def test_derived_lists_are_built_once(monkeypatch):
    calls = []
    real = bl._sorted_sets
    monkeypatch.setattr(bl, "_sorted_sets", lambda *a, **k: (calls.append(k["transposed"]), real(*a, **k))[1])
    lists = BlockLists.full(1, 2, 40, 50, 16)
    t = lists.transposed()
    assert lists.transposed() is t and lists.canonical() is lists.canonical()
    assert calls == [True]  # one build gave both
    seeded = BlockLists(lists.counts, lists.indices, 16, 40, 50, transposed=t)
    assert seeded.transposed() is t
    seeded.canonical()
    assert calls == [True, False]  # only the canonical half


def test_check_names_each_fault():
    lists = BlockLists.full(2, 3, 100, 70, 32)
    lists.check(2, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"kv_counts must be \(B, H, Mq\) = \(2, 4, 4\)"):
        lists.check(2, 4)
    with pytest.raises(TypeError, match="int32"):
        BlockLists(lists.counts.long(), lists.indices, 32, 100, 70).check(2, 3)
    with pytest.raises(ValueError, match="kv_indices must be"):
        BlockLists(lists.counts, lists.indices[:, :, :2], 32, 100, 70).check(2, 3)
    with pytest.raises(ValueError, match="kv_counts must be"):
        BlockLists(lists.counts, lists.indices, 32, 200, 70).check(2, 3)  # 7 query blocks, lists for 4
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on"):
            lists.check(2, 3, torch.device("cuda"))


def test_full_lists_and_lengths():
    lists = BlockLists.full(1, 2, 33, 65, 16)
    assert (lists.mq, lists.mk) == (num_blocks(33, 16), num_blocks(65, 16)) == (3, 5)
    assert lists.to_mask().all() and lists.density().item() == 1.0
    lists.validate()


def test_as_block_lists_rules():
    lists = BlockLists.full(1, 1, 64, 64, 32)
    assert as_block_lists(lists, None, None, 64, 64) is lists
    assert as_block_lists(lists, None, 32, 64, 64) is lists
    with pytest.raises(ValueError, match="differs"):
        as_block_lists(lists, None, 16, 64, 64)
    with pytest.raises(ValueError, match="queries"):
        as_block_lists(lists, None, None, 96, 64)
    with pytest.raises(TypeError, match="not both"):
        as_block_lists(lists, lists.indices, None, 64, 64)
    built = as_block_lists(lists.counts, lists.indices, None, 64, 64)
    assert built.block_size == 128 and built.counts is lists.counts


def _random_case(seed, B=1, H=2, N=75, Nk=61, D=16, bs=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen)
    k, v = torch.randn(2, B, H, Nk, D, generator=gen).unbind(0)
    mask = torch.rand(B, H, num_blocks(N, bs), num_blocks(Nk, bs), generator=gen) < 0.5
    mask[..., 0] = True
    lists = BlockLists.from_mask(mask, bs, N, Nk)
    return (q.to(dtype), k.to(dtype), v.to(dtype)), lists


@pytest.mark.parametrize("seed", [0, 1])
def test_public_function_takes_block_lists(seed):
    (q, k, v), lists = _random_case(seed)
    want, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), lists)
    got = modcompile.block_sparse_attention(q, k, v, lists)
    same = modcompile.block_sparse_attention(q, k, v, lists.counts, lists.indices, block_size=16)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got, same)
    with pytest.raises(ValueError, match="differs"):
        modcompile.block_sparse_attention(q, k, v, lists, block_size=32)


@needs_triton
def test_kernels_take_block_lists():
    from modcompile.kernels.block_sparse_attention import block_sparse_attention_fwd
    from modcompile.kernels.block_sparse_attention_bwd import block_sparse_attention_bwd

    (q, k, v), lists = _random_case(2)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    lists = BlockLists(lists.counts.to(DEVICE), lists.indices.to(DEVICE), 16, lists.q_len, lists.kv_len)
    out64, lse64 = block_sparse_attention_ref(q.double(), k.double(), v.double(), lists)
    out, lse = block_sparse_attention_fwd(q, k, v, lists)
    assert torch.allclose(out.double(), out64, atol=1e-5, rtol=1e-4)
    do = torch.randn_like(q)
    want = block_sparse_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), out64, lse64, lists)
    got = block_sparse_attention_bwd(do, q, k, v, out, lse, lists)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, atol=1e-4, rtol=1e-3)
