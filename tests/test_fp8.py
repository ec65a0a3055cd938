"""FP8 block-sparse attention (int8 q, k; e4m3 P, v): quantization, kernel, reference, error model, options.

CPU: the torch quantization and the fp8 reference against the format's bounds; the Triton
quantization and attention kernels under the interpreter with its float8 conversion replaced by
torch's (the interpreter's own halves values that round up to the next power of two, which is why
the product path falls back to the reference there; ``interpreter_fp8`` below); the dispatch,
public keyword and options. GPU (marked ``gpu``): the kernels against the reference (tight) and
against float64 (the error model's bound), ragged N, ``q_rows``, empty lists.

The accuracy bound is :func:`modcompile.kernels.fp8_attention.predicted_relative_error`: int8's
spacing (amax / 127 per token) on q and k and e4m3's unit roundoff 2^-4 on P and v, propagated to
first order (derivation in that module). It gives a range: at most the upper end (e4m3 error
variance <= u^2 x^2 / 3 per rounding), at least the lower end (>= u^2 x^2 / 12), so a result that
is too good (nothing quantized) fails as well.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import modcompile
from benchmarks.bench_fp8 import main as bench_main
from benchmarks.bench_fp8 import make_inputs
from modcompile import dispatch
from modcompile.kernels import fp8_attention as fa
from modcompile.kernels import fp8_quant as fq
from modcompile.kernels._common import interpreting
from modcompile.kernels.block_lists import BlockLists
from modcompile.kernels.reference import block_sparse_attention_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_fp8_gpu = pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a CUDA device of compute capability 8.9+")
U = 2.0 ** -4


# ------------------------------------------------------------------------------ helpers
def inputs(B, H, N, D, seed, dtype=torch.float32, device=DEVICE, structured=False):
    """q, k, v: N(0, 1) with per-channel offsets on k and v (never zeros); ``structured``: the
    benchmark's video-like case (attention concentrated on nearby tokens)."""
    return make_inputs(B, H, N, D, seed, dtype, device, structured)


def random_lists(B, H, N, block_size, density, seed, p_empty=0.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1)
    mq = -(-N // block_size)
    mask = torch.rand(B, H, mq, mq, generator=g) < density
    mask |= torch.eye(mq, dtype=torch.bool)
    mask &= (torch.rand(B, H, mq, 1, generator=g) >= p_empty)
    return BlockLists.from_mask(mask.to(device), block_size, N, N)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


@pytest.fixture
def interpreter_fp8(monkeypatch):
    """The Triton interpreter with float32 -> e4m3 conversion done by torch (round to nearest even),
    so that the fp8 kernels can run on CPU. Skips when not interpreting or when Triton's private
    conversion function moved."""
    if not interpreting():
        pytest.skip("only under TRITON_INTERPRET=1")
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        pytest.skip("triton.runtime.interpreter._convert_float not found in this Triton")

    def convert(data, src, dst, rounding_mode):
        if dst == tl.float8e4nv and src == tl.float32:
            x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return original(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)
    monkeypatch.setattr(fa, "fp8_path", lambda q, block_size: ("kernel", ""))


# ------------------------------------------------------------------------------ quantization (CPU)
def _check_int8_tokens(name, x, xd, scale):
    """x (B, H, Npad, Dp) zero padded; xd its dequantized copy: scale = amax / 127 per token rounded
    up to 22 significant bits (its two lowest bits 0, at most 2^-21 above), each element within half a
    spacing (plus the float32 rounding of x / scale, up to 127 * 2^-24, and of the product)."""
    exact = x.abs().amax(-1) / 127
    assert (scale >= exact).all() and (scale <= exact * (1 + 2.0 ** -21)).all(), name
    assert (scale.view(torch.int32) & 3 == 0).all(), f"{name}: scale has more than 22 significant bits"
    err = (xd - x).abs()
    assert (err <= scale[..., None] * (0.5 + 2.0 ** -15)).all(), f"{name}: outside the int8 bound"
    assert (err > 0).any(), f"{name}: nothing was rounded (quantization not applied?)"


@pytest.mark.parametrize("N,D,bs,dtype", [(70, 48, 32, torch.float32), (64, 64, 16, torch.bfloat16)])
def test_quantize_ref_layouts_scales_and_format_bounds(N, D, bs, dtype):
    """q and k (smoothed by its token mean): int8 per token, within half a spacing (amax / 127 / 2);
    v: e4m3 per (head, channel), |err| <= 2^-4 |x| + 2^-10 scale (half a spacing, normal or
    subnormal), stored transposed; padding is zero; q_rows gathers q's rows."""
    q, k, v = inputs(2, 3, N, D, seed=N, dtype=dtype, device="cpu")
    v[0, 1, :, 4] = 0.0  # one all-zero channel: scale 0, values 0
    k[1, 2, 5] = 0.0    # k smoothed: the token is -mean, not zero; q's token 0 of a zero block below
    q[1, 0, 3] = 0.0
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    ops = fq.quantize_ref(q, k, v, bs, rows)
    mb, dp = -(-N // bs), 64
    assert ops.q.shape == ops.k.shape == (2, 3, mb * bs, dp) and ops.q.dtype == ops.k.dtype == torch.int8
    assert ops.q_scale.shape == ops.k_scale.shape == (2, 3, mb * bs)
    assert ops.v_t.shape == (2, 3, dp, mb * bs) and ops.v_t.dtype == torch.float8_e4m3fn
    assert ops.v_scale.shape == (2, 3, dp)
    qd, kd, vd = fq.dequantize(ops)
    kbar = k.float() - k.float().mean(2, keepdim=True)
    torch.testing.assert_close(ops.k_mean[..., :D], k.float().mean(2))

    def pad(x):
        return torch.nn.functional.pad(x, (0, dp - D, 0, mb * bs - N))
    _check_int8_tokens("q", pad(q.float()[:, :, rows.long()]), qd, ops.q_scale)
    _check_int8_tokens("k", pad(kbar), kd, ops.k_scale)
    zero_row = int((rows == 3).nonzero())
    assert ops.q_scale[1, 0, zero_row] == 0 and (ops.q[1, 0, zero_row] == 0).all()
    assert ops.q.abs().max() == 127 and ops.k.abs().max() == 127
    vp = pad(v.float())
    assert torch.equal(ops.v_scale, vp.abs().amax(2) / 448)
    s = ops.v_scale[:, :, None, :]
    err = (vd - vp).abs()
    assert (err <= U * vp.abs() + 2.0 ** -10 * s + 1e-30).all(), "v: outside the e4m3 bound"
    assert (err > 0).any()
    for name, xd in (("q", qd), ("k", kd), ("v", vd)):
        assert (xd[:, :, N:] == 0).all() and (xd[..., D:] == 0).all(), f"{name}: padding must be 0"
    assert ops.v_scale[0, 1, 4] == 0 and (vd[0, 1, :, 4] == 0).all()
    assert (ops.v_scale[..., :D] > 0).sum() == 2 * 3 * D - 1


def test_quantize_ref_spreads_non_finite_over_its_token_or_v_channel_only():
    q, k, v = inputs(1, 1, 64, 32, seed=5, device="cpu")
    v[0, 0, 3, 7] = float("nan")
    q[0, 0, 10, 2] = float("inf")
    k[0, 0, 40, 5] = float("nan")
    ops = fq.quantize_ref(q, k, v, 32)
    qd, kd, vd = fq.dequantize(ops)
    assert torch.isnan(vd[0, 0, :64, 7]).all()
    assert not torch.isnan(vd[0, 0, :, :7]).any() and not torch.isnan(vd[0, 0, :, 8:]).any()
    assert not torch.isfinite(qd[0, 0, 10, :32]).all() and torch.isfinite(qd[0, 0, 11:]).all()
    # k's NaN also makes its mean NaN: every smoothed token is NaN, as every score with it would be
    assert torch.isnan(kd[0, 0, :64, :32]).any(dim=-1).all()


def test_quantize_kernel_is_bitwise_the_reference(interpreter_fp8):
    q, k, v = inputs(2, 3, 70, 48, seed=1, dtype=torch.float16, device="cpu")
    q[0, 1, 4] = 0.0  # an all-zero token: scale 0, values 0
    rows = torch.randperm(70, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    got, ref = fq.quantize(q, k, v, 32, rows), fq.quantize_ref(q, k, v, 32, rows)
    _assert_operands_equal(got, ref)


def _assert_operands_equal(got, ref):
    for name in ("q", "q_scale", "k", "k_scale", "k_mean", "k_bias", "v_t", "v_scale"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a.view(torch.uint8) if a.dtype == fq.FP8 else a,
                           b.view(torch.uint8) if b.dtype == fq.FP8 else b), name


# ------------------------------------------------------------------------------ kernel under the interpreter
@pytest.mark.parametrize("flags", [{}, {"tma": True, "warp_spec": True}], ids=["pointers", "tma"])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("N,bs,sub", [(150, 32, 16), (128, 64, 64)])
def test_fp8_kernel_matches_its_reference(interpreter_fp8, monkeypatch, N, bs, sub, gather, flags):
    """Ragged N, chunks smaller than the block, shuffled lists with empty rows, q_rows: the kernel
    (with the interpreter's conversion fixed) equals the fp8 reference to float32 rounding, with
    pointer loads and with the TMA descriptors (Hopper's flags)."""
    monkeypatch.setattr(fa, "device_capability", lambda device: (9, 0))
    q, k, v = inputs(1, 2, N, 64, seed=N + gather, device="cpu")
    q[0, :, -1] = 0.0  # a zero row (q scale 0) that sees the ragged key tail: -inf * 0 must not leak NaN
    lists = random_lists(1, 2, N, bs, 0.5, seed=N, p_empty=0.3, device="cpu")
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(1)).to(torch.int32) if gather else None
    out = torch.full((1, 2, N, 64), float("nan"))
    out, lse = fa.block_sparse_attention_fp8(q, k, v, lists, q_rows=rows, out=out,
                                             config=fa.LaunchConfig(bs, sub, 4, 1, **flags))
    ref, ref_lse = fa.block_sparse_attention_fp8_ref(q, k, v, lists, q_rows=rows, key_chunk=sub)
    empty = torch.isneginf(ref_lse)
    assert empty.any() and (~empty).any()
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_l2(out, ref) < 1e-3  # float32 sums in another order may flip a rare e4m3 rounding of p
    assert (lse[~empty] - ref_lse[~empty]).abs().max() < 1e-4


def test_int8_scale_rounding_keeps_zero_inf_and_every_nan():
    bits = torch.tensor([0, 0x3F800001, 0x3F800003, 0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0x7F800001], dtype=torch.int32)
    got = fq.round_up_22_bits(bits.view(torch.float32))
    assert got[0] == 0 and got[1] == got[2] == torch.tensor(0x3F800004, dtype=torch.int32).view(torch.float32)
    assert got[3] == float("inf") and got[4:].isnan().all()  # 0x7FFFFFFF + 3 would wrap to -0


def test_fp8_rejects_a_scale_that_is_not_positive():
    q = k = v = torch.randn(1, 1, 64, 64)
    lists = random_lists(1, 1, 64, 64, 1.0, seed=0, device="cpu")
    with pytest.raises(ValueError, match="scale must be > 0"):
        fa.block_sparse_attention_fp8(q, k, v, lists, scale=-0.1)


def test_fp8_kernel_rejects_flags_it_lacks():
    q = k = v = torch.randn(1, 1, 64, 64)
    lists = random_lists(1, 1, 64, 64, 1.0, seed=0, device="cpu")
    with pytest.raises(ValueError, match="host_tma"):
        fa.block_sparse_attention_fp8(q, k, v, lists, config=fa.LaunchConfig(64, 64, 4, 1, tma=True, host_tma=True))


# ------------------------------------------------------------------------------ accuracy (CPU, reference)
CASES = [  # (B, H, N, D, block, density, structured)
    (1, 2, 512, 64, 64, 1.0, False),
    (1, 2, 500, 64, 32, 0.4, False),
    (1, 1, 384, 128, 128, 1.0, False),
    (1, 2, 512, 64, 64, 1.0, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[2]}-D{c[3]}-bs{c[4]}-d{c[5]}{'-video' if c[6] else ''}")
def test_fp8_reference_error_is_within_the_derived_bound(case):
    B, H, N, D, bs, density, structured = case
    q, k, v = inputs(B, H, N, D, seed=N + D, device="cpu", structured=structured)
    lists = random_lists(B, H, N, bs, density, seed=N, device="cpu")
    out, lse = fa.block_sparse_attention_fp8_ref(q, k, v, lists)
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), lists)
    low, high = fa.predicted_relative_error(q, k, v, lists)
    err = rel_l2(out, ref)
    assert low <= err <= high, f"relative L2 {err:.4f} outside the e4m3 model's [{low:.4f}, {high:.4f}]"
    # lse: l sums unrounded p, so only the score errors move it, by at most max_j |ds_j|; with int8
    # half spacings hq, hk (amax / 254 per token) and the lse's shift q . mean taken from the rounded q:
    # ds_j = scale (dq . k_j + q . dk_j + dq . dk_j)
    kbar = k.double() - k.double().mean(2, keepdim=True)
    hq, hk = q.double().abs().amax(-1) / 254, kbar.abs().amax(-1) / 254
    a, b = q.double().abs().sum(-1), k.double().abs().sum(-1)
    ds = hq[..., None] * b[..., None, :] + a[..., None] * hk[..., None, :] + D * hq[..., None] * hk[..., None, :]
    bound = ds.amax(-1) / math.sqrt(D) + 1e-4
    assert ((lse.double() - ref_lse).abs() <= bound).all()


def test_one_mantissa_bit_less_breaks_the_bound(monkeypatch):
    """The bound can fail: the same pipeline with e5m2 (2 mantissa bits) for P and v lands above it."""
    q, k, v = inputs(1, 2, 256, 64, seed=7, device="cpu")
    lists = random_lists(1, 2, 256, 64, 1.0, seed=7, device="cpu")
    ref, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), lists)
    _, high = fa.predicted_relative_error(q, k, v, lists)
    monkeypatch.setattr(fq, "FP8", torch.float8_e5m2)
    out, _ = fa.block_sparse_attention_fp8_ref(q, k, v, lists)
    assert rel_l2(out, ref) > high


def test_two_bits_less_on_the_scores_breaks_the_bound(monkeypatch):
    """... and with q and k at 6 bits (31 levels) where the attention is peaked (scores x 9)."""
    q, k, v = inputs(1, 2, 256, 64, seed=7, device="cpu")
    q, k = q * 3, k * 3
    lists = random_lists(1, 2, 256, 64, 1.0, seed=7, device="cpu")
    ref, _ = block_sparse_attention_ref(q.double(), k.double(), v.double(), lists)
    low, high = fa.predicted_relative_error(q, k, v, lists)
    assert low <= rel_l2(fa.block_sparse_attention_fp8_ref(q, k, v, lists)[0], ref) <= high
    monkeypatch.setattr(fq, "INT8_MAX", 31.0)
    out, _ = fa.block_sparse_attention_fp8_ref(q, k, v, lists)
    assert rel_l2(out, ref) > high


# ------------------------------------------------------------------------------ dispatch, keyword, options
def test_routes_and_reasons():
    q = torch.randn(1, 1, 64, 64)
    route, why = dispatch.fp8_route(q, 64)
    assert route == "reference" and ("interpreter" in why or "cpu" in why)
    assert dispatch.fp8_route(q, 64, key_bias=torch.zeros(1, 64))[0] == "none"
    assert dispatch.fp8_route(q, 64, scale=-0.125) == ("none", "fp8 attention needs scale > 0, got -0.125")
    with pytest.raises(ValueError, match="precision"):
        dispatch.attention_forward(q, q, q, BlockLists.full(1, 1, 64, 64, 32), 0.1, precision="fp16")


def test_public_keyword_runs_the_fp8_path_and_logs_why(caplog):
    q, k, v = inputs(1, 2, 96, 32, seed=2, device="cpu")
    lists = random_lists(1, 2, 96, 32, 0.6, seed=2, device="cpu")
    dispatch._warn_fp8.cache_clear()
    with caplog.at_level(logging.WARNING, logger="modcompile"):
        out, lse = modcompile.block_sparse_attention(q, k, v, lists, precision="fp8", return_lse=True)
    assert any("precision='fp8'" in r.getMessage() for r in caplog.records)
    ref, ref_lse = fa.block_sparse_attention_fp8_ref(q, k, v, lists)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    plain = modcompile.block_sparse_attention(q, k, v, lists)
    assert not torch.equal(out, plain) and rel_l2(out, plain) < 0.2
    with pytest.raises(ValueError, match="precision must be one of"):
        modcompile.block_sparse_attention(q, k, v, lists, precision="e4m3")
    with pytest.raises(ValueError, match="no backward"):
        modcompile.block_sparse_attention(q.requires_grad_(), k, v, lists, precision="fp8")


@pytest.mark.usefixtures("fresh_modcompile")
@pytest.mark.parametrize("options", [{"policy": "dense", "fp8_dense": True},
                                     {"policy": "vmoba", "precision": "fp8", "warmup_steps": 0, "tau": 0.5}])
def test_compiled_model_runs_fp8_and_reports_why(options):
    from models import TinyVideoDiT

    torch.manual_seed(0)
    eager = TinyVideoDiT(dim=64, heads=2).eval()
    model = torch.compile(eager, backend="modsparse", options={"min_seq_len": 64, "block_size": 32, **options})
    x = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([500.0])
    with torch.no_grad():
        got, want = model(x, ts), eager(x, ts)
    rows = modcompile.report(print_table=False)
    assert rows and all("fp8:" in r.note for r in rows), [r.note for r in rows]
    if options["policy"] == "dense":  # fp8 at density 1 instead of SDPA: close, not equal
        assert not torch.equal(got, want) and rel_l2(got, want) < 0.05


def test_benchmark_smoke(tmp_path, monkeypatch):
    """benchmarks/bench_fp8.py --smoke: the interpreter, tiny shapes, fp8 through its reference."""
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")  # the script sets both: restored after the test
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench_main(["--smoke", "--out", str(tmp_path), "--seed", "1"]) == 0
    md = (tmp_path / "bench_fp8.md").read_text()
    assert "fp8_route: reference" in md and "| video-like |" in md and "x |" in md
    assert (tmp_path / "bench_fp8.json").exists()


def test_benchmark_on_a_dits_own_activations(tmp_path, monkeypatch):
    """--checkpoint: every layer's q, k, v at the first / middle / last step, dense and top-mass lists."""
    import json

    from benchmarks.train_dit import save_checkpoint
    from benchmarks.video_dit import VideoDiT
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = VideoDiT("tiny-video")  # 256 tokens, 2 layers: 4 blocks of 64
    with torch.no_grad():  # adaLN-zero: open the branches so layer 1 sees more than the embedding
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.05)
    ckpt = save_checkpoint(tmp_path / "dit.pt", model)
    assert bench_main(["--smoke", "--out", str(tmp_path), "--seed", "1", "--checkpoint", str(ckpt),
                       "--sample-steps", "4", "--activation-density", "0.5", "--no-timing"]) == 0
    rows = [r for r in json.loads((tmp_path / "bench_fp8.json").read_text())["accuracy"] if r["input"].startswith("DiT")]
    # steps 0, 2, 3 x layers 0, 1 x (dense, half the blocks)
    assert len(rows) == 12 and {r["density"] for r in rows} == {1.0, 0.5}
    assert all(r["within_model"] and 0 < r["rel_l2"] < 0.05 and r["cosine"] > 0.99 for r in rows), rows
    dense = [r for r in rows if r["density"] == 1.0]
    # the scores' share of the error: q and k alone give less than the whole path; int8 per token less
    # than per block, int8 less than e4m3
    assert all(0 < r["qk_int8_token"] < r["qk_int8_block"] < r["qk_e4m3_block"] for r in dense), dense
    assert all(r["qk_int8_token"] < r["rel_l2"] for r in dense), dense
    assert all(r["qk_e4m3_block"] is None for r in rows if r["density"] < 1)


@pytest.mark.slow
def test_benchmark_samples_a_dit_at_fp8_and_bf16(tmp_path, monkeypatch):
    """--sample-seeds: each policy's compiled sample at fp8 against the same policy's at full precision."""
    import json

    from benchmarks.train_dit import save_checkpoint
    from benchmarks.video_dit import VideoDiT
    monkeypatch.setenv("MODCOMPILE_TUNE", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = VideoDiT("tiny-video")
    with torch.no_grad():  # adaLN-zero: open the branches and the output layer, else the sample ignores attention
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("out."):
                p.normal_(0, 0.05)
    ckpt = save_checkpoint(tmp_path / "dit.pt", model)
    assert bench_main(["--smoke", "--out", str(tmp_path), "--seed", "1", "--checkpoint", str(ckpt),
                       "--sample-steps", "4", "--sample-seeds", "2", "--activation-density", "0.5",
                       "--no-timing"]) == 0
    rows = json.loads((tmp_path / "bench_fp8.json").read_text())["samples"]
    assert [r["policy"] for r in rows] == ["dense", "mod"]
    # fp8 changes the sample (a PSNR of inf would mean fp8 never ran), but not by much on 4 steps
    assert all(20 < r["psnr_min_db"] <= r["psnr_db"] < 200 for r in rows), rows
    assert "fp8 against bf16" in (tmp_path / "bench_fp8.md").read_text()


def test_qk_only_error_grows_with_the_logits_and_int8_rounds_finer():
    from benchmarks.bench_fp8 import QK_VARIANTS, qk_only_error
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 192, 32, generator=g, dtype=torch.float64) for _ in range(3))
    errs = {kind: [qk_only_error(q * c, k * c, v, 64, kind) for c in (0.5, 2.0)] for kind in QK_VARIANTS}
    for kind, (small, large) in errs.items():
        assert 0 < small < large, (kind, errs)  # peaked attention (larger logits) amplifies score errors
    assert errs["int8_token"][1] < errs["int8_block"][1] < errs["e4m3_block"][1], errs


# ------------------------------------------------------------------------------ GPU
def _gpu_check(N, bs, density, seed, gather=False, p_empty=0.0, dtype=torch.bfloat16, D=128, structured=False,
               ref_tol=2e-3, lse_tol=1e-3):
    q, k, v = inputs(1, 2, N, D, seed=seed, dtype=dtype, structured=structured)
    lists = random_lists(1, 2, N, bs, density, seed=seed, p_empty=p_empty)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.int32) if gather else None
    out = torch.full((1, N, 2, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    out, lse = fa.block_sparse_attention_fp8(q, k, v, lists, q_rows=rows, out=out)
    ref, ref_lse = fa.block_sparse_attention_fp8_ref(q, k, v, lists, q_rows=rows)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    order = rows.long() if gather else torch.arange(N, device=DEVICE)
    exact, _ = block_sparse_attention_ref(q[:, :, order].double(), k.double(), v.double(), lists)
    low, high = fa.predicted_relative_error(q[:, :, order], k, v, lists)
    err = rel_l2(out[:, :, order], exact)
    assert low <= err <= high, f"relative L2 {err:.4f} outside [{low:.4f}, {high:.4f}]"
    assert rel_l2(out, ref) < ref_tol, f"kernel vs its fp8 reference: {rel_l2(out, ref):.4f}"
    assert (lse[~empty] - ref_lse[~empty]).abs().max() < lse_tol
    return err, cosine(out[:, :, order], exact)


@gpu
@needs_fp8_gpu
def test_gpu_quantize_kernel_is_bitwise_the_reference():
    q, k, v = inputs(2, 3, 4000, 128, seed=1, dtype=torch.bfloat16)
    rows = torch.randperm(4000, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.int32)
    _assert_operands_equal(fq.quantize(q, k, v, 128, rows), fq.quantize_ref(q, k, v, 128, rows))


@gpu
@needs_fp8_gpu
@pytest.mark.parametrize("N,bs,density,gather,p_empty", [
    (2048, 128, 1.0, False, 0.0),     # even N, density 1
    (4000, 128, 0.3, False, 0.0),     # ragged N
    (4000, 128, 0.3, True, 0.0),      # q_rows permutation
    (1000, 64, 0.5, False, 0.3),      # block 64, empty rows
])
def test_gpu_fp8_kernel(N, bs, density, gather, p_empty):
    _gpu_check(N, bs, density, seed=N + bs, gather=gather, p_empty=p_empty)


@gpu
@needs_fp8_gpu
def test_gpu_fp8_video_like_input_within_the_model():
    """Peaked attention: larger scores, larger score errors; the model still bounds them (whether
    the issue's 3% target holds is the benchmark's report, not asserted here). Kernel and reference
    differ more here (2.2% relative L2 on an H100 with the first, e4m3-score kernel, 2026-12-06):
    most probabilities of a peaked row are far below its maximum, where e4m3 is subnormal and the
    kernel's running maximum and the reference's final one round them differently, and Hopper
    accumulates fp8 products at reduced precision; the kernel stays inside the formats' error bound
    against float64."""
    _gpu_check(2048, 128, 1.0, seed=3, structured=True, ref_tol=0.05, lse_tol=0.05)


@gpu
@needs_fp8_gpu
def test_gpu_public_keyword_runs_the_fp8_kernel():
    q, k, v = inputs(1, 2, 1500, 64, seed=4, dtype=torch.bfloat16)
    lists = random_lists(1, 2, 1500, 128, 0.5, seed=4)
    out = modcompile.block_sparse_attention(q, k, v, lists, precision="fp8")
    want, _ = fa.block_sparse_attention_fp8(q, k, v, lists)
    assert torch.equal(out, want)
