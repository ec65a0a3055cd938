"""A real client: a tiny randomly initialised diffusers WanTransformer3DModel under modsparse."""
import pytest
import torch

import modcompile

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("fresh_modcompile")


def tiny_wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def test_wan_transformer_dense_policy_matches_eager_over_denoising_steps():
    eager = tiny_wan()
    compiles = []

    def counting_backend(gm, inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, inputs, **kw)

    model = torch.compile(eager, backend=counting_backend,
                          options={"policy": "dense", "min_seq_len": 64, "block_size": 32})
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 3, 16, 16, generator=g)
    text = torch.randn(1, 8, 16, generator=g)
    with torch.no_grad():
        for t in (999, 749, 499, 249):                     # a short Euler denoising loop
            ts = torch.tensor([t])
            got = model(latents, ts, text, return_dict=False)[0]
            want = eager(latents, ts, text, return_dict=False)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            latents = latents - 0.25 * want
    assert len(compiles) == 1                               # no recompile per step
    rows = modcompile.report(print_table=False)
    self_attn = [r for r in rows if ".attn1" in r.site]
    cross_attn = [r for r in rows if ".attn2" in r.site]
    assert len(self_attn) == 2 and all(r.rewritten for r in self_attn)
    assert all(r.grid == (3, 8, 8) and r.steps == 4 for r in self_attn)
    assert len(cross_attn) == 2 and all("cross-attention" in r.reason for r in cross_attn)
