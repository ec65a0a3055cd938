"""Pooled site outputs (modcompile/buffers.py): a buffer comes back only once nothing holds it, and
on the replayable path (forced here on CPU, with CUDA graphs faked) a compiled model's calls get the
same output buffers every step, equal results, and never overwrite an output somebody kept."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modcompile
from modcompile.buffers import SITE_OUTPUTS, BufferPool

CPU = torch.device("cpu")


def test_a_buffer_comes_back_only_when_nothing_holds_it():
    pool = BufferPool()
    a = pool.take((2, 3), torch.float32, CPU)
    first = a.data_ptr()
    b = pool.take((2, 3), torch.float32, CPU)
    assert b.data_ptr() != first                          # a is held: another buffer
    del a
    c = pool.take((2, 3), torch.float32, CPU)
    assert c.data_ptr() == first                          # back once dropped
    row = c[1]                                            # a view keeps it in use
    del c
    d = pool.take((2, 3), torch.float32, CPU)
    assert d.data_ptr() not in (first, b.data_ptr())
    del row
    assert pool.take((2, 3), torch.float32, CPU).data_ptr() == first
    assert pool.take((3, 2), torch.float32, CPU).data_ptr() != first   # another shape, another buffer
    assert pool.take((2, 3), torch.int32, CPU).dtype == torch.int32
    assert len(pool) == 5
    pool.clear()
    assert len(pool) == 0


def test_pool_bounds_and_heads_last_layout():
    pool = BufferPool(max_per_shape=2, max_bytes=64)
    held = [pool.take((4,), torch.float32, CPU) for _ in range(3)]
    assert len(pool) == 2 and len({t.data_ptr() for t in held}) == 3   # the third is not pooled
    big = pool.take((17,), torch.float32, CPU)                           # 68 bytes > max_bytes
    assert len(pool) == 2 and big.numel() == 17
    out = BufferPool().take((2, 3, 5, 4), torch.float16, CPU, heads_last=True)
    assert out.shape == (2, 3, 5, 4) and out.stride() == (60, 4, 12, 1)


class Attention(nn.Module):
    """One attention whose output leaves the model as a view of the attention op's output."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, timestep):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, N, C)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Attention() for _ in range(2))

    def forward(self, x, timestep):
        for layer in self.layers:
            x = x + layer(x, timestep)
        return x


def _run(model, x, steps, options, keep_outputs, densities=None):
    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
    cm = torch.compile(model, backend="modsparse", options={"min_seq_len": 64, "block_size": 32, **options})
    outs = []
    with torch.no_grad():
        for step in range(steps):
            with modcompile.denoising_step(step, steps):
                out = cm(x, torch.tensor([1000.0 - 100 * step]))
            outs.append(out if keep_outputs else out.clone())
            if densities is not None:
                densities.append([r.density for r in modcompile.report(print_table=False)])
            if out.shape == x.shape:  # a sampler's update, where the model maps x to its own shape
                x = x + 0.01 * out
    return outs


@pytest.mark.parametrize("policy", [pytest.param("mod", marks=pytest.mark.slow), "dense"])
def test_replayable_calls_reuse_their_outputs_and_never_overwrite_a_kept_one(policy, fresh_modcompile, request):
    """Every step after the first gets the same out / lse / list buffers per site (so the calls'
    CUDA-graph keys can repeat), results equal the unpooled path, and an output the caller keeps
    (the model returns a view of the attention output) keeps its values."""
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(1, 256, 32)
    options = {"policy": policy, "warmup_steps": 1, "refresh_interval": 2} if policy == "mod" else {"policy": policy}
    reference = _run(model, x, 5, options, keep_outputs=False)
    keys = request.getfixturevalue("replayable_on_cpu")
    kept = _run(model, x, 5, options, keep_outputs=True)
    snapshots = [o.clone() for o in kept]
    for step, (a, b) in enumerate(zip(reference, kept)):
        assert torch.equal(a, b), f"step {step}"
    # the output leaves as a view of a pooled buffer (so this test does exercise a kept buffer)...
    pooled = {buf.data_ptr() for entries in SITE_OUTPUTS._buffers.values() for buf, _ in entries}
    assert any(o.data_ptr() in pooled for o in kept)
    # ...and nothing later overwrote a kept one
    for step, (a, b) in enumerate(zip(kept, snapshots)):
        assert torch.equal(a, b), f"step {step}'s output was overwritten"
    assert len(keys) == 5
    # the lists, which nobody keeps, come back at one address every step; the kept outputs cannot
    lists = {key[-1][3:5] for key in keys}
    outputs = {key[-1][6] for key in keys}
    assert len(lists) == 1 and len(outputs) == 5


@pytest.mark.parametrize("policy", ["vmoba", pytest.param("mod", marks=pytest.mark.slow)])
def test_replayable_path_equals_the_unpooled_path_in_a_compiled_dit(policy, fresh_modcompile, request):
    """A DiT with two layers of video attention (VMoBA permutes k into a pooled buffer), outputs
    not kept: the same results as the unpooled path, and from the second sparse step on every
    site's own tensors sit at the addresses of the step before."""
    from models import TinyVideoDiT
    torch.manual_seed(1)
    model = TinyVideoDiT(dim=32, heads=2, layers=2).eval()
    x = torch.randn(1, 4, 4, 16, 16)
    options = {"policy": policy, "warmup_steps": 1, **({"coverage": 0.5} if policy == "mod" else {})}
    densities, pooled_densities = [], []
    reference = _run(model, x, 5, options, keep_outputs=False, densities=densities)
    keys = request.getfixturevalue("replayable_on_cpu")
    pooled = _run(model, x, 5, options, keep_outputs=False, densities=pooled_densities)
    for step, (a, b) in enumerate(zip(reference, pooled)):
        assert torch.equal(a, b), f"step {step}"
    rows = modcompile.report(print_table=False)
    assert all(r.status == "sparse" for r in rows), rows
    # the density report (summed inside the replayed call on this path) is every step's as before
    assert pooled_densities == densities and any(0 < d < 1 for step in densities for d in step)
    per_step = len(keys) // 5
    assert per_step == 2
    own = [key[-1][3:] for key in keys]  # lists, key bias, out, lse, density (and VMoBA's permuted k)
    for step in (3, 4):
        assert own[step * per_step:(step + 1) * per_step] == own[(step - 1) * per_step:step * per_step]


@pytest.mark.slow
def test_harness_reads_lists_only_from_an_inspected_pass(fresh_modcompile, replayable_on_cpu):
    """Replayed calls hand their lists back to the pool, so a benchmark reading a step's lists gets
    None and a clear error from ``attend``; under ``benchmarks.backend.inspectable()`` the same calls
    take the eager path (no replay keys), give the same outputs, and leave every site's lists."""
    from benchmarks import backend as mb
    from models import TinyVideoDiT
    torch.manual_seed(2)
    model = TinyVideoDiT(dim=32, heads=2, layers=2).eval()
    x = torch.randn(1, 4, 4, 16, 16)
    outs = _run(model, x, 3, {"policy": "vmoba", "warmup_steps": 1}, keep_outputs=False)
    assert len(replayable_on_cpu) == 6
    plans = mb.current_site_plans("vmoba")
    assert len(plans) == 2 and all(p["kv_counts"] is None and not p["dense"] for p in plans.values())
    q = torch.randn(1, 2, 256, 16)
    with pytest.raises(RuntimeError, match="inspectable"):
        plans[0]["attend"](q, q, q)

    replayable_on_cpu.clear()
    with mb.inspectable():
        again = _run(model, x, 3, {"policy": "vmoba", "warmup_steps": 1}, keep_outputs=False)
    assert replayable_on_cpu == []
    for a, b in zip(outs, again):
        assert torch.equal(a, b)
    plans = mb.current_site_plans("vmoba")
    assert len(plans) == 2
    for p in plans.values():
        counts, indices = p["kv_counts"], p["kv_indices"]
        assert counts is not None and counts.dtype == torch.int32 and indices.shape[:3] == counts.shape
        assert 0 < p["density"] < 1
        out, lse = p["attend"](q, q, q)
        assert out.shape == q.shape and torch.isfinite(lse).all()


@pytest.mark.slow
def test_mod_lists_keep_their_addresses_across_refreshes(fresh_modcompile, replayable_on_cpu):
    """On the replayable path the plan op leaves the list copies to the attention call's graph,
    which reads MOD's lists where its refreshes write them: every sparse call of a site names the
    same source lists, refresh or not, so its CUDA-graph key can repeat for the whole schedule."""
    from models import TinyVideoDiT
    torch.manual_seed(3)
    model = TinyVideoDiT(dim=32, heads=2, layers=2).eval()
    x = torch.randn(1, 4, 4, 16, 16)
    options = {"policy": "mod", "warmup_steps": 1, "refresh_interval": 2, "coverage": 0.5}
    _run(model, x, 8, options, keep_outputs=False)
    assert len(replayable_on_cpu) == 16
    sources = {}
    for i, key in enumerate(replayable_on_cpu):
        if not key[1]:  # sparse calls (dense ones copy the cached full lists)
            sources.setdefault(i % 2, set()).add(key[-1][9:11])  # per layer: the lists copied from
    assert sorted(sources) == [0, 1]
    assert all(len(s) == 1 and None not in next(iter(s)) for s in sources.values()), sources
    events = [e for st in modcompile.runtime.REGISTRY.states.values() if st.policy_state is not None
              for e in st.policy_state.events]
    assert any(e[1].startswith("refresh") for e in events), events  # the schedule did refresh


def test_report_says_how_many_calls_replayed_and_which_captures_failed(fresh_modcompile, replayable_on_cpu, capsys):
    """report()'s last line: the site calls' CUDA-graph replays, and failed captures (a lost fast
    path is not silent); no line when no call went through the graphs."""
    from modcompile import cuda_graphs
    from modcompile.report import graph_replays
    assert graph_replays() == ""
    torch.manual_seed(0)
    _run(Attention().eval(), torch.randn(1, 256, 32), 4, {"policy": "dense"}, keep_outputs=False)
    calls = cuda_graphs.SITE_CALLS
    assert calls.eager_calls + calls.replays == 4  # (on CPU the activations' addresses seldom repeat)
    modcompile.report()
    assert f"CUDA graphs: attention calls {calls.replays} of 4 replayed" in capsys.readouterr().out
    calls.failures = 1
    assert "1 failed captures (those calls stay eager" in graph_replays()
