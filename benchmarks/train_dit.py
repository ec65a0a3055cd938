"""Train the small video DiT on procedural videos with the flow-matching loss.

A few minutes on one GPU give a model whose attention is structured (local, temporal, object
heads), which is what the fidelity level needs: random weights give near-uniform attention.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from pathlib import Path

import torch

from .common import autocast, default_device, environment, log, progress
from .data import generate_videos, text_tokens, video_kwargs
from .video_dit import VideoDiT, flow_matching_loss, get_config


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
        x0 = generate_videos(n, seed=seed, start=start, device=device, **video_kwargs(cfg))
        g = torch.Generator(device=device).manual_seed(seed + start)
        with autocast(device):
            loss = flow_matching_loss(model, x0, generator=g, text=text_tokens(cfg, n, seed, device))
        total += float(loss) * n
        count += n
    train_module.train()
    return total / count


def build_model(config, *, seed: int = 0, device=None, compile_model: bool = False,
                sparse_options: dict | None = None) -> dict:
    """The model and how a training step calls it: ``{"model", "cfg", "step_fn", "eval_fn",
    "step_context"}``. Built once and reused by runs that continue from a snapshot (no recompile)."""
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
    return {"model": model, "cfg": cfg, "step_fn": step_fn, "eval_fn": eval_fn, "step_context": step_context,
            "sparse": sparse_options is not None, "device": device,
            "init": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def snapshot(model, opt, step: int) -> dict:
    """Model and optimizer state at the start of ``step`` (copies on the model's device)."""
    return {"step": step, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict())}


def train(config="small", *, steps: int | None = None, minutes: float | None = None, batch_size: int = 16,
          lr: float = 3e-4, weight_decay: float = 0.01, warmup: int = 100, seed: int = 0, device=None,
          out: str | Path | None = None, val_every: int = 200, compile_model: bool = False,
          sparse_options: dict | None = None, show_progress: bool = True, run: dict | None = None,
          start: dict | None = None, snapshot_steps=(), on_validate=None, init: dict | None = None) -> dict:
    """Train for ``steps`` optimizer steps or ``minutes`` of wall time (whichever ends first).

    Data, noise and flow times depend only on ``seed`` and the step, so two runs see the same
    batches; with ``steps`` the learning-rate schedule depends only on the step too (with
    ``minutes`` alone it follows the wall clock, compile time included). ``sparse_options``: train
    through ``torch.compile(backend="modsparse")`` with these options (validation then runs the same
    compiled, sparse model). ``run``: a :func:`build_model` result to reuse (its model is
    overwritten by ``start`` or re-initialised). ``start``: a :func:`snapshot` of a run with the same
    settings; training continues from its step. ``init``: a state dict to start from instead of the
    initial weights (fine-tuning a checkpoint: fresh optimizer, the schedule from step 0).
    ``snapshot_steps``: steps whose starting state is
    returned in ``result["snapshots"]``. ``on_validate(step)`` runs before each validation (e.g. to
    read the policy's density). Returns the model, history, train losses, final validation loss and
    per-step times; saves a checkpoint to ``out``."""
    if steps is None and minutes is None:
        raise ValueError("train: give steps or minutes")
    if run is None:
        run = build_model(config, seed=seed, device=device, compile_model=compile_model,
                          sparse_options=sparse_options)
    model, cfg, step_fn, device = run["model"], run["cfg"], run["step_fn"], run["device"]
    eval_fn, step_context = run["eval_fn"], run["step_context"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        first = start["step"]
    else:  # a reused run starts from the same initial weights again
        model.load_state_dict(run["init"] if init is None else init)
    budget_s = None if minutes is None else minutes * 60.0
    max_steps = steps if steps is not None else 10 ** 9
    val_batch = min(batch_size, 8)  # = the training batch for small batches: one shape, one graph
    history, step_ms, train_losses, snapshots, t0 = [], [], [], {}, time.time()

    def validate(step):
        if on_validate is not None:
            on_validate(step)
        with step_context():
            return validation_loss(eval_fn, cfg, batch=val_batch, device=device, train_module=model)

    val0 = validate(first)
    history.append({"step": first, "val_loss": val0, "elapsed_s": 0.0})
    log(f"train {cfg.depth}L dim {cfg.dim} tokens {cfg.seq_len} on {device}{' (modsparse)' if run['sparse'] else ''}"
        f" from step {first}: val loss {val0:.4f}")
    bar = progress(range(first, max_steps) if steps is not None else iter(int, 1), desc="train",
                   total=None if steps is None else steps - first, enabled=show_progress)
    step = first
    for _ in bar:
        elapsed = time.time() - t0
        if step >= max_steps or (budget_s is not None and elapsed >= budget_s):
            break
        if step in snapshot_steps:
            snapshots[step] = snapshot(model, opt, step)
        frac = step / max_steps if steps is not None else elapsed / budget_s
        if budget_s is not None and steps is not None:
            frac = max(frac, elapsed / budget_s)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x0 = generate_videos(batch_size, seed=seed, start=step * batch_size, device=device, **video_kwargs(cfg))
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        ts = time.perf_counter()
        with autocast(device), step_context():
            loss = flow_matching_loss(step_fn, x0, generator=g, text=text_tokens(cfg, batch_size, seed + 1, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()  # per-step times for the dense/sparse comparison
        step_ms.append((time.perf_counter() - ts) * 1e3)
        train_losses.append(loss.item())
        step += 1
        if step % val_every == 0 and step < max_steps:
            val = validate(step)
            history.append({"step": step, "train_loss": train_losses[-1], "val_loss": val,
                            "elapsed_s": time.time() - t0})
            log(f"step {step}: train {train_losses[-1]:.4f} val {val:.4f} ({time.time() - t0:.0f}s)")
    val = validate(step)
    history.append({"step": step, "val_loss": val, "elapsed_s": time.time() - t0})
    log(f"done: steps {first}-{step} in {time.time() - t0:.0f}s, val loss {val0:.4f} -> {val:.4f}")
    result = {"model": model, "config": cfg, "history": history, "steps": step, "first_step": first,
              "val_loss": val, "val_loss_init": val0, "step_ms": step_ms, "train_losses": train_losses,
              "snapshots": snapshots}
    if out is not None:
        save_checkpoint(out, model, history=history, steps=step, settings={
            "batch_size": batch_size, "lr": lr, "seed": seed, "minutes": minutes, "max_steps": steps})
    return result


def finetune(args, out_dir: Path) -> dict:
    """``train-dit --init CKPT [--sparse POLICY --options JSON]``: continue training a checkpoint (its
    config; fresh optimizer and schedule, the same data stream), through ``backend="modsparse"`` with
    POLICY when given (sparse fine-tuning: VMoBA's training path), and save the result."""
    from .common import write_results
    from .video_dit import kernel_block_size
    base = torch.load(args.init, map_location="cpu", weights_only=False)
    cfg = get_config(base["config"])
    options = None
    if args.sparse:
        cuda = str(args.device or default_device()).startswith("cuda")
        bs = args.block_size or kernel_block_size(cfg.seq_len, cuda)
        options = {"policy": args.sparse, "warmup_steps": 0, "block_size": bs, "min_seq_len": 2 * bs,
                   "video_grid": tuple(cfg.grid), **(args.options or {})}
    ckpt = Path(args.checkpoint) if args.checkpoint else out_dir / f"{Path(args.init).stem}_finetuned.pt"
    res = train(cfg, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, out=ckpt, val_every=args.val_every, device=args.device,
                compile_model=args.compile, sparse_options=options, init=base["state_dict"],
                show_progress=not args.no_progress)
    if options is not None:
        _check_sparse_sites(f"fine-tuning with {args.sparse}")
    write_results(out_dir, "train_dit", f"Fine-tuning {args.init}" + (f" through modsparse {options}" if options else ""),
                  [dict(h) for h in res["history"]], columns=["step", "train_loss", "val_loss", "elapsed_s"],
                  settings={"init": str(args.init), "sparse_options": options, "steps": args.steps,
                            "minutes": args.minutes, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                            "checkpoint": str(ckpt)},
                  notes=[f"checkpoint: {ckpt}", f"{res['steps']} steps; val loss {res['val_loss_init']:.4f} -> "
                         f"{res['val_loss']:.4f}" + (" (both through the sparse model)" if options else "")])
    return res


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
    attention shape, bf16: the kernels alone on evenly spread lists (the policy's real lists are
    timed per layer by :mod:`benchmarks.train_attention`)."""
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


SKIP_STEPS = 10  # compile and tuning steps left out of the step-time medians


def _median_ms(res) -> float:
    times = res["step_ms"]
    skip = min(SKIP_STEPS, max(len(times) - 1, 0))
    return statistics.median(times[skip:]) if times else float("nan")


def _mean_density() -> float | None:
    import modcompile
    values = [float(r.density) for r in modcompile.report(print_table=False)
              if r.status == "sparse" and r.density is not None]
    return sum(values) / len(values) if values else None


def _check_sparse_sites(name: str) -> None:
    """The comparison means nothing if the policy's sites stayed dense: fail with their reasons."""
    import modcompile
    rows = modcompile.report(print_table=False)
    if not any(r.status == "sparse" for r in rows):
        reasons = "; ".join(f"{r.site}: {r.reason or r.note}" for r in rows) or "no attention site compiled"
        raise RuntimeError(f"{name}: no self-attention site runs sparse ({reasons})")


def compare(args, dense_res: dict, out_dir: Path) -> dict:
    """Train the same model through ``backend="modsparse"`` with ``args.compare``: same initial
    weights, batches, noise, flow times and step-based learning-rate schedule as the dense
    (Inductor-compiled) run. For each dense warm-up fraction w the sparse run starts from the dense
    run's state at step round(w * steps) (dense pretraining, then sparse training; w = 0: sparse
    from the first step); one modsparse compile serves all of them. Writes loss curves, step
    times, final validation losses and, per layer, the attention fwd+bwd times at the model's real
    shape and lists vs dense SDPA."""
    import modcompile
    from .common import write_results
    from .train_attention import layer_timings, total_row

    options = {"policy": args.compare, "warmup_steps": 0, "block_size": args.block_size,
               "min_seq_len": 2 * args.block_size, **(args.options or {})}
    cuda = str(args.device or default_device()).startswith("cuda")
    modcompile.reset(forget_sites=True)
    run_s = build_model(args.config, seed=args.seed, device=args.device, sparse_options=options)
    cfg = run_s["cfg"]
    dense_ms = _median_ms(dense_res)
    rows = [{"run": "dense (inductor)", "start_step": 0, "steps": dense_res["steps"], "step_ms": dense_ms,
             "val_loss_init": dense_res["val_loss_init"], "val_loss": dense_res["val_loss"]}]
    runs, attention, goal_lines = {"dense": dense_res}, {}, []
    for frac in args.dense_warmup:
        first = round(frac * args.steps)
        name = f"{args.compare} (dense warm-up {frac:.0%})"
        modcompile.reset()
        densities = []

        def on_validate(step, _first=first, _d=densities):
            if step > _first:  # the last call was a training step: its density
                _d.append(_mean_density())
        res = train(args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    val_every=args.val_every, show_progress=not args.no_progress, run=run_s,
                    start=dense_res["snapshots"][first], on_validate=on_validate)
        _check_sparse_sites(name)
        runs[name] = res
        sparse_ms = _median_ms(res)
        density = statistics.mean(d for d in densities if d is not None) if any(densities) else None
        row = {"run": f"modsparse {name}", "start_step": first, "steps": res["steps"] - first, "step_ms": sparse_ms,
               "step_speedup": dense_ms / sparse_ms, "density": density,
               # whole run from the medians: dense warm-up steps at the dense step time
               "run_speedup": dense_ms * args.steps / (dense_ms * first + sparse_ms * (args.steps - first)),
               "val_loss_init": res["val_loss_init"], "val_loss": res["val_loss"],
               "val_loss_vs_dense": res["val_loss"] / dense_res["val_loss"] - 1.0}
        rows.append(row)
        goal_lines.append(f"GOAL val loss, {name}: {row['val_loss_vs_dense']:+.2%} vs dense (goal: within 2%): "
                          + ("MET" if abs(row["val_loss_vs_dense"]) <= 0.02 else "MISSED"))
        layers = layer_timings(run_s["model"], cfg, options, args.batch_size, args.seed, run_s["device"],
                               quick=not cuda)
        attention[name] = layers + [total_row(layers)]
        tot = attention[name][-1]
        row["attention_speedup"] = tot["site_speedup"]
        goal_lines.append(
            f"GOAL attention fwd+bwd at ({args.batch_size},{cfg.heads},{cfg.seq_len},{cfg.head_dim}), "
            f"{len(layers)} layers, {name}: site {tot['site_speedup']:.2f}x, kernels alone "
            f"{tot['kernel_speedup']:.2f}x vs dense SDPA (lists density {tot['density']:.3f}; goal >= 2x): "
            + ("MET" if tot["site_speedup"] >= 2.0 else "MISSED") + ("" if cuda else " [CPU: not a performance claim]"))
    notes = [f"same initial weights, batches, noise, flow times and step-based LR schedule in every run; "
             f"{args.compare} options {options}",
             "dense warm-up w: the sparse run continues from the dense run's model and optimizer state at step "
             "round(w * steps); its val_loss_init is that state evaluated through the sparse model",
             "validation: dense runs eager SDPA, sparse runs the compiled sparse model",
             f"step_ms: median over the steps after the first {SKIP_STEPS} of each run (compile, tuning); "
             "run_speedup = dense step_ms * steps / (dense step_ms * warm-up steps + sparse step_ms * sparse steps)",
             "density: mean block density of the training step before each validation",
             "attention_speedup: per-layer dense SDPA fwd+bwd vs the site's plan + attention + backward on the "
             "trained model's own q/k/v and lists, summed over layers (train_compare_attention.md)"]
    if cuda and rows[1:]:
        dens = rows[-1]["density"] or 1.0
        attn = attention_fwd_bwd_ms(cfg, args.batch_size, dens, args.block_size, "cuda")
        notes.append(f"kernels on random evenly spread lists at ({args.batch_size},{cfg.heads},{cfg.seq_len},"
                     f"{cfg.head_dim}) bf16, density {attn['list_density']:.3f}: dense SDPA {attn['dense_ms']:.3f} ms "
                     f"vs block-sparse {attn['sparse_ms']:.3f} ms ({attn['dense_ms'] / attn['sparse_ms']:.2f}x; "
                     f"{attn['method']})")
    settings = {"config": cfg.to_dict(), "options": options, "batch_size": args.batch_size, "lr": args.lr,
                "seed": args.seed, "steps": args.steps, "dense_warmup": list(args.dense_warmup)}
    history = {name: {"val": r["history"], "train_loss": r["train_losses"], "first_step": r["first_step"]}
               for name, r in runs.items()}
    payload = write_results(out_dir, "train_compare", f"Training dense vs modsparse {args.compare}", rows,
                            columns=["run", "start_step", "steps", "step_ms", "step_speedup", "run_speedup",
                                     "attention_speedup", "density", "val_loss_init", "val_loss",
                                     "val_loss_vs_dense"],
                            settings=settings, notes=notes, extra={"history": history, "goals": goal_lines})
    attn_rows = [{"run": name, **r} for name, layer_rows in attention.items() for r in layer_rows]
    write_results(out_dir, "train_compare_attention", "Attention fwd+bwd per layer at the training shape",
                  attn_rows, columns=["run", "layer", "shape", "density", "dense_ms", "site_ms", "kernel_ms",
                                      "site_speedup", "kernel_speedup"], settings=settings,
                  notes=["q/k/v from one eager forward of the trained model on a training batch (t = 500); "
                         "site = plan + attention + backward as the site op runs them; kernel = the block-sparse "
                         "kernels alone on the same lists"])
    plot_losses(runs, out_dir / "train_compare_loss.png")
    for line in goal_lines:
        log(line)
    return payload


def _smooth(values, window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(runs: dict, path: Path) -> None:
    """Training loss (moving average) and validation loss of every run on one plot."""
    from .common import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, res) in enumerate(runs.items()):
        color = f"C{i}"
        losses = res["train_losses"]
        window = max(1, len(losses) // 40)
        xs = range(res["first_step"] + 1, res["first_step"] + len(losses) + 1)
        ax.plot(xs, _smooth(losses, window), color=color, alpha=0.6, lw=1, label=f"{name} train (avg {window})")
        pts = [(h["step"], h["val_loss"]) for h in res["history"]]
        ax.plot(*zip(*pts), color=color, marker="o", lw=1.5, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    """CLI entry: ``python -m benchmarks run train-dit``."""
    from .common import write_results
    compare_policy = getattr(args, "compare", None)
    fractions = list(getattr(args, "dense_warmup", None) or [0.0])
    if compare_policy:
        if args.steps is None:
            raise SystemExit("train-dit --compare needs --steps: every run follows the same step-based LR schedule")
        if any(not 0.0 <= f < 1.0 for f in fractions):
            raise SystemExit(f"--dense-warmup fractions must lie in [0, 1), got {fractions}")
        args.dense_warmup = fractions
    out_dir = Path(args.out)
    if getattr(args, "init", None):
        return finetune(args, out_dir)
    ckpt = Path(args.checkpoint) if args.checkpoint else out_dir / f"dit_{args.config}.pt"
    res = train(args.config, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, out=ckpt, val_every=args.val_every, device=args.device,
                # --compare: the dense run is compiled too (Inductor), so step times compare like for like
                compile_model=args.compile or bool(compare_policy),
                snapshot_steps={round(f * args.steps) for f in fractions} if compare_policy else (),
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
    if compare_policy:
        res["compare"] = compare(args, res, out_dir)
    return res
