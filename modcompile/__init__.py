"""modcompile: the ``modsparse`` torch.compile backend (dynamic block-sparse attention for video DiTs).

    import torch, modcompile
    model = torch.compile(model, backend="modsparse", options={"policy": "mod"})
"""
import logging

from torch._dynamo.backends import registry as _registry

from .attention import block_sparse_attention
from .backend import modsparse
from .config import SparsityConfig
from .kernels.block_lists import BlockLists
from .report import report
from . import buffers as _buffers, cuda_graphs as _cuda_graphs, runtime as _runtime
from .kernels.state import KERNEL_STATE as _KERNEL_STATE
from .runtime import denoising_step

logging.getLogger("modcompile").addHandler(logging.NullHandler())


def reset(forget_sites: bool = False, kernels: bool = False) -> None:
    """Forget all per-site state (masks, predictors, step counters): the next call starts a new
    generation. ``forget_sites`` also drops what the compiler recorded (for tests). ``kernels``
    also forgets what the kernels remember (``modcompile.kernels.state.KERNEL_STATE``: tuned launch
    configurations, candidates left out, device capabilities, a failed cuDNN probe, memo caches):
    the next GPU call times its candidates again, so a new generation does not ask for it. Every
    reset forgets the site calls' CUDA graphs (:data:`.cuda_graphs.SITE_CALLS`, ``SITE_PLANS``) and
    their pooled outputs (:data:`.buffers.SITE_OUTPUTS`)."""
    _runtime.reset(forget_sites)
    _cuda_graphs.SITE_CALLS.clear()
    _cuda_graphs.SITE_PLANS.clear()
    _buffers.SITE_OUTPUTS.clear()
    if kernels:
        _KERNEL_STATE.clear()


# The entry point registers the backend without this import; importing registers it too, unless
# this import is the entry point being loaded (then torch registers what it loads).
if _registry._BACKENDS.get("modsparse") is None and "modsparse" not in _registry._COMPILER_FNS:
    _registry.register_backend(modsparse, name="modsparse")

__all__ = ["modsparse", "SparsityConfig", "BlockLists", "block_sparse_attention", "report", "denoising_step", "reset"]
