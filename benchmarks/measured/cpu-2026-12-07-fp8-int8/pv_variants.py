"""Score / product error by format and granularity on a trained DiT's activations (CPU study; usage from the repo root:
PYTHONPATH=. python THIS CKPT)."""
import math, sys

import torch
from benchmarks.bench_fp8 import captured_activations
_, kept = captured_activations(sys.argv[1], "cpu", torch.float32, 30)
B = 64
def e4m3(x): return x.float().to(torch.float8_e4m3fn).double()
def vq(v, kind):
    n = v.shape[2]; vb = v.unflatten(2, (-1, B)); amax = vb.abs().amax(3, keepdim=True)
    if kind == "e4m3": s = amax / 448; y = e4m3(vb / s) * s
    elif kind == "int8": s = amax / 127; y = torch.round(vb / s) * s
    return y.flatten(2, 3)
print("step layer | p e4m3 | v e4m3 | v int8 | p e4m3 exact-max | p int8")
for step, layer, q, k, v in kept:
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) * 1.4426950408889634
    mx = s.amax(-1, keepdim=True)
    m = torch.ceil(mx)
    p = torch.exp2(s - m); l = p.sum(-1, keepdim=True)
    ex = (p @ v) / l
    def rel(o): return float((o - ex).norm() / ex.norm())
    pe = e4m3(p * 448) / 448
    p1 = torch.exp2(s - mx); pe1 = e4m3(p1 * 448) / 448
    pi8 = torch.round(p1 * 127) / 127
    r = [rel((pe @ v) / l), rel((p @ vq(v, "e4m3")) / l), rel((p @ vq(v, "int8")) / l),
         rel((pe1 @ v) / p1.sum(-1, keepdim=True)), rel((pi8 @ v) / p1.sum(-1, keepdim=True))]
    print(step, layer, " ".join(f"{x:.4f}" for x in r), flush=True)
