"""The ``mod`` policy (MOD-DiT, arXiv 2601.11641): fitted mixture-of-lines masks, the default.

Per (site, CFG pass) the policy keeps the blocks' attention mass (nb x nb, batch mean, per head) and
the current block lists. The default mask rule keeps the densest blocks by observed mass, and its
observations compute that map alone. The ``blocks`` and ``lines`` rules also keep the block sparsity
map ``S`` (from the same observation pass) and the last two ridge fits of ``S`` onto the line basis
(:mod:`.mod_fit`), whose lines make their masks (:mod:`.mod_mask`).

Schedule (``ctx.step`` of ``ctx.num_steps``; W warm-up steps, T = ``refresh_interval``):

* steps < W: dense; the last two (W-2, W-1) observe (and fit ``S``); after the observation of W-1
  the mask is built;
* steps W, W+1, ...: sparse with the current lists (``plan`` returns stored tensors: no work, no
  host sync);
* refreshes (:func:`refresh_due`): ``refresh_schedule="fixed"`` (default, the paper) at steps
  W + m*T (m >= 1); ``"doubling"`` at steps W + 1, W + 2, W + 4, W + 8, ..., the gap doubling up
  to T and then staying T. ``cheap_refresh=False`` (the paper): a refresh is a dense observed step.
  ``cheap_refresh=True``: the sparse kernel runs with the current lists and observes only the
  computed blocks; skipped blocks keep their older values (the paper's history rule). Every
  ``full_refresh_every``-th refresh observes every block instead, so that no value grows stale:
  ``full_refresh="sparse"`` (default) on the same sparse step, the map of all blocks from the
  sparse call's lse; ``"dense"`` on a dense step (exact lse, at the price of a dense attention).
  The sparse call's lse misses the skipped blocks' mass, so a row's probabilities come out too
  large by 1 / (its kept share): at a kept share of 0.8 the threshold moves by ln(1.25) = 0.22 in
  log space, small against the orders of magnitude a threshold of 1e-4 separates (the coverage
  guard bounds the mean share where it sees it, below; BENCHMARKS.md has the measured errors). A full refresh's mass map
  is divided by its rows' sums, which puts it back on the dense scale
  (:func:`.mod_observe.rescale_full_refresh`).
* the observed coverage of a sparse refresh, the kept share of the attention mass: measured by a
  full refresh (the kept blocks' part of its map), estimated by a cheap one
  (:func:`.mod_observe.observed_coverage`, from mean-pooled keys of the skipped blocks: a lower bound
  on the missing mass that on trained models sees little of it, BENCHMARKS.md section 8); the mean
  over query blocks, heads and batch is computed on device and copied to
  pinned host memory without waiting. Later plans poll the copy's CUDA event (never wait); once it
  has landed and is below ``min_observed_coverage`` the next step is a dense refresh. On CPU the
  value is ready at once, so the dense refresh is the step after.

The observation (map kernel, fit, mask) is :mod:`.mod_observe` and :mod:`.mod_mask`; this module
holds the schedule and the per-site state.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch

from .. import cuda_graphs
from .base import Plan, Policy, SiteContext, register_policy
from .mod_fit import FitGeometry, Geometry, fit_geometry
from .mod_mask import uses_count_map
from .mod_observe import device_scalars, observe_map, observe_tail, observed_coverage, rescale_full_refresh

log = logging.getLogger("modcompile")

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
    smap: torch.Tensor | None = None               # (H, nb, nb) observed map, history merged (rules that fit it)
    mmap: torch.Tensor | None = None               # (H, nb, nb) observed attention mass, history merged
    fits: list = field(default_factory=list)       # last two (step, coef (H, P)) (rules that fit the map)
    mask: torch.Tensor | None = None               # (H, nb, nb) bool, current kept blocks
    head_lists: tuple | None = None                # (counts (H, nb), indices (H, nb, nb)) int32
    lists: dict = field(default_factory=dict)      # batch -> contiguous (B, H, ...) lists of the current mask
    list_buffers: dict = field(default_factory=dict)  # batch -> where those are written at each refresh: made
                                                      # once, so the lists keep their addresses (ops.graph_lists)
    lines: torch.Tensor | None = None              # (H,) lines kept per head (-1: the mass rule)
    keep_frame: torch.Tensor | None = None         # (H,) bool
    predicted_coverage: torch.Tensor | None = None  # (H,) predicted kept mass fraction
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
            if bool((self.lines >= 0).all()):  # the mass rule ranks blocks, not lines: -1
                out["lines"] = self.lines.tolist()
                out["keep_frame"] = self.keep_frame.tolist()
            out["predicted_coverage"] = self.predicted_coverage.tolist()
            out["density"] = float(self.mask.float().mean())
        return out



def refresh_due(offset: int, interval: int, schedule: str) -> bool:
    """Whether the sparse step ``offset`` steps after the warm-up refreshes the mask: every
    ``interval`` steps (``"fixed"``), or at offsets 1, 2, 4, 8, ... whose gap doubles up to
    ``interval`` and then stays (``"doubling"``: 1, 2, 4, 8, 16, 26, 36, ... for 10)."""
    if offset < 1:
        return False
    if schedule == "fixed":
        return offset % interval == 0
    at = 1
    while at < offset:
        at += min(at, interval)
    return at == offset


def refresh_gap(offset: int, interval: int, schedule: str) -> int:
    """Steps from the observation at ``offset`` (after the warm-up; <= 0: the warm-up's own) until
    the next scheduled refresh, where its mask stops being used (``"fixed"``: ``interval``)."""
    if schedule == "fixed":
        return interval
    return 1 - offset if offset < 1 else min(offset, interval)


# Entries kept of each ModState history list (events, fits, coverage): a run without generations
# (diffusion forcing's long videos, a loop without step metadata) must not grow them without bound.
HISTORY = 256


def _record(history: list, item) -> None:
    history.append(item)
    if len(history) > HISTORY:
        del history[: len(history) - HISTORY]



@register_policy
class ModPolicy(Policy):
    name = "mod"
    observes = True

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
        if step < warmup:
            if step >= warmup - 2:
                return self._observed(ctx, st, q, k, "dense", "observe-dense")
            return ctx.full_plan(q, k, why="warm-up")
        if st.mask is None:  # no fit yet (no warm-up observation): bootstrap with a dense one
            return self._observed(ctx, st, q, k, "dense", "observe-dense")
        low = self._poll_coverage(st)
        due = refresh_due(step - warmup, cfg.refresh_interval, cfg.refresh_schedule)
        if due or low:
            full = st.cheap_since_full + 1 >= cfg.full_refresh_every
            # A low coverage means the sparse call's lse misses much of the mass: only a dense
            # step gives a map worth refitting on.
            if low or not cfg.cheap_refresh or (full and cfg.full_refresh == "dense"):
                st.cheap_since_full = 0
                return self._observed(ctx, st, q, k, "dense", "refresh-dense" if due else "refresh-dense-low")
            st.cheap_since_full = 0 if full else st.cheap_since_full + 1
            _record(st.events, (step, "refresh-full" if full else "refresh-cheap"))
            return Plan(ctx.lists(*self._batch_lists(ctx, st, q.shape[0]), q, k), dense=False, observe=True,
                        data="full" if full else "cheap")
        return Plan(ctx.lists(*self._batch_lists(ctx, st, q.shape[0]), q, k), dense=False, observe=False)

    def _observed(self, ctx, st, q, k, kind, event) -> Plan:
        """An observed call: ``data`` tells observe the kind ("dense" / "cheap" / "full")."""
        _record(st.events, (ctx.step, event))
        # observations before the first mask are still the warm-up; later ones are refreshes
        return ctx.full_plan(q, k, observe=True, why="warm-up" if st.mask is None else "refresh", data=kind)

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

    def _batch_lists(self, ctx: SiteContext, st: ModState, batch: int):
        lists = st.lists.get(batch)
        if lists is None:
            ctx.state.lists_rewritten()
            counts, indices = st.head_lists
            lists = st.list_buffers.get(batch)
            if lists is None:
                lists = st.list_buffers[batch] = (counts.new_empty(batch, *counts.shape),
                                                  indices.new_empty(batch, *indices.shape))
            lists[0].copy_(counts.expand_as(lists[0]))
            lists[1].copy_(indices.expand_as(lists[1]))
            st.lists[batch] = lists
        return lists

    # ------------------------------------------------------------------ observation
    def observe(self, ctx, q, k, lse, plan: Plan, key_bias=None) -> None:
        st, kind = ctx.state.policy_state, plan.data if plan.observe else None
        if st is None or kind is None:
            return
        cfg = self.config
        scale = ctx.info.scale if ctx.info.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        fg = fit_geometry(st.geometry, cfg.ridge_lambda, q.device)
        # Row sampling at a fixed phase: the mask extrapolates the difference of two fits (times
        # (T+1)/2), and fits of the same rows keep sampling noise out of that difference.
        counted = uses_count_map(cfg)   # the default mass rule observes the mass map alone
        sampling = dict(block_size=cfg.block_size, threshold=cfg.threshold, scale=scale,
                        row_stride=cfg.observe_row_stride, row_phase=0, key_bias=key_bias, with_mass=True,
                        with_count=counted)
        cheap = kind == "cheap" and st.mmap is not None
        if cheap:
            raw, raw_mass = observe_map(q, k, lse, kv_counts=plan.lists.counts, kv_indices=plan.lists.indices,
                                        **sampling)
        else:
            # Dense steps, and full refreshes: every block, from the sparse call's lse.
            raw, raw_mass = observe_map(q, k, lse, **sampling)
        st.nonfinite_flag = DeferredScalar((raw if counted else raw_mass).isnan().any())
        if kind != "dense":
            # A sparse refresh ran the policy's own lists: the kept blocks are st.mask.
            if cheap:
                # Only the kept blocks were mapped: the skipped ones' mass is estimated from pooled keys
                # (a lower bound, so the share errs high). 8 rows per block are plenty for a mean.
                coverage = observed_coverage(q, k, lse, st.mask, cfg.block_size, scale,
                                             row_stride=max(1, cfg.block_size // 8), key_bias=key_bias)
            else:
                # Every block was mapped: the kept share is measured, not estimated.
                raw_mass, coverage = rescale_full_refresh(raw_mass, st.mask)
            st.coverage_flag = DeferredScalar(coverage.mean())
        build = ctx.step >= self.warmup_steps(ctx) - 1
        B, H = raw_mass.shape[:2]
        inputs = [raw, raw_mass] if counted else [raw_mass]
        if cheap:
            inputs += [st.smap, st.mmap] if counted else [st.mmap]
        if build and counted:
            inputs += self._extrapolation_inputs(ctx, st, ctx.step, H, fg)
        outputs = self.observe_tail(fg, B, H, cheap, build)(*inputs)
        if counted:
            st.smap, st.mmap, coef = outputs[:3]
            st.fits = (st.fits + [(ctx.step, coef)])[-2:]
        else:
            st.mmap = outputs[0]
        _record(st.fit_steps, ctx.step)
        if build:
            st.mask, st.lines, st.keep_frame, st.predicted_coverage, counts, indices = outputs[3 if counted else 1:]
            st.head_lists = (counts[0], indices[0])
            st.lists = {}  # written into st.list_buffers by the next plan

    def _extrapolation_inputs(self, ctx, st: ModState, step: int, heads: int, fg: FitGeometry) -> list:
        """``[coef_prev, steps]`` for :func:`observe_tail`: the last fit and, as a device tensor,
        (step gap, (g+1)/2), the middle of the g steps until the next refresh; zeros and (1, 0) when
        there is no earlier fit to extrapolate from."""
        prev = st.fits[-1] if st.fits else None
        if prev is not None and prev[0] != step:
            gap = refresh_gap(step - self.warmup_steps(ctx), self.config.refresh_interval,
                              self.config.refresh_schedule)
            coef_prev, steps = prev[1], (float(step - prev[0]), (gap + 1) / 2.0)
        else:
            coef_prev, steps = torch.zeros(heads, st.geometry.num_basis, device=fg.device), (1.0, 0.0)
        return [coef_prev, device_scalars(steps, fg.device)]

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


def summary() -> list[dict]:
    """Per (site, pass) with the mod policy: schedule events, fits, lines per head and the frame
    diagonal (rules ``blocks`` and ``lines``), predicted and observed coverage, mask density (host
    copies: call outside the loop)."""
    from ..runtime import REGISTRY
    rows = []
    for (key, pass_index), state in sorted(REGISTRY.states.items()):
        if isinstance(state.policy_state, ModState):
            rows.append({"site": key, "pass": pass_index, **state.policy_state.summary()})
    return rows


__all__ = ["ModPolicy", "ModState", "refresh_due", "refresh_gap", "summary"]
