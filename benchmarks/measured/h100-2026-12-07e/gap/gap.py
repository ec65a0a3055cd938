# Issue 19: where does mod lose mass in layers 2-5 of the GPU testbed? On the testbed's own q, k of a dense
# sample (seed 0, 30 steps), per layer: MOD's mass-rule mask (coverage 0.9, and density 0.2) from each
# estimator of the step-6 observation, its predicted share, its true recall at step 6 and at step 7 (the
# first sparse step, where it is used), and the oracle's at step 7 with as many blocks.
# Estimators: the policy's path (Triton map kernel, cuDNN lse, stride 16), Triton with the exact lse, the
# torch reference (exact lse, stride 16), Triton at strides 4 and 1, and the exact step-6 mass.
import math, sys, torch
from benchmarks.train_dit import load_checkpoint
from benchmarks.video_dit import make_noise, sample
from benchmarks.metrics import block_attention_mass, mass_recall_from_mass
from benchmarks.baselines import oracle_mask
from modcompile import dispatch
from modcompile.policies.mod_observe import observe_map
from modcompile.policies.mod_mask import mass_mask
from modcompile.kernels.block_sparsity import block_sparsity_ref

torch.manual_seed(0)
ckpt, bs, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128, 30
dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
model = load_checkpoint(ckpt, dev).to(dtype)
cfg = model.cfg
at, captures, kept = {5, 6, 7}, [], {}


def on_step(i):
    if i in at:
        for layer, q, k, v, _ in captures:
            kept[(i, layer)] = (q.clone(), k.clone(), v.clone())
    captures.clear()


model.set_capture(captures)
with torch.no_grad():
    sample(model, make_noise((1, cfg.in_channels, *cfg.latent), 0, dev, dtype), steps, on_step=on_step)
model.set_capture(None)
print("grid", cfg.latent, "seq", cfg.seq_len, "heads", cfg.heads, "captured", sorted(kept)[:3], "...", flush=True)


def exact_lse(q, k, scale, chunk=2048):
    out = []
    for r in range(0, q.shape[2], chunk):
        out.append(torch.logsumexp(q[:, :, r:r + chunk].float() @ k.float().transpose(-1, -2) * scale, -1))
    return torch.cat(out, 2)


def tv(a, b):
    a, b = a.clamp_min(0), b.clamp_min(0)
    return float(0.5 * (a / a.sum() - b / b.sum()).abs().sum())


with torch.no_grad():
    for layer in range(cfg.depth):
        q, k, v = kept[(6, layer)]
        q7, k7, _ = kept[(7, layer)]
        scale = 1.0 / math.sqrt(q.shape[-1])
        ex6 = block_attention_mass(q, k, bs)
        ex7 = block_attention_mass(q7, k7, bs)
        lse = exact_lse(q, k, scale)
        res = dispatch.dense_attention_with_lse(q, k, v, scale)
        lse_cud = res[1] if res is not None else None
        dl = float((lse_cud - lse).abs().max()) if lse_cud is not None else float("nan")
        print(f"L{layer}: cuDNN lse vs exact max |diff| {dl:.3e}; tv(ex6, ex7) {tv(ex6, ex7):.3f}", flush=True)
        ests = {}
        common = dict(block_size=bs, threshold=1e-4, scale=scale, with_mass=True)
        if lse_cud is not None:
            ests["trit16 cudnn"] = observe_map(q, k, lse_cud, row_stride=16, **common)[1]
        ests["trit16 exact"] = observe_map(q, k, lse, row_stride=16, **common)[1]
        m = torch.full_like(ex6, -1.0)
        block_sparsity_ref(q.float(), k.float(), lse, block_size=bs, threshold=1e-4, scale=scale, row_stride=16,
                           mass=m)
        ests["ref16 exact"] = m
        ests["trit4 exact"] = observe_map(q, k, lse, row_stride=4, **common)[1]
        ests["trit1 exact"] = observe_map(q, k, lse, row_stride=1, **common)[1]
        ests["exact6"] = ex6
        H, nb = ex6.shape[1], ex6.shape[-1]
        eye = torch.eye(nb, dtype=torch.bool, device=dev).expand(H, -1, -1)
        for name, est in ests.items():
            e = est[0].clamp_min(0)
            mk = mass_mask(e, eye, None, 0.9)
            pred = float((e * mk).sum() / e.sum())
            n = int(mk.sum())
            r6, r7 = mass_recall_from_mass(ex6, mk[None]), mass_recall_from_mass(ex7, mk[None])
            o7 = mass_recall_from_mass(ex7, oracle_mask(ex7, blocks=n))
            m2 = mass_mask(e, eye, 0.2, 0.9)
            r2 = mass_recall_from_mass(ex7, m2[None])
            o2 = mass_recall_from_mass(ex7, oracle_mask(ex7, blocks=int(m2.sum())))
            print(f"  {name:13s} tv {tv(e, ex6[0]):.3f} | cov0.9: d {n / mk.numel():.3f} pred {pred:.3f} "
                  f"real6 {r6:.3f} real7 {r7:.3f} oracle7 {o7:.3f} | d0.2: real7 {r2:.3f} oracle7 {o2:.3f}",
                  flush=True)
