"""Which model, and which module of it, a call of a compiled attention site belongs to.

A compiled graph may serve many modules: ``compile_repeated_blocks`` compiles one transformer block
and every layer runs that code, a graph after a break sees only part of a model, and two models of
one architecture share their compiled code. The graph therefore passes one parameter of the site's
attention module (its *anchor*) to the plan node; at run time the anchor's address names the
module instance. The first call of an instance walks the Python stack once to find the model that
owns the anchor (the outermost ``nn.Module`` frame holding it) and the anchor's name in it; later
calls hit a cache.

Everything here runs once per new (site, instance), never per call.
"""
from __future__ import annotations

import re
import sys
import weakref
from dataclasses import dataclass

import torch

# Dynamo's source of a graph input: L['self']._modules['attn1']._parameters['weight'], L['attn'].to_q.weight
_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\]")
_PART = re.compile(r"\.([A-Za-z_]\w*)|\[['\"]([^'\"]+)['\"]\]|\[(\d+)\]")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers", "_orig_mod"}


def source_path(source_name: str) -> str | None:
    """The dotted attribute path below the frame local of a Dynamo source name, e.g.
    ``L['self'].__dict__['_modules']['attn1']._parameters['weight']`` -> ``attn1.weight``; None if not
    of that form."""
    root = _ROOT.match(source_name)
    if root is None:
        return None
    rest, parts, pos = source_name[root.end():], [], 0
    while pos < len(rest):
        m = _PART.match(rest, pos)
        if m is None:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return ".".join(p for p in parts if p not in _CONTAINERS)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a torch.compile wrapper (OptimizedModule)."""
    return getattr(module, "_orig_mod", module)


_NAMES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def tensor_name(root: torch.nn.Module, ptr: int) -> str | None:
    """The name of the parameter or buffer of ``root`` stored at address ``ptr``. The table is
    rebuilt when the address is not in it (weights moved or replaced since the last look-up)."""
    names = _NAMES.get(root)
    if names is None or ptr not in names:
        names = {}
        for name, t in list(root.named_parameters(remove_duplicate=False)) + list(root.named_buffers(remove_duplicate=False)):
            names.setdefault(t.data_ptr(), name)
        _NAMES[root] = names
    return names.get(ptr)


@dataclass
class Owner:
    model: torch.nn.Module | None     # the outermost module on the stack that holds the anchor
    anchor_name: str | None           # the anchor's name in that model
    frame_locals: dict | None         # locals of that model's forward frame (for its timestep input)
    compiled: bool                    # the model's own forward runs compiled (whole-model compile)
    call: tuple | None = None         # (args, kwargs) the model was called with: its forward's
                                      # arguments before the forward rebinds them (Allegro's timestep)
    eager_forward: bool = False       # compiled, but no frame of the model runs Dynamo's code: Dynamo
                                      # fell back to eager for its forward and compiles what it calls


def _method_frames():
    """The caller's caller's frames and theirs, outward, that have a ``self`` local. Other frames are
    skipped before their ``f_locals`` is read: before Python 3.13 that read leaves a snapshot of
    the frame's locals on the frame until it returns, which would keep a model the user deletes
    in a running function alive."""
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if "self" in code.co_varnames or "self" in code.co_cellvars:
            yield f
        f = f.f_back


def _runs_dynamo_code(code) -> bool:
    """A frame that Dynamo compiled runs its rewritten code, which calls the compiled graph."""
    return any(name.startswith("__compiled_fn") for name in code.co_names)


def find_owner(ptr: int | None) -> Owner:
    """The model that the current call runs in. With an anchor address, the outermost module frame
    whose module holds a tensor at that address; without one, the outermost module frame."""
    found, compiled, traced = None, False, False
    for frame in _method_frames():
        module = frame.f_locals.get("self")
        if not isinstance(module, torch.nn.Module):
            continue
        if type(module).__name__ == "OptimizedModule":
            compiled = compiled or found is not None and _unwrap(module) is found[0]
            module = _unwrap(module)
        name = None if ptr is None else tensor_name(module, ptr)
        if ptr is None or name is not None:
            if found is not None and module is found[0]:
                found = (module, name, frame.f_locals if "forward" in frame.f_code.co_name else found[2], found[3])
            else:
                found, compiled, traced = (module, name, frame.f_locals, None), False, False
            traced = traced or _runs_dynamo_code(frame.f_code)
            if frame.f_code.co_name in _CALL_FRAMES and isinstance(frame.f_locals.get("args"), tuple):
                found = (*found[:3], (frame.f_locals["args"], frame.f_locals.get("kwargs") or {}))
    if found is None:
        return Owner(None, None, None, False)
    module = found[0]
    compiled = compiled or getattr(module, "_compiled_call_impl", None) is not None
    return Owner(module, found[1], found[2], compiled, found[3], eager_forward=compiled and not traced)


# nn.Module's call frames: their ``args``/``kwargs`` locals hold what the module was called with
_CALL_FRAMES = ("_call_impl", "_wrapped_call_impl")


def pipeline_loop() -> tuple:
    """(``timesteps``, ``i``) of the diffusers pipeline call on the stack: its schedule (a tensor or a
    list) and its denoising loop's index (an int while the loop runs), each None when absent. No
    host read: the schedule's identity tells one pipeline call from the next (the scheduler makes a
    new tensor per ``set_timesteps``), the index one loop iteration from the next."""
    for frame in _method_frames():
        obj = frame.f_locals.get("self")
        if obj is None or not any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__):
            continue
        ts, i = frame.f_locals.get("timesteps"), frame.f_locals.get("i")
        i = i if isinstance(i, int) and not isinstance(i, bool) else None
        if isinstance(ts, torch.Tensor) and ts.dim() == 1 and ts.numel() > 0:
            return ts, i
        if isinstance(ts, (list, tuple)) and ts and all(isinstance(x, (int, float)) for x in ts):
            return ts, i
    return None, None


def schedule_values(ts, dtype: torch.dtype | None = None) -> list[float] | None:
    """A pipeline's timesteps as host floats (one device-to-host copy when they live on a GPU);
    ``dtype``: rounded as a cast to it rounds them (a pipeline may hand its model the timestep in the
    model's dtype: bfloat16 keeps 8 bits, 2 units near 1000)."""
    if ts is None:
        return None
    ts = ts.detach() if isinstance(ts, torch.Tensor) else torch.tensor([float(x) for x in ts], dtype=torch.float64)
    if dtype is not None:
        ts = ts.to(dtype)
    return [float(x) for x in ts.double().cpu().tolist()]


def pipeline_schedule() -> list[float] | None:
    """The timesteps of the diffusers pipeline call on the stack as host floats, or None."""
    return schedule_values(pipeline_loop()[0])


def site_path(anchor_name: str | None, anchor_rel: str | None, module_rel: str) -> str | None:
    """The site's module path in the model: the anchor's name in the model less its path below the
    compiled frame (``anchor_rel``) gives where that frame's module sits; the site's module path
    below the frame (``module_rel``, "" at the frame's module itself) follows it."""
    if anchor_name is None or anchor_rel is None:
        return None
    if anchor_name != anchor_rel and not anchor_name.endswith("." + anchor_rel):
        return None
    prefix = anchor_name[: len(anchor_name) - len(anchor_rel)].rstrip(".")
    return ".".join(p for p in (prefix, module_rel) if p)


def layer_index(path: str) -> int | None:
    """The block index of a module path (``blocks.7.attn1`` -> 7): its last integer component."""
    numbers = [int(p) for p in path.split(".") if p.isdigit()]
    return numbers[-1] if numbers else None


__all__ = ["Owner", "find_owner", "layer_index", "pipeline_loop", "pipeline_schedule", "schedule_values", "site_path", "source_path", "tensor_name"]
