"""Replay device computations from CUDA graphs, to save host launch overhead.

Two kinds:

* :class:`GraphedCall`: a small fixed-shape function of tensor *values*, replayed on copies of its
  inputs (VMoBA's selection, MOD's mask tail).
* :class:`CallGraphs`: whole calls keyed by the *addresses* (and shapes, strides, dtypes) of every
  tensor they read or write, replayed in place (a site's attention call, VMoBA's whole plan).

A VMoBA plan ends in ~30 tiny kernels on the pooled blocks (scores, normalization, threshold, own
blocks, block mask, list building) whose shapes are fixed per site: launched one by one they cost
far more host time than GPU time. :class:`GraphedCall` runs such a function eagerly on its first
call (warm-up: lazily built caches, library handles), captures it on the second call with static
input buffers, and from then on copies the inputs in, replays the graph and returns copies of the
outputs or copies them into the caller's buffers (the static buffers are overwritten by the next
replay).

Only on CUDA, not under TRITON_INTERPRET, not while the current stream is itself being captured
(nested capture is illegal), and off with ``MODCOMPILE_CUDA_GRAPHS=0``. A capture that fails (an
op that synchronizes, say) leaves that call eager for good and says so in the log.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Callable

import torch

from .kernels._common import interpreting

log = logging.getLogger("modcompile")

ENV = "MODCOMPILE_CUDA_GRAPHS"


def switched_on() -> bool:
    """Whether ``MODCOMPILE_CUDA_GRAPHS`` allows replays (any value but empty or "0"; unset: yes)."""
    return os.environ.get(ENV, "1") not in ("", "0")


def enabled(device: torch.device) -> bool:
    """Whether computations on ``device`` may be replayed from CUDA graphs."""
    return device.type == "cuda" and switched_on() and not interpreting()


class GraphedCall:
    """``fn(*tensors) -> tuple of tensors``, replayed from a CUDA graph after one eager call.

    ``fn`` must not depend on anything but its inputs' values (shapes, dtypes and everything else
    it reads are baked into the graph): one instance per such combination (the caller's cache key).
    Device tensors that ``fn`` reads besides its inputs must outlive the instance (the graph holds
    their addresses, not references): the caller keeps them alive, or they sit in unbounded caches.
    """

    def __init__(self, fn: Callable[..., tuple], name: str = "graphed call"):
        self.fn = fn
        self.name = name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple = ()
        self.static_outputs: tuple = ()
        self.eager_calls = 0
        self.replays = 0
        self.failed = False

    def __call__(self, *inputs: torch.Tensor, out: tuple | None = None) -> tuple:
        """``fn(*inputs)``: copies of the outputs, or written into ``out`` (and returned) when given."""
        # eager: the first call, after a failed capture, and inside the caller's own capture (a graph
        # launch cannot be captured into another graph: fn's launches are recorded instead)
        eager = self.failed or self.eager_calls == 0 or torch.cuda.is_current_stream_capturing()
        if self.graph is None and not eager:
            self._capture(inputs)
        if self.graph is None or eager:
            self.eager_calls += 1
            results = tuple(self.fn(*inputs))
        else:
            for static, x in zip(self.static_inputs, inputs):
                static.copy_(x)
            self.graph.replay()
            self.replays += 1
            results = self.static_outputs  # overwritten by the next replay: copied below
            if out is None:
                return tuple(x.clone() for x in results)
        return copy_into(out, results)

    def _capture(self, inputs) -> None:
        device = inputs[0].device
        with torch.cuda.device(device):
            self._capture_on_current_device(inputs)

    def _capture_on_current_device(self, inputs) -> None:
        static_inputs = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        static_outputs: list = []
        try:
            # Warm up on the capture stream right before capturing: caches the function fills
            # lazily (cached constants, library workspaces) must exist outside the graph.
            with torch.cuda.stream(side):
                self.fn(*static_inputs)
            graph = capture(lambda: static_outputs.extend(self.fn(*static_inputs)), side)
        except Exception as exc:  # e.g. an op that synchronizes: stay eager
            self.failed = True
            log.warning("modcompile: CUDA graph capture of %s failed (%s: %s); it stays eager",
                        self.name, type(exc).__name__, exc)
            return
        finally:
            torch.cuda.current_stream().wait_stream(side)
        self.graph, self.static_inputs, self.static_outputs = graph, static_inputs, tuple(static_outputs)


def copy_into(out: tuple | None, results: tuple) -> tuple:
    """``results``, or copied into ``out`` (and ``out`` returned) when given."""
    if out is None:
        return tuple(results)
    for dst, x in zip(out, results):
        dst.copy_(x)
    return tuple(out)


def capture(fn: Callable[[], None], stream, pool=None) -> torch.cuda.CUDAGraph:
    """A graph of what ``fn`` launches on ``stream`` (``fn`` only records: nothing runs). Unlike
    ``torch.cuda.graph`` this neither synchronizes the device nor empties the allocator's cache: the
    first is a host sync, the second moves later allocations (and so :class:`CallGraphs`' keys)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            fn()
        finally:
            graph.capture_end()
    return graph


def tensors_key(*tensors) -> tuple:
    """What a captured launch bakes in of each tensor: address, shape, strides, dtype (None stays None)."""
    return tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors)


_SEEN, _FAILED = "seen", "failed"


class CallGraphs:
    """CUDA graphs of whole calls, keyed by everything the call's device work depends on.

    ``run(key, fn)``: ``fn()`` launches work that reads and writes only tensors that exist before
    the call and that ``key`` names by address (:func:`tensors_key`), plus temporaries it frees
    before returning; everything else it decides on the host must be in ``key`` too. A key's first
    call runs ``fn`` eagerly (kernel tuning, lazily built caches); its second is captured and
    replayed; later ones only replay, with no Python between the caller and the GPU. In a denoising
    loop the caching allocator hands every step's activations the same addresses, so a site's
    calls repeat their keys from the second step on; a key that never repeats costs one dict entry.

    The temporaries of all graphs of one stream share one private memory pool: replays on one
    stream never overlap, and no graph leaves anything alive in the pool. Capture runs on a side
    stream without synchronizing (``torch.cuda.graph`` would synchronize and empty the cache, which
    moves later allocations and so the keys). A capture that fails leaves its key eager for good.
    """

    def __init__(self, name: str, max_entries: int = 1024):
        self.name = name
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()   # key -> CUDAGraph, _SEEN or _FAILED
        self._pools: dict = {}                      # stream -> pool handle
        self._streams: dict = {}                    # device index -> capture stream
        self.eager_calls = self.captures = self.replays = self.failures = 0

    def run(self, key, fn: Callable[[], None], device: torch.device) -> None:
        if torch.cuda.is_current_stream_capturing():  # inside the caller's own capture: just record fn
            self.eager_calls += 1
            fn()
            return
        handle = _current_stream_handle(device)
        key = (handle, key)
        entry = self.entries.get(key)
        if entry is not None and entry not in (_SEEN, _FAILED):
            self.entries.move_to_end(key)
            entry.replay()
            self.replays += 1
            return
        if entry is _SEEN:
            graph = self._capture(fn, device, handle)
            self.entries[key] = graph if graph is not None else _FAILED
            if graph is not None:
                graph.replay()
                self.replays += 1
                return
        elif entry is None:
            self._remember(key, _SEEN)
        self.eager_calls += 1
        fn()

    def clear(self) -> None:
        self.entries.clear()
        self._pools.clear()
        self.eager_calls = self.captures = self.replays = self.failures = 0

    def _remember(self, key, entry) -> None:
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def _capture(self, fn, device: torch.device, stream_handle: int):
        pool = self._pools.get(stream_handle)
        if pool is None:
            pool = self._pools[stream_handle] = torch.cuda.graph_pool_handle()
        side = self._streams.get(device.index)
        if side is None:
            side = self._streams[device.index] = torch.cuda.Stream(device)
        try:
            with torch.cuda.device(device):
                graph = capture(fn, side, pool)
        except Exception as exc:  # e.g. an op that synchronizes: this key stays eager
            log.warning("modcompile: CUDA graph capture of %s failed (%s: %s); that call stays eager",
                        self.name, type(exc).__name__, exc)
            self.failures += 1
            return None
        self.captures += 1
        return graph


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent from CPU builds


def _current_stream_handle(device: torch.device) -> int:
    """The current CUDA stream's handle, without building a ``torch.cuda.Stream`` (which costs
    more host time than the rest of a replay's bookkeeping)."""
    if _raw_stream is None:
        return torch.cuda.current_stream(device).cuda_stream
    return _raw_stream(torch.cuda.current_device() if device.index is None else device.index)


# The site attention ops' calls (modcompile/ops.py) and the policies' whole plans (VMoBA's);
# modcompile.reset() forgets them.
SITE_CALLS = CallGraphs("site attention")
SITE_PLANS = CallGraphs("site plans")

__all__ = ["ENV", "SITE_CALLS", "SITE_PLANS", "CallGraphs", "GraphedCall", "copy_into", "enabled", "switched_on",
           "tensors_key"]
