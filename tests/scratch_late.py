"""Scratch (helper group `late`, not collected by CI): zoo entries for Kandinsky6Transformer3DModel
(video alone, and video + audio) and MiniMaxH3Transformer3DModel (one packed [text | audio | video]
sequence), their facts checked against an eager run with a recording SDPA, and the zoo matrix
(whole / regional x mod / vmoba) through ``test_zoo_sparse.run_matrix_case``.

Run one case at a time:
  TORCHINDUCTOR_COMPILE_THREADS=1 OMP_NUM_THREADS=1 python -m pytest -q tests/scratch_late.py -x -p no:cacheprovider -k ...

LATE_FIX=1 applies the proposed layout.py change (results/zoo/late_fix.diff: Kandinsky 6 latents channels last,
MiniMax-H3's grid from its packed rows) as a monkeypatch; LATE_FIX=2 states the fixed facts without patching (for a
tree with the diff applied).
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import modcompile
from modcompile import layout

pytest.importorskip("diffusers")

import clients  # noqa: E402
import test_zoo_sparse  # noqa: E402
from clients import TEXT, TEXT_DIM, Client, _randn  # noqa: E402

FIX = os.environ.get("LATE_FIX") in ("1", "2")     # 2: the fix is in modcompile/layout.py already (no monkeypatch)
PATCH = os.environ.get("LATE_FIX") == "1"

# ----------------------------------------------------------------------------- the clients

K6_AUDIO = 16       # Kandinsky 6 audio latents (B, L, in_audio_dim)


def _kandinsky6_inputs(g, t, frames=4, size=16, channels=9, audio=0):
    # latents channels last (B, F, H, W, C); visual_cond: C = 2 x in_visual_dim + 1 ([latent | cond latent | mask]).
    # visual_rope_pos left out: the forward builds an arange per axis of the token grid (the pipeline passes it only
    # with a reference frame appended, whose temporal index is 0)
    inputs = {"hidden_states": _randn(g, 1, frames, size, size, channels),
              "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "pooled_projections": _randn(g, 1, 16),
              "timestep": torch.tensor([t]), "return_dict": False}
    if audio:
        inputs["audio_hidden_states"] = _randn(g, 1, audio, 8)
    return inputs


def _kandinsky6_audio_inputs(g, t):
    return _kandinsky6_inputs(g, t, audio=K6_AUDIO)


# head_dim = sum(axes_dims) = 32, heads = model_dim / head_dim = 2; the audio stream takes the same widths
_KANDINSKY6 = dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=32,
                   patch_size=(1, 2, 2), model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2,
                   axes_dims=(8, 12, 12), in_audio_dim=8, out_audio_dim=8)

MM_AUDIO = 16       # MiniMax-H3 audio rows (8 latents x 2 channels, channel-major)


def _minimax_h3_inputs(g, t, frames=4, height=8, width=8, audio_latents=8, audio_channels=2):
    """As the modular pipeline packs t2va (build_packed_sequence, no keyframes): [text | audio | video], video rows
    frame-major over the patchified grid; one timestep value in [0, 1] for every row; tags 0 video, 1 text, 2 audio."""
    video, audio = frames * height * width, audio_latents * audio_channels
    n = TEXT + audio + video
    pos = torch.zeros(n, 3)
    pos[:TEXT, 0] = torch.arange(TEXT)
    pos[TEXT:TEXT + audio, 0] = (TEXT + torch.arange(audio_latents)).repeat(audio_channels)
    pos[TEXT:TEXT + audio_latents, 2], pos[TEXT + audio_latents:TEXT + audio, 2] = 0, width - 1
    tt, hh, ww = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    pos[TEXT + audio:] = torch.stack([TEXT + tt, hh, ww], -1).reshape(-1, 3).float()
    tags = torch.cat([torch.ones(TEXT), torch.full((audio,), 2), torch.zeros(video)]).long()
    return {"hidden_states": _randn(g, 1, video, 4 * 4), "audio_hidden_states": _randn(g, 1, audio, 8),
            "encoder_hidden_states": _randn(g, 1, TEXT, TEXT_DIM), "timestep": torch.tensor([t / 1000.0]),
            "timestep_indices": torch.zeros(n, dtype=torch.long), "token_tags": tags, "position_ids": pos,
            "video_indices": torch.arange(TEXT + audio, n), "audio_indices": torch.arange(TEXT, TEXT + audio),
            "text_indices": torch.arange(TEXT), "return_dict": False}


# rotary: 2 x 3 x rope_freq_dim = 24 of the 32 head channels
_MINIMAX_H3 = dict(num_attention_heads=2, attention_head_dim=32, hidden_size=64, num_layers=2, num_refiner_layers=1,
                   ffn_dim=128, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=TEXT_DIM,
                   freq_dim=16, time_embed_hidden_dim=32, time_embed_dim=32, rope_freq_dim=4)

LATE = [
    # two text branches (video, audio) run even without audio: 2 text self-attentions first
    Client("kandinsky6", "Kandinsky6Transformer3DModel", _KANDINSKY6, _kandinsky6_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None, sites=("text", "text") + ("video", "cross") * 2, latents="BFHWC",
           sparse=None if FIX else {"mod": 2, "vmoba": 0}, sparse_grid=() if FIX else None,
           grid_rule="latents (B, F, H, W, C) / patch sizes"),
    # per fused block: video self, video-text cross, audio self, audio-text cross, video->audio cross (Nv x Na),
    # audio->video cross (Na x Nv)
    Client("kandinsky6_audio", "Kandinsky6Transformer3DModel", _KANDINSKY6, _kandinsky6_audio_inputs, grid=(4, 8, 8),
           text_tokens=0, text_position=None, sites=("text", "text") + ("video", "cross", "audio", "cross", "cross",
                                                                       "cross") * 2,
           latents="BFHWC", other_self={K6_AUDIO: "audio"},
           sparse=None if FIX else {"mod": 2, "vmoba": 0}, sparse_grid=() if FIX else None,
           grid_rule="latents (B, F, H, W, C) / patch sizes"),
    # one packed sequence [text 8 | audio 16 | video 4x8x8]: 24 non-grid tokens, all before the grid; the grid is in
    # no input's shape (packed rows, no num_frames/height/width): modsparse reads none
    Client("minimax_h3", "MiniMaxH3Transformer3DModel", _MINIMAX_H3, _minimax_h3_inputs, grid=(4, 8, 8),
           text_tokens=TEXT + MM_AUDIO, text_position=TEXT + MM_AUDIO, sites=("text", "video", "video"),
           sparse=None if FIX else {"mod": 2, "vmoba": 0}, sparse_grid=() if FIX else None,
           grid_rule="packed rows: the trailing run of video_indices, frame-major over position_ids (proposed; "
                     "without it none: the grid is in no input's shape)"),
]


def _kandinsky6_i2v_inputs(g, t, frames=4, size=16):
    """As Kandinsky6TI2VAPipeline conditions on an image: the clean reference frame appended as an extra latent frame
    (token type 1) that reuses temporal RoPE position 0, given through visual_rope_pos."""
    inputs = _kandinsky6_inputs(g, t, frames=frames + 1, size=size)
    inputs["visual_token_type_ids"] = torch.tensor([[0] * frames + [1]])
    inputs["visual_rope_pos"] = (torch.cat([torch.arange(frames), torch.zeros(1, dtype=torch.long)]),
                                 torch.arange(size // 2), torch.arange(size // 2))
    return inputs


def _minimax_h3_fl2va_inputs(g, t, frames=4, height=8, width=8, audio=MM_AUDIO):
    """fl2va with one "first" keyframe: [text 8 | keyframe 64 (video-tagged, t anchored at the first frame) | audio 16 |
    video 256]; hidden_states holds the keyframe's rows and the target's, in video_indices order."""
    base = _minimax_h3_inputs(g, t, frames, height, width)
    cond = height * width
    n = TEXT + cond + audio + frames * height * width
    pos = torch.cat([base["position_ids"][:TEXT], torch.zeros(cond, 3), base["position_ids"][TEXT:]])
    hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos[TEXT:TEXT + cond] = torch.stack([torch.full_like(hh, TEXT), hh, ww], -1).reshape(-1, 3).float()
    tags = torch.cat([base["token_tags"][:TEXT], torch.zeros(cond, dtype=torch.long), base["token_tags"][TEXT:]])
    base.update(hidden_states=_randn(g, 1, cond + frames * height * width, 16), position_ids=pos, token_tags=tags,
                timestep_indices=torch.zeros(n, dtype=torch.long),
                video_indices=torch.cat([torch.arange(TEXT, TEXT + cond), torch.arange(TEXT + cond + audio, n)]),
                audio_indices=torch.arange(TEXT + cond, TEXT + cond + audio))
    return base


EXTRA = [
    Client("kandinsky6_i2v", "Kandinsky6Transformer3DModel", dict(_KANDINSKY6, visual_token_type_num_embeddings=2),
           _kandinsky6_i2v_inputs, grid=(5, 8, 8), text_tokens=0, text_position=None,
           sites=("text", "text") + ("video", "cross") * 2, latents="BFHWC",
           sparse=None if FIX else {"mod": 2, "vmoba": 0}, sparse_grid=() if FIX else None,
           grid_rule="latents (B, F, H, W, C) / patch sizes (the reference frame counts as a frame)"),
    # the keyframe rows come from hidden_states too but sit before the audio: the unchanged rows when the latents
    # move are the text and the audio ones (extra["unchanged"]), not a prefix
    Client("minimax_h3_fl2va", "MiniMaxH3Transformer3DModel", _MINIMAX_H3, _minimax_h3_fl2va_inputs, grid=(4, 8, 8),
           text_tokens=TEXT + 64 + MM_AUDIO, text_position=TEXT + 64 + MM_AUDIO, sites=("text", "video", "video"),
           sparse=None if FIX else {"mod": 2, "vmoba": 0}, sparse_grid=() if FIX else None,
           extra={"unchanged": list(range(TEXT)) + list(range(TEXT + 64, TEXT + 64 + MM_AUDIO))}),
]
LATE += EXTRA
BY_NAME = {c.name: c for c in LATE}


# ----------------------------------------------------------------------------- proposed layout.py rules

# MiniMax-H3 packs one sequence per request, [text | keyframe conditions or references | target audio | target
# video] (modular_pipelines/minimax_h3/before_denoise.py, both layouts), and passes the rows' places and (t, h, w)
# rotary positions, not the grid: the target video is the run of video_indices that ends the sequence, frame-major
PACKED_ROWS = {"MiniMaxH3Transformer3DModel"}


def packed_grid(values: dict) -> tuple | None:
    """(grid, tokens before it) of a packed sequence whose video rows end it, read from ``video_indices`` and
    ``position_ids`` (a few host reads per forward, in the forward pre-hook); None when they do not give one."""
    pos, video = values.get("position_ids"), values.get("video_indices")
    if not (isinstance(pos, torch.Tensor) and isinstance(video, torch.Tensor) and pos.dim() == 2 and video.numel()):
        return None
    n, video = pos.shape[0], video.detach().flatten().cpu()
    if int(video[-1]) != n - 1:
        return None
    breaks = ((video[1:] - video[:-1]) != 1).nonzero().flatten()
    rows = video.numel() - (int(breaks[-1]) + 1 if breaks.numel() else 0)
    tail = pos.detach()[n - rows:].cpu()
    frame = int((tail[:, 0] == tail[-1, 0]).sum())                  # rows of the last frame (t is per frame)
    width = int((tail[-frame:, 1] == tail[-1, 1]).sum())             # its last row of tokens
    if rows % frame or frame % width:
        return None
    return (rows // frame, frame // width, width), n - rows


def _model_layout_fixed(original):
    def model_layout(model, values):
        if type(model).__name__ in PACKED_ROWS:
            found = packed_grid(values)
            if found is not None:
                grid, before = found
                return layout.Layout(grid, before, f"packed rows: trailing video_indices run, grid from position_ids, "
                                                   f"{before} tokens before it")
        return original(model, values)
    return model_layout


@pytest.fixture
def zoo(monkeypatch):
    for c in LATE:
        monkeypatch.setitem(clients.BY_NAME, c.name, c)
    if PATCH:
        from modcompile import runtime
        monkeypatch.setattr(layout, "CHANNELS_LAST", layout.CHANNELS_LAST | {"Kandinsky6Transformer3DModel"})
        fixed = _model_layout_fixed(layout.model_layout)
        monkeypatch.setattr(layout, "model_layout", fixed)
        monkeypatch.setattr(runtime, "model_layout", fixed)


# ----------------------------------------------------------------------------- facts (eager)

_SDPA_ARGS = ("query", "key", "value", "attn_mask")


def _record_sdpa(model, inputs):
    calls, original = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        named = dict(zip(_SDPA_ARGS, args), **kwargs)
        calls.append((named["query"].detach().clone(), named["key"].shape, named.get("attn_mask")))
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        F.scaled_dot_product_attention = original
    return out, calls


def _kind(client, q, k_shape):
    n = q.shape[2]
    if k_shape[2] != n:
        return "cross"
    if n == client.seq_len:
        return "video"
    return "text" if n == TEXT else client.other_self.get(n, f"self-attention over {n} tokens")


@pytest.mark.parametrize("client", LATE, ids=lambda c: c.name)
def test_facts_sites(client):
    model = client.build()
    t0 = time.time()
    out, calls = _record_sdpa(model, client.inputs(seed=1))
    print(f"{client.name}: eager forward {time.time() - t0:.2f}s, {sum(p.numel() for p in model.parameters())} params")
    assert torch.isfinite(out[0]).all()
    kinds = tuple(_kind(client, q, k) for q, k, _ in calls)
    print(client.name, kinds, [(tuple(q.shape), tuple(k)) for q, k, _ in calls])
    assert kinds == client.sites, kinds
    video = [(q, mask) for (q, _, mask), kind in zip(calls, kinds) if kind == "video"]
    assert all(q.shape[2] == client.seq_len for q, _ in video)
    assert all((mask is not None) == client.masked for _, mask in video)


@pytest.mark.parametrize("client", LATE, ids=lambda c: c.name)
def test_facts_text_position(client):
    """As tests/test_clients_zoo.py: perturb only the latents; the unchanged rows of the first video
    self-attention are the non-grid tokens."""
    model = client.build()
    inputs = client.inputs(seed=1)
    _, base = _record_sdpa(model, inputs)
    inputs["hidden_states"] = inputs["hidden_states"] + torch.randn(inputs["hidden_states"].shape)
    _, moved = _record_sdpa(model, inputs)
    first = client.sites.index("video")
    unchanged = ((base[first][0] - moved[first][0]).abs().amax(dim=(0, 1, 3)) == 0).nonzero().flatten().tolist()
    n, text = client.seq_len, client.text_tokens
    before = {None: 0, "first": text, "last": 0}.get(client.text_position, client.text_position)
    assert unchanged == client.extra.get("unchanged", list(range(before)) + list(range(n - text + before, n)))


def test_layout_reads(zoo):
    """What modcompile/layout.py reads from each entry's inputs."""
    for c in LATE:
        got = layout.model_layout(c.build(), c.inputs())
        print(c.name, got)
        if c.name == "kandinsky6_i2v":
            assert got.grid == ((5, 8, 8) if FIX else (16, 8, 4))
        elif c.name == "minimax_h3_fl2va":
            assert (got.grid, got.text_position) == (((4, 8, 8), c.text_position) if FIX else (None, "last"))
        elif c.name.startswith("kandinsky6"):
            assert got.grid == ((4, 8, 8) if FIX else (16, 8, 4))     # without the fix: (B, C, F, H, W) read
        else:
            assert (got.grid, got.text_position) == (((4, 8, 8), TEXT + MM_AUDIO) if FIX else (None, "last"))


# ----------------------------------------------------------------------------- the matrix

CASES = [(c.name, s, p) for c in LATE for s in ("whole", "regional") for p in ("mod", "vmoba")]


@pytest.mark.usefixtures("fresh_modcompile")          # tests/conftest.py: no sites or state from the last case
@pytest.mark.parametrize("name,style,policy", CASES, ids=["-".join(c) for c in CASES])
def test_matrix(name, style, policy, monkeypatch, zoo):
    t0 = time.time()
    try:
        rows, _ = test_zoo_sparse.run_matrix_case(name, style, policy, monkeypatch)
    finally:
        for r in modcompile.report(print_table=False):
            print(f"  {r.site} {r.status} seq={r.seq_len} grid={r.grid} text={r.text_tokens} reason={r.reason!r}")
        print(f"{name}-{style}-{policy}{' (fix)' if FIX else ''}: {time.time() - t0:.1f}s")
