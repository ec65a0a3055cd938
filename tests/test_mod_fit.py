"""MOD-DiT fit (basis geometry, analytic M^T M, ridge solve) and prediction (masks, block lists)."""
import pytest
import torch

from modcompile.config import SparsityConfig
from modcompile.kernels.block_lists import lists_from_mask, mask_from_lists
from modcompile.policies.mod_mask import FRAME_KEEP, extrapolate, predict_mask
from modcompile.policies.mod_fit import (Geometry, design_matrix, diagonal_sums, fit_geometry, fit_maps,
                                         gram_matrix)

GEOMETRIES = [
    Geometry(70, 16, (2, 5, 6), 10, "last"),      # frame of 30 tokens: not a multiple of the block
    Geometry(100, 16, (3, 4, 7), 16, "first"),
    Geometry(64, 16, None),
    Geometry(96, 32, (3, 4, 8)),                  # one frame = one block
]


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_gram_matrix_is_analytic_MtM(geom):
    m = design_matrix(geom)
    assert torch.equal(gram_matrix(geom), m.T @ m)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_moment_is_MtS(geom):
    s = torch.rand(3, geom.nb, geom.nb, dtype=torch.float64)
    m = design_matrix(geom)
    fg = fit_geometry(geom, 1.0, "cpu")
    assert torch.allclose(fg.moment(s.float()).double(), (m.T @ s.reshape(3, -1).T).T, atol=1e-4)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("lam", [1.0, 0.1])
def test_ridge_solve_equals_lstsq_on_explicit_M(geom, lam):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(4, geom.nb, geom.nb, generator=g, dtype=torch.float64)
    m = design_matrix(geom)
    p = geom.num_basis
    # Ridge = least squares on M stacked over sqrt(lambda) I.
    a = torch.cat([m, lam ** 0.5 * torch.eye(p, dtype=torch.float64)])
    b = torch.cat([s.reshape(4, -1).T, torch.zeros(p, 4, dtype=torch.float64)])
    want = torch.linalg.lstsq(a, b).solution.T
    got = fit_maps(s.float(), geom, lam)
    assert torch.allclose(got.double(), want, atol=2e-5), (got.double() - want).abs().max()


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_known_combinations_are_recovered(geom):
    # S = M x_true: with a tiny ridge the fit reproduces S, and the coefficients are the
    # min-norm ones (the diagonal and column families share the all-ones direction).
    g = torch.Generator().manual_seed(2)
    m = design_matrix(geom)
    x_true = torch.randn(3, geom.num_basis, generator=g, dtype=torch.float64) * 0.3
    s = (m @ x_true.T).T.reshape(3, geom.nb, geom.nb)
    fg = fit_geometry(geom, 1e-6, "cpu")
    assert torch.allclose(fg.reconstruct(fg.solve(s.float())).double(), s, atol=2e-3)
    x = fg.solve(s)  # float64 maps: the near-null direction needs the precision
    assert x.dtype == torch.float64
    assert torch.allclose(fg.reconstruct(x), s, atol=1e-6)
    min_norm = (torch.linalg.pinv(m) @ s.reshape(3, -1).T).T
    assert torch.allclose(x, min_norm, atol=1e-4)


def test_pure_lines_are_recovered_exactly():
    geom = Geometry(128, 16, None)
    nb = geom.nb
    s = torch.ones(1, nb, nb)
    s[0] -= 0.8 * torch.eye(nb)                  # a dense main diagonal
    s[0, :, 3] -= 0.5                             # a dense key column
    fg = fit_geometry(geom, 1e-6, "cpu")
    x = fg.solve(s)
    assert torch.allclose(fg.reconstruct(x), s, atol=1e-3)


def test_diagonal_sums_and_frame_indicator():
    s = torch.arange(16.0).view(1, 4, 4)
    assert diagonal_sums(s).tolist() == [[12.0, 8.0 + 13.0, 4.0 + 9.0 + 14.0, 0 + 5 + 10 + 15.0, 1 + 6 + 11.0, 2 + 7.0, 3.0]]
    f = GEOMETRIES[0].frame_indicator()
    # 30-token frames at block 16: block 1 (tokens 16..31) straddles frames 0 and 1; block 4 is text.
    assert f[0].tolist() == [True, True, False, False, False]
    assert f[1].tolist() == [True, True, True, True, False]
    assert not f[4].any()


def test_factorization_is_cached_per_geometry():
    assert fit_geometry(GEOMETRIES[0], 1.0, "cpu") is fit_geometry(GEOMETRIES[0], 1.0, "cpu")
    assert fit_geometry(GEOMETRIES[0], 1.0, "cpu") is not fit_geometry(GEOMETRIES[0], 0.5, "cpu")


def test_extrapolation_is_linear_to_the_middle_of_the_interval():
    c1, c2 = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.allclose(extrapolate([(4, c1), (6, c2)], 10), torch.full((2, 3), 1 + 5.5 / 2))
    assert torch.equal(extrapolate([(4, c2)], 10), c2)


# ---------------------------------------------------------------- prediction and masks

def _line_map(nb, diag_dense=(), col_dense=()):
    s = torch.ones(nb, nb)
    for d in diag_dense:
        s -= 0.9 * torch.diag(torch.ones(nb - abs(d)), d)
    for c in col_dense:
        s[:, c] -= 0.9
    return s.clamp(0, 1)


def test_densest_lines_are_kept_and_text_and_own_block_forced():
    geom = Geometry(160, 16, None, text_tokens=20, text_position="first")   # text: blocks 0, 1
    nb = geom.nb
    s = torch.stack([_line_map(nb, diag_dense=(2,)), _line_map(nb, col_dense=(7,))])
    fg = fit_geometry(geom, 1e-3, "cpu")
    cfg = SparsityConfig(lines_per_head=1)
    mask, lines, keep_frame, cov = predict_mask(fg.solve(s), fg, cfg)
    assert lines.tolist() == [1, 1]
    eye = torch.eye(nb, dtype=torch.bool)
    text = torch.zeros(nb, dtype=torch.bool)
    text[:2] = True
    forced = eye | text[None, :] | text[:, None]
    want0 = forced | torch.diag(torch.ones(nb - 2, dtype=torch.bool), 2)
    want1 = forced.clone()
    want1[:, 7] = True
    assert torch.equal(mask[0], want0)
    assert torch.equal(mask[1], want1)
    assert (cov > 0).all() and (cov <= 1).all()


def test_non_grid_tokens_on_both_sides_make_text_blocks_at_both_ends():
    """An int text position (FramePack: history before the grid, image and text after it): the
    blocks holding any of those tokens are text blocks; the frame ranges start after them."""
    geom = Geometry(160, 16, (2, 4, 8), text_tokens=96, text_position=40)   # 40 + 64 video + 56
    assert geom.video_offset == 40
    assert geom.text_blocks().nonzero().flatten().tolist() == [0, 1, 2, 6, 7, 8, 9]
    first, last = geom.frame_ranges()
    assert (first[2], last[2], first[3], last[3], first[5], last[5]) == (0, 0, 0, 0, 1, 1)


def test_blocks_rule_fills_the_line_budget_with_the_densest_observed_blocks():
    """mask_rule="blocks": the lines set the per-head count, the observed map picks the blocks
    (forced ones first); "lines" keeps whole lines; without an observed map both are the lines."""
    geom = Geometry(160, 16, None, text_tokens=20, text_position="first")   # text: blocks 0, 1
    nb = geom.nb
    g = torch.Generator().manual_seed(3)
    s = torch.stack([_line_map(nb, diag_dense=(2,)), _line_map(nb, col_dense=(7,))])
    observed = (s + 0.01 * torch.rand(s.shape, generator=g)).clamp(0, 1)
    observed[:, 6, 3] = 0.0                     # a dense block on no line of either head
    observed[0, 4, 6] = observed[1, 5, 7] = 1.0  # and a sparse block on each head's line
    fg = fit_geometry(geom, 1e-3, "cpu")
    coef = fg.solve(observed)
    by_lines, *_ = predict_mask(coef, fg, SparsityConfig(lines_per_head=1, mask_rule="lines"), observed)
    assert torch.equal(by_lines, predict_mask(coef, fg, SparsityConfig(lines_per_head=1))[0])
    by_blocks, lines, _, cov = predict_mask(coef, fg, SparsityConfig(lines_per_head=1, mask_rule="blocks"), observed)
    assert torch.equal(by_blocks.sum((-2, -1)), by_lines.sum((-2, -1)))      # same budget
    # the default rule (mass) with lines asked for is the blocks rule with that budget
    mass = torch.rand(s.shape, generator=g)
    assert torch.equal(predict_mask(coef, fg, SparsityConfig(lines_per_head=1), observed, mass)[0], by_blocks)
    text = torch.zeros(nb, dtype=torch.bool)
    text[:2] = True
    forced = torch.eye(nb, dtype=torch.bool) | text[None, :] | text[:, None]
    for h in range(2):
        assert by_blocks[h][forced].all()
        free = ~forced
        kept_w = (1 - observed[h])[by_blocks[h] & free]
        dropped_w = (1 - observed[h])[~by_blocks[h] & free]
        assert kept_w.min() >= dropped_w.max()                                # densest blocks kept
    assert by_blocks[:, 6, 3].all() and not by_lines[:, 6, 3].any()
    assert not by_blocks[0, 4, 6] and not by_blocks[1, 5, 7]
    with pytest.raises(ValueError, match="mask_rule"):
        SparsityConfig(mask_rule="diagonal")


def test_coverage_and_density_choose_lines_per_head():
    geom = Geometry(256, 16, None)
    nb = geom.nb
    s = torch.stack([_line_map(nb, diag_dense=(0, 1, -1)), _line_map(nb, diag_dense=(0,), col_dense=(2, 5, 9, 11))])
    fg = fit_geometry(geom, 1e-3, "cpu")
    mask, lines, _, cov = predict_mask(fg.solve(s), fg, SparsityConfig(coverage=0.9))
    assert (cov >= 0.9 - 1e-4).all()
    # Head 0 needs its three dense diagonals (two besides the own block), head 1 the four columns.
    assert mask[0].sum() < mask[1].sum()
    assert all(mask[1][:, c].all() for c in (2, 5, 9, 11))
    mask, _, _, _ = predict_mask(fg.solve(s), fg, SparsityConfig(density=0.3))
    density = mask.float().mean((-2, -1))
    assert (density >= 0.3).all() and (density < 0.3 + 2.0 / nb).all()   # at most one line over


def test_frame_diagonal_kept_by_its_coefficient():
    geom = Geometry(192, 16, (4, 4, 12))  # 48-token frames: 3 blocks per frame
    nb = geom.nb
    frame = geom.frame_indicator()
    spatial = torch.where(frame, 0.1, 1.0)
    flat = torch.full((nb, nb), 0.9)
    fg = fit_geometry(geom, 1e-3, "cpu")
    coef = fg.solve(torch.stack([spatial, flat]))
    assert coef[0, -1] < -FRAME_KEEP
    mask, _, keep_frame, _ = predict_mask(coef, fg, SparsityConfig(lines_per_head=0))
    assert keep_frame.tolist() == [True, False]
    assert torch.equal(mask[0], frame | torch.eye(nb, dtype=torch.bool))
    assert torch.equal(mask[1], torch.eye(nb, dtype=torch.bool))


def test_row_floor_and_ceiling():
    geom = Geometry(256, 16, None)
    nb = geom.nb
    fg = fit_geometry(geom, 1e-3, "cpu")
    coef = fg.solve(torch.rand(2, nb, nb))
    mask, *_ = predict_mask(coef, fg, SparsityConfig(lines_per_head=0, min_density=0.25))
    assert (mask.sum(-1) >= 4).all()
    mask, *_ = predict_mask(coef, fg, SparsityConfig(coverage=1.0, max_density=0.25))
    assert (mask.sum(-1) <= 4).all() and mask.diagonal(dim1=-2, dim2=-1).all()


def test_lists_from_mask_are_sorted_full_width():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 9, 9, generator=g) < 0.4
    mask |= torch.eye(9, dtype=torch.bool)
    counts, indices = lists_from_mask(mask)
    assert indices.shape == (2, 3, 9, 9) and indices.dtype == counts.dtype == torch.int32
    assert torch.equal(mask_from_lists(counts, indices, 9), mask)
    valid = torch.arange(9) < counts.unsqueeze(-1)
    kept = torch.where(valid, indices, 100)
    assert torch.equal(kept, kept.sort(-1).values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mass_rule_keeps_the_sites_densest_blocks_by_observed_mass(seed):
    """mask_rule="mass": forced blocks (own, text) first, then all heads' blocks by mass together, as
    the oracle ranks them; a density keeps that share of all blocks (some heads more, some fewer),
    a coverage the fewest reaching that share of the mass. The lines do not matter."""
    from modcompile.policies.mod_mask import mass_mask
    geom = Geometry(512, 16, None, text_tokens=20, text_position="first")   # text: blocks 0, 1
    nb, H = geom.nb, 3
    g = torch.Generator().manual_seed(seed)
    # per-row masses of three heads from sharp to flat (rows sum to 1)
    logits = torch.randn(H, nb, nb, generator=g) * torch.tensor([4.0, 2.0, 0.5]).view(H, 1, 1)
    mass = logits.softmax(-1)
    fg = fit_geometry(geom, 1e-3, "cpu")
    coef = fg.solve(torch.rand(H, nb, nb, generator=g))
    text = torch.zeros(nb, dtype=torch.bool)
    text[:2] = True
    forced = (torch.eye(nb, dtype=torch.bool) | text[None, :] | text[:, None]).expand(H, nb, nb)
    for density in (0.3, 0.6):
        mask, _, _, cov = predict_mask(coef, fg, SparsityConfig(density=density), mass.clone(), mass)
        assert mask[forced].all()
        assert mask.sum() == max(round(density * H * nb * nb), int(forced.sum()))
        free = ~forced
        assert mass[mask & free].min() >= mass[~mask & free].max()          # densest blocks, over all heads
        assert mask[0].sum() < mask[2].sum()                                  # the flat head gets more
        assert torch.allclose(cov, (mass * mask).sum((-2, -1)) / mass.sum((-2, -1)))
        # another fit changes nothing
        other = predict_mask(coef * -3.0, fg, SparsityConfig(density=density), mass.clone(), mass)[0]
        assert torch.equal(other, mask)
    for coverage in (0.5, 0.8, 0.95):
        mask = mass_mask(mass, forced, None, coverage)
        kept = (mass * mask).sum()
        assert kept >= coverage * mass.sum() - 1e-5                            # reaches the coverage
        free = ~forced
        lightest = mass.masked_fill(~(mask & free), float("inf")).min()
        assert kept - lightest < coverage * mass.sum() + 1e-5                 # and is the fewest that do
    assert mass_mask(mass, forced, None, 0.5).sum() < mass_mask(mass, forced, None, 0.95).sum()
