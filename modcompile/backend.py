"""The ``modsparse`` torch.compile backend."""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .ops import observe, plan, sparse_attention, step  # noqa: F401  (the graph ops: importing registers them)
from .config import split_options
from .passes.rewrite import rewrite_attention

log = logging.getLogger("modcompile")


def _scope(config) -> str:
    """Short stable id of a configuration: sites of differently configured compilations of the
    same model keep separate state."""
    return hashlib.sha1(repr(config).encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """Digest of modcompile's own source files."""
    digest = hashlib.sha1()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class SourceKeyedPass(CustomGraphPass):
    """Inductor's on-disk cache keys a compiled graph on its FX code, which names our ops but not
    their signatures or fake kernels: after an upgrade a cached graph could call an op with the old
    arguments. Set as the post-grad pre-pass, this adds modcompile's source digest to the cache key
    (Inductor's documented use of ``uuid``) and runs the user's own pass of that slot, if any."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        if self.inner is None:
            return source_digest()
        inner = self.inner.uuid() if isinstance(self.inner, CustomGraphPass) else None
        return None if inner is None else (source_digest(), inner)  # None: no caching, as Inductor does


# frame id -> tensor-input signatures compiled so far; frames already warned about
_FRAME_INPUTS: dict = {}
_WARNED_FRAMES: set = set()


def _input_signature(example_inputs) -> tuple:
    return tuple((tuple(x.shape), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else type(x).__name__
                 for x in example_inputs)


def _check_recompile(gm, example_inputs) -> None:
    """Warn once per frame when Dynamo recompiles it for tensor inputs it has compiled before: the
    guard that failed was on a Python value, typically a timestep passed as a float
    (``model(x, 500.0)``), which Dynamo specialises into the graph: every step then recompiles
    until the recompile limit, after which the frame runs without modsparse."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    if compile_id is None:
        return
    frame = compile_id.frame_id
    if compile_id.frame_compile_id == 0:  # a new frame (frame ids restart after torch._dynamo.reset())
        _FRAME_INPUTS.pop(frame, None)
        _WARNED_FRAMES.discard(frame)
    signature = _input_signature(example_inputs)
    seen = _FRAME_INPUTS.setdefault(frame, set())
    if signature in seen and frame not in _WARNED_FRAMES:
        _WARNED_FRAMES.add(frame)
        log.warning("modsparse: graph %s recompiled with the same tensor inputs as before: a Python number "
                    "argument changes between calls and Dynamo specialises on it. If it is the timestep "
                    "(model(x, 500.0)), pass it as a tensor (torch.tensor([t])): a float timestep "
                    "recompiles every step and, past torch's recompile limit, runs without modsparse", compile_id)
    seen.add(signature)


def modsparse(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """torch.compile backend: rewrite SDPA to block-sparse attention, then compile with Inductor.

    ``options`` holds modsparse keys (modcompile.config.SparsityConfig), Inductor config keys and
    optionally ``"mode"``; ``mode`` is Inductor's (default, reduce-overhead, max-autotune...)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config, inductor_options, options_mode = split_options(options)
    _check_recompile(gm, example_inputs)
    mode = mode or options_mode
    sites = rewrite_attention(gm, config, _scope(config))
    sparse = sum(s.status == "sparse" for s in sites)
    log.info("modsparse: %d of %d attention sites rewritten (policy %s)", sparse, len(sites), config.policy)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_options)
    user_pass = patches.get("post_grad_custom_pre_pass", torch._inductor.config.post_grad_custom_pre_pass)
    patches["post_grad_custom_pre_pass"] = SourceKeyedPass(user_pass)
    return compile_fx(gm, example_inputs, config_patches=patches)


modsparse.__name__ = "modsparse"
