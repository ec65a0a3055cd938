"""The synthetic mode of the fidelity level (``--synthetic``): policies on one attention layer.

One attention layer on structured synthetic q/k/v (benchmarks/synthetic.py), a step schedule per
policy, plus harness baselines (oracle and pooled top-k at matched density), and a matched-density
block: mod and vmoba each re-run at the other's achieved density next to the oracle with the same
block budget (JSON ``matched_density``). Writes fidelity_synthetic.{md,json} and the plots.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backend as mb
from .common import default_device, log, parse_dtype, progress, write_results
from .fidelity_report import append_matched_block, plots
from .fidelity_variants import build_variants, knob_value
from .metrics import dense_lse, recall_from_lse, relative_l2


class AttentionOnly(nn.Module):
    """One SDPA call: what the backend rewrites; ``timestep`` only marks the step input."""

    def forward(self, q, k, v, timestep):
        return F.scaled_dot_product_attention(q, k, v)


# Options that make a policy target a given density (matched-density block of the synthetic level):
# vmoba keeps ceil(d * P) partition blocks per row, mod the fewest lines per head reaching d.
MATCH_OPTIONS = {"vmoba": lambda d: {"selection": "topk", "density": d}, "mod": lambda d: {"density": d}}
MATCH_NOTES = [
    "matched density: each group re-runs the other policy at the anchor policy's achieved density (last step) "
    "and adds the oracle with the same block budget",
    "oracle here = the round(d*B*H*Mq*Mk) truly densest blocks over all heads together (own blocks kept; "
    "benchmarks/masks.oracle_budget_mask): density within half a block of d, recall an upper bound for any mask "
    "with as many blocks; the per-row oracle rows of the main table round per query row (up to 1/(2*Mk) off)",
    "granularity = density step of the row's selection: mod 1/Mk (one line holds at most Mk blocks, "
    "achieved in [d, d + 1/Mk)), vmoba top-k 1/P (one partition block of P per row, achieved in [d, d + 1/P] "
    "when partition blocks are whole kernel blocks), oracle one block of the whole tensor, 1/(B*H*Mq*Mk)",
    "oracle_rel_err / err_vs_oracle: the budget oracle at the row's own achieved density",
]


def _options_text(opts: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in opts.items())


def _vmoba_partitions(seq_len: int, device) -> int | None:
    """Partition blocks per head of the vmoba site that just ran (None when unknown)."""
    try:
        from modcompile.ops import policy_for
        from modcompile.runtime import REGISTRY
        for state in REGISTRY.states.values():
            if state.info.config.policy == "vmoba" and state.context is not None:
                layout = policy_for(state.info.config).layout(state.context, seq_len, torch.device(device))
                return layout.partition.num_blocks if layout is not None else None
    except Exception as exc:  # informational only
        log(f"vmoba partition count unavailable: {type(exc).__name__}: {exc}")
    return None


def run_synthetic(args) -> dict:
    from modcompile.kernels.reference import block_sparse_attention_ref
    from modcompile.kernels.block_lists import BlockLists
    from .masks import oracle_budget_mask, oracle_mask, pooled_mask
    from .metrics import achieved_density, block_attention_mass, mass_recall_from_mass
    from .synthetic import make_synthetic_attention

    device = args.device or default_device()
    dtype = parse_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    grid = tuple(args.grid)
    out_dir = Path(args.out)
    sa = make_synthetic_attention(grid, args.heads, args.head_dim, text_len=args.text_len, seed=args.seed,
                                  device=device, dtype=dtype)
    q, k, v = sa.q, sa.k, sa.v
    bs = args.block_size
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    lse_ref = dense_lse(q, k)
    mass = block_attention_mass(q, k, bs)
    types = sa.head_types
    log(f"synthetic: grid {grid} + {args.text_len} text, {args.heads} heads x {args.head_dim}, N={sa.seq_len}, "
        f"block {bs}, {dtype} on {device}")

    def per_type(recall_heads):
        out = {}
        for t in sorted(set(types)):
            idx = [i for i, x in enumerate(types) if x == t]
            out[f"recall_{t}"] = float(recall_heads[idx].mean())
        return out

    rows, step_rows, skipped, masks, partitions = [], [], {}, {}, {}
    base = {"block_size": bs, "video_grid": grid, "min_seq_len": 0, "num_steps": args.steps,
            "text_position": sa.text_position}
    variants = build_variants(args.policies, args.sweep, base, knob_values=args.knob_values)
    timestep = torch.ones(q.shape[0], device=device)
    why_backend = mb.backend_missing()

    def run_schedule(name: str, opts: dict):
        """One policy's step schedule on the same q/k/v: (summary row, per-step rows, last sparse mask,
        partition blocks per head or None), or None after recording why it was skipped."""
        why = why_backend or mb.policy_missing(opts["policy"])
        if why:
            log(f"skip {name}: {why}")
            skipped[name] = why
            return None
        torch._dynamo.reset()
        mb.reset()
        steps, mask, last = [], None, None
        try:
            compiled = mb.compile_model(AttentionOnly(), "modsparse", opts)
            ctx = mb.step_context()
            for i in range(args.steps):
                with ctx(i, args.steps), torch.no_grad(), mb.inspectable():  # recall reruns the lists
                    out = compiled(q, k, v, timestep)
                plan = mb.current_site_plans(opts["policy"]).get(0)
                r = {"variant": name, "step": i, "rel_err": relative_l2(out.float(), ref)}
                if plan is None or plan["dense"]:
                    r.update(recall=1.0 if plan else None, density=1.0 if plan else None, dense_step=bool(plan))
                else:
                    _, lse = plan["attend"](q, k, v)
                    rh = recall_from_lse(lse, lse_ref, per_head=True).mean(0)
                    r.update(recall=float(rh.mean()), density=plan["density"], dense_step=False, **per_type(rh))
                    from modcompile.kernels.block_lists import mask_from_lists
                    mask = mask_from_lists(plan["kv_counts"][:1], plan["kv_indices"][:1], mass.shape[-1])[0].cpu()
                steps.append(r)
                last = r
        except Exception as exc:
            log(f"variant {name} FAILED: {type(exc).__name__}: {exc}")
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            return None
        knob, value = knob_value(opts)
        sparse = [r for r in steps if r.get("dense_step") is False]
        row = {"variant": name, "policy": opts["policy"], "knob": f"{knob}={value}" if knob else None,
               "rel_err": last["rel_err"], "recall": last.get("recall"), "density": last.get("density"),
               "sparse_steps": len(sparse), **{kk: vv for kk, vv in last.items() if kk.startswith("recall_")}}
        return row, steps, mask, _vmoba_partitions(sa.seq_len, device) if opts["policy"] == "vmoba" else None

    for name, opts in progress(list(variants.items()), desc="policies", enabled=not args.no_progress):
        result = run_schedule(name, opts)
        if result is None:
            continue
        row, steps, mask, partitions[name] = result
        rows.append(row)
        step_rows.extend(steps)
        if mask is not None:
            masks[name] = {0: mask}

    # harness baselines at fixed densities and at each policy's achieved density
    densities = sorted({*args.baseline_densities, *[r["density"] for r in rows if r.get("density") and r["density"] < 1]})
    for d in densities:
        for label, mask in (("oracle", oracle_mask(mass, d)), ("pooled-topk", pooled_mask(q, k, bs, d))):
            out, _ = block_sparse_attention_ref(q, k, v, BlockLists.from_mask(mask, bs, q.shape[2], k.shape[2]))
            rh = mass_recall_from_mass(mass, mask, per_head=True).mean(0)
            rows.append({"variant": f"{label}@{d:.3f}", "policy": label, "knob": f"density={d:.3f}",
                         "rel_err": relative_l2(out.float(), ref), "recall": float(rh.mean()),
                         "density": achieved_density(block_mask=mask), "sparse_steps": None, **per_type(rh)})
            if label == "oracle" and d == densities[0]:
                masks[f"oracle@{d:.3f}"] = {0: mask[0].cpu()}

    # Matched density: each of mod / vmoba is run again at the other's achieved density, next
    # to the oracle with the same block budget. Block granularity keeps the densities from matching
    # exactly; "granularity" is the density step of the row's selection (MATCH_NOTES).
    nb = mass.shape[-1]
    oracle_cache: dict = {}

    def oracle_at(d: float) -> dict:
        if d not in oracle_cache:
            mask = oracle_budget_mask(mass, d)
            out, _ = block_sparse_attention_ref(q, k, v, BlockLists.from_mask(mask, bs, q.shape[2], k.shape[2]))
            rh = mass_recall_from_mass(mass, mask, per_head=True).mean(0)
            oracle_cache[d] = {"rel_err": relative_l2(out.float(), ref), "recall": float(rh.mean()),
                               "density": achieved_density(block_mask=mask), **per_type(rh)}
        return oracle_cache[d]

    def matched_row(group, role, variant, policy, options, target, row, granularity):
        own = oracle_at(row["density"]) if role != "oracle" else row
        return {"group": group, "role": role, "variant": variant, "policy": policy, "options": options,
                "target_density": target, "density": row["density"], "density_gap": row["density"] - target,
                "granularity": granularity, "rel_err": row["rel_err"], "recall": row["recall"],
                "oracle_rel_err": own["rel_err"],
                "err_vs_oracle": row["rel_err"] / own["rel_err"] if own["rel_err"] else None,
                **{kk: vv for kk, vv in row.items() if kk.startswith("recall_")},
                "sparse_steps": row.get("sparse_steps")}

    matched, groups = [], []
    by_variant = {r["variant"]: r for r in rows}
    for anchor_name, other in (("mod", "vmoba"), ("vmoba", "mod")):
        a = by_variant.get(anchor_name)
        if other not in args.policies or a is None:
            continue
        d = a.get("density")
        group = f"{anchor_name}-density"
        if d is None or d >= 1.0:
            skipped[f"{other}@{group}"] = f"{anchor_name}'s last step was not sparse (density {d})"
            continue
        opts = {"policy": other, **base, **MATCH_OPTIONS[other](d)}
        name = f"{other}@{group}"
        result = run_schedule(name, opts)
        step_rows.extend(result[1] if result else [])
        members = {anchor_name: anchor_name}
        grp_rows = [matched_row(group, "anchor", anchor_name, anchor_name, "default", d, a, None)]
        if result is not None:
            row, _, _, parts = result
            members[other] = name
            gran = 1.0 / parts if other == "vmoba" and parts else 1.0 / nb
            grp_rows.append(matched_row(group, "matched", name, other, _options_text(MATCH_OPTIONS[other](d)), d,
                                        row, gran))
        oracle_name = f"oracle@{group}"
        members["oracle"] = oracle_name
        grp_rows.append(matched_row(group, "oracle", oracle_name, "oracle", f"budget=round({d:.4f}*B*H*Mq*Mk)",
                                    d, oracle_at(d), 1.0 / mass.numel()))
        matched.extend(grp_rows)
        groups.append({"group": group, "target_density": d, "anchor": anchor_name, "variants": members,
                       "kernel_blocks": nb,
                       "vmoba_partitions": partitions.get("vmoba") or (result[3] if result else None)})

    settings = {"mode": "synthetic", "grid": grid, "text_len": args.text_len, "heads": args.heads,
                "head_dim": args.head_dim, "seq_len": sa.seq_len, "block_size": bs, "dtype": str(dtype),
                "steps": args.steps, "seed": args.seed, "head_types": types, "variants": variants, "skipped": skipped}
    type_cols = [f"recall_{t}" for t in sorted(set(types))]
    notes = ["policy rows: last step of a schedule of the same q/k/v, compiled with backend=modsparse",
             "oracle = top blocks by true dense mass (upper bound, needs dense attention); "
             "pooled-topk = top blocks by mean-pooled q.k in raw token order (harness baseline)",
             "recall = fraction of the dense softmax mass inside the computed blocks; dense baseline: SDPA (fp32) "
             "on the same inputs"]
    notes.extend(f"skipped {k2}: {v2}" for k2, v2 in skipped.items())
    payload = write_results(out_dir, "fidelity_synthetic", f"Policy fidelity on structured synthetic attention "
                            f"(N={sa.seq_len})", rows, settings=settings, notes=notes,
                            columns=["variant", "knob", "rel_err", "recall", "density", *type_cols, "sparse_steps"],
                            extra={"per_step": step_rows,
                                   "matched_density": {"groups": groups, "rows": matched, "notes": MATCH_NOTES}},
                            timing="no timings (fidelity only)")
    if matched:
        append_matched_block(out_dir / "fidelity_synthetic.md", matched, type_cols, MATCH_NOTES)
    plots(out_dir, [r for r in rows if r["policy"] not in ("oracle", "pooled-topk")] +
           [r for r in rows if r["policy"] in ("oracle", "pooled-topk")], [], masks, args, synthetic=True)
    return payload

