"""Launch already-compiled Triton kernels without the JIT's per-call bookkeeping.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run`` on every call: it binds the
arguments, specialises each one (type, 16-byte alignment of pointers, divisibility and value of
integers), builds a cache key from that and the options, looks the compiled kernel up and only
then launches it. For a launch wrapper that calls the same kernel with the same kind of arguments
over and over, that work is repeated for nothing.

:class:`CachedLauncher` does the JIT's launch once per *caller key* and keeps the ``CompiledKernel``
it returned; later calls with that key hand the arguments straight to the compiled kernel's
launcher, in the form ``JITFunction.run`` itself uses. The caller key must determine Triton's
specialisation of the launch: every constexpr, ``num_warps`` / ``num_stages``, the dtype and shape
and strides of every tensor (the integer arguments derive from them), and whether each pointer is
16-byte aligned (:func:`alignment`). Anything else falls back to the JIT: the interpreter, an
active launch hook (profilers), or a Triton whose compiled kernels lack the attributes used here.
"""
from __future__ import annotations

import torch

try:
    import triton
    from triton import knobs
except ImportError:  # the kernels' torch references still import this module's users
    triton = None
    knobs = None

from ._common import interpreting


def alignment(*tensors) -> int:
    """Bit ``i`` set when tensor ``i``'s data pointer is 16-byte aligned (what Triton specialises on)."""
    bits = 0
    for i, t in enumerate(tensors):
        if t.data_ptr() % 16 == 0:
            bits |= 1 << i
    return bits


class CachedLauncher:
    """``launcher(key, grid, args, constexprs, num_warps, num_stages)`` for one ``@triton.jit``
    kernel whose runtime arguments all precede its constexprs in the signature."""

    def __init__(self, fn):
        self.fn = fn
        self.kernels: dict = {}  # (key, device) -> (CompiledKernel, constexpr values in signature order)
        self._stream = None

    def __call__(self, key, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int) -> None:
        if interpreting():
            self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        device = torch.cuda.current_device()
        entry = self.kernels.get((key, device))
        if entry is None or knobs.runtime.launch_enter_hook is not None:
            self._launch_jit(key, device, grid, args, constexprs, num_warps, num_stages)
            return
        kernel, tail = entry
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], grid_1, grid_2, self._stream(device), kernel.function, kernel.packed_metadata,
                   None, None, knobs.runtime.launch_exit_hook, *args, *tail)

    def _launch_jit(self, key, device, grid, args, constexprs, num_warps, num_stages) -> None:
        kernel = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            return
        names = self.fn.arg_names[len(args):]
        if set(names) != set(constexprs):  # not the layout this class assumes: stay on the JIT
            return
        if self._stream is None:
            self._stream = triton.runtime.driver.active.get_current_stream
        self.kernels[(key, device)] = (kernel, tuple(constexprs[n] for n in names))


def tensor_key(t: torch.Tensor) -> tuple:
    """What a launch's specialisation can depend on for one tensor argument (besides alignment)."""
    return t.dtype, t.shape, t.stride()


__all__ = ["CachedLauncher", "alignment", "tensor_key"]
