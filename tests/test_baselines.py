"""CPU tests of the equal-density baselines (benchmarks/baselines.py) and their fidelity level
(benchmarks/equal_density.py): densities as requested, the oracle as the ceiling, SVG's choice."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from benchmarks import baselines as bl
from benchmarks.metrics import block_attention_mass, mass_recall_from_mass
from benchmarks.synthetic import make_synthetic_attention

DENSITIES = (0.1, 0.2, 0.3, 0.5)
GRID, BLOCK = (4, 8, 8), 16  # 256 tokens, 16 blocks of 16


def _qkv(seed=0, heads=3, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(2, heads, n, 32, generator=g) for _ in range(3))
    return q * sharp, k, v


@pytest.mark.parametrize("method", bl.METHODS)
@pytest.mark.parametrize("density", DENSITIES)
def test_every_baseline_keeps_the_requested_density_and_its_own_blocks(method, density):
    q, k, v = _qkv()
    mask = bl.method_mask(method, q, k, v, GRID, BLOCK, density)
    mq = mk = 16
    assert mask.shape == (2, 3, mq, mk) and mask.dtype == torch.bool
    # one block of one head is the granularity: round(density * Mq * Mk) per head
    assert abs(float(mask.float().mean()) - density) <= 0.5 / (mq * mk) + 1e-9
    assert mask.diagonal(dim1=-2, dim2=-1).all()


@pytest.mark.parametrize("density", DENSITIES)
def test_oracle_recall_is_the_ceiling_at_equal_density(density):
    q, k, v = _qkv(seed=1)
    mass = block_attention_mass(q, k, BLOCK)
    recall = {m: mass_recall_from_mass(mass, bl.method_mask(m, q, k, v, GRID, BLOCK, density)) for m in bl.METHODS}
    for method, value in recall.items():
        assert value <= recall["oracle"] + 1e-6, (method, recall)
    # random masks with as many blocks per head, own blocks kept
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        rand = bl.top_budget_mask(torch.rand(2, 3, 16, 16, generator=g), density)
        assert mass_recall_from_mass(mass, rand) <= recall["oracle"] + 1e-6


def test_static_masks_grow_with_the_density_and_radial_thins_with_frame_distance():
    geom = bl.block_geometry((8, 8, 8), BLOCK)  # 4 blocks per frame
    for scores in (bl.sta_scores(geom), bl.radial_scores(geom)):
        masks = [bl.top_budget_mask(scores, d) for d in DENSITIES]
        for small, large in zip(masks, masks[1:]):
            assert (large | ~small).all()  # every block kept at a lower density stays kept
    mask = bl.top_budget_mask(bl.radial_scores(geom), 0.3).view(8, 4, 8, 4)  # (t_q, s_q, t_k, s_k)
    per_distance = [float(torch.stack([mask[t, :, t + d].float().mean() for t in range(8 - d)]).mean())
                    for d in range(8)]
    assert all(a >= b for a, b in zip(per_distance, per_distance[1:])), per_distance
    assert per_distance[0] > per_distance[-1]


def test_svg_picks_spatial_for_a_spatial_head_and_temporal_for_a_temporal_head():
    sa = make_synthetic_attention(GRID, heads=2, head_dim=32, head_types=["spatial", "temporal"], seed=0)
    geom = bl.block_geometry(GRID, BLOCK)
    for density in DENSITIES:
        _, temporal = bl.svg_mask(sa.q, sa.k, sa.v, geom, density, return_choice=True)
        assert temporal[0].tolist() == [False, True], density


def test_a_grid_that_does_not_fit_the_call_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="blocks"):
        bl.method_mask("sta", q, k, v, (2, 8, 8), BLOCK, 0.3)


# ------------------------------------------------------------------ the fidelity level
def _random_checkpoint(path):
    """A tiny-video DiT with random weights everywhere (adaLN-zero layers too, so attention reaches the
    sample) and sharpened q/k norms (attention not near-uniform)."""
    from benchmarks.train_dit import save_checkpoint
    from benchmarks.video_dit import VideoDiT
    torch.manual_seed(0)
    model = VideoDiT("tiny-video")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("out."):
                p.normal_(0, 0.05)
            if "q_norm" in name or "k_norm" in name:
                p.fill_(2.5)
    save_checkpoint(path, model)
    return path


def _args(tmp_path, ckpt, **kw):
    base = dict(out=str(tmp_path / "out"), device="cpu", dtype=None, seed=0, no_progress=True, synthetic=False,
                config="tiny-video", checkpoint=str(ckpt), train_minutes=0.0, batch_size=2, steps=5, seeds=2,
                block_size=None, equal_density=[0.2, 0.5], methods=list(bl.METHODS), warmup_steps=None,
                no_inductor_baseline=True)
    base.update(kw)
    return Namespace(**base)


@pytest.fixture
def torch_path(monkeypatch):
    """The torch reference kernels: the Triton interpreter is far slower and not what is tested here."""
    from modcompile import dispatch
    if not torch.cuda.is_available():
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)


def test_equal_density_level_runs_every_baseline_at_its_density(tmp_path, torch_path):
    from benchmarks import equal_density
    ckpt = _random_checkpoint(tmp_path / "dit.pt")
    payload = equal_density.run(_args(tmp_path, ckpt, metric_every=2))
    assert not payload["settings"]["skipped"]
    rows = [r for r in payload["rows"] if r.get("recall") is not None]
    assert {(r["method"], r["target_density"]) for r in rows} == {(m, d) for m in bl.METHODS for d in (0.2, 0.5)}
    for r in rows:
        assert abs(r["density"] - r["target_density"]) <= 0.5 / 256 + 1e-9, r
        assert r["recall"] <= r["oracle_recall"] + 1e-6, r
        assert r["psnr_db"] > 0 and r["psnr_db"] != float("inf"), r  # attention reaches the sample
    for d in (0.2, 0.5):
        at = {r["method"]: r for r in rows if r["target_density"] == d}
        assert all(r["recall"] <= at["oracle"]["recall"] + 1e-6 for r in at.values()), at
    steps = payload["settings"]["warmup_steps"]
    assert steps == 2 and {r["step"] for r in payload["per_step"]} == {2, 4}  # sparse steps, every 2nd
    written = json.loads((tmp_path / "out" / "fidelity_equal_density.json").read_text())
    assert written["rows"][0]["method"] == "dense (eager SDPA)"


def test_equal_density_level_with_compiled_mod_stays_under_the_oracle(tmp_path, fresh_modcompile, torch_path):
    """mod through backend=modsparse at a target density: its recall (from the kernel's lse) never
    exceeds the oracle with as many blocks (from the exact block mass), at the density it reached."""
    from benchmarks import equal_density
    ckpt = _random_checkpoint(tmp_path / "dit.pt")
    payload = equal_density.run(_args(tmp_path, ckpt, equal_density=[0.3], methods=["mod", "oracle", "vmoba"],
                                      seeds=1, mod_coverage=[0.5], mod_variants={"r1": {"refresh_interval": 1}},
                                      vmoba_tau=[0.05]))
    assert not payload["settings"]["skipped"]
    mod = next(r for r in payload["rows"] if r["method"] == "mod")
    assert 0.25 <= mod["density"] <= 0.45
    assert 0 < mod["recall"] <= mod["oracle_recall"] + 1e-6
    assert mod["timing"] == "compiled (modsparse)"
    # mod also ran once at its defaults (no density asked), before the density rows
    methods = [r["method"] for r in payload["rows"]]
    assert methods.index("mod (defaults)") < methods.index("mod")
    default = payload["rows"][methods.index("mod (defaults)")]
    assert default["target_density"] is None and 0 < default["density"] <= 1 and default["psnr_db"] > 0
    assert 0 < default["recall"] <= default["oracle_recall"] + 1e-6
    # per step and layer, mod's predicted coverage beside the recall it got (where the mask errs)
    steps = [r for r in payload["per_step"] if r["method"] == "mod (defaults)"]
    assert steps and all(0 < r["predicted_coverage"] <= 1 for r in steps)
    assert all(r.get("predicted_coverage") is None for r in payload["per_step"] if r["method"] == "oracle")
    # a lower coverage keeps fewer blocks (the mass rule's cut moves with it)
    half = payload["rows"][methods.index("mod (coverage 0.5)")]
    assert half["target_density"] is None and 0 < half["density"] < default["density"]
    assert half["recall"] < default["recall"]
    # a variant's rows: its options reach the policy (refreshing at every sparse step changes the sample)
    r1 = payload["rows"][methods.index("mod r1")]
    assert methods.index("mod r1 (defaults)") < methods.index("mod r1")
    assert 0.25 <= r1["density"] <= 0.45 and r1["psnr_db"] != mod["psnr_db"]
    # vmoba at another threshold, no density asked: a lower tau keeps fewer blocks than its default
    low, default = (payload["rows"][methods.index(m)] for m in ("vmoba (tau 0.05)", "vmoba (defaults)"))
    assert low["target_density"] is None and 0 < low["density"] < default["density"]


def test_cli_routes_equal_density_to_its_level(tmp_path, monkeypatch):
    from benchmarks import cli, equal_density
    seen = {}
    monkeypatch.setattr(equal_density, "run", lambda args: seen.setdefault("args", args))
    cli.main(["run", "fidelity", "--config", "tiny-video", "--equal-density", "0.1,0.5", "--methods", "sta,svg",
              "--warmup-steps", "1", "--mod-coverage", "0.8,0.7", "--mod-options", '{"refresh_interval": 5}',
              "--mod-variants", '{"r3": {"refresh_interval": 3}}', "--vmoba-tau", "0.5", "--out", str(tmp_path)])
    args = seen["args"]
    assert args.equal_density == [0.1, 0.5] and args.methods == ["sta", "svg"] and args.warmup_steps == 1
    assert args.mod_coverage == [0.8, 0.7] and args.mod_options == {"refresh_interval": 5}
    assert args.mod_variants == {"r3": {"refresh_interval": 3}} and args.vmoba_tau == [0.5]


def test_vmoba_fine_tuning_path_on_the_equal_density_table(tmp_path, fresh_modcompile, torch_path):
    """VMoBA's training path: train-dit --init CKPT --sparse vmoba fine-tunes a checkpoint through
    backend=modsparse (its sites run sparse, the weights move), and the equal-density level samples the
    fine-tuned copy dense and with vmoba, each against the original checkpoint's dense samples."""
    from benchmarks import cli, equal_density
    from benchmarks.train_dit import load_checkpoint
    ckpt = _random_checkpoint(tmp_path / "dit.pt")
    tuned = tmp_path / "tuned.pt"
    cli.main(["run", "train-dit", "--init", str(ckpt), "--sparse", "vmoba", "--options", '{"density": 0.3}',
              "--steps", "2", "--batch-size", "2", "--val-every", "100", "--checkpoint", str(tuned),
              "--out", str(tmp_path / "ft"), "--device", "cpu", "--no-progress"])
    before, after = load_checkpoint(ckpt), load_checkpoint(tuned)
    assert before.cfg.to_dict() == after.cfg.to_dict()
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    payload = equal_density.run(_args(tmp_path, ckpt, equal_density=[0.3], methods=["vmoba"], seeds=1,
                                      finetuned=str(tuned)))
    assert not payload["settings"]["skipped"]
    rows = {r["method"]: r for r in payload["rows"]}
    dense, sparse = rows["vmoba fine-tuned, dense"], rows["vmoba fine-tuned"]
    assert 0 < dense["psnr_db"] < float("inf")        # the fine-tuned model differs from the original
    assert 0.2 <= sparse["density"] <= 0.45 and sparse["timing"] == "compiled (modsparse)"
    assert 0 < sparse["psnr_db"] < float("inf") and sparse["psnr_db"] != rows["vmoba"]["psnr_db"]
