"""The ``mod`` policy (MOD-DiT, arXiv 2601.11641): fitted mixture-of-lines masks, the default.

Per (site, CFG pass) the policy keeps the block sparsity map ``S`` (nb x nb, batch mean, per head),
the last two ridge fits of ``S`` onto the line basis (:mod:`.mod_fit`) and the current block lists.

Schedule (``ctx.step`` of ``ctx.num_steps``; W warm-up steps, T = ``refresh_interval``):

* steps < W: dense; the last two (W-2, W-1) run the block-sparse kernel on full lists, observe ``S``
  and fit; after the fit of W-1 the mask is built;
* steps W, W+1, ...: sparse with the current lists (``plan`` returns stored tensors: no work, no
  host sync);
* steps W + m*T (m >= 1): refresh. ``cheap_refresh=False`` (the paper): a dense observed step.
  ``cheap_refresh=True``: the sparse kernel runs with the current lists and observes only the
  computed blocks; skipped blocks keep their older values (the paper's history rule). Every
  ``full_refresh_every``-th refresh observes every block instead, so that no value grows stale:
  ``full_refresh="sparse"`` (default) on the same sparse step, the map of all blocks from the
  sparse call's lse; ``"dense"`` on a dense step (exact lse, at the price of a dense attention).
  The sparse call's lse misses the skipped blocks' mass, so a row's probabilities come out too
  large by 1 / (its kept share): at a kept share of 0.8 the threshold moves by ln(1.25) = 0.22 in
  log space, small against the orders of magnitude a threshold of 1e-4 separates (the coverage
  guard bounds the mean share; BENCHMARKS.md has the measured errors).
* the observed coverage of a sparse refresh (:func:`observed_coverage`: the kept share of the
  attention mass estimated from the sparse call's lse and mean-pooled keys of the skipped blocks;
  mean over the observation's sampled rows, heads and batch) is computed on device and copied to
  pinned host memory without waiting. Later plans poll the copy's CUDA event (never wait); once it
  has landed and is below ``min_observed_coverage`` the next step is a dense refresh. On CPU the
  value is ready at once, so the dense refresh is the step after.

Cost of an observation: the map kernel (a cheap refresh's restricted map visits, per group of query
blocks, the union of their lists: at most the full map's work), the coverage estimate (sparse
refreshes), then :func:`observe_tail`: merge, fit, extrapolation, mask and block lists, dozens of
small kernels on (H, nb, nb) maps. On CUDA the tail is replayed from a CUDA graph per (geometry,
batch, heads, kind), shared by all sites and CFG passes of that shape (first call eager, second
captures; ``MODCOMPILE_CUDA_GRAPHS=0`` keeps it eager); its inputs and outputs are copied in and out,
so the state holds ordinary tensors. No observation waits for the host.

Observation estimates ``S`` from every ``config.observe_stride()``-th query row of each block (1 =
exact; by default ``block_size // 8``: 8 rows per block), always the same rows (phase 0,
:func:`..kernels.block_sparsity.sampled_rows`): the mask extrapolates the difference of the last
two fits, and rotating rows would put sampling noise into that difference (the warm-up pair is
one step apart, so the true drift is small).

Mask (built once per fit, on device): coefficients extrapolated linearly from the last two fits to
the middle of the coming interval; predicted map ``S^ = M x`` clipped to [0, 1]; mass proxy
``w = 1 - S^``. Lines (diagonals and key columns) are ranked by their mean ``w`` (densest first);
per head the first k lines are kept, with k = ``lines_per_head``, or the smallest k whose kept
blocks reach ``density``, or else whose predicted kept mass reaches ``coverage`` (reported as
``predicted_coverage``). Always kept: the own block, text key blocks (every query) and text query
blocks (every key), and the frame block diagonal when its coefficient lowers the predicted sparsity
by more than ``FRAME_KEEP``. With ``mask_rule="lines"`` (the paper) those lines are the mask. With
``mask_rule="blocks"`` (the default, our addition) they only set each head's block budget, filled
with the densest blocks of the last observed map (the lines average away block detail that the
observation has; measured MOD-vs-oracle error in BENCHMARKS.md). ``min_density``/``max_density`` then bound every row.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch

from .. import cuda_graphs, dispatch
from .base import (Plan, Policy, SiteContext, block_means, block_token_counts, lists_from_mask,
                   masked_block_means, register_policy)
from .mod_fit import FitGeometry, Geometry, fit_geometry

log = logging.getLogger("modcompile")

# The frame block diagonal is kept when its fitted coefficient is below -FRAME_KEEP: being in the
# same latent frame lowers a block's predicted sparsity by more than this (fraction of entries).
FRAME_KEEP = 0.05
# Captured observation tails kept per policy (one per geometry, batch and kind: a few in practice).
_MAX_GRAPHS = 32


class DeferredScalar:
    """A 0-dim device value copied to the host without waiting; read it once ``ready()``."""

    def __init__(self, value: torch.Tensor):
        value = value.detach().float().reshape(())
        if value.is_cuda:
            self.host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = value.clone(), None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def value(self) -> float:
        return float(self.host)


@dataclass
class ModState:
    geometry: Geometry
    smap: torch.Tensor | None = None               # (H, nb, nb) observed map, history merged
    fits: list = field(default_factory=list)       # last two (step, coef (H, P))
    mask: torch.Tensor | None = None               # (H, nb, nb) bool, current kept blocks
    head_lists: tuple | None = None                # (counts (H, nb), indices (H, nb, nb)) int32
    lists: dict = field(default_factory=dict)      # batch -> contiguous (B, H, ...) lists
    lines: torch.Tensor | None = None              # (H,) lines kept per head
    keep_frame: torch.Tensor | None = None         # (H,) bool
    predicted_coverage: torch.Tensor | None = None  # (H,) predicted kept mass fraction
    observing: str | None = None                   # "dense" / "cheap" while an observed call runs
    cheap_since_full: int = 0                      # cheap refreshes since the last full or dense one
    coverage_flag: DeferredScalar | None = None
    observed_coverage: list = field(default_factory=list)  # (step, value) of cheap refreshes
    events: list = field(default_factory=list)     # (step, "observe-dense"|"refresh-dense"|...), the last HISTORY
    fit_steps: list = field(default_factory=list)
    nonfinite_flag: DeferredScalar | None = None   # whether the last observed map held NaN
    nonfinite_steps: list = field(default_factory=list)  # steps whose observation saw non-finite inputs

    def summary(self) -> dict:
        """Host copies of the policy's numbers (synchronizes: for reports, not the hot path)."""
        out = {"events": list(self.events), "fit_steps": list(self.fit_steps),
               "nonfinite_steps": list(self.nonfinite_steps),
               "observed_coverage": list(self.observed_coverage)}
        if self.lines is not None:
            out["lines"] = self.lines.tolist()
            out["predicted_coverage"] = self.predicted_coverage.tolist()
            out["keep_frame"] = self.keep_frame.tolist()
            out["density"] = float(self.mask.float().mean())
        return out


def observe_map(q, k, lse, *, block_size, threshold, scale, kv_counts=None, kv_indices=None,
                row_stride: int = 1, row_phase: int = 0, key_bias=None):
    """Block sparsity map (B, H, Mq, Mk): Triton on CUDA / interpreter, torch reference otherwise;
    with block lists only the listed blocks are written, the others are ``NOT_OBSERVED`` (-1), so
    that NaN keeps one meaning: a tile with NaN probabilities (non-finite q, k or lse).
    ``row_stride > 1`` estimates it from every ``row_stride``-th query row of each block, from
    ``row_phase`` on. ``key_bias`` (B, Nk): a hidden key has probability 0 (sparse)."""
    from ..kernels.block_sparsity import block_sparsity, block_sparsity_ref
    fn = block_sparsity if dispatch.use_triton(q) else block_sparsity_ref
    return fn(q, k, lse, block_size=block_size, threshold=threshold, scale=scale,
              kv_counts=kv_counts, kv_indices=kv_indices, row_stride=row_stride, row_phase=row_phase,
              fill=NOT_OBSERVED, key_bias=key_bias)


# Entries kept of each ModState history list (events, fits, coverage): a run without generations
# (diffusion forcing's long videos, a loop without step metadata) must not grow them without bound.
HISTORY = 256


def _record(history: list, item) -> None:
    history.append(item)
    if len(history) > HISTORY:
        del history[: len(history) - HISTORY]


# The restricted map's value for blocks it did not compute (a fraction is never negative).
NOT_OBSERVED = -1.0


@register_policy
class ModPolicy(Policy):
    name = "mod"

    def __init__(self, config):
        super().__init__(config)
        self._tails: dict = {}  # (geometry, device, batch, heads, cheap, build) -> GraphedCall

    def default_warmup(self, num_steps: int) -> int:
        # The paper: 12 of 50 dense steps; at least two, so that two fits exist.
        return min(num_steps, max(2, round(12 * num_steps / 50)))

    # ------------------------------------------------------------------ state
    def _geometry(self, ctx: SiteContext, n: int) -> Geometry:
        grid = ctx.info.grid or self.config.video_grid
        text = ctx.info.text_tokens if ctx.info.grid else 0
        if grid is not None:
            video = grid[0] * grid[1] * grid[2]
            if ctx.info.grid is None:
                text = n - video
            if video > n or text < 0:
                log.warning("modcompile mod: grid %s does not fit %d tokens; no frame basis", grid, n)
                grid, text = None, 0
        return Geometry(seq_len=n, block_size=self.config.block_size, grid=tuple(grid) if grid else None,
                        text_tokens=max(text, 0), text_position=ctx.info.text_position)

    def _state(self, ctx: SiteContext, q: torch.Tensor) -> ModState:
        st = ctx.state.policy_state
        n = q.shape[2]
        if st is None or st.geometry.seq_len != n:
            st = ctx.state.policy_state = ModState(self._geometry(ctx, n))
        return st

    # ------------------------------------------------------------------ schedule
    def plan(self, ctx: SiteContext, q: torch.Tensor, k: torch.Tensor, key_bias=None) -> Plan:
        # the lists come from the last observation (which saw the bias), not from this call's inputs
        if q.shape[2] != k.shape[2]:  # not self-attention: nothing to predict
            return ctx.full_plan(q, k, why="not self-attention")
        st = self._state(ctx, q)
        self._poll_nonfinite(ctx, st)
        step, cfg = ctx.step, self.config
        warmup = self.warmup_steps(ctx)
        st.observing = None
        if step < warmup:
            if step >= warmup - 2:
                return self._observed(ctx, st, q, k, "dense", "observe-dense")
            return ctx.full_plan(q, k, why="warm-up")
        if st.mask is None:  # no fit yet (no warm-up observation): bootstrap with a dense one
            return self._observed(ctx, st, q, k, "dense", "observe-dense")
        low = self._poll_coverage(st)
        due = step > warmup and (step - warmup) % cfg.refresh_interval == 0
        if due or low:
            full = st.cheap_since_full + 1 >= cfg.full_refresh_every
            # A low coverage means the sparse call's lse misses much of the mass: only a dense
            # step gives a map worth refitting on.
            if low or not cfg.cheap_refresh or (full and cfg.full_refresh == "dense"):
                st.cheap_since_full = 0
                return self._observed(ctx, st, q, k, "dense", "refresh-dense" if due else "refresh-dense-low")
            st.cheap_since_full = 0 if full else st.cheap_since_full + 1
            counts, indices = self._batch_lists(st, q.shape[0])
            st.observing = "full" if full else "cheap"
            _record(st.events, (step, "refresh-full" if full else "refresh-cheap"))
            return Plan(counts, indices, dense=False, observe=True)
        counts, indices = self._batch_lists(st, q.shape[0])
        return Plan(counts, indices, dense=False, observe=False)

    def _observed(self, ctx, st, q, k, kind, event) -> Plan:
        st.observing = kind
        _record(st.events, (ctx.step, event))
        # observations before the first mask are still the warm-up; later ones are refreshes
        return ctx.full_plan(q, k, observe=True, why="warm-up" if st.mask is None else "refresh")

    def _poll_coverage(self, st: ModState) -> bool:
        """True when a cheap refresh's coverage has reached the host and is below the bound. A NaN
        coverage (non-finite inputs) is recorded but asks for no dense refresh: a dense step would
        observe the same inputs."""
        flag = st.coverage_flag
        if flag is None or not flag.ready():
            return False
        st.coverage_flag = None
        value = flag.value()
        _record(st.observed_coverage, (st.fit_steps[-1] if st.fit_steps else -1, value))
        return value < self.config.min_observed_coverage

    def _poll_nonfinite(self, ctx: SiteContext, st: ModState) -> None:
        """Once the last observation's NaN flag has reached the host (never waits): record the
        step, and warn the first time per site. The map's NaN entries were not fitted
        (:func:`observe_tail`), so the predictor stays finite; the attention itself propagated
        the NaN as dense SDPA would."""
        flag = st.nonfinite_flag
        if flag is None or not flag.ready():
            return
        st.nonfinite_flag = None
        if not flag.value():
            return
        step = st.fit_steps[-1] if st.fit_steps else -1
        if not st.nonfinite_steps:
            log.warning("modcompile mod: %s saw NaN/Inf attention inputs at step %d; its output is NaN "
                        "there as in dense attention, and the mask predictor skipped those blocks "
                        "(kept their older values, or counted them dense)", ctx.info.key, step)
        _record(st.nonfinite_steps, step)
        _record(st.events, (step, "observe-nonfinite"))
        ctx.state.note = f"mod: NaN/Inf attention inputs at step(s) {st.nonfinite_steps[:5]}"

    def _batch_lists(self, st: ModState, batch: int):
        lists = st.lists.get(batch)
        if lists is None:
            counts, indices = st.head_lists
            lists = (counts.expand(batch, *counts.shape).contiguous(),
                     indices.expand(batch, *indices.shape).contiguous())
            st.lists[batch] = lists
        return lists

    # ------------------------------------------------------------------ observation
    def observe(self, ctx, q, k, lse, kv_counts, kv_indices, key_bias=None) -> None:
        st = ctx.state.policy_state
        if st is None or st.observing is None:
            return
        kind, st.observing = st.observing, None
        cfg = self.config
        scale = ctx.state.scale if ctx.state.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        fg = fit_geometry(st.geometry, cfg.ridge_lambda, q.device)
        # Row sampling at a fixed phase: the mask extrapolates the difference of two fits (times
        # (T+1)/2), and fits of the same rows keep sampling noise out of that difference.
        sampling = dict(block_size=cfg.block_size, threshold=cfg.threshold, scale=scale,
                        row_stride=cfg.observe_stride(), row_phase=0, key_bias=key_bias)
        cheap = kind == "cheap" and st.smap is not None
        if cheap:
            raw = observe_map(q, k, lse, kv_counts=kv_counts, kv_indices=kv_indices, **sampling)
        else:
            # Dense steps, and full refreshes: every block, from the sparse call's lse.
            raw = observe_map(q, k, lse, **sampling)
        st.nonfinite_flag = DeferredScalar(raw.isnan().any())
        if kind != "dense":
            # A sparse refresh ran the policy's own lists: the kept blocks are st.mask.
            st.coverage_flag = DeferredScalar(observed_coverage(
                q, k, lse, st.mask, cfg.block_size, scale, row_stride=cfg.observe_stride(),
                key_bias=key_bias).mean())
        build = ctx.step >= self.warmup_steps(ctx) - 1
        inputs = [raw]
        if cheap:
            inputs.append(st.smap)
        if build:
            inputs += self._extrapolation_inputs(st, ctx.step, raw.shape[1], fg)
        outputs = self.observe_tail(fg, raw.shape[0], raw.shape[1], cheap, build)(*inputs)
        st.smap, coef = outputs[0], outputs[1]
        st.fits = (st.fits + [(ctx.step, coef)])[-2:]
        _record(st.fit_steps, ctx.step)
        if build:
            st.mask, st.lines, st.keep_frame, st.predicted_coverage, counts, indices = outputs[2:]
            st.head_lists = (counts[0], indices[0])
            st.lists = {raw.shape[0]: (counts, indices)}

    def _extrapolation_inputs(self, st: ModState, step: int, heads: int, fg: FitGeometry) -> list:
        """``[coef_prev, steps]`` for :func:`observe_tail`: the last fit and, as a device tensor,
        (step gap, (T+1)/2); zeros and (1, 0) when there is no earlier fit to extrapolate from."""
        prev = st.fits[-1] if st.fits else None
        if prev is not None and prev[0] != step:
            coef_prev, steps = prev[1], (float(step - prev[0]), (self.config.refresh_interval + 1) / 2.0)
        else:
            coef_prev, steps = torch.zeros(heads, st.geometry.num_basis, device=fg.device), (1.0, 0.0)
        return [coef_prev, _device_scalars(steps, fg.device)]

    def observe_tail(self, fg: FitGeometry, batch: int, heads: int, cheap: bool, build: bool):
        """The observation's work after the map kernel, :func:`observe_tail` for these static
        shapes: on CUDA replayed from a CUDA graph after its first call (dozens of small kernels
        on (H, nb, nb) maps: launch-bound), shared by all sites and passes of one geometry and
        shape; eager elsewhere (CPU, ``MODCOMPILE_CUDA_GRAPHS=0``)."""
        fn = functools.partial(observe_tail, fg, self.config, batch, cheap, build)
        if not cuda_graphs.enabled(fg.device):
            return fn
        key = (fg.geom, fg.device, batch, heads, cheap, build)
        call = self._tails.get(key)
        if call is None:
            if len(self._tails) >= _MAX_GRAPHS:
                self._tails.pop(next(iter(self._tails)))
            call = self._tails[key] = cuda_graphs.GraphedCall(
                fn, name=f"the mod observation tail ({'cheap' if cheap else 'dense'}, nb {fg.geom.nb})")
        return call

def observe_tail(fg: FitGeometry, config, batch: int, cheap: bool, build: bool, raw: torch.Tensor, *rest):
    """Everything an observation does after its map kernel, on device, as a pure function of its
    tensor inputs (static shapes, no host sync, no state): replayable from a CUDA graph.

    ``raw`` (B, H, nb, nb) is the observed map. Cheap (``rest`` starts with the old map): entries
    the restricted map did not compute (``NOT_OBSERVED``) keep the old map's values. NaN entries
    (tiles with NaN probabilities: non-finite inputs) are never fitted: they keep the old map's
    value in a cheap refresh and count as dense (sparsity 0: kept) otherwise, so one bad input
    does not make the predictor NaN for the rest of the run. The map is fitted; with
    ``build`` (``rest`` ends with the previous coefficients and the (step gap, (T+1)/2) device
    tensor of :meth:`ModPolicy._extrapolation_inputs`) the coefficients are extrapolated as
    :func:`extrapolate` does, the mask predicted and its block lists built for ``batch``.
    Returns ``(smap, coef)`` or ``(smap, coef, mask, lines, keep_frame, predicted_coverage,
    counts (batch, H, nb), indices (batch, H, nb, nb))``."""
    rest = list(rest)
    if cheap:
        # The policy's lists are the same for every batch entry: unobserved entries are -1 in all.
        fresh = raw.mean(0) if raw.shape[0] > 1 else raw[0]
        smap = torch.where(fresh.isnan() | (fresh < 0), rest.pop(0), fresh)
    else:
        smap = raw.mean(0).nan_to_num(nan=0.0)
    coef = fg.solve(smap)
    if not build:
        return smap, coef
    coef_prev, steps = rest
    slope = (coef - coef_prev) / steps[0]
    mask, lines, keep_frame, coverage = predict_mask(coef + slope * steps[1], fg, config, smap)
    counts, indices = lists_from_mask(mask)
    H, nb = counts.shape
    return (smap, coef, mask, lines, keep_frame, coverage,
            counts.expand(batch, H, nb).contiguous(), indices.expand(batch, H, nb, nb).contiguous())


def _device_scalars(values, device: torch.device) -> torch.Tensor:
    """A small float32 tensor on ``device`` from host numbers, without a host sync on CUDA (a
    pageable host-to-device copy would wait for the stream: pinned memory, non-blocking)."""
    t = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# Elements of the (B, heads, rows, nb) intermediates of observed_coverage per chunk of heads.
_COVERAGE_CHUNK = 1 << 25


def observed_coverage(q, k, lse, kept, block_size: int, scale: float, row_stride: int = 1,
                      key_bias=None) -> torch.Tensor:
    """Per (batch, head): estimated fraction of the dense attention mass that a sparse call kept,
    mean over the query rows of :func:`..kernels.block_sparsity.sampled_rows` (every
    ``row_stride``-th row of each block, phase 0: those the observation samples), (B, H) float.
    ``kept`` is the call's block mask, (B, H, nb, nb) or (H, nb, nb).

    A skipped block b holds about ``|b| * exp(q . mean(k_b) * scale)`` unnormalised mass (a lower
    bound, by Jensen); relative to the kept mass ``exp(lse)`` the row keeps ``1 / (1 + missing)``.
    The estimate errs high (coverage overestimated), so a value under the bound is a real drop.
    With ``key_bias`` (B, Nk) only visible keys count: ``|b|``, the mean key and the mean bias are
    over them (Jensen again), and a block of hidden keys misses nothing.
    Cost: one pass over k (block means) and a (rows x nb) product per head, in a few batched ops
    (chunked over heads to bound memory)."""
    B, H, N, _ = q.shape
    if key_bias is None:
        sizes = block_token_counts(k.shape[2], block_size, k.device).unsqueeze(-1)   # (nbk, 1)
        pooled = block_means(k, block_size)                                    # (B, H, nbk, D)
    else:
        pooled, bias, sizes = masked_block_means(k, key_bias, block_size)
        bias, hidden, sizes = bias[:, None, None, :], (sizes == 0)[:, None, None, :], sizes[:, None, :, None]
    rows, row_blocks = _coverage_rows(N, block_size, row_stride, q.device)
    qs = q.index_select(2, rows)
    ls = lse.index_select(2, rows).float().unsqueeze(-1)
    if kept.dim() == 3:
        kept = kept.unsqueeze(0)
    heads = max(1, _COVERAGE_CHUNK // max(1, B * rows.numel() * pooled.shape[2]))
    out = []
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        s = torch.matmul(qs[:, h0:h1].float(), pooled[:, h0:h1].transpose(-1, -2))   # (B, h, R, nbk)
        s.mul_(scale)
        if key_bias is not None:
            s.add_(bias)
        mass = s.sub_(ls[:, h0:h1]).exp_()
        if key_bias is not None:
            mass.masked_fill_(hidden, 0.0)                                      # even where lse is -inf
        mass.masked_fill_(kept[:, h0:h1].index_select(2, row_blocks), 0.0)      # kept blocks: not missing
        missing = torch.matmul(mass, sizes)[..., 0]                             # (B, h, R)
        out.append(missing.add_(1.0).reciprocal_().mean(-1))
    return torch.cat(out, 1) if len(out) > 1 else out[0]


@functools.lru_cache(maxsize=64)
def _coverage_rows(n: int, block_size: int, row_stride: int, device: torch.device):
    """The sampled rows and their query blocks, built on the host (the selection is a boolean
    index: a sync on a GPU) and copied without waiting; cached."""
    from ..kernels.block_sparsity import sampled_rows
    rows = sampled_rows(n, block_size, row_stride, 0)
    both = torch.stack([rows, rows // block_size])
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    else:
        both = both.to(device)
    return both[0], both[1]


def extrapolate(fits: list, interval: int) -> torch.Tensor:
    """Coefficients at the middle of the coming interval, linear in the step from the last two fits."""
    step2, coef2 = fits[-1]
    if len(fits) < 2 or fits[-2][0] == step2:
        return coef2
    step1, coef1 = fits[-2]
    slope = (coef2 - coef1) / float(step2 - step1)
    return coef2 + slope * ((interval + 1) / 2.0)


def predict_mask(coef: torch.Tensor, fg: FitGeometry, config, observed: torch.Tensor | None = None):
    """The kept blocks (H, nb, nb) bool from coefficients (H, P), plus per head the lines kept,
    whether the frame diagonal is kept and the predicted kept mass fraction. All on device.

    With ``observed`` (the last observed map, (H, nb, nb), history merged) and
    ``config.mask_rule == "blocks"``, the line selection only sets each head's block budget; the
    blocks themselves are the densest of the observed map, which keeps the block detail that lines
    average away. (Moving the map by the lines' extrapolated drift was tried: its masks were further
    from the oracle's on the synthetic benchmark.)"""
    geom = fg.geom
    nb, nd, n_lines = geom.nb, geom.num_diagonals, geom.num_lines
    H = coef.shape[0]
    dev = coef.device
    w = (1.0 - fg.reconstruct(coef).clamp(0.0, 1.0))              # predicted mass proxy
    # Rank lines, densest first; a block's rank is that of its densest line.
    order = fg.line_means(w).argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_lines, device=dev).expand(H, -1))
    rank_diag = rank[:, :nd].gather(1, fg.diag_index.reshape(1, -1).expand(H, -1)).view(H, nb, nb)
    block_rank = torch.minimum(rank_diag, rank[:, nd:].unsqueeze(1))

    eye = torch.eye(nb, dtype=torch.bool, device=dev)
    text = fg.text_blocks
    forced = (eye | text[None, :] | text[:, None]).expand(H, nb, nb)
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
    if observed is not None and config.mask_rule == "blocks":
        w = 1.0 - observed.clamp(0.0, 1.0)
        total = w.sum((-2, -1))
        budget = mask.sum((-2, -1))
        score = (w + 2.0 * forced.float()).reshape(H, -1)          # forced blocks first
        order = score.argsort(-1, descending=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(nb * nb, device=dev).expand(H, -1))
        mask = (ranks < budget.view(H, 1)).view(H, nb, nb)
    mask = bound_rows(mask, w, forced, text, config.min_density, config.max_density)
    coverage = (w * mask).sum((-2, -1)) / total.clamp_min(1e-12)
    return mask, lines, keep_frame, coverage


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


def summary() -> list[dict]:
    """Per (site, pass) with the mod policy: schedule events, fits, lines per head, predicted and
    observed coverage, mask density (host copies: call outside the loop)."""
    from ..runtime import REGISTRY
    rows = []
    for (key, pass_index), state in sorted(REGISTRY.states.items()):
        if isinstance(state.policy_state, ModState):
            rows.append({"site": key, "pass": pass_index, **state.policy_state.summary()})
    return rows


__all__ = ["ModPolicy", "ModState", "predict_mask", "extrapolate", "lists_from_mask", "observe_map",
           "observe_tail", "observed_coverage", "summary", "FRAME_KEEP"]
