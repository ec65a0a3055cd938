"""Backward of block-sparse attention: Triton kernels, list transposition, autograd registration.

Gradients are compared with a float64 reference on fresh random inputs under the attention
tolerance rule: max|grad - ref64| <= 2 * max|grad_torch_same_dtype - ref64| + tiny. On CPU the
Triton kernels run under TRITON_INTERPRET=1 (fp32/fp16 only); bf16 runs on a GPU.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (conftest does it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from modcompile.autograd import attach_autograd  # noqa: E402
from modcompile.kernels.block_sparse_attention_bwd import block_sparse_attention_bwd  # noqa: E402
from modcompile.kernels.tuning import LaunchConfig, as_config, backward_configs  # noqa: E402
from modcompile.kernels.block_lists import mask_from_lists, num_blocks  # noqa: E402
from modcompile.kernels.reference import block_sparse_attention_ref  # noqa: E402
from modcompile.kernels.reference_bwd import block_sparse_attention_bwd_ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
CAN_RUN_TRITON = HAS_CUDA or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def random_lists(gen, B, H, mq, mk, device="cpu", p_empty=0.2, extra=2):
    """Unsorted lists with duplicates, garbage past the count and some empty rows."""
    width = mk + extra
    counts = torch.randint(0, width + 1, (B, H, mq), generator=gen, dtype=torch.int32)
    counts = torch.where(torch.rand(B, H, mq, generator=gen) < p_empty, 0, counts).to(torch.int32)
    indices = torch.randint(0, mk, (B, H, mq, width), generator=gen, dtype=torch.int32)
    return counts.to(device), indices.to(device)


def maybe_strided(t, gen, strided):
    """Same values, non-contiguous layout: (B, N, H, D) storage seen as (B, H, N, D), or a D slice."""
    if not strided:
        return t
    if torch.rand(1, generator=gen).item() < 0.5:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., 1::2] = t
    return wide[..., 1::2]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_grads(got, ref64, base, tiny):
    for name, g, r, bl in zip(("dq", "dk", "dv"), got, ref64, base):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err, base_err = max_err(g, r), max_err(bl, r)
        assert err <= 2 * base_err + tiny, f"{name}: err {err:.3e} > 2 * {base_err:.3e} + {tiny:.1e}"


def run_case(B, H, N, Nk, D, bs, dtype, seed, strided=False, device=DEVICE, p_empty=0.2, **configs):
    gen = torch.Generator().manual_seed(seed)
    mq, mk = num_blocks(N, bs), num_blocks(Nk, bs)
    q = torch.randn(B, H, N, D, generator=gen)
    k = torch.randn(B, H, Nk, D, generator=gen)
    v = torch.randn(B, H, Nk, D, generator=gen)
    do = torch.randn(B, H, N, D, generator=gen)
    counts, indices = random_lists(gen, B, H, mq, mk, p_empty=p_empty)
    # Float64 ground truth on the CPU.
    out64, lse64 = block_sparse_attention_ref(q.double(), k.double(), v.double(), counts, indices, block_size=bs)
    ref = block_sparse_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), out64, lse64,
                                         counts, indices, block_size=bs)
    qd, kd, vd, dod = (t.to(dtype) for t in (q, k, v, do))
    # "torch in the same dtype": the reference with matmuls in the input dtype.
    out_d, lse_d = block_sparse_attention_ref(qd, kd, vd, counts, indices, block_size=bs)
    base = block_sparse_attention_bwd_ref(dod, qd, kd, vd, out_d, lse_d, counts, indices, block_size=bs,
                                          compute_dtype=dtype)
    args = [maybe_strided(t.to(device), gen, strided) for t in (dod, qd, kd, vd, out_d)]
    got = block_sparse_attention_bwd(*args, lse_d.float().to(device), counts.to(device), indices.to(device),
                                     block_size=bs, **configs)
    got = [g.cpu() for g in got]
    scale_ref = max(r.abs().max().item() for r in ref) if N else 1.0
    tiny = (1e-5 if dtype == torch.float32 else 1e-3) * max(scale_ref, 1.0)
    check_grads(got, ref, base, tiny)
    # Structural zeros: empty query rows get dq = 0, never-attended keys get dk = dv = 0.
    bmask = mask_from_lists(counts, indices, mk)
    empty_rows = (~bmask.any(-1)).repeat_interleave(bs, dim=-1)[..., :N]
    unused_keys = (~bmask.any(-2)).repeat_interleave(bs, dim=-1)[..., :Nk]
    assert (got[0][empty_rows] == 0).all()
    assert (got[1][unused_keys] == 0).all() and (got[2][unused_keys] == 0).all()
    return got


# ----------------------------------------------------------------------------------------------
# Triton backward against float64
# ----------------------------------------------------------------------------------------------
@needs_triton
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.float32, torch.float16]), B=st.integers(1, 2), H=st.integers(1, 2),
       bs=st.sampled_from([16, 32]), N=st.integers(1, 130), nk_delta=st.sampled_from([0, 0, 0, -20, 37]),
       D=st.sampled_from([16, 32, 64, 24]), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_backward_matches_float64_reference(dtype, B, H, bs, N, nk_delta, D, strided, seed):
    Nk = max(1, N + nk_delta)
    run_case(B, H, N, Nk, D, bs, dtype, seed, strided=strided)


# Launch options forced on both passes (or one each), on ragged shapes with Nk != N and D both
# a power of two and not: TMA descriptors (rows past the end read as 0), the scalar ragged branch,
# warp specialization (a no-op under the interpreter, but the loop form is exercised) and lse/delta
# through 1-d descriptors.
_FLAG_CONFIGS = {
    "plain": dict(config=LaunchConfig(32, 16, 4, 1)),
    "ragged_branch": dict(config=LaunchConfig(32, 16, 4, 1, ragged_branch=True)),
    "tma": dict(config=LaunchConfig(32, 16, 4, 1, tma=True)),
    "tma_branch_ws": dict(config=LaunchConfig(32, 32, 4, 1, tma=True, ragged_branch=True, warp_spec=True)),
    "per_pass": dict(dkdv_config=(32, 16, 4, 1, True, True, True, True), dq_config=(16, 16, 4, 1, False, True)),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(_FLAG_CONFIGS))
def test_backward_launch_options_match_float64_reference(name, dtype):
    seed = sorted(_FLAG_CONFIGS).index(name) + (10 if dtype == torch.float16 else 0)
    run_case(2, 1, 75, 101, 32, 32, dtype, seed, p_empty=0.1, **_FLAG_CONFIGS[name])
    run_case(1, 2, 93, 50, 24, 32, dtype, seed + 1, p_empty=0.1, **_FLAG_CONFIGS[name])


@needs_triton
def test_backward_tma_on_bnhd_storage():
    """(B, N, H, D) storage viewed as (B, H, N, D): row stride H*D, still TMA-readable."""
    gen = torch.Generator().manual_seed(21)
    B, H, N, D, bs = 1, 3, 70, 16, 16
    q, k, v, do = (torch.randn(B, N, H, D, generator=gen).transpose(1, 2).to(DEVICE) for _ in range(4))
    mq = num_blocks(N, bs)
    counts, indices = random_lists(gen, B, H, mq, mq, p_empty=0.1)
    counts, indices = counts.to(DEVICE), indices.to(DEVICE)
    out, lse = block_sparse_attention_ref(q, k, v, counts, indices, block_size=bs)
    plain = block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices, block_size=bs,
                                       config=LaunchConfig(16, 16, 4, 1))
    tma = block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices, block_size=bs,
                                     config=LaunchConfig(16, 16, 4, 1, tma=True, ragged_branch=True, tma_rows=True))
    for a, b in zip(plain, tma):
        assert max_err(a.cpu(), b.cpu()) < 1e-5


@needs_triton
def test_backward_forced_tma_config_rejects_strided_head_dim():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 40, 32, generator=gen)[..., ::2].to(DEVICE)  # last-dim stride 2
    counts = torch.ones(1, 1, 3, dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 1, 3, 1, dtype=torch.int32, device=DEVICE)
    lse = torch.zeros(1, 1, 40, device=DEVICE)
    with pytest.raises(ValueError, match="TMA"):
        block_sparse_attention_bwd(q, q, q, q, q, lse, counts, indices, block_size=16,
                                   config=LaunchConfig(16, 16, 4, 1, tma=True))
    with pytest.raises(ValueError, match="divide"):
        block_sparse_attention_bwd(q, q, q, q, q, lse, counts, indices, block_size=16, dq_config=(32, 16, 4, 1))


def test_backward_config_conversion_and_gpu_candidates():
    assert as_config((64, 32, 4, 2)) == LaunchConfig(64, 32, 4, 2)
    assert as_config([64, 32, 4, 2, True]).tma and not as_config((64, 32, 4, 2)).warp_spec
    with pytest.raises(TypeError):
        as_config((64, 32))
    cands = backward_configs(128)
    assert all(isinstance(c, LaunchConfig) for c in cands)
    assert any(c.tma and c.warp_spec for c in cands) and any(c.tma and not c.warp_spec for c in cands)
    plain = backward_configs(128, tma=False)
    assert plain and not any(c.tma or c.warp_spec or c.tma_rows for c in plain)
    assert all(16 % c.tile == 0 and 16 % c.sub == 0 for c in backward_configs(16))
    assert len({c.label() for c in cands}) == len(cands)


def test_config_labels_round_trip_and_pins_parse(monkeypatch):
    """``MODCOMPILE_BWD_CONFIG`` takes the labels the benchmarks print; a typo is an error, not a
    silently tuned run."""
    from modcompile.kernels.tuning import parse_label, pinned_configs
    for cfg in (*backward_configs(128), LaunchConfig(32, 16, 4, 1), LaunchConfig(64, 64, 4, 2, tma_rows=True)):
        assert parse_label(cfg.label()) == cfg
    monkeypatch.setenv("MODCOMPILE_BWD_CONFIG", " dq=(128,64,8w,3s)+tma+ragged_branch ")
    assert pinned_configs() == {"dq": LaunchConfig(128, 64, 8, 3, tma=True, ragged_branch=True)}
    for bad in ("dq=(128,64,8,3)", "dkdv=(64,64,4w,2s)+fast", "both=(64,64,4w,2s)"):
        monkeypatch.setenv("MODCOMPILE_BWD_CONFIG", bad)
        with pytest.raises(ValueError):
            pinned_configs()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_pinned_backward_configs_are_used_without_tuning(monkeypatch):
    from modcompile.kernels import tuning
    monkeypatch.setenv("MODCOMPILE_BWD_CONFIG", "dkdv=(64,64,4w,2s)+tma+ragged_branch;dq=(128,64,8w,3s)")
    monkeypatch.setenv("MODCOMPILE_TUNE", "1")
    before = tuning.tuned_configs()
    run_case(1, 2, 3 * 128 + 37, 3 * 128 + 37, 128, 128, torch.bfloat16, 3)
    assert tuning.tuned_configs() == before  # nothing timed: both passes ran their pins


@needs_triton
def test_backward_all_rows_empty_gives_zero_not_nan():
    B, H, N, D, bs = 1, 2, 40, 32, 16
    mq = num_blocks(N, bs)
    q, k, v, do = (torch.randn(B, H, N, D, device=DEVICE) for _ in range(4))
    counts = torch.zeros(B, H, mq, dtype=torch.int32, device=DEVICE)
    indices = torch.randint(0, mq, (B, H, mq, 2), dtype=torch.int32, device=DEVICE)
    out = torch.zeros_like(q)
    lse = torch.full((B, H, N), float("-inf"), device=DEVICE)
    for g in block_sparse_attention_bwd(do, q, k, v, out, lse, counts, indices, block_size=bs):
        assert torch.equal(g, torch.zeros_like(g))


@needs_triton
def test_backward_dense_lists_match_sdpa_autograd():
    """Density 1.0 with a ragged tail: the same gradients as dense attention through autograd."""
    B, H, N, D, bs = 1, 2, 75, 32, 32
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(4))
    mq = num_blocks(N, bs)
    counts = torch.full((B, H, mq), mq, dtype=torch.int32)
    indices = torch.arange(mq, dtype=torch.int32).flip(0).expand(B, H, mq, mq).contiguous()  # unsorted
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qr, kr, vr).backward(do)
    out, lse = block_sparse_attention_ref(q.float(), k.float(), v.float(), counts, indices, block_size=bs)
    got = block_sparse_attention_bwd(*(t.float().to(DEVICE) for t in (do, q, k, v)), out.to(DEVICE),
                                     lse.to(DEVICE), counts.to(DEVICE), indices.to(DEVICE), block_size=bs)
    for g, r in zip(got, (qr.grad, kr.grad, vr.grad)):
        assert max_err(g.cpu(), r) < 1e-4


def test_backward_rejects_bad_inputs():
    q = torch.randn(1, 1, 32, 16)
    counts = torch.ones(1, 1, 2, dtype=torch.int32)
    indices = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    lse = torch.zeros(1, 1, 32)
    with pytest.raises(TypeError):
        block_sparse_attention_bwd(q, q, q, q, q, lse, counts.long(), indices, block_size=16)
    with pytest.raises(ValueError):
        block_sparse_attention_bwd(q, q, q, q, q, lse, counts, indices, block_size=32)  # Mq mismatch
    with pytest.raises(ValueError):
        block_sparse_attention_bwd(q, q, q, q, q, lse[..., :5], counts, indices, block_size=16)
    with pytest.raises(TypeError):
        block_sparse_attention_bwd(q.double(), *(q.double(),) * 4, lse, counts, indices, block_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bs", [64, 128])
def test_backward_bf16_gpu(D, bs):
    for seed in range(2):
        run_case(2, 3, 3 * bs + 37, 3 * bs + 37, D, bs, torch.bfloat16, seed, strided=bool(seed))
        run_case(1, 2, 2 * bs + 5, 2 * bs + 5, D, bs, torch.float16, seed + 7)


# ----------------------------------------------------------------------------------------------
# autograd registration on a forward custom op
# ----------------------------------------------------------------------------------------------
def _forward_impl(q, k, v, kv_counts, kv_indices, block_size, scale):
    """Triton forward on CUDA, the torch reference elsewhere."""
    if q.is_cuda:
        from modcompile.kernels.block_sparse_attention import block_sparse_attention_fwd

        return block_sparse_attention_fwd(q, k, v, kv_counts, kv_indices, block_size=block_size, scale=scale)
    out, lse = block_sparse_attention_ref(q, k, v, kv_counts, kv_indices, block_size=block_size, scale=scale)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("modcompile_test::bsa_forward", mutates_args=())
def bsa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_counts: torch.Tensor,
                kv_indices: torch.Tensor, *, block_size: int = 128,
                scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, kv_counts, kv_indices, block_size, scale)


@bsa_forward.register_fake
def _(q, k, v, kv_counts, kv_indices, *, block_size=128, scale=None):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


attach_autograd(bsa_forward)


def _tiny_inputs(dtype, N=20, Nk=None, D=8, bs=8, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    Nk = N if Nk is None else Nk
    B, H = 1, 2
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64).to(dtype)
    counts, indices = random_lists(gen, B, H, num_blocks(N, bs), num_blocks(Nk, bs), p_empty=0.3)
    counts[0, 0, 0] = 0  # at least one empty row
    counts[0, 1, 0] = max(int(counts[0, 1, 0]), 1)
    return [t.to(device) for t in (q, k, v)], counts.to(device), indices.to(device), bs


def test_gradcheck_fp64_through_reference_path():
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float64, N=20, Nk=13)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return bsa_forward(q, k, v, counts, indices, block_size=bs, scale=0.7)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_lse_gradient_is_ignored_and_lists_get_none():
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float64)
    q.requires_grad_()
    out, lse = bsa_forward(q, k, v, counts, indices, block_size=bs)
    (g1,) = torch.autograd.grad(out.sum(), q, retain_graph=True)
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    (g2,) = torch.autograd.grad(out.sum() + finite.sum(), q)
    assert torch.equal(g1, g2)


@needs_triton
def test_autograd_fp32_interpreter_matches_float64():
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float32, N=45, D=16, bs=16, seed=2, device=DEVICE)
    do = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = bsa_forward(*leaves, counts, indices, block_size=bs)
    out.backward(do)
    leaves64 = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    out64, _ = block_sparse_attention_ref(*leaves64, counts.cpu(), indices.cpu(), block_size=bs)
    out64.backward(do.double().cpu())  # plain torch autograd of the reference: an independent check
    for a, b in zip(leaves, leaves64):
        assert max_err(a.grad.cpu(), b.grad) < 1e-4


def test_compiled_training_step_matches_eager_aot_eager():
    """AOTAutograd traces the joint graph through the backward custom op's fake implementation."""
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float32, N=40, D=16, bs=16, seed=5)
    w = torch.randn(16, 16)

    def step(q, k, v, w):
        out, lse = bsa_forward(q @ w, k, v, counts, indices, block_size=bs)
        return (out * out).sum()

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_backward_op_reference_path():
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float64, N=19, Nk=11, seed=1)
    out, lse = block_sparse_attention_ref(q, k, v, counts, indices, block_size=bs)
    do = torch.randn_like(q)
    torch.library.opcheck(torch.ops.modcompile.block_sparse_attention_backward.default,
                          (do, q, k, v, out, lse, counts, indices, bs, None))


@needs_triton
def test_opcheck_backward_op_triton_path():
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float32, N=40, D=16, bs=16, seed=4, device=DEVICE)
    out, lse = _forward_impl(q, k, v, counts, indices, bs, None)
    do = torch.randn_like(q)
    torch.library.opcheck(torch.ops.modcompile.block_sparse_attention_backward.default,
                          (do, q, k, v, out, lse, counts, indices, bs, 0.3),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_forward_op_with_attached_autograd():
    (q, k, v), counts, indices, bs = _tiny_inputs(torch.float64, N=17, seed=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(bsa_forward, (q, k, v, counts, indices), {"block_size": bs})
