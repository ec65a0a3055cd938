"""The vmoba policy: exact attention on the selected blocks, closeness to dense on structured inputs,
and the whole policy under torch.compile(backend="modsparse")."""
import math

import pytest
import torch
import torch.nn.functional as F

import modcompile
from modcompile import dispatch
from modcompile.config import SparsityConfig
from modcompile.kernels import partition as P
from modcompile.kernels import pooling as PL
from modcompile.policies.base import SiteContext
from modcompile.policies.vmoba import VmobaPolicy
from modcompile.runtime import REGISTRY
from modcompile.sites import SiteInfo, SiteState

from models import TinyVideoDiT

from benchmarks.metrics import relative_l2
from benchmarks.synthetic import make_synthetic_attention


@pytest.fixture
def torch_path(monkeypatch):
    """The torch references instead of the (slow) Triton interpreter."""
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)


def _ctx(config, grid, n, layer, step=30, num_steps=40):
    info = SiteInfo(key="test/attn#0", layer=layer, module_path="attn", config=config, status="sparse",
                    seq_len=n, grid=grid, text_tokens=n - math.prod(grid) if grid else 0)
    return SiteContext(info=info, state=SiteState(info=info, pass_index=0), step=step, num_steps=num_steps,
                       config=config)


def _token_mask(plan, layout, block):
    """Token-level (B, H, N, N) mask in the original order from kernel lists in permuted order."""
    mk = plan.lists.indices.shape[-1]
    from modcompile.kernels.block_lists import mask_from_lists
    bmask = mask_from_lists(plan.lists.counts, plan.lists.indices, mk)
    kb = layout.partition.inv // block  # kernel block of each original token
    return bmask[:, :, kb][:, :, :, kb]


def _masked_attention64(q, k, v, mask, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v.double(), lse


@pytest.mark.parametrize("layer,text,position", [(0, 0, "last"), (1, 5, "first"), (2, 7, "last")])
def test_policy_attention_is_exact_on_its_block_lists(layer, text, position, torch_path):
    grid, block, D = (3, 6, 7), 16, 16
    sa = make_synthetic_attention(grid, heads=2, head_dim=D, text_len=text, text_position=position, seed=layer)
    q, k, v = sa.q, sa.k, sa.v
    cfg = SparsityConfig(policy="vmoba", block_size=block, tau=0.3, text_position=position,
                         partition_blocks={"2d": (4, 3), "3d": (2, 4, 3)})
    ctx = _ctx(cfg, grid, q.shape[2], layer)
    policy = VmobaPolicy(cfg)
    plan = policy.plan(ctx, q, k)
    assert not plan.dense and plan.lists.indices.shape[-1] == math.ceil(q.shape[2] / block)
    layout = policy.layout(ctx, q.shape[2], q.device)
    assert layout.identity == (layer == 0 and position == "last")
    scale = 1 / math.sqrt(D)
    out, lse = policy.attention(ctx, q, k, v, plan, scale)
    mask = _token_mask(plan, layout, block)
    assert mask.float().mean() < 1  # really sparse
    ref, ref_lse = _masked_attention64(q, k, v, mask, scale)
    same, _ = _masked_attention64(q.float(), k.float(), v.float(), mask, scale)  # fp32 spread
    tol = 2 * (same.float().double() - ref).abs().max().item() + 1e-5
    assert (out.double() - ref).abs().max().item() <= tol
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    # text rows attend everything; every row attends the text
    if text:
        tpos = torch.arange(text) if position == "first" else torch.arange(q.shape[2] - text, q.shape[2])
        assert mask[:, :, tpos].all() and mask[:, :, :, tpos].all()
    assert out.stride() == dispatch.out_like(q).stride()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_full_selection_equals_dense_through_the_permutation(layer, torch_path):
    grid = (2, 5, 6)
    sa = make_synthetic_attention(grid, heads=2, head_dim=16, text_len=3, text_position="first", seed=3)
    cfg = SparsityConfig(policy="vmoba", block_size=16, min_density=1.0, text_position="first")
    ctx = _ctx(cfg, grid, sa.seq_len, layer)
    policy = VmobaPolicy(cfg)
    plan = policy.plan(ctx, sa.q, sa.k)
    assert not plan.dense and bool((plan.lists.counts == plan.lists.indices.shape[-1]).all())
    out, lse = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 0.25)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(sa.q, sa.k, sa.v, scale=0.25), atol=1e-5, rtol=1e-5)


def test_sparse_output_close_to_dense_on_structured_inputs(torch_path):
    grid = (4, 8, 8)
    sa = make_synthetic_attention(grid, heads=4, head_dim=32, seed=0)
    dense = F.scaled_dot_product_attention(sa.q, sa.k, sa.v)
    errors, densities = {}, {}
    for tau in (0.15, 0.5, 0.9):
        cfg = SparsityConfig(policy="vmoba", block_size=16, tau=tau)
        ctx = _ctx(cfg, grid, sa.seq_len, layer=2)
        policy = VmobaPolicy(cfg)
        plan = policy.plan(ctx, sa.q, sa.k)
        out, _ = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 1 / math.sqrt(32))
        errors[tau] = relative_l2(out, dense)
        densities[tau] = plan.lists.counts.double().mean().item() / plan.lists.indices.shape[-1]
    assert errors[0.5] < 0.1 and densities[0.5] < 0.5
    assert errors[0.9] < errors[0.5] < errors[0.15]
    assert densities[0.15] < densities[0.5] < densities[0.9]


def test_triton_interpreter_path_matches_torch_path(monkeypatch):
    grid = (2, 4, 8)
    sa = make_synthetic_attention(grid, heads=2, head_dim=16, text_len=4, seed=5)
    cfg = SparsityConfig(policy="vmoba", block_size=16, tau=0.4)
    results = []
    for triton_on in (True, False):
        if not triton_on:
            monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
        ctx = _ctx(cfg, grid, sa.seq_len, layer=1)
        policy = VmobaPolicy(cfg)
        plan = policy.plan(ctx, sa.q, sa.k)
        out, lse = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 0.25)
        results.append((plan.lists.counts, out, lse))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("triton_on", [True, False])
def test_kernel_q_gather_equals_permute_unpermute_path(layer, triton_on, monkeypatch):
    """The inference path (plan keeps only the permuted k, the kernel gathers q rows and writes out /
    lse in the original order) gives exactly the values of permuting q, k, v into the kernel and
    un-permuting out and lse after it; on the torch path too."""
    if not triton_on:
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    grid = (2, 4, 8)
    sa = make_synthetic_attention(grid, heads=2, head_dim=16, text_len=5, text_position="first", seed=layer)
    cfg = SparsityConfig(policy="vmoba", block_size=16, tau=0.4, text_position="first",
                         partition_blocks={"2d": (2, 4), "3d": (1, 2, 4)})
    ctx = _ctx(cfg, grid, sa.seq_len, layer)
    policy = VmobaPolicy(cfg)
    layout = policy.layout(ctx, sa.seq_len, sa.q.device)
    assert not layout.identity
    plan = policy.plan(ctx, sa.q, sa.k)
    stash = plan.data.stash
    assert len(stash) == 2 and torch.equal(stash[1], sa.k[:, :, layout.partition.perm])  # permuted k only
    out, lse = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 0.25)
    policy.attention_done(plan)
    assert plan.data.stash is None
    qp, kp, vp = (policy.gather(t, layout.perm) for t in (sa.q, sa.k, sa.v))
    out_p, lse_p = dispatch.attention_forward(qp, kp, vp, plan.lists, 0.25)
    assert torch.equal(out, policy.gather(out_p, layout.inv))
    assert torch.equal(lse, lse_p.index_select(2, layout.inv))
    assert out.stride() == dispatch.out_like(sa.q).stride()
    # a k that is not the plan's (stash miss): attention permutes it itself, same result
    plan = policy.plan(ctx, sa.q, sa.k)
    out2, lse2 = policy.attention(ctx, sa.q, sa.k.clone(), sa.v, plan, 0.25)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_warmup_and_missing_grid_plan_dense(torch_path):
    cfg = SparsityConfig(policy="vmoba", block_size=16)
    policy = VmobaPolicy(cfg)
    assert policy.default_warmup(50) == 12 and policy.default_warmup(4) == 1
    q = torch.randn(1, 2, 64, 16)
    ctx = _ctx(cfg, (1, 8, 8), 64, layer=1, step=11, num_steps=50)
    assert policy.plan(ctx, q, q).dense
    ctx = _ctx(cfg, (1, 8, 8), 64, layer=1, step=12, num_steps=50)
    assert not policy.plan(ctx, q, q).dense
    ctx = _ctx(cfg.replace(warmup_steps=0), None, 64, layer=1, step=0)
    assert VmobaPolicy(cfg.replace(warmup_steps=0)).plan(ctx, q, q).dense
    assert "no video grid" in ctx.state.note


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="partition_blocks keys"):
        VmobaPolicy(SparsityConfig(policy="vmoba", partition_blocks={"4d": (1, 2)}))
    with pytest.raises(ValueError, match="2d block shape"):
        VmobaPolicy(SparsityConfig(policy="vmoba", partition_blocks={"2d": (1, 2, 3)}))
    with pytest.raises(ValueError, match="topk"):
        VmobaPolicy(SparsityConfig(policy="vmoba", selection="topk"))


# ----------------------------------------------------------------------------- compiled

def _states():
    return {key: s for (key, _), s in REGISTRY.states.items()}


def test_compiled_schedule_densities_and_report(fresh_modcompile):
    torch.manual_seed(0)
    model = TinyVideoDiT(layers=3).eval()
    x = torch.randn(1, 4, 4, 16, 16)  # grid (4, 8, 8): 256 tokens
    cm = torch.compile(model, backend="modsparse",
                       options={"policy": "vmoba", "min_seq_len": 64, "block_size": 32, "num_steps": 4,
                                "tau": 0.25})
    with torch.no_grad():
        for step, t in enumerate([999.0, 700.0, 400.0]):
            out = cm(x, torch.tensor([t]))
            rows = {r.site: r for r in modcompile.report(print_table=False)}
            status = "dense (warm-up)" if step == 0 else "sparse"
            assert len(rows) == 3 and all(r.status == status and r.grid == (4, 8, 8) for r in rows.values())
            states = _states()
            if step == 0:  # int(0.25 * 4) = 1 warm-up step: dense, equal to eager
                assert all(r.density == 1.0 for r in rows.values())
                torch.testing.assert_close(out, model(x, torch.tensor([t])), atol=1e-5, rtol=1e-5)
                continue
            for key, r in rows.items():
                s = states[key]
                counts = s.plan.lists.counts
                used = counts.double().sum().item() / (counts.numel() * s.plan.lists.indices.shape[-1])
                assert r.density == pytest.approx(used, abs=1e-6) and used < 1.0
                kind = P.kind_for_layer(s.info.layer)
                assert r.note.startswith(f"vmoba {kind} blocks")
            assert torch.isfinite(out).all()
    kinds = sorted(P.kind_for_layer(s.info.layer) for s in _states().values())
    assert kinds == ["1d", "2d", "3d"]


@pytest.mark.parametrize("position", ["first", "last"])
def test_compiled_with_text_tokens_and_full_selection_equals_eager(position, fresh_modcompile, torch_path):
    torch.manual_seed(1)
    model = TinyVideoDiT(layers=3, text_tokens=6, text_position=position).eval()
    x = torch.randn(1, 4, 2, 16, 16)  # grid (2, 8, 8) + 6 text tokens
    cm = torch.compile(model, backend="modsparse",
                       options={"policy": "vmoba", "min_seq_len": 64, "block_size": 16, "warmup_steps": 0,
                                "min_density": 1.0, "text_position": position,
                                "partition_blocks": {"2d": (3, 3), "3d": (1, 3, 5)}})
    with torch.no_grad():
        for t in (999.0, 500.0):
            ts = torch.tensor([t])
            torch.testing.assert_close(cm(x, ts), model(x, ts), atol=2e-5, rtol=1e-5)
    rows = modcompile.report(print_table=False)
    assert all(r.text_tokens == 6 and r.density == 1.0 and "vmoba" in r.note for r in rows)


def test_compiled_grid_that_does_not_fit_falls_back_dense_with_a_reason(fresh_modcompile, torch_path, capsys):
    torch.manual_seed(2)
    model = TinyVideoDiT(layers=1).eval()
    x = torch.randn(1, 4, 4, 16, 16)
    cm = torch.compile(model, backend="modsparse",
                       options={"policy": "vmoba", "min_seq_len": 64, "block_size": 32, "warmup_steps": 0,
                                "video_grid": (4, 8, 9)})
    with torch.no_grad():
        ts = torch.tensor([999.0])
        torch.testing.assert_close(cm(x, ts), model(x, ts), atol=1e-5, rtol=1e-5)
    (row,) = modcompile.report()  # the site is not rewritten: the rewrite sees the misfit (passes/rewrite.py)
    assert row.status == "dense" and "video_grid 4x8x9 has 288 tokens" in row.reason
    assert "video_grid 4x8x9" in capsys.readouterr().out


def test_policy_backward_matches_masked_reference(torch_path):
    import modcompile.autograd  # noqa: F401  (registers the backward op)
    grid, block, D = (2, 5, 6), 16, 16
    sa = make_synthetic_attention(grid, heads=2, head_dim=D, text_len=3, seed=11)
    cfg = SparsityConfig(policy="vmoba", block_size=block, tau=0.3, partition_blocks={"3d": (1, 3, 4)})
    ctx = _ctx(cfg, grid, sa.seq_len, layer=2)
    policy = VmobaPolicy(cfg)
    plan = policy.plan(ctx, sa.q, sa.k)
    out, lse = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 0.25)
    grad = torch.randn_like(out)
    dq, dk, dv = policy.attention_backward(ctx, grad, sa.q, sa.k, sa.v, out, lse, plan, 0.25)
    mask = _token_mask(plan, policy.layout(ctx, sa.seq_len, sa.q.device), block)
    assert mask.float().mean() < 1
    q64, k64, v64 = (t.double().requires_grad_() for t in (sa.q, sa.k, sa.v))
    ref, _ = _masked_attention64(q64, k64, v64, mask, 0.25)
    ref.backward(grad.double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_policy_matches_torch_path(dtype, monkeypatch):
    grid = (5, 12, 20)
    sa = make_synthetic_attention(grid, heads=4, head_dim=64, text_len=37, seed=7, dtype=dtype, device="cuda")
    cfg = SparsityConfig(policy="vmoba", block_size=64, tau=0.3)
    for layer in (0, 1, 2):
        ctx = _ctx(cfg, grid, sa.seq_len, layer=layer)
        policy = VmobaPolicy(cfg)
        layout = policy.layout(ctx, sa.seq_len, sa.q.device)
        _, _, q_pool, k_pool = policy.permute_pool(sa.q, sa.k, layout)  # Triton
        _, _, rq_pool, rk_pool = PL.permute_pool_ref(sa.q, sa.k, layout.partition.perm, layout.partition.starts)
        torch.testing.assert_close(q_pool, rq_pool, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(k_pool, rk_pool, atol=1e-3, rtol=1e-4)
        plan = policy.plan(ctx, sa.q, sa.k)
        out, lse = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 0.125)
        with monkeypatch.context() as m:
            m.setattr(dispatch, "use_triton", lambda t: False)
            ref, ref_lse = policy.attention(ctx, sa.q, sa.k, sa.v, plan, 0.125)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)
