"""modcompile: the ``modsparse`` torch.compile backend (dynamic block-sparse attention for video DiTs).

    import torch, modcompile
    model = torch.compile(model, backend="modsparse", options={"policy": "mod"})
"""
import logging

from torch._dynamo import register_backend as _register_backend

from .backend import modsparse
from .config import SparsityConfig
from .ops import block_sparse_attention
from .report import report
from .runtime import denoising_step, reset

logging.getLogger("modcompile").addHandler(logging.NullHandler())

# The entry point registers the backend without this import; importing registers it too.
try:
    _register_backend(modsparse, name="modsparse")
except Exception:  # already registered (through the entry point)
    pass

__all__ = ["modsparse", "SparsityConfig", "block_sparse_attention", "report", "denoising_step", "reset"]
