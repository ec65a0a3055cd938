"""Models that keep a KV cache across calls, compiled with modsparse and called as their pipelines
call them: the cache is a Python object (Wan-Animate-2) or a dict of tensors (AnyFlow-FAR) that one
call writes and the next ones read, so the compiled calls must write what eager writes and read it
back, with no recompile per call.

Wan-Animate-2, per segment of the driving video: a reference pass (``kv_cache_mode="extract"``,
given the schedule's first timestep) writes every layer's K/V into a fresh cache; each denoising
step then runs a conditional and an unconditional pass (``"cached"``) whose self-attention reads
the cache through flex_attention. Only the reference pass's self-attention is SDPA; it is the
first timestep of a new generation, so it runs dense in the warm-up (in both compile styles), and
sparse only without one.

AnyFlow-FAR, per chunk: autoregressive steps over the chunk (its keys after the cached ones) and a
cache-prefill call; all its self-attention is flex_attention, none of it is rewritten."""
import copy

import pytest
import torch

import modcompile
from modcompile import dispatch
from modcompile.passes.attention_sites import FLEX_REASON

pytest.importorskip("diffusers")

from clients import BY_NAME, TEXT, TEXT_DIM, WA2_IMAGE, compile_model  # noqa: E402

pytestmark = [pytest.mark.usefixtures("fresh_modcompile"), pytest.mark.slow]

OPTS = {"block_size": 32, "min_seq_len": 64}
STEPS = (900.0, 700.0, 500.0)


@pytest.fixture(autouse=True)
def torch_reference_attention(monkeypatch):
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)


def _counting(compiles):
    def backend(gm, example_inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, example_inputs, **kw)
    return backend


# ----------------------------------------------------------------------------- Wan-Animate-2

def _wan_animate2_segments(model, segments=2, steps=STEPS, after_call=None):
    """What the modular pipeline's segment loop passes the transformer; returns every call's
    output and each segment's cache (its tensors as the reference pass wrote them)."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    g = torch.Generator().manual_seed(5)
    text, negative = torch.randn(TEXT, TEXT_DIM, generator=g), torch.randn(TEXT, TEXT_DIM, generator=g)
    image = torch.randn(1, WA2_IMAGE, 1280, generator=g)
    outs, caches = [], []
    with torch.no_grad():
        for _ in range(segments):
            driving, condition = torch.randn(4, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
            reference = torch.randn(8, 5, 16, 16, generator=g)
            latents = torch.randn(4, 5, 16, 16, generator=g)
            cache = WanAnimate2KVCache(2)
            outs.append(model([driving], timestep=torch.tensor([steps[0]]), encoder_hidden_states=[text],
                              condition_latents=[condition], encoder_hidden_states_image=image, kv_cache=cache,
                              kv_cache_mode="extract", seq_len=256, offset_grid_sizes=torch.tensor([[4, 8, 8]]),
                              return_dict=False)[0][0])
            caches.append([(c.key.clone(), c.value.clone()) for c in cache.layer_caches])
            for i, t in enumerate(steps):
                preds = [model([latents], timestep=torch.tensor([t]), encoder_hidden_states=[prompt],
                               condition_latents=[reference], encoder_hidden_states_image=image, kv_cache=cache,
                               kv_cache_mode="cached", seq_len=320, reference_grid_sizes=torch.tensor([[4, 8, 8]]),
                               origin_len=12, origin_area=[128, 128], is_uncondtion=uncond,
                               return_dict=False)[0][0] for prompt, uncond in ((text, False), (negative, True))]
                outs += preds
                latents = latents - 0.2 * (preds[1] + 3.0 * (preds[0] - preds[1]))   # CFG, an Euler step
                if after_call is not None:
                    after_call()
            cache.clear()
    return outs, caches


def _reference_rows(table):
    """The reference pass's self-attention rows (its SDPA sites over the driving video's tokens)."""
    return [r for r in table if r.site.endswith("self_attn#0") and r.reason != FLEX_REASON]


@pytest.mark.parametrize("style", ["whole", "regional"])
def test_wan_animate2_segments_dense_equal_eager_with_no_recompile(style):
    """Two segments: the cache each compiled reference pass writes and every pass's output equal
    eager's; the second segment (a new cache object, other latents) compiles nothing."""
    client = BY_NAME["wan_animate2"]
    eager_outs, eager_caches = _wan_animate2_segments(client.build())
    compiles, marks = [], []
    model = compile_model(client.build(), style, _counting(compiles), {"policy": "dense", **OPTS})
    outs, caches = _wan_animate2_segments(model, after_call=lambda: marks.append(len(compiles)))
    for got, want in zip(outs, eager_outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(caches, eager_caches):
        for (k, v), (k0, v0) in zip(got, want):
            torch.testing.assert_close(k, k0, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, v0, rtol=1e-4, atol=1e-5)
    assert len(set(marks[1:])) == 1, marks            # compiled by the end of the first step, then never
    table = modcompile.report(print_table=False)
    assert len([r for r in table if r.reason == FLEX_REASON]) == 2
    assert [r.status for r in _reference_rows(table)] == ["dense (policy dense)"] * 2


@pytest.mark.parametrize("style,warmup", [("whole", 1), ("regional", 1), ("regional", 0)])
def test_wan_animate2_reference_pass_is_a_new_generations_first_step(style, warmup):
    """vmoba: each segment's reference pass is the first step of a new generation (its timestep is
    the schedule's first, above the last step's), so with a warm-up step it runs dense in every
    segment, in both compile styles (whole-model compile included, where Dynamo falls back to eager
    for the forward and the timestep graph it compiles embeds the pass's constant); without one it
    runs block-sparse, and the steps that read what it cached stay finite and near eager. The flex
    sites stay as the model wrote them."""
    client = BY_NAME["wan_animate2"]
    eager_outs, _ = _wan_animate2_segments(client.build())
    compiles, marks = [], []
    model = compile_model(client.build(), style, _counting(compiles),
                          {"policy": "vmoba", "warmup_steps": warmup, **OPTS})
    outs, _ = _wan_animate2_segments(model, after_call=lambda: marks.append(len(compiles)))
    assert len(set(marks[1:])) == 1, marks
    rows = _reference_rows(modcompile.report(print_table=False))
    assert len(rows) == 2 and all((r.steps, r.passes, r.grid) == (1, 1, (4, 8, 8)) for r in rows), rows
    assert all(r.status == ("dense (warm-up)" if warmup else "sparse") for r in rows), rows
    for got, want in zip(outs, eager_outs):
        assert torch.isfinite(got).all()
        assert (got - want).abs().mean() < 0.5 * want.abs().mean()
    if warmup:                                         # dense everywhere: eager's outputs
        for got, want in zip(outs, eager_outs):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- AnyFlow-FAR

CHUNKS = [1, 1, 1]      # full_chunk_limit 2: the third chunk's steps read the first from the compressed cache


def _anyflow_far_chunks(model, steps=((900.0, 600.0), (600.0, 300.0)), after_step=None):
    """AnyFlowFARPipeline's loop without CFG: per chunk its steps, then a cache-prefill call over the
    chunks so far (with the pipeline's pre-built block mask); returns every step's prediction."""
    base = getattr(model, "_orig_mod", model)
    g = torch.Generator().manual_seed(6)
    init, text = torch.randn(1, len(CHUNKS), 8, 16, 16, generator=g), torch.randn(1, TEXT, TEXT_DIM, generator=g)
    kv = {i: {"full_cache": torch.zeros(2, 1, 2, 2 * max(CHUNKS) * 64, 32),
              "compressed_cache": torch.zeros(2, 1, 2, (len(CHUNKS) - 1) * max(CHUNKS) * 16, 32)} for i in range(2)}
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    output, preds = torch.zeros_like(init), []
    with torch.no_grad():
        for c in range(len(CHUNKS)):
            start, stop = sum(CHUNKS[:c]), sum(CHUNKS[:c + 1])
            # a contiguous copy: without CFG the pipeline's first step of a chunk passes a view of its
            # latents, whose strides Dynamo guards on (a recompile at the next step, modsparse or not)
            chunk = init[:, start:stop].clone(memory_format=torch.contiguous_format)
            for t, r in steps:
                pred, _ = model(hidden_states=chunk, timestep=torch.full((1, chunk.shape[1]), t),
                                r_timestep=torch.full((1, chunk.shape[1]), r), encoder_hidden_states=text,
                                chunk_partition=CHUNKS[:c + 1], kv_cache=kv, kv_cache_flag=copy.deepcopy(flag),
                                return_dict=False)
                preds.append(pred)
                chunk = chunk + (r - t) / 1000.0 * pred
                if after_step is not None:
                    after_step(c)
            output[:, start:stop] = chunk
            if c < len(CHUNKS) - 1:
                flag["is_cache_step"] = True
                done = output[:, :stop].clone(memory_format=torch.contiguous_format)
                mask = base.build_attention_mask(chunk_partition=CHUNKS[:c + 1], height=16, width=16, mode="cache")
                model(hidden_states=done, timestep=torch.zeros(1, stop), r_timestep=torch.zeros(1, stop),
                      encoder_hidden_states=text, chunk_partition=CHUNKS[:c + 1], attention_mask=mask, kv_cache=kv,
                      kv_cache_flag=copy.deepcopy(flag), return_dict=False)
                flag["num_cached_chunks"] += 1
                flag["is_cache_step"] = False
    return preds


@pytest.mark.parametrize("style,policy", [("whole", "dense"), ("regional", "dense"), ("regional", "mod")])
def test_anyflow_far_chunks_equal_eager_and_keep_flex_attention(style, policy):
    """Three chunks (the third reads a compressed cache): every step's prediction equals eager's,
    whatever the policy (the causal self-attention is flex_attention, listed dense with the reason;
    the text cross-attention is not self-attention); a chunk's second step compiles nothing (the
    cache grows per chunk, and so do the shapes), and a second generation nothing at all."""
    client = BY_NAME["anyflow_far"]
    eager = _anyflow_far_chunks(client.build())
    compiles, marks = [], []
    model = compile_model(client.build(), style, _counting(compiles), {"policy": policy, "warmup_steps": 1, **OPTS})
    preds = _anyflow_far_chunks(model, after_step=lambda c: marks.append((c, len(compiles))))
    for got, want in zip(preds, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for c in range(len(CHUNKS)):
        assert len({n for chunk, n in marks if chunk == c}) == 1, marks
    first = len(compiles)
    _anyflow_far_chunks(model)
    assert len(compiles) == first
    table = modcompile.report(print_table=False)
    flex = [r for r in table if r.reason == FLEX_REASON]
    assert len(flex) == 2 and all(r.status == "dense" for r in flex), table
    assert not [r for r in table if r.rewritten]
