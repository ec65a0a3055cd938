"""Mask policies: decide which key blocks each query block attends."""
from ..config import SparsityConfig
from .base import _POLICIES, Plan, Policy, SiteContext, full_lists, register_policy
# The built-in policies register themselves on import.
from .dense import DensePolicy
from .mod import ModPolicy
from .vmoba import VmobaPolicy


def make_policy(config: SparsityConfig) -> Policy:
    """The registered policy that ``config.policy`` names, built for ``config``."""
    if config.policy not in _POLICIES:
        raise ValueError(f"modsparse: policy {config.policy!r} is not available "
                         f"(have {sorted(_POLICIES)})")
    return _POLICIES[config.policy](config)


__all__ = ["Plan", "Policy", "SiteContext", "full_lists", "make_policy", "register_policy",
           "DensePolicy", "ModPolicy", "VmobaPolicy"]
