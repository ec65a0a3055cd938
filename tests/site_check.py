"""The site-level check of the compiled-model tests: every call of a rewritten site against a
float64 attention over the block lists its plan returned (tests/test_zoo_sparse.py)."""
import torch

from modcompile import ops
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.policies.vmoba import VmobaPolicy


class Checker:
    """Wraps ``ops.site_attention``: each call's output against the float64 attention over the
    lists it got, which must be the lists its plan returned (the state holds the plan's originals).
    ``broken`` also checks that a reference given wrong lists (each row's last listed block
    dropped) does not match: the comparison can fail."""

    def __init__(self, monkeypatch, block_size: int, broken: bool = True):
        self.calls, self.block, self.broken = [], block_size, broken
        original = ops.site_attention

        def checked(policy, ctx, q, k, v, plan, scale, key_bias=None):
            out, lse = original(policy, ctx, q, k, v, plan, scale, key_bias)
            self.check(policy, ctx, q, k, v, plan, scale, key_bias, out)
            return out, lse
        monkeypatch.setattr(ops, "site_attention", checked)

    def check(self, policy, ctx, q, k, v, plan, scale, bias, out):
        state, counts, indices = ctx.state, plan.lists.counts, plan.lists.indices
        assert torch.equal(counts, state.plan.lists.counts) and torch.equal(indices, state.plan.lists.indices)
        perm = None
        if isinstance(policy, VmobaPolicy) and not plan.dense:   # sparse VMoBA lists: permuted order
            layout = policy.layout(ctx, q.shape[2], q.device)
            perm = None if layout.identity else layout.perm.long()
        want = reference(q, k, v, counts, indices, scale, bias, perm, self.block)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=2e-5)
        if self.broken:
            wrong = reference(q, k, v, (counts - 1).clamp_min(1), indices, scale, bias, perm, self.block)
            assert (out.double() - wrong).abs().max() > 1e-2, "the reference cannot tell the lists apart"
        density = float(counts.sum()) / (counts.numel() * indices.shape[-1])
        self.calls.append((state.info.key, ctx.step, plan.dense, density))


def reference(q, k, v, counts, indices, scale, bias, perm, block):
    """float64 attention of each query block over its listed key blocks (lists in ``perm`` order)."""
    q, k, v = (t.double() for t in (q, k, v))
    bias = None if bias is None else bias.double()
    if perm is None:
        return block_sparse_attention_ref(q, k, v, counts, indices, block_size=block, scale=scale, key_bias=bias)[0]
    out, _ = block_sparse_attention_ref(q[:, :, perm], k[:, :, perm], v[:, :, perm], counts, indices,
                                        block_size=block, scale=scale, key_bias=None if bias is None else bias[:, perm])
    return torch.empty_like(out).index_copy_(2, perm, out)
