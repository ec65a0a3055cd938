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


def policy_observes(config: SparsityConfig) -> bool:
    """Whether the policy that ``config.policy`` names ever observes (the rewrite pass adds the
    observe op only then)."""
    if config.policy not in _POLICIES:
        make_policy(config)  # raises the error that names the available policies
    return _POLICIES[config.policy].observes


__all__ = ["Plan", "Policy", "SiteContext", "full_lists", "make_policy", "policy_observes", "register_policy",
           "DensePolicy", "ModPolicy", "VmobaPolicy"]
