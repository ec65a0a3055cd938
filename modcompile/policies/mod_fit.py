"""MOD-DiT's fit: a block sparsity map as a ridge combination of structural basis maps.

Basis of an ``nb x nb`` block map (columns of the design matrix ``M``, rows = the nb*nb blocks):

* one indicator per block diagonal offset ``d = j - i`` in ``[-(nb-1), nb-1]`` (2nb-1 maps);
* one indicator per key column ``j`` (nb maps: the "vertical lines" every query attends);
* the frame block diagonal (one map, only when the video grid is known): blocks ``(i, j)`` whose
  latent frames overlap. A block's frames are the frames of its *video* tokens (a frame is H*W
  tokens; a block that straddles a frame boundary belongs to both frames, a text-only block to
  none), and ``(i, j)`` is in the set when the two frame ranges intersect.

``M^T M`` depends only on this geometry, so it is formed analytically (counts of diagonal lengths,
diagonal/column crossings and reductions of the frame indicator), inverted once with the ridge
term and cached per geometry. ``M^T S`` is just diagonal sums, column sums and the frame-block-
diagonal sum of ``S``; the solve is one product with the inverse of the ridge Gram matrix
(formed once per geometry, in float64) for all heads at once.

The diagonal and column families both sum to the all-ones map, so ``M`` is rank deficient: the
coefficients are only defined up to that direction (the ridge picks the small-norm one), while the
reconstruction ``M x`` is what carries meaning. Line rankings therefore use the reconstructed map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.block_lists import num_blocks
from ..kernels.partition import video_offset


@dataclass(frozen=True)
class Geometry:
    """Everything the basis depends on (hashable: the key of the factorization cache)."""

    seq_len: int
    block_size: int
    grid: tuple | None = None          # latent (T, H, W); None = no frame basis
    text_tokens: int = 0
    text_position: str | int = "last"   # or the count of non-grid tokens before the grid

    @property
    def nb(self) -> int:
        return num_blocks(self.seq_len, self.block_size)

    @property
    def has_frame(self) -> bool:
        return self.grid is not None

    @property
    def num_diagonals(self) -> int:
        return 2 * self.nb - 1

    @property
    def num_lines(self) -> int:
        return 3 * self.nb - 1                 # diagonals + columns (the rankable lines)

    @property
    def num_basis(self) -> int:
        return self.num_lines + int(self.has_frame)

    @property
    def video_offset(self) -> int:
        return video_offset(self.text_tokens, self.text_position)

    def text_blocks(self) -> torch.Tensor:
        """Boolean (nb,): blocks holding at least one text token."""
        nb, bs = self.nb, self.block_size
        start = torch.arange(nb) * bs
        end = torch.clamp(start + bs, max=self.seq_len)
        if self.text_tokens <= 0:
            return torch.zeros(nb, dtype=torch.bool)
        before = self.video_offset                              # text (or other non-grid tokens) on both sides
        after = self.seq_len - (self.text_tokens - before)
        return (start < before) | (end > after)

    def frame_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block the first and last latent frame of its video tokens; (-1, -2) for blocks
        without video tokens (an empty range that intersects nothing)."""
        nb, bs = self.nb, self.block_size
        T, Hg, Wg = self.grid
        frame = Hg * Wg
        v0, v1 = self.video_offset, self.video_offset + T * frame
        start = torch.clamp(torch.arange(nb) * bs, min=v0)
        end = torch.clamp(torch.arange(nb) * bs + bs, max=min(v1, self.seq_len))  # exclusive
        has_video = end > start
        first = torch.where(has_video, (start - v0) // frame, torch.full_like(start, -1))
        last = torch.where(has_video, (end - 1 - v0) // frame, torch.full_like(start, -2))
        return first, last

    def frame_indicator(self) -> torch.Tensor:
        """Boolean (nb, nb): blocks i, j whose frame ranges overlap."""
        first, last = self.frame_ranges()
        return (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])


def diagonal_index(nb: int, device=None) -> torch.Tensor:
    """(nb, nb) long: the diagonal basis index ``j - i + nb - 1`` of each block."""
    i = torch.arange(nb, device=device)
    return i[None, :] - i[:, None] + nb - 1


def gram_matrix(geom: Geometry) -> torch.Tensor:
    """``M^T M`` (P x P, float64) from the geometry alone (no nb^2 x P matrix is built)."""
    nb, nd = geom.nb, geom.num_diagonals
    P = geom.num_basis
    g = torch.zeros(P, P, dtype=torch.float64)
    d = torch.arange(nd) - (nb - 1)
    g[:nd, :nd] = torch.diag((nb - d.abs()).double())                 # diagonal lengths
    g[nd:nd + nb, nd:nd + nb] = torch.eye(nb, dtype=torch.float64) * nb  # column heights
    # A diagonal d crosses column c once, at row c - d, when that row exists.
    c = torch.arange(nb)
    rows = c[None, :] - d[:, None]
    cross = ((rows >= 0) & (rows < nb)).double()
    g[:nd, nd:nd + nb] = cross
    g[nd:nd + nb, :nd] = cross.T
    if geom.has_frame:
        f = geom.frame_indicator().double()
        fd = diagonal_sums(f.unsqueeze(0))[0]
        fc = f.sum(0)
        p = P - 1
        g[p, :nd], g[:nd, p] = fd, fd
        g[p, nd:nd + nb], g[nd:nd + nb, p] = fc, fc
        g[p, p] = f.sum()
    return g


def design_matrix(geom: Geometry) -> torch.Tensor:
    """The explicit ``M`` (nb*nb x P, float64): for tests and small checks only."""
    nb, nd = geom.nb, geom.num_diagonals
    m = torch.zeros(nb, nb, geom.num_basis, dtype=torch.float64)
    m.scatter_(2, diagonal_index(nb).unsqueeze(-1), 1.0)
    cols = (torch.arange(nb) + nd).expand(nb, nb)
    m.scatter_(2, cols.unsqueeze(-1), 1.0)
    if geom.has_frame:
        m[..., -1] = geom.frame_indicator().double()
    return m.reshape(nb * nb, geom.num_basis)


def diagonal_sums(s: torch.Tensor) -> torch.Tensor:
    """Sums of ``s`` (..., nb, nb) along each diagonal offset ``j - i``: (..., 2nb-1).

    Skew trick: with the rows flipped, entry (i, j) of a row-major (nb, 2nb) padding lands at
    column (nb-1-i) + j of the (nb, 2nb-1) view of the same memory, i.e. its diagonal index."""
    nb = s.shape[-1]
    lead = s.shape[:-2]
    padded = torch.nn.functional.pad(s.flip(-2), (0, nb)).reshape(*lead, nb * 2 * nb)
    skewed = padded[..., : nb * (2 * nb - 1)].reshape(*lead, nb, 2 * nb - 1)
    return skewed.sum(-2)


class FitGeometry:
    """Device tensors and the cached Cholesky factor of one geometry."""

    def __init__(self, geom: Geometry, ridge_lambda: float, device: torch.device):
        self.geom = geom
        self.device = device
        nb = geom.nb
        gram = gram_matrix(geom)
        gram += ridge_lambda * torch.eye(geom.num_basis, dtype=torch.float64)
        # The inverse of the ridge Gram matrix (eigenvalues >= lambda: well conditioned at the
        # default lambda = 1), formed once on the host in float64: every fit is then one small
        # GEMM in the graphed tail instead of two triangular solves (not timed apart on a GPU).
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram)).to(device)  # float64, P x P
        self.diag_index = diagonal_index(nb, device)                     # (nb, nb)
        self.diag_length = (nb - (torch.arange(geom.num_diagonals, device=device) - (nb - 1)).abs()).float()
        self.frame = geom.frame_indicator().to(device) if geom.has_frame else None
        self.frame_f = self.frame.float() if self.frame is not None else None
        self.text_blocks = geom.text_blocks().to(device)

    # ---- fit
    def moment(self, s: torch.Tensor) -> torch.Tensor:
        """``M^T S`` for maps ``s`` (H, nb, nb): (H, P) float32."""
        parts = [diagonal_sums(s), s.sum(-2)]
        if self.frame_f is not None:
            parts.append((s * self.frame_f).sum((-2, -1)).unsqueeze(-1))
        return torch.cat(parts, -1)

    def solve(self, s: torch.Tensor) -> torch.Tensor:
        """Ridge coefficients (H, P) of the maps ``s`` (H, nb, nb), all heads in one solve: float64
        maps give float64 coefficients, anything else float32."""
        out_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        # x^T = (M^T S)^T (M^T M + lambda I)^-1 (symmetric): one float64 GEMM, capturable.
        return (self.moment(s.to(out_dtype)).double() @ self.inverse).to(out_dtype)

    # ---- use of the coefficients
    def reconstruct(self, coef: torch.Tensor) -> torch.Tensor:
        """``M x`` as maps (H, nb, nb)."""
        nb, nd = self.geom.nb, self.geom.num_diagonals
        H = coef.shape[0]
        diag = coef[:, :nd].gather(1, self.diag_index.reshape(1, -1).expand(H, -1)).view(H, nb, nb)
        out = diag + coef[:, nd:nd + nb].unsqueeze(1)
        if self.frame_f is not None:
            out = out + coef[:, -1].view(H, 1, 1) * self.frame_f
        return out

    def line_means(self, m: torch.Tensor) -> torch.Tensor:
        """Mean of maps ``m`` (H, nb, nb) along every line: (H, 3nb-1) = diagonals then columns."""
        return torch.cat([diagonal_sums(m) / self.diag_length, m.mean(-2)], -1)


_CACHE: dict = {}


def fit_geometry(geom: Geometry, ridge_lambda: float, device) -> FitGeometry:
    """The cached :class:`FitGeometry` of (geometry, lambda, device): inverted once."""
    key = (geom, float(ridge_lambda), str(torch.device(device)))
    fg = _CACHE.get(key)
    if fg is None:
        if len(_CACHE) > 32:
            _CACHE.clear()
        fg = _CACHE[key] = FitGeometry(geom, ridge_lambda, torch.device(device))
    return fg


def fit_maps(s: torch.Tensor, geom: Geometry, ridge_lambda: float = 1.0) -> torch.Tensor:
    """Ridge coefficients (H, P) of the maps ``s`` (H, nb, nb)."""
    if s.dim() != 3 or s.shape[-1] != geom.nb or s.shape[-2] != geom.nb:
        raise ValueError(f"fit_maps: expected (H, {geom.nb}, {geom.nb}) maps, got {tuple(s.shape)}")
    return fit_geometry(geom, ridge_lambda, s.device).solve(s)


__all__ = ["Geometry", "FitGeometry", "fit_geometry", "fit_maps", "gram_matrix", "design_matrix",
           "diagonal_sums", "diagonal_index"]
