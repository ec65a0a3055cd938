"""The ``dense`` policy: every block. The rewritten model must equal the original."""
from .base import Plan, Policy, SiteContext, register_policy


@register_policy
class DensePolicy(Policy):
    name = "dense"

    def plan(self, ctx: SiteContext, q, k, key_bias=None) -> Plan:
        return ctx.full_plan(q, k, why="policy dense")
