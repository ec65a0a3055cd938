"""VMoBA partition geometry, permutation round trips, kernel-block mapping, fused pooling kernel."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from modcompile.kernels import partition as P
from modcompile.kernels import pooling as PL
from modcompile.policies.vmoba import lists_from_mask


@st.composite
def geometries(draw):
    grid = tuple(draw(st.integers(1, n)) for n in (5, 7, 7))
    kind = draw(st.sampled_from(P.KINDS))
    dims = {"1d": grid[:1], "2d": grid[1:], "3d": grid}[kind]
    shape = tuple(draw(st.integers(1, d + 1)) for d in dims)  # may exceed the grid: clipped
    text = draw(st.integers(0, 6))
    # or an int: that many of the non-grid tokens before the grid, the rest after it (FramePack)
    position = draw(st.sampled_from(["first", "last"]) | st.integers(0, text))
    return grid, kind, shape, text, position


def _before(text, position):
    return {"first": text, "last": 0}.get(position, position)


def _coords(grid):
    T, H, W = grid
    idx = torch.arange(T * H * W)
    return idx // (H * W), (idx // W) % H, idx % W


@settings(max_examples=60, deadline=None)
@given(geometries())
def test_permutation_round_trip_and_blocks_are_boxes(geometry):
    grid, kind, shape, text, position = geometry
    p = P.build_partition(grid, kind, shape, text, position)
    n_video = grid[0] * grid[1] * grid[2]
    n = n_video + text
    assert sorted(p.perm.tolist()) == list(range(n))
    assert torch.equal(p.perm[p.inv], torch.arange(n))
    x = torch.randn(2, 3, n, 4)
    assert torch.equal(P.unpermute_tokens(P.permute_tokens(x, p), p), x)
    # text keeps its place
    offset = _before(text, position)
    assert all(p.perm[i] == i for i in [*range(offset), *range(offset + n_video, n)])
    # every video token in exactly one block; each block is the box the geometry says
    sizes = (p.starts[1:] - p.starts[:-1]).tolist()
    assert sum(sizes) == n_video and min(sizes) > 0
    bt, bh, bw = p.block
    boxes = list(itertools.product(range(0, grid[0], bt), range(0, grid[1], bh), range(0, grid[2], bw)))
    assert len(boxes) == p.num_blocks
    t, y, xx = _coords(grid)
    for b, (t0, y0, x0) in enumerate(boxes):
        orig = p.perm[p.starts[b]:p.starts[b + 1]] - offset
        expect = ((t >= t0) & (t < t0 + bt) & (y >= y0) & (y < y0 + bh) & (xx >= x0) & (xx < x0 + bw)).nonzero().flatten()
        assert torch.equal(orig, expect)  # raster order inside the block
    if kind == "1d":
        assert p.identity


@settings(max_examples=40, deadline=None)
@given(geometries(), st.sampled_from([16, 32]), st.integers(0, 2**31 - 1))
def test_kernel_mapping_keeps_every_selected_token_and_nothing_twice(geometry, block, seed):
    grid, kind, shape, text, position = geometry
    p = P.build_partition(grid, kind, shape, text, position)
    n, nb = p.seq_len, p.num_blocks
    gen = torch.Generator().manual_seed(seed)
    sel = torch.rand(nb, nb, generator=gen) < 0.3
    sel |= torch.eye(nb, dtype=torch.bool)
    inc, text_blocks = P.kernel_incidence(p, block)
    mask = P.kernel_block_mask(sel, inc, text_blocks)
    # token-level mask the kernel computes vs the selection at token level
    part = p.block_of_position()
    kb = torch.arange(n) // block
    token_mask = mask[kb][:, kb]
    is_text = part < 0
    wanted = sel[part.clamp_min(0)][:, part.clamp_min(0)] & ~is_text[:, None] & ~is_text[None, :]
    wanted |= is_text[:, None] | is_text[None, :]
    assert bool((token_mask | ~wanted).all()), "a token of a selected block was dropped"
    # the extra tokens are only those sharing a kernel block with a selected block
    mk = mask.shape[0]
    for a in range(mk):
        for b in range(mk):
            if mask[a, b] and not (text_blocks[a] or text_blocks[b]):
                assert bool(sel[inc[a]][:, inc[b]].any())
    # lists: each block once, counts match the mask
    counts, indices = lists_from_mask(mask)
    assert indices.shape == (mk, mk)
    for r in range(mk):
        listed = indices[r, :counts[r]].tolist()
        assert len(set(listed)) == len(listed) and set(listed) == set(mask[r].nonzero().flatten().tolist())
        assert listed == sorted(listed)


def test_paper_block_shapes_on_wan_grid():
    grid = (21, 30, 52)
    counts = {kind: P.build_partition(grid, kind, shape).num_blocks
              for kind, shape in (("1d", (3,)), ("2d", (5, 13)), ("3d", (7, 5, 13)))}
    assert counts == {"1d": 7, "2d": 24, "3d": 72}


@pytest.mark.parametrize("kind", P.KINDS)
def test_default_shapes_hold_about_a_kernel_block(kind):
    for grid, block in (((4, 16, 16), 32), ((21, 30, 52), 128), ((3, 5, 7), 16)):
        shape = P.default_block_shape(grid, kind, block)
        bt, bh, bw = P.full_block_shape(grid, kind, shape)
        size = bt * bh * bw
        if kind == "1d":  # a frame is the smallest 1D block
            assert size == max(1, round(block / (grid[1] * grid[2]))) * grid[1] * grid[2]
        else:
            assert block / 2 <= size <= 2 * block
    assert P.default_block_shape((4, 16, 16), "3d", 32) == (2, 4, 4)


@pytest.mark.parametrize("bad", [("2d", (4,)), ("3d", (1, 0, 2)), ("1d", (1.5,)), ("4d", (1,)), ("1d", None)])
def test_bad_block_shapes_are_clear_errors(bad):
    with pytest.raises(ValueError, match="vmoba"):
        P.check_block_shape(*bad)


# ----------------------------------------------------------------------------- pooling kernel

def _mean64(x, p):
    xp = x.double().index_select(2, p.perm)
    return torch.stack([xp[:, :, p.starts[b]:p.starts[b + 1]].mean(2) for b in range(p.num_blocks)], 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("geometry", [((3, 5, 7), "3d", (2, 2, 3), 5, "first"),
                                      ((2, 6, 6), "2d", (4, 4), 3, "last"),
                                      ((4, 4, 4), "1d", (1,), 0, "last")])
def test_permute_pool_kernel_matches_reference(dtype, geometry):
    grid, kind, shape, text, position = geometry
    p = P.build_partition(grid, kind, shape, text, position)
    n, D, H = p.seq_len, 32, 3
    # q, k as strided views of one qkv projection, like a model's
    qkv = torch.randn(2, n, 3, H, D, dtype=dtype)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    segments = PL.make_segments(p.perm, p.starts, seg_rows=24)  # several segments per block
    qp, kp, q_pool, k_pool = PL.permute_pool(q, k, segments)
    rq, rk, rq_pool, rk_pool = PL.permute_pool_ref(q, k, p.perm, p.starts)
    assert torch.equal(qp, rq) and torch.equal(kp, rk)
    for got, ref, x in ((q_pool, rq_pool, q), (k_pool, rk_pool, k)):
        assert got.dtype == torch.float32
        ref64 = _mean64(x, p)
        tol = 2 * (ref.double() - ref64).abs().max().item() + 1e-5
        assert (got.double() - ref64).abs().max().item() <= tol
    none_q, none_k, q_pool2, _ = PL.permute_pool(q, k, segments, write_permuted=False)
    assert none_q is None and none_k is None
    torch.testing.assert_close(q_pool2, q_pool)
    # only k permuted (VMoBA: the attention kernel gathers q rows itself); the reference agrees
    none_q, kp_only, q_pool3, k_pool3 = PL.permute_pool(q, k, segments, write_permuted=(False, True))
    ref_none_q, ref_kp, _, _ = PL.permute_pool_ref(q, k, p.perm, p.starts, write_permuted=(False, True))
    assert none_q is None and ref_none_q is None
    assert torch.equal(kp_only, rk) and torch.equal(ref_kp, rk)
    torch.testing.assert_close(q_pool3, q_pool)
    torch.testing.assert_close(k_pool3, k_pool)
    qp_only, none_k, _, _ = PL.permute_pool(q, k, segments, write_permuted=(True, False))
    assert none_k is None and torch.equal(qp_only, rq)


def test_gather_rows_kernel_round_trip():
    p = P.build_partition((2, 5, 6), "2d", (2, 4), 3, "first")
    x = torch.randn(1, 2, p.seq_len, 16)
    perm, inv = p.perm.to(torch.int32), p.inv.to(torch.int32)
    y = PL.gather_rows(x, perm)
    assert torch.equal(y, PL.gather_rows_ref(x, perm))
    back = torch.empty(1, p.seq_len, 2, 16).transpose(1, 2)
    PL.gather_rows(y, inv, out=back)
    assert torch.equal(back, x)


def test_pooling_bad_inputs_are_clear_errors():
    p = P.build_partition((2, 4, 4), "3d", (1, 2, 2))
    segments = PL.make_segments(p.perm, p.starts)
    with pytest.raises(ValueError, match="partition covers"):
        PL.permute_pool(torch.randn(1, 1, 10, 16), torch.randn(1, 1, 10, 16), segments)
    with pytest.raises(ValueError, match="one shape"):
        PL.permute_pool_ref(torch.randn(1, 1, 32, 16), torch.randn(1, 2, 32, 16), p.perm, p.starts)
    with pytest.raises(TypeError, match="write_permuted"):
        x = torch.randn(1, 1, 32, 16)
        PL.permute_pool(x, x, segments, write_permuted=(True, True, False))
