"""The ``options`` schema (modcompile/config.py): every bad value is a ValueError naming its key,
every good one builds a config and compiles; and a given ``video_grid`` that does not fit a site
keeps that site dense with the reason.

The valid and invalid values below are this test's own table, written from the README's options
table, not read from the schema: the schema is checked against it, not against itself.
"""
import logging
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import modcompile
from modcompile.config import SparsityConfig, config_keys, option_specs, split_options
from modcompile.kernels.block_sparse_attention import SUPPORTED_BLOCK_SIZES
from modcompile.passes.video_grid import text_tokens_for

from models import TinyVideoDiT

fractions = st.floats(0.0, 1.0)
none_or = st.none().__or__
shapes = {"1d": st.tuples(st.integers(1, 8)), "2d": st.tuples(st.integers(1, 8), st.integers(1, 8)),
          "3d": st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))}

VALID = {
    "policy": st.sampled_from(["mod", "vmoba", "dense"]),
    "block_size": st.sampled_from([16, 32, 64, 128]),
    "min_seq_len": st.integers(0, 10**6),
    "video_grid": none_or(st.tuples(*[st.integers(1, 64)] * 3) | st.lists(st.integers(1, 64), min_size=3, max_size=3)),
    "text_position": none_or(st.sampled_from(["first", "last"])),
    "num_steps": none_or(st.integers(1, 1000)),
    "warmup_steps": none_or(st.integers(0, 1000)),
    "density": none_or(fractions),
    "min_density": fractions,
    "max_density": fractions,
    "tau": fractions | st.sampled_from([0, 1]),  # an int where a float belongs is fine
    "selection": st.sampled_from(["global", "row", "topk"]),
    "topk": none_or(st.integers(1, 1000)),
    "normalization": st.sampled_from(["minmax", "softmax"]),
    "partition_blocks": none_or(st.fixed_dictionaries({}, optional=shapes)),
    "threshold": st.floats(0.0, 1.0, exclude_min=True),
    "ridge_lambda": st.floats(0.0, 1e6, exclude_min=True) | st.integers(1, 100),
    "refresh_interval": st.integers(1, 1000),
    "refresh_schedule": st.sampled_from(["fixed", "doubling"]),
    "lines_per_head": none_or(st.integers(0, 1000)),
    "mask_rule": st.sampled_from(["blocks", "lines"]),
    "coverage": fractions,
    "cheap_refresh": st.booleans(),
    "full_refresh_every": st.integers(1, 100),
    "full_refresh": st.sampled_from(["sparse", "dense"]),
    "nonfinite": st.sampled_from(["listed", "dense"]),
    "min_observed_coverage": fractions,
    "observe_row_stride": st.integers(1, 512),
    "precision": st.sampled_from(["auto", "fp8"]),
    "fp8_dense": st.booleans(),
}

OPTIONAL = {"video_grid", "text_position", "num_steps", "warmup_steps", "density", "topk", "partition_blocks", "lines_per_head"}
INTS = {"block_size", "min_seq_len", "num_steps", "warmup_steps", "topk", "refresh_interval", "lines_per_head",
        "full_refresh_every", "observe_row_stride"}
FLOATS = {"density", "min_density", "max_density", "tau", "threshold", "ridge_lambda", "coverage",
          "min_observed_coverage"}
ENUMS = {"policy", "text_position", "selection", "normalization", "mask_rule", "full_refresh", "nonfinite",
         "precision", "refresh_schedule"}


def _invalid_for(key: str) -> st.SearchStrategy:
    """Values that ``key`` must reject."""
    bad = [st.sampled_from([[1], {"a": 1}, object()])]
    if key not in OPTIONAL:
        bad.append(st.none())
    if key in INTS:
        bad += [st.sampled_from(["10", "1024", 2.5, 2.0, True, False, float("nan")])]
    if key in FLOATS:
        bad += [st.sampled_from(["0.5", "1", True, False, float("nan"), float("inf")])]
    if key in ENUMS:
        bad += [st.sampled_from(["", "Mod", "sparse ", "best", 1, True]), st.text(min_size=1).filter(
            lambda s: s not in {"mod", "vmoba", "dense", "first", "last", "global", "row", "topk", "minmax",
                                "softmax", "blocks", "lines", "sparse", "auto", "fp8"})]
    ranges = {  # out of range, right type
        "block_size": st.sampled_from([0, 8, 100, 256, 512, -64]),
        "min_seq_len": st.integers(max_value=-1),
        "num_steps": st.integers(max_value=0),
        "warmup_steps": st.integers(max_value=-1),
        "topk": st.integers(max_value=0),
        "refresh_interval": st.integers(max_value=0),
        "lines_per_head": st.integers(max_value=-1),
        "full_refresh_every": st.integers(max_value=0),
        "observe_row_stride": st.integers(max_value=0),
        "threshold": st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
        "ridge_lambda": st.floats(max_value=0.0, allow_infinity=False) | st.just(-1),
    }
    for key_ in ("density", "min_density", "max_density", "tau", "coverage", "min_observed_coverage"):
        ranges[key_] = st.floats(max_value=0.0, exclude_max=True) | st.floats(min_value=1.0, exclude_min=True)
    if key in ranges:
        bad.append(ranges[key])
    if key in ("cheap_refresh", "fp8_dense"):
        bad += [st.sampled_from(["no", "yes", "False", "", 0, 1, 0.0, None])]
    if key == "video_grid":
        bad += [st.sampled_from([(2, 8), (2, 8, 8, 1), (2, 0, 8), (2, -1, 8), (2, 8.0, 8), (True, 8, 8), "2x8x8", 256])]
    if key == "partition_blocks":
        bad += [st.sampled_from([{"4d": (1, 2)}, {"2d": (1, 2, 3)}, {"1d": (0,)}, {"3d": (1, 2, 2.5)},
                                 {"2d": 4}, (1, 2), "2d"])]
    return st.one_of(bad)


def _violates_cross_rules(d: dict) -> tuple | None:
    """The keys of the first cross-key rule ``d`` breaks (README: min <= max density; topk mode needs
    topk or a density above 0), or None."""
    if d.get("min_density", 0.0) > d.get("max_density", 1.0):
        return ("min_density", "max_density")
    if d.get("selection") == "topk" and d.get("topk") is None and not (d.get("density") or 0) > 0:
        return ("selection", "topk")
    return None


def _names(message: str, key: str) -> bool:
    return re.search(rf"(?<!\w){key}=", message) is not None


@st.composite
def option_dicts(draw):
    """(options, the key made invalid or None): a subset of the keys with valid values, then
    sometimes one key replaced by a value it must reject."""
    keys = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=len(VALID)))
    options = {k: draw(VALID[k]) for k in keys}
    broken = None
    if draw(st.booleans()):
        broken = draw(st.sampled_from(sorted(VALID)))
        options[broken] = draw(_invalid_for(broken))
    return options, broken


def test_the_test_tables_cover_every_option():
    assert set(VALID) == set(config_keys())
    assert OPTIONAL == {k for k, s in option_specs().items() if s.optional}


@settings(max_examples=400, deadline=None)
@given(option_dicts())
def test_option_dicts_are_valid_or_a_clear_error(drawn):
    options, broken = drawn
    cross = _violates_cross_rules(options) if broken is None else None
    if broken is None and cross is None:
        config, inductor, mode = split_options(options)
        assert inductor == {} and mode is None
        for key, value in options.items():
            stored = getattr(config, key)
            if key == "video_grid" and value is not None:
                assert stored == tuple(value)
            elif key == "partition_blocks" and value is not None:
                assert stored == tuple(sorted((k, tuple(s)) for k, s in value.items()))
            else:
                assert stored == value and type(stored) is type(value) or (
                    key in FLOATS and isinstance(value, int) and type(stored) is float and stored == value)
        hash(config)  # a config is a cache key: it stays hashable
        assert config.replace() == config  # the stored form passes its own checks
        return
    with pytest.raises(ValueError) as err:
        split_options(options)
    message = str(err.value)
    assert message.startswith("modsparse: ")
    if broken is not None:  # a value of one key is checked before the rules between keys
        assert _names(message, broken) and "allowed:" in message, message
    else:
        assert all(_names(message, k) for k in cross), message


# ----------------------------------------------------------------------------- bad values: exact messages

@pytest.mark.parametrize("key, value, allowed", [
    ("tau", "0.5", "a float in [0, 1]"),
    ("refresh_interval", "10", "an int >= 1"),
    ("min_seq_len", "1024", "an int >= 0"),
    ("cheap_refresh", "no", "True or False"),
    ("cheap_refresh", 0, "True or False"),   # 0/1 are rejected too: documented in the README
    ("cheap_refresh", 1, "True or False"),
    ("min_seq_len", -5, "an int >= 0"),
    ("warmup_steps", 2.5, "None or an int >= 0"),
    ("warmup_steps", 2.0, "None or an int >= 0"),
    ("topk", True, "None or an int >= 1"),
    ("ridge_lambda", -1, "a float > 0"),
    ("lines_per_head", -1, "None or an int >= 0"),
    ("block_size", 256, "one of 16, 32, 64, 128"),
    ("block_size", 64.0, "one of 16, 32, 64, 128"),
    ("selection", "best", "one of 'global', 'row', 'topk'"),
    ("precision", "fp16", "one of 'auto', 'fp8'"),
    ("fp8_dense", 1, "True or False"),
    ("policy", None, "one of 'mod', 'vmoba', 'dense'"),
    ("video_grid", (2, 8), "None or three positive ints (T, H, W)"),
    ("video_grid", (2, 0, 8), "None or three positive ints (T, H, W)"),
    ("threshold", 0.0, "a float in (0, 1]"),
])
def test_each_bad_value_names_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ValueError) as err:
        split_options({key: value})
    assert str(err.value) == f"modsparse: option {key}={value!r} is invalid; allowed: {allowed}"


def test_a_str_where_a_number_belongs_fails_at_the_backend_entry_naming_the_key(fresh_modcompile):
    """It used to be a bare TypeError from the eligibility check of passes/attention_sites.py."""
    model = torch.compile(TinyVideoDiT(), backend="modsparse", options={"min_seq_len": "1024"})
    with pytest.raises(Exception) as err:
        model(torch.randn(1, 4, 2, 16, 16), torch.tensor([1.0]))
    cause = err.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = getattr(cause, "inner_exception", None) or cause.__cause__
    assert cause is not None and "option min_seq_len='1024' is invalid" in str(cause)


def test_block_sizes_are_the_kernels_set():
    assert option_specs()["block_size"].choices is SUPPORTED_BLOCK_SIZES
    for block in SUPPORTED_BLOCK_SIZES:
        assert SparsityConfig(block_size=block).block_size == block


def test_cross_key_rules():
    with pytest.raises(ValueError, match=r"min_density=0\.6, max_density=0\.5 conflict"):
        SparsityConfig(min_density=0.6, max_density=0.5)
    assert SparsityConfig(min_density=0.5, max_density=0.5).min_density == 0.5
    for bad in ({}, {"density": 0.0}, {"density": None, "topk": None}):
        with pytest.raises(ValueError, match=r"selection='topk', topk=None.*needs topk or a density > 0"):
            SparsityConfig(policy="vmoba", selection="topk", **bad)
    assert SparsityConfig(policy="vmoba", selection="topk", topk=2).topk == 2
    assert SparsityConfig(policy="vmoba", selection="topk", density=0.3).density == 0.3


def test_partition_blocks_and_video_grid_shapes():
    cfg = SparsityConfig(video_grid=[4, 8, 8], partition_blocks={"3d": [1, 2, 2], "1d": (2,)})
    assert cfg.video_grid == (4, 8, 8)
    assert cfg.partition_blocks == (("1d", (2,)), ("3d", (1, 2, 2)))
    assert cfg.replace(tau=0.5).partition_blocks == cfg.partition_blocks
    with pytest.raises(ValueError, match=r"partition_blocks=.*partition_blocks keys must be in"):
        SparsityConfig(partition_blocks={"4d": (1, 2)})
    with pytest.raises(ValueError, match=r"partition_blocks=.*2d block shape"):
        SparsityConfig(partition_blocks={"2d": (1, 2, 3)})
    with pytest.raises(ValueError, match=r"partition_blocks=.*appears twice"):
        SparsityConfig(partition_blocks=(("2d", (1, 2)), ("2d", (2, 2))))


def test_optional_keys_take_none():
    cfg = SparsityConfig(**{k: None for k in OPTIONAL})
    assert all(getattr(cfg, k) is None for k in OPTIONAL)


def test_readme_options_table_lists_every_key():
    import pathlib
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Options", 1)[1].split("\n## ", 1)[0]
    missing = [k for k in config_keys() if f"`{k}`" not in table]
    assert not missing, missing


# ----------------------------------------------------------------------------- compiled runs

def _compiled_options():
    """Valid option dicts for the tiny model: 256 tokens (grid 4x8x8), so min_seq_len <= 256."""
    return st.fixed_dictionaries(
        {"policy": st.sampled_from(["mod", "vmoba", "dense"]), "block_size": st.sampled_from([32, 64]),
         "min_seq_len": st.integers(0, 256)},
        optional={"warmup_steps": st.sampled_from([0, None]), "tau": fractions,
                  "selection": st.sampled_from(["global", "row"]), "normalization": VALID["normalization"],
                  "min_density": st.floats(0.0, 0.5), "max_density": st.floats(0.5, 1.0),
                  "video_grid": st.sampled_from([None, (4, 8, 8)]), "threshold": VALID["threshold"],
                  "ridge_lambda": st.floats(0.01, 100.0), "refresh_interval": st.integers(1, 20),
                  "refresh_schedule": VALID["refresh_schedule"], "mask_rule": VALID["mask_rule"], "cheap_refresh": st.booleans(), "num_steps": st.integers(1, 50),
                  "coverage": fractions})


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=_compiled_options())
@example(options={"policy": "vmoba", "block_size": 32, "min_seq_len": 0, "warmup_steps": 0, "selection": "row"})
@example(options={"policy": "mod", "block_size": 64, "min_seq_len": 256, "warmup_steps": 0, "cheap_refresh": False})
def test_valid_options_compile_and_run(fresh_modcompile, options):
    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
    torch.manual_seed(0)
    eager = TinyVideoDiT(layers=2).eval()
    model = torch.compile(eager, backend="modsparse", options=options)
    x, t = torch.randn(1, 4, 4, 16, 16), torch.tensor([999.0])
    with torch.no_grad():
        out, ref = model(x, t), eager(x, t)
    rows = modcompile.report(print_table=False)
    assert len(rows) == 2 and all(r.policy == options["policy"] and r.rewritten for r in rows)
    assert all(r.seq_len == 256 and r.grid == (4, 8, 8) for r in rows)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    if all(r.density == 1.0 for r in rows):  # every block ran: the dense model's answer
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- grid vs sequence

def test_text_tokens_for_rule():
    grid = (2, 16, 16)  # 512 video tokens
    assert text_tokens_for(512, grid) == 0
    assert text_tokens_for(1023, grid) == 511          # fewer other tokens than video tokens: text
    assert text_tokens_for(1024, grid) is None         # as many: the grid does not fill the sequence
    assert text_tokens_for(4096, grid) is None
    assert text_tokens_for(511, grid) is None          # more video tokens than the sequence
    assert text_tokens_for(512, None) is None


@pytest.mark.parametrize("grid, why", [
    ((2, 16, 16), "video_grid 2x16x16 covers 512 of 1024 tokens; the other 512 would be joint-attention text"),
    ((8, 16, 16), "video_grid 8x16x16 has 2048 tokens, more than the sequence (1024)"),
])
def test_a_given_grid_that_does_not_fit_keeps_the_site_dense(fresh_modcompile, caplog, grid, why):
    torch.manual_seed(1)
    eager = TinyVideoDiT(layers=1).eval()   # input 4x32x32 -> 4x16x16 = 1024 tokens
    model = torch.compile(eager, backend="modsparse",
                          options={"policy": "vmoba", "block_size": 64, "min_seq_len": 0, "warmup_steps": 0,
                                   "video_grid": grid})
    x, t = torch.randn(1, 4, 4, 32, 32), torch.tensor([999.0])
    with caplog.at_level(logging.WARNING, logger="modcompile"), torch.no_grad():
        out = model(x, t)
        torch.testing.assert_close(out, eager(x, t), rtol=1e-5, atol=1e-5)
    (row,) = modcompile.report(print_table=False)
    assert row.status == "dense" and row.reason.startswith(why) and row.density is None
    assert any(r.levelno == logging.WARNING and why in r.getMessage() for r in caplog.records)


def test_a_given_grid_with_fewer_text_tokens_than_video_runs_sparse(fresh_modcompile):
    torch.manual_seed(2)
    eager = TinyVideoDiT(layers=1, text_tokens=100).eval()   # 2x8x8 = 128 video + 100 text tokens
    model = torch.compile(eager, backend="modsparse",
                          options={"policy": "dense", "block_size": 32, "min_seq_len": 0, "video_grid": (2, 8, 8)})
    x, t = torch.randn(1, 4, 2, 16, 16), torch.tensor([999.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), eager(x, t), rtol=1e-5, atol=1e-5)
    (row,) = modcompile.report(print_table=False)
    assert row.rewritten and row.grid == (2, 8, 8) and row.text_tokens == 100
    assert math.prod(row.grid) + row.text_tokens == row.seq_len
