"""What the kernels remember between calls, under one owner: :data:`KERNEL_STATE`.

``KERNEL_STATE.clear()`` forgets all of it (``modcompile.reset(kernels=True)`` calls it): the next
call on a GPU times its launch candidates again. Pure memo caches of the kernels package register
themselves here (:meth:`KernelState.memo`) so that ``clear()`` empties them too.

Not here, on purpose: ``block_lists._list_keys`` holds device constants whose addresses captured
CUDA graphs replay (the policies' selection and fit tails); emptying it while such a graph lives
would let the graph read freed memory.
"""
from __future__ import annotations


class KernelState:
    """The kernels' caches: tuned launch configurations, candidates left out, deprecation
    warnings given, device capabilities, whether cuDNN's attention with lse failed here."""

    def __init__(self):
        self.tuned: dict = {}              # tuning key (tuning.tuning_key) -> LaunchConfig
        self.disabled: set = set()         # LaunchConfigs the tuner no longer times
        self.warned_envs: set = set()      # deprecated environment variables already warned about
        self.capability: dict = {}         # CUDA device index -> (major, minor)
        self.cudnn_lse_broken = False      # cuDNN attention with lse raised once: dispatch skips it
        self._memos: list = []             # functools caches to empty on clear()

    def memo(self, fn):
        """Register a ``functools.lru_cache``-wrapped function: :meth:`clear` empties it. Returns it."""
        self._memos.append(fn)
        return fn

    def clear(self) -> None:
        self.tuned.clear()
        self.disabled.clear()
        self.warned_envs.clear()
        self.capability.clear()
        self.cudnn_lse_broken = False
        for fn in self._memos:
            fn.cache_clear()


KERNEL_STATE = KernelState()
