"""CUDA-graph replay of the VMoBA selection tail (modcompile/cuda_graphs.py): the switch and the
cache key on CPU; on a GPU, replayed block lists equal eager ones over steps with different q/k."""
import math

import pytest
import torch

import modcompile
from modcompile import cuda_graphs
from modcompile.config import SparsityConfig
from modcompile.kernels import pooling
from modcompile.policies.base import SiteContext
from modcompile.policies.vmoba import VmobaPolicy
from modcompile.sites import SiteInfo, SiteState

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def _ctx(config, grid, layer, step=30, num_steps=40):
    n = math.prod(grid)
    info = SiteInfo(key=f"test/attn#{layer}", layer=layer, module_path="attn", config=config, status="sparse",
                    seq_len=n, grid=grid)
    return SiteContext(info=info, state=SiteState(info=info, pass_index=0), step=step, num_steps=num_steps,
                       config=config)


# ----------------------------------------------------------------------------- CPU: switch and key

def test_switch(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "interpreting", lambda: False)
    monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    assert cuda_graphs.enabled(torch.device("cuda"))
    assert cuda_graphs.enabled(torch.device("cuda", 1))
    assert not cuda_graphs.enabled(torch.device("cpu"))
    for off in ("0", ""):
        monkeypatch.setenv(cuda_graphs.ENV, off)
        assert not cuda_graphs.enabled(torch.device("cuda"))
    monkeypatch.setenv(cuda_graphs.ENV, "1")
    monkeypatch.setattr(cuda_graphs, "interpreting", lambda: True)
    assert not cuda_graphs.enabled(torch.device("cuda"))


def test_vmoba_graph_cache_key(monkeypatch):
    cfg = SparsityConfig(policy="vmoba", block_size=16)
    policy = VmobaPolicy(cfg)
    grid = (4, 8, 8)
    layouts = [policy.layout(_ctx(cfg, grid, layer), math.prod(grid), torch.device("cpu")) for layer in (0, 1)]
    pooled = torch.zeros(1, 2, layouts[0].partition.num_blocks, 16)
    # CPU: never graphed
    assert not isinstance(policy.lists_fn(layouts[0], pooled), cuda_graphs.GraphedCall)
    monkeypatch.setattr(cuda_graphs, "enabled", lambda device: True)
    first = policy.lists_fn(layouts[0], pooled)
    assert isinstance(first, cuda_graphs.GraphedCall)
    assert policy.lists_fn(layouts[0], pooled) is first                       # same layout and shape
    assert policy.lists_fn(layouts[0], torch.zeros(2, 2, *pooled.shape[2:])) is not first  # batch
    assert policy.lists_fn(layouts[0], pooled[..., :8]) is not first          # head dim (scale)
    assert policy.lists_fn(layouts[1], torch.zeros(1, 2, layouts[1].partition.num_blocks, 16)) is not first
    assert len(policy._graphs) == 4
    # the first call of a key runs eagerly (warm-up) and gives the eager lists
    k_pool = torch.randn_like(pooled)
    q_pool = torch.randn_like(pooled)
    counts, indices = first(q_pool, k_pool)
    ref_counts, ref_indices = policy.block_lists(q_pool, k_pool, layouts[0], scale=0.25)
    assert first.eager_calls == 1 and first.graph is None
    assert torch.equal(counts, ref_counts) and torch.equal(indices, ref_indices)


# ----------------------------------------------------------------------------- GPU: replay == eager

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("selection", ["global", "row", "topk"])
def test_replayed_lists_equal_eager(layer, selection, monkeypatch):
    monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    cfg = SparsityConfig(policy="vmoba", block_size=64, selection=selection, tau=0.3,
                         topk=3 if selection == "topk" else None, min_density=0.1, max_density=0.6)
    policy = VmobaPolicy(cfg)
    grid = (8, 16, 16)
    n = math.prod(grid)
    ctx = _ctx(cfg, grid, layer)
    layout = policy.layout(ctx, n, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(layer)
    call = None
    for step in range(5):
        q = torch.randn(2, 3, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(2, 3, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        _, _, q_pool, k_pool = policy.permute_pool(q, k, layout)
        call = policy.lists_fn(layout, q_pool)
        counts, indices = call(q_pool, k_pool)
        ref_counts, ref_indices = policy.block_lists(q_pool, k_pool, layout, scale=1 / 8)
        assert torch.equal(counts, ref_counts), step
        assert torch.equal(indices, ref_indices), step
        assert (counts < indices.shape[-1]).any()  # really sparse, so equality says something
    assert isinstance(call, cuda_graphs.GraphedCall) and not call.failed
    assert call.eager_calls == 1 and call.replays == 4


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_compiled_vmoba_replays_and_switch(graphs, fresh_modcompile, monkeypatch):
    """Compiled model: the plan replays its graphs (switch on) or never captures (switch off). On
    this inference path the whole plan (pooling, selection, lists) replays from one graph
    (SITE_PLANS), which records the selection's own graph's work inside it."""
    monkeypatch.setenv(cuda_graphs.ENV, graphs)
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")  # kernel timing is not what this test is about
    modcompile.ops.policy_for.cache_clear()  # a fresh policy: no graphs from an earlier test
    from benchmarks.video_dit import DiTConfig, VideoDiT
    torch.manual_seed(0)
    cfg = DiTConfig(latent=(8, 32, 32), dim=128, depth=3, heads=2, freq_dim=32)  # 8x16x16 = 2048 tokens
    model = VideoDiT(cfg)
    with torch.no_grad():  # adaLN-zero: random weights instead, so attention sees real inputs
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    model = model.cuda().half().eval()
    x = torch.randn(1, 4, *cfg.latent, device="cuda", dtype=torch.half)
    cm = torch.compile(model, backend="modsparse",
                       options={"policy": "vmoba", "min_seq_len": 256, "block_size": 64, "warmup_steps": 1})
    outs = []
    with torch.no_grad():
        for step in range(5):
            with modcompile.denoising_step(step, 5):
                outs.append(cm(x * (1 + 0.1 * step), torch.full((1,), 1000.0 - 100 * step, device="cuda")))
    policy = modcompile.ops.policy_for(next(iter(modcompile.runtime.REGISTRY.sites.values())).config)
    calls = [entry[1] for entry in policy._graphs.values()]
    plans = cuda_graphs.SITE_PLANS
    if graphs == "1":
        assert calls and not any(c.failed for c in calls)
        assert plans.replays >= 1 and plans.failures == 0
    else:
        assert not calls and not plans.entries
    assert all(torch.isfinite(o).all() for o in outs)


# ----------------------------------------------------------------------------- MOD observation tail

def _mod_tail_inputs(geom, fg, batch, heads, cheap, build, device, seed, counted=True):
    """observe_tail's inputs; ``counted``: with the count map (the blocks / lines rules), else the
    mass rule's (the mass map alone, no fit)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nb = geom.nb
    raw = torch.rand(batch, heads, nb, nb, generator=g)
    mass = torch.rand(batch, heads, nb, nb, generator=g) / nb
    inputs = [raw, mass]
    if cheap:
        unobserved = torch.rand(heads, nb, nb, generator=g) < 0.5   # the same per batch entry
        raw[:, unobserved] = mass[:, unobserved] = -1.0
        inputs += [torch.rand(heads, nb, nb, generator=g), torch.rand(heads, nb, nb, generator=g) / nb]
    if not counted:
        return [x.to(device) for x in inputs[1::2]]
    if build:
        inputs += [torch.randn(heads, geom.num_basis, generator=g) * 0.1,
                   torch.tensor([float(1 + seed % 3), 5.5])]
    return [x.to(device) for x in inputs]


def test_mod_tail_graph_cache_key(monkeypatch):
    from modcompile.policies.mod import ModPolicy
    from modcompile.policies.mod_observe import observe_tail
    from modcompile.policies.mod_fit import Geometry, fit_geometry
    cfg = SparsityConfig(block_size=16, mask_rule="blocks")
    policy = ModPolicy(cfg)
    geom = Geometry(70, 16, (2, 5, 6), 10, "last")
    fg = fit_geometry(geom, cfg.ridge_lambda, "cpu")
    assert not isinstance(policy.observe_tail(fg, 1, 2, True, True), cuda_graphs.GraphedCall)  # CPU: eager
    monkeypatch.setattr(cuda_graphs, "enabled", lambda device: True)
    first = policy.observe_tail(fg, 1, 2, True, True)
    assert isinstance(first, cuda_graphs.GraphedCall)
    assert policy.observe_tail(fg, 1, 2, True, True) is first
    others = [policy.observe_tail(fg, *args) for args in ((2, 2, True, True), (1, 3, True, True),
                                                          (1, 2, False, True), (1, 2, True, False))]
    assert len({id(c) for c in others + [first]}) == 5
    other_geom = fit_geometry(Geometry(70, 16, None), cfg.ridge_lambda, "cpu")
    assert policy.observe_tail(other_geom, 1, 2, True, True) is not first
    # the first call of a key runs eagerly and gives the eager outputs
    inputs = _mod_tail_inputs(geom, fg, 1, 2, True, True, "cpu", 0)
    got = first(*inputs)
    want = observe_tail(fg, cfg, 1, True, True, *inputs)
    assert first.eager_calls == 1 and first.graph is None
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cheap,build", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("rule", ["mass", "blocks"])
def test_mod_tail_replay_equals_eager(cheap, build, rule, monkeypatch):
    monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    from modcompile.policies.mod import ModPolicy
    from modcompile.policies.mod_observe import observe_tail
    from modcompile.policies.mod_fit import Geometry, fit_geometry
    cfg = SparsityConfig(block_size=64, coverage=0.85, min_density=0.05, max_density=0.7, mask_rule=rule)
    policy = ModPolicy(cfg)
    geom = Geometry(8 * 16 * 16 + 40, 64, (8, 16, 16), 40, "last")     # ragged last block, text tokens
    fg = fit_geometry(geom, cfg.ridge_lambda, torch.device("cuda"))
    call = None
    for step in range(5):
        inputs = _mod_tail_inputs(geom, fg, 2, 3, cheap, build, "cuda", step, counted=rule != "mass")
        call = policy.observe_tail(fg, 2, 3, cheap, build)
        got = call(*inputs)
        want = observe_tail(fg, cfg, 2, cheap, build, *inputs)
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (step, i)
        if build:
            assert (got[-2] < geom.nb).any()  # really sparse, so equality says something
    assert isinstance(call, cuda_graphs.GraphedCall) and not call.failed
    assert call.eager_calls == 1 and call.replays == 4


def _run_mod_generation(policy, state, info, qkv, num_steps, check_sync: bool):
    """One generation of a MOD site driven like the ops do; returns the lists of every step."""
    from modcompile.ops import site_attention
    state.policy_state = None  # a new generation: fresh policy state, same policy (graph cache)
    lists = []
    for step in range(num_steps):
        q, k, v = qkv(step)
        ctx = SiteContext(info=info, state=state, step=step, num_steps=num_steps, config=info.config)
        with _sync_mode("error" if check_sync else "default"):
            plan = policy.plan(ctx, q, k)
        _, lse = site_attention(policy, ctx, q, k, v, plan, 1 / math.sqrt(q.shape[-1]))
        if plan.observe:
            with _sync_mode("error" if check_sync else "default"):
                policy.observe(ctx, q, k, lse, plan)
        lists.append((plan.dense, plan.lists.counts.clone(), plan.lists.indices.clone()))
    return lists


class _sync_mode:
    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.old)


@pytest.mark.gpu
@needs_cuda
def test_mod_policy_graphed_equals_eager_without_host_syncs(monkeypatch):
    """A 20-step MOD schedule (warm-up pair, cheap refreshes, a full refresh) on the GPU: with the
    tail graphed the lists of every step equal the eager run's, and from the third generation on
    (every tail kind captured) plan and observe never synchronize with the device."""
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")
    from modcompile.policies.mod import ModPolicy
    cfg = SparsityConfig(block_size=64, refresh_interval=3, full_refresh_every=3, min_observed_coverage=0.0,
                         num_steps=20)
    grid = (4, 16, 16)
    n = math.prod(grid)
    info = SiteInfo(key="test/mod#0", layer=0, module_path="attn", config=cfg, status="sparse", seq_len=n,
                    heads=2, head_dim=64, grid=grid, text_tokens=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.arange(n, device="cuda", dtype=torch.float32) / 48.0
    feat = torch.cat([torch.cos(pos[:, None] * torch.arange(1, 33, device="cuda") * 0.2),
                      torch.sin(pos[:, None] * torch.arange(1, 33, device="cuda") * 0.2)], -1)
    base = [feat.expand(1, 2, n, 64) * 3 + 0.3 * torch.randn(1, 2, n, 64, device="cuda", generator=g)
            for _ in range(3)]
    drift = [torch.randn(1, 2, n, 64, device="cuda", generator=g) for _ in range(3)]

    def qkv(step):
        return tuple((b + 0.02 * step * d).half().contiguous() for b, d in zip(base, drift))

    runs = {}
    for graphs in ("0", "1"):
        monkeypatch.setenv(cuda_graphs.ENV, graphs)
        policy = ModPolicy(cfg)
        state = SiteState(info=info, pass_index=0)
        gens = [_run_mod_generation(policy, state, info, qkv, 20, check_sync=(graphs == "1" and gen == 2))
                for gen in range(3)]
        runs[graphs] = gens
        events = [e for e in state.policy_state.events if e[1].startswith("refresh")]
        # warm-up 5 (observed 3, 4); refreshes every 3 steps from 8, every third one full (on the
        # sparse step: the dense kind's tail, so still three tails)
        assert events == [(8, "refresh-cheap"), (11, "refresh-cheap"), (14, "refresh-full"),
                          (17, "refresh-cheap")], events
        if graphs == "1":
            calls = list(policy._tails.values())
            assert len(calls) == 3 and all(c.replays >= 1 and not c.failed for c in calls)
        else:
            assert not policy._tails
    for eager_gen, graphed_gen in zip(runs["0"], runs["1"]):
        for step, (a, b) in enumerate(zip(eager_gen, graphed_gen)):
            assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), step
    sparse = [c for dense, c, _ in runs["1"][-1] if not dense]
    assert sparse and all((c < c.new_tensor(n // 64)).any() for c in sparse)  # really sparse


# ----------------------------------------------------------------------------- site calls (CallGraphs)

class _FakeGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


def _fake_cuda(monkeypatch, fail_capture=False):
    """CallGraphs on CPU: a fake current stream, and a 'capture' that records fn for replay."""
    monkeypatch.setattr(cuda_graphs, "_current_stream_handle", lambda device: 7)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def capture(self, fn, device, stream):
        return None if fail_capture else _FakeGraph(fn)
    monkeypatch.setattr(cuda_graphs.CallGraphs, "_capture", capture)


def test_call_graphs_eager_then_capture_then_replay(monkeypatch):
    _fake_cuda(monkeypatch)
    calls = cuda_graphs.CallGraphs("test", max_entries=3)
    ran = []
    for i in range(4):
        calls.run(("a",), lambda: ran.append("a"), torch.device("cpu"))
    # first call eager, second captured and replayed, the rest replayed; every call did the work once
    assert ran == ["a"] * 4 and calls.eager_calls == 1 and calls.replays == 3
    calls.run(("b",), lambda: ran.append("b"), torch.device("cpu"))
    assert calls.eager_calls == 2                    # a new key starts eager
    for key in ("c", "d", "e"):                      # bounded: the oldest keys go first
        calls.run((key,), lambda: None, torch.device("cpu"))
    assert len(calls.entries) == 3 and (7, ("a",)) not in calls.entries
    calls.clear()
    assert not calls.entries


def test_call_graphs_failed_capture_stays_eager(monkeypatch):
    _fake_cuda(monkeypatch, fail_capture=True)
    calls = cuda_graphs.CallGraphs("test")
    ran = []
    for _ in range(3):
        calls.run(("a",), lambda: ran.append(1), torch.device("cpu"))
    assert len(ran) == 3 and calls.eager_calls == 3 and calls.replays == 0


def test_tensors_key_names_address_shape_strides_dtype():
    x = torch.randn(4, 6)
    key = cuda_graphs.tensors_key(x, None)
    assert key == ((x.data_ptr(), x.shape, x.stride(), x.dtype), None)
    assert cuda_graphs.tensors_key(x.t())[0] != key[0]            # same address, other strides
    assert cuda_graphs.tensors_key(x[1:])[0] != key[0]            # other address
    assert cuda_graphs.tensors_key(x.view(torch.int32))[0] != key[0]


def _compiled_outputs(options, graphs, monkeypatch, steps=6, check_sync=False):
    """Outputs of a compiled VideoDiT per step (fp16, 2048 tokens), the site calls' graph counts."""
    monkeypatch.setenv(cuda_graphs.ENV, graphs)
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")
    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
    modcompile.ops.policy_for.cache_clear()
    from benchmarks.video_dit import DiTConfig, VideoDiT
    torch.manual_seed(0)
    cfg = DiTConfig(latent=(8, 32, 32), dim=128, depth=2, heads=2, freq_dim=32)
    model = VideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    model = model.cuda().half().eval()
    x = torch.randn(1, 4, *cfg.latent, device="cuda", dtype=torch.half)
    cm = torch.compile(model, backend="modsparse", options={"min_seq_len": 256, "block_size": 64, **options})
    # a sampler's loop: only the latest latents stay alive (held outputs would move every later
    # allocation, as they would in eager PyTorch), each step's output kept in a buffer made before
    outs = torch.empty(steps, *x.shape, device="cuda", dtype=x.dtype)
    ts = torch.linspace(1000, 100, steps, device="cuda")
    with torch.no_grad():
        for step in range(steps):
            with modcompile.denoising_step(step, steps):
                if check_sync and step >= 3:  # compiled and captured by now: no host sync per step
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    out = cm(x, ts[step:step + 1])
                    outs[step].copy_(out)
                    x = x - 0.05 * out
                finally:
                    torch.cuda.set_sync_debug_mode("default")
    calls, plans = cuda_graphs.SITE_CALLS, cuda_graphs.SITE_PLANS
    print(f"site calls {options} graphs={graphs}: attention {(calls.eager_calls, calls.captures, calls.replays)} "
          f"plans {(plans.eager_calls, plans.captures, plans.replays)}")
    assert calls.failures == plans.failures == 0
    return outs, (calls.eager_calls, calls.captures, calls.replays, plans.replays)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("options", [
    {"policy": "vmoba", "warmup_steps": 1},
    {"policy": "mod", "warmup_steps": 1, "refresh_interval": 2},
    {"policy": "mod", "warmup_steps": 1, "nonfinite": "dense"},
    {"policy": "dense"},
], ids=["vmoba", "mod", "mod-nonfinite-dense", "dense"])
def test_site_calls_replay_bitwise_like_eager(options, fresh_modcompile, monkeypatch):
    """Compiled model, graphs on vs off: the same outputs bit for bit at every step, while the lists
    change per step (VMoBA selects anew, MOD refreshes), and no host sync from step 3 on. Whether a
    call replays depends on the caching allocator handing its tensors the same addresses again
    (test_call_graphs_replay_current_values checks the replay itself)."""
    eager, counts_off = _compiled_outputs(options, "0", monkeypatch)
    assert counts_off == (0, 0, 0, 0)
    graphed, counts_on = _compiled_outputs(options, "1", monkeypatch, check_sync=True)
    assert counts_on[0] + counts_on[2] == 2 * 6, counts_on   # 2 layers x 6 steps, each eager or replayed
    if options["policy"] == "vmoba":   # its whole sparse plan replays too (from the third sparse step)
        assert counts_on[3] > 0, counts_on
    for step, (a, b) in enumerate(zip(eager, graphed)):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"step {step}: replayed differs from eager by {(a - b).abs().max()} {counts_on}"


@pytest.mark.gpu
@needs_cuda
def test_call_graphs_replay_current_values(monkeypatch):
    """CallGraphs on a GPU: the second call of a key is captured and replayed, later ones replay; a
    replay reads the values its tensors hold now (written in place between calls), writes the
    tensors of its key, and needs no host sync; another address is another key (eager)."""
    calls = cuda_graphs.CallGraphs("test")
    a, b, out = (torch.randn(1000, device="cuda") for _ in range(3))

    def fn(x, y, o):
        t = x * 2.0                       # a temporary, from the graphs' pool while capturing
        torch.add(t, y, out=o)
    for i in range(4):
        a.normal_()
        b.normal_()
        if i >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            calls.run(cuda_graphs.tensors_key(a, b, out), lambda: fn(a, b, out), a.device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(out, a * 2 + b, rtol=0, atol=0)
    assert (calls.eager_calls, calls.captures, calls.replays) == (1, 1, 3)
    other = torch.empty_like(out)
    calls.run(cuda_graphs.tensors_key(a, b, other), lambda: fn(a, b, other), a.device)
    assert calls.eager_calls == 2 and torch.equal(other, a * 2 + b)


def test_call_graphs_inside_an_outer_capture_only_record(monkeypatch):
    """Inside the caller's own stream capture a call neither captures nor replays: its launches go
    into the caller's graph."""
    _fake_cuda(monkeypatch)
    calls = cuda_graphs.CallGraphs("test")
    calls.run(("a",), lambda: None, torch.device("cpu"))
    calls.run(("a",), lambda: None, torch.device("cpu"))          # captured: replays from now on
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ran = []
    calls.run(("a",), lambda: ran.append(1), torch.device("cpu"))
    assert ran == [1] and calls.replays == 1 and calls.eager_calls == 2


def test_graphed_call_inside_an_outer_capture_runs_its_function(monkeypatch):
    """A GraphedCall that already has a graph must not replay it inside another capture (a graph
    launch cannot be captured into another graph): it runs its function, whose launches the outer
    graph records, and copies into ``out`` as usual. (VMoBA's whole-plan graph holds its selection.)"""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    call = cuda_graphs.GraphedCall(lambda x: (x * 2,), name="test")
    x = torch.randn(5)
    assert torch.equal(call(x)[0], x * 2)                      # eager warm-up
    call.graph, call.static_inputs, call.static_outputs = _FakeGraph(lambda: None), (x.clone(),), (x * 0,)
    assert torch.equal(call(x)[0], x * 0)                      # replays the (fake) graph
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    out = torch.empty(5)
    got = call(x, out=(out,))
    assert got[0] is out and torch.equal(out, x * 2) and call.replays == 1 and call.eager_calls == 2
