"""Launch compiled Triton kernels with less host time per call than ``kernel[grid](...)``.

``JITFunction.run`` does more per call than binding the arguments and launching: it reads the
runtime knobs, builds the kernel-cache key as a string of the specialization and the options, runs
hooks, checks used globals and asks the kernel for launch metadata. :func:`launch` keeps Triton's
own binder (the C specializer: dtypes, pointer alignment, integer divisibility), so a new
specialization still compiles through ``JITFunction.run``, and launches a kernel it has seen from a
cache keyed by the specialization tuple and the launch options, straight through
``CompiledKernel.run``.

The plain path runs instead under the interpreter, with a launch hook set (profilers such as
proton), with ``MODCOMPILE_FAST_LAUNCH=0``, and for good once a fast launch raised (Triton's
internals moved); the cache is ``KERNEL_STATE.launchers`` (emptied by ``modcompile.reset(kernels=True)``).
"""
from __future__ import annotations

import logging
import os

import torch

from ._common import interpreting
from .state import KERNEL_STATE

log = logging.getLogger("modcompile")

ENV = "MODCOMPILE_FAST_LAUNCH"


def fast_launch_enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("", "0") and not KERNEL_STATE.fast_launch_broken


def _hooks_set() -> bool:
    try:
        from triton import knobs
    except ImportError:  # older Triton: no knobs, no launch hooks to honour
        return False
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


def _raw_stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    _raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811  (the same value, without a Stream object)


def launch(fn, grid: tuple, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)`` (kwargs: constexprs, ``num_warps``, ``num_stages``), through the
    launch cache when it may (module docstring). ``grid`` is a tuple of 1 to 3 ints."""
    if interpreting() or not fast_launch_enabled() or _hooks_set():
        fn[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    kernel = key = None
    try:
        binder = fn.device_caches[device][-1]  # a defaultdict: built here on a device's first launch
        bound, specialization, _ = binder(*args, **kwargs)
        # the specialization holds the constexprs; the launch options are the other kwargs
        key = (id(fn), device, kwargs.get("num_warps"), kwargs.get("num_stages"), *specialization)
        kernel = KERNEL_STATE.launchers.get(key)
    except Exception as err:  # the binder's API or its specialization's type moved
        _give_up(err)
        key = None
    if kernel is None:  # compiles (or finds) the kernel for this specialization, and launches it
        kernel = fn[grid](*args, **kwargs)
        if key is not None and kernel is not None:
            KERNEL_STATE.launchers[key] = kernel
        return
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    try:
        kernel.run(grid[0], g1, g2, _raw_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
                   *bound.values())
    except TypeError as err:  # CompiledKernel.run's signature moved: nothing was launched
        _give_up(err)
        fn[grid](*args, **kwargs)


def _give_up(err: Exception) -> None:
    KERNEL_STATE.fast_launch_broken = True
    KERNEL_STATE.launchers.clear()
    log.warning("modcompile: fast kernel launch unavailable with this Triton (%s: %s); using kernel[grid](...)",
                type(err).__name__, err)
