"""Block-sparse attention forward kernel vs the float64 reference.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (conftest) on tiny shapes, fp16/fp32 (the
interpreter's bf16 dot is wrong). GPU (marked ``gpu``): bf16/fp16 at real sizes, every candidate
launch configuration. Pass rule: max|out - ref64| <= 2 * max|torch_same_dtype - ref64|
+ tiny, where torch_same_dtype is the torch reference computed in the input dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modcompile.kernels import block_sparse_attention as bsa
from modcompile.kernels import tuning
from modcompile.kernels.tuning import LaunchConfig
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.block_lists import full_block_lists, mask_from_lists, num_blocks

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ------------------------------------------------------------------------------ helpers
def random_qkv(B, H, N, D, dtype, layout, gen, n_k=None, device=DEVICE):
    """q, k, v (B, H, N, D) with the strides of the chosen layout; never zeros."""
    n_k = N if n_k is None else n_k

    def one(n):
        if layout == "bnhd":  # what SDPA callers pass: (B, N, H, D) viewed as (B, H, N, D)
            t = torch.randn(B, n, H, D, generator=gen, dtype=torch.float32).transpose(1, 2)
        else:
            t = torch.randn(B, H, n, D, generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=dtype)
    return one(N), one(n_k), one(n_k)


def random_lists(B, H, mq, mk, gen, *, density=None, p_empty=0.0, own=True, shuffle=True,
                 extra_width=0, device=DEVICE):
    """Distinct random key-block lists per (b, h, query block), unsorted unless ``shuffle=False``.

    Rows are empty with probability ``p_empty``; otherwise the own block (when ``own`` and it
    exists) is included. Slots past the count hold garbage (which the kernel must ignore)."""
    width = mk + extra_width
    counts = torch.zeros(B, H, mq, dtype=torch.int32)
    indices = torch.randint(-5, mk + 5, (B, H, mq, width), generator=gen, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for i in range(mq):
                if torch.rand((), generator=gen).item() < p_empty:
                    continue
                if density is None:
                    count = int(torch.randint(1, mk + 1, (), generator=gen))
                else:
                    count = max(1, min(mk, round(density * mk)))
                perm = torch.randperm(mk, generator=gen)
                if own and i < mk:
                    perm = torch.cat([torch.tensor([i]), perm[perm != i]])
                chosen = perm[:count]
                if shuffle:
                    chosen = chosen[torch.randperm(count, generator=gen)]
                else:
                    chosen = chosen.sort().values
                counts[b, h, i] = count
                indices[b, h, i, :count] = chosen.to(torch.int32)
    return counts.to(device), indices.to(device)


def check_against_reference(q, k, v, counts, indices, block_size, out, lse, scale=None):
    """The FlashAttention-style bound on out, a tight bound on lse, exact empty rows."""
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), counts, indices,
                                              block_size=block_size, scale=scale)
    low, _ = block_sparse_attention_ref(q, k, v, counts, indices, block_size=block_size, scale=scale,
                                        compute_dtype=q.dtype if q.dtype != torch.bfloat16 else torch.float32)
    assert not torch.isnan(out).any(), "output has NaN (unwritten or 0/0)"
    assert not torch.isnan(lse).any(), "lse has NaN"
    N = q.shape[2]
    row_count = counts.repeat_interleave(block_size, dim=-1)[..., :N]
    empty = row_count == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty rows must give out = 0"
    assert torch.isneginf(lse[empty]).all(), "empty rows must give lse = -inf"
    ref_err = (low.double() - ref).abs().max().item() if ref.numel() else 0.0
    tiny = 1e-6 if q.dtype == torch.float32 else 1e-5
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 2 * ref_err + tiny, f"max error {err:.3e} > 2 * {ref_err:.3e} + {tiny}"
    full = ~empty
    if full.any():
        lse_err = (lse[full].double() - ref_lse[full]).abs().max().item()
        assert lse_err <= 1e-4 + 1e-5 * ref_lse[full].abs().max().item(), f"lse error {lse_err:.3e}"


def interpreter_configs(block_size):
    """Launch configurations that exercise every code path at interpreter-friendly tile sizes."""
    half = max(16, block_size // 2)
    return [LaunchConfig(block_size, half, 4, 1),
            LaunchConfig(half, block_size, 4, 1, ragged_branch=True),
            LaunchConfig(block_size, block_size, 4, 1, tma=True),
            LaunchConfig(half, half, 4, 1, tma=True, ragged_branch=True),
            LaunchConfig(block_size, half, 4, 1, tma=True, host_tma=True, ragged_branch=True),
            LaunchConfig(half, half, 4, 1, tma=True, host_tma=True, qo_tma=True)]


# ------------------------------------------------------------------------------ property tests
@st.composite
def problems(draw):
    block_size = draw(st.sampled_from([16, 32]))
    max_blocks = 6 if block_size == 16 else 5
    N = draw(st.integers(1, block_size * max_blocks))
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)), N=N,
        D=draw(st.sampled_from([16, 32, 64])), block_size=block_size,
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        layout=draw(st.sampled_from(["bhnd", "bnhd"])),
        p_empty=draw(st.sampled_from([0.0, 0.0, 0.3])),
        shuffle=draw(st.booleans()),
        config=draw(st.integers(0, 5)),
        out_layout=draw(st.sampled_from([None, "bhnd", "bnhd"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference_random_lists(p):
    gen = torch.Generator().manual_seed(p["seed"])
    B, H, N, D, bs = p["B"], p["H"], p["N"], p["D"], p["block_size"]
    q, k, v = random_qkv(B, H, N, D, p["dtype"], p["layout"], gen)
    mq = mk = num_blocks(N, bs)
    counts, indices = random_lists(B, H, mq, mk, gen, p_empty=p["p_empty"], shuffle=p["shuffle"],
                                   extra_width=1)
    cfg = interpreter_configs(bs)[p["config"]]
    if cfg.tma and not bsa.tma_usable(k, v):
        cfg = interpreter_configs(bs)[0]
    out = None
    if p["out_layout"] == "bnhd":
        out = torch.empty(B, N, H, D, dtype=q.dtype, device=DEVICE).transpose(1, 2)
    elif p["out_layout"] == "bhnd":
        out = torch.empty(B, H, N, D, dtype=q.dtype, device=DEVICE)
    if out is not None:
        out.fill_(float("nan"))  # poison: every element must be written
    lse = torch.full((B, H, N), float("nan"), device=DEVICE)
    got, got_lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=bs, out=out,
                                                  lse=lse, config=cfg)
    if out is not None:
        assert got is out
    assert got_lse is lse
    check_against_reference(q, k, v, counts, indices, bs, got, got_lse)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_q_rows_gathers_q_and_scatters_out_and_lse(p):
    """q_rows = a random permutation: the lists, k, v are in permuted order, q in the original one.
    out / lse at token q_rows[r] must equal the reference's row r computed on the permuted q; a
    poisoned output shows that every element is written."""
    gen = torch.Generator().manual_seed(p["seed"])
    B, H, N, D, bs = p["B"], p["H"], p["N"], p["D"], p["block_size"]
    q, k, v = random_qkv(B, H, N, D, p["dtype"], p["layout"], gen)
    mq = num_blocks(N, bs)
    counts, indices = random_lists(B, H, mq, mq, gen, p_empty=p["p_empty"], shuffle=p["shuffle"])
    rows = torch.randperm(N, generator=gen).to(DEVICE)
    cfg = interpreter_configs(bs)[p["config"]]
    if cfg.tma and not bsa.tma_usable(k, v):
        cfg = interpreter_configs(bs)[0]
    out = torch.full((B, N, H, D), float("nan"), dtype=q.dtype, device=DEVICE).transpose(1, 2)
    lse = torch.full((B, H, N), float("nan"), device=DEVICE)
    got, got_lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=bs, out=out, lse=lse,
                                                  config=cfg, q_rows=rows.to(torch.int32), validate=True)
    assert got is out and got_lse is lse
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "an element was not written"
    # row r of the permuted order lives at token rows[r]
    check_against_reference(q[:, :, rows], k, v, counts, indices, bs, got[:, :, rows], got_lse[:, :, rows])


@pytest.mark.parametrize("gather", [False, True])
def test_tiles_smaller_than_block_write_nothing_past_n(gather):
    """N a multiple of BLOCK_M but not of the block (80 = 2.5 blocks of 32, tiles of 16): no
    program may hold rows past N. out and lse are views into larger poisoned buffers; the tail
    must stay untouched (a grid of whole blocks wrote rows 80..95 there and read q past its end)."""
    gen = torch.Generator().manual_seed(11)
    B, H, N, D, bs = 1, 1, 80, 16, 32
    q, k, v = random_qkv(B, H, N, D, torch.float32, "bhnd", gen)
    counts, indices = random_lists(B, H, 3, 3, gen)
    sentinel = 12345.0
    out_buf = torch.full((B, H, N + 32, D), sentinel, device=DEVICE)
    lse_buf = torch.full((B, H, N + 32), sentinel, device=DEVICE)
    rows = torch.randperm(N, generator=gen).to(device=DEVICE, dtype=torch.int32) if gather else None
    cfg = LaunchConfig(16, 32, 4, 1, ragged_branch=True)
    out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=bs, config=cfg,
                                              out=out_buf[:, :, :N], lse=lse_buf[:, :, :N], q_rows=rows)
    assert (out_buf[:, :, N:] == sentinel).all() and (lse_buf[:, :, N:] == sentinel).all()
    order = rows.long() if gather else torch.arange(N)
    check_against_reference(q[:, :, order], k, v, counts, indices, bs, out[:, :, order], lse[:, :, order])


def test_q_rows_identity_equals_no_q_rows_and_bad_q_rows_are_errors():
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(1, 2, 40, 16, torch.float32, "bnhd", gen)
    counts, indices = random_lists(1, 2, 3, 3, gen)
    fwd = bsa.block_sparse_attention_fwd
    plain, plain_lse = fwd(q, k, v, counts, indices, block_size=16)
    ident = torch.arange(40, dtype=torch.int32, device=DEVICE)
    out, lse = fwd(q, k, v, counts, indices, block_size=16, q_rows=ident)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
    with pytest.raises(ValueError, match="q_rows must be a"):
        fwd(q, k, v, counts, indices, block_size=16, q_rows=ident[:-1])
    with pytest.raises(ValueError, match="q_rows must be a"):
        fwd(q, k, v, counts, indices, block_size=16, q_rows=ident.view(4, 10))
    with pytest.raises(ValueError, match="q_rows must be int32"):
        fwd(q, k, v, counts, indices, block_size=16, q_rows=ident.long())
    with pytest.raises(ValueError, match="q_rows must be int32 on"):
        fwd(q, k, v, counts, indices, block_size=16, q_rows=torch.empty(40, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="permutation"):
        twice = ident.clone()
        twice[1] = 0
        fwd(q, k, v, counts, indices, block_size=16, q_rows=twice, validate=True)


@settings(max_examples=8, deadline=None)
@given(N=st.integers(1, 96), D=st.sampled_from([16, 32]), seed=st.integers(0, 2**31 - 1))
def test_full_density_equals_dense_attention(N, D, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(1, 2, N, D, torch.float32, "bnhd", gen)
    mq = num_blocks(N, 16)
    counts, indices = full_block_lists(1, 2, mq, mq, device=DEVICE)
    out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=16)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    dense_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / math.sqrt(D), dim=-1)
    assert (out.double() - dense).abs().max().item() < 1e-5
    assert (lse.double() - dense_lse).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------ targeted cases
@pytest.mark.parametrize("D", [80, 96])
def test_padded_head_dims(D):
    gen = torch.Generator().manual_seed(D)
    q, k, v = random_qkv(1, 1, 70, D, torch.float16, "bnhd", gen)
    counts, indices = random_lists(1, 1, 3, 3, gen)
    for cfg in interpreter_configs(32):
        out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=32, config=cfg)
        check_against_reference(q, k, v, counts, indices, 32, out, lse)


def test_default_config_custom_scale_and_cross_lengths():
    """Nk != N (the kernel's contract allows it), a custom scale, the untuned default config."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(2, 2, 50, 32, torch.float32, "bhnd", gen, n_k=75)
    counts, indices = random_lists(2, 2, num_blocks(50, 16), num_blocks(75, 16), gen, own=False)
    out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=16, scale=0.3)
    check_against_reference(q, k, v, counts, indices, 16, out, lse, scale=0.3)


def test_output_default_layout_is_bnhd():
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(1, 3, 40, 16, torch.float32, "bnhd", gen)
    counts, indices = full_block_lists(1, 3, 3, 3, device=DEVICE)
    out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=16)
    assert out.shape == (1, 3, 40, 16) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (1, 3, 40) and lse.is_contiguous() and lse.dtype == torch.float32


def test_non_contiguous_last_dim_is_copied():
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(1, 1, 32, 32, torch.float32, "bhnd", gen)
    q2 = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last-dim stride != 1
    counts, indices = full_block_lists(1, 1, 2, 2, device=DEVICE)
    out, _ = bsa.block_sparse_attention_fwd(q2, k, v, counts, indices, block_size=16)
    ref, _ = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=16)
    assert torch.equal(out, ref)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 32, 32, device=DEVICE)
    counts, indices = full_block_lists(1, 2, 2, 2, device=DEVICE)
    fwd = bsa.block_sparse_attention_fwd
    with pytest.raises(ValueError, match="head_dim"):
        x = torch.randn(1, 2, 32, 40, device=DEVICE)
        fwd(x, x, x, counts, indices, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        fwd(q, q, q, counts, indices, block_size=48)
    with pytest.raises(ValueError, match="kv_counts"):
        fwd(q, q, q, counts[:, :1], indices, block_size=16)
    with pytest.raises(TypeError, match="int32"):
        fwd(q, q, q, counts.float(), indices, block_size=16)
    with pytest.raises(TypeError, match="dtype"):
        fwd(q, q.half(), q, counts, indices, block_size=16)
    with pytest.raises(ValueError, match="dtype"):
        x = q.to(torch.float64)
        fwd(x, x, x, counts, indices, block_size=16)
    with pytest.raises(ValueError, match="out must be"):
        fwd(q, q, q, counts, indices, block_size=16, out=torch.empty(1, 2, 32, 16, device=DEVICE))
    with pytest.raises(ValueError, match="twice"):
        dup = indices.clone()
        dup[..., 1] = dup[..., 0]
        fwd(q, q, q, counts, dup, block_size=16, validate=True)


def test_supports_reports_reasons():
    assert bsa.supports(torch.randn(1, 1, 8, 64, device=DEVICE)) == (True, "")
    ok, reason = bsa.supports(torch.randn(1, 1, 8, 48, device=DEVICE))
    assert not ok and "head_dim" in reason
    ok, reason = bsa.supports(torch.randn(1, 8, 64, device=DEVICE))
    assert not ok and "4-d" in reason
    assert 64 in bsa.SUPPORTED_HEAD_DIMS and 128 in bsa.SUPPORTED_HEAD_DIMS
    assert torch.bfloat16 in bsa.SUPPORTED_DTYPES and torch.float16 in bsa.SUPPORTED_DTYPES


# ------------------------------------------------------------------------------ GPU
def _gpu_case(shape, dtype, block_size, density, cfg=None, seed=0, shuffle=True, gather_q=False):
    B, H, N, D = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(B, H, N, D, dtype, "bnhd", gen)
    mq = num_blocks(N, block_size)
    counts, indices = random_lists(B, H, mq, mq, gen, density=density, shuffle=shuffle)
    out = torch.full((B, N, H, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    rows = torch.randperm(N, generator=gen).to(DEVICE) if gather_q else None
    out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=block_size, out=out, config=cfg,
                                              q_rows=None if rows is None else rows.to(torch.int32))
    torch.cuda.synchronize()
    if rows is not None:  # compare in the permuted order (row r lives at token rows[r])
        q, out, lse = q[:, :, rows], out[:, :, rows], lse[:, :, rows]
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), counts, indices,
                                              block_size=block_size)
    # Same-dtype torch: SDPA with the token mask in the input dtype.
    token_block = torch.arange(N, device=DEVICE) // block_size
    allowed = mask_from_lists(counts, indices, mq)[:, :, token_block][..., token_block]
    low = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    bound = 2 * (low.double() - ref).abs().max().item() + 1e-5
    err = (out.double() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= bound, f"{shape} {dtype} bs={block_size} d={density} {cfg}: {err:.3e} > {bound:.3e}"
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block_size,density", [
    ((1, 4, 3000, 128), 128, 0.25),   # ragged N
    ((2, 3, 2048, 128), 128, 1.0),    # even N, density 1
    ((1, 4, 1000, 64), 64, 0.3),
    ((1, 2, 777, 64), 128, 0.5),
])
def test_gpu_real_sizes(shape, dtype, block_size, density):
    _gpu_case(shape, dtype, block_size, density)


@gpu
@needs_cuda
@pytest.mark.parametrize("gather_q", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_every_candidate_config(D, gather_q):
    for cfg in tuning.forward_configs(128, D, tma=True):
        if cfg.tma and torch.cuda.get_device_capability()[0] < 9:
            continue
        _gpu_case((1, 3, 1500, D), torch.bfloat16, 128, 0.3, cfg=cfg, seed=D + gather_q, gather_q=gather_q)
    if gather_q:
        _gpu_case((2, 4, 2048, D), torch.float16, 128, 0.5, seed=D, gather_q=True)  # even N, tuned config


@gpu
@needs_cuda
@pytest.mark.parametrize("D", [32, 80, 96])
def test_gpu_other_head_dims(D):
    _gpu_case((1, 2, 1000, D), torch.bfloat16, 128, 0.5, seed=D)


@gpu
@needs_cuda
def test_gpu_empty_rows_and_fp32():
    B, H, N, D = 1, 2, 600, 64
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(B, H, N, D, torch.float32, "bhnd", gen)
    counts, indices = random_lists(B, H, num_blocks(N, 64), num_blocks(N, 64), gen, p_empty=0.4)
    out, lse = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=64)
    torch.cuda.synchronize()
    check_against_reference(q, k, v, counts, indices, 64, out, lse)


def test_tuning_key_separates_small_ragged_from_large_shapes(monkeypatch):
    """A configuration timed on a small ragged shape (a test, a warm-up) must not be reused for a
    32k-token call: the key holds raggedness and the program count in powers of two."""
    monkeypatch.setattr(tuning, "device_capability", lambda device: (9, 0))

    def key(n, heads=12):
        q = torch.empty(1, heads, n, 128, dtype=torch.float16)
        return bsa._tuning_key(q, q, 128, True)

    assert key(3000) != key(32768)            # ragged, 24 vs 256 query blocks
    assert key(32760) != key(32768)           # same block count, ragged vs even
    assert key(32768) == key(32768 - 128)     # 256 vs 255 blocks: same power of two
    assert key(32768, heads=12) != key(32768, heads=40)
