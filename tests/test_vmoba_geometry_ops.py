"""VMoBA: block alignment with kernel blocks (default shapes, aligned-first order) and the op budget
of a plan call (a device-independent proxy for kernel launches and host syncs)."""
import collections
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.profiler import ProfilerActivity, profile

from modcompile.config import SparsityConfig
from modcompile.kernels import partition as P
from modcompile.policies.base import SiteContext
from modcompile.policies import vmoba as vmoba_module
from modcompile.policies.vmoba import VmobaPolicy
from modcompile.sites import SiteInfo, SiteState


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 8)), st.sampled_from(P.KINDS),
       st.integers(1, 9), st.sampled_from([4, 8, 16]), st.integers(0, 5), st.sampled_from(["first", "last"]))
def test_aligned_order_keeps_the_blocks_and_footprint_is_exact(grid, kind, side, block, text, position):
    shape = {"1d": (side,), "2d": (side, max(1, side // 2)), "3d": (max(1, side // 3), side, 2)}[kind]
    raster = P.build_partition(grid, kind, shape, text, position)
    aligned = P.build_partition(grid, kind, shape, text, position, align=block)
    blocks = lambda p: [frozenset(p.perm[p.starts[b]:p.starts[b + 1]].tolist()) for b in range(p.num_blocks)]
    assert sorted(map(sorted, blocks(raster))) == sorted(map(sorted, blocks(aligned)))
    sizes = (aligned.starts[1:] - aligned.starts[:-1])
    multiple = (sizes % block == 0).tolist()
    assert multiple == sorted(multiple, reverse=True)  # aligned blocks first
    assert sorted(aligned.perm.tolist()) == list(range(aligned.seq_len))
    # the footprint formula equals the kernel incidence count of the real layout
    for p in (raster, aligned):
        inc, _ = P.kernel_incidence(p, block)
        n_video = grid[0] * grid[1] * grid[2]
        sizes = (p.starts[1:] - p.starts[:-1]).numpy()
        offset = text if position == "first" else 0
        assert math.isclose(P.kernel_footprint(sizes, offset, block), block * int(inc.sum()) / n_video)


def test_default_shapes_reduce_straddling_on_wan_and_stay_aligned_on_demo_grid():
    wan, block = (21, 30, 52), 128
    old = {"2d": (3, 2), "3d": (4, 8, 4)}
    for kind, old_shape in old.items():
        new = P.default_block_shape(wan, kind, block)
        f_old = min(P.layout_footprints(wan, kind, old_shape, block))
        f_new = min(P.layout_footprints(wan, kind, new, block))
        assert f_new < f_old - 0.1, (kind, new, f_new, f_old)
    assert P.default_block_shape(wan, "3d", block) == (4, 8, 8)
    assert P.alignment_for(wan, "3d", (4, 8, 8), block) == block
    for kind in P.KINDS:  # 16x32x32: every default block is a union of whole kernel blocks
        shape = P.default_block_shape((16, 32, 32), kind, block)
        assert P.layout_footprints((16, 32, 32), kind, shape, block)[0] == 1.0


def _ctx(cfg, grid, n, layer):
    info = SiteInfo(key=f"t/{layer}", layer=layer, module_path="t", config=cfg, status="sparse", seq_len=n,
                    grid=grid, text_tokens=n - math.prod(grid))
    return SiteContext(info=info, state=SiteState(info=info, pass_index=0), step=10, num_steps=11, config=cfg)


# Measured: 47 top-level aten ops per plan call on CPU (75 before caching the constants and dropping
# the unneeded rank sort); the bound leaves margin for harmless refactors, not for a return of
# per-call constant construction.
PLAN_OP_BUDGET = 56
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::tolist"}


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_plan_call_stays_within_op_budget_and_has_no_host_sync(layer, monkeypatch):
    # the torch pooling path: the Triton interpreter's own tensor ops would swamp the count
    monkeypatch.setattr(vmoba_module, "_use_triton", lambda x: False)
    grid, n = (4, 8, 16), 4 * 8 * 16 + 8
    cfg = SparsityConfig(policy="vmoba", block_size=32, tau=0.25)
    policy, ctx = VmobaPolicy(cfg), _ctx(cfg, grid, n, layer)
    q, k = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    first = policy.plan(ctx, q, k)  # builds the cached layout
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        again = policy.plan(ctx, q, k)
    assert torch.equal(first.lists.counts, again.lists.counts) and torch.equal(first.lists.indices, again.lists.indices)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    names = collections.Counter(e.name for e in events)
    assert not SYNC_OPS & set(names), names
    assert len(top) <= PLAN_OP_BUDGET, collections.Counter(e.name for e in top)
    assert names["aten::sort"] <= 2 and names["aten::argsort"] == 0  # threshold + lists: no rank sort
    top_names = collections.Counter(e.name for e in top)
    assert top_names["aten::arange"] == 0 and top_names["aten::eye"] == 0  # cached per geometry and device
