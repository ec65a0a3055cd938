"""The dense-like non-finite rule (``nonfinite="dense"``, ``attention_forward(like_dense=True)``):
the key-block flags kernel, the per-query-block poison step, the forward kernel's poison epilogue,
and the whole rule against float64 dense SDPA on fresh random inputs (Triton under the interpreter
and the torch reference path).

Oracles are built from the planted positions in plain Python (which key blocks hold a NaN / Inf,
which query blocks skip one), not from the code under test."""
import math

import pytest
import torch
import torch.nn.functional as F

from modcompile import dispatch
from modcompile.kernels import nonfinite
from modcompile.kernels.block_lists import BlockLists, lists_from_mask, num_blocks
from modcompile.kernels.reference import block_sparse_attention_ref

INTERP = not torch.cuda.is_available()  # conftest runs Triton under the interpreter on CPU
triton_only = pytest.mark.skipif(not INTERP, reason="Triton runs here only under the interpreter")
BAD = (float("nan"), float("inf"), float("-inf"))


def planted_blocks(plants, B, H, nk, block_size):
    """(B, H, Mk) bool from ``(b, h, token)`` positions inside the sequence."""
    want = torch.zeros(B, H, num_blocks(nk, block_size), dtype=torch.bool)
    for b, h, n in plants:
        want[b, h, n // block_size] = True
    return want


# ----------------------------------------------------------------------------- flags kernel

@triton_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,block_size,nk", [(16, 16, 75), (32, 32, 96), (64, 16, 40), (80, 32, 70),
                                                    (96, 64, 130), (128, 128, 200)])
def test_block_flags_marks_exactly_the_blocks_with_nan_or_inf(head_dim, block_size, nk, dtype):
    """k a strided view of (B, Nk, H, D) storage with NaN in the columns past D and the rows past
    Nk (which must not count), v with a strided head dim; NaN / +-Inf planted in both, some in the
    ragged last block; huge finite values are not flagged."""
    B, H = 2, 3
    g = torch.Generator().manual_seed(head_dim * 1000 + nk)
    k_store = torch.randn(B, nk + 9, H, head_dim + 8, generator=g).to(dtype)
    k_store[:, nk:] = float("nan")       # past the sequence
    k_store[..., head_dim:] = float("nan")  # past the head dim
    k = k_store[:, :nk, :, :head_dim].transpose(1, 2)
    v = torch.randn(B, H, head_dim, nk, generator=g).to(dtype).transpose(2, 3)  # stride(-1) == Nk
    big = torch.finfo(dtype).max
    k[0, 0, 1, :] = big  # a row sum would overflow: finite values all the same
    v[1, 2, nk - 1, :] = -big
    plants = []
    for i in range(6):
        b, h = int(torch.randint(B, (1,), generator=g)), int(torch.randint(H, (1,), generator=g))
        n = nk - 1 - i if i < 2 else int(torch.randint(nk, (1,), generator=g))  # two in the ragged tail
        d = int(torch.randint(head_dim, (1,), generator=g))
        (k if i % 2 else v)[b, h, n, d] = BAD[i % 3]
        plants.append((b, h, n))
    want = planted_blocks(plants, B, H, nk, block_size)
    assert want.any() and not want.all()
    got = nonfinite.block_flags(k, v, block_size)
    assert got.dtype == torch.int8 and torch.equal(got.bool(), want)
    assert torch.equal(nonfinite.block_flags_ref(k, v, block_size), want)


# ----------------------------------------------------------------------------- poison step

def random_lists(B, H, mq, mk, width, g, max_count=None):
    """Distinct random ids per row, random counts in [0, max_count]; slots past the count hold ids
    too (they must be ignored)."""
    max_count = width if max_count is None else max_count
    ids = torch.rand(B, H, mq, mk, generator=g).argsort(-1)[..., :width].to(torch.int32)
    counts = torch.randint(0, max_count + 1, (B, H, mq), generator=g, dtype=torch.int32)
    return counts, ids


def poison_oracle(flags, counts, indices):
    B, H, mq = counts.shape
    want = torch.zeros(B, H, mq, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            bad = set(flags[b, h].nonzero().flatten().tolist())
            for i in range(mq):
                listed = set(indices[b, h, i, :counts[b, h, i]].tolist())
                want[b, h, i] = not bad <= listed
    return want


@pytest.mark.parametrize("mq,mk,width", [(37, 40, 40), (5, 1030, 70), (20, 3, 3)])
def test_poisoned_query_blocks_skip_a_flagged_block(mq, mk, width):
    """Many programs per head (37 > 16 rows), lists longer than one chunk of entries (70 > 32),
    more flags than one chunk of ids (1030 > 1024), strided indices, empty and full lists, heads
    with no flagged block."""
    B, H = 2, 3
    g = torch.Generator().manual_seed(mq * mk)
    flags = torch.rand(B, H, mk, generator=g) < 0.1
    flags[0, 0] = False                      # a clean head: nothing poisoned
    flags[1, 1, mk - 1] = True               # the last id, past the first chunk when mk > 1024
    counts, ids = random_lists(B, H, mq, mk, width, g)
    counts[0, 1, 0], counts[1, 2, -1] = 0, width
    wide = torch.full((B, H, mq, width + 5), mk - 1, dtype=torch.int32)  # strided view of wider lists
    wide[..., :width] = ids
    indices = wide[..., :width]
    want = poison_oracle(flags, counts, indices)
    assert want.any() and not want.all() and not want[0, 0].any()
    assert torch.equal(nonfinite.poisoned_query_blocks_ref(flags, counts, indices), want)
    if INTERP:
        got = nonfinite.poisoned_query_blocks(flags.to(torch.int8), counts, indices)
        assert got.dtype == torch.int8 and got.is_contiguous() and torch.equal(got.bool(), want)


# ----------------------------------------------------------------------------- kernel epilogue

@triton_only
@pytest.mark.parametrize("n", [56, 64])
def test_forward_kernel_writes_poisoned_blocks_as_nan_and_leaves_the_rest_bit_exact(n):
    from modcompile.kernels.block_sparse_attention import block_sparse_attention_fwd
    B, H, D, bs = 2, 2, 16, 16
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    mb = num_blocks(n, bs)
    counts, indices = lists_from_mask((torch.rand(B, H, mb, mb, generator=g) < 0.5) | torch.eye(mb).bool())
    poison = (torch.rand(B, H, mb, generator=g) < 0.4).to(torch.int8)
    assert poison.any() and not poison.all()
    for rows in (None, torch.randperm(n, generator=g).to(torch.int32)):
        plain, plain_lse = block_sparse_attention_fwd(q, k, v, counts, indices, block_size=bs, q_rows=rows)
        out, lse = block_sparse_attention_fwd(q, k, v, counts, indices, block_size=bs, q_rows=rows, poison=poison)
        hit = poison.bool().repeat_interleave(bs, -1)[..., :n]  # lists' row order
        if rows is not None:
            hit = torch.empty_like(hit).index_copy_(2, rows.long(), hit)
        assert torch.equal(out.isnan().all(-1), hit) and torch.equal(out.isnan().any(-1), hit)
        assert torch.equal(lse.isnan(), hit)
        assert torch.equal(out[~hit], plain[~hit]) and torch.equal(lse[~hit], plain_lse[~hit])
    with pytest.raises(ValueError, match="poison"):
        block_sparse_attention_fwd(q, k, v, counts, indices, block_size=bs, poison=poison.bool())


# ----------------------------------------------------------------------------- the whole rule

B, H, N, D, BLOCK = 2, 3, 72, 16, 16  # ragged: 72 = 4 * 16 + 8
MB = num_blocks(N, BLOCK)
SCALE = 1.0 / math.sqrt(D)

# name -> planted (tensor, b, h, token, value): listed by some query blocks, skipped by others
CASES = {
    "k_nan": [("k", 0, 1, 20, float("nan"))],
    "v_nan_ragged": [("v", 1, 2, N - 3, float("nan"))],
    "k_inf": [("k", 1, 0, 40, float("inf"))],
    "v_neg_inf": [("v", 0, 2, 5, float("-inf"))],
    "several": [("k", 0, 0, 3, float("nan")), ("v", 0, 0, 50, float("inf")), ("k", 1, 1, 70, float("-inf")),
                ("v", 1, 2, 33, float("nan")), ("k", 1, 2, 34, float("nan"))],
    "q_nan_and_v_nan": [("q", 0, 1, 9, float("nan")), ("v", 0, 1, 60, float("nan"))],
    "clean": [],
}


def rule_inputs(case, seed, density, permuted, dtype):
    g = torch.Generator().manual_seed(seed)
    t = {name: torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for name in "qkv"}
    for name, b, h, n, value in CASES[case]:
        t[name][b, h, n, int(torch.randint(D, (1,), generator=g))] = value
    mask = (torch.rand(B, H, MB, MB, generator=g) < density) | torch.eye(MB, dtype=torch.bool)
    counts, indices = lists_from_mask(mask)
    rows = torch.randperm(N, generator=g).to(torch.int32) if permuted else None
    return [t[n].to(dtype) for n in "qkv"], counts, indices, rows


def expected_poisoned_rows(case, counts, indices, rows):
    """(B, H, N) in token order: rows whose list skips a block with a planted k / v value."""
    plants = [(b, h, n) for name, b, h, n, _ in CASES[case] if name != "q"]
    flags = planted_blocks(plants, B, H, N, BLOCK)
    lists_rows = poison_oracle(flags, counts, indices).repeat_interleave(BLOCK, -1)[..., :N]
    return lists_rows if rows is None else torch.empty_like(lists_rows).index_copy_(2, rows.long(), lists_rows)


# The fast set keeps a NaN, a ragged-tail NaN, a mix and the clean case, unpermuted, and the mix permuted; every
# other combination is marked slow (CI runs them).
FAST_CASES = ("several", "q_nan_and_v_nan", "clean", "v_nan_ragged")


def _rule_cases():
    for case in CASES:
        for density in (0.3, 1.0):
            for permuted in (False, True):
                slow = case not in FAST_CASES or (permuted and case != "several")
                yield pytest.param(case, density, permuted, id=f"{case}-{density}-{permuted}",
                                   marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case,density,permuted", list(_rule_cases()))
def test_dense_rule_is_non_finite_where_dense_sdpa_is(case, density, permuted, monkeypatch):
    """Exactly: non-finite rows = rows whose list skips a bad block | rows the listed blocks spoil;
    NaN plants give dense SDPA's non-finite rows, Inf plants a superset; poisoned rows have a NaN
    lse; every other row equals the float64 block-sparse reference (and dense SDPA at density 1).
    At density 0.3 the listed rule alone must miss rows that dense SDPA spoils (so that this test
    fails when the poison flag is ignored)."""
    seed = list(CASES).index(case) * 4 + int(density == 1.0) * 2 + permuted
    (q, k, v), counts, indices, rows = rule_inputs(case, seed, density, permuted, torch.float32)
    # permuted: k, v and the lists are in the lists' order, q in token order; dense SDPA ignores key order
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=SCALE)
    dense_bad = ~torch.isfinite(dense).all(-1)
    qr = q if rows is None else q[:, :, rows.long()]
    want, _ = block_sparse_attention_ref(qr.double(), k.double(), v.double(), counts, indices, block_size=BLOCK,
                                         scale=SCALE, compute_dtype=torch.float64)
    if rows is not None:
        want = torch.empty_like(want).index_copy_(2, rows.long(), want)
    listed_bad = ~torch.isfinite(want).all(-1)
    poisoned = expected_poisoned_rows(case, counts, indices, rows)
    nan_only = all(math.isnan(p[-1]) for p in CASES[case])
    if density < 1 and case != "clean":
        assert (poisoned & ~listed_bad).any() and (dense_bad & ~listed_bad).any()
    if density == 1.0:
        assert not poisoned.any()
    for triton_path in [False] + ([True] if INTERP else []):
        monkeypatch.setattr(dispatch, "use_triton", lambda t, on=triton_path: on)
        out, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE, q_rows=rows, like_dense=True)
        got_bad = ~torch.isfinite(out).all(-1)
        assert torch.equal(got_bad, poisoned | listed_bad), triton_path
        assert (got_bad | ~dense_bad).all(), triton_path
        if nan_only:
            assert torch.equal(got_bad, dense_bad), triton_path
        assert lse[poisoned].isnan().all() and out[poisoned].isnan().all(), triton_path
        fine = ~got_bad
        assert fine.any()
        torch.testing.assert_close(out[fine].double(), want[fine], atol=2e-5, rtol=1e-5)
        if density == 1.0:
            torch.testing.assert_close(out[fine].double(), dense[fine], atol=2e-5, rtol=1e-5)
        plain, plain_lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE, q_rows=rows)
        assert torch.equal(out[fine], plain[fine]) and torch.equal(lse[fine], plain_lse[fine])


@triton_only
def test_dense_rule_in_half_precision_matches_the_reference_path(monkeypatch):
    (q, k, v), counts, indices, rows = rule_inputs("several", 5, 0.3, True, torch.float16)
    results = []
    for triton_path in (False, True):
        monkeypatch.setattr(dispatch, "use_triton", lambda t, on=triton_path: on)
        results.append(dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE, q_rows=rows,
                                                  like_dense=True))
    (ref, ref_lse), (got, got_lse) = results
    # lse: a +inf score gives the reference's logsumexp +inf and the kernel NaN (both non-finite)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got_lse.isfinite(), ref_lse.isfinite())
    assert got.isnan().any()
    fine = ~ref.isnan()
    torch.testing.assert_close(got[fine], ref[fine], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_rule_on_the_gpu_matches_the_torch_rule():
    """bf16 at a size with several programs per key block list: the fused rule (flags, poison,
    kernel epilogue) against the torch references applied to the kernel's plain output."""
    B_, H_, N_, D_, bs = 1, 4, 2000, 128, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B_, N_, H_, D_, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    k[0, 1, 700, 3] = float("nan")
    v[0, 2, N_ - 1, 0] = float("inf")
    mb = num_blocks(N_, bs)
    mask = (torch.rand(B_, H_, mb, mb, device="cuda", generator=g) < 0.3) | torch.eye(mb, device="cuda").bool()
    counts, indices = lists_from_mask(mask)
    out, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, bs, q.shape[2], k.shape[2]), D_ ** -0.5, like_dense=True)
    want, want_lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, bs, q.shape[2], k.shape[2]), D_ ** -0.5)
    poison = nonfinite.poisoned_query_blocks_ref(nonfinite.block_flags_ref(k, v, bs), counts, indices)
    assert poison.any() and not poison.all()
    nonfinite.poison_rows_(want, want_lse, poison, bs)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(lse.isnan(), want_lse.isnan())
    fine = ~want.isnan()
    torch.testing.assert_close(out[fine], want[fine])
