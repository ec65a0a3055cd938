"""One switch for kernel tuning: ``MODCOMPILE_TUNE``, and the older per-direction names as aliases."""
from __future__ import annotations

import warnings

import pytest

from modcompile.kernels import tuning
from modcompile.kernels.state import KERNEL_STATE

NAMES = ("MODCOMPILE_TUNE", "MODCOMPILE_BSA_NO_TUNE", "MODCOMPILE_BWD_AUTOTUNE")


@pytest.fixture
def env(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(KERNEL_STATE, "warned_envs", set())

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_env


def _both():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = (tuning.tuning_enabled("forward"), tuning.tuning_enabled("backward"))
    return state, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("value, on", [("0", False), ("", False), ("1", True)])
def test_modcompile_tune_switches_forward_and_backward_without_warning(env, value, on):
    env(MODCOMPILE_TUNE=value)
    assert _both() == ((on, on), [])


def test_tuning_is_on_by_default(env):
    assert _both() == ((True, True), [])
    assert tuning.tuning_enabled("map")


@pytest.mark.parametrize("name, value, state", [
    ("MODCOMPILE_BSA_NO_TUNE", "1", (False, True)),
    ("MODCOMPILE_BSA_NO_TUNE", "0", (True, True)),
    ("MODCOMPILE_BWD_AUTOTUNE", "0", (True, False)),
    ("MODCOMPILE_BWD_AUTOTUNE", "1", (True, True)),
])
def test_deprecated_names_keep_their_polarity_and_warn_once(env, name, value, state):
    env(**{name: value})
    got, warned = _both()
    assert got == state
    assert len(warned) == 1 and name in warned[0] and "MODCOMPILE_TUNE" in warned[0]
    assert _both() == (state, [])  # the second read is silent


def test_new_name_wins_over_a_deprecated_one(env):
    env(MODCOMPILE_TUNE="1", MODCOMPILE_BSA_NO_TUNE="1", MODCOMPILE_BWD_AUTOTUNE="0")
    assert _both() == ((True, True), [])
    env(MODCOMPILE_TUNE="0", MODCOMPILE_BSA_NO_TUNE="0", MODCOMPILE_BWD_AUTOTUNE="1")
    assert _both() == ((False, False), [])
    assert not tuning.tuning_enabled("map")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_forward_times_nothing_with_tuning_off(env, monkeypatch):
    import torch
    import triton.testing

    from modcompile.kernels import block_sparse_attention as bsa
    from modcompile.kernels.block_lists import full_block_lists, num_blocks

    env(MODCOMPILE_TUNE="0")
    monkeypatch.setattr(KERNEL_STATE, "tuned", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed a candidate"))
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    m = num_blocks(300, 128)
    counts, indices = full_block_lists(1, 2, m, m, device="cuda")
    out, _ = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=128)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max() < 3e-2
    assert list(KERNEL_STATE.tuned.values()) == [tuning.forward_configs(128, 64, tma=bsa.tma_usable(k, v))[0]]
