"""Train the small video DiT on procedural videos with the flow-matching loss.

A few minutes on one H100 give a model whose attention is structured (local, temporal, object
heads), which is what the fidelity level needs: random weights give near-uniform attention.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .common import default_device, environment, log, progress
from .data import generate_videos
from .video_dit import VideoDiT, flow_matching_loss, get_config


def _video_kwargs(cfg) -> dict:
    T, H, W = cfg.latent
    return dict(channels=cfg.in_channels, frames=T, height=H, width=W)


def _text_tokens(cfg, batch: int, seed: int, device) -> torch.Tensor | None:
    # No captions for procedural videos: fixed random tokens just exercise the cross-attention path.
    if not cfg.text_len:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device)


@torch.no_grad()
def validation_loss(model, cfg, *, num_videos: int = 16, batch: int = 8, seed: int = 12345, device="cpu") -> float:
    """Flow-matching loss on a fixed held-out set with fixed noise and times (comparable across runs)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, num_videos, batch):
        n = min(batch, num_videos - start)
        x0 = generate_videos(n, seed=seed, start=start, device=device, **_video_kwargs(cfg))
        g = torch.Generator(device=device).manual_seed(seed + start)
        with _autocast(device):
            loss = flow_matching_loss(model, x0, generator=g, text=_text_tokens(cfg, n, seed, device))
        total += float(loss) * n
        count += n
    model.train()
    return total / count


def _autocast(device):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(config="small", *, steps: int | None = None, minutes: float | None = None, batch_size: int = 16,
          lr: float = 3e-4, weight_decay: float = 0.01, warmup: int = 100, seed: int = 0, device=None,
          out: str | Path | None = None, val_every: int = 200, compile_model: bool = False,
          show_progress: bool = True) -> dict:
    """Train for ``steps`` optimizer steps or ``minutes`` of wall time (whichever ends first).

    Returns a dict with the model, history and final validation loss; saves a checkpoint to ``out``."""
    if steps is None and minutes is None:
        raise ValueError("train: give steps or minutes")
    device = device or default_device()
    cfg = get_config(config)
    torch.manual_seed(seed)
    model = VideoDiT(cfg).to(device)
    step_fn = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    budget_s = None if minutes is None else minutes * 60.0
    max_steps = steps if steps is not None else 10 ** 9
    history, t0 = [], time.time()
    val0 = validation_loss(model, cfg, device=device)
    history.append({"step": 0, "val_loss": val0, "elapsed_s": 0.0})
    log(f"train {cfg.depth}L dim {cfg.dim} tokens {cfg.seq_len} on {device}: val loss at init {val0:.4f}")
    bar = progress(range(max_steps) if steps is not None else iter(int, 1), desc="train",
                   total=steps, enabled=show_progress)
    step = 0
    for _ in bar:
        elapsed = time.time() - t0
        if step >= max_steps or (budget_s is not None and elapsed >= budget_s):
            break
        frac = step / max_steps if steps is not None else elapsed / budget_s
        if budget_s is not None and steps is not None:
            frac = max(frac, elapsed / budget_s)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x0 = generate_videos(batch_size, seed=seed, start=step * batch_size, device=device, **_video_kwargs(cfg))
        with _autocast(device):
            loss = flow_matching_loss(step_fn, x0, text=_text_tokens(cfg, batch_size, seed + 1, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % val_every == 0:
            val = validation_loss(model, cfg, device=device)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": val, "elapsed_s": time.time() - t0})
            log(f"step {step}: train {loss.item():.4f} val {val:.4f} ({time.time() - t0:.0f}s)")
    val = validation_loss(model, cfg, device=device)
    history.append({"step": step, "val_loss": val, "elapsed_s": time.time() - t0})
    log(f"done: {step} steps in {time.time() - t0:.0f}s, val loss {val0:.4f} -> {val:.4f}")
    result = {"model": model, "config": cfg, "history": history, "steps": step, "val_loss": val,
              "val_loss_init": val0}
    if out is not None:
        save_checkpoint(out, model, history=history, steps=step, settings={
            "batch_size": batch_size, "lr": lr, "seed": seed, "minutes": minutes, "max_steps": steps})
    return result


def save_checkpoint(path, model, **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "environment": environment(),
                **meta}, path)
    log(f"checkpoint written: {path}")
    return path


def load_checkpoint(path, device="cpu") -> VideoDiT:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a benchmarks.train_dit checkpoint (needs 'config' and 'state_dict')")
    model = VideoDiT(get_config(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def run(args) -> dict:
    """CLI entry: ``python -m benchmarks run train-dit``."""
    from .common import write_results
    out_dir = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out_dir / "dit_small.pt"
    res = train(args.config, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, out=ckpt, val_every=args.val_every, compile_model=args.compile,
                show_progress=not args.no_progress)
    cfg = res["config"]
    rows = [dict(h) for h in res["history"]]
    write_results(out_dir, "train_dit", f"Training the {args.config} video DiT (flow matching)", rows,
                  columns=["step", "train_loss", "val_loss", "elapsed_s"],
                  settings={"config": cfg.to_dict(), "steps": args.steps, "minutes": args.minutes,
                            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                            "checkpoint": str(ckpt)},
                  notes=[f"checkpoint: {ckpt}", f"{res['steps']} steps; val loss {res['val_loss_init']:.4f} -> "
                         f"{res['val_loss']:.4f}"])
    return res
