"""The one support predicate (kernels._common.attention_path) at compile time and run time,
report()'s run status, and the float-timestep recompile warning."""
import logging
import math

import pytest
import torch
import torch.nn as nn

import modcompile
from modcompile import dispatch
from modcompile.kernels._common import attention_path
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.block_lists import lists_from_mask
from modcompile.report import run_status

from models import SelfAttention, TinyVideoDiT

pytestmark = pytest.mark.usefixtures("fresh_modcompile")


def rows():
    return modcompile.report(print_table=False)


# ----------------------------------------------------------------------------- support predicate

def test_attention_path_names_the_path_and_the_reason(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path, why = attention_path(cpu, torch.float32, 256, 64)
    assert path == "reference" and "TRITON_INTERPRET" in why  # the torch reference runs any head_dim
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_path(cpu, torch.float32, 64, 64) == ("triton", "")
    assert attention_path(cpu, torch.bfloat16, 64, 64)[0] == "reference"
    for args, words in (((torch.float32, 256, 64), "head_dim 256 not supported"),
                        ((torch.float32, 64, 256), "block_size 256 not supported"),
                        ((torch.float64, 64, 64), "dtype float64 not supported")):
        path, why = attention_path(cpu, *args)
        assert path == "none" and words in why, (args, why)
    # CUDA means the kernel, whatever this machine has
    path, why = attention_path(torch.device("cuda"), torch.float16, 256, 128)
    assert path == "none" and "head_dim 256" in why


def test_use_triton_follows_the_predicate_and_the_public_op_runs_an_unsupported_head_dim():
    q = torch.randn(1, 2, 40, 256, dtype=torch.float32)
    assert not dispatch.use_triton(q)  # head_dim 256: no kernel on any device
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 256, generator=g) for _ in range(3))
    mask = torch.rand(1, 2, 3, 3, generator=g) < 0.5
    mask |= torch.eye(3, dtype=torch.bool)
    counts, indices = lists_from_mask(mask)
    out = modcompile.block_sparse_attention(q, k, v, counts, indices, block_size=16)
    want, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), counts, indices, block_size=16)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["mod", "vmoba"])
def test_head_dim_256_under_the_interpreter_stays_dense_with_the_reason(policy, monkeypatch):
    # The compile-time decision reads TRITON_INTERPRET: set, the CPU path means the Triton
    # kernel (the GPU's), which lacks head_dim 256, on a CPU or a GPU machine alike.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    eager = TinyVideoDiT(dim=512, heads=2, layers=1).eval()  # head_dim 256
    model = torch.compile(eager, backend="modsparse",
                          options={"policy": policy, "min_seq_len": 64, "block_size": 32, "warmup_steps": 0})
    x = torch.randn(1, 4, 2, 16, 16)
    with torch.no_grad():
        for step, t in enumerate((900.0, 600.0, 300.0)):
            with modcompile.denoising_step(step, 3):
                ts = torch.tensor([t])
                torch.testing.assert_close(model(x, ts), eager(x, ts), atol=1e-5, rtol=1e-5)
    (row,) = rows()
    assert row.status == "dense" and not row.rewritten
    assert "head_dim 256 not supported by the kernel" in row.reason


# ----------------------------------------------------------------------------- report status

class Tokens(nn.Module):
    """Token input, no patch embedding: no grid to infer."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.attn = SelfAttention(dim, heads)

    def forward(self, x, timestep):
        return x + self.attn(x) * timestep.float().view(-1, 1, 1).cos()


def test_status_says_what_ran_vmoba_without_grid_and_mod_warm_up():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 32, generator=g)
    vm = torch.compile(Tokens().eval(), backend="modsparse",
                       options={"policy": "vmoba", "min_seq_len": 64, "block_size": 32, "warmup_steps": 0})
    with torch.no_grad():
        for step in range(2):
            with modcompile.denoising_step(step, 4):
                vm(x, torch.tensor([1.0]))
    (row,) = rows()
    assert row.rewritten and row.status == "dense (no grid)" and row.density == 1.0

    modcompile.reset(forget_sites=True)
    torch._dynamo.reset()
    eager = TinyVideoDiT(layers=1).eval()
    mod = torch.compile(eager, backend="modsparse",
                        options={"policy": "mod", "min_seq_len": 64, "block_size": 32, "warmup_steps": 3})
    v = torch.randn(1, 4, 2, 16, 16, generator=g)
    seen = []
    with torch.no_grad():
        for step in range(5):
            with modcompile.denoising_step(step, 5):
                mod(v, torch.tensor([1.0]))
            seen.append(rows()[0].status)
    assert seen == ["dense (warm-up)"] * 3 + ["sparse"] * 2


def test_run_status_words():
    class S:
        def __init__(self, sparse_calls=0, dense_why=""):
            self.sparse_calls, self.dense_why = sparse_calls, dense_why

    assert run_status("dense", [S(3)]) == "dense"           # left as SDPA at compile time
    assert run_status("sparse", []) == "rewritten (not run)"
    assert run_status("sparse", [S(0, "warm-up"), S(0, "warm-up")]) == "dense (warm-up)"
    assert run_status("sparse", [S(0, "warm-up"), S(1, "refresh")]) == "sparse"


def test_printed_table_shows_the_run_status(capsys):
    model = torch.compile(Tokens().eval(), backend="modsparse",
                          options={"policy": "vmoba", "min_seq_len": 64, "block_size": 32})
    with torch.no_grad():
        model(torch.randn(1, 128, 32), torch.tensor([1.0]))
    modcompile.report()
    assert "dense (no grid)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- float timestep

class FloatTimestep(TinyVideoDiT):
    def forward(self, x, timestep: float):
        return super().forward(x, torch.tensor([timestep]))


def _count_rewrites(monkeypatch):
    from modcompile import backend
    calls = []
    real = backend.rewrite_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(backend, "rewrite_attention", counting)
    return calls


def test_float_timestep_warns_once_and_a_tensor_timestep_never_recompiles(caplog, monkeypatch):
    calls = _count_rewrites(monkeypatch)
    caplog.set_level(logging.WARNING, logger="modcompile")
    torch.manual_seed(0)
    opts = {"policy": "dense", "min_seq_len": 64, "block_size": 32}
    x = torch.randn(1, 4, 2, 16, 16)
    model = torch.compile(FloatTimestep(layers=1).eval(), backend="modsparse", options=opts)
    with torch.no_grad():
        for t in (999.0, 950.0, 900.0, 850.0):
            model(x, t)
    warnings = [r for r in caplog.records if "pass it as a tensor" in r.message]
    assert len(warnings) == 1 and len(calls) > 2  # recompiled per step, warned once

    caplog.clear()
    calls.clear()
    torch._dynamo.reset()
    model = torch.compile(TinyVideoDiT(layers=1).eval(), backend="modsparse", options=opts)
    with torch.no_grad():
        for t in (999.0, 950.0, 900.0, 850.0):
            model(x, torch.tensor([t]))
    assert len(calls) == 1
    assert not [r for r in caplog.records if "pass it as a tensor" in r.message]
