"""CPU tests of the attention testbed (issue 19): its config and data, and the summary's goal verdicts."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import attention_stats as ast
from benchmarks import testbed as tb
from benchmarks.data import generate_videos, video_kwargs
from benchmarks.video_dit import CONFIGS, VideoDiT, get_config


# ------------------------------------------------------------------ config and data
def test_testbed_config_and_older_checkpoint_configs():
    video, long = CONFIGS["video"], CONFIGS["long"]
    assert video.seq_len == long.seq_len and video.head_dim == long.head_dim == 128
    assert (video.data, video.rope_theta, video.qk_gain, long.qk_gain) == ("textured", 256.0, 3.5, 1.0)
    assert all(CONFIGS[n].data == "shapes" and CONFIGS[n].rope_theta == 10000.0 for n in ("small", "long"))
    old = long.to_dict()
    del old["data"], old["rope_theta"]  # a checkpoint saved before these fields existed
    assert get_config(old) == long


def test_config_variants_by_name_and_qk_gain_init():
    cfg = get_config("tiny-testbed:qk_gain=2.5,rope_theta=64,data=shapes")
    assert (cfg.qk_gain, cfg.rope_theta, cfg.data) == (2.5, 64.0, "shapes")
    assert cfg.latent == CONFIGS["tiny-testbed"].latent and CONFIGS["tiny-testbed"].qk_gain == 1.0
    assert get_config(cfg.to_dict()) == cfg  # a variant's checkpoint loads as that variant
    for bad in ("tiny-testbed:qk_gain", "tiny-testbed:nope=1", "tiny-testbed:latent=4", "nope:qk_gain=2"):
        with pytest.raises(ValueError):
            get_config(bad)
    model = VideoDiT(cfg)
    gains = [b.attn.q_norm.weight for b in model.blocks] + [b.attn.k_norm.weight for b in model.blocks]
    assert all(torch.equal(g, torch.full_like(g, 2.5)) for g in gains)


def test_rope_theta_reaches_the_model():
    import dataclasses
    cfg = CONFIGS["tiny-testbed"]
    x, t = torch.randn(1, 4, *cfg.latent, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0])
    outs = []
    for theta in (cfg.rope_theta, 10000.0):
        torch.manual_seed(0)
        model = VideoDiT(dataclasses.replace(cfg, rope_theta=theta))
        with torch.no_grad():  # open the residual branches so attention reaches the output
            for name, p in model.named_parameters():
                if "modulation" in name or name.startswith("out.") or name.endswith("qkv.bias"):
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
            outs.append(model(x, t))
    assert not torch.allclose(*outs)


def test_textured_data_is_deterministic_local_and_leaves_the_plain_style_alone():
    kw = dict(frames=8, height=24, width=24)
    plain = generate_videos(2, seed=3, **kw)
    assert torch.equal(plain, generate_videos(2, seed=3, texture=0.0, pan=9.0, texture_memory=0.1, **kw))
    tex = generate_videos(2, seed=3, texture=0.4, **kw)
    assert torch.equal(tex, generate_videos(2, seed=3, texture=0.4, **kw))
    assert torch.equal(generate_videos(1, seed=3, start=1, texture=0.4, **kw)[0], tex[1])
    assert torch.isfinite(tex).all() and tex.abs().max() < 4

    def detail(v):
        return float((v[..., 1:] - v[..., :-1]).abs().mean())
    assert detail(tex) > 3 * detail(plain)  # fine spatial detail to denoise locally
    # the texture alone (no objects over it): near frames share more of it than far ones (AR(1) memory)
    field = generate_videos(2, seed=3, texture=1.0, **kw) - generate_videos(2, seed=3, texture=1e-9, **kw)

    def corr(d):
        a, b = field[:, :, :-d].flatten(), field[:, :, d:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert corr(1) > corr(3) > corr(6)
    with pytest.raises(ValueError):
        generate_videos(1, texture=0.4, texture_memory=1.0, **kw)


def test_tiny_testbed_trains_a_few_steps():
    from benchmarks.train_dit import train
    cfg = CONFIGS["tiny-testbed"]
    assert video_kwargs(cfg)["texture"] > 0
    res = train("tiny-testbed", steps=2, batch_size=2, device="cpu", show_progress=False)
    assert res["steps"] == 2 and all(torch.isfinite(torch.tensor(res["train_losses"])))
    assert res["model"].cfg is cfg


# ------------------------------------------------------------------ goal verdicts on known attention
GRID = (4, 8, 8)  # 256 tokens, 16 key blocks of 16 (two rows of one frame each)


def _known_heads(scale: float = 10.0):
    """Head 0 attends to its own key block only (1 of 16 blocks, its own frame: spatial); head 1 to the
    query's place in every frame (4 of 16 blocks: temporal). q = k, one-hot codes."""
    n, d = 256, 64
    tok = torch.arange(n)
    q = torch.zeros(1, 2, n, d)
    q[0, 0, tok, tok // 16] = scale
    q[0, 1, tok, tok % 64] = scale
    return q


def _rows(q_mid: torch.Tensor) -> list[dict]:
    """attention-stats rows for early / mid / late steps: uniform attention except at the mid step."""
    rows = []
    for step, phase, q in ((0, "early", torch.zeros_like(q_mid)), (15, "mid", q_mid), (29, "late", torch.zeros_like(q_mid))):
        st = ast.head_stats(q, q, GRID, 16, rows=256, window=1, sinks=4)
        rows += [{"step": step, "phase": phase, "layer": 0, "head": h, **{k: float(v[0, h]) for k, v in st.items()}}
                 for h in range(q.shape[1])]
    return rows


def test_known_concentration_gives_the_known_fraction_and_meets_the_goal():
    rows = _rows(_known_heads())
    mid = [r for r in rows if r["phase"] == "mid"]
    assert [r["blocks90_row"] for r in mid] == pytest.approx([1 / 16, 4 / 16])
    assert [tb.head_kind(r) for r in mid] == ["spatial", "temporal"]
    summary = tb.phase_summary(rows)
    assert [r["phase"] for r in summary] == ["early", "mid", "late"]
    assert summary[1]["blocks90_row_median"] == pytest.approx(2.5 / 16)
    assert summary[1]["spatial"] == summary[1]["temporal"] == 0.5
    verdict = tb.goals(summary)
    assert verdict["concentrated"] and verdict["varied"] and verdict["step"] == 15
    assert "MET" in verdict["lines"][0] and "MISSED" not in " ".join(verdict["lines"])


def test_uniform_attention_misses_the_goal():
    summary = tb.phase_summary(_rows(torch.zeros(1, 2, 256, 64)))
    # uniform mass over 16 blocks: 15 of them reach 90%
    assert summary[1]["blocks90_row_median"] == pytest.approx(15 / 16)
    verdict = tb.goals(summary)
    assert not verdict["concentrated"] and not verdict["varied"]
    assert all(line.endswith("MISSED") for line in verdict["lines"])
    # the verdict reads the mid step only: a goal just above the mid value fails, just at it passes
    known = tb.phase_summary(_rows(_known_heads()))
    assert tb.goals(known, limit=2.5 / 16)["concentrated"] and not tb.goals(known, limit=2.4 / 16)["concentrated"]


def test_detail_ratios():
    data = generate_videos(2, seed=0, frames=4, height=16, width=16, texture=0.4)
    assert tb.detail_ratios(data, data) == pytest.approx({"std_ratio": 1.0, "dx_ratio": 1.0, "dt_ratio": 1.0})
    blurred = tb.detail_ratios(data.mean((3, 4), keepdim=True).expand_as(data), data)
    assert blurred["dx_ratio"] == 0.0 and blurred["std_ratio"] < 1


# ------------------------------------------------------------------ the level end to end
def test_testbed_cli_on_a_tiny_model(tmp_path):
    from benchmarks.cli import main
    from benchmarks.train_dit import save_checkpoint
    torch.manual_seed(0)
    model = VideoDiT("tiny-testbed")
    with torch.no_grad():  # attention must reach the sample
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("out."):
                p.normal_(0, 0.05)
    ckpt = save_checkpoint(tmp_path / "dit.pt", model, steps=0, settings={"seed": 0},
                           history=[{"step": 0, "val_loss": 1.0}])
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    main(["run", "attention-stats", "--steps", "4", "--query-rows", "64", *common])
    main(["run", "testbed", "--samples", "1", "--sample-steps", "2", *common])
    payload = json.loads((tmp_path / "testbed.json").read_text())
    assert [r["phase"] for r in payload["rows"]] == ["early", "mid", "late"]
    assert len(payload["goals"]["lines"]) == 2 and payload["goals"]["step"] == 2
    assert all(0 < v < float("inf") for v in payload["detail"].values())
    assert (tmp_path / "testbed.md").read_text().count("GOAL") == 2
    pytest.importorskip("matplotlib")
    assert (tmp_path / "testbed_samples.png").stat().st_size > 0
