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
from .runtime import denoising_step, reset

logging.getLogger("modcompile").addHandler(logging.NullHandler())

# The entry point registers the backend without this import; importing registers it too, unless
# this import is the entry point being loaded (then torch registers what it loads).
if _registry._BACKENDS.get("modsparse") is None and "modsparse" not in _registry._COMPILER_FNS:
    _registry.register_backend(modsparse, name="modsparse")

__all__ = ["modsparse", "SparsityConfig", "BlockLists", "block_sparse_attention", "report", "denoising_step", "reset"]
