"""No host sync on the default path: the public function (forward and backward) and a compiled
sparse denoising step of each policy run under ``torch.cuda.set_sync_debug_mode("error")``, which
turns any synchronizing CUDA call into an error. Inside ``modcompile.denoising_step`` the timestep
is not read, so nothing may synchronize there (outside it, that read is the one sync per forward)."""
import contextlib

import pytest
import torch

import modcompile
from modcompile import dispatch
from modcompile.runtime import REGISTRY
from modcompile.kernels.reference import block_sparse_attention_ref

from models import TinyVideoDiT

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def random_lists(b, h, mq, mk, density, gen):
    keep = torch.rand(b, h, mq, mk, generator=gen) < density
    keep[..., 0] = True
    counts = keep.sum(-1).to(torch.int32)
    order = torch.where(keep, torch.arange(mk), mk + torch.arange(mk)).sort(-1).values % mk
    return counts.cuda(), order.to(torch.int32).cuda()


def test_public_function_forward_and_backward_do_not_sync():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, generator=gen).cuda().to(torch.bfloat16).requires_grad_() for _ in range(3))
    counts, indices = random_lists(1, 2, 4, 4, 0.5, gen)
    modcompile.block_sparse_attention(q, k, v, counts, indices, block_size=128).sum().backward()  # compile, tune
    for t in (q, k, v):
        t.grad = None
    with no_sync():
        out = modcompile.block_sparse_attention(q, k, v, counts, indices, block_size=128)
        out.float().square().sum().backward()
    ref, _ = block_sparse_attention_ref(*(t.detach().double() for t in (q, k, v)), counts, indices, block_size=128)
    assert (out.double() - ref).norm() / ref.norm() < 2e-2
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_validate_true_still_names_the_fault():
    q = torch.randn(1, 1, 256, 64, device="cuda", dtype=torch.float16)
    counts = torch.full((1, 1, 2), 2, dtype=torch.int32, device="cuda")
    dup = torch.zeros(1, 1, 2, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="twice"):
        modcompile.block_sparse_attention(q, q, q, counts, dup, validate=True)


@pytest.mark.parametrize("policy", ["vmoba", "mod"])
def test_compiled_sparse_step_does_not_sync(policy, fresh_modcompile, monkeypatch):
    steps = 8
    model = TinyVideoDiT(dim=128, heads=2, layers=3).cuda().to(torch.bfloat16).eval()
    compiled = torch.compile(model, backend="modsparse",
                             options={"policy": policy, "block_size": 64, "min_seq_len": 256, "num_steps": steps})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 32, 32, generator=gen).cuda().to(torch.bfloat16)
    timesteps = [torch.tensor([1000.0 - i], device="cuda") for i in range(steps)]  # made outside the check
    sparse_calls = []  # per checked step: the sparse plans of every site (a replayed call runs no Python below its op)
    with torch.no_grad():
        for schedule in range(3):  # compile, tune, capture the graphed selections / fits first
            modcompile.reset()
            for i in range(steps):
                checked = schedule == 2 and i >= steps // 2
                before = sum(s.sparse_calls for s in REGISTRY.states.values())
                with no_sync() if checked else contextlib.nullcontext():
                    with modcompile.denoising_step(i, steps):
                        compiled(x, timesteps[i])
                if checked:
                    sparse_calls.append(sum(s.sparse_calls for s in REGISTRY.states.values()) - before)
    torch.cuda.synchronize()
    assert sum(sparse_calls), f"{policy}: no block-sparse call in the checked steps"
