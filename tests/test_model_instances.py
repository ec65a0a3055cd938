"""State belongs to the module instance that runs: regional compilation, two models of one
architecture, per-token timesteps, the pipeline's schedule (real diffusers classes, tiny configs)."""
import pytest
import torch

import modcompile
from modcompile.runtime import REGISTRY

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("fresh_modcompile")

OPTS = {"min_seq_len": 64, "block_size": 32}


def tiny_wan(seed=0, layers=3):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def counting(compiles):
    def backend(gm, inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, inputs, **kw)
    return backend


def denoise(model, eager=None, steps=(999, 749, 499, 249), cfg=False, timestep=None):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 3, 16, 16, generator=g)
    text = torch.randn(1, 8, 16, generator=g)
    with torch.no_grad():
        for t in steps:
            ts = timestep(t) if timestep else torch.tensor([t])
            got = model(latents, ts, text, return_dict=False)[0]
            if cfg:
                model(latents, ts, torch.zeros_like(text), return_dict=False)
            if eager is not None:
                want = eager(latents, ts, text, return_dict=False)[0]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            latents = latents - 0.25 * got
    return latents


def self_attention_rows(model_name=None):
    return [r for r in modcompile.report(print_table=False) if ".attn1" in r.site
            and (model_name is None or r.site.startswith(model_name))]


@pytest.mark.parametrize("style", ["whole", "regional"])
def test_every_layer_is_its_own_site_in_both_compile_styles(style):
    eager = tiny_wan()
    model = tiny_wan()
    compiles = []
    if style == "whole":
        model = torch.compile(model, backend=counting(compiles), options={"policy": "dense", **OPTS})
    else:
        model.compile_repeated_blocks(backend=counting(compiles), options={"policy": "dense", **OPTS})
    denoise(model, eager, cfg=True)
    assert len(compiles) == 1                                  # one graph, no recompile per step
    rows = self_attention_rows()
    assert [r.site for r in rows] == [f"WanTransformer3DModel#0/blocks.{i}.attn1#0" for i in range(3)]
    assert all(r.rewritten and r.grid == (3, 8, 8) for r in rows)
    assert all(r.steps == 4 and r.passes == 2 for r in rows)  # 4 steps, cond + uncond passes
    assert [REGISTRY.sites[r.site].layer for r in rows] == [0, 1, 2]


def _rows_by_site(style, models=1):
    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
    compiled = []
    for seed in range(models):
        model = tiny_wan(seed)
        if style == "whole":
            model = torch.compile(model, backend="modsparse", options={"policy": "vmoba", "warmup_steps": 1, **OPTS})
        else:
            model.compile_repeated_blocks(backend="modsparse", options={"policy": "vmoba", "warmup_steps": 1, **OPTS})
        compiled.append(model)
    for model in compiled:
        denoise(model, steps=(999, 749))
    return {r.site: (r.status, r.reason, r.rewritten, r.seq_len, r.heads, r.head_dim, r.steps, r.grid)
            for r in modcompile.report(print_table=False)}


def test_dense_sites_get_one_row_per_layer_in_both_compile_styles():
    """Cross-attention stays dense: no op of ours runs for it, yet report() names each layer's
    instance under the model, as for the rewritten sites, whichever way the model was compiled
    (not one row per compiled block keyed by the configuration's hash)."""
    whole, regional = _rows_by_site("whole"), _rows_by_site("regional")
    assert whole == regional
    model = "WanTransformer3DModel#0"
    assert set(whole) == {f"{model}/blocks.{i}.attn{a}#0" for i in range(3) for a in (1, 2)}
    for i in range(3):
        status, reason, rewritten, seq, *_ = whole[f"{model}/blocks.{i}.attn2#0"]
        assert (status, rewritten, seq) == ("dense", False, 3 * 8 * 8) and reason.startswith("cross-attention")
        assert whole[f"{model}/blocks.{i}.attn2#0"][-1] == (3, 8, 8)  # the grid, in both styles
    assert [REGISTRY.sites[f"{model}/blocks.{i}.attn2#0"].layer for i in range(3)] == [0, 1, 2]


@pytest.mark.slow
def test_dense_rows_of_a_second_model_that_reuses_the_compiled_code():
    """Two models of one architecture (Wan2.2's experts): the second runs the first one's compiled
    code without a compile, and still gets its own dense rows, in both styles."""
    whole, regional = _rows_by_site("whole", models=2), _rows_by_site("regional", models=2)
    assert whole == regional
    assert set(whole) == {f"WanTransformer3DModel#{m}/blocks.{i}.attn{a}#0"
                          for m in range(2) for i in range(3) for a in (1, 2)}


def test_regional_vmoba_gives_each_layer_its_partition():
    model = tiny_wan()
    model.compile_repeated_blocks(backend="modsparse", options={"policy": "vmoba", "warmup_steps": 1, **OPTS})
    denoise(model)
    rows = self_attention_rows()
    assert len(rows) == 3 and all(r.density is not None and r.density < 1.0 for r in rows)
    notes = [REGISTRY.states[(r.site, 0)].info.layer for r in rows]
    assert notes == [0, 1, 2]


@pytest.mark.slow
def test_two_models_of_one_architecture_keep_separate_state():
    """Wan2.2's two experts (or two pipelines in one process): one compiled code, two states."""
    high, low = tiny_wan(0), tiny_wan(1)
    compiles = []
    opts = {"policy": "mod", "warmup_steps": 2, "refresh_interval": 2, **OPTS}
    high_c = torch.compile(high, backend=counting(compiles), options=opts)
    low_c = torch.compile(low, backend=counting(compiles), options=opts)
    denoise(high_c, steps=(999, 899, 799))
    denoise(low_c, steps=(699, 599, 499, 399))
    rows_high = self_attention_rows("WanTransformer3DModel#0")
    rows_low = self_attention_rows("WanTransformer3DModel#1")
    assert len(rows_high) == len(rows_low) == 3
    assert all(r.steps == 3 for r in rows_high) and all(r.steps == 4 for r in rows_low)
    states = REGISTRY.states
    high_maps = [states[(r.site, 0)].policy_state.mmap for r in rows_high]
    low_maps = [states[(r.site, 0)].policy_state.mmap for r in rows_low]
    assert all(h is not None and l is not None and h is not l for h, l in zip(high_maps, low_maps))
    assert len(compiles) <= 2                                  # no recompile per step


@pytest.mark.parametrize("second", ["whole", "regional"])
def test_a_model_built_again_replaces_the_collected_one_in_the_report(second):
    """A notebook builds its pipeline again: the collected model's rows leave the report (its
    address may be the new model's: the new one must not inherit its rows or state), the new model
    lists its own layers as sparse with its own steps, in either compile style."""
    import gc
    import weakref
    opts = {"policy": "vmoba", "warmup_steps": 1, **OPTS}
    first = torch.compile(tiny_wan(0), backend="modsparse", options=opts)
    denoise(first, steps=(999, 749, 499))
    assert [r.site for r in self_attention_rows()] == [f"WanTransformer3DModel#0/blocks.{i}.attn1#0" for i in range(3)]
    gone = weakref.ref(first._orig_mod)
    del first
    gc.collect()
    assert gone() is None       # nothing of modcompile's (nor its stack walks) keeps the model alive
    model = tiny_wan(1)
    if second == "whole":
        model = torch.compile(model, backend="modsparse", options=opts)
    else:
        model.compile_repeated_blocks(backend="modsparse", options=opts)
    denoise(model)
    rows = modcompile.report(print_table=False)
    assert [r.site for r in rows if ".attn1" in r.site] == [f"WanTransformer3DModel#0/blocks.{i}.attn1#0" for i in range(3)]
    assert all(r.status == "sparse" and r.steps == 4 and r.passes == 1 for r in rows if ".attn1" in r.site), rows
    assert all(r.site.startswith("WanTransformer3DModel#0/") for r in rows), rows


def test_per_token_timesteps_are_read_whole():
    """Wan2.2 TI2V passes a (B, seq_len) timestep: every entry counts, not only the first."""
    model = torch.compile(tiny_wan(), backend="modsparse", options={"policy": "dense", **OPTS})

    def per_token(t):
        ts = torch.full((1, 3 * 8 * 8), float(t))
        ts[:, :64] = 0.0                                   # the conditioning frame stays clean
        return ts
    denoise(model, cfg=True, timestep=per_token)
    rows = self_attention_rows()
    assert rows and all(r.steps == 4 and r.passes == 2 for r in rows)


def test_forgetting_sites_keeps_compiled_graphs_working():
    model = torch.compile(tiny_wan(), backend="modsparse", options={"policy": "vmoba", **OPTS})
    denoise(model, steps=(999, 499))
    modcompile.reset(forget_sites=True)
    denoise(model, steps=(999, 499))
    rows = self_attention_rows()
    assert len(rows) == 3 and all(r.steps == 2 for r in rows)


def _vmoba_grads(style):
    torch.manual_seed(0)
    model = tiny_wan().train()
    opts = {"policy": "vmoba", "warmup_steps": 0, "tau": 0.5, **OPTS}
    if style == "whole":
        compiled = torch.compile(model, backend="modsparse", options=opts)
    else:
        model.compile_repeated_blocks(backend="modsparse", options=opts)
        compiled = model
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 4, 3, 16, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    with modcompile.denoising_step(5, 10):
        compiled(latents, torch.tensor([500]), text, return_dict=False)[0].square().mean().backward()
    rows = self_attention_rows()
    assert len(rows) == 3 and all(r.density is not None and r.density < 1.0 for r in rows)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and ".attn1.to_q" in n}


@pytest.mark.slow
def test_regional_backward_uses_each_layers_own_lists():
    """One compiled block serves every layer; the backward of each layer must take the lists and
    partition its own forward used (VMoBA's partition cycles with the layer), as under whole-model
    compilation, where each layer is its own site."""
    whole = _vmoba_grads("whole")
    modcompile.reset(forget_sites=True)
    torch._dynamo.reset()
    regional = _vmoba_grads("regional")
    assert whole.keys() == regional.keys() and len(whole) == 6  # to_q weight and bias of 3 layers
    for name in whole:
        torch.testing.assert_close(regional[name], whole[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_nested_compile_region_blocks_keep_per_layer_state(monkeypatch):
    """``torch.compiler.nested_compile_region`` on the block class: one subgraph serves every layer
    inside the whole-model graph. Its sites are rewritten, each layer resolves to its own state
    (steps, CFG passes, VMoBA partition), with one compile, and the output equals the plain
    whole-model compile's, which has a site per layer."""
    def run(nested):
        torch._dynamo.reset()
        modcompile.reset(forget_sites=True)
        model = tiny_wan()
        if nested:
            block = type(model.blocks[0])
            monkeypatch.setattr(block, "forward", torch.compiler.nested_compile_region(block.forward))
        compiles = []
        model = torch.compile(model, backend=counting(compiles), options={"policy": "vmoba", "warmup_steps": 1, **OPTS})
        out = denoise(model, cfg=True)
        monkeypatch.undo()
        return out, compiles, self_attention_rows()

    want, _, _ = run(nested=False)
    got, compiles, rows = run(nested=True)
    assert len(compiles) == 1
    assert [r.site for r in rows] == [f"WanTransformer3DModel#0/blocks.{i}.attn1#0" for i in range(3)]
    assert all(r.status == "sparse" and r.steps == 4 and r.passes == 2 and r.density < 1.0 for r in rows)
    assert len({r.note for r in rows}) == 3                   # 1d, 2d, 3d partitions by layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = [r.site for r in modcompile.report(print_table=False) if not r.rewritten]   # the region's cross-attention
    assert dense == [f"WanTransformer3DModel#0/blocks.{i}.attn2#0" for i in range(3)]
