"""Block sparsity observation kernel (Triton, interpreter on CPU) against a float64 reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from modcompile.kernels.block_sparsity import block_sparsity, block_sparsity_ref
from modcompile.kernels.reference import block_mask_from_lists, num_blocks

# Half of the entries' scores move by at most this much between fp16/fp32 kernels and float64.
MARGIN = 2e-3


def _inputs(B, H, N, D, dtype, seed, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, D, generator=g) * sharp / D ** 0.25).to(dtype)
    k = (torch.randn(B, H, N, D, generator=g) * sharp / D ** 0.25).to(dtype)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(D)
    lse = torch.logsumexp(s, -1)
    return q, k, lse


def _bracket(q, k, lse, bs, thr, **lists):
    """Reference maps with the bound shifted by -+MARGIN (float64): the kernel must lie between."""
    lo = block_sparsity_ref(q, k, lse, block_size=bs, threshold=thr, margin=-MARGIN,
                            compute_dtype=torch.float64, **lists)
    hi = block_sparsity_ref(q, k, lse, block_size=bs, threshold=thr, margin=+MARGIN,
                            compute_dtype=torch.float64, **lists)
    return lo, hi


def _random_lists(B, H, mq, mk, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, mq, mk, generator=g) < 0.4
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    junk = torch.randint(0, mk, order.shape, generator=g, dtype=torch.int32)  # past the count: ignored
    indices = torch.where(torch.arange(mk) < counts.unsqueeze(-1), order, junk)
    return counts, indices.contiguous()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(20, 150), bs=st.sampled_from([16, 32]), d=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float16, torch.float32]), thr=st.sampled_from([1e-4, 1e-2]),
       seed=st.integers(0, 10_000))
def test_full_map_matches_float64_reference(n, bs, d, dtype, thr, seed):
    q, k, lse = _inputs(1, 2, n, d, dtype, seed)
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=thr)
    lo, hi = _bracket(q, k, lse, bs, thr)
    assert got.shape == (1, 2, num_blocks(n, bs), num_blocks(n, bs))
    assert torch.isfinite(got).all()
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all(), (got - lo).abs().max()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(20, 150), bs=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float16, torch.float32]),
       seed=st.integers(0, 10_000))
def test_restricted_map_writes_listed_blocks_only(n, bs, dtype, seed):
    B, H, d = 2, 2, 16
    q, k, lse = _inputs(B, H, n, d, dtype, seed)
    m = num_blocks(n, bs)
    counts, indices = _random_lists(B, H, m, m, seed)
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-3, kv_counts=counts, kv_indices=indices)
    listed = block_mask_from_lists(counts, indices, m)
    assert torch.equal(~got.isnan(), listed)
    lo, hi = _bracket(q, k, lse, bs, 1e-3, kv_counts=counts, kv_indices=indices)
    assert (got[listed] >= lo[listed] - 1e-6).all() and (got[listed] <= hi[listed] + 1e-6).all()
    # A given ``out`` keeps its values outside the lists.
    old = torch.full_like(got, 7.0)
    block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-3, kv_counts=counts, kv_indices=indices, out=old)
    assert torch.equal(old == 7.0, ~listed)


def test_ragged_tail_counts_only_valid_entries():
    # Keys whose scores are all -1e4 are below any threshold; with N = 40, block 32, the ragged
    # last tiles have 8 valid rows/cols, and their fraction must be computed over those only.
    n, d, bs = 40, 16, 32
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, d)
    k[..., 0] = -1e4
    k[:, :, :4, 0] = 0.0          # 4 keys of block 0 carry all the mass
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    lse = torch.logsumexp(s.double(), -1).float()
    got = block_sparsity(q, k, lse, block_size=bs, threshold=1e-4)
    assert torch.allclose(got[0, 0, :, 0], torch.tensor([28 / 32, 28 / 32]))
    assert torch.allclose(got[0, 0, :, 1], torch.tensor([1.0, 1.0]))


def test_sharp_attention_is_sparse_and_flat_is_dense():
    n, d, bs = 64, 16, 16
    q, k, lse = _inputs(1, 1, n, d, torch.float32, 0, sharp=0.0)  # all scores 0: uniform
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-4)
    assert torch.equal(got, torch.zeros_like(got))
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=0.5)  # p = 1/64 < 0.5 everywhere
    assert torch.equal(got, torch.ones_like(got))


def test_bad_inputs_raise_clear_errors():
    q, k, lse = _inputs(1, 2, 32, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="lse"):
        block_sparsity(q, k, lse[:, :1].float(), block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        block_sparsity(q, k, lse.float(), block_size=24)
    with pytest.raises(TypeError):
        block_sparsity(q, k.half(), lse.float(), block_size=16)
    with pytest.raises(ValueError, match="both"):
        block_sparsity(q, k, lse.float(), block_size=16, kv_counts=torch.zeros(1, 2, 2, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [64, 128])
def test_gpu_matches_reference(dtype, bs):
    B, H, n, d = 1, 3, 1000, 128
    q, k, lse = _inputs(B, H, n, d, dtype, 1)
    q, k, lse = q.cuda(), k.cuda(), lse.cuda()
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-4)
    # bf16 products are exact in fp32 but accumulate differently: a wider bracket.
    lo = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-4, margin=-1e-2, compute_dtype=torch.float64)
    hi = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-4, margin=1e-2, compute_dtype=torch.float64)
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all()
    m = num_blocks(n, bs)
    counts, indices = _random_lists(B, H, m, m, 3)
    got = block_sparsity(q, k, lse.float(), block_size=bs, kv_counts=counts.cuda(), kv_indices=indices.cuda())
    assert torch.equal(~got.isnan(), block_mask_from_lists(counts, indices, m).cuda())
