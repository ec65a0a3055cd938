# Experiment (not on main): where the fp8 kernel's time goes. Variants of the int8-score / e4m3-PV kernel:
#  MAGIC: int32 scores -> float by the 1.5*2^23 bias trick (IADD, full rate) instead of I2F (quarter rate)
#  FOLD:  max on k-scaled scores, q's row scale folded into the exp2 FMA, P scaled by 256 folded into m
#  VHEAD: v scale per (head, channel) over all tokens -> acc accumulated by the dot, scale at the end
#  POLY:  half the exps by a degree-3 polynomial on the FMA pipe (MUFU relief)
import math, sys, time, torch, triton
import triton.language as tl
from modcompile.kernels.fwd_kernel import _chunk_start
from modcompile.kernels import fp8_attention as fa
from modcompile.kernels import fp8_quant as fq
from modcompile.kernels.block_lists import BlockLists
from modcompile import dispatch
from benchmarks.common import bnhd_randn, random_block_lists

MAGIC_F = 12582912.0  # 1.5 * 2^23
MAGIC_I = 0x4B400000


@triton.jit
def _exp2_poly(x):
    # 2^x for x <= 0: n = round(x) by the bias trick, f in [-0.5, 0.5], cubic for 2^f, exponent bits added
    y = x + 12582912.0
    n = y - 12582912.0
    f = x - n
    p = 0.0555041086648216 * f + 0.2402265069591007
    p = p * f + 0.6931471805599453
    p = p * f + 1.0
    ni = y.to(tl.int32, bitcast=True) - 0x4B400000
    ni = tl.maximum(ni, -126)
    return (p.to(tl.int32, bitcast=True) + (ni << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _kern(Q8, QScale, K8, KScale, KMean, VT8, VScale, Out, Lse, Counts, Indices,
          qk_scale_log2, scale, N_Q, N_K, H, MQ, MK,
          stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
          stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im, stride_ij,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          MAGIC: tl.constexpr, FOLD: tl.constexpr, VHEAD: tl.constexpr, POLY: tl.constexpr,
          WS0: tl.constexpr = False, MASK: tl.constexpr = False):
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
    k_base = K8 + bh * NPAD_K * BLOCK_D
    v_base = VT8 + bh * BLOCK_D * NPAD_K
    ks_base = KScale + bh * NPAD_K
    count = tl.load(Counts + b * stride_cb + h * stride_ch + q_block * stride_cm)
    idx_base = Indices + b * stride_ib + h * stride_ih + q_block * stride_im
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in tl.range(0, count * CHUNKS, warp_specialize=False if WS0 else None):
        start = _chunk_start(idx_base, stride_ij, t, BLOCK_SIZE, BLOCK_N, CHUNKS)
        key_block = start // BLOCK_SIZE
        k = tl.load(k_base + (start + offs_n).to(tl.int64)[None, :] * BLOCK_D + offs_d[:, None])
        k_scale = tl.load(ks_base + start + offs_n)
        si = tl.dot(q, k, out_dtype=tl.int32)
        if MAGIC:
            sf = (si + 0x4B400000).to(tl.float32, bitcast=True)
            if FOLD:
                bias = -12582912.0 * k_scale
                if MASK:
                    bias = tl.where(start + offs_n < N_K, bias, float("-inf"))
                tk = sf * k_scale[None, :] + bias[None, :]  # exact: k_scale has 22 bits
            else:
                tk = (sf - 12582912.0) * k_scale[None, :]
        else:
            tk = si.to(tl.float32) * k_scale[None, :]
        if FOLD:
            m_new = tl.maximum(m_i, tl.math.ceil(tl.max(tk, 1) * row_scale))
            arg = tk * row_scale[:, None] - (m_new - 8.0)[:, None]  # p * 256 = exp2(s - m + 8)
        else:
            s = tk * row_scale[:, None]
            m_new = tl.maximum(m_i, tl.math.ceil(tl.max(s, 1)))
            arg = s - m_new[:, None]
        if POLY:
            a3 = tl.reshape(arg, (BLOCK_M, BLOCK_N // 2, 2))
            a_lo, a_hi = tl.split(a3)
            p = tl.reshape(tl.join(tl.math.exp2(a_lo), _exp2_poly(a_hi)), (BLOCK_M, BLOCK_N))
        else:
            p = tl.math.exp2(arg)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_d[:, None].to(tl.int64) * NPAD_K + start + offs_n[None, :])
        if FOLD:
            p8 = p.to(tl.float8e4nv)
        else:
            p8 = (p * 448.0).to(tl.float8e4nv)
        if VHEAD == 2:  # precise: the chunk's own dot, then one FMA per accumulator element
            acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(v))
        elif VHEAD:
            acc = tl.dot(p8, tl.trans(v), acc * alpha[:, None])
        else:
            v_scale = tl.load(VScale + bh * MK * BLOCK_D + key_block * BLOCK_D + offs_d)
            acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(v)) * v_scale[None, :]
        m_i = m_new
    has_keys = l_i != 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    if VHEAD:
        acc = acc * tl.load(VScale + bh * BLOCK_D + offs_d)[None, :]
    if FOLD:
        out = acc / l_safe[:, None]
        lse_l = m_i - 8.0 + tl.math.log2(l_safe)
    else:
        out = acc / (l_safe * 448.0)[:, None]
        lse_l = m_i + tl.math.log2(l_safe)
    shift = tl.sum(q.to(tl.float32) * tl.load(KMean + bh * BLOCK_D + offs_d)[None, :], 1) * q_scale * scale
    lse = tl.where(has_keys, lse_l * 0.6931471805599453 + shift, float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def prep(q, k, v, bs, vhead):
    ops = fq.quantize(q, k, v, bs)
    # k scale rounded up to 22 significant bits (3 * scale * 2^22 exact); q8/k8 stay as quantized (the
    # experiment only needs the arithmetic; the error check below is against float64 attention)
    bits = ops.k_scale.view(torch.int32)
    ks = ((bits + 3) & ~3).view(torch.float32)
    vs = ops.v_scale
    vt = ops.v_t
    if vhead:
        B, H, N, D = v.shape
        amax = v.float().abs().amax(2)  # (B, H, D)
        vs = amax / 448.0
        vp = torch.zeros(B, H, vt.shape[3], D, device=v.device)
        vp[:, :, :N] = v.float() / vs[:, :, None, :].clamp_min(1e-30)
        vt = vp.to(fq.FP8).transpose(2, 3).contiguous()
    return ops, ks, vs, vt


def run(q, k, v, lists, cfg, flags, pre=None, out=None, lse=None):
    B, H, N, D = q.shape
    bs = lists.block_size
    ops, ks, vs, vt = pre if pre is not None else prep(q, k, v, bs, flags["VHEAD"])
    if out is None:
        out = q.new_empty(B, N, H, D).transpose(1, 2)
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    sc = 1 / math.sqrt(D)
    c, i = lists.counts, lists.indices
    BM, BN, nw, ns = cfg
    _kern[(triton.cdiv(N, BM), B * H)](
        ops.q, ops.q_scale, ops.k, ks, ops.k_mean, vt, vs, out, lse, c, i,
        sc * 1.4426950408889634, sc, N, k.shape[2], H, lists.mq, lists.mk,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        c.stride(0), c.stride(1), c.stride(2), i.stride(0), i.stride(1), i.stride(2), i.stride(3),
        HEAD_DIM=D, BLOCK_D=128, BLOCK_SIZE=bs, BLOCK_M=BM, BLOCK_N=BN, num_warps=nw, num_stages=ns, **flags)
    return out, lse


def ref64(q, k, v, lists):
    from modcompile.kernels.reference import block_sparse_attention_ref
    o, l = block_sparse_attention_ref(q.double(), k.double(), v.double(), lists)
    return o, l


def ncu_mode(name):
    shape = (1, 12, 32760, 128)
    B, H, N, D = shape
    q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=5)
    counts, indices, eff = random_block_lists(B, H, N, 1.0, "cuda", seed=6, block_size=128, full_width=True)
    lists = BlockLists(counts, indices, 128, N, N)
    for _ in range(3):
        if name == "bf16":
            dispatch.attention_forward(q, k, v, lists, 1 / math.sqrt(D))
        else:
            run(q, k, v, lists, (64, 128, 4, 3), VARIANTS[name])
    torch.cuda.synchronize()


VARIANTS = {"base": dict(MAGIC=0, FOLD=0, VHEAD=0, POLY=0), "magic+fold": dict(MAGIC=1, FOLD=1, VHEAD=0, POLY=0),
            "magic+fold+vhead": dict(MAGIC=1, FOLD=1, VHEAD=1, POLY=0)}

if __name__ == "__main__" and len(sys.argv) > 1:
    ncu_mode(sys.argv[1])
elif __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    V = {}
    for name, f in (("base", dict(MAGIC=0, FOLD=0, VHEAD=0, POLY=0)),
                    ("magic", dict(MAGIC=1, FOLD=0, VHEAD=0, POLY=0)),
                    ("magic+fold", dict(MAGIC=1, FOLD=1, VHEAD=0, POLY=0)),
                    ("magic+fold+vhead", dict(MAGIC=1, FOLD=1, VHEAD=1, POLY=0)),
                    ("magic+fold+vhead2", dict(MAGIC=1, FOLD=1, VHEAD=2, POLY=0)),
                    ("magic+fold+ws0", dict(MAGIC=1, FOLD=1, VHEAD=0, POLY=0, WS0=True)),
                    ("magic+fold+mask", dict(MAGIC=1, FOLD=1, VHEAD=0, POLY=0, MASK=True)),
                    ):
        V[name] = f
    CFGS = [(64, 128, 4, 3), (128, 128, 8, 3)]
    # correctness vs float64 (random, density 0.4) and vs the current kernel
    shape = (1, 2, 2048, 128)
    q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=3)
    counts, indices, _ = random_block_lists(1, 2, 2048, 0.4, "cuda", seed=4, block_size=128, full_width=True)
    lists = BlockLists(counts, indices, 128, 2048, 2048)
    ro, rl = ref64(q, k, v, lists)
    co, cl = fa.block_sparse_attention_fp8(q, k, v, lists)
    print(f"current kernel: rel {((co.double()-ro).norm()/ro.norm()).item():.2e} lse {(cl.double()-rl).abs().max().item():.2e}")
    good = {}
    for name, f in V.items():
        if name not in ("magic+fold", "magic+fold+vhead", "magic+fold+vhead2"):
            continue
        for cfg in CFGS[:1]:
            try:
                o, l = run(q, k, v, lists, cfg, f)
                e = ((o.double() - ro).norm() / ro.norm()).item()
                le = (l.double() - rl).abs().max().item()
                dc = ((o.float() - co.float()).norm() / co.float().norm()).item()
                print(f"check {name} {cfg}: rel {e:.2e} lse {le:.2e} vs current {dc:.2e}", flush=True)
                good[(name, cfg)] = e < 0.06 and le < 0.05
            except Exception as ex:
                print(f"check {name} {cfg} FAILED {type(ex).__name__}: {str(ex)[:400]}", flush=True)
    # long rows: the accumulation over 256 chunks (imprecise fp8 accumulation in the dot for vhead)
    shape = (1, 2, 32760, 128)
    q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=7)
    counts, indices, _ = random_block_lists(1, 2, 32760, 1.0, "cuda", seed=8, block_size=128, full_width=True)
    lists = BlockLists(counts, indices, 128, 32760, 32760)
    ro, rl = ref64(q, k, v, lists)
    v2 = v + 0.5  # a common offset: the sum of many same-sign products
    ro2, _ = ref64(q, k, v2, lists)
    for name in ("magic+fold", "magic+fold+vhead", "magic+fold+vhead2"):
        if not any(n == name and ok for (n, _), ok in good.items()):
            continue
        o, l = run(q, k, v, lists, CFGS[0], V[name])
        o2, _ = run(q, k, v2, lists, CFGS[0], V[name])
        e = ((o.double() - ro).norm() / ro.norm()).item()
        e2 = ((o2.double() - ro2).norm() / ro2.norm()).item()
        print(f"long {name}: rel {e:.3e}  v+0.5 rel {e2:.3e}  lse {(l.double() - rl).abs().max().item():.2e}", flush=True)
    del q, k, v, v2, ro, ro2
    res = []
    for shape, density in (((1, 12, 32760, 128), 1.0), ((1, 12, 32760, 128), 0.2), ((1, 24, 75600, 128), 0.2), ((1, 24, 75600, 128), 1.0)):
        B, H, N, D = shape
        q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=5)
        counts, indices, eff = random_block_lists(B, H, N, density, "cuda", seed=6, block_size=128, full_width=True)
        lists = BlockLists(counts, indices, 128, N, N)
        bf = triton.testing.do_bench(lambda: dispatch.attention_forward(q, k, v, lists, 1 / math.sqrt(D)), rep=150)
        cur = triton.testing.do_bench(lambda: fa.block_sparse_attention_fp8(q, k, v, lists), rep=150)
        qt = triton.testing.do_bench(lambda: fq.quantize(q, k, v, 128), rep=100)
        pre_ops = fq.quantize(q, k, v, 128)
        orig = fa.quantize
        fa.quantize = lambda *a, **kw: pre_ops
        curk = triton.testing.do_bench(lambda: fa.block_sparse_attention_fp8(q, k, v, lists), rep=150)
        fa.quantize = orig
        line = f"| {shape} d{eff:.2f} | bf16 {bf:.3f} | cur {cur:.3f} ({bf/cur:.2f}x) | cur kernel only {curk:.3f} | quant {qt:.3f} |"
        for (name, cfg), ok in good.items():
            if not ok:
                continue
            pre = prep(q, k, v, 128, V[name]["VHEAD"])
            out = q.new_empty(B, N, H, D).transpose(1, 2)
            lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
            t = triton.testing.do_bench(lambda: run(q, k, v, lists, cfg, V[name], pre, out, lse), rep=150)
            tq = t + qt
            line += f" {name}{cfg[0]}/{cfg[2]}w{cfg[3]}s {t:.3f} (+q {bf/tq:.2f}x) |"
            res.append((shape, eff, name, cfg, t, bf, qt))
        print(line, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print("\nSUMMARY kernel-only speedup vs bf16 (and with quant)")
    for shape, eff, name, cfg, t, bf, qt in res:
        print(f"{str(shape):22s} {eff:.2f} {name:24s} {str(cfg):18s} {bf/t:.2f}x  with quant {bf/(t+qt):.2f}x")
