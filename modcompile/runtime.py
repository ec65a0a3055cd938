"""Run-time state of the rewritten attention sites: the step tracker and the per-site registry.

The compiled graph never branches on the denoising step; the custom ops (modcompile/ops.py) read and
update this state instead, so a new step never recompiles. State is keyed by the site's stable key
and by the pass index within a step (classifier-free guidance calls the model twice per step, and
each pass keeps its own masks and predictor).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .config import SparsityConfig

log = logging.getLogger("modcompile")

DEFAULT_NUM_STEPS = 50


@dataclass
class SiteInfo:
    """What the compiler pass learnt about one SDPA call site (static across steps)."""

    key: str
    layer: int                      # attention layer index: order of registration within its scope
    module_path: str
    config: SparsityConfig
    status: str                     # "sparse" (rewritten) or "dense" (left as SDPA)
    reason: str = ""                # why a site stayed dense
    seq_len: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    dtype: str | None = None
    grid: tuple | None = None       # latent (T, H, W) of the video tokens, when known
    text_tokens: int = 0            # joint-attention text tokens (the rest of the sequence)
    training: bool = False          # q/k/v require grad: every call keeps a valid lse for backward


@dataclass
class SiteState:
    """Mutable state of one (site, pass): what the policy remembers and what it used last."""

    info: SiteInfo
    pass_index: int
    policy_state: Any = None
    kv_counts: torch.Tensor | None = None
    kv_indices: torch.Tensor | None = None
    dense_now: bool = True          # this step's attention runs dense
    observe_now: bool = False       # the observe node must run this step
    steps_seen: int = 0
    last_step: int = -1
    scale: float | None = None      # softmax scale of the last attention call (observe has none)
    context: Any = None             # the policy's SiteContext of the last plan (read by observe)
    geometry: tuple | None = None   # (seq_len, grid) of the last call: policy state is per geometry
    note: str = ""                  # the policy's word on this site (e.g. why it planned dense), shown by report()

    @property
    def density(self):
        """Block density of the last call's lists (1.0 for dense plans; a 0-dim device tensor
        otherwise, read by report()). Computed on read: the plan op would pay two launches per call."""
        if self.kv_counts is None:
            return None
        if self.dense_now:
            return 1.0
        return self.kv_counts.sum(dtype=torch.float32) / (self.kv_counts.numel() * self.kv_indices.shape[-1])


class StepTracker:
    """The current denoising step, from timestep graph inputs or the explicit context manager."""

    def __init__(self):
        self.step = -1                  # -1: no step metadata seen in this generation
        self.num_steps: int | None = None
        self.last_timestep: float | None = None
        self.generation = 0
        self.explicit = False           # inside denoising_step(): timestep inputs are ignored

    def on_timestep(self, t: float) -> bool:
        """Advance from a timestep value; returns True when a new generation starts."""
        if self.explicit:
            return False
        last = self.last_timestep
        self.last_timestep = t
        if last is None or t > last:
            self.step = 0
            return True
        if t < last:
            self.step += 1
        return False                    # equal: another pass (e.g. CFG) of the same step

    def set_explicit(self, step: int, num_steps: int | None) -> bool:
        new_generation = step < self.step or (step == 0 and self.step != 0)
        self.step, self.num_steps, self.explicit = step, num_steps, True
        return new_generation


class Registry:
    def __init__(self):
        self.sites: dict[str, SiteInfo] = {}
        self.states: dict[tuple[str, int], SiteState] = {}
        self.tracker = StepTracker()
        self._visits: dict[str, tuple[int, int]] = {}  # site -> (step, calls in that step)
        self._last_grid: dict[str, tuple] = {}  # scope -> grid of the last call that knew it

    # --- sites ---
    def register_site(self, info: SiteInfo) -> SiteInfo:
        """Add a site, keeping the layer index of an earlier registration (recompiles)."""
        old = self.sites.get(info.key)
        if old is not None:
            info.layer = old.layer
        else:
            info.layer = sum(1 for s in self.sites.values() if scope_of(s.key) == scope_of(info.key))
        self.sites[info.key] = info
        return info

    # --- steps ---
    def on_timestep(self, t: float) -> None:
        if self.tracker.on_timestep(t):
            self._new_generation()

    def set_step(self, step: int, num_steps: int | None) -> None:
        if self.tracker.set_explicit(step, num_steps):
            self._new_generation()

    def _new_generation(self) -> None:
        self.tracker.generation += 1
        self.states.clear()
        self._visits.clear()
        log.debug("modcompile: new generation %d, per-site state reset", self.tracker.generation)

    def enter_site(self, key: str) -> SiteState:
        """Called by the plan node: the state of this site for the current call.

        Without step metadata every call of a site counts as a new step. With it, repeated calls
        in one step are passes (CFG) with separate state."""
        info = self.sites[key]
        tracked = self.tracker.step >= 0
        step, calls = self._visits.get(key, (-1, 0))
        if tracked:
            if step != self.tracker.step:
                step, calls = self.tracker.step, 0
            pass_index = calls
            calls += 1
        else:
            step, calls, pass_index = step + 1, 0, 0
        self._visits[key] = (step, calls)
        state = self.states.get((key, pass_index))
        if state is None:
            state = self.states[(key, pass_index)] = SiteState(info=info, pass_index=pass_index)
        if state.last_step != step:
            state.steps_seen += 1
        state.last_step = step
        return state

    def call_info(self, state: SiteState, seq_len: int, grid: tuple) -> SiteInfo:
        """The site's info for this call's geometry. A site's graphs can differ in shape (one
        compiled graph per resolution, or one dynamic graph): the plan node passes the grid of its
        own input, and -1s where its graph cannot see the patch embedding (after a graph break),
        which then takes the grid of the scope's last call. Policy state from another geometry is
        dropped."""
        info, scope = state.info, scope_of(state.info.key)
        grid = tuple(int(g) for g in grid)
        if min(grid) > 0:
            self._last_grid[scope] = grid
        else:
            grid = self._last_grid.get(scope)
        text = None if grid is None else seq_len - grid[0] * grid[1] * grid[2]
        if text is None or not 0 <= text < seq_len:
            grid, text = None, 0
        if (info.seq_len, info.grid, info.text_tokens) != (seq_len, grid, text):
            info = dataclasses.replace(info, seq_len=seq_len, grid=grid, text_tokens=text)
        if state.geometry != (seq_len, grid):
            if state.geometry is not None:
                state.policy_state, state.kv_counts, state.kv_indices = None, None, None
            state.geometry = (seq_len, grid)
        return info

    def current(self, key: str) -> SiteState:
        """The state that the last plan node of this site selected (for attention/observe nodes)."""
        step, calls = self._visits[key]
        pass_index = max(calls - 1, 0) if self.tracker.step >= 0 else 0
        return self.states[(key, pass_index)]

    def num_steps(self, config: SparsityConfig) -> int:
        return self.tracker.num_steps or config.num_steps or DEFAULT_NUM_STEPS

    def reset(self, forget_sites: bool = False) -> None:
        self.states.clear()
        self._visits.clear()
        self.tracker = StepTracker()
        if forget_sites:
            self.sites.clear()
            self._last_grid.clear()


def scope_of(key: str) -> str:
    """Site keys are ``scope/module.path#ordinal``; the scope separates differently configured
    compilations of the same model in one process."""
    return key.split("/", 1)[0]


REGISTRY = Registry()


def reset(forget_sites: bool = False) -> None:
    """Forget all per-site state (masks, predictors, step counters): the next call starts a new
    generation. ``forget_sites`` also drops what the compiler recorded (for tests)."""
    REGISTRY.reset(forget_sites)


@contextlib.contextmanager
def denoising_step(step: int, num_steps: int | None = None):
    """Explicit step metadata for custom loops: ``with denoising_step(i, n): model(x, ...)``.

    Inside it, timestep graph inputs are not read (no host sync). Step 0 or a step lower than the
    previous one starts a new generation; calls repeated with the same step are passes (CFG)."""
    if step < 0 or (num_steps is not None and not 0 <= step < num_steps):
        raise ValueError(f"denoising_step: need 0 <= step < num_steps, got step={step}, num_steps={num_steps}")
    tracker = REGISTRY.tracker
    previous_explicit = tracker.explicit
    REGISTRY.set_step(step, num_steps)
    try:
        yield
    finally:
        REGISTRY.tracker.explicit = previous_explicit
