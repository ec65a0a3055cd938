"""The fast kernel launcher (modcompile/kernels/launcher.py): the same results as Triton's own
``kernel[grid](...)``, launches from its cache once a specialization has been seen, a new cache
entry when the specialization changes, and the plain path where it must run."""
from __future__ import annotations

import pytest
import torch

from modcompile.kernels import block_sparse_attention as bsa
from modcompile.kernels import launcher
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.state import KERNEL_STATE
from modcompile.kernels.tuning import LaunchConfig

gpu = pytest.mark.gpu


def _inputs(N: int, seed: int, device: str, dtype=torch.bfloat16, block: int = 128):
    gen = torch.Generator().manual_seed(seed)
    B, H, D = 1, 2, 64
    q, k, v = (torch.randn(B, N, H, D, generator=gen).transpose(1, 2).to(device, dtype) for _ in range(3))
    mq = -(-N // block)
    scores = torch.rand(B, H, mq, mq, generator=gen)
    scores[..., torch.arange(mq), torch.arange(mq)] = 2.0  # the own block always listed
    width = max(1, mq // 2)
    indices = scores.topk(width, -1).indices.to(torch.int32)
    counts = torch.full((B, H, mq), width, dtype=torch.int32)
    return q, k, v, counts.to(device), indices.to(device)


class _CountingRun:
    """Counts the calls that go through ``JITFunction.run`` (the plain path)."""

    def __init__(self, fn):
        self.fn, self.calls, self.original = fn, 0, fn.run

    def __enter__(self):
        def run(*a, **kw):
            self.calls += 1
            return self.original(*a, **kw)
        self.fn.run = run
        return self

    def __exit__(self, *exc):
        self.fn.run = self.original


@gpu
def test_fast_launch_matches_triton_launch_and_uses_its_cache(monkeypatch):
    KERNEL_STATE.launchers.clear()
    KERNEL_STATE.fast_launch_broken = False
    cfg = LaunchConfig(64, 64, 4, 2)
    for N in (1000, 1024):  # a ragged and an even length: two specializations (EVEN_Q, N % 16)
        q, k, v, counts, indices = _inputs(N, seed=N, device="cuda")
        with _CountingRun(bsa._block_sparse_attention_fwd_kernel) as plain:
            first = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, config=cfg)
            entries = len(KERNEL_STATE.launchers)
            again = [bsa.block_sparse_attention_fwd(q, k, v, counts, indices, config=cfg) for _ in range(3)]
        assert plain.calls == 1, "after the first launch of a specialization, launches skip JITFunction.run"
        assert len(KERNEL_STATE.launchers) == entries
        monkeypatch.setenv(launcher.ENV, "0")
        with _CountingRun(bsa._block_sparse_attention_fwd_kernel) as plain:
            reference_launch = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, config=cfg)
        monkeypatch.delenv(launcher.ENV)
        assert plain.calls == 1
        for out, lse in again:
            assert torch.equal(out, reference_launch[0]) and torch.equal(lse, reference_launch[1])
        assert torch.equal(first[0], reference_launch[0])
        ref, _ = block_sparse_attention_ref(*(t.double() for t in (q, k, v)), counts, indices, block_size=128)
        assert (first[0].double() - ref).abs().max() < 0.05
    assert not KERNEL_STATE.fast_launch_broken
    assert len(KERNEL_STATE.launchers) == 2


@gpu
def test_fast_launch_follows_a_changed_launch_option():
    """num_warps is no kernel argument: a config that differs only there must not reuse a kernel."""
    KERNEL_STATE.launchers.clear()
    q, k, v, counts, indices = _inputs(512, seed=3, device="cuda")
    outs = [bsa.block_sparse_attention_fwd(q, k, v, counts, indices, config=LaunchConfig(64, 64, w, 2))[0]
            for w in (4, 8, 4)]
    assert len(KERNEL_STATE.launchers) == 2
    assert torch.allclose(outs[0].float(), outs[1].float(), atol=2e-2) and torch.equal(outs[0], outs[2])


def test_interpreter_and_reset_take_the_plain_path():
    """Under the interpreter (the CPU suite) every launch is Triton's own, and the cache stays empty;
    ``KERNEL_STATE.clear()`` (modcompile.reset(kernels=True)) empties it and re-arms the fast path."""
    if torch.cuda.is_available():
        pytest.skip("the CPU suite runs this under TRITON_INTERPRET=1")
    KERNEL_STATE.launchers[("stale",)] = object()
    KERNEL_STATE.fast_launch_broken = True
    KERNEL_STATE.clear()
    assert KERNEL_STATE.launchers == {} and not KERNEL_STATE.fast_launch_broken
    q, k, v, counts, indices = _inputs(96, seed=1, device="cpu", dtype=torch.float32, block=32)
    out, _ = bsa.block_sparse_attention_fwd(q, k, v, counts, indices, block_size=32)
    ref, _ = block_sparse_attention_ref(*(t.double() for t in (q, k, v)), counts, indices, block_size=32)
    assert (out.double() - ref).abs().max() < 1e-4
    assert KERNEL_STATE.launchers == {}
