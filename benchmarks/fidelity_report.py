"""Output of the fidelity level beyond the tables of common.write_results: plots and the synthetic
mode's matched-density block.

Plots (matplotlib optional: none without it): per-layer density, speed vs fidelity over the policy
knob (measured speedup where a compiled dense baseline ran on a GPU, and the ideal 1/density), and
block-mask heatmaps per variant.
"""
from __future__ import annotations

from pathlib import Path

from .common import markdown_table, pyplot


def slug(name: str) -> str:
    """A variant name as a file-name part (report_<slug>.json, masks_<slug>.png)."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def plots(out_dir: Path, summary, layer_rows, masks, args, synthetic: bool = False,
          measured_speed: bool = False):
    plt = pyplot()
    if plt is None:
        return
    tag = "synthetic_" if synthetic else ""
    # per-layer density
    if any(r["density"] is not None for r in layer_rows):
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant in sorted({r["variant"] for r in layer_rows}):
            rows = [r for r in layer_rows if r["variant"] == variant and r["density"] is not None]
            if rows:
                ax.plot([r["layer"] for r in rows], [r["density"] for r in rows], marker="o", label=variant)
        ax.set_xlabel("layer"), ax.set_ylabel("achieved block density (sparse steps)")
        ax.set_title("Per-layer density"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out_dir / f"{tag}density_per_layer.png", dpi=120), plt.close(fig)
    # speed-vs-fidelity curve over the knob: x = measured speedup vs the dense baseline (GPU runs with a
    # compiled dense baseline) and the ideal 1/density
    pts = [r for r in summary if r.get("density") is not None and r["density"] < 1.0]
    ycol = "rel_err" if synthetic else "psnr_db"
    axes_x = [("ideal speedup 1/density (not measured time)", lambda r: 1 / r["density"])]
    if measured_speed:
        axes_x.insert(0, ("measured speedup vs dense (whole sample)", lambda r: r.get("speedup")))
    if pts:
        fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4), squeeze=False)
        for ax, (xlabel, xof) in zip(axes[0], axes_x):
            for policy in sorted({r["policy"] for r in pts}):
                rows = sorted((r for r in pts if r["policy"] == policy and r.get(ycol) is not None
                               and xof(r) is not None), key=xof)
                if rows:
                    ax.plot([xof(r) for r in rows], [r[ycol] for r in rows], marker="o", label=policy)
                    for r in rows:
                        if r.get("knob"):
                            ax.annotate(r["knob"], (xof(r), r[ycol]), fontsize=6)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("attention-output relative error" if synthetic else "PSNR vs dense (dB)")
            ax.legend(fontsize=7), ax.grid(alpha=0.3)
        fig.suptitle("Speed vs fidelity over the policy knob")
        fig.tight_layout(), fig.savefig(out_dir / f"{tag}speed_vs_fidelity.png", dpi=120), plt.close(fig)
    # mask heatmaps: a few heads of a few layers per variant
    for variant, per_layer in masks.items():
        if not per_layer:
            continue
        layers = sorted(per_layer)[: args.heatmap_layers]
        heads = min(args.heatmap_heads, per_layer[layers[0]].shape[0])
        fig, axes = plt.subplots(len(layers), heads, figsize=(2.2 * heads, 2.2 * len(layers)), squeeze=False)
        for i, layer in enumerate(layers):
            for h in range(heads):
                ax = axes[i][h]
                ax.imshow(per_layer[layer][h].float().numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"L{layer} h{h}", fontsize=7)
        fig.suptitle(f"{variant}: block masks, black = computed block (policy's block order)", fontsize=8)
        fig.tight_layout(), fig.savefig(out_dir / f"{tag}masks_{slug(variant)}.png", dpi=120), plt.close(fig)


def append_matched_block(path: Path, matched: list, type_cols: list, notes: list) -> None:
    """The matched-density rows as their own section of the synthetic mode's markdown (and stdout)."""
    cols = ["group", "role", "variant", "options", "target_density", "density", "density_gap", "granularity",
            "rel_err", "recall", "oracle_rel_err", "err_vs_oracle", *type_cols, "sparse_steps"]
    md = ("\n### Matched density (mod vs vmoba vs oracle at the same density)\n\n" + markdown_table(matched, cols)
          + "".join(f"\n- {n}" for n in notes) + "\n")
    with open(path, "a") as f:
        f.write(md)
    print(md, flush=True)
