"""The modsparse backend end to end on CPU: registration, options, rewrite, fallbacks, steps, state."""
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modcompile
from modcompile import backend as backend_module
from modcompile.runtime import REGISTRY

from models import SelfAttention, TinyVideoDiT

OPTS = {"policy": "dense", "min_seq_len": 64, "block_size": 32}


pytestmark = pytest.mark.usefixtures("fresh_modcompile")


@pytest.fixture
def compiles(monkeypatch):
    """Counts the graphs handed to the backend (each one is a compilation)."""
    calls = []
    original = backend_module.rewrite_attention

    def counting(gm, config, scope):
        calls.append(gm)
        return original(gm, config, scope)

    monkeypatch.setattr(backend_module, "rewrite_attention", counting)
    return calls


def video(batch=1, frames=2, size=16, channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, frames, size, size, generator=g)


def rows():
    return modcompile.report(print_table=False)


def run_steps(model, x, timesteps, cfg=False):
    outs = []
    with torch.no_grad():
        for t in timesteps:
            ts = torch.tensor([float(t)])
            outs.append(model(x, ts))
            if cfg:
                outs.append(model(x, ts))
    return outs


# ----------------------------------------------------------------------------- registration

def test_entry_point_is_registered():
    eps = entry_points(group="torch_dynamo_backends")
    assert "modsparse" in eps.names
    assert eps["modsparse"].value == "modcompile.backend:modsparse"


def test_backend_resolves_without_importing_modcompile():
    code = ("import sys, torch\n"
            "assert 'modcompile' not in sys.modules\n"
            "f = torch.compile(lambda x: x.sin() + 1, backend='modsparse')\n"
            "x = torch.randn(4, generator=torch.Generator().manual_seed(0))\n"
            "torch.testing.assert_close(f(x), x.sin() + 1)\n"  # Inductor's sin may differ by an ulp
            "assert 'modcompile' in sys.modules\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- options

def test_unknown_option_lists_the_valid_ones():
    model = torch.compile(TinyVideoDiT(), backend="modsparse", options={"polcy": "mod"})
    with pytest.raises(Exception, match=r"unknown option.*polcy.*valid modsparse options.*min_seq_len"):
        model(video(), torch.tensor([1.0]))


@pytest.mark.parametrize("bad", [{"policy": "sparse"}, {"block_size": 100}, {"tau": 1.5},
                                 {"video_grid": (2, 8)}, {"selection": "best"}])
def test_invalid_option_values_are_clear_errors(bad):
    (key,) = bad
    with pytest.raises(ValueError, match=rf"modsparse: option {key}=.* is invalid.*; allowed: "):
        modcompile.SparsityConfig(**bad)


def test_inductor_options_pass_through(monkeypatch):
    seen = {}
    import torch._inductor.compile_fx as cfx
    original = cfx.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.update(config_patches or {})
        return original(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = torch.compile(TinyVideoDiT(), backend="modsparse", options={**OPTS, "max_autotune_gemm": False})
    with torch.no_grad():
        model(video(), torch.tensor([1.0]))
    assert seen.get("max_autotune_gemm") is False


@pytest.mark.parametrize("user_pass", [False, True])
def test_inductor_cache_key_includes_modcompile_source(monkeypatch, tmp_path, user_pass):
    """A graph cached on disk by one version of modcompile is not reused by another (its op calls
    could have other signatures), but is reused by the same version; a user's post-grad pass still runs."""
    from torch._dynamo.utils import counters
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Marker(CustomGraphPass):
        runs = 0

        def __call__(self, graph):
            Marker.runs += 1

        def uuid(self):
            return "marker"

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    digest = {"value": "version-a"}
    monkeypatch.setattr(backend_module, "source_digest", lambda: digest["value"])

    def cache_hits_of_one_compile():
        torch._dynamo.reset()
        counters.clear()
        model = torch.compile(TinyVideoDiT(), backend="modsparse", options=OPTS)
        with torch.no_grad():
            model(video(), torch.tensor([1.0]))
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    with torch._inductor.config.patch(fx_graph_cache=True, post_grad_custom_pre_pass=Marker() if user_pass else None):
        assert cache_hits_of_one_compile()[1] >= 1
        assert Marker.runs >= int(user_pass)
        hits, misses = cache_hits_of_one_compile()
        assert hits >= 1 and misses == 0
        digest["value"] = "version-b"
        hits, misses = cache_hits_of_one_compile()
        assert hits == 0 and misses >= 1


# ----------------------------------------------------------------------------- rewrite

@pytest.mark.parametrize("keywords", [False, True])
def test_dense_policy_matches_eager_and_rewrites_every_block(keywords, compiles):
    torch.manual_seed(0)
    eager = TinyVideoDiT(layers=3, keywords=keywords).eval()
    model = torch.compile(eager, backend="modsparse", options=OPTS)
    x = video()
    for t in (900.0, 500.0):
        with torch.no_grad():
            ts = torch.tensor([t])
            torch.testing.assert_close(model(x, ts), eager(x, ts), rtol=1e-5, atol=1e-5)
    table = rows()
    assert [r.rewritten for r in table] == [True] * 3
    assert [r.status for r in table] == ["dense (policy dense)"] * 3  # rewritten, but every call ran dense
    assert all(r.seq_len == 2 * 8 * 8 and r.heads == 2 and r.head_dim == 16 for r in table)
    assert all(r.grid == (2, 8, 8) for r in table)
    # Counting rewritten nodes in the compiled graph, not only outputs (dense equals eager anyway).
    targets = [n.target for n in compiles[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.modcompile.sparse_attention.default) == 3
    assert targets.count(torch.ops.modcompile.plan.default) == 3
    assert targets.count(torch.ops.modcompile.observe.default) == 0  # the dense policy never observes
    assert targets.count(torch.ops.modcompile.step.default) == 1
    assert torch._C._nn.scaled_dot_product_attention not in targets


@pytest.mark.parametrize("policy, observes", [("mod", True), ("vmoba", False)])
def test_observe_op_only_where_the_policy_observes(policy, observes, compiles):
    """The observe op is a custom-op call per site call: graphs of policies that never observe lack it."""
    model = torch.compile(TinyVideoDiT(layers=2).eval(), backend="modsparse", options={**OPTS, "policy": policy})
    with torch.no_grad():
        model(video(), torch.tensor([900.0]))
    targets = [n.target for n in compiles[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.modcompile.sparse_attention.default) == 2
    assert targets.count(torch.ops.modcompile.observe.default) == (2 if observes else 0)


def test_sparse_path_with_full_lists_matches_eager(monkeypatch):
    """Density 1.0 through the block-sparse path (not the dense shortcut) equals eager."""
    from modcompile.policies import Plan
    from modcompile.policies.dense import DensePolicy

    def full_but_sparse(self, ctx, q, k):
        full = ctx.full_plan(q, k)
        return Plan(full.lists, dense=False)

    monkeypatch.setattr(DensePolicy, "plan", full_but_sparse)
    torch.manual_seed(1)
    eager = TinyVideoDiT().eval()
    model = torch.compile(eager, backend="modsparse", options=OPTS)
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([3.0])), eager(x, torch.tensor([3.0])),
                                   rtol=1e-4, atol=1e-4)
    assert rows()[0].density == pytest.approx(1.0)


def test_joint_text_and_video_attention():
    torch.manual_seed(2)
    eager = TinyVideoDiT(text_tokens=24).eval()
    model = torch.compile(eager, backend="modsparse", options=OPTS)
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([7.0])), eager(x, torch.tensor([7.0])),
                                   rtol=1e-5, atol=1e-5)
    r = rows()[0]
    assert r.rewritten and r.seq_len == 128 + 24
    assert r.grid == (2, 8, 8) and r.text_tokens == 24


def test_graph_break_keeps_every_site_and_the_step(compiles):
    torch.manual_seed(3)
    eager = TinyVideoDiT(layers=4, graph_break=True).eval()
    model = torch.compile(eager, backend="modsparse", options=OPTS)
    x = video()
    outs = run_steps(model, x, [900, 800, 700])
    with torch.no_grad():
        torch.testing.assert_close(outs[-1], eager(x, torch.tensor([700.0])), rtol=1e-5, atol=1e-5)
    assert len(compiles) >= 2
    table = rows()
    assert len(table) == 4 and all(r.rewritten for r in table)
    assert [REGISTRY.sites[r.site].layer for r in table] == [0, 1, 2, 3]
    assert all(r.steps == 3 for r in table)


def test_a_timestep_read_in_a_graph_without_sites_still_counts_the_steps(compiles):
    """A graph break between the timestep embedding and the blocks: no plan node reads the step op's
    token in the timestep's graph, and the op must survive dead-code elimination there. Three steps
    of two passes (CFG) each are three steps of two passes at every site."""
    torch.manual_seed(3)
    model = torch.compile(TinyVideoDiT(time_break=True).eval(), backend="modsparse", options=OPTS)
    run_steps(model, video(), [900, 800, 700], cfg=True)
    assert len(compiles) >= 2
    table = rows()
    assert len(table) == 2 and all((r.steps, r.passes) == (3, 2) for r in table), table


# ----------------------------------------------------------------------------- fallbacks

class OneAttention(nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.attn = SelfAttention(32, 2)
        self.kwargs = sdpa_kwargs

    def forward(self, x, timestep):
        return self.attn(x, **self.kwargs) * timestep.float().mean()


def _fallback_reason(model, x):
    compiled = torch.compile(model, backend="modsparse", options=OPTS)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor([1.0])), model(x, torch.tensor([1.0])),
                                   rtol=1e-5, atol=1e-5)
    (row,) = rows()
    assert row.status == "dense"
    return row.reason


@pytest.mark.parametrize("kwargs, reason", [
    ({"attn_mask": "bool"}, "attn_mask"),
    ({"is_causal": True}, "is_causal"),
    ({"scale": 0.3}, None),                      # eligible: an explicit scale is supported
])
def test_sdpa_arguments_decide_eligibility(kwargs, reason):
    x = torch.randn(1, 128, 32)
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": torch.rand(128, 128) > 0.5}
    model = OneAttention(**kwargs).eval()
    if reason is None:
        compiled = torch.compile(model, backend="modsparse", options=OPTS)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, torch.tensor([1.0])), model(x, torch.tensor([1.0])),
                                       rtol=1e-5, atol=1e-5)
        assert rows()[0].rewritten
    else:
        assert reason in _fallback_reason(model, x)


def test_dropout_stays_dense():
    class Dropout(nn.Module):
        def forward(self, q, timestep):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)

    compiled = torch.compile(Dropout(), backend="modsparse", options=OPTS)
    compiled(torch.randn(1, 2, 128, 16), torch.tensor([1.0]))
    assert "dropout" in rows()[0].reason


def test_cross_attention_and_short_and_gqa_and_dtype_stay_dense():
    class Mixed(nn.Module):
        def forward(self, q, k_text, q_short, kv_gqa, q64, timestep):
            a = F.scaled_dot_product_attention(q, k_text, k_text)             # cross-attention
            b = F.scaled_dot_product_attention(q_short, q_short, q_short)     # too short
            c = F.scaled_dot_product_attention(q, kv_gqa, kv_gqa, enable_gqa=True)
            d = F.scaled_dot_product_attention(q64, q64, q64)                 # float64
            return a.sum() + b.sum() + c.sum() + d.sum()

    args = (torch.randn(1, 4, 128, 16), torch.randn(1, 4, 8, 16), torch.randn(1, 4, 32, 16),
            torch.randn(1, 2, 128, 16), torch.randn(1, 4, 128, 16, dtype=torch.float64), torch.tensor([1.0]))
    compiled = torch.compile(Mixed(), backend="modsparse", options=OPTS)
    # The sum mixes float32 terms into a float64 one: Inductor may reduce the float32 parts in
    # another order, so compare with float32 tolerances (the default would be float64's).
    torch.testing.assert_close(compiled(*args), Mixed()(*args), rtol=1e-5, atol=1e-5)
    reasons = [r.reason for r in rows()]
    assert "cross-attention" in reasons[0]
    assert "min_seq_len" in reasons[1]
    assert "grouped-query" in reasons[2]
    assert "dtype" in reasons[3]


# ----------------------------------------------------------------------------- steps and state

def test_no_recompile_across_ten_steps(compiles):
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse", options=OPTS)
    run_steps(model, video(), torch.linspace(1000, 100, 10).tolist())
    assert len(compiles) == 1
    assert all(r.steps == 10 for r in rows())


def test_cfg_double_calls_are_one_step_with_two_passes():
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse", options=OPTS)
    run_steps(model, video(), [900, 800, 700], cfg=True)
    assert REGISTRY.tracker.step == 2
    assert all(r.steps == 3 and r.passes == 2 for r in rows())


def test_timestep_jump_starts_a_new_generation():
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse", options=OPTS)
    x = video()
    run_steps(model, x, [900, 800, 700])
    generation = REGISTRY.tracker.generation
    run_steps(model, x, [950, 850])
    assert REGISTRY.tracker.generation == generation + 1
    assert REGISTRY.tracker.step == 1
    assert all(r.steps == 2 for r in rows())


def test_explicit_denoising_step_context():
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse", options=OPTS)
    x = video()
    with torch.no_grad():
        for i in range(4):
            with modcompile.denoising_step(i, 4):
                model(x, torch.tensor([5.0]))       # constant timestep: ignored inside the context
                model(x, torch.tensor([5.0]))
    assert REGISTRY.tracker.step == 3 and REGISTRY.tracker.num_steps == 4
    assert all(r.steps == 4 and r.passes == 2 for r in rows())
    with pytest.raises(ValueError):
        with modcompile.denoising_step(4, 4):
            pass


def test_reset_forgets_state():
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse", options=OPTS)
    run_steps(model, video(), [900, 800])
    assert REGISTRY.states
    modcompile.reset()
    assert not REGISTRY.states and REGISTRY.tracker.step == -1
    assert len(rows()) == 2  # the compiled sites are still known


def test_reduce_overhead_mode_keeps_updating_state():
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse",
                          options={**OPTS, "mode": "reduce-overhead"})
    run_steps(model, video(), [900, 800, 700, 600])
    assert all(r.steps == 4 for r in rows())


def test_report_prints_a_table(capsys):
    model = torch.compile(TinyVideoDiT().eval(), backend="modsparse", options=OPTS)
    run_steps(model, video(), [900])
    table = modcompile.report()
    out = capsys.readouterr().out
    assert "status" in out and "density" in out and "blocks.0" in out
    assert len(table) == 2


def test_logging_names_every_site(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="modcompile")
    model = torch.compile(OneAttention(is_causal=True).eval(), backend="modsparse", options=OPTS)
    with torch.no_grad():
        model(torch.randn(1, 128, 32), torch.tensor([1.0]))
    assert any("stays dense: is_causal" in rec.getMessage() for rec in caplog.records)


# ----------------------------------------------------------------------------- custom ops

def test_opcheck_public_op():
    """All of opcheck (schema, autograd registration, fake tensor, AOT dispatch) on inputs that
    require grad."""
    q, k, v = (torch.randn(1, 2, 80, 16, requires_grad=True) for _ in range(3))
    counts = torch.tensor([[[1, 2, 3], [3, 1, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, 0, 0], [1, 0, 0], [2, 1, 0]], [[0, 1, 2], [1, 0, 0], [2, 0, 0]]]],
                           dtype=torch.int32)
    torch.library.opcheck(torch.ops.modcompile.block_sparse_attention.default, (q, k, v, counts, indices, 32, 0.25))


def test_opcheck_graph_ops():
    from modcompile.config import SparsityConfig
    from modcompile.sites import SiteInfo
    REGISTRY.register_site(SiteInfo(key="t/attn#0", layer=-1, module_path="attn", config=SparsityConfig(**OPTS),
                                    status="sparse"))
    q, k, v = (torch.randn(1, 2, 80, 16) for _ in range(3))
    token = torch.ops.modcompile.step(torch.tensor([3.0]))
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.modcompile.plan.default, (q, k, token, None, "t/attn#0", -1, -1, -1),
                          test_utils=utils)
    counts, indices = torch.ops.modcompile.plan(q, k, token, None, "t/attn#0", -1, -1, -1)
    torch.library.opcheck(torch.ops.modcompile.sparse_attention.default,
                          (q, k, v, counts, indices, "t/attn#0", 0.25), test_utils=utils)
    out, lse = torch.ops.modcompile.sparse_attention(q, k, v, counts, indices, "t/attn#0", 0.25)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25))
    torch.library.opcheck(torch.ops.modcompile.observe.default, (q, k, lse, counts, indices, "t/attn#0"),
                          test_utils=utils)


def test_opcheck_training_site_attention_fully():
    """A training site: the whole opcheck, autograd registration and AOT dispatch included."""
    from modcompile.config import SparsityConfig
    from modcompile.sites import SiteInfo
    REGISTRY.register_site(SiteInfo(key="t/attn#0", layer=-1, module_path="attn", config=SparsityConfig(**OPTS),
                                    status="sparse"))
    q, k, v = (torch.randn(1, 2, 80, 16, requires_grad=True) for _ in range(3))
    counts, indices = torch.ops.modcompile.plan(q.detach(), k.detach(), None, None, "t/attn#0", -1, -1, -1, None, True)
    torch.library.opcheck(torch.ops.modcompile.sparse_attention.default,
                          (q, k, v, counts, indices, "t/attn#0", 0.25))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reduce_overhead_mode_on_gpu_keeps_updating_state(compiles):
    """CUDA graphs must not freeze the step-dependent ops: the runtime state advances every step,
    the output matches eager, and nothing recompiles."""
    torch.manual_seed(0)
    eager = TinyVideoDiT(dim=64, heads=1, layers=2).cuda().half().eval()
    model = torch.compile(eager, backend="modsparse",
                          options={"policy": "dense", "min_seq_len": 64, "block_size": 64,
                                   "mode": "reduce-overhead"})
    x = video().cuda().half()
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0, 500.0):
            ts = torch.tensor([t], device="cuda")
            torch.testing.assert_close(model(x, ts).clone(), eager(x, ts), rtol=2e-3, atol=2e-3)
    assert len(compiles) == 1
    assert REGISTRY.tracker.step == 4
    # the dense policy plans full lists through the rewritten ops: every call ran, none block-sparse
    assert all(r.rewritten and r.steps == 5 and r.status == "dense (policy dense)" for r in rows())


def test_video_grid_follows_each_call_across_shapes(compiles):
    """One compiled graph per resolution, then a dynamic one: every call sees its own grid."""
    torch.manual_seed(4)
    eager = TinyVideoDiT(layers=2).eval()
    model = torch.compile(eager, backend="modsparse", options=OPTS)
    for shape in [(2, 16, 16), (2, 16, 32), (4, 16, 16), (2, 16, 32), (3, 16, 24)]:
        x = torch.randn(1, 4, *shape)
        with torch.no_grad():
            torch.testing.assert_close(model(x, torch.tensor([9.0])), eager(x, torch.tensor([9.0])),
                                       rtol=1e-5, atol=1e-5)
        grid = (shape[0], shape[1] // 2, shape[2] // 2)
        assert all(r.grid == grid and r.seq_len == grid[0] * grid[1] * grid[2] for r in rows())
        modcompile.reset()
    assert len(compiles) == 3  # the last shape ran in the dynamic graph, without a recompile


def test_graph_after_a_break_takes_the_grid_of_the_call(compiles):
    torch.manual_seed(5)
    eager = TinyVideoDiT(layers=2, graph_break=True).eval()
    model = torch.compile(eager, backend="modsparse", options=OPTS)
    with torch.no_grad():
        model(video(frames=2), torch.tensor([9.0]))
    second = [r for r in rows() if r.site.endswith("blocks.1#0")][0]
    assert second.grid == (2, 8, 8)  # this graph holds no patch embedding


def test_head_dim_the_gpu_kernel_lacks_stays_dense_with_the_reason():
    from modcompile.passes.rewrite import _support_check

    check = _support_check(64)
    assert check(128, torch.device("cuda"), torch.bfloat16) == ""
    assert "head_dim 256 not supported" in check(256, torch.device("cuda"), torch.bfloat16)


def test_dense_attention_with_lse_leaves_cpu_to_the_kernel():
    from modcompile.dispatch import dense_attention_with_lse

    q = torch.randn(1, 2, 64, 16)
    assert dense_attention_with_lse(q, q, q, 0.25) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, d", [(1000, 128), (777, 64)])
def test_dense_observed_calls_get_cudnn_output_and_lse(n, d):
    """MOD's dense observed steps read the lse: cuDNN's must be the natural-log lse per query."""
    from modcompile.dispatch import dense_attention_with_lse

    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(1, n, 3, d, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    scale = d ** -0.5
    res = dense_attention_with_lse(q, k, v, scale)
    assert res is not None, "cuDNN attention with lse did not run"
    out, lse = res
    s = q.double() @ k.double().transpose(-1, -2) * scale
    ref_lse = s.logsumexp(-1)
    ref_out = s.softmax(-1) @ v.double()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v, scale=scale).double() - ref_out).abs().max()
    assert (out.double() - ref_out).abs().max() <= 2 * sdpa_err + 1e-4
    assert (lse.double() - ref_lse).abs().max() < 1e-2
    assert lse.shape == (1, 3, n) and lse.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cudnn_lse_matches_the_kernels_at_dit_sizes(layout):
    """The same check at the testbed's size (16384 tokens, 6 heads of 128), q/k/v contiguous per head
    or per token: cuDNN's lse against our kernel's at density 1 (itself tested against float64),
    on structured scores (a few heads sharp, a few flat)."""
    from modcompile import dispatch
    from modcompile.dispatch import dense_attention_with_lse
    from modcompile.kernels.block_lists import BlockLists

    B, H, n, d = 1, 6, 16384, 128
    gen = torch.Generator(device="cuda").manual_seed(3)
    sharp = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0], device="cuda").view(1, H, 1, 1)
    shape = (B, H, n, d) if layout == "bhnd" else (B, n, H, d)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (q * sharp).bfloat16(), k.bfloat16(), v.bfloat16()
    scale = d ** -0.5
    res = dense_attention_with_lse(q, k, v, scale)
    assert res is not None, "cuDNN attention with lse did not run"
    _, lse = res
    _, ref = dispatch.attention_forward(q, k, v, BlockLists.full(B, H, n, n, 128, device="cuda"), scale)
    assert (lse - ref).abs().max() < 2e-2, (lse - ref).abs().amax(-1)


def test_site_density_follows_the_plans_lists():
    """SiteState keeps a sparse plan's density (the lists themselves may go after the call): new
    lists are counted anew, the same lists again (MOD between refreshes) keep their value."""
    from modcompile.kernels.block_lists import BlockLists
    from modcompile.policies.base import Plan
    from modcompile.sites import SiteInfo, SiteState
    info = SiteInfo(key="m/attn#0", layer=0, module_path="attn", config=modcompile.SparsityConfig(), status="sparse",
                    seq_len=64, grid=None)
    state = SiteState(info=info, pass_index=0)
    assert state.density is None

    def planned(counts, dense=False):
        plan = Plan(BlockLists(counts, torch.zeros(1, 1, 4, 4, dtype=torch.int32), 16, 64, 64), dense=dense)
        state.plan = plan
        state.record_density(plan)
        return float(state.density)
    first = torch.tensor([[[1, 2, 3, 4]]], dtype=torch.int32)
    assert planned(first) == 10 / 16
    assert planned(torch.tensor([[[4, 4, 4, 0]]], dtype=torch.int32)) == 12 / 16
    assert planned(first, dense=True) == 1.0
    assert planned(first) == 10 / 16
    state.plan = state.plan.with_lists(None)              # the lists gone after the call: the density stays
    assert float(state.density) == 10 / 16
