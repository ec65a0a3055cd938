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
from modcompile.runtime import SiteInfo, SiteState

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
    """Compiled model: the plan replays its graphs (switch on) or never captures (switch off)."""
    monkeypatch.setenv(cuda_graphs.ENV, graphs)
    monkeypatch.setenv("MODCOMPILE_BSA_NO_TUNE", "1")  # kernel timing is not what this test is about
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
    if graphs == "1":
        assert calls and all(c.replays >= 1 and not c.failed for c in calls)
    else:
        assert not calls
    assert all(torch.isfinite(o).all() for o in outs)
