"""The sparsity configuration that ``torch.compile(..., options={...})`` carries to the backend."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

POLICIES = ("mod", "vmoba", "dense")


@dataclass(frozen=True)
class SparsityConfig:
    """Options of the ``modsparse`` backend. Every field is a key of ``options``.

    Keys that are not fields here but name an Inductor config (``torch._inductor.config``) are passed
    through to Inductor; anything else is an error that lists the valid keys.
    """

    # --- common ---
    policy: str = "mod"                  # mod | vmoba | dense
    block_size: int = 128                # kernel block (64 or 128; smaller only for tests)
    min_seq_len: int = 1024              # shorter self-attention stays dense (too small to pay off)
    video_grid: tuple | None = None      # latent token grid (T, H, W); None = infer from the graph
    text_position: str = "last"          # where joint-attention text tokens sit: first | last
    num_steps: int | None = None         # denoising steps of a run; None = from denoising_step(), else 50
    warmup_steps: int | None = None      # dense steps at the start; None = the policy's default
    density: float | None = None         # target density (vmoba topk / mod lines per head); None = policy rule
    min_density: float = 0.0             # per-row floor of the kept fraction of key blocks
    max_density: float = 1.0             # per-row ceiling of the kept fraction of key blocks
    # --- vmoba ---
    tau: float = 0.25                    # cumulative-score threshold of the selection
    selection: str = "global"            # global | row | topk
    topk: int | None = None              # key blocks per query block in topk mode
    normalization: str = "minmax"        # minmax | softmax (how scores become mass for tau)
    partition_blocks: dict | tuple | None = None  # {"1d": (t,), "2d": (h, w), "3d": (t, h, w)} partition block shapes
    # --- mod ---
    threshold: float = 1e-4              # probability under which an entry counts as sparse
    ridge_lambda: float = 1.0            # ridge regularisation of the fit
    refresh_interval: int = 10           # steps between mask refreshes
    lines_per_head: int | None = None    # k lines per head; None = chosen by coverage
    mask_rule: str = "blocks"            # blocks: the lines set each head's budget, the densest blocks of
                                         # the last observed map fill it; lines: whole lines (the paper)
    coverage: float = 0.9                # predicted kept mass that the chosen lines must reach
    cheap_refresh: bool = True           # refresh on the sparse kernel's blocks (False: paper, dense refresh)
    full_refresh_every: int = 3          # with cheap_refresh, every n-th refresh observes every block
    full_refresh: str = "sparse"         # how: sparse (the sparse step's lse) | dense (a dense step)
    min_observed_coverage: float = 0.8   # a cheap refresh that sees less kept mass triggers a dense one
    observe_row_stride: int | None = None  # estimate the sparsity map from every n-th query row (1 = exact);
                                         # None: block_size // 8, 8 rows per block (16 at block 128; H100: 8
                                         # had the fidelity of 1, CPU: 16 the error of 8; BENCHMARKS.md)

    def __post_init__(self):
        _check(self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}")
        _check(isinstance(self.block_size, int) and self.block_size >= 16
               and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two >= 16, got {self.block_size!r}")
        _check(self.text_position in ("first", "last"),
               f"text_position must be 'first' or 'last', got {self.text_position!r}")
        if self.video_grid is not None:
            grid = tuple(self.video_grid)
            _check(len(grid) == 3 and all(isinstance(g, int) and g > 0 for g in grid),
                   f"video_grid must be three positive ints (T, H, W), got {self.video_grid!r}")
            object.__setattr__(self, "video_grid", grid)
        if isinstance(self.partition_blocks, dict):  # stored as sorted items: the config stays hashable
            items = tuple(sorted((str(k), tuple(v)) for k, v in self.partition_blocks.items()))
            object.__setattr__(self, "partition_blocks", items)
        for name in ("density", "tau", "coverage", "min_observed_coverage", "min_density", "max_density"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value!r}")
        _check(self.min_density <= self.max_density, "min_density must be <= max_density")
        _check(self.selection in ("global", "row", "topk"),
               f"selection must be global, row or topk, got {self.selection!r}")
        _check(self.normalization in ("minmax", "softmax"),
               f"normalization must be minmax or softmax, got {self.normalization!r}")
        _check(self.mask_rule in ("blocks", "lines"),
               f"mask_rule must be 'blocks' or 'lines', got {self.mask_rule!r}")
        _check(self.refresh_interval >= 1, "refresh_interval must be >= 1")
        _check(self.full_refresh_every >= 1, "full_refresh_every must be >= 1")
        _check(self.full_refresh in ("sparse", "dense"),
               f"full_refresh must be 'sparse' or 'dense', got {self.full_refresh!r}")
        _check(self.observe_row_stride is None or (
               isinstance(self.observe_row_stride, int) and not isinstance(self.observe_row_stride, bool)
               and self.observe_row_stride >= 1),
               f"observe_row_stride must be None or an int >= 1, got {self.observe_row_stride!r}")
        _check(self.num_steps is None or self.num_steps >= 1, "num_steps must be >= 1")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(self.threshold > 0, "threshold must be > 0")

    def observe_stride(self) -> int:
        """The row stride MOD observes with: ``observe_row_stride``, by default ``block_size // 8``
        (8 sampled rows per query block: the estimate's quality depends on the rows per block, the
        CPU study in BENCHMARKS.md measured 8 rows of 128 as good as 16)."""
        if self.observe_row_stride is not None:
            return self.observe_row_stride
        return max(1, self.block_size // 8)

    def replace(self, **changes) -> "SparsityConfig":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"modsparse: {message}")


def config_keys() -> list[str]:
    return [f.name for f in fields(SparsityConfig)]


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


__all__ = ["SparsityConfig", "split_options", "config_keys", "POLICIES"]
