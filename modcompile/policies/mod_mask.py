"""MOD's mask: from fitted coefficients to the kept blocks of the coming interval.

Mask (built once per fit, on device): coefficients extrapolated linearly from the last two fits to
the middle of the coming interval; predicted map ``S^ = M x`` clipped to [0, 1]; mass proxy
``w = 1 - S^``. Lines (diagonals and key columns) are ranked by their mean ``w`` (densest first);
per head the first k lines are kept, with k = ``lines_per_head``, or the smallest k whose kept
blocks reach ``density``, or else whose predicted kept mass reaches ``coverage`` (reported as
``predicted_coverage``). Always kept: the own block, text key blocks (every query) and text query
blocks (every key), and the frame block diagonal when its coefficient lowers the predicted sparsity
by more than ``FRAME_KEEP``. With ``mask_rule="lines"`` (the paper) those lines are the mask. With
``mask_rule="blocks"`` (our addition, the default before ``mass``) they only set each head's block budget, filled
with the densest blocks of the last observed map (the lines average away block detail that the
observation has). With ``mask_rule="mass"`` (the default) the lines play no part: the blocks of all
heads of the site are ranked together by their observed attention mass (the map kernel's second
output), as the oracle of the equal-density benchmark ranks them by their exact mass, and the mask is
the densest ``density`` share of them, or else the fewest whose mass reaches ``coverage`` of the total:
the threshold map's count of entries above 1e-4 is much flatter than the mass, so a coverage of it
keeps far more blocks than that coverage of the mass needs (BENCHMARKS.md, section 8).
``min_density``/``max_density`` then bound every row.
"""
from __future__ import annotations

import math

import torch

from .mod_fit import FitGeometry

# The frame block diagonal is kept when its fitted coefficient is below -FRAME_KEEP: being in the
# same latent frame lowers a block's predicted sparsity by more than this (fraction of entries).
FRAME_KEEP = 0.05


def extrapolate(fits: list, interval: int) -> torch.Tensor:
    """Coefficients at the middle of the coming interval, linear in the step from the last two fits."""
    step2, coef2 = fits[-1]
    if len(fits) < 2 or fits[-2][0] == step2:
        return coef2
    step1, coef1 = fits[-2]
    slope = (coef2 - coef1) / float(step2 - step1)
    return coef2 + slope * ((interval + 1) / 2.0)


def uses_count_map(config) -> bool:
    """Whether the mask rule reads the fitted sparsity (count) map: ``blocks`` and ``lines`` rank its
    lines, ``mass`` with ``lines_per_head`` too. The default ``mass`` rule ranks the observed mass
    alone, so its observations compute neither the count map nor the fit."""
    return config.mask_rule != "mass" or config.lines_per_head is not None


def predict_mask(coef: torch.Tensor | None, fg: FitGeometry, config, observed: torch.Tensor | None = None,
                 observed_mass: torch.Tensor | None = None):
    """The kept blocks (H, nb, nb) bool from coefficients (H, P), plus per head the lines kept (-1
    where no lines decide the mask), whether the frame diagonal is kept and the predicted kept mass
    fraction. All on device.

    With ``observed_mass`` (the mass map, (H, nb, nb)) and ``config.mask_rule == "mass"``:
    :func:`mass_mask`, and no lines are ranked (unless ``lines_per_head`` is set: that asks for
    lines, so the ``blocks`` rule runs with that budget). With ``observed`` (the last observed map,
    (H, nb, nb), history merged) and ``config.mask_rule`` ``"blocks"`` (or ``"mass"`` with lines
    asked for), the line selection only sets each head's block budget; the blocks themselves are
    the densest of the observed map, which keeps the block detail that lines average away. (Moving
    the map by the lines' extrapolated drift was tried: its masks were further from the oracle's on
    the synthetic benchmark.)"""
    geom = fg.geom
    nb = geom.nb
    H = (coef if coef is not None else observed_mass).shape[0]   # coef None: the mass rule (uses_count_map)
    dev = fg.device
    eye = torch.eye(nb, dtype=torch.bool, device=dev)
    text = fg.text_blocks
    forced = (eye | text[None, :] | text[:, None]).expand(H, nb, nb)
    if observed_mass is not None and config.mask_rule == "mass" and config.lines_per_head is None:
        w = observed_mass.clamp_min(0.0)
        mask = bound_rows(mass_mask(w, forced, config.density, config.coverage), w, forced, text,
                          config.min_density, config.max_density)
        no_lines = torch.full((H,), -1, dtype=torch.long, device=dev)
        no_frame = torch.zeros(H, dtype=torch.bool, device=dev)
        return mask, no_lines, no_frame, _kept_share(w, mask)

    nd, n_lines = geom.num_diagonals, geom.num_lines
    w = (1.0 - fg.reconstruct(coef).clamp(0.0, 1.0))              # predicted mass proxy
    # Rank lines, densest first; a block's rank is that of its densest line.
    order = fg.line_means(w).argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_lines, device=dev).expand(H, -1))
    rank_diag = rank[:, :nd].gather(1, fg.diag_index.reshape(1, -1).expand(H, -1)).view(H, nb, nb)
    block_rank = torch.minimum(rank_diag, rank[:, nd:].unsqueeze(1))

    if fg.frame is not None:
        keep_frame = coef[:, -1] < -FRAME_KEEP
        forced = forced | (fg.frame & keep_frame.view(H, 1, 1))
    else:
        keep_frame = torch.zeros(H, dtype=torch.bool, device=dev)
    free = (~forced).float()

    flat_rank = block_rank.reshape(H, -1)
    mass = torch.zeros(H, n_lines, device=dev).scatter_add_(1, flat_rank, (w * free).reshape(H, -1))
    count = torch.zeros(H, n_lines, device=dev).scatter_add_(1, flat_rank, free.reshape(H, -1))
    total = w.sum((-2, -1))
    if config.lines_per_head is not None:
        lines = torch.full((H,), min(config.lines_per_head, n_lines), dtype=torch.long, device=dev)
    elif config.density is not None:
        before = (nb * nb - free.sum((-2, -1))).unsqueeze(-1) + count.cumsum(-1) - count
        lines = (before < config.density * nb * nb).sum(-1)
    else:
        before = (w * forced).sum((-2, -1)).unsqueeze(-1) + mass.cumsum(-1) - mass
        lines = (before < config.coverage * total.unsqueeze(-1)).sum(-1)
    mask = forced | (block_rank < lines.view(H, 1, 1))
    if observed is not None and config.mask_rule != "lines":   # blocks, or mass with lines asked for
        w = 1.0 - observed.clamp(0.0, 1.0)
        budget = mask.sum((-2, -1))
        score = (w + 2.0 * forced.float()).reshape(H, -1)          # forced blocks first
        order = score.argsort(-1, descending=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(nb * nb, device=dev).expand(H, -1))
        mask = (ranks < budget.view(H, 1)).view(H, nb, nb)
    mask = bound_rows(mask, w, forced, text, config.min_density, config.max_density)
    return mask, lines, keep_frame, _kept_share(w, mask)


def _kept_share(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(H,) the share of each head's mass proxy ``w`` that ``mask`` keeps."""
    return (w * mask).sum((-2, -1)) / w.sum((-2, -1)).clamp_min(1e-12)


def mass_mask(mass: torch.Tensor, forced: torch.Tensor, density: float | None, coverage: float) -> torch.Tensor:
    """The kept blocks (H, nb, nb) bool: forced blocks first, then the blocks of all heads by mass,
    densest first; the first ``density`` share of all blocks, or (``density`` None) the fewest whose
    mass, forced blocks' included, reaches ``coverage`` of the total. Static shapes: no sync."""
    H, nb, _ = mass.shape
    flat = mass.reshape(-1)
    order = mass.masked_fill(forced, float("inf")).reshape(-1).argsort(descending=True)
    if density is not None:
        keep = torch.arange(flat.numel(), device=mass.device) < round(density * flat.numel())
    else:
        ranked = flat[order]
        before = ranked.cumsum(0) - ranked
        keep = before < coverage * flat.sum()
    return torch.zeros_like(forced.reshape(-1)).scatter_(0, order, keep).view(H, nb, nb) | forced


def bound_rows(mask, w, forced, text, min_density: float, max_density: float):
    """Per query block at least ceil(min_density * nb) and at most ceil(max_density * nb) key
    blocks (text query rows are exempt from the ceiling); extra blocks are the densest predicted,
    dropped ones the least dense, forced blocks last. The k of each top-k is static: no sync."""
    nb = mask.shape[-1]
    low = math.ceil(min_density * nb)
    if low > 0:
        score = w + 2.0 * mask.float()
        top = score.topk(min(low, nb), -1).indices
        mask = mask | torch.zeros_like(mask).scatter_(-1, top, True)
    high = max(1, math.ceil(max_density * nb))
    if high < nb:
        score = mask.float() * (2.0 + 2.0 * forced.float() + w)
        top = score.topk(high, -1).indices
        capped = mask & torch.zeros_like(mask).scatter_(-1, top, True)
        mask = torch.where(text.view(1, nb, 1), mask, capped)
    return mask


__all__ = ["FRAME_KEEP", "bound_rows", "extrapolate", "mass_mask", "predict_mask"]
