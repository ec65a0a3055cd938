# CPU: layer 3 (3 heads) of the GPU testbed: MOD's mass-rule mask from the step-6 observation at each row stride:
# its density, predicted share and true recall at step 7, against the oracle at step 7 with as many blocks.
import math, torch
from benchmarks.metrics import block_attention_mass, mass_recall_from_mass
from benchmarks.baselines import oracle_mask
from modcompile.kernels.block_sparsity import block_sparsity_ref
from modcompile.policies.mod_mask import mass_mask
torch.set_num_threads(2)
q6, k6, q7, k7 = (torch.load(f"results/act/{n}.pt").float() for n in ("q6", "k6", "q7", "k7"))
B, H, N, D = q6.shape
bs, scale = 128, 1 / math.sqrt(D)
ex6, ex7 = block_attention_mass(q6, k6, bs), block_attention_mass(q7, k7, bs)
lse = torch.cat([torch.logsumexp(q6[:, :, r:r + 2048] @ k6.transpose(-1, -2) * scale, -1) for r in range(0, N, 2048)], 2)
eye = torch.eye(ex6.shape[-1], dtype=torch.bool).expand(H, -1, -1)
print("layer 3, heads 0-2; tv(ex6, ex7) =", round(float(0.5 * (ex6 / ex6.sum() - ex7 / ex7.sum()).abs().sum()), 3))
for stride in (1, 2, 4, 8, 16):
    est = torch.full_like(ex6, -1.0)
    block_sparsity_ref(q6, k6, lse, block_size=bs, threshold=1e-4, scale=scale, row_stride=stride, mass=est)
    e = est[0].clamp_min(0)
    tv = float(0.5 * (e / e.sum() - ex6[0] / ex6[0].sum()).abs().sum())
    line = f"stride {stride:2d} ({bs // stride:3d} rows/block): tv {tv:.3f}"
    for cov in (0.9, 0.95):
        m = mass_mask(e, eye, None, cov)
        n = int(m.sum())
        line += (f" | cov {cov}: d {n / m.numel():.3f} pred {float((e * m).sum() / e.sum()):.3f} "
                 f"recall7 {mass_recall_from_mass(ex7, m[None]):.3f} oracle7 {mass_recall_from_mass(ex7, oracle_mask(ex7, blocks=n)):.3f}")
    for d in (0.1, 0.2):
        m = mass_mask(e, eye, d, 0.9)
        line += f" | d {d}: recall7 {mass_recall_from_mass(ex7, m[None]):.3f}"
    print(line, flush=True)
for d in (0.1, 0.2):
    print(f"oracle7 @ {d}: {mass_recall_from_mass(ex7, oracle_mask(ex7, d)):.3f}")
