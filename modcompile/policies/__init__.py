"""Mask policies: decide which key blocks each query block attends."""
from .base import Plan, Policy, SiteContext, full_lists, make_policy, register_policy

__all__ = ["Plan", "Policy", "SiteContext", "full_lists", "make_policy", "register_policy"]
