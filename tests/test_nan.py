"""NaN / Inf in q, k or v on every remaining path: MOD's block-sparsity map (Triton under the
interpreter and the torch reference) and its use in the policy, observed coverage, VMoBA's pooling
and selection, the site attention's dense-equivalent rule, the backward (reference and Triton
kernel), and compiled models of both policies against eager.

"Right" per path: a value dense SDPA makes NaN is NaN (never a finite number); a map / score / pool
entry that depends on a non-finite input is NaN or, where a decision must be taken, the block is
kept; the MOD predictor stays finite after a NaN observation and says so once."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import modcompile
from modcompile import dispatch
from modcompile.kernels.block_sparsity import block_sparsity, block_sparsity_ref
from modcompile.kernels.block_lists import BlockLists, lists_from_mask, mask_from_lists, num_blocks
from modcompile.kernels.reference_bwd import block_sparse_attention_bwd_ref

from models import TinyVideoDiT

INTERP = not torch.cuda.is_available()  # conftest runs Triton under the interpreter on CPU
B, H, N, D, BLOCK = 2, 2, 56, 16, 16     # ragged last block: 56 = 3 * 16 + 8
MB = num_blocks(N, BLOCK)
SCALE = 1.0 / math.sqrt(D)

# (tensor, index, value): a NaN or Inf at one element of q / k / v, chosen to sit in the ragged
# block or in the middle
INJECTIONS = [("q", (0, 1, 50, 3), float("nan")), ("k", (1, 0, 20, 5), float("nan")),
              ("v", (0, 0, 9, 0), float("nan")), ("q", (1, 1, 33, 2), float("inf")),
              ("k", (0, 1, 3, 7), float("-inf")), ("v", (1, 0, 40, 1), float("inf"))]
IDS = [f"{n}{'nan' if math.isnan(x) else ('inf' if x > 0 else '-inf')}" for n, _, x in INJECTIONS]


def qkv(seed, inject=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for n in "qkv"}
    if inject is not None:
        name, index, value = inject
        t[name][index] = value
    return [t[n].to(dtype) for n in "qkv"]


def sparse_lists(seed, density=0.5):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, H, MB, MB, generator=g) < density) | torch.eye(MB, dtype=torch.bool)
    return lists_from_mask(mask)


def dense_lse(q, k):
    return torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * SCALE, -1).float()


def expected_nan_map(q, k, lse, listed=None):
    """float64 oracle: entry (i, j) is NaN when a row of query block i has a NaN / +inf lse, or a
    score of the tile is NaN / infinite (stride 1: every row counts)."""
    s = q.double() @ k.double().transpose(-1, -2)
    pad = MB * BLOCK - N
    bad_scores = F.pad(~torch.isfinite(s), (0, pad, 0, pad)).view(B, H, MB, BLOCK, MB, BLOCK).any(-1).any(-2)
    bad_rows = F.pad(lse.isnan() | (lse == float("inf")), (0, pad)).view(B, H, MB, BLOCK).any(-1)
    bad = bad_scores | bad_rows.unsqueeze(-1)
    return bad if listed is None else bad & listed


# ----------------------------------------------------------------------------- MOD map

@pytest.mark.parametrize("inject", INJECTIONS, ids=IDS)
def test_block_sparsity_map_is_nan_where_the_tile_has_nan_probabilities(inject):
    q, k, _ = qkv(1, inject)
    lse = dense_lse(q, k)
    want = expected_nan_map(q, k, lse)
    ref = block_sparsity_ref(q, k, lse, block_size=BLOCK, threshold=1e-2, scale=SCALE)
    assert torch.equal(ref.isnan(), want)
    if inject[0] != "v":
        assert want.any()  # the injection reaches the map (v never does)
    # the rows dense SDPA makes NaN are the rows of the map's NaN row blocks
    sdpa_nan = F.scaled_dot_product_attention(q.double(), k.double(), qkv(1)[2].double(), scale=SCALE).isnan().any(-1)
    if inject[0] == "q" or math.isnan(inject[2]):
        blocks = F.pad(sdpa_nan, (0, MB * BLOCK - N)).view(B, H, MB, BLOCK).any(-1)
        assert torch.equal(blocks, want.all(-1))
    if INTERP:
        got = block_sparsity(q, k, lse, block_size=BLOCK, threshold=1e-2, scale=SCALE)
        assert torch.equal(got.isnan(), want)
        lo = block_sparsity_ref(q, k, lse, block_size=BLOCK, threshold=1e-2, scale=SCALE, margin=-1e-3)
        hi = block_sparsity_ref(q, k, lse, block_size=BLOCK, threshold=1e-2, scale=SCALE, margin=1e-3)
        ok = ~want
        assert (lo[ok] <= got[ok]).all() and (got[ok] <= hi[ok]).all()


@pytest.mark.parametrize("inject", INJECTIONS[:2], ids=IDS[:2])
def test_restricted_map_marks_nan_only_on_listed_blocks_and_keeps_its_fill(inject):
    q, k, v = qkv(2, inject)
    counts, indices = sparse_lists(3)
    listed = mask_from_lists(counts, indices, MB)
    _, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE)  # the sparse call's lse
    want = expected_nan_map(q, k, lse, listed)
    fns = [block_sparsity_ref] + ([block_sparsity] if INTERP else [])
    for fn in fns:
        got = fn(q, k, lse, block_size=BLOCK, threshold=1e-2, scale=SCALE, kv_counts=counts, kv_indices=indices,
                 fill=-1.0)
        assert torch.equal(got.isnan(), want), fn.__name__
        assert torch.equal(got == -1.0, ~listed), fn.__name__  # "not observed" stays distinct from NaN


def test_observed_coverage_is_nan_for_heads_with_nan_and_unchanged_elsewhere():
    from modcompile.policies.mod_observe import observed_coverage
    q, k, v = qkv(4)
    counts, indices = sparse_lists(5)
    kept = mask_from_lists(counts, indices, MB)
    _, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE)
    clean = observed_coverage(q, k, lse, kept, BLOCK, SCALE)
    assert torch.isfinite(clean).all() and (clean > 0).all() and (clean <= 1).all()
    q_bad = q.clone()
    q_bad[1, 0, 17, 4] = float("nan")
    _, lse_bad = dispatch.attention_forward(q_bad, k, v, BlockLists(counts, indices, BLOCK, q_bad.shape[2], k.shape[2]), SCALE)
    got = observed_coverage(q_bad, k, lse_bad, kept, BLOCK, SCALE)
    nan = torch.zeros(B, H, dtype=torch.bool)
    nan[1, 0] = True
    assert torch.equal(got.isnan(), nan)
    torch.testing.assert_close(got[~nan], clean[~nan])


# ----------------------------------------------------------------------------- site attention

@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("inject", INJECTIONS, ids=IDS)
def test_sparse_site_attention_is_non_finite_wherever_dense_sdpa_is(inject, permuted, monkeypatch):
    """A NaN / Inf outside a row's listed blocks still reaches that row (dense SDPA reads every
    key); NaN injections give exactly dense SDPA's NaN rows, Inf ones at least its non-finite rows;
    rows dense SDPA keeps finite and the kernel computes without bad blocks equal the float64
    reference."""
    q, k, v = qkv(6, inject)
    counts, indices = sparse_lists(7, density=0.4)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(8)).to(torch.int32) if permuted else None
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=SCALE)
    paths = [False] + ([True] if INTERP else [])
    for triton_path in paths:
        monkeypatch.setattr(dispatch, "use_triton", lambda t, on=triton_path: on)
        out, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE, q_rows=rows, like_dense=True)
        dense_bad = ~torch.isfinite(dense).all(-1)
        got_bad = ~torch.isfinite(out).all(-1)
        if math.isnan(inject[2]):
            assert torch.equal(got_bad, dense_bad), triton_path
        else:
            assert (got_bad | ~dense_bad).all(), triton_path  # never swallowed
        if inject[0] != "v" and math.isnan(inject[2]):  # a NaN score: the row's lse is NaN too
            assert torch.equal(lse.isnan(), got_bad)
        from modcompile.kernels.reference import block_sparse_attention_ref
        qr = q if rows is None else q[:, :, rows.long()]
        want, _ = block_sparse_attention_ref(qr, k, v, counts, indices, block_size=BLOCK, scale=SCALE,
                                             compute_dtype=torch.float64)
        if rows is not None:
            want = torch.empty_like(want).index_copy_(2, rows.long(), want)
        fine = ~got_bad
        assert fine.any()
        torch.testing.assert_close(out[fine].double(), want[fine], atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- VMoBA

def test_vmoba_pooling_propagates_nan_to_its_partition_block_only():
    from modcompile.kernels import pooling
    from modcompile.policies.vmoba import layout_for
    grid = (2, 4, 7)  # 56 tokens, as N
    layout = layout_for(grid, "2d", (2, 2), 0, "last", BLOCK, torch.device("cpu"))
    q, k, _ = qkv(9)
    token = 13
    q_bad, k_bad = q.clone(), k.clone()
    q_bad[0, 1, token, 2] = float("nan")
    k_bad[1, 0, token, 0] = float("inf")
    perm, starts = layout.partition.perm, layout.partition.starts
    fns = [lambda a, b: pooling.permute_pool_ref(a, b, perm, starts)[2:]]
    if INTERP:
        fns.append(lambda a, b: pooling.permute_pool(a, b, layout.segments)[2:])
    position = (perm.long() == token).nonzero().item()
    for fn in fns:
        qp0, kp0 = fn(q, k)
        qp, kp = fn(q_bad, k_bad)
        part = int(layout.pool_ids[position])
        bad_q = torch.zeros_like(qp0, dtype=torch.bool)
        bad_q[0, 1, part, 2] = True
        assert torch.equal(qp.isnan(), bad_q)
        assert kp[1, 0, part, 0] == float("inf") and torch.isfinite(kp[1, 0].flatten()[1:]).sum() > 0
        torch.testing.assert_close(qp[~bad_q], qp0[~bad_q])


@pytest.mark.parametrize("mode", ["global", "row", "topk"])
@pytest.mark.parametrize("normalization", ["minmax", "softmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_selection_keeps_non_finite_scores_and_selects_the_rest_as_before(mode, normalization, bad):
    from modcompile.policies.selection import select_blocks
    g = torch.Generator().manual_seed(10)
    scores = torch.randn(2, 3, 6, 6, generator=g)
    kw = dict(mode=mode, tau=0.4, normalization=normalization, topk=2)
    clean = select_blocks(scores, **kw)
    s = scores.clone()
    s[1, 2, 3, 4] = bad            # one entry
    s[0, 1, :, 5] = bad            # a whole key block (non-finite pooled k)
    got = select_blocks(s, **kw)
    assert got[1, 2, 3, 4] and got[0, 1, :, 5].all()
    assert torch.equal(got[0, 0], clean[0, 0]) and torch.equal(got[1, :2], clean[1, :2])  # other heads untouched
    everything = select_blocks(torch.full((1, 1, 4, 4), bad), **kw)
    assert everything.all()


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("inject", INJECTIONS[:3], ids=IDS[:3])
def test_backward_nan_pattern_matches_dense_autograd_and_the_reference(inject):
    from modcompile.autograd import backward_grads
    q, k, v = qkv(11, inject)
    g = torch.Generator().manual_seed(12)
    do = torch.randn(B, H, N, D, generator=g)
    # full lists: exactly dense SDPA's backward
    full_counts = torch.full((B, H, MB), MB, dtype=torch.int32)
    full_idx = torch.arange(MB, dtype=torch.int32).expand(B, H, MB, MB).contiguous()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, scale=SCALE).backward(do.double())
    dense_grads = [t.grad for t in leaves]
    for counts, indices in ((full_counts, full_idx), sparse_lists(13)):
        out, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, BLOCK, q.shape[2], k.shape[2]), SCALE)
        want = block_sparse_attention_bwd_ref(do, q, k, v, out, lse, counts, indices, block_size=BLOCK, scale=SCALE,
                                              compute_dtype=torch.float64)
        if counts is full_counts:
            for w, d in zip(want, dense_grads):
                assert torch.equal(w.isnan(), d.isnan())
        got = backward_grads(do, q, k, v, out, lse, BlockLists(counts, indices, BLOCK, N, N), SCALE)  # Triton under the interpreter
        for a, w in zip(got, want):
            assert torch.equal(a.isnan(), w.isnan())
            fine = ~w.isnan()
            torch.testing.assert_close(a[fine].double(), w[fine], atol=1e-4, rtol=1e-4)
        assert any(w.isnan().any() for w in want)


# ----------------------------------------------------------------------------- compiled models

def _mod_fits(model_key_part=""):
    from modcompile.policies.mod import ModState
    from modcompile.runtime import REGISTRY
    return [s.policy_state for s in REGISTRY.states.values() if isinstance(s.policy_state, ModState)]


@pytest.mark.parametrize("nonfinite", [pytest.param("dense", marks=pytest.mark.slow), "listed"])
@pytest.mark.parametrize("policy", [pytest.param("mod", marks=pytest.mark.slow), "vmoba"])
def test_compiled_model_nan_at_a_sparse_step_matches_eager(policy, nonfinite, fresh_modcompile, caplog):
    """Batch 2, NaN in one pixel of the first sample at a sparse step: with ``nonfinite="dense"``
    the compiled output is NaN exactly where eager's is (all of sample 0, none of sample 1); with
    the default ``"listed"`` it is NaN only there, in the rows that attend the NaN's block. Later
    clean steps stay finite (MOD's predictor is not poisoned, with one warning)."""
    torch.manual_seed(0)
    eager = TinyVideoDiT(layers=1).eval()
    options = {"policy": policy, "min_seq_len": 64, "block_size": 32, "warmup_steps": 2, "tau": 0.2,
               "nonfinite": nonfinite}
    if policy == "mod":
        options.update(refresh_interval=2, observe_row_stride=1, density=0.5)
    model = torch.compile(eager, backend="modsparse", options=options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 16, 16, generator=g)  # grid (2, 8, 8): 128 tokens, 4 blocks
    n_steps = 6
    caplog.set_level(logging.WARNING, logger="modcompile")
    densities = []
    with torch.no_grad():
        for step in range(n_steps):
            t = torch.tensor([1000.0 - 100 * step])
            inp = x.clone()
            nan_step = step in (2, 4)  # sparse steps (4: a MOD refresh, observed)
            if nan_step:
                inp[0, 1, 1, 5, 9] = float("nan")
            with modcompile.denoising_step(step, n_steps):
                out = model(inp, t)
            ref = eager(inp, t)
            if nonfinite == "dense" or not nan_step:
                assert torch.equal(out.isnan(), ref.isnan()), step
            else:
                assert not (out.isnan() & ~ref.isnan()).any() and out[0].isnan().any(), step
            if nan_step:
                assert ref[0].isnan().all() and not ref[1].isnan().any()
            else:
                assert torch.isfinite(out).all(), step
            if step >= 2:
                densities.append(rows_density())
    assert all(d < 1.0 for d in densities)  # the NaN steps really ran block-sparse
    rows = modcompile.report(print_table=False)
    assert rows and all(r.status == "sparse" for r in rows)
    if policy == "mod":
        states = _mod_fits()
        # the predictor's state stays finite: the mass map the default rule ranks (and fits, for rules with one)
        assert states and all(torch.isfinite(st.mmap).all() and all(torch.isfinite(c).all() for _, c in st.fits)
                              for st in states)
        assert all(st.nonfinite_steps == [4] for st in states)
        assert sum("NaN/Inf attention inputs" in r.message for r in caplog.records) == len(states)


def rows_density():
    return max(r.density for r in modcompile.report(print_table=False))
