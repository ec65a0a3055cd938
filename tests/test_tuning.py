"""The one tuning layer (modcompile/kernels/tuning.py) and the kernels' state owner (state.py)."""
from __future__ import annotations

import pytest
import torch

import modcompile
from modcompile.kernels import tuning
from modcompile.kernels.state import KERNEL_STATE
from modcompile.kernels.tuning import LaunchConfig


@pytest.fixture
def state(monkeypatch):
    """A fresh, private kernel state; every device reads as sm_90."""
    fresh = type(KERNEL_STATE)()
    for name in ("tuned", "disabled", "warned_envs", "capability"):
        monkeypatch.setattr(KERNEL_STATE, name, getattr(fresh, name))
    monkeypatch.setattr(tuning, "device_capability", lambda device: (9, 0))
    monkeypatch.delenv("MODCOMPILE_TUNE", raising=False)
    return KERNEL_STATE


def fake_timer(monkeypatch, times: dict):
    """do_bench that returns ``times[config]`` after one run, and records what it timed."""
    import triton.testing
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        timed.append(ran[-1])
        if isinstance(times[ran[-1]], Exception):
            raise times[ran[-1]]
        return times[ran[-1]]
    ran: list = []
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return timed, ran.append


A, B, C = LaunchConfig(64, 64, 4, 2), LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 64, 8, 3, tma=True)


def test_choose_times_once_per_key_with_one_percent_hysteresis(state, monkeypatch):
    timed, run = fake_timer(monkeypatch, {A: 1.0, B: 0.995, C: 0.98})
    key = ("dq", 1)
    assert tuning.choose(key, [A, B, C], run, direction="backward") == C  # B is within 1% of A
    assert timed == [A, B, C]
    assert tuning.choose(key, [A, B, C], run, direction="backward") == C and len(timed) == 3
    assert tuning.tuned_configs("dq") == {key: C} and tuning.tuned_configs("forward") == {}


def test_choose_skips_failing_and_disabled_candidates(state, monkeypatch):
    timed, run = fake_timer(monkeypatch, {A: RuntimeError("out of shared memory"), B: 2.0, C: 1.0})
    tuning.disable_configs([(128, 64, 8, 3, True)])  # C, as a tuple
    assert tuning.choose(("fwd", 2), [A, B, C], run, direction="forward") == B
    assert timed == [A, B]
    timed2, run2 = fake_timer(monkeypatch, {A: RuntimeError("no"), B: RuntimeError("no")})
    with pytest.raises(RuntimeError, match="no launch configuration"):
        tuning.choose(("fwd", 3), [A, B], run2, direction="forward")


@pytest.mark.parametrize("env", [{"MODCOMPILE_TUNE": "0"}, {"MODCOMPILE_BWD_AUTOTUNE": "0"}])
def test_tuning_off_keeps_the_default_without_timing(state, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    timed, run = fake_timer(monkeypatch, {A: 1.0, B: 0.5})
    with pytest.warns(FutureWarning) if "MODCOMPILE_BWD_AUTOTUNE" in env else _nothing():
        assert tuning.choose(("dkdv", 1), [A, B], run, direction="backward", default=C) == C
    assert tuning.choose(("fwd", 1), [A, B], run, direction="forward") == (A if "MODCOMPILE_TUNE" in env else B)
    assert timed == ([] if "MODCOMPILE_TUNE" in env else [A, B])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_one_key_scheme_buckets_lengths_for_every_kernel(state):
    """Lengths in one power-of-two bucket of programs share a key (the backward used to key on the
    exact length and re-tuned for every one); raggedness, dtype, head dim and TMA separate keys."""
    def key(kernel, n, heads=12, d=128, dtype=torch.bfloat16, tma=True):
        q = torch.empty(1, heads, 1, d, dtype=dtype)
        return tuning.tuning_key(kernel, q, 128, n, n, heads * -(-n // 128), tma)

    for kernel in ("forward", "dkdv", "dq", "map"):
        assert key(kernel, 32760) == key(kernel, 32760 - 128 * 20)   # 256 vs 236 blocks: one bucket
        assert key(kernel, 32768) != key(kernel, 32760)                # even vs ragged
        assert key(kernel, 32760) != key(kernel, 3000)                 # another bucket
        assert key(kernel, 32760) != key(kernel, 32760, tma=False)
        assert key(kernel, 32760) != key(kernel, 32760, d=64)
        assert key(kernel, 32760) != key(kernel, 32760, dtype=torch.float16)
    assert key("dq", 32760) != key("dkdv", 32760)


def test_backward_keys_its_passes_by_program_buckets(state):
    from modcompile.kernels.block_sparse_attention_bwd import prepare_backward
    from modcompile.kernels.block_lists import BlockLists

    def keys(n, nk):
        q, do, out = (torch.zeros(1, 2, n, 32) for _ in range(3))
        k = torch.zeros(1, 2, nk, 32)
        run = prepare_backward(do, q, k, k, out, torch.zeros(1, 2, n), BlockLists.full(1, 2, n, nk, 16))
        return run.tune_key("dkdv"), run.tune_key("dq")

    assert keys(16 * 9 - 3, 16 * 5 - 1) == keys(16 * 12 - 3, 16 * 6 - 1)  # 9 and 12 / 5 and 6 blocks
    assert keys(16 * 9 - 3, 16 * 5 - 1)[1] != keys(16 * 5 - 3, 16 * 5 - 1)[1]  # dq: 9 vs 5 query blocks
    assert keys(16 * 9 - 3, 16 * 5 - 1)[0] == keys(16 * 5 - 3, 16 * 5 - 1)[0]  # dk/dv: same key blocks


def test_labels_round_trip_for_every_candidate():
    cands = [*tuning.forward_configs(128, 128), *tuning.backward_configs(128), *tuning.map_configs(128, False),
             LaunchConfig(32, 16, 4, 1, key_blocks=3)]
    for cfg in cands:
        assert tuning.parse_label(cfg.label()) == cfg
    assert len({c.label() for c in cands}) == len(set(cands))
    with pytest.raises(ValueError):
        tuning.parse_label("(64,64,4w,2s)+fast")
    with pytest.raises(ValueError, match="host_tma needs tma"):
        LaunchConfig(64, 64, 4, 2, host_tma=True)


def test_reset_kernels_clears_the_one_owner(state, monkeypatch):
    state.tuned[("forward", 1)] = A
    state.disabled.add(B)
    state.capability[0] = (9, 0)
    state.cudnn_lse_broken = True
    from modcompile.kernels import partition
    partition.cached_partition((2, 4, 4), "2d", (2, 2), 0, "last")
    assert partition.cached_partition.cache_info().currsize == 1
    modcompile.reset()  # a new generation keeps what the kernels learnt
    assert state.tuned and state.disabled and state.cudnn_lse_broken
    modcompile.reset(kernels=True)
    assert not (state.tuned or state.disabled or state.capability or state.cudnn_lse_broken)
    assert partition.cached_partition.cache_info().currsize == 0
