"""Real diffusers pipelines of other video DiTs end to end, as tests/test_pipelines.py does for Wan:
CogVideoXPipeline and LTXPipeline (classifier-free guidance batched: one forward of batch 2 per
step; CogVideoX joins the text before the video tokens), HunyuanVideoPipeline (guidance embedding,
padded text masked in its joint attention, true CFG: two forwards per step), Kandinsky5T2VPipeline
(CFG as two forwards, channels-last latents, the timestep cast to the model's dtype). Tiny random
components, prompt embeds passed, latents out, both compile styles. What a user checks: the dense
policy gives the uncompiled pipeline's latents, report() lists each self-attention site with the
steps and passes the pipeline ran and the true grid, no recompiles, and mod / vmoba run sparse
after their warm-up without being told the step count."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import modcompile
from modcompile import dispatch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")            # the pipelines' modules import it

from clients import BY_NAME, TEXT, TEXT_DIM, compile_model  # noqa: E402
from site_check import Checker  # noqa: E402
from test_pipelines import DENSE, OPTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_modcompile")

STEPS = 6


def _text(g, valid=TEXT):
    """Prompt embeds and their mask: ``valid`` tokens, the rest padding."""
    return torch.randn(1, TEXT, TEXT_DIM, generator=g), (torch.arange(TEXT) < valid).float()[None]


def cogvideox():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=2)
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                       transformer=BY_NAME["cogvideox"].build(),
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    g = torch.Generator().manual_seed(2)
    (prompt, _), (negative, _) = _text(g), _text(g)
    # 9 frames of 128 x 128 -> latents (F, H, W) 3 x 16 x 16 -> patches of 2 x 2
    return pipe, dict(prompt_embeds=prompt, negative_prompt_embeds=negative, guidance_scale=6.0,
                      height=128, width=128, num_frames=9)


def hunyuan_video():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1,
                                              norm_num_groups=4)
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                          vae=vae, transformer=BY_NAME["hunyuan_video"].build(),
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))
    g = torch.Generator().manual_seed(2)
    (prompt, mask), (negative, negative_mask) = _text(g, valid=5), _text(g, valid=3)
    pooled, negative_pooled = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    return pipe, dict(prompt_embeds=prompt, prompt_attention_mask=mask, pooled_prompt_embeds=pooled,
                      negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
                      negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=4.0, guidance_scale=6.0,
                      height=128, width=128, num_frames=9)


def ltx():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=1, patch_size_t=1)
    pipe = diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, transformer=BY_NAME["ltx_video"].build())
    g = torch.Generator().manual_seed(2)
    (prompt, mask), (negative, negative_mask) = _text(g, valid=6), _text(g)
    # 9 frames of 32 x 32, VAE compression 4 x 4 x 4, patch size 1: packed tokens of a 3 x 8 x 8 grid
    return pipe, dict(prompt_embeds=prompt, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                      negative_prompt_attention_mask=negative_mask, guidance_scale=3.0, height=32, width=32,
                      num_frames=9)


def kandinsky5(dtype=torch.float32, shift=10.0):
    """In bfloat16 as from_pretrained(torch_dtype=...) loads it: the modules it keeps in float32 stay."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1,
                                              norm_num_groups=4)
    transformer = BY_NAME["kandinsky5"].build()
    for name, param in transformer.named_parameters():
        if "modulation" in name:            # zero-initialised: the attention would not reach the output
            torch.nn.init.normal_(param, std=0.05)
    transformer.to(dtype)
    for name, module in transformer.named_modules():
        if set(name.split(".")) & set(transformer._keep_in_fp32_modules):
            module.float()
    pipe = diffusers.Kandinsky5T2VPipeline(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                                           text_encoder_2=None, tokenizer_2=None,
                                           scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift))
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([0, TEXT], dtype=torch.int32)
    embeds = {f"{neg}prompt_{k}": v for neg in ("", "negative_") for k, v in (
        ("embeds_qwen", torch.randn(1, TEXT, TEXT_DIM, generator=g)), ("embeds_clip", torch.randn(1, 16, generator=g)),
        ("cu_seqlens", lengths))}
    # latents (B, F, H, W, C): 3 x 16 x 16 -> patches (1, 2, 2)
    return pipe, dict(embeds, guidance_scale=5.0, height=128, width=128, num_frames=9)


@dataclass
class Case:
    build: Callable                 # () -> (pipeline, its call's kwargs)
    sites: tuple                    # the self-attention sites over the video tokens
    grid: tuple                     # the latent token grid after patchify
    text: int                       # text tokens joined in those sites
    text_position: str              # where they sit ("last" also when there are none)
    forwards: int                   # transformer forwards per step (the CFG passes)
    batch: int                      # batch of each forward (2: CFG batched)
    regional_graphs: int            # graphs a regional compile makes (all in the first step)
    tol: float = 1e-4               # dense policy against the uncompiled latents


CASES = {
    # regional: each block compiled (CogVideoX names no repeated blocks); the first block gets the slice
    # of the joint [text | video] sequence, the second a contiguous tensor: Dynamo compiles it twice
    "cogvideox": Case(cogvideox, ("transformer_blocks.0.attn1#0", "transformer_blocks.1.attn1#0"),
                      (3, 8, 8), TEXT, "first", forwards=1, batch=2, regional_graphs=2),
    # regional: compile_repeated_blocks (dual- and single-stream blocks, patch embedding, token refiner)
    "hunyuan_video": Case(hunyuan_video, ("single_transformer_blocks.0.attn#0", "transformer_blocks.0.attn#0"),
                          (3, 8, 8), TEXT, "last", forwards=2, batch=1, regional_graphs=4),
    # regional: compile_repeated_blocks (its text block and its visual blocks)
    "kandinsky5": Case(kandinsky5, ("visual_transformer_blocks.0.self_attention#0",
                                    "visual_transformer_blocks.1.self_attention#0"), (3, 8, 8), 0, "last",
                       forwards=2, batch=1, regional_graphs=2,
                       tol=1e-3),      # Inductor alone (torch.compile's default backend) is 9e-4 off here
    "ltx": Case(ltx, ("transformer_blocks.0.attn1#0", "transformer_blocks.1.attn1#0"), (3, 8, 8), 0, "last",
                forwards=1, batch=2, regional_graphs=1),
}


def generate(pipe, kwargs, on_step=None, steps=STEPS):
    def callback(pipe, i, t, kw):
        if on_step is not None:
            on_step(i, t)
        return {}
    return pipe(**kwargs, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(3), callback_on_step_end=callback).frames


def compile_transformer(pipe, style, options, compiles):
    def backend(gm, inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, inputs, **kw)
    pipe.transformer = compile_model(pipe.transformer, style, backend, options)


def model_name(pipe):
    return type(getattr(pipe.transformer, "_orig_mod", pipe.transformer)).__name__ + "#0"


def check_rows(pipe, case, status):
    name = model_name(pipe)
    rows = [r for r in modcompile.report(print_table=False) if r.site.startswith(name + "/")]
    mine = sorted((r for r in rows if r.site.split("/", 1)[1] in case.sites), key=lambda r: r.site)
    assert [r.site.split("/", 1)[1] for r in mine] == sorted(case.sites), [r.site for r in rows]
    for r in mine:
        assert r.rewritten and r.status == status, r
        assert (r.grid, r.text_tokens) == (case.grid, case.text), r
        assert (r.steps, r.passes) == (STEPS, case.forwards), r
    return mine


def forward_batches(pipe, kwargs):
    """The batch of each transformer forward of an uncompiled generation, and its latents."""
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: batches.append(int(kw["hidden_states"].shape[0])), with_kwargs=True)
    out = generate(pipe, kwargs)
    hook.remove()
    return batches, out


def run_dense(name, style):
    case = CASES[name]
    pipe, kwargs = case.build()
    pipe.set_progress_bar_config(disable=True)
    batches, want = forward_batches(pipe, kwargs)
    assert batches == [case.batch] * (STEPS * case.forwards)       # the CFG as this pipeline runs it
    assert torch.isfinite(want).all() and want.abs().max() > 0
    compiles, after_first = [], []
    compile_transformer(pipe, style, {"policy": "dense", **OPTS}, compiles)
    for _ in range(2):                       # a second generation: no recompile, a new generation
        got = generate(pipe, kwargs, lambda i, t: after_first.append(len(compiles)) if i == 0 else None)
        torch.testing.assert_close(got, want, rtol=case.tol, atol=case.tol)
        check_rows(pipe, case, DENSE)
    assert len(compiles) == after_first[0] == (1 if style == "whole" else case.regional_graphs)


def run_sparse(name, style, policy, monkeypatch, extra=None):
    """Every call of each self-attention site against a float64 attention over the lists its plan
    returned (batched CFG: both halves in one call), the first steps dense (the warm-up, scaled to
    the pipeline's 6 steps read from the stack), every later one sparse."""
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)   # torch paths: the interpreter is slow
    case = CASES[name]
    pipe, kwargs = case.build()
    pipe.set_progress_bar_config(disable=True)
    checker = Checker(monkeypatch, OPTS["block_size"])
    compiles, planned = [], []
    compile_transformer(pipe, style, {"policy": policy, **OPTS, **(extra or {})}, compiles)

    def on_step(i, t):                      # the step count and text position the policies planned with
        planned.extend((s.context.num_steps, s.context.info.text_position)
                       for (key, _), s in modcompile.runtime.REGISTRY.states.items()
                       if key.split("/", 1)[1] in case.sites and s.last_step == i)
    out = generate(pipe, kwargs, on_step)
    assert torch.isfinite(out).all()
    assert len(compiles) == (1 if style == "whole" else case.regional_graphs)
    assert len(planned) == STEPS * len(case.sites) * case.forwards
    assert set(planned) == {(STEPS, case.text_position)}
    check_rows(pipe, case, "sparse")
    warmup = 1 if policy == "vmoba" else 2                         # vmoba: 25% of 6; mod: 2 observed steps
    for site in case.sites:
        calls = [(step, dense, d) for key, step, dense, d in checker.calls if key.endswith("/" + site)]
        assert [s for s, *_ in calls] == [s for s in range(STEPS) for _ in range(case.forwards)], calls
        assert all(dense and d == 1.0 for s, dense, d in calls if s < warmup), calls
        assert all(not dense and d < 1.0 for s, dense, d in calls if s >= warmup), calls


# fast (about 20 s together on 2 cores): the dense check once, each pipeline sparse once; the rest slow
FAST = {("ltx", "dense", "regional"), ("cogvideox", "vmoba", "regional"), ("hunyuan_video", "vmoba", "regional"),
        ("ltx", "mod", "regional")}


def cases(policies):
    return [pytest.param(name, policy, style, id=f"{name}-{policy}-{style}",
                         marks=[] if (name, policy, style) in FAST else [pytest.mark.slow])
            for name in CASES for policy in policies for style in ("regional", "whole")]


@pytest.mark.parametrize("name,policy,style", cases(["dense"]))
def test_dense_policy_equals_the_uncompiled_pipeline(name, policy, style):
    run_dense(name, style)


@pytest.mark.parametrize("name,policy,style", cases(["vmoba", "mod"]))
def test_self_attention_runs_sparse_after_the_warm_up(name, policy, style, monkeypatch):
    run_sparse(name, style, policy, monkeypatch, {"density": 0.5} if policy == "mod" else None)


def bf16_collisions(scheduler, steps):
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.to(torch.bfloat16)
    return int((ts[1:] == ts[:-1]).sum())


class _Model(torch.nn.Module):
    def forward(self, timestep):
        return timestep


class _Loop(diffusers.DiffusionPipeline):
    """Kandinsky 5's denoising loop, the model call reduced to its timestep: CFG as two forwards,
    the timestep cast to the model's dtype (bfloat16)."""

    def __init__(self, model, scheduler):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)

    def __call__(self, steps, on_forward):
        self.scheduler.set_timesteps(steps)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            for _ in range(2):
                self.model(timestep=t.unsqueeze(0).to(torch.bfloat16))
                on_forward()


def test_bf16_timesteps_that_round_alike_are_still_two_steps():
    """A bfloat16 timestep keeps 8 bits: near 1000 steps of a shift-10 schedule come 1 to 4 apart,
    so two of 40 round to the same value as the step before them, and every value is up to 2 off
    the schedule's. Each loop iteration of the pipeline is still its own step, numbered as the
    schedule numbers it; its two forwards are the two CFG passes."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=10.0)
    assert bf16_collisions(scheduler, 40) == 2
    model = _Model()
    run = modcompile.runtime.ModelRun("model", model)
    modcompile.runtime.install_input_hook(model, run, None)
    seen = []
    _Loop(model, scheduler)(40, lambda: seen.append(run.tracker.step))
    assert seen == [i for i in range(40) for _ in range(2)]
    assert run.tracker.num_steps == 40 and run.tracker.generation == 1


@pytest.mark.slow                   # 80 forwards in bfloat16: about 15 s on 2 cores
def test_kandinsky5_in_bf16_counts_every_step_of_a_long_schedule(monkeypatch):
    """Kandinsky5T2VPipeline hands its model the timestep in the model's dtype: the real pipeline in
    bfloat16 with 40 steps of a shift-10 schedule, two of them rounding to their predecessor's
    value. report() counts 40 steps of two passes, and each step ran both passes."""
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    pipe, kwargs = kandinsky5(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert bf16_collisions(pipe.scheduler, 40) == 2
    compiles = []
    compile_transformer(pipe, "regional", {"policy": "dense", **OPTS}, compiles)
    sites = CASES["kandinsky5"].sites
    passes = {}

    def on_step(i, t):
        passes[i] = sorted(p for (key, p), s in modcompile.runtime.REGISTRY.states.items()
                           if key.split("/", 1)[1] in sites and s.last_step == i)
    out = generate(pipe, kwargs, on_step, steps=40)
    assert torch.isfinite(out).all()
    assert passes == {i: [0, 0, 1, 1] for i in range(40)}
    rows = [r for r in modcompile.report(print_table=False) if r.site.split("/", 1)[1] in sites]
    assert len(rows) == 2 and all((r.steps, r.passes) == (40, 2) for r in rows), rows
