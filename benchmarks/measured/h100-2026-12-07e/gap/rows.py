# CPU: layer 3 (3 heads) of the GPU testbed at steps 6 and 7: how do the rows of a query block differ?
import math, torch
from benchmarks.metrics import block_attention_mass, mass_recall_from_mass
from modcompile.kernels.block_sparsity import block_sparsity_ref
torch.set_num_threads(2)
q6, k6, q7, k7 = (torch.load(f"results/act/{n}.pt").float() for n in ("q6", "k6", "q7", "k7"))
B, H, N, D = q6.shape
bs, nb, scale = 128, N // 128, 1 / math.sqrt(D)
# per-row key-block mass for a few query blocks
for qb in (40, 200):
    rows = slice(qb * bs, (qb + 1) * bs)
    p = torch.softmax(q6[:, :, rows] @ k6.transpose(-1, -2) * scale, -1)        # (1,H,128,N)
    pm = p.view(B, H, bs, nb, bs).sum(-1)                                       # (1,H,128,nb)
    mean = pm.mean(2, keepdim=True)
    tvr = 0.5 * (pm - mean).abs().sum(-1)                                        # (1,H,128)
    top = pm.max(-1)
    print(f"qblock {qb}: per-row TV to the block mean, heads: {[round(float(t), 3) for t in tvr[0].mean(-1)]}")
    for h in range(H):
        print(f"  head {h} row offsets 0..127 step 8 TV:", [round(float(t), 2) for t in tvr[0, h, ::8]])
        print(f"  head {h} argmax key block per row (every 8th):", top.indices[0, h, ::8].tolist())
        print(f"  head {h} max block share per row (every 8th):", [round(float(t), 2) for t in top.values[0, h, ::8]])
        # own token probability and own-block share
        own = torch.diagonal(p[0, h, :, qb * bs:(qb + 1) * bs]).mean()
        print(f"  head {h} mean p(own token) {float(own):.3f}, own block share {float(pm[0, h, :, qb].mean()):.3f}")
