"""Train the small video DiT on procedural videos with the flow-matching loss.

A few minutes on one H100 give a model whose attention is structured (local, temporal, object
heads), which is what the fidelity level needs: random weights give near-uniform attention.
"""
from __future__ import annotations

import contextlib
import math
import statistics
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
def validation_loss(model, cfg, *, num_videos: int = 16, batch: int = 8, seed: int = 12345, device="cpu",
                    train_module=None) -> float:
    """Flow-matching loss on a fixed held-out set with fixed noise and times (comparable across runs).
    ``model`` may be a compiled wrapper; ``train_module`` is the module whose mode is switched."""
    train_module = train_module if train_module is not None else model
    train_module.eval()
    total, count = 0.0, 0
    for start in range(0, num_videos, batch):
        n = min(batch, num_videos - start)
        x0 = generate_videos(n, seed=seed, start=start, device=device, **_video_kwargs(cfg))
        g = torch.Generator(device=device).manual_seed(seed + start)
        with _autocast(device):
            loss = flow_matching_loss(model, x0, generator=g, text=_text_tokens(cfg, n, seed, device))
        total += float(loss) * n
        count += n
    train_module.train()
    return total / count


def _autocast(device):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(config="small", *, steps: int | None = None, minutes: float | None = None, batch_size: int = 16,
          lr: float = 3e-4, weight_decay: float = 0.01, warmup: int = 100, seed: int = 0, device=None,
          out: str | Path | None = None, val_every: int = 200, compile_model: bool = False,
          sparse_options: dict | None = None, show_progress: bool = True) -> dict:
    """Train for ``steps`` optimizer steps or ``minutes`` of wall time (whichever ends first).

    Data, noise and flow times depend only on ``seed`` and the step, so two runs see the same
    batches. ``sparse_options``: train through ``torch.compile(backend="modsparse")`` with these
    options (validation then runs the same compiled, sparse model). Returns a dict with the model,
    history, final validation loss and per-step times; saves a checkpoint to ``out``."""
    if steps is None and minutes is None:
        raise ValueError("train: give steps or minutes")
    device = device or default_device()
    cfg = get_config(config)
    torch.manual_seed(seed)
    model = VideoDiT(cfg).to(device)
    if sparse_options is not None:
        import modcompile
        step_fn = torch.compile(model, backend="modsparse", options=sparse_options)
        # no denoising schedule in training: one explicit "step" (no host read of the timesteps)
        step_context = lambda: modcompile.denoising_step(0, 1)  # noqa: E731
    else:
        step_fn = torch.compile(model) if compile_model else model
        step_context = contextlib.nullcontext
    eval_fn = step_fn if sparse_options is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    budget_s = None if minutes is None else minutes * 60.0
    max_steps = steps if steps is not None else 10 ** 9
    history, step_ms, t0 = [], [], time.time()
    def validate():
        with step_context():
            return validation_loss(eval_fn, cfg, device=device, train_module=model)

    val0 = validate()
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
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        ts = time.perf_counter()
        with _autocast(device), step_context():
            loss = flow_matching_loss(step_fn, x0, generator=g, text=_text_tokens(cfg, batch_size, seed + 1, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()  # per-step times for the dense/sparse comparison
        step_ms.append((time.perf_counter() - ts) * 1e3)
        step += 1
        if step % val_every == 0:
            val = validate()
            history.append({"step": step, "train_loss": loss.item(), "val_loss": val, "elapsed_s": time.time() - t0})
            log(f"step {step}: train {loss.item():.4f} val {val:.4f} ({time.time() - t0:.0f}s)")
    val = validate()
    history.append({"step": step, "val_loss": val, "elapsed_s": time.time() - t0})
    log(f"done: {step} steps in {time.time() - t0:.0f}s, val loss {val0:.4f} -> {val:.4f}")
    result = {"model": model, "config": cfg, "history": history, "steps": step, "val_loss": val,
              "val_loss_init": val0, "step_ms": step_ms}
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


def attention_fwd_bwd_ms(cfg, batch: int, density: float, block_size: int, device) -> dict:
    """Dense SDPA vs block-sparse (random lists at ``density``) forward+backward at the model's
    attention shape, bf16: what the sparse run's attention costs, apart from the rest of a step."""
    import torch.nn.functional as F

    import modcompile
    from .common import bench, bnhd_randn, random_block_lists

    shape = (batch, cfg.heads, cfg.seq_len, cfg.head_dim)
    q, k, v, do = (t.requires_grad_(i < 3) for i, t in enumerate(bnhd_randn(shape, torch.bfloat16, device, 7, n=4)))
    counts, indices, eff = random_block_lists(*shape[:3], density, device, 8, block_size)

    def dense():
        F.scaled_dot_product_attention(q, k, v).backward(do)

    def sparse():
        modcompile.block_sparse_attention(q, k, v, counts, indices, block_size=block_size,
                                          validate=False).backward(do)
    d, s = bench(dense, device=str(device)), bench(sparse, device=str(device))
    return {"dense_ms": d["ms"], "sparse_ms": s["ms"], "list_density": eff, "method": d["method"]}


def compare(args, dense_res: dict, out_dir: Path) -> dict:
    """Train the same model through ``backend="modsparse"`` with ``args.compare`` for as many steps
    as the dense run took, same data and seeds; loss curves, step times, final validation loss."""
    import modcompile
    from .common import pyplot, write_results

    options = {"policy": args.compare, "warmup_steps": 0, "block_size": args.block_size,
               "min_seq_len": 2 * args.block_size}
    modcompile.reset(forget_sites=True)
    sparse_res = train(args.config, steps=dense_res["steps"], batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, val_every=args.val_every, sparse_options=options,
                       show_progress=not args.no_progress)
    densities = [float(r.density) for r in modcompile.report(print_table=False) if r.density is not None]
    density = sum(densities) / len(densities) if densities else 1.0
    skip = min(10, max(len(dense_res["step_ms"]) - 1, 0))  # compile and tuning steps
    rows = []
    for name, res in (("dense (inductor)", dense_res), (f"modsparse {args.compare}", sparse_res)):
        rows.append({"run": name, "steps": res["steps"], "step_ms": statistics.median(res["step_ms"][skip:]),
                     "val_loss_init": res["val_loss_init"], "val_loss": res["val_loss"]})
    rows[1]["step_speedup"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    rows[1]["val_loss_vs_dense"] = rows[1]["val_loss"] / rows[0]["val_loss"] - 1.0
    cfg = dense_res["config"]
    notes = [f"same batches, noise and flow times in both runs; {args.compare} options {options}; "
             f"mean block density of the sparse run's last step {density:.3f}",
             "validation: the sparse run is evaluated through its compiled sparse model",
             f"step_ms: median over steps after the first {skip} (compile, tuning)"]
    if str(args.device or default_device()).startswith("cuda"):
        attn = attention_fwd_bwd_ms(cfg, args.batch_size, density, args.block_size, "cuda")
        rows[1]["attention_speedup"] = attn["dense_ms"] / attn["sparse_ms"]
        notes.append(f"attention fwd+bwd at ({args.batch_size},{cfg.heads},{cfg.seq_len},{cfg.head_dim}) bf16: "
                     f"dense SDPA {attn['dense_ms']:.3f} ms vs block-sparse {attn['sparse_ms']:.3f} ms "
                     f"(random lists at density {attn['list_density']:.3f}; {attn['method']})")
    payload = write_results(out_dir, "train_compare", f"Training dense vs modsparse {args.compare}", rows,
                            columns=["run", "steps", "step_ms", "step_speedup", "attention_speedup",
                                     "val_loss_init", "val_loss", "val_loss_vs_dense"],
                            settings={"config": cfg.to_dict(), "options": options, "batch_size": args.batch_size,
                                      "lr": args.lr, "seed": args.seed, "density": density},
                            notes=notes, extra={"history": {"dense": dense_res["history"],
                                                            args.compare: sparse_res["history"]}})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, res in (("dense", dense_res), (args.compare, sparse_res)):
            pts = [(h["step"], h["val_loss"]) for h in res["history"]]
            ax.plot(*zip(*pts), marker="o", label=f"{name} (validation)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("flow-matching loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "train_compare_loss.png", dpi=120)
        plt.close(fig)
    return payload


def run(args) -> dict:
    """CLI entry: ``python -m benchmarks run train-dit``."""
    from .common import write_results
    out_dir = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out_dir / "dit_small.pt"
    res = train(args.config, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, out=ckpt, val_every=args.val_every,
                # --compare: the dense run is compiled too (Inductor), so step times compare like for like
                compile_model=args.compile or bool(getattr(args, "compare", None)),
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
    if getattr(args, "compare", None):
        res["compare"] = compare(args, res, out_dir)
    return res
