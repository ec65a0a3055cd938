# Experiment (not on main): the main fp8 kernel with its score product software-pipelined by one chunk
# (S of chunk t+1 issued before the softmax of chunk t), to let Hopper's async wgmma overlap the
# softmax's float work (FA3's intra-warpgroup overlap). Timed beside the main kernel, kernel only.
import math, torch, triton
import triton.language as tl
from modcompile.kernels.fwd_kernel import _chunk_start
from modcompile.kernels import fp8_attention as fa, fp8_quant as fq
from modcompile.kernels.block_lists import BlockLists
from modcompile.kernels.fp8_kernel import _fp8_attention_fwd_kernel
from modcompile import dispatch
from benchmarks.common import bnhd_randn, random_block_lists


@triton.jit
def _scores(q, k_base, kb_base, ks_base, start, offs_n, offs_d, BLOCK_D: tl.constexpr):
    k = tl.load(k_base + (start + offs_n).to(tl.int64)[None, :] * BLOCK_D + offs_d[:, None])
    s = (tl.dot(q, k, out_dtype=tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)
    return s, tl.load(ks_base + start + offs_n), tl.load(kb_base + start + offs_n)


@triton.jit
def _kern_pipe(Q8, QScale, K8, KScale, KMean, KBias, VT8, VScale, Out, Lse, Counts, Indices,
               qk_scale_log2, scale, N_Q, N_K, H, MQ, MK,
               stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
               stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im, stride_ij,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RAW_INT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    q_block = pid_m // (BLOCK_SIZE // BLOCK_M)
    CHUNKS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    NPAD_K = MK * BLOCK_SIZE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    q = tl.load(Q8 + (bh * MQ * BLOCK_SIZE + offs_m)[:, None] * BLOCK_D + offs_d[None, :])
    q_scale = tl.load(QScale + bh * MQ * BLOCK_SIZE + offs_m)
    row_scale = q_scale * qk_scale_log2
    row_scale = tl.where(row_scale == 0.0, 1.1754943508222875e-38, row_scale)
    k_base = K8 + bh * NPAD_K * BLOCK_D
    v_base = VT8 + bh * BLOCK_D * NPAD_K
    ks_base = KScale + bh * NPAD_K
    kb_base = KBias + bh * NPAD_K
    count = tl.load(Counts + b * stride_cb + h * stride_ch + q_block * stride_cm)
    idx_base = Indices + b * stride_ib + h * stride_ih + q_block * stride_im
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_steps = count * CHUNKS
    start = _chunk_start(idx_base, stride_ij, 0, BLOCK_SIZE, BLOCK_N, CHUNKS)
    s, ksc, kbi = _scores(q, k_base, kb_base, ks_base, start, offs_n, offs_d, BLOCK_D)
    for t in tl.range(0, n_steps):
        # next chunk's product first (the last step recomputes its own chunk: harmless, unused)
        start_next = _chunk_start(idx_base, stride_ij, tl.minimum(t + 1, n_steps - 1), BLOCK_SIZE, BLOCK_N, CHUNKS)
        s_next, ksc_next, kbi_next = _scores(q, k_base, kb_base, ks_base, start_next, offs_n, offs_d, BLOCK_D)
        sk = s * ksc[None, :] + kbi[None, :]
        m_new = tl.maximum(m_i, tl.math.ceil(tl.max(sk, 1) * row_scale))
        p = tl.math.exp2(sk * row_scale[:, None] - (m_new - 8.0)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_d[:, None].to(tl.int64) * NPAD_K + start + offs_n[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(v))
        m_i = m_new
        s, ksc, kbi, start = s_next, ksc_next, kbi_next, start_next
    has_keys = l_i != 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * (tl.load(VScale + bh * BLOCK_D + offs_d)[None, :] / l_safe[:, None])
    shift = tl.sum(q.to(tl.float32) * tl.load(KMean + bh * BLOCK_D + offs_d)[None, :], 1) * q_scale * scale
    lse = tl.where(has_keys, (m_i - 8.0 + tl.math.log2(l_safe)) * 0.6931471805599453 + shift, float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def launch(kern, ops, q, k, lists, out, lse, cfg, **extra):
    B, H, N, D = q.shape
    c, i = lists.counts, lists.indices
    BM, BN, nw, ns = cfg
    sc = 1 / math.sqrt(D)
    args = [ops.q, ops.q_scale, ops.k, ops.k_scale, ops.k_mean, ops.k_bias, ops.v_t, ops.v_scale, out, lse, c, i]
    if kern is _fp8_attention_fwd_kernel:
        args.append(c)  # QRows placeholder
    kern[(triton.cdiv(N, BM), B * H)](
        *args, sc * 1.4426950408889634, sc, N, k.shape[2], H, lists.mq, lists.mk,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        c.stride(0), c.stride(1), c.stride(2), i.stride(0), i.stride(1), i.stride(2), i.stride(3),
        HEAD_DIM=D, BLOCK_D=128, BLOCK_SIZE=128, BLOCK_M=BM, BLOCK_N=BN, num_warps=nw, num_stages=ns, **extra)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    main_flags = dict(GATHER_Q=False, USE_TMA=False, WARP_SPEC=False)
    variants = {"main": (_fp8_attention_fwd_kernel, (64, 128, 4, 3), main_flags),
                "pipe": (_kern_pipe, (64, 128, 4, 3), dict(RAW_INT=0)),
                "pipe/2s": (_kern_pipe, (64, 128, 4, 2), dict(RAW_INT=0)),
                "pipe128/8w": (_kern_pipe, (128, 128, 8, 2), dict(RAW_INT=0))}
    shape = (1, 2, 4096, 128)
    q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=3)
    counts, indices, _ = random_block_lists(1, 2, 4096, 0.5, "cuda", seed=4, block_size=128, full_width=True)
    lists = BlockLists(counts, indices, 128, 4096, 4096)
    ro, _ = fa.block_sparse_attention_fp8(q, k, v, lists)
    ops = fq.quantize(q, k, v, 128)
    ok = {}
    for name, (kern, cfg, extra) in variants.items():
        out = torch.empty_like(q); lse = torch.empty(q.shape[:3], device="cuda")
        try:
            launch(kern, ops, q, k, lists, out, lse, cfg, **extra)
            d = ((out.float() - ro.float()).norm() / ro.float().norm()).item()
            print(f"check {name}: vs main {d:.2e}", flush=True)
            ok[name] = d < 1e-2
        except Exception as ex:
            print(f"check {name} FAILED {type(ex).__name__}: {str(ex)[:300]}", flush=True)
    for shape, density in (((1, 12, 32760, 128), 1.0), ((1, 12, 32760, 128), 0.2), ((1, 24, 75600, 128), 0.2)):
        B, H, N, D = shape
        q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=5)
        counts, indices, eff = random_block_lists(B, H, N, density, "cuda", seed=6, block_size=128, full_width=True)
        lists = BlockLists(counts, indices, 128, N, N)
        bf = triton.testing.do_bench(lambda: dispatch.attention_forward(q, k, v, lists, 1 / math.sqrt(D)), rep=150)
        ops = fq.quantize(q, k, v, 128)
        qt = triton.testing.do_bench(lambda: fq.quantize(q, k, v, 128), rep=100)
        out = torch.empty_like(q); lse = torch.empty(q.shape[:3], device="cuda")
        line = f"| {shape} d{eff:.2f} | bf16 {bf:.3f} | quant {qt:.3f} |"
        for name, (kern, cfg, extra) in variants.items():
            if not ok.get(name):
                continue
            t = triton.testing.do_bench(lambda: launch(kern, ops, q, k, lists, out, lse, cfg, **extra), rep=150)
            line += f" {name} {t:.3f} ({bf / t:.2f}x, +q {bf / (t + qt):.2f}x) |"
        print(line, flush=True)
        del q, k, v, ops
        torch.cuda.empty_cache()
