"""Run-time state of the rewritten attention sites: the registry of sites, models and their state.

The compiled graph never branches on the denoising step; the custom ops (modcompile/ops.py) read and
update this state instead, so a new step never recompiles. State is keyed by the site's stable key
and by the pass index within a step (classifier-free guidance calls the model twice per step, and
each pass keeps its own masks and predictor).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref

import torch

from .config import SparsityConfig
from .layout import frame_layout, model_layout
from .owners import find_owner, layer_index, pipeline_loop, site_path
from .passes.video_grid import text_tokens_for
from .sites import SiteInfo, SiteState
from .steps import StepTracker, timestep_value

log = logging.getLogger("modcompile")

DEFAULT_NUM_STEPS = 50


class ModelRun:
    """Run-time state of one model instance: its step tracker, last video grid and the state of
    every site instance (layer) in it."""

    def __init__(self, name: str, model=None):
        self.name = name
        self.model_ref = None if model is None else weakref.ref(model)
        self.tracker = StepTracker()
        self.states: dict[tuple[str, int], SiteState] = {}
        self.visits: dict[str, tuple[int, int]] = {}  # instance key -> (step, calls in that step)
        self.last_grid: tuple | None = None
        self.layout = None              # the layout of the last forward (modcompile/layout.py), from the hook
        self.warned: set = set()        # layout warnings already logged for this model
        self.graph_steps = False        # a compiled graph reads this model's timestep
        self.compiled = False           # called through torch.compile (whole model; every module it runs
                                        # is compiled, also where Dynamo falls back to eager for its forward)
        self.hooked = False             # a forward pre-hook reads its inputs (layout; timestep when no graph does)

    def new_generation(self) -> None:
        self.tracker.generation += 1
        self.states.clear()
        self.visits.clear()
        log.debug("modcompile: %s: new generation %d, per-site state reset", self.name, self.tracker.generation)

    def on_timestep(self, t, dtype: torch.dtype | None = None) -> None:
        schedule, index = pipeline_loop()
        if self.tracker.on_timestep(t, schedule, dtype, index):
            self.new_generation()


class Registry:
    """All run-time state: the sites the compiler found (``specs``, static, kept as long as their
    compiled graphs may run), the site instances that ran (``sites``, for report()) and one
    :class:`ModelRun` per model instance."""

    def __init__(self):
        self.specs: dict[str, SiteInfo] = {}
        self.sites: dict[str, SiteInfo] = {}        # instance key -> info (true module path, layer)
        self.runs: dict[int, ModelRun] = {}         # id(model) -> its run
        self.free_run = ModelRun("<no model>")      # calls outside any nn.Module
        self._instances: dict[tuple[str, int], tuple] = {}  # (spec, anchor address) -> (run, info)
        self._current: dict[str, tuple] = {}        # spec -> (run, state) of its last plan
        self.explicit: tuple | None = None          # (step, num_steps) inside denoising_step()
        self.dense: dict[str, tuple] = {}           # dense spec -> (frame module class, call paths, compiled only,
                                                    # the frame's attribute name or None: place_dense)

    # --- compile time ---
    def register_site(self, info: SiteInfo) -> SiteInfo:
        """Add a site the compiler found (again on recompiles: the layer index is kept)."""
        old = self.specs.get(info.key)
        info.layer = old.layer if old is not None else sum(
            1 for s in self.specs.values() if scope_of(s.key) == scope_of(info.key))
        self.specs[info.key] = info
        if not any(i.spec_key == info.key for i in self.sites.values() if i is not info):
            self.sites[info.key] = info                   # listed until an instance of it runs
        return info

    def place_dense(self, spec: SiteInfo, frame: tuple | None, calls: list | None = None) -> None:
        """Note, at compile time, which modules run a site left dense: no op of ours runs for it,
        so its instances cannot name themselves at run time as rewritten sites do (``_resolve``).
        ``frame``: :func:`compiled_frame` of the site's anchor; ``calls``: a nested region's call
        paths below the frame. :meth:`dense_rows` turns this into rows."""
        if frame is None:
            return
        owner, frame = frame
        if calls:                       # ``frame`` is the region's first call; the calls sit below the frame module
            if not (frame == calls[0] or frame.endswith("." + calls[0])):
                return
            frame, rel = frame[: len(frame) - len(calls[0])].rstrip("."), list(calls)
        else:
            rel = [""]
        module = owner.model.get_submodule(frame) if frame else owner.model
        # a module inside the model runs this code when it is compiled too (regional compile). A frame
        # that Dynamo compiled on its own (an attention processor resumed after a graph break) is run
        # by the modules of its class under the same name only: Wan-Animate-2's self- and
        # cross-attention are one class with two processors
        attr = _attribute(frame) if frame and not calls and not _runs_compiled(frame, module) else None
        self.dense[spec.key] = (type(module), rel, bool(frame), attr)
        self.run_of(owner)              # the model is known (report() lists its rows)

    def dense_rows(self) -> None:
        """Per-layer rows of the dense sites in every known model, named as whole-model compile
        names them: under each module that runs the site's compiled code (the model itself, a
        regionally compiled module of the frame's class, a nested region's calls), the site's
        path below it. Runs in report(), off the hot path; a site no model shows keeps its key."""
        for key, (cls, rel, compiled_only, attr) in self.dense.items():
            spec, placed = self.specs[key], False
            for run in list(self.runs.values()):
                model = run.model_ref() if run.model_ref is not None else None
                if model is None:
                    continue
                grid, text = spec.grid, spec.text_tokens
                # a compiled block sees no patch embedding: the run's grid (not for a flex call, whose
                # sequence is the model's own packing: Wan-Animate-2 pads it to its mask's blocks)
                if grid is None and spec.seq_len and "#flex" not in key:
                    seen = run.last_grid or (run.layout.grid if run.layout is not None else None)
                    seen_text = text_tokens_for(spec.seq_len, seen)
                    if seen_text is not None:
                        grid, text = seen, seen_text
                compiled = {name for name, module in model.named_modules() if _runs_compiled(name, module)}
                for name, module in model.named_modules():
                    if type(module) is not cls or (compiled_only and not run.compiled
                                                   and not _below_compiled(name, compiled)):
                        continue
                    if attr is not None and _attribute(name) != attr:
                        continue
                    for prefix in rel:
                        path = ".".join(p for p in (name, prefix, spec.module_rel) if p)
                        row = f"{run.name}/{path}#{spec.key.rsplit('#', 1)[1]}"    # the ordinal (flex: "flex0")
                        if row not in self.sites:
                            layer = layer_index(path)
                            self.sites[row] = dataclasses.replace(
                                spec, key=row, module_path=path, layer=spec.layer if layer is None else layer,
                                model=run.name, spec_key=key, grid=grid, text_tokens=text)
                        placed = True
            if placed:
                self.sites.pop(key, None)

    # --- models ---
    def run_of(self, owner) -> ModelRun:
        model = owner.model
        if model is None:
            return self.free_run
        run = self.runs.get(id(model))
        if run is None or run.model_ref() is not model:
            self.forget_dead_models()   # its address may be a collected model's: never inherit its state
            taken = {r.name for r in self.runs.values()}
            index = next(i for i in range(len(taken) + 1) if f"{type(model).__name__}#{i}" not in taken)
            run = self.runs[id(model)] = ModelRun(f"{type(model).__name__}#{index}", model)
        run.compiled = run.compiled or owner.compiled
        return run

    def forget_dead_models(self) -> None:
        """Drop the runs, site rows and cached instances of models that were garbage collected (a
        notebook that builds its pipeline again): report() lists the models that exist, and a new
        model may take a freed name. Runs when a new model is seen, in report() and in reset() (which
        frees a collected model's policy state at once), never per call."""
        dead = {key: run for key, run in self.runs.items() if run.model_ref is not None and run.model_ref() is None}
        if not dead:
            return
        runs, names = list(dead.values()), {run.name for run in dead.values()}
        for key in dead:
            del self.runs[key]
        self.sites = {k: i for k, i in self.sites.items() if i.model not in names}
        self._instances = {k: v for k, v in self._instances.items() if v[0] not in runs}
        self._current = {k: v for k, v in self._current.items() if v[0] not in runs}

    def on_timestep(self, t, run: ModelRun | None = None, dtype: torch.dtype | None = None) -> None:
        """A compiled graph read a timestep input (of ``dtype``); ``run`` None: find the model on the
        stack. Not while the model's forward runs eagerly under torch.compile (Dynamo fell back from
        it): the graph is then a module's that it calls, whose timestep-like input need not be the
        model's (Wan-Animate-2's reference pass embeds a constant); the model's input hook reads it."""
        if self.explicit is not None:
            return
        if run is None:
            owner = find_owner(None)
            if owner.eager_forward:
                return
            run = self.run_of(owner)
        run.graph_steps = True
        run.on_timestep(t, dtype)

    # --- calls ---
    def enter_site(self, key: str, anchor: torch.Tensor | None = None) -> SiteState:
        """Called by the plan node: the state of this site instance for the current call.

        Without step metadata every call of a site counts as a new step. With it, repeated calls
        in one step are passes (CFG) with separate state."""
        run, info = self._instance(key, anchor)
        tracker = run.tracker
        if self.explicit is not None:
            step, num_steps = self.explicit
            if tracker.set_explicit(step, num_steps):
                run.new_generation()
        tracked = tracker.step >= 0
        step, calls = run.visits.get(info.key, (-1, 0))
        if tracked:
            if step != tracker.step:
                step, calls = tracker.step, 0
            pass_index = calls
            calls += 1
        else:
            step, calls, pass_index = step + 1, 0, 0
        run.visits[info.key] = (step, calls)
        state = run.states.get((info.key, pass_index))
        if state is None:
            state = run.states[(info.key, pass_index)] = SiteState(info=info, pass_index=pass_index)
        if state.last_step != step:
            state.steps_seen += 1
        state.last_step = step
        self._current[key] = (run, state)
        return state

    def _instance(self, key: str, anchor: torch.Tensor | None) -> tuple:
        ptr = None if anchor is None else anchor.data_ptr()
        found = self._instances.get((key, ptr))
        if found is not None and found[0].model_ref is not None and found[0].model_ref() is None:
            found = None                                  # that model is gone: resolve again
        if found is None:
            found = self._instances[(key, ptr)] = self._resolve(self.specs[key], ptr)
        return found

    def _resolve(self, spec: SiteInfo, ptr: int | None) -> tuple:
        """Find the model and module path of a new site instance (one stack walk)."""
        owner = find_owner(ptr)
        run = self.run_of(owner)
        path = site_path(owner.anchor_name, spec.anchor_path, spec.module_rel) if owner.model is not None else None
        if path is None:
            path = spec.module_path if spec.module_path != "<root>" else spec.key
        layer = layer_index(path)
        if layer is None:
            layer = sum(1 for i in self.sites.values() if i.model == run.name)
        info = dataclasses.replace(spec, key=f"{run.name}/{path}#{spec.ordinal}", module_path=path,
                                   layer=layer, model=run.name, spec_key=spec.key)
        self.sites.pop(spec.key, None)
        self.sites[info.key] = info
        if owner.model is not None and not run.hooked:
            install_input_hook(owner.model, run, owner.frame_locals,
                               read_timestep=not owner.compiled or owner.eager_forward,
                               call=owner.call)
        return run, info

    def call_info(self, state: SiteState, seq_len: int, grid: tuple) -> SiteInfo:
        """The site's info for this call's geometry. A site's graphs can differ in shape (one
        compiled graph per resolution, or one dynamic graph): the plan node passes the grid of its
        own input, and -1s where its graph cannot see the patch embedding (a graph break, a
        compiled block), which then takes the model's last grid. Policy state from another
        geometry is dropped."""
        info = state.info
        run = self._current[info.spec_key][0]             # set by enter_site for this call
        grid = (int(grid[0]), int(grid[1]), int(grid[2]))
        if min(grid) > 0:
            run.last_grid = grid
        else:
            grid = run.last_grid
        layout = run.layout
        if info.config.video_grid is not None and layout is not None and layout.grid is not None:
            reason = _given_grid_check(info.config.video_grid, layout)
            if reason:
                self._warn_once(run, reason)
                if reason not in info.reason:
                    info = dataclasses.replace(info, reason="; ".join(x for x in (info.reason, reason) if x))
        position = layout.text_position if layout is not None else info.inferred_text_position
        text = text_tokens_for(seq_len, grid)
        if text is None:
            grid, text = None, 0
        fields = (seq_len, grid, text, position)
        if (info.seq_len, info.grid, info.text_tokens, info.inferred_text_position) != fields:
            base, last, resolved = state.resolved_info or (None, None, None)
            if base is not info or last != fields:  # every call of a denoising loop repeats the last one's
                resolved = dataclasses.replace(info, seq_len=seq_len, grid=grid, text_tokens=text,
                                               inferred_text_position=position)
                state.resolved_info = (info, fields, resolved)
            info = resolved
        if state.geometry != (seq_len, grid):
            if state.geometry is not None:
                state.policy_state, state.plan = None, None
            state.geometry = (seq_len, grid)
        return info

    def instance_state(self, key: str, anchor: torch.Tensor | None) -> SiteState:
        """The state that the last plan of the instance ``anchor`` names selected (the backward
        runs after every instance's forward, so ``current`` would give the last one's)."""
        run, info = self._instance(key, anchor)
        _, calls = run.visits.get(info.key, (-1, 1))
        return run.states.get((info.key, max(calls - 1, 0))) or self.current(key)

    @staticmethod
    def _warn_once(run: ModelRun, message: str) -> None:
        if message not in run.warned:
            run.warned.add(message)
            log.warning("modsparse: %s: %s", run.name, message)

    def current(self, key: str) -> SiteState:
        """The state that the last plan node of this site selected (for attention/observe nodes)."""
        return self._current[key][1]

    def current_run(self, key: str) -> ModelRun:
        return self._current[key][0]

    def num_steps(self, config: SparsityConfig, run: ModelRun | None = None) -> int:
        tracker = (run or self.free_run).tracker
        return tracker.num_steps or config.num_steps or DEFAULT_NUM_STEPS

    @property
    def states(self) -> dict:
        """Every (instance key, pass) -> SiteState, over all models."""
        out = {}
        for run in (*self.runs.values(), self.free_run):
            out.update(run.states)
        return out

    @property
    def tracker(self) -> StepTracker:
        """The step tracker of the model that ran last (tests and single-model scripts)."""
        if self._current:
            return next(reversed(self._current.values()))[0].tracker
        runs = list(self.runs.values())
        return runs[-1].tracker if runs else self.free_run.tracker

    def reset(self, forget_sites: bool = False) -> None:
        """Forget the state of every model (a new generation everywhere). ``forget_sites`` also
        forgets the site instances report() lists; compiled graphs keep working (their rewritten
        sites are registered again on their next call, dense ones on the next compile)."""
        self.forget_dead_models()
        for run in (*self.runs.values(), self.free_run):
            run.new_generation()
            run.tracker = StepTracker()
            run.last_grid = None if forget_sites else run.last_grid
        self._current.clear()
        if forget_sites:
            self.sites = {}
            self.dense.clear()          # as before they were placed: dense rows come back with a compile
            self._instances.clear()
            self.runs.clear()
            self.free_run = ModelRun("<no model>")


def install_input_hook(model, run: ModelRun, frame_locals: dict | None, read_timestep: bool = True,
                       call: tuple | None = None) -> None:
    """A forward pre-hook on the model that reads its inputs before each forward, in both compile
    styles (``torch.compile(model)`` compiles the model's ``forward`` frame: its hooks run
    outside). It reads the layout (grid and text position, modcompile/layout.py) and, with
    ``read_timestep`` (the model's forward is not compiled: regional compilation) and while no
    compiled graph reads it, the ``timestep`` (one host read per forward, as the graph's step node
    does). A whole-compiled model's graph reads its own timestep: eager calls of the same module
    (a reference run) then leave the step alone. The current call, already inside forward, is read
    as the hook would have read it, from ``call`` (the (args, kwargs) of the model's call frame),
    else from its forward's frame, whose arguments may be rebound by then (Allegro, Cosmos and LTX
    turn ``timestep`` into its embedding before their blocks run)."""
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return

    def read(values: dict, layout=None) -> None:
        t = values.get("timestep")
        if read_timestep and not run.graph_steps and REGISTRY.explicit is None:
            if isinstance(t, torch.Tensor) and t.numel():
                run.on_timestep(timestep_value(t), t.dtype)
            elif isinstance(t, (int, float)) and not isinstance(t, bool):
                run.on_timestep(float(t))
        run.layout = layout or model_layout(model, values)
        if run.layout.grid is not None:
            run.last_grid = run.layout.grid

    @torch.compiler.disable
    def hook(module, args, kwargs):
        read({**dict(zip(params, args)), **kwargs})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    run.hooked = True
    if call is not None:
        read({**dict(zip(params, call[0])), **call[1]})
    elif frame_locals is not None:
        # The forward's arguments (its other locals may share their names: Wan's num_frames/height/
        # width are the unpatched latent's), rebound ones read as the layout module says.
        read({name: value for name, value in frame_locals.items() if name in params},
             frame_layout(model, frame_locals, params))


def _runs_compiled(name: str, module) -> bool:
    """A module whose calls run compiled code: ``module.compile()`` (what ``compile_repeated_blocks``
    does) or wrapped in ``torch.compile`` (its ``_orig_mod``)."""
    return getattr(module, "_compiled_call_impl", None) is not None or name.rsplit(".", 1)[-1] == "_orig_mod"



def _attribute(name: str) -> str:
    """A module's attribute name, less its index in a list: ``blocks.3.self_attn`` -> ``self_attn``,
    ``blocks.3`` -> ``blocks``."""
    return next((p for p in reversed(name.split(".")) if not p.isdigit()), "")


def _below_compiled(name: str, compiled: set) -> bool:
    """The module ``name`` or one that holds it runs compiled code (an attention module whose
    processor's graph runs inside a regionally compiled block)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in compiled for i in range(len(parts), 0, -1))


def _given_grid_check(given: tuple, layout) -> str:
    """'' when a ``video_grid`` option agrees with the model's latents, else why it cannot fit."""
    given = tuple(given)
    if given == tuple(layout.grid):
        return ""
    shown = "x".join(map(str, given))
    return (f"video_grid {shown} given, but this call's latents give {'x'.join(map(str, layout.grid))} "
            f"({layout.rule}); the given grid is used")


def compiled_frame(anchor: torch.Tensor | None, anchor_path: str | None) -> tuple | None:
    """At compile time: (owner, path in the model of the module whose frame is compiled), or None
    when no model on the stack holds the anchor. The model holding the anchor (Dynamo compiles a
    frame from inside its caller) and the anchor's name in it, less its path below the frame, give
    the frame's module: "" for the model itself, a block's path under regional compilation."""
    owner = find_owner(None if anchor is None else anchor.data_ptr())
    if owner.model is None or site_path(owner.anchor_name, anchor_path, "") is None:
        return None
    return owner, owner.anchor_name[: len(owner.anchor_name) - len(anchor_path)].rstrip(".")


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
    previous = REGISTRY.explicit
    REGISTRY.explicit = (step, num_steps)
    try:
        yield
    finally:
        REGISTRY.explicit = previous
        for run in (*REGISTRY.runs.values(), REGISTRY.free_run):
            run.tracker.explicit = False
