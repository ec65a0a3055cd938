"""The sparsity configuration that ``torch.compile(..., options={...})`` carries to the backend.

One schema: every option is a field of ``SparsityConfig`` whose metadata holds its ``Spec`` (type,
range or allowed values, whether None is allowed), and ``CONSTRAINTS`` holds the rules between
keys. Both are checked when a config is built, so ``split_options`` (the backend's entry) rejects
a bad value with a ValueError that names the key, the value and what is allowed.

Types are strict: an int option takes an int (not a bool, not 2.5 or 2.0), a float option an int
or a float (finite; not a str or bool), a flag only True or False (not "no", not 0/1: a string is
truthy, and an int where a flag belongs is more likely a misplaced value than a choice).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields

from .kernels._common import SUPPORTED_BLOCK_SIZES
from .kernels.partition import KINDS as PARTITION_KINDS
from .kernels.partition import check_block_shape

POLICIES = ("mod", "vmoba", "dense")


class _Rejected(Exception):
    """A value does not fit its spec; the argument says why, when more than the spec can say."""


def _as_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _Rejected()
    return int(value)


def _as_float(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _Rejected()
    return float(value)


def _as_bool(value) -> bool:
    if not isinstance(value, bool):
        raise _Rejected()
    return value


def _as_str(value) -> str:
    if not isinstance(value, str):
        raise _Rejected()
    return value


def _as_grid(value) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise _Rejected()
    grid = tuple(_as_int(g) for g in value)
    if min(grid) < 1:
        raise _Rejected()
    return grid


def _as_partition_blocks(value) -> tuple:
    """A dict {kind: shape}, or the stored form (sorted (kind, shape) items: the config stays
    hashable) -> the stored form."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (tuple, list)) and all(isinstance(i, (tuple, list)) and len(i) == 2 for i in value):
        items = [tuple(i) for i in value]
    else:
        raise _Rejected()
    out = []
    for kind, shape in items:
        if kind not in PARTITION_KINDS:
            raise _Rejected(f"partition_blocks keys must be in {PARTITION_KINDS}, got {kind!r}")
        try:
            out.append((kind, check_block_shape(kind, shape)))
        except ValueError as e:
            raise _Rejected(str(e)) from None
    if len({kind for kind, _ in out}) != len(out):
        raise _Rejected("a partition kind appears twice")
    return tuple(sorted(out))


_PARSERS = {  # kind -> (parser, how it reads in an error message)
    "int": (_as_int, "an int"),
    "float": (_as_float, "a float"),
    "bool": (_as_bool, "True or False"),
    "str": (_as_str, "a str"),
    "grid": (_as_grid, "three positive ints (T, H, W)"),
    "partition_blocks": (_as_partition_blocks,
                         "a dict {'1d': (t,), '2d': (h, w), '3d': (t, h, w)} of positive ints"),
}


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Spec:
    """What one option accepts: a kind of value (a key of ``_PARSERS``), then allowed values or a range."""

    kind: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False          # the low end itself is not allowed
    optional: bool = False          # None is allowed (and means: the policy's default rule)

    def allowed(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = _PARSERS[self.kind][1]
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
        return f"None or {text}" if self.optional else text

    def parse(self, key: str, value):
        """``value`` in its stored form, or a ValueError naming the key, the value and what is allowed."""
        if value is None and self.optional:
            return None
        try:
            parsed = _PARSERS[self.kind][0](value)
            if self.choices and parsed not in self.choices:
                raise _Rejected()
            if self.low is not None and (parsed < self.low or (self.low_open and parsed == self.low)):
                raise _Rejected()
            if self.high is not None and parsed > self.high:
                raise _Rejected()
        except _Rejected as e:
            why = f" ({e.args[0]})" if e.args else ""
            raise ValueError(f"modsparse: option {key}={value!r} is invalid{why}; allowed: {self.allowed()}") from None
        return parsed


def option(default, kind: str, **spec):
    """A config field with its spec in the field's metadata."""
    return field(default=default, metadata={"spec": Spec(kind, **spec)})


def _fraction(default, optional=False):
    return option(default, "float", low=0.0, high=1.0, optional=optional)


@dataclass(frozen=True)
class SparsityConfig:
    """Options of the ``modsparse`` backend. Every field is a key of ``options``.

    Keys that are not fields here but name an Inductor config (``torch._inductor.config``) are passed
    through to Inductor; anything else is an error that lists the valid keys.
    """

    # --- common ---
    policy: str = option("mod", "str", choices=POLICIES)
    block_size: int = option(128, "int", choices=SUPPORTED_BLOCK_SIZES)  # the kernel's (GPU: 64 or 128)
    min_seq_len: int = option(1024, "int", low=0)      # shorter self-attention stays dense (too small to pay off)
    video_grid: tuple | None = option(None, "grid", optional=True)  # latent (T, H, W); None = inferred
    # where joint-attention text sits; None = the model's (modcompile/layout.py), "last" when unknown
    text_position: str | None = option(None, "str", choices=("first", "last"), optional=True)
    num_steps: int | None = option(None, "int", low=1, optional=True)  # None = from denoising_step(), else 50
    warmup_steps: int | None = option(None, "int", low=0, optional=True)  # dense steps first; None = the policy's
    density: float | None = _fraction(None, optional=True)  # vmoba topk / mod lines per head; None = policy rule
    min_density: float = _fraction(0.0)   # per-row floor of the kept fraction of key blocks
    max_density: float = _fraction(1.0)   # per-row ceiling of the kept fraction of key blocks
    # --- vmoba ---
    tau: float = _fraction(0.25)          # cumulative-score threshold of the selection
    selection: str = option("global", "str", choices=("global", "row", "topk"))
    topk: int | None = option(None, "int", low=1, optional=True)  # key blocks per query block in topk mode
    normalization: str = option("minmax", "str", choices=("minmax", "softmax"))  # how scores become mass for tau
    # {"1d": (t,), "2d": (h, w), "3d": (t, h, w)}, stored as sorted items (the config stays hashable)
    partition_blocks: tuple | None = option(None, "partition_blocks", optional=True)
    # --- mod ---
    # probability under which an attention entry counts as sparse
    threshold: float = option(1e-4, "float", low=0.0, high=1.0, low_open=True)
    # ridge regularisation of the fit (> 0: the fit inverts the regularised Gram matrix)
    ridge_lambda: float = option(1.0, "float", low=0.0, low_open=True)
    refresh_interval: int = option(10, "int", low=1)  # steps between mask refreshes (the longest gap)
    # fixed: every refresh_interval steps after the warm-up | doubling: 1, 2, 4, 8, ... steps after it, the
    # gap doubling up to refresh_interval (better on the CPU testbed, not on the GPU one: BENCHMARKS.md section 8)
    refresh_schedule: str = option("fixed", "str", choices=("fixed", "doubling"))
    lines_per_head: int | None = option(None, "int", low=0, optional=True)  # None = chosen by coverage
    # mass: the densest blocks of the site by observed attention mass; blocks: the lines set each
    # head's budget, the blocks densest in the threshold map fill it; lines: whole lines (the paper)
    mask_rule: str = option("mass", "str", choices=("mass", "blocks", "lines"))
    coverage: float = _fraction(0.9)      # predicted kept mass that the mask must reach
    cheap_refresh: bool = option(True, "bool")  # refresh on the sparse kernel's blocks (False: the paper's dense)
    full_refresh_every: int = option(3, "int", low=1)  # with cheap_refresh, every n-th refresh sees every block
    # how a full refresh observes: sparse (the sparse step's lse) | dense (a dense step)
    full_refresh: str = option("sparse", "str", choices=("sparse", "dense"))
    # a sparse refresh keeping less of the mass triggers a dense one (full refreshes measure the kept
    # share; cheap ones estimate it from pooled keys, which on trained models sees little of the loss)
    min_observed_coverage: float = _fraction(0.8)
    # observe the maps from every n-th query row of each block; 1 = exact (the default: sampled rows
    # misjudge heads whose rows attend different blocks; BENCHMARKS.md section 8, where the mask errs)
    observe_row_stride: int = option(1, "int", low=1)
    # where a NaN / Inf in k or v shows: listed (the rows whose lists hold its block, always its own
    # block's rows: free) | dense (every row dense SDPA would spoil: one more read of k and v per sparse
    # call, the NaN written by the kernel's epilogue; kernels/nonfinite.py)
    nonfinite: str = option("listed", "str", choices=("listed", "dense"))
    # --- precision (inference calls; training keeps the inputs' dtype: fp8 has no backward) ---
    # auto: the inputs' dtype | fp8: sparse calls on the 8-bit kernel (int8 q, k; e4m3 P, v: kernels/fp8_attention.py)
    precision: str = option("auto", "str", choices=("auto", "fp8"))
    fp8_dense: bool = option(False, "bool")  # dense calls (warm-up, dense refreshes) on the fp8 kernel at density 1

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["spec"].parse(f.name, getattr(self, f.name)))
        for keys, holds, rule in CONSTRAINTS:
            if not holds(self):
                values = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)
                raise ValueError(f"modsparse: options {values} conflict: {rule}")

    def replace(self, **changes) -> "SparsityConfig":
        return dataclasses.replace(self, **changes)


# Rules between keys: (the keys, a predicate on the config, the rule in words).
CONSTRAINTS = (
    (("min_density", "max_density"), lambda c: c.min_density <= c.max_density,
     "min_density must be <= max_density"),
    (("selection", "topk", "density"),
     lambda c: c.selection != "topk" or c.topk is not None or (c.density or 0.0) > 0.0,
     "selection='topk' needs topk or a density > 0 (the blocks kept per row)"),
)


def config_keys() -> list[str]:
    return [f.name for f in fields(SparsityConfig)]


def option_specs() -> dict[str, Spec]:
    """Each option's spec, by key."""
    return {f.name: f.metadata["spec"] for f in fields(SparsityConfig)}


def split_options(options: dict | None) -> tuple[SparsityConfig, dict, str | None]:
    """Split torch.compile's ``options`` into our config, Inductor config patches and an Inductor
    mode (torch.compile refuses ``mode=`` together with ``options=``, so ``options["mode"]``
    carries it)."""
    import torch._inductor.config as inductor_config

    ours, inductor, unknown, mode = {}, {}, [], None
    valid = set(config_keys())
    for key, value in (options or {}).items():
        if key == "mode":
            mode = value
        elif key in valid:
            ours[key] = value
        elif _is_inductor_key(inductor_config, key):
            inductor[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"modsparse: unknown option(s) {sorted(unknown)}; valid modsparse options: "
            f"{sorted(valid)} (Inductor config keys are passed through to Inductor)")
    return SparsityConfig(**ours), inductor, mode


def _is_inductor_key(inductor_config, key: str) -> bool:
    obj = inductor_config
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


__all__ = ["SparsityConfig", "Spec", "CONSTRAINTS", "split_options", "config_keys", "option_specs", "POLICIES"]
