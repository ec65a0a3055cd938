"""Replay small fixed-shape device computations from CUDA graphs, to save host launch overhead.

A VMoBA plan ends in ~30 tiny kernels on the pooled blocks (scores, normalization, threshold, own
blocks, block mask, list building) whose shapes are fixed per site: launched one by one they cost
far more host time than GPU time. :class:`GraphedCall` runs such a function eagerly on its first
call (warm-up: lazily built caches, library handles), captures it on the second call with static
input buffers, and from then on copies the inputs in, replays the graph and returns copies of the
outputs (the static buffers are overwritten by the next replay).

Only on CUDA, not under TRITON_INTERPRET, not while the current stream is itself being captured
(nested capture is illegal), and off with ``MODCOMPILE_CUDA_GRAPHS=0``. A capture that fails (an
op that synchronizes, say) leaves that call eager for good and says so in the log.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from .kernels._common import interpreting

log = logging.getLogger("modcompile")

ENV = "MODCOMPILE_CUDA_GRAPHS"


def enabled(device: torch.device) -> bool:
    """Whether computations on ``device`` may be replayed from CUDA graphs."""
    return (device.type == "cuda" and os.environ.get(ENV, "1") not in ("", "0")
            and not interpreting())


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

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        if self.graph is None and not (self.failed or self.eager_calls == 0
                                       or torch.cuda.is_current_stream_capturing()):
            self._capture(inputs)
        if self.graph is None:  # first call, failed or nested capture: eager
            self.eager_calls += 1
            return tuple(self.fn(*inputs))
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        self.replays += 1
        return tuple(out.clone() for out in self.static_outputs)

    def _capture(self, inputs) -> None:
        device = inputs[0].device
        with torch.cuda.device(device):
            self._capture_on_current_device(inputs)

    def _capture_on_current_device(self, inputs) -> None:
        static_inputs = tuple(x.clone() for x in inputs)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            # Warm up on the capture stream right before capturing: caches the function fills
            # lazily (cached constants, library workspaces) must exist outside the graph.
            with torch.cuda.stream(side):
                self.fn(*static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, stream=side):
                static_outputs = tuple(self.fn(*static_inputs))
        except Exception as exc:  # e.g. an op that synchronizes: stay eager
            self.failed = True
            log.warning("modcompile: CUDA graph capture of %s failed (%s: %s); it stays eager",
                        self.name, type(exc).__name__, exc)
            return
        self.graph, self.static_inputs, self.static_outputs = graph, static_inputs, static_outputs


__all__ = ["ENV", "GraphedCall", "enabled"]
