# CPU: does MOD's row-sampled mass estimate (every s-th row of a query block, phase 0) bias the mask?
# On a trained DiT's own q, k (captured in a dense sample), per layer: the mass rule's mask at coverage
# 0.9 from the estimate, its predicted coverage and its true recall; and at density 0.2 the recall
# of the estimate's top blocks against the oracle's.
import math, sys, torch
from benchmarks.bench_fp8 import captured_activations
from benchmarks.metrics import block_attention_mass, mass_recall_from_mass
from benchmarks.baselines import oracle_mask
from modcompile.kernels.block_sparsity import block_sparsity_ref
from modcompile.policies.mod_mask import mass_mask

ckpt = sys.argv[1]
steps = 30
cfg, kept = captured_activations(ckpt, "cpu", torch.float32, steps)
bs = 64
print("grid", cfg.latent, "seq", cfg.seq_len, "block", bs)
for step, layer, q, k, v in kept:
    scale = 1 / math.sqrt(q.shape[-1])
    s = q @ k.transpose(-1, -2) * scale
    lse = torch.logsumexp(s, -1)
    exact = block_attention_mass(q, k, bs)  # (B, H, mq, mk), rows sum to the block's query count
    exact_row = exact / exact.sum(-1, keepdim=True)
    line = f"step {step:2d} L{layer}:"
    for stride, phase in ((1, 0), (8, 0), (8, 3), (7, 0), (4, 0)):
        est = torch.full_like(exact, -1.0)
        block_sparsity_ref(q, k, lse, block_size=bs, threshold=1e-4, row_stride=stride, row_phase=phase, mass=est)
        eye = torch.eye(est.shape[-1], dtype=torch.bool).expand(est.shape[1], -1, -1)
        m = mass_mask(est[0].clamp_min(0), eye, None, 0.9)
        pred = float((est[0] * m).sum() / est[0].sum())
        real = mass_recall_from_mass(exact[0:1], m[None])
        m2 = mass_mask(est[0].clamp_min(0), eye, 0.2, 0.9)
        r2 = mass_recall_from_mass(exact[0:1], m2[None])
        line += f" s{stride}p{phase}: d {m.float().mean():.3f} pred {pred:.3f} real {real:.3f} @0.2 {r2:.3f} |"
    orc = mass_recall_from_mass(exact, oracle_mask(exact, 0.2))
    print(line + f" oracle@0.2 {orc:.3f}", flush=True)
