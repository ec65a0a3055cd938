"""Real diffusers pipelines end to end: WanPipeline and the Wan2.2 two-expert WanPipeline
(``transformer_2`` + ``boundary_ratio``), tiny random components, classifier-free guidance, both
compile styles (whole model and ``compile_repeated_blocks``). What a user checks: the dense policy
gives the uncompiled pipeline's latents, report() lists each expert's layers with the steps and CFG
passes the pipeline ran, no recompiles, and mod / vmoba run sparse without being told the step count."""
import pytest
import torch

import modcompile
from modcompile.runtime import REGISTRY

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")            # WanPipeline's module imports it

pytestmark = pytest.mark.usefixtures("fresh_modcompile")

OPTS = {"min_seq_len": 64, "block_size": 32}
LAYERS = 2
STEPS = 6
BOUNDARY = 0.8                                 # with this schedule: 3 high-noise steps, 3 low-noise steps
DENSE = "dense (policy dense)"                  # report(): rewritten, ran block-sparse ops at full density
GRID = (3, 8, 8)                               # 9 frames of 128 x 128 -> latent 3 x 16 x 16 -> patches (1, 2, 2)


def tiny_wan(seed):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_pipeline(two_experts, boundary=BOUNDARY):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    experts = {"transformer_2": tiny_wan(1), "boundary_ratio": boundary} if two_experts else {}
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                                 transformer=tiny_wan(0), **experts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, on_step=None, steps=STEPS, guidance=4.0, device="cpu"):
    g = torch.Generator().manual_seed(2)
    prompt, negative = (torch.randn(1, 8, 16, generator=g).to(device) for _ in range(2))
    callback = None
    if on_step is not None:
        def callback(pipe, i, t, kwargs):
            on_step(i, t)
            return {}
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=128, width=128, num_frames=9,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(3), callback_on_step_end=callback).frames


def expert_steps(pipe):
    """The denoising steps each expert runs, as WanPipeline picks them (t >= boundary: high noise)."""
    pipe.scheduler.set_timesteps(STEPS)
    ts = [float(t) for t in pipe.scheduler.timesteps]
    if pipe.config.boundary_ratio is None:
        return {"WanTransformer3DModel#0": list(range(len(ts)))}
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return {"WanTransformer3DModel#0": [i for i, t in enumerate(ts) if t >= boundary],
            "WanTransformer3DModel#1": [i for i, t in enumerate(ts) if t < boundary]}


def compile_pipeline(pipe, style, options, compiles):
    def backend(gm, inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, inputs, **kw)
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        if style == "whole":
            setattr(pipe, name, torch.compile(model, backend=backend, options=options))
        else:
            model.compile_repeated_blocks(backend=backend, options=options)


def self_attention_rows(model):
    return [r for r in modcompile.report(print_table=False) if r.site.startswith(model + "/") and ".attn1" in r.site]


def check_rows(steps, status):
    for model, mine in steps.items():
        rows = self_attention_rows(model)
        assert [r.site for r in rows] == [f"{model}/blocks.{i}.attn1#0" for i in range(LAYERS)]
        assert all(r.rewritten and r.status == status and r.grid == GRID for r in rows), rows
        assert all(r.steps == len(mine) and r.passes == 2 for r in rows), rows   # CFG: cond + uncond


def run_dense(two_experts, style):
    pipe = tiny_pipeline(two_experts)
    want = generate(pipe)
    steps = expert_steps(pipe)
    assert all(len(s) == (3 if two_experts else STEPS) for s in steps.values())
    compiles = []
    compile_pipeline(pipe, style, {"policy": "dense", **OPTS}, compiles)
    got = generate(pipe)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(want, torch.zeros_like(want))
    assert len(compiles) == 1                                  # one graph serves both experts (one backend)
    check_rows(steps, DENSE)
    # A second generation: no recompile, and it is counted as a new generation of each expert.
    torch.testing.assert_close(generate(pipe), want, rtol=1e-4, atol=1e-4)
    assert len(compiles) == 1
    check_rows(steps, DENSE)


@pytest.mark.parametrize("style", ["whole", "regional"])
def test_wan22_two_expert_pipeline_dense_equals_uncompiled(style):
    run_dense(True, style)


@pytest.mark.parametrize("style", ["regional", pytest.param("whole", marks=pytest.mark.slow)])
def test_wan_pipeline_dense_equals_uncompiled(style):
    run_dense(False, style)


def test_each_pipeline_call_is_a_new_generation_of_each_expert():
    """The low-noise expert runs only the last step: the next call's first timestep it sees is the
    one it saw last, yet it is a new generation (one step, two CFG passes), not two more passes."""
    pipe = tiny_pipeline(True, boundary=0.5)
    steps = expert_steps(pipe)
    assert len(steps["WanTransformer3DModel#1"]) == 1
    want = generate(pipe)
    compiles = []
    compile_pipeline(pipe, "regional", {"policy": "dense", **OPTS}, compiles)
    for _ in range(2):
        torch.testing.assert_close(generate(pipe), want, rtol=1e-4, atol=1e-4)
        rows = self_attention_rows("WanTransformer3DModel#1")
        assert len(rows) == LAYERS and all(r.steps == 1 and r.passes == 2 for r in rows), rows
    check_rows(steps, DENSE)           # the grid too: the second call's forward was read before it ran
    assert len(compiles) == 1


def run_sparse(policy, style, extra=None):
    """mod / vmoba with their default warm-up: only the pipeline's schedule (6 steps, read from the
    stack) tells them how many steps there are; 50 would keep all 6 steps dense."""
    pipe = tiny_pipeline(True)
    steps = expert_steps(pipe)
    compiles = []
    compile_pipeline(pipe, style, {"policy": policy, **OPTS, **(extra or {})}, compiles)
    seen = []                                                  # (step, model, layer, pass, density)

    def on_step(i, t):
        for (key, p), s in REGISTRY.states.items():
            if ".attn1" in key and s.last_step == i and s.density is not None:
                seen.append((i, s.info.model, s.info.layer, p, float(s.density)))
                assert s.context.num_steps == STEPS
    out = generate(pipe, on_step)
    assert torch.isfinite(out).all()
    assert len(compiles) == 1
    check_rows(steps, "sparse")
    for model, mine in steps.items():
        ran = sorted({i for i, m, *_ in seen if m == model})
        assert ran == mine                                     # each expert's tracker: its own steps only
        rows = [x for x in seen if x[1] == model]
        assert len(rows) == len(mine) * LAYERS * 2
        assert any(d < 1.0 for *_, d in rows), rows            # sparse on some steps
    return steps, seen


@pytest.mark.parametrize("style", ["regional", pytest.param("whole", marks=pytest.mark.slow)])
def test_wan22_two_experts_run_vmoba_sparse_from_the_pipeline_schedule(style):
    steps, seen = run_sparse("vmoba", style)
    high, low = steps["WanTransformer3DModel#0"], steps["WanTransformer3DModel#1"]
    # 25% of 6 steps dense: the first step of the pipeline, which the high-noise expert runs
    assert all(d == 1.0 for i, *_, d in seen if i == high[0])
    # every later step sparse, also the low-noise expert's first one under regional compilation
    # (its first forward is under way when a block finds the model: the grid comes from the frame)
    assert all(d < 1.0 for i, *_, d in seen if i != high[0])
    assert low[0] != high[0]


@pytest.mark.parametrize("style", [pytest.param("regional", marks=pytest.mark.slow),
                                   pytest.param("whole", marks=pytest.mark.slow)])
def test_wan22_two_experts_run_mod_sparse_from_the_pipeline_schedule(style):
    steps, seen = run_sparse("mod", style, {"density": 0.5})
    high, low = steps["WanTransformer3DModel#0"], steps["WanTransformer3DModel#1"]
    # warm-up: 2 of 6 dense steps; the low-noise expert's first step observes densely (its own fit)
    assert all(d == 1.0 for i, *_, d in seen if i in high[:2] or i == low[0])


def densities_by_step(model="WanTransformer3DModel#0"):
    """on_step callback and its record: step -> [(density, planned num_steps)] of the self-attention sites."""
    seen = {}

    def on_step(i, t):
        for (key, _), s in REGISTRY.states.items():
            if ".attn1" in key and s.info.model == model and s.last_step == i and s.density is not None:
                seen.setdefault(i, []).append((float(s.density), s.context.num_steps))
    return seen, on_step


@pytest.mark.parametrize("policy,warmup", [("vmoba", 1), pytest.param("mod", 2, marks=pytest.mark.slow)])
def test_a_four_step_distilled_schedule_runs_sparse_after_the_warm_up(policy, warmup):
    """A distilled model's short schedule (4 steps, no CFG): the pipeline's timesteps give the step
    count (no num_steps option), so the policy's warm-up is scaled to 4 steps (vmoba: 25%, 1 step;
    mod: its 2 observed steps) and every later step runs sparse."""
    pipe = tiny_pipeline(False)
    compiles = []
    compile_pipeline(pipe, "regional", {"policy": policy, "density": 0.5, **OPTS}, compiles)
    seen, on_step = densities_by_step()
    assert torch.isfinite(generate(pipe, on_step, steps=4, guidance=1.0)).all()
    assert sorted(seen) == [0, 1, 2, 3] and all(len(v) == LAYERS for v in seen.values())   # one pass per step
    assert all(n == 4 for v in seen.values() for _, n in v)
    assert all(d == 1.0 for i in range(warmup) for d, _ in seen[i])
    assert all(d < 1.0 for i in range(warmup, 4) for d, _ in seen[i])
    assert len(compiles) == 1


@pytest.mark.slow                   # 24 forwards per call, two calls: about 20 s on 2 cores
def test_skyreels_v2_diffusion_forcing_per_frame_timesteps_keep_state_bounded(monkeypatch):
    """SkyReels-V2's diffusion forcing denoises frames asynchronously: a (B, frames) timestep per
    forward, more forwards (12) than schedule steps (6), the newest frame at full noise for the first
    ones. Each forward is one step (its CFG call a second pass), MOD runs sparse after its warm-up,
    the state stays one per (layer, pass) over two calls of the pipeline, and MOD's history lists
    keep their last HISTORY entries."""
    from modcompile.policies import mod
    monkeypatch.setattr(mod, "HISTORY", 3)
    torch.manual_seed(0)
    transformer = diffusers.SkyReelsV2Transformer3DModel.from_config(tiny_wan(0).config).eval()   # Wan's blocks
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    pipe = diffusers.SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                                        scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    compiles = []
    # a refresh every step (history grows fastest); no dense refresh on a low coverage (random weights)
    compile_pipeline(pipe, "regional", {"policy": "mod", "density": 0.5, "refresh_interval": 1,
                                        "min_observed_coverage": 0.0, **OPTS, "block_size": 16}, compiles)
    g = torch.Generator().manual_seed(2)
    prompt, negative = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    name = "SkyReelsV2Transformer3DModel#0"
    for _ in range(2):
        timesteps, steps = [], []

        def callback(pipe, i, t, kwargs):
            timesteps.append(t.clone())
            steps.append(REGISTRY.runs[id(transformer)].tracker.step)
            return {}
        seen, on_step = densities_by_step(name)
        out = pipe(prompt=None, prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64,
                   num_frames=13, num_inference_steps=6, guidance_scale=4.0, output_type="latent", ar_step=2,
                   causal_block_size=1, base_num_frames=13, generator=torch.Generator().manual_seed(3),
                   callback_on_step_end=lambda p, i, t, kw: (on_step(i, t), callback(p, i, t, kw))[1]).frames
        assert torch.isfinite(out).all()
        assert len(timesteps) == 12 and timesteps[0].numel() == 4 and len(set(map(tuple, map(torch.Tensor.tolist, timesteps)))) == 12
        assert steps == list(range(12))                               # one step per forward, from 0 again
        assert all(d == 1.0 for i in (0, 1) for d, _ in seen[i]) and all(d < 1.0 for i in range(2, 12) for d, _ in seen[i])
        rows = [r for r in modcompile.report(print_table=False) if r.site.startswith(name) and ".attn1" in r.site]
        assert len(rows) == LAYERS and all(r.status == "sparse" and r.steps == 12 and r.passes == 2 for r in rows)
        states = [s for (key, _), s in REGISTRY.states.items() if key.startswith(name)]
        assert len(states) == LAYERS * 2                              # (layer, pass): nothing per step
        histories = [s.policy_state for s in states]
        assert all(len(h.events) == len(h.fit_steps) == 3 and h.fit_steps[-1] == 11 for h in histories)
    assert len(compiles) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["vmoba", "mod"])
def test_site_calls_replay_from_cuda_graphs_in_a_real_pipeline(policy, monkeypatch):
    """WanPipeline on CUDA (UniPC keeps past model outputs alive; CFG runs two passes per step): every
    site attention call goes through the CUDA-graph cache (modcompile/cuda_graphs.py CallGraphs), and
    the latents equal those of eager calls bit for bit. (How many replay depends on the allocator
    handing a call's tensors the same addresses again; BENCHMARKS.md section 7 counts them.)"""
    from modcompile import cuda_graphs
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")
    latents, counts = {}, {}
    for graphs in ("0", "1"):
        monkeypatch.setenv(cuda_graphs.ENV, graphs)
        torch._dynamo.reset()
        modcompile.reset(forget_sites=True)
        modcompile.ops.policy_for.cache_clear()
        pipe = tiny_pipeline(False).to("cuda")
        compile_pipeline(pipe, "whole", {"policy": policy, **OPTS, "warmup_steps": 1}, [])
        latents[graphs] = generate(pipe, steps=10, device="cuda")
        calls, plans = cuda_graphs.SITE_CALLS, cuda_graphs.SITE_PLANS
        counts[graphs] = (calls.eager_calls, calls.captures, calls.replays)
        print(f"pipeline {policy} graphs={graphs}: attention {counts[graphs]} "
              f"plans {(plans.eager_calls, plans.captures, plans.replays)}")
        assert calls.failures == plans.failures == 0
        plan_replays = plans.replays
    assert counts["0"] == (0, 0, 0)
    eager, captures, replays = counts["1"]
    assert eager + replays == 2 * 2 * 10, counts            # 2 layers x 2 CFG passes x 10 steps
    assert policy != "vmoba" or plan_replays > 0             # VMoBA's whole sparse plan replays too
    assert torch.isfinite(latents["1"]).all()
    assert torch.equal(latents["0"], latents["1"])
