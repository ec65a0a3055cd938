"""Score / product error by format and granularity on a trained DiT's activations (CPU study; usage from the repo root:
PYTHONPATH=. python THIS CKPT)."""
import math, sys

import torch
from benchmarks.bench_fp8 import captured_activations

def quant(x, block, kind, per_token):
    B, H, n, D = x.shape
    if per_token:
        amax = x.abs().amax(-1, keepdim=True)
        xb = x
    else:
        xb = torch.nn.functional.pad(x, (0, 0, 0, -n % block)).unflatten(2, (-1, block))
        amax = xb.abs().amax((3, 4), keepdim=True)
    if kind == "e4m3":
        s = amax / 448.0
        y = (xb / s).nan_to_num(0.0).float().to(torch.float8_e4m3fn).double() * s
    else:
        lv = {"int8": 127.0, "int6": 31.0}[kind]
        s = amax / lv
        y = torch.round((xb / s).nan_to_num(0.0)) * s
    return y if per_token else y.flatten(2, 3)[:, :, :n]

def err(q, k, v, qq, kq, rows=1024):
    scale = 1 / math.sqrt(q.shape[-1]); e = nn = 0.0
    for r in range(0, q.shape[2], rows):
        ex = torch.softmax(q[:, :, r:r+rows] @ k.transpose(-1, -2) * scale, -1) @ v
        ap = torch.softmax(qq[:, :, r:r+rows] @ kq.transpose(-1, -2) * scale, -1) @ v
        e += float((ap - ex).square().sum()); nn += float(ex.square().sum())
    return math.sqrt(e / nn)

_, kept = captured_activations(sys.argv[1], "cpu", torch.float32, 30)
block = 64
variants = {"e4m3 blk": ("e4m3", False, False), "int8 blk": ("int8", False, False),
            "int8 q-tok": ("int8", True, False), "int8 tok": ("int8", True, True), "int6 tok": ("int6", True, True)}
print("step layer " + " | ".join(variants))
for step, layer, q, k, v in kept:
    qd, kd, vd = q.double(), k.double(), v.double()
    kb = kd - kd.mean(2, keepdim=True)
    res = []
    for name, (kind, qt, kt) in variants.items():
        res.append(err(qd, kd, vd, quant(qd, block, kind, qt), quant(kb, block, kind, kt)))
    print(step, layer, " ".join(f"{r:.4f}" for r in res), flush=True)
