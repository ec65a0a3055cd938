# fp8 kernel launch configs: correctness against the fp8 torch reference, then do_bench medians vs the bf16 kernel
import math, time, torch, triton
from modcompile import dispatch
from modcompile.kernels import fp8_attention as fa
from modcompile.kernels.tuning import LaunchConfig
from modcompile.kernels.block_lists import BlockLists
from benchmarks.common import bnhd_randn, random_block_lists
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
L = LaunchConfig
CONFIGS = [L(128, 128, 8, 3), L(128, 128, 8, 3, warp_spec=True), L(128, 128, 8, 3, tma=True),
           L(128, 128, 8, 3, tma=True, warp_spec=True), L(128, 128, 8, 2), L(128, 128, 8, 4), L(128, 64, 8, 3),
           L(128, 64, 8, 3, tma=True, warp_spec=True), L(128, 128, 4, 3), L(64, 128, 4, 3), L(64, 64, 4, 3),
           L(128, 128, 8, 2, tma=True, warp_spec=True), L(128, 128, 8, 4, tma=True, warp_spec=True)]
# correctness: (1, 2, 2048, 128) and a ragged (1, 2, 1000, 64), random lists
checks = []
for shape, bs in (((1, 2, 2048, 128), 128), ((1, 2, 1000, 64), 64)):
    q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=3)
    counts, indices, _ = random_block_lists(shape[0], shape[1], shape[2], 0.4, "cuda", seed=4, block_size=bs, full_width=True)
    lists = BlockLists(counts, indices, bs, shape[2], shape[2])
    ref, ref_l = fa.block_sparse_attention_fp8_ref(q, k, v, lists)
    checks.append((shape, bs, q, k, v, lists, ref.float(), ref_l))
ok = {}
for cfg in CONFIGS:
    errs = []
    try:
        for shape, bs, q, k, v, lists, ref, ref_l in checks:
            if not cfg.fits(bs):
                continue
            o, l = fa.block_sparse_attention_fp8(q, k, v, lists, config=cfg)
            errs.append(((o.float() - ref).norm() / ref.norm()).item())
            errs.append((l - ref_l).abs().max().item())
        ok[cfg.label()] = max(errs)
        print(f"check {cfg.label()}: max rel/lse err {max(errs):.2e}", flush=True)
    except Exception as e:
        print(f"check {cfg.label()} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
rows = []
for shape, density in (((1, 12, 32760, 128), 1.0), ((1, 12, 32760, 128), 0.2), ((1, 24, 75600, 128), 0.2), ((1, 24, 75600, 128), 1.0)):
    B, H, N, D = shape
    q, k, v = bnhd_randn(shape, torch.bfloat16, "cuda", seed=5)
    scale = 1 / math.sqrt(D)
    counts, indices, eff = random_block_lists(B, H, N, density, "cuda", seed=6, block_size=128, full_width=True)
    lists = BlockLists(counts, indices, 128, N, N)
    bf = triton.testing.do_bench(lambda: dispatch.attention_forward(q, k, v, lists, scale), rep=150)
    line = f"| {shape} | {eff:.2f} | bf16 {bf:.3f} |"
    for cfg in CONFIGS:
        if cfg.label() not in ok:
            continue
        t = triton.testing.do_bench(lambda: fa.block_sparse_attention_fp8(q, k, v, lists, config=cfg), rep=150)
        line += f" {cfg.label()} {t:.3f} ({bf / t:.2f}x) |"
    print(line, flush=True)
    torch.cuda.empty_cache()
