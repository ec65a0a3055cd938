"""CPU tests of the attention-statistics level (benchmarks/attention_stats.py)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import attention_stats as ast
from benchmarks.synthetic import make_synthetic_attention


def test_coverage_fraction_of_known_maps():
    mk = 10
    uniform = torch.ones(1, 1, 4, mk)
    one_hot = torch.zeros(1, 1, 4, mk)
    one_hot[..., 3] = 1.0
    assert float(ast.coverage_fraction(uniform, 0.9, per_row=True)) == pytest.approx(0.9)
    assert float(ast.coverage_fraction(uniform, 0.95, per_row=True)) == pytest.approx(1.0)
    assert float(ast.coverage_fraction(one_hot, 0.9, per_row=True)) == pytest.approx(0.1)
    # per head: all four rows' mass sits in 4 of the 40 pairs
    assert float(ast.coverage_fraction(one_hot, 0.95, per_row=False)) == pytest.approx(0.1)
    # rows with different needs are averaged: half one-hot, half uniform
    mixed = torch.cat([one_hot[..., :2, :], uniform[..., :2, :]], 2)
    assert float(ast.coverage_fraction(mixed, 0.9, per_row=True)) == pytest.approx(0.5)


def test_head_stats_tell_spatial_temporal_and_sink_heads_apart():
    grid = (4, 8, 8)
    sa = make_synthetic_attention(grid, heads=3, head_dim=32, head_types=["spatial", "temporal", "global"], seed=0)
    st = {k: v[0].tolist() for k, v in ast.head_stats(sa.q, sa.k, grid, 16, rows=128, window=1, sinks=8).items()}
    spatial, temporal, sink = 0, 1, 2
    assert st["own_frame"][spatial] > 0.9 > st["own_frame"][temporal]
    assert st["spatial_window"][temporal] > 0.9 > st["spatial_window"][sink]
    assert st["sink"][sink] > 0.4 > st["sink"][spatial]
    for name in ("blocks90_row", "blocks95_row", "blocks90_head", "blocks95_head"):
        assert all(0 < x <= 1 for x in st[name])
    assert all(a <= b for a, b in zip(st["blocks90_row"], st["blocks95_row"]))
    assert st["blocks90_row"][spatial] < 0.25  # a head that keeps to its frame needs few key blocks


def test_stats_steps_default_and_bounds():
    assert ast.stats_steps(30, None) == [0, 15, 29]
    assert ast.stats_steps(30, [5, 1, 5]) == [1, 5]
    with pytest.raises(SystemExit):
        ast.stats_steps(4, [4])


def test_attention_stats_cli_on_a_tiny_random_model(tmp_path):
    from benchmarks.cli import main
    from benchmarks.train_dit import save_checkpoint
    from benchmarks.video_dit import VideoDiT
    torch.manual_seed(0)
    model = VideoDiT("tiny-video")
    with torch.no_grad():  # attention must reach the sample, so that steps differ
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("out."):
                p.normal_(0, 0.05)
    ckpt = save_checkpoint(tmp_path / "dit.pt", model)
    main(["run", "attention-stats", "--checkpoint", str(ckpt), "--steps", "4", "--query-rows", "64",
          "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "attention_stats.json").read_text())
    rows = payload["rows"]
    cfg = model.cfg
    assert len(rows) == 3 * cfg.depth * cfg.heads  # steps 0, 2, 3 x layers x heads
    assert {r["phase"] for r in rows} == {"early", "mid", "late"}
    assert all(0 <= r[s] <= 1 + 1e-6 for r in rows for s in ast.STATS)
    summary = json.loads((tmp_path / "attention_stats_summary.json").read_text())
    assert [r["step"] for r in summary["rows"]] == [0, 2, 3]
    assert any("median head covers 90%" in n for n in summary["notes"])
