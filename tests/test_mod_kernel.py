"""Block sparsity observation kernel (Triton, interpreter on CPU) against a float64 reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from modcompile.kernels.block_sparsity import (block_mass, block_mass_ref, block_sparsity, block_sparsity_ref,
                                               group_lists, sample_layout,
                                               sampled_rows)
from modcompile.kernels.block_lists import mask_from_lists, num_blocks

# Half of the entries' scores move by at most this much between fp16/fp32 kernels and float64.
MARGIN = 2e-3


def _inputs(B, H, N, D, dtype, seed, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, D, generator=g) * sharp / D ** 0.25).to(dtype)
    k = (torch.randn(B, H, N, D, generator=g) * sharp / D ** 0.25).to(dtype)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(D)
    lse = torch.logsumexp(s, -1)
    return q, k, lse


def _bracket(q, k, lse, bs, thr, **kwargs):
    """Reference maps with the bound shifted by -+MARGIN (float64): the kernel must lie between."""
    lo = block_sparsity_ref(q, k, lse, block_size=bs, threshold=thr, margin=-MARGIN,
                            compute_dtype=torch.float64, **kwargs)
    hi = block_sparsity_ref(q, k, lse, block_size=bs, threshold=thr, margin=+MARGIN,
                            compute_dtype=torch.float64, **kwargs)
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
    listed = mask_from_lists(counts, indices, m)
    assert torch.equal(~got.isnan(), listed)
    lo, hi = _bracket(q, k, lse, bs, 1e-3, kv_counts=counts, kv_indices=indices)
    assert (got[listed] >= lo[listed] - 1e-6).all() and (got[listed] <= hi[listed] + 1e-6).all()
    # A given ``out`` keeps its values outside the lists.
    old = torch.full_like(got, 7.0)
    block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-3, kv_counts=counts, kv_indices=indices, out=old)
    assert torch.equal(old == 7.0, ~listed)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(40, 200), bs=st.sampled_from([32, 64]), stride=st.sampled_from([2, 4, 8, 16]),
       dtype=st.sampled_from([torch.float16, torch.float32]), density=st.sampled_from([0.1, 0.4, 0.9]),
       seed=st.integers(0, 10_000))
def test_grouped_restricted_map_equals_full_map_on_listed_blocks(n, bs, stride, dtype, density, seed):
    """Restricted mode keeps the full map's query-block groups (GROUP > 1 here): listed entries are
    the full map's values bit for bit, every other entry of ``out`` stays exactly as it was."""
    B, H, d = 2, 2, 16
    assert sample_layout(bs, stride)[1] > 1
    q, k, lse = _inputs(B, H, n, d, dtype, seed)
    m = num_blocks(n, bs)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, m, m, generator=g) < density
    keep[0, 0, 0] = False                                            # an empty list
    counts = keep.sum(-1, dtype=torch.int32)
    # Listed ids first in a random order (the kernel must not rely on sorted lists), then junk.
    perm = torch.rand(B, H, m, m, generator=g).argsort(-1)
    first = torch.sort((~keep).gather(-1, perm).to(torch.int8), dim=-1, stable=True).indices
    order = perm.gather(-1, first).to(torch.int32)
    junk = torch.randint(0, m, order.shape, generator=g, dtype=torch.int32)
    indices = torch.where(torch.arange(m) < counts.unsqueeze(-1), order, junk).contiguous()
    listed = mask_from_lists(counts, indices, m)
    assert torch.equal(listed, keep)
    full = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-3, row_stride=stride)
    old = torch.randn(B, H, m, m, generator=g)
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-3, row_stride=stride,
                         kv_counts=counts, kv_indices=indices, out=old.clone())
    assert torch.equal(got[listed], full[listed])
    assert torch.equal(got[~listed], old[~listed])
    lo, hi = _bracket(q, k, lse, bs, 1e-3, row_stride=stride)
    assert (got[listed] >= lo[listed] - 1e-6).all() and (got[listed] <= hi[listed] + 1e-6).all()


@pytest.mark.parametrize("group", [1, 2, 3])
def test_group_lists_are_the_union_of_the_groups_lists(group):
    B, H, m = 1, 2, 7
    counts, indices = _random_lists(B, H, m, m, 4)
    listed, u_counts, u_indices = group_lists(counts, indices, m, group)
    assert torch.equal(listed, mask_from_lists(counts, indices, m))
    n_groups = -(-m // group)
    assert u_counts.shape == (B, H, n_groups) and u_indices.shape == (B, H, n_groups, m)
    for gi in range(n_groups):
        union = listed[:, :, gi * group:(gi + 1) * group].any(2)                 # (B, H, m)
        for b in range(B):
            for h in range(H):
                want = torch.nonzero(union[b, h]).flatten().tolist()
                c = int(u_counts[b, h, gi])
                assert u_indices[b, h, gi, :c].tolist() == want


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


@pytest.mark.parametrize("n,bs,stride", [(40, 32, 1), (40, 32, 8), (50, 16, 16), (130, 64, 4)])
def test_ragged_keys_with_a_positive_bound_are_not_counted(n, bs, stride):
    # Uniform scores, threshold 0.5: every entry is sparse (p = 1/n) and the bound ln(n) + ln(0.5)
    # is above 0, the product of the zero-padded keys past N: the kernel must not count those.
    q, k, lse = _inputs(1, 2, n, 16, torch.float32, 0, sharp=0.0)
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=0.5, row_stride=stride)
    assert torch.equal(got, torch.ones_like(got))
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=0.5 / n, row_stride=stride)  # none
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("restricted", [False, True])
def test_key_split_does_not_change_the_map(restricted):
    """The key loop split into parts of 1, 2, ... key blocks (separate programs) gives the same
    map, bit for bit, as one part per program."""
    from modcompile.kernels.tuning import LaunchConfig
    B, H, n, bs = 1, 2, 150, 16
    q, k, lse = _inputs(B, H, n, 16, torch.float32, 3)
    m = num_blocks(n, bs)
    lists = {}
    if restricted:
        counts, indices = _random_lists(B, H, m, m, 5)
        lists = dict(kv_counts=counts, kv_indices=indices)
    maps = [block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-2, row_stride=4, **lists,
                           config=LaunchConfig(32, 16, 4, 1, key_blocks=kb)) for kb in (m, 4, 1)]
    assert torch.equal(maps[0].isnan(), maps[1].isnan()) and torch.equal(maps[0].isnan(), maps[2].isnan())
    assert torch.equal(maps[0].nan_to_num(-1), maps[1].nan_to_num(-1))
    assert torch.equal(maps[0].nan_to_num(-1), maps[2].nan_to_num(-1))
    lo, hi = _bracket(q, k, lse, bs, 1e-2, row_stride=4, **lists)
    written = ~lo.isnan()
    assert (maps[2][written] >= lo[written] - 1e-6).all() and (maps[2][written] <= hi[written] + 1e-6).all()


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


# ---------------------------------------------------------------- row sampling (observe_row_stride)

def _exact_map_loops(q, k, lse, bs, thr, rows=None):
    """The definition, by brute force in float64: per tile, sparse entries / valid entries over
    the given query rows (all rows by default) and all valid keys."""
    B, H, N, D = q.shape
    n_k = k.shape[2]
    rows = range(N) if rows is None else [int(r) for r in rows]
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(D)
    below = s < (lse.double() + math.log(thr)).unsqueeze(-1)
    mq, mk = num_blocks(N, bs), num_blocks(n_k, bs)
    hits = torch.zeros(B, H, mq, mk, dtype=torch.float64)
    seen = torch.zeros(mq, mk, dtype=torch.float64)
    for r in rows:
        for j in range(mk):
            cols = slice(j * bs, min(n_k, (j + 1) * bs))
            hits[:, :, r // bs, j] += below[:, :, r, cols].sum(-1)
            seen[r // bs, j] += cols.stop - cols.start
    return hits / seen


def _sampled_rows_loops(n, bs, stride, phase):
    """sampled_rows written as the plain rule, for cross-checking."""
    out = []
    for start in range(0, n, bs):
        valid = min(bs, n - start)
        p = (phase % stride) % min(stride, valid)
        out += [start + r for r in range(p, valid, stride)]
    return out


@pytest.mark.parametrize("n,bs,stride,phase", [(40, 32, 4, 3), (40, 32, 8, 7), (37, 16, 4, 6), (64, 16, 3, 2),
                                                (100, 32, 1, 5), (33, 32, 64, 40)])
def test_sampled_rows_rule(n, bs, stride, phase):
    got = sampled_rows(n, bs, stride, phase).tolist()
    assert got == _sampled_rows_loops(n, bs, stride, phase)
    # Every query block keeps at least one row, also a ragged one shorter than the stride.
    assert set(r // bs for r in got) == set(range(num_blocks(n, bs)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(20, 150), bs=st.sampled_from([16, 32]), d=st.sampled_from([16, 32]),
       stride=st.sampled_from([1, 2, 4, 8, 16]), phase=st.integers(0, 15),
       dtype=st.sampled_from([torch.float16, torch.float32]), thr=st.sampled_from([1e-4, 1e-2]),
       restricted=st.booleans(), seed=st.integers(0, 10_000))
def test_strided_map_matches_reference(n, bs, d, stride, phase, dtype, thr, restricted, seed):
    B, H = 1, 2
    q, k, lse = _inputs(B, H, n, d, dtype, seed)
    m = num_blocks(n, bs)
    lists = {}
    if restricted:
        counts, indices = _random_lists(B, H, m, m, seed)
        lists = dict(kv_counts=counts, kv_indices=indices)
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=thr, row_stride=stride, row_phase=phase,
                         **lists)
    lo, hi = _bracket(q, k, lse, bs, thr, row_stride=stride, row_phase=phase, **lists)
    written = ~lo.isnan()
    assert torch.equal(~got.isnan(), written)
    assert (got[written] >= lo[written] - 1e-6).all() and (got[written] <= hi[written] + 1e-6).all(), \
        (got[written] - lo[written]).abs().max()


@pytest.mark.parametrize("n,bs", [(150, 32), (70, 16)])
def test_stride_one_is_the_exact_map(n, bs):
    q, k, lse = _inputs(2, 2, n, 16, torch.float32, 5)   # lse: float64
    ref = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-3, compute_dtype=torch.float64)
    one = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-3, row_stride=1, row_phase=3,
                             compute_dtype=torch.float64)
    exact = _exact_map_loops(q, k, lse, bs, 1e-3).float()
    assert torch.equal(ref, one) and torch.allclose(ref, exact, atol=1e-7, rtol=0)
    # The kernel with stride 1 against the same definition (fp32: bracketed).
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-3, row_stride=1)
    lo, hi = _bracket(q, k, lse, bs, 1e-3)
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all()


@pytest.mark.parametrize("n,bs,stride,phase", [(150, 32, 4, 1), (100, 16, 2, 0), (70, 32, 8, 5), (45, 16, 4, 3)])
def test_strided_estimate_is_the_exact_fraction_of_the_sampled_rows(n, bs, stride, phase):
    q, k, lse = _inputs(1, 2, n, 16, torch.float32, 11)
    rows = _sampled_rows_loops(n, bs, stride, phase)
    brute = _exact_map_loops(q, k, lse, bs, 1e-2, rows=rows).float()
    ref = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-2, row_stride=stride, row_phase=phase,
                             compute_dtype=torch.float64)
    assert torch.allclose(ref, brute, atol=1e-7, rtol=0)
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-2, row_stride=stride, row_phase=phase)
    lo, hi = _bracket(q, k, lse, bs, 1e-2, row_stride=stride, row_phase=phase)
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all()
    # Not the full map: with these rows the estimate differs from the exact one somewhere.
    assert not torch.equal(ref, block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-2,
                                                   compute_dtype=torch.float64))


def _structured_qk(n, heads, d, seed):
    """Smooth positional features + noise: attention concentrates near the diagonal and on a few
    'sink' keys, so the map has structure that neighbouring rows share."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float64)
    freqs = torch.linspace(0.02, 0.3, d // 2, dtype=torch.float64)
    feat = torch.cat([torch.cos(pos[:, None] * freqs), torch.sin(pos[:, None] * freqs)], -1)
    sharp = torch.linspace(1.0, 2.5, heads, dtype=torch.float64).view(1, heads, 1, 1)  # dense to sparse heads
    q = feat * sharp + 0.3 * torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)
    k = feat * sharp + 0.3 * torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)
    k[:, :, ::37] += 2.0 * torch.randn(1, heads, 1, d, generator=g, dtype=torch.float64)
    q, k = q.float(), k.float()
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(d)
    return q, k, torch.logsumexp(s, -1)


@pytest.mark.parametrize("stride", [4, 8])
def test_strided_map_is_close_to_the_exact_map_on_structured_inputs(stride):
    n, bs, d = 512, 32, 32
    q, k, lse = _structured_qk(n, 4, d, 0)
    exact = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-4, compute_dtype=torch.float64)
    assert 0.2 < exact.mean() < 0.95                                     # neither empty nor full
    diffs = []
    for phase in range(stride):
        est = block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-4, row_stride=stride, row_phase=phase,
                                 compute_dtype=torch.float64)
        diffs.append((est - exact).abs().mean().item())
        assert diffs[-1] < 0.03, (phase, diffs[-1])
    # Rotating the phase over all offsets and averaging recovers the exact map (full blocks).
    mean_est = sum(block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-4, row_stride=stride, row_phase=p,
                                      compute_dtype=torch.float64) for p in range(stride)) / stride
    assert torch.allclose(mean_est, exact, atol=1e-6)
    # The kernel's estimate (fp32) agrees with the reference estimate on these inputs as well
    # (two heads, the first half of the queries against all keys: the interpreter is slow).
    q, lse = q[:, 1:3, : n // 2].contiguous(), lse[:, 1:3, : n // 2].contiguous()
    k = k[:, 1:3].contiguous()
    got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-4, row_stride=stride, row_phase=1)
    lo, hi = _bracket(q, k, lse, bs, 1e-4, row_stride=stride, row_phase=1)
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all()


def test_bad_row_sampling_arguments_raise():
    q, k, lse = _inputs(1, 1, 32, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="row_stride"):
        block_sparsity(q, k, lse.float(), block_size=16, row_stride=0)
    with pytest.raises(TypeError, match="row_stride"):
        block_sparsity_ref(q, k, lse.float(), block_size=16, row_stride=2.0)
    with pytest.raises(ValueError, match="row_phase"):
        block_sparsity_ref(q, k, lse.float(), block_size=16, row_phase=-1)


# ----------------------------------------------------------------------------- key bias (text padding)

def _padding_bias(B, n, valid, g):
    """(B, n) float32: 0 or a small finite bias on the first ``valid[b]`` keys, -inf after."""
    bias = torch.where(torch.rand(B, n, generator=g) < 0.3, -torch.rand(B, n, generator=g) * 2, torch.zeros(B, n))
    return bias.masked_fill(torch.arange(n)[None, :] >= torch.tensor(valid)[:, None], float("-inf"))


def _explicit_map(q, k, lse, bias, bs, thr, margin, rows, listed=None):
    """Float64 map from the probabilities themselves: per tile, the share of (sampled row, key)
    entries with ``s * scale + bias - lse < ln(thr) + margin`` (a hidden key's probability is 0:
    sparse). Independent of the kernel's and the reference's arithmetic."""
    B, H, n, D = q.shape
    logp = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D) + bias.double()[:, None, None, :] \
        - lse.double()[..., None]
    sparse = (logp < math.log(thr) + margin) | (bias == float("-inf"))[:, None, None, :]
    m = num_blocks(n, bs)
    out = torch.empty(B, H, m, m, dtype=torch.float64)
    for i in range(m):
        r = rows[(rows >= i * bs) & (rows < (i + 1) * bs)]
        for j in range(m):
            out[:, :, i, j] = sparse[:, :, r, j * bs:(j + 1) * bs].double().mean((-2, -1))
    return out if listed is None else torch.where(listed, out, float("nan"))


@pytest.mark.parametrize("n,bs,stride", [(100, 32, 1), (100, 32, 4), (70, 16, 2)])
@pytest.mark.parametrize("restricted", [False, True])
def test_key_bias_map_matches_the_float64_probabilities(n, bs, stride, restricted):
    """Padded keys (bias -inf) have probability 0 and count as sparse; finite biases move the
    probabilities; a tile of padding is exactly 1.0. Kernel and torch reference alike."""
    from modcompile.kernels.block_lists import full_block_lists
    from modcompile.kernels.reference import block_sparse_attention_ref
    g = torch.Generator().manual_seed(n + stride)
    B, H, D = 2, 2, 16
    q, k, _ = _inputs(B, H, n, D, torch.float32, n)
    m = num_blocks(n, bs)
    bias = _padding_bias(B, n, [n, bs * (m - 2) + 3], g)     # batch 1: its last block is all padding
    counts, indices = _random_lists(B, H, m, m, n) if restricted else full_block_lists(B, H, m, m)
    # the lse of the attention that ran, with the bias (a sparse call's in restricted mode)
    _, lse = block_sparse_attention_ref(q.double(), k.double(), k.double(), counts, indices, block_size=bs,
                                        key_bias=bias.double())
    lists = dict(kv_counts=counts, kv_indices=indices) if restricted else {}
    listed = mask_from_lists(counts, indices, m) if restricted else None
    rows = sampled_rows(n, bs, stride)
    lo, hi = (_explicit_map(q, k, lse, bias, bs, 1e-2, mg, rows, listed) for mg in (-MARGIN, MARGIN))
    kw = dict(block_size=bs, threshold=1e-2, row_stride=stride, key_bias=bias, **lists)
    for got in (block_sparsity(q, k, lse.float(), **kw), block_sparsity_ref(q, k, lse.float(), **kw)):
        written = ~got.isnan()
        assert torch.equal(written, torch.ones_like(written) if listed is None else listed)
        assert (got[written] >= lo[written] - 1e-6).all() and (got[written] <= hi[written] + 1e-6).all()
        padding = written[1, :, :, m - 1]
        assert torch.equal(got[1, :, :, m - 1][padding], torch.ones_like(got[1, :, :, m - 1][padding]))
    # the bias matters: without it the padded keys of batch 1 count by their scores
    plain = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-2, row_stride=stride, **lists)
    assert not torch.equal(plain.nan_to_num(-1), got.nan_to_num(-1))


def test_key_bias_rows_that_attended_only_padding():
    """Sparse lists that hold only a block of padding give the row lse -inf: its hidden keys still
    count as sparse, no other key does, and nothing is NaN."""
    n, bs, D = 64, 16, 16
    q, k, _ = _inputs(1, 1, n, D, torch.float32, 7)
    bias = torch.zeros(1, n).masked_fill(torch.arange(n)[None, :] >= 48, float("-inf"))
    counts = torch.tensor([[[1, 1, 1, 1]]], dtype=torch.int32)
    indices = torch.tensor([[[[3, 0, 0, 0], [1, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0]]]], dtype=torch.int32)
    from modcompile.kernels.reference import block_sparse_attention_ref
    _, lse = block_sparse_attention_ref(q, k, k, counts, indices, block_size=bs, key_bias=bias)
    assert (lse[0, 0, :16] == float("-inf")).all()
    for fn in (block_sparsity, block_sparsity_ref):
        full = fn(q, k, lse, block_size=bs, threshold=1e-3, key_bias=bias)
        assert not full.isnan().any()
        assert torch.equal(full[0, 0, 0], torch.tensor([0.0, 0.0, 0.0, 1.0]))   # lse -inf: only padding counts


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
    assert torch.equal(~got.isnan(), mask_from_lists(counts, indices, m).cuda())
    # Row sampling at the real block sizes (per program 16 query blocks of 8 rows at block 128 and
    # stride 16, 8 blocks of 16 rows at stride 8), the key loop split as on the GPU, also restricted.
    for stride, phase in ((16, 5), (8, 3), (2, 1)):
        got = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-4, row_stride=stride, row_phase=phase)
        kw = dict(block_size=bs, threshold=1e-4, row_stride=stride, row_phase=phase, compute_dtype=torch.float64)
        lo = block_sparsity_ref(q, k, lse, margin=-1e-2, **kw)
        hi = block_sparsity_ref(q, k, lse, margin=1e-2, **kw)
        assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all(), (stride, phase)
        part = block_sparsity(q, k, lse.float(), block_size=bs, threshold=1e-4, row_stride=stride,
                              row_phase=phase, kv_counts=counts.cuda(), kv_indices=indices.cuda())
        listed = ~part.isnan()
        assert torch.equal(listed, mask_from_lists(counts, indices, m).cuda())
        assert torch.equal(part[listed], got[listed]), (stride, phase)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stride", [1, 16, 8])
def test_gpu_mass_map_matches_float64_at_real_sizes(stride):
    """The mass map MOD ranks blocks by, from the Triton kernel at the policy's real layout (bf16,
    128-token blocks, head_dim 128, every row (the default) or 8 or 16 sampled rows per block,
    several query-block groups, a ragged tail) on local attention (positional features shared by q and k): the float64 mass
    of the same sampled rows, and each block row sums to 1."""
    B, H, n, d, bs = 1, 2, 33 * 128 - 58, 128, 128
    q, k, _ = _inputs(B, H, n, d, torch.float32, 7, sharp=1.0)
    pos = torch.arange(n, dtype=torch.float64)[:, None] * torch.logspace(-3, -0.5, d // 4, dtype=torch.float64)
    feat = torch.cat([pos.cos(), pos.sin()], -1).float() * 2.0  # (n, d / 2): q . k grows as positions meet
    q[..., : d // 2] += feat
    k[..., : d // 2] += feat
    q, k = q.bfloat16(), k.bfloat16()
    lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d), -1)
    m = num_blocks(n, bs)
    mass = torch.full((B, H, m, m), -1.0, device="cuda")
    block_sparsity(q.cuda(), k.cuda(), lse.float().cuda(), block_size=bs, threshold=1e-4, row_stride=stride,
                   mass=mass)
    want = _explicit_mass(q, k, lse, torch.zeros(B, n), bs, sampled_rows(n, bs, stride))
    got = mass.cpu().double()
    assert torch.allclose(got.sum(-1), torch.ones(B, H, m, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(got, want, rtol=2e-2, atol=1e-5), (got - want).abs().max()
    top = want.flatten(-2).topk(m, -1).indices  # the densest blocks must be found as the densest
    assert (got.flatten(-2).gather(-1, top) > 0.5 * want.flatten(-2).gather(-1, top)).all()
    alone = block_mass(q.cuda(), k.cuda(), lse.float().cuda(), block_size=bs, row_stride=stride)
    assert torch.allclose(alone.cpu().double(), want, rtol=2e-2, atol=1e-5)   # the mass map alone


def _explicit_mass(q, k, lse, bias, bs, rows, listed=None):
    """Float64 block mass from the probabilities themselves: per tile, the mean over its sampled rows
    of the row's probabilities summed over the tile's keys (a row whose lse is -inf: 0)."""
    B, H, n, D = q.shape
    p = torch.exp((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D) + bias.double()[:, None, None, :]
                  - lse.double()[..., None]).nan_to_num(nan=0.0)
    m = num_blocks(n, bs)
    out = torch.empty(B, H, m, m, dtype=torch.float64)
    for i in range(m):
        r = rows[(rows >= i * bs) & (rows < (i + 1) * bs)]
        for j in range(m):
            out[:, :, i, j] = p[:, :, r, j * bs:(j + 1) * bs].sum(-1).mean(-1)
    return out if listed is None else torch.where(listed, out, float("nan"))


@pytest.mark.parametrize("n,bs,stride", [(100, 32, 1), (100, 32, 4), (70, 16, 2), (150, 32, 16)])
@pytest.mark.parametrize("restricted", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_mass_map_matches_the_float64_probabilities(n, bs, stride, restricted, biased):
    """The optional mass map: each entry is its sampled rows' mean probability mass on the tile's keys;
    with dense lse a row of the map sums to 1. Ragged tails, padding (bias -inf, rows with lse -inf),
    restricted lists (only listed entries written) and row sampling; kernel and torch reference alike."""
    from modcompile.kernels.block_lists import full_block_lists
    from modcompile.kernels.reference import block_sparse_attention_ref
    g = torch.Generator().manual_seed(n + stride)
    B, H, D = 2, 2, 16
    q, k, _ = _inputs(B, H, n, D, torch.float32, n + 1)
    m = num_blocks(n, bs)
    bias = _padding_bias(B, n, [n, bs * (m - 2) + 3], g) if biased else torch.zeros(B, n)
    counts, indices = _random_lists(B, H, m, m, n) if restricted else full_block_lists(B, H, m, m)
    _, lse = block_sparse_attention_ref(q.double(), k.double(), k.double(), counts, indices, block_size=bs,
                                        key_bias=bias.double() if biased else None)
    lists = dict(kv_counts=counts, kv_indices=indices) if restricted else {}
    listed = mask_from_lists(counts, indices, m) if restricted else None
    want = _explicit_mass(q, k, lse, bias, bs, sampled_rows(n, bs, stride), listed)
    kw = dict(block_size=bs, threshold=1e-2, row_stride=stride, key_bias=bias if biased else None, **lists)
    for fn in (block_sparsity, block_sparsity_ref):
        mass = torch.full((B, H, m, m), -1.0)
        smap = fn(q, k, lse.float(), mass=mass, **kw)
        written = mass != -1.0
        assert torch.equal(written, torch.ones_like(written) if listed is None else listed)
        assert torch.allclose(mass[written].double(), want[written], rtol=1e-4, atol=1e-6), fn.__name__
        if not restricted:   # the sampled rows' probabilities sum to 1 (to 0 where lse is -inf: none here)
            assert torch.allclose(mass.sum(-1), torch.ones(B, H, m), atol=1e-4)
        assert torch.equal(smap.isnan(), ~written)   # the sparsity map is written at the same entries
    kw.pop("threshold")
    for fn in (block_mass, block_mass_ref):      # the mass map alone: the same entries and values
        alone = fn(q, k, lse.float(), out=torch.full((B, H, m, m), -1.0), **kw)
        assert torch.equal(alone != -1.0, written)
        assert torch.allclose(alone[written].double(), want[written], rtol=1e-4, atol=1e-6), fn.__name__
    with pytest.raises(ValueError, match="mass must be float32"):
        block_sparsity_ref(q, k, lse.float(), mass=torch.zeros(B, H, m, m + 1), block_size=bs)


def test_mass_map_is_nan_where_the_map_is():
    """A NaN query row makes its tiles NaN in both maps (no swallowed NaN in the mass either)."""
    q, k, lse = _inputs(1, 1, 64, 16, torch.float32, 3)
    q[0, 0, 5] = float("nan")
    for fn in (block_sparsity, block_sparsity_ref):
        mass = torch.zeros(1, 1, 4, 4)
        smap = fn(q, k, lse.float(), block_size=16, mass=mass)
        assert torch.equal(mass.isnan(), smap.isnan()) and mass[0, 0, 0].isnan().all()
        assert torch.isfinite(mass[0, 0, 1:]).all()
    for fn in (block_mass, block_mass_ref):
        alone = fn(q, k, lse.float(), block_size=16)
        assert torch.equal(alone.isnan(), mass.isnan())


def test_observe_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/bench_observe.py --smoke: the GPU sweep's code path under the interpreter (its
    calls must keep up with the kernel's API), each configuration checked against the default's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from benchmarks.bench_observe import main
    main(["--smoke", "--out", str(tmp_path), "--row-stride", "1"])
    md = (tmp_path / "bench_observe.md").read_text()
    # both passes (the map with its mass, the mass alone) in both modes, each checked
    assert md.count("| True |") == 4 and "| full |" in md and "restricted" in md and "| mass |" in md
