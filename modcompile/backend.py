"""The ``modsparse`` torch.compile backend."""
from __future__ import annotations

import hashlib
import logging

import torch

from . import ops  # noqa: F401  (registers the custom ops the rewritten graph calls)
from .config import split_options
from .passes.rewrite import rewrite_attention

log = logging.getLogger("modcompile")


def _scope(config) -> str:
    """Short stable id of a configuration: sites of differently configured compilations of the
    same model keep separate state."""
    return hashlib.sha1(repr(config).encode()).hexdigest()[:8]


def modsparse(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """torch.compile backend: rewrite SDPA to block-sparse attention, then compile with Inductor.

    ``options`` holds modsparse keys (modcompile.config.SparsityConfig), Inductor config keys and
    optionally ``"mode"``; ``mode`` is Inductor's (default, reduce-overhead, max-autotune...)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config, inductor_options, options_mode = split_options(options)
    mode = mode or options_mode
    sites = rewrite_attention(gm, config, _scope(config))
    sparse = sum(s.status == "sparse" for s in sites)
    log.info("modsparse: %d of %d attention sites rewritten (policy %s)", sparse, len(sites), config.policy)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches)


modsparse.__name__ = "modsparse"
