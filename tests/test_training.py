"""Training through the modsparse backend: gradients, and policy state advanced once per step."""
import pytest
import torch

import modcompile
from modcompile import ops
from modcompile.runtime import REGISTRY

from models import TinyVideoDiT


pytestmark = pytest.mark.usefixtures("fresh_modcompile")


def _grads(model, eager, x, t):
    eager.zero_grad(set_to_none=True)
    loss = model(x, t).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in eager.named_parameters()}


@pytest.mark.parametrize("options", [
    {"policy": "dense"},
    # every block kept (row floor 1.0), but through vmoba's permuted layout: gradients must come back unpermuted
    {"policy": "vmoba", "warmup_steps": 0, "min_density": 1.0, "video_grid": (2, 8, 8)},
    {"policy": "vmoba", "warmup_steps": 0, "tau": 0.5, "video_grid": (2, 8, 8)},
])
def test_compiled_training_step_gradients(options):
    """Full density (dense policy, vmoba with a row floor of 1): equal to eager. Sparse vmoba: finite."""
    torch.manual_seed(0)
    eager = TinyVideoDiT(layers=2).train()
    compiled = torch.compile(eager, backend="modsparse",
                             options={"min_seq_len": 64, "block_size": 32, **options})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 16, 16, generator=g)
    t = torch.tensor([500.0])
    loss, grads = _grads(compiled, eager, x, t)
    assert all(r.rewritten for r in modcompile.report(print_table=False))
    rows = modcompile.report(print_table=False)
    if options.get("min_density") == 1.0:
        assert all(r.density == pytest.approx(1.0) for r in rows)
    if options["policy"] == "dense" or options.get("min_density") == 1.0:
        want_loss, want = _grads(eager, eager, x, t)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name in want:
            torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    else:
        assert all(torch.isfinite(gr).all() for gr in grads.values())


@pytest.mark.parametrize("policy", ["dense", "vmoba"])
def test_training_after_a_no_grad_pass_has_the_eager_gradients(policy, monkeypatch):
    """A validation pass under no_grad first (its graph takes the inference path: no lse for a
    backward), then training steps: the training graph's dense calls must still keep the lse
    its backward reads (dense plans: the dense policy, vmoba's warm-up step). Gradients as eager.
    The flag is per graph: the next validation pass takes the inference path again."""
    seen = []
    body = ops.site_attention

    def spy(policy, ctx, *args, **kwargs):
        seen.append(ctx.training)
        return body(policy, ctx, *args, **kwargs)

    monkeypatch.setattr(ops, "site_attention", spy)
    torch.manual_seed(0)
    eager = TinyVideoDiT(layers=2).train()
    compiled = torch.compile(eager, backend="modsparse", options={
        "min_seq_len": 64, "block_size": 32, "policy": policy, "warmup_steps": 1, "video_grid": (2, 8, 8)})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 16, 16, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad(), modcompile.denoising_step(0, 1):
        compiled(x, t)
    validation, seen[:] = list(seen), []
    with modcompile.denoising_step(0, 1):                      # a dense step of either policy
        loss, grads = _grads(compiled, eager, x, t)
    want_loss, want = _grads(eager, eager, x, t)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    training, seen[:] = list(seen), []
    with torch.no_grad(), modcompile.denoising_step(0, 1):
        compiled(x, t)
    assert validation == [False, False] and training == [True, True] and seen == [False, False]


@pytest.mark.slow
def test_forward_state_advances_once_per_training_step():
    """The partitioner must not recompute plan nodes in backward: one plan per site and step."""
    eager = TinyVideoDiT(layers=2).train()
    compiled = torch.compile(eager, backend="modsparse",
                             options={"policy": "dense", "min_seq_len": 64, "block_size": 32})
    x = torch.randn(1, 4, 2, 16, 16)
    for i, t in enumerate((900.0, 800.0, 700.0)):
        compiled(x, torch.tensor([t])).square().mean().backward()
    rows = modcompile.report(print_table=False)
    assert all(r.steps == 3 and r.passes == 1 for r in rows)
    assert all(calls == 1 for run in REGISTRY.runs.values() for _, calls in run.visits.values())
