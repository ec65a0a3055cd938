"""The latent grid and the text position are inferred for every zoo model (tests/clients.py), in
both compile styles, without ``video_grid`` / ``text_position`` options; a given grid that does not
fit is said; data-dependent attention sizes keep a site dense instead of crashing."""
import logging
import math

import pytest
import torch

import modcompile
from modcompile.layout import model_layout
from modcompile.runtime import REGISTRY

pytest.importorskip("diffusers")

from clients import BY_NAME, CLIENTS, compile_model, small_inputs, true_grid  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_modcompile")


@pytest.fixture(autouse=True)
def torch_reference_attention(monkeypatch):
    """The layout is under test, not the kernel: the torch reference paths (the interpreter would
    take minutes at these sizes)."""
    from modcompile import dispatch
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)

OPTS = {"min_seq_len": 64, "block_size": 32}
STEPS = (900.0, 700.0, 500.0, 300.0)
SPARSE = ["wan", "skyreels_v2", "cogvideox", "ltx_video", "cosmos", "allegro"]   # no masked self-attention


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_layout_rule_gives_each_models_grid_and_text_position(client):
    model = client.build()
    inputs = client.inputs()
    layout = model_layout(model, inputs)
    assert layout.grid == true_grid(client, inputs) == client.grid
    assert layout.text_position == (client.text_position or "last")


def test_layout_follows_the_input_resolution():
    client = BY_NAME["cogvideox"]
    model = client.build()
    inputs = client.inputs()
    inputs["hidden_states"] = torch.randn(1, 3, 4, 12, 20)              # (B, F, C, H, W)
    assert model_layout(model, inputs).grid == (3, 6, 10)
    ltx = BY_NAME["ltx_video"]
    assert model_layout(ltx.build(), {**ltx.inputs(), "num_frames": 2, "height": 32, "width": 16,
                                      "hidden_states": torch.randn(1, 1024, 8)}).grid == (2, 32, 16)


def _counting(compiles):
    def backend(gm, example_inputs, **kw):
        compiles.append(len(REGISTRY.runs))
        return modcompile.modsparse(gm, example_inputs, **kw)
    return backend


test_inputs = small_inputs


def _run(client, model, eager=None, steps=STEPS):
    outs = []
    with torch.no_grad():
        for i, t in enumerate(steps):
            inputs = test_inputs(client, seed=1 + i, t=t)
            out = model(**inputs)[0]
            if eager is not None:
                outs.append((out, eager(**inputs)[0]))
    return outs


def _self_attention_rows():
    return [r for r in modcompile.report(print_table=False) if r.status == "sparse"]


# the fast set keeps each input form in both styles; Wan's grid (SkyReels-V2 shares its code) in both styles is also checked by
# test_model_instances.py, Cosmos (slow to compile) by the layout rule test
FAST = {("allegro", "whole"), ("cogvideox", "whole"), ("cogvideox", "regional"),
        ("ltx_video", "whole"), ("ltx_video", "regional")}
STYLES = [pytest.param(name, style, marks=[] if (name, style) in FAST else [pytest.mark.slow], id=f"{name}-{style}")
          for name in SPARSE for style in ("whole", "regional")]


@pytest.mark.parametrize("name,style", STYLES)
def test_grid_and_text_inferred_vmoba_sparse_dense_warmup_equals_eager(name, style):
    """One dense warm-up step (equal to eager), then vmoba sparse on every self-attention site with
    the inferred grid and text tokens; one compile per graph, none per step."""
    client = BY_NAME[name]
    eager, model = client.build(), client.build()
    compiles = []
    model = compile_model(model, style, _counting(compiles), {"policy": "vmoba", "warmup_steps": 1, **OPTS})
    outs = _run(client, model, eager)
    first = len(compiles)
    _run(client, model, steps=(250.0, 200.0))                         # same shapes, later steps
    assert len(compiles) == first                                     # no recompile per step
    dense_out, eager_out = outs[0]
    torch.testing.assert_close(dense_out, eager_out, rtol=1e-4, atol=1e-4)
    rows = _self_attention_rows()
    assert len(rows) == client.sites.count("video")                   # one row per layer
    grid = true_grid(client, test_inputs(client))
    for r in rows:
        assert (r.grid, r.text_tokens) == (grid, client.text_tokens), r
        assert r.density is not None and r.density < 1.0, r
    states = [s for s in REGISTRY.states.values() if s.info.status == "sparse"]
    want = client.text_position or "last"
    assert states and all(s.context.info.text_position == want for s in states)
    for out, ref in outs[1:]:                                          # sparse steps: finite, near eager
        assert torch.isfinite(out).all()
        assert (out - ref).abs().mean() < 0.5 * ref.abs().mean()


def test_masked_joint_attention_models_report_the_inferred_grid():
    """HunyuanVideo (joint attention with a text mask): the grid and text tokens are inferred."""
    client = BY_NAME["hunyuan_video"]
    model = torch.compile(client.build(), backend="modsparse", options={"policy": "vmoba", **OPTS})
    _run(client, model, steps=STEPS[:2])
    joint = [r for r in modcompile.report(print_table=False) if r.seq_len == client.seq_len]
    assert len(joint) == 2 and all((r.grid, r.text_tokens) == (client.grid, client.text_tokens) for r in joint)


@pytest.mark.parametrize("style", ["whole", "regional"])
def test_cogvideox_text_first_inferred_and_option_overrides(style):
    """CogVideoX puts the text first; an explicit text_position wins over the inferred one."""
    client = BY_NAME["cogvideox"]
    model = compile_model(client.build(), style, "modsparse",
                          {"policy": "vmoba", "warmup_steps": 0, "text_position": "last", **OPTS})
    _run(client, model, steps=STEPS[:1])
    states = [s for s in REGISTRY.states.values() if s.info.status == "sparse"]
    assert states and all(s.context.info.text_position == "last" for s in states)
    assert all(s.context.info.inferred_text_position == "first" for s in states)


@pytest.mark.parametrize("style", ["whole", pytest.param("regional", marks=pytest.mark.slow)])
def test_given_grid_that_disagrees_with_the_latents_is_warned_once_and_reported(style, caplog):
    client = BY_NAME["ltx_video"]                                     # 2x8x16 tokens in test_inputs
    model = compile_model(client.build(), style, "modsparse",
                          {"policy": "vmoba", "warmup_steps": 0, "video_grid": (8, 2, 16), **OPTS})
    with caplog.at_level(logging.WARNING, logger="modcompile"):
        _run(client, model)
    warnings = [r for r in caplog.records if "video_grid 8x2x16 given" in r.getMessage()]
    assert len(warnings) == 1 and "2x8x16" in warnings[0].getMessage()
    rows = _self_attention_rows()
    assert rows and all("video_grid 8x2x16 given" in r.reason and r.grid == (8, 2, 16) for r in rows)


def test_given_grid_that_cannot_fit_keeps_sites_dense_with_the_reason(caplog):
    client = BY_NAME["cogvideox"]
    model = torch.compile(client.build(), backend="modsparse",
                          options={"policy": "vmoba", "video_grid": (8, 8, 8), **OPTS})
    with caplog.at_level(logging.WARNING, logger="modcompile"):
        _run(client, model, steps=STEPS[:2])
    rows = [r for r in modcompile.report(print_table=False) if r.seq_len == client.seq_len]
    assert rows and all(r.status == "dense" and "more than the sequence" in r.reason for r in rows)
    assert sum("more than the sequence" in r.getMessage() for r in caplog.records) == 1


class NonzeroJointAttention(torch.nn.Module):
    """Joint attention over the video tokens and the text tokens a mask keeps, gathered with
    nonzero (as Mochi does): a data-dependent sequence length."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(dim, 3 * dim), heads

    def forward(self, x, text, keep):
        x = torch.cat([x, text[:, keep.nonzero().flatten()]], dim=1)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_data_dependent_sizes_keep_the_site_dense_with_the_reason():
    torch.manual_seed(0)
    model = NonzeroJointAttention().eval()
    x, text, keep = torch.randn(1, 128, 64), torch.randn(1, 16, 64), torch.rand(16) > 0.3
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out = torch.compile(model, backend="modsparse", options={**OPTS, "policy": "vmoba"})(x, text, keep)
    with torch.no_grad():
        want = model.double()(x.double(), text.double(), keep)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    rows = modcompile.report(print_table=False)
    assert len(rows) == 1 and rows[0].status == "dense" and "data-dependent" in rows[0].reason


def test_mochi_with_captured_dynamic_output_shapes_does_not_crash():
    """Mochi gathers its valid text tokens with nonzero: with capture_dynamic_output_shape_ops the
    attention lands in the graph with data-dependent sizes; it stays dense and equals eager."""
    client = BY_NAME["mochi"]
    eager, model = client.build(), client.build()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        model = torch.compile(model, backend="modsparse", options={"policy": "vmoba", **OPTS})
        for out, ref in _run(client, model, eager, steps=STEPS[:2]):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    rows = modcompile.report(print_table=False)
    assert rows and all(r.status == "dense" and r.reason for r in rows)
    assert math.isfinite(sum(r.seq_len or 0 for r in rows))


def test_packed_rows_are_read_on_the_host_once_per_new_index_tensors(monkeypatch):
    """MiniMax-H3's grid comes from its index inputs (a host read): the same tensors at the next
    step give the kept answer without a read; new or modified ones are read again."""
    from modcompile import layout
    client = BY_NAME["minimax_h3"]
    model, inputs = client.build(), client.inputs()
    reads = []
    original = layout._packed_grid
    monkeypatch.setattr(layout, "_packed_grid", lambda *a: reads.append(1) or original(*a))
    monkeypatch.setattr(layout, "_PACKED_LAST", [None])
    want = (client.grid, client.text_position)
    assert (model_layout(model, inputs).grid, model_layout(model, inputs).text_position) == want
    assert len(reads) == 1
    inputs["video_indices"] = inputs["video_indices"].clone()
    assert model_layout(model, inputs).grid == client.grid and len(reads) == 2
    inputs["position_ids"][-1, 1] = 0                      # in place: the last token row loses its h
    assert model_layout(model, inputs).grid != client.grid and len(reads) == 3


def test_joyimage_images_are_the_frames_of_the_grid():
    """JoyImage-Edit's images (B, N, C, T, H, W) stand side by side on the frame axis; Edit-Plus packs
    its images' patches one after another, which make one grid when they share (h, w) and fill the
    patches: a reference of another size, or a padded batch, gives none (vmoba then plans dense)."""
    edit = BY_NAME["joyimage_edit"]
    assert model_layout(edit.build(), {**edit.inputs(), "hidden_states": torch.randn(1, 3, 4, 1, 16, 24)}).grid == (3, 8, 12)
    plus = BY_NAME["joyimage_edit_plus"]
    model, inputs = plus.build(), plus.inputs()
    assert model_layout(model, inputs).grid == (2, 8, 8)
    other = model_layout(model, {**inputs, "shape_list": [[(1, 8, 8), (1, 4, 8)]],
                                 "hidden_states": torch.randn(1, 96, 4, 1, 2, 2)})
    assert other.grid is None and "other sizes" in other.rule
    padded = model_layout(model, {**inputs, "hidden_states": torch.randn(1, 160, 4, 1, 2, 2)})
    assert padded.grid is None and "padding" in padded.rule


@pytest.mark.slow
def test_joyimage_edit_plus_references_of_another_size_run_dense_without_a_grid():
    """A reference image of another size than the target: no grid, vmoba plans every call dense
    (equal to eager) and says why; nothing crashes."""
    from clients import _joyimage_plus_inputs
    client = BY_NAME["joyimage_edit_plus"]
    eager, model = client.build(), client.build()
    model = compile_model(model, "regional", "modsparse", {"policy": "vmoba", "warmup_steps": 1, **OPTS})
    with torch.no_grad():
        for i, t in enumerate(STEPS[:3]):
            inputs = _joyimage_plus_inputs(torch.Generator().manual_seed(i), t, items=((1, 8, 8), (1, 4, 8)))
            torch.testing.assert_close(model(**inputs)[0], eager(**inputs)[0], rtol=1e-4, atol=1e-4)
    rows = [r for r in modcompile.report(print_table=False) if r.rewritten]
    assert len(rows) == 2 and all(r.status == "dense (no grid)" and r.grid is None for r in rows), rows
