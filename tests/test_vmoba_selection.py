"""Selection rules of the vmoba policy on hand-built score matrices with known answers."""
import math

import pytest
import torch

from modcompile.policies.selection import normalize_scores, select_blocks, threshold_prefix


def _rows(mask):
    return [sorted(r.nonzero().flatten().tolist()) for r in mask]


def test_threshold_prefix_known_answers():
    w = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75])  # total 2.5
    assert _rows(threshold_prefix(w, 0.5)[None]) == [[1, 4]]       # 1.0 < 1.25, then 1.75 >= 1.25
    assert _rows(threshold_prefix(w, 0.3)[None]) == [[1]]          # 1.0 >= 0.75
    assert _rows(threshold_prefix(w, 0.0)[None]) == [[]]
    assert _rows(threshold_prefix(w, 1.0)[None]) == [[1, 2, 3, 4]]  # the zero-weight entry adds nothing


def test_minmax_and_softmax_normalization():
    s = torch.tensor([[2.0, 4.0], [6.0, 10.0]])
    torch.testing.assert_close(normalize_scores(s, "minmax", (-2, -1)), torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(normalize_scores(s, "minmax", (-1,)), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    g = normalize_scores(s, "softmax", (-2, -1), scale=0.5)
    torch.testing.assert_close(g, torch.softmax(s.flatten() * 0.5, 0).view(2, 2))
    assert abs(g.sum().item() - 1) < 1e-6
    torch.testing.assert_close(normalize_scores(torch.full((2, 3), 7.0), "minmax", (-1,)), torch.ones(2, 3))
    with pytest.raises(ValueError, match="normalization"):
        normalize_scores(s, "zscore", (-1,))


# A head whose scores favour a few (query block, key block) pairs strongly.
S = torch.tensor([
    [9.0, 0.0, 0.0, 8.0],
    [0.0, 1.0, 7.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [5.0, 0.0, 0.0, 0.0],
])


def test_global_minmax_known_answer():
    # minmax over the head: w = S / 9; total = 31 / 9; tau = 0.5 -> target 15.5 / 9.
    # ranked 9, 8 (mass before: 0, 9 < 15.5) -> kept; 7 has 17 before -> not kept. Plus own blocks.
    keep = select_blocks(S, mode="global", tau=0.5, normalization="minmax")
    assert _rows(keep) == [[0, 3], [1], [2], [3]]
    # tau = 0.8 -> target 24.8 / 9: 9, 8, 7 (before 17 < 24.8), 5 (before 24 < 24.8) kept
    keep = select_blocks(S, mode="global", tau=0.8, normalization="minmax")
    assert _rows(keep) == [[0, 3], [1, 2], [2], [0, 3]]


def test_global_softmax_known_answer():
    # softmax of the head at scale 1 (ten zeros, two ones, a 5, a 7, an 8, a 9): the shares are
    # ~0.656, 0.241, 0.089, ... -> tau 0.5 keeps only the 9, tau 0.8 the 9 and the 8.
    keep = select_blocks(S, mode="global", tau=0.5, normalization="softmax", scale=1.0)
    assert _rows(keep) == [[0], [1], [2], [3]]
    keep = select_blocks(S, mode="global", tau=0.8, normalization="softmax", scale=1.0)
    assert _rows(keep) == [[0, 3], [1], [2], [3]]
    # a small scale flattens the softmax: more blocks needed for the same tau
    flat = select_blocks(S, mode="global", tau=0.8, normalization="softmax", scale=0.01)
    assert flat.sum() > keep.sum()


def test_row_mode_known_answer():
    # per row minmax: row 0 -> [1, 0, 0, 8/9], total 17/9, tau 0.5 -> 9 alone reaches it.
    keep = select_blocks(S, mode="row", tau=0.5, normalization="minmax")
    assert _rows(keep) == [[0], [1, 2], [2], [0, 3]]
    keep = select_blocks(S, mode="row", tau=0.6, normalization="minmax")
    assert _rows(keep) == [[0, 3], [1, 2], [2], [0, 3]]
    # softmax per row: row 0 -> e^9 / (e^9 + e^8 + 2) = 0.731 >= 0.7
    # (row 2 is three tied zeros and a one: which zeros it keeps is not defined)
    keep = select_blocks(S, mode="row", tau=0.7, normalization="softmax", scale=1.0)
    assert [_rows(keep)[i] for i in (0, 1, 3)] == [[0], [1, 2], [0, 3]]


def test_topk_and_own_block():
    keep = select_blocks(S, mode="topk", topk=2)
    # own block counts first, then the best other score (ties broken by index)
    assert _rows(keep) == [[0, 3], [1, 2], [0, 2], [0, 3]]
    keep = select_blocks(S, mode="topk", density=0.25)  # ceil(0.25 * 4) = 1: the own block only
    assert _rows(keep) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="topk or density"):
        select_blocks(S, mode="topk")


def test_density_floor_and_ceiling_per_row():
    keep = select_blocks(S, mode="global", tau=0.5, min_density=0.5)  # >= 2 blocks per row
    assert (keep.sum(-1) >= 2).all()
    assert _rows(keep) == [[0, 3], [1, 2], [0, 2], [0, 3]]
    keep = select_blocks(S, mode="global", tau=1.0, max_density=0.5)  # <= 2 blocks per row, own kept
    assert (keep.sum(-1) <= 2).all() and keep.diagonal().all()
    keep = select_blocks(S, mode="global", tau=1.0, max_density=0.0)  # ceiling never drops the own block
    assert _rows(keep) == [[0], [1], [2], [3]]


def test_batched_heads_are_independent_and_stay_on_device():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 6, 6)
    keep = select_blocks(scores, mode="global", tau=0.3)
    for b in range(2):
        for h in range(3):
            assert torch.equal(keep[b, h], select_blocks(scores[b, h], mode="global", tau=0.3))
    assert keep.diagonal(dim1=-2, dim2=-1).all()


@pytest.mark.parametrize("mode", ["global", "row"])
@pytest.mark.parametrize("norm", ["minmax", "softmax"])
def test_kept_mass_reaches_tau_with_a_minimal_set(mode, norm):
    torch.manual_seed(1)
    scores = torch.randn(4, 8, 8) * 3
    tau = 0.4
    keep = select_blocks(scores, mode=mode, tau=tau, normalization=norm, scale=1.0, keep_own=False)
    dims = (-2, -1) if mode == "global" else (-1,)
    w = normalize_scores(scores, norm, dims, 1.0)
    kept = (w * keep).sum(dims)
    total = w.sum(dims)
    assert (kept >= tau * total - 1e-6).all()
    # minimal: removing the smallest kept weight drops below tau
    smallest = torch.where(keep, w, torch.full_like(w, math.inf)).amin(dims)
    assert (kept - smallest < tau * total + 1e-6).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        select_blocks(S, mode="local")
    with pytest.raises(ValueError, match="tau"):
        select_blocks(S, tau=1.5)
    with pytest.raises(ValueError, match="min_density"):
        select_blocks(S, min_density=0.6, max_density=0.5)
