"""Launch configurations of every kernel and the one tuner that picks them.

One config type (:class:`LaunchConfig`) for the attention forward, the two backward passes and the
block-sparsity map; one key scheme (:func:`tuning_key`: device, dtype, head dim, block size, TMA,
which sequence ends are ragged, and the number of programs in powers of two, so that lengths in one
power-of-two bucket share a choice and a small test shape never decides for a 32k-token call); one
cache, ``KERNEL_STATE.tuned`` (kernels/state.py); one switch, ``MODCOMPILE_TUNE``.

:func:`choose` returns the cached choice for a key, else times the candidates once on the GPU
(``triton.testing.do_bench`` medians; a later candidate must win by 1% so that timing noise does
not flip near-ties) and keeps the fastest. With tuning off, or a single candidate, it keeps the
kernel's default without timing. Under the interpreter nothing is timed or kept.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from ._common import device_capability, padded_head_dim
from .state import KERNEL_STATE

TUNE_ENV = "MODCOMPILE_TUNE"
# Older names, one per direction, with their opposite polarities: still read when MODCOMPILE_TUNE is
# not set, with a warning the first time each is seen. direction -> (name, whether its value turns tuning on).
DEPRECATED_TUNE_ENVS = {
    "forward": ("MODCOMPILE_BSA_NO_TUNE", lambda v: v in ("", "0")),
    "backward": ("MODCOMPILE_BWD_AUTOTUNE", lambda v: v != "0"),
}
PIN_ENV = "MODCOMPILE_BWD_CONFIG"

_FLAGS = ("tma", "ragged_branch", "warp_spec", "tma_rows", "host_tma", "qo_tma")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and launch options of one kernel launch.

    ``tile``: rows one program owns (queries in the forward and dq, keys in dk/dv, the sampled rows
    of a map program); ``sub``: rows streamed per inner step (keys; queries in dk/dv). Both divide
    the block size. Flags (sm_90+ for the TMA and warp-specialization ones; a kernel rejects flags it
    lacks): ``tma`` streams the inner loop's tensors through tensor descriptors; ``ragged_branch``
    masks only the chunk that crosses the sequence end; ``warp_spec`` asks Triton to
    warp-specialize the inner loop; ``tma_rows`` (dk/dv) reads lse/delta through descriptors;
    ``host_tma`` (forward, with ``tma``) builds K/V descriptors once on the host; ``qo_tma``
    (forward, with ``host_tma``) loads q and stores out through descriptors too (not with q_rows).
    ``key_blocks`` (map): key blocks per program part, 0 elsewhere."""

    tile: int
    sub: int
    num_warps: int
    num_stages: int
    tma: bool = False
    ragged_branch: bool = False
    warp_spec: bool = False
    tma_rows: bool = False
    host_tma: bool = False
    qo_tma: bool = False
    key_blocks: int = 0

    def __post_init__(self):
        if self.host_tma and not self.tma:
            raise ValueError("LaunchConfig: host_tma needs tma=True")
        if self.qo_tma and not self.host_tma:
            raise ValueError("LaunchConfig: qo_tma needs host_tma=True")

    def fits(self, block_size: int) -> bool:
        return block_size % self.tile == 0 and block_size % self.sub == 0

    def label(self) -> str:
        """``(tile,sub,Nw,Ms)`` and ``+flag`` per flag set (``+kbN`` for key_blocks): what the
        benchmarks print and ``MODCOMPILE_BWD_CONFIG`` takes."""
        shape = f"({self.tile},{self.sub},{self.num_warps}w,{self.num_stages}s)"
        extra = [f for f in _FLAGS if getattr(self, f)] + ([f"kb{self.key_blocks}"] if self.key_blocks else [])
        return shape + "".join("+" + f for f in extra)


_LABEL = re.compile(r"\((\d+),(\d+),(\d+)w,(\d+)s\)((?:\+\w+)*)")


def parse_label(text: str) -> LaunchConfig:
    """The config that :meth:`LaunchConfig.label` printed, e.g. ``(64,64,4w,2s)+tma+ragged_branch``."""
    m = _LABEL.fullmatch(text.strip())
    extra = m.group(5).split("+")[1:] if m else []
    flags = [f for f in extra if not re.fullmatch(r"kb\d+", f)]
    if m is None or any(f not in _FLAGS for f in flags):
        raise ValueError(f"not a launch config label: {text!r} (e.g. '(64,64,4w,2s)+tma+ragged_branch')")
    key_blocks = [int(f[2:]) for f in extra if f not in flags]
    return LaunchConfig(*(int(g) for g in m.groups()[:4]), **{f: True for f in flags},
                        key_blocks=key_blocks[-1] if key_blocks else 0)


def as_config(cfg) -> LaunchConfig:
    """A :class:`LaunchConfig` from a config or a tuple ``(tile, sub, warps, stages[, flags...])``
    in field order."""
    if isinstance(cfg, LaunchConfig):
        return cfg
    if not isinstance(cfg, (tuple, list)) or not 4 <= len(cfg) <= len(fields(LaunchConfig)):
        raise TypeError(f"a launch config must be a LaunchConfig or a (tile, sub, warps, stages, ...) tuple, "
                        f"got {cfg!r}")
    return LaunchConfig(*cfg)


# ------------------------------------------------------------------------------------ the switch
def tuning_enabled(direction: str) -> bool:
    """Whether the ``direction`` kernels ("forward", "backward", "map") time their candidates on a
    GPU. ``MODCOMPILE_TUNE=0`` (or empty) turns tuning off for all; unset, the deprecated
    per-direction name decides (``MODCOMPILE_BSA_NO_TUNE=1`` / ``MODCOMPILE_BWD_AUTOTUNE=0`` turn it
    off), else tuning is on."""
    if TUNE_ENV in os.environ:
        return os.environ[TUNE_ENV] not in ("", "0")
    if direction not in DEPRECATED_TUNE_ENVS:
        return True
    name, turns_on = DEPRECATED_TUNE_ENVS[direction]
    if name not in os.environ:
        return True
    value = os.environ[name]
    if name not in KERNEL_STATE.warned_envs:
        KERNEL_STATE.warned_envs.add(name)
        warnings.warn(f"{name}={value!r} is deprecated: set {TUNE_ENV}=0 to turn kernel tuning off "
                      f"(forward and backward) or {TUNE_ENV}=1 to keep it on", FutureWarning, stacklevel=2)
    return turns_on(value)


def pinned_configs() -> dict:
    """``MODCOMPILE_BWD_CONFIG="dkdv=LABEL;dq=LABEL"`` (either part may be left out): fixed GPU configs
    of the backward passes instead of tuning, e.g. a tuner's earlier pick, to save the candidates'
    compile time."""
    return dict(_parse_pins(os.environ.get(PIN_ENV, "").strip()))


@KERNEL_STATE.memo
@lru_cache(maxsize=8)  # read on every backward call: parse each setting once
def _parse_pins(text: str) -> tuple:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, label = part.partition("=")
        if kind.strip() not in ("dkdv", "dq"):
            raise ValueError(f"{PIN_ENV}: expected 'dkdv=LABEL;dq=LABEL', got {text!r}")
        out[kind.strip()] = parse_label(label)
    return tuple(out.items())


# ------------------------------------------------------------------------------------ candidates
# Forward candidates tried on CUDA; the first that fits is the untuned default. The warp-specialized
# TMA variant with the scalar ragged branch comes first (autoWS on Hopper needs the TMA loads);
# descriptors built on the host before those built per program; 128x128 tiles with 4 stages need
# more shared memory than Hopper has. Timings: benchmarks/measured/HISTORY.md (Kernel).
_FORWARD = (
    LaunchConfig(128, 128, 8, 3, tma=True, host_tma=True, ragged_branch=True, warp_spec=True),
    LaunchConfig(128, 128, 8, 3, tma=True, host_tma=True, ragged_branch=True, warp_spec=True, qo_tma=True),
    LaunchConfig(128, 128, 8, 3, tma=True, ragged_branch=True, warp_spec=True),
    LaunchConfig(128, 128, 8, 3, ragged_branch=True),
    LaunchConfig(128, 128, 8, 3),
    LaunchConfig(128, 128, 8, 2),
    LaunchConfig(128, 64, 8, 3),
    LaunchConfig(64, 64, 4, 3),
    LaunchConfig(128, 128, 8, 3, tma=True),
    LaunchConfig(128, 64, 8, 3, tma=True),
    LaunchConfig(32, 32, 4, 2),
    LaunchConfig(16, 16, 2, 1),
)

# Backward candidates (both passes time all of them), pruned with per-pass sweeps on Hopper at Wan's
# attention shape (timings in benchmarks/measured/HISTORY.md, Backward): sub-tiles of 32 and the
# other (64, 64) / (128, 64) variants lost in both passes; (64, 64, 4 warps) with warp
# specialization does not compile with Triton 3.6. Warp-specialized ones last: a compiler failure
# there costs the least.
_TMA = dict(tma=True, ragged_branch=True)
_BACKWARD = (
    LaunchConfig(64, 64, 4, 2),
    LaunchConfig(128, 64, 8, 3),
    LaunchConfig(64, 64, 4, 2, ragged_branch=True),
    LaunchConfig(128, 64, 8, 3, ragged_branch=True),
    LaunchConfig(64, 64, 4, 2, **_TMA),
    LaunchConfig(128, 64, 8, 3, **_TMA),
    LaunchConfig(128, 64, 8, 3, **_TMA, warp_spec=True),
    LaunchConfig(128, 64, 8, 2, **_TMA, warp_spec=True, tma_rows=True),
)


def forward_configs(block_size: int, head_dim: int, tma: bool = True) -> list[LaunchConfig]:
    """Forward candidates worth timing for this block size and head dim (``tma``: allow TMA)."""
    block_d = padded_head_dim(head_dim)
    smallest = min(64, block_size)  # tiles under 64 only where the block itself is smaller
    out = []
    for cfg in _FORWARD:
        if not cfg.fits(block_size) or min(cfg.tile, cfg.sub) < smallest or (cfg.tma and not tma):
            continue
        # Large tiles with few warps would spill the fp32 accumulators.
        if cfg.tile * max(cfg.sub, block_d) > 64 * 128 * cfg.num_warps // 2:
            continue
        out.append(cfg)
    return out


def forward_interpreter_config(block_size: int) -> LaunchConfig:
    # The interpreter is fastest with few, large programs; still chunk the key block in two so
    # that the flattened (entry, chunk) loop is exercised.
    return LaunchConfig(block_size, max(16, block_size // 2), 4, 1)


def backward_configs(block_size: int, tma: bool = True) -> list[LaunchConfig]:
    """Backward candidates on a GPU that divide the block (``tma=False``: plain loads only), less
    the disabled ones."""
    cands = [c for c in _BACKWARD if c.fits(block_size) and (tma or not (c.tma or c.warp_spec or c.tma_rows))
             and c not in KERNEL_STATE.disabled]
    return cands or [LaunchConfig(min(block_size, 64), min(block_size, 32), 4, 2)]


def backward_default(block_size: int, head_dim_p2: int, on_gpu: bool) -> LaunchConfig:
    """The backward's configuration when not tuning (and always under the interpreter)."""
    if not on_gpu:
        return LaunchConfig(min(block_size, 32), min(block_size, 16), 4, 1)
    return LaunchConfig(min(block_size, 64), min(block_size, 32 if head_dim_p2 >= 128 else 64), 4, 2)


def map_configs(block_size: int, interpreter: bool) -> list[LaunchConfig]:
    """The block-sparsity map kernel's candidates: one (it is not timed). ``tile`` is the block:
    a program's tile holds ``block_size`` sampled rows at every row stride."""
    if interpreter:
        # Two chunks per key block and small key parts, so that the chunk loop and the key split
        # are exercised under the interpreter.
        return [LaunchConfig(block_size, max(16, block_size // 2), 4, 1, key_blocks=3)]
    if block_size >= 128:
        return [LaunchConfig(block_size, 64, 8, 3, key_blocks=32)]
    return [LaunchConfig(block_size, min(64, block_size), 4, 3, key_blocks=32)]


# ------------------------------------------------------------------------------------ the tuner
def tuning_key(kernel: str, x: torch.Tensor, block_size: int, n_q: int, n_k: int, programs: int,
               tma: bool, *extra) -> tuple:
    """The one key scheme: kernel, device capability, dtype, head dim, block size, TMA-usable,
    ragged query / key ends, the number of programs in powers of two, then ``extra``."""
    return (kernel, device_capability(x.device), x.dtype, x.shape[-1], block_size, tma,
            n_q % block_size != 0, n_k % block_size != 0, int(programs).bit_length(), *extra)


def choose(key: tuple, candidates, run, *, direction: str, default: LaunchConfig | None = None) -> LaunchConfig:
    """The configuration for ``key`` (GPU): the cached choice, else the fastest candidate timed with
    ``run(config)`` (each call writes, never accumulates, its outputs, so repeated runs are
    harmless), or ``default`` (else the first candidate) without timing when tuning is off or one
    candidate is left. Decided once per key. ``candidates``: a sequence, or a function returning
    one (then built only on a cache miss: the launch wrappers call this on every launch)."""
    cfg = KERNEL_STATE.tuned.get(key)
    if cfg is not None:
        return cfg
    if callable(candidates):
        candidates = candidates()
    live = [c for c in candidates if c not in KERNEL_STATE.disabled] or list(candidates)
    if not tuning_enabled(direction) or len(live) == 1:
        cfg = default if default is not None else live[0]
    else:
        cfg = _fastest(live, run, key)
    KERNEL_STATE.tuned[key] = cfg
    return cfg


def _fastest(candidates, run, key) -> LaunchConfig:
    from triton.testing import do_bench  # here: this module stays importable without triton

    best = None
    for c in candidates:
        try:
            t = do_bench(lambda: run(c), warmup=10, rep=50, return_mode="median")
        except Exception:  # a config the compiler rejects (e.g. out of shared memory): skip it
            continue
        if best is None or t < 0.99 * best[0]:
            best = (t, c)
    if best is None:
        raise RuntimeError(f"no launch configuration compiled for {key}")
    return best[1]


def tuned_configs(kernel: str | None = None) -> dict:
    """The configurations chosen so far, for reports: ``{key: LaunchConfig}`` (of one kernel)."""
    return {k: v for k, v in KERNEL_STATE.tuned.items() if kernel is None or k[0] == kernel}


def disable_configs(configs) -> None:
    """Leave these candidates out of the tuner from now on (e.g. ones a benchmark's gradient check
    or compile found failing on this machine)."""
    KERNEL_STATE.disabled.update(as_config(c) for c in configs)
