import os, torch
from benchmarks.train_dit import load_checkpoint
from benchmarks.video_dit import make_noise, sample
model = load_checkpoint("/tmp/dit_video_testbed.pt", "cuda").to(torch.bfloat16)
cfg = model.cfg
caps, kept = [], {}
class Stop(Exception): pass
def on_step(i):
    if i in (6, 7):
        for layer, q, k, v, _ in caps:
            if layer in (3, 5):
                kept[(i, layer)] = (q[:, :3].contiguous().cpu(), k[:, :3].contiguous().cpu())
    caps.clear()
    if i == 7: raise Stop
model.set_capture(caps)
try:
    with torch.no_grad():
        sample(model, make_noise((1, cfg.in_channels, *cfg.latent), 0, "cuda", torch.bfloat16), 30, on_step=on_step)
except Stop:
    pass
out = os.environ["OUT"]
for (i, layer), (q, k) in kept.items():
    torch.save({"q": q, "k": k}, f"{out}/s{i}_L{layer}.pt")
print(sorted(kept), cfg.latent)
