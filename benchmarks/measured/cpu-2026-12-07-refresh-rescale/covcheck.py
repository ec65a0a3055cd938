import math, torch
from benchmarks.bench_fp8 import captured_activations
from benchmarks.metrics import block_attention_mass, mass_recall_from_mass
from benchmarks.baselines import oracle_mask
from modcompile import dispatch
from modcompile.kernels.block_lists import BlockLists
from modcompile.policies.mod_observe import observed_coverage
cfg, kept = captured_activations("results/cpu/ckpt_g25.pt", "cpu", torch.float32, 30)
bs = 64
for step, layer, q, k, v in kept:
    if step != 15: continue
    scale = 1 / math.sqrt(q.shape[-1])
    mass = block_attention_mass(q, k, bs)
    m = oracle_mask(mass, 0.1)
    true = mass_recall_from_mass(mass, m)
    _, lse = dispatch.attention_forward(q, k, v, BlockLists.from_mask(m, bs, q.shape[2], k.shape[2]), scale)
    est = float(observed_coverage(q, k, lse, m, bs, scale, row_stride=8).mean())
    print(f"L{layer}: true kept share {true:.3f}, pooled-key estimate {est:.3f}")
