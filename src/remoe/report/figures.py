"""The paper's figures, redrawn from run directories (matplotlib, Agg, PNG without timestamps)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..model.stats import expert_share  # noqa: E402
from .collect import inactive_cells, read_analysis, read_jsonl, read_metrics, routing_share  # noqa: E402

COLORS = {"dense": "tab:gray", "topk": "tab:blue", "remoe": "tab:red"}


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def scaling_plot(df: pd.DataFrame, axis: str, out_dir: str) -> str | None:
    """The scaling table's standard settings (tables.scaling_moe), mean ± std over seeds per point."""
    from .tables import scaling_moe

    moe = df[scaling_moe(df, axis)]
    if moe.empty or moe[axis].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for model, g in moe.groupby("model"):
        stats = g.groupby(axis)["val_loss"].agg(["mean", "std"]).sort_index()
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                    color=COLORS[model], label=model)
    dense = df[(df["model"] == "dense") & (df["ffn_mult"].fillna(1) == 1)]
    if len(dense) and axis != "size":
        ax.axhline(dense["val_loss"].mean(), color=COLORS["dense"], ls="--", label="dense")
    if axis in ("experts", "granularity"):
        ax.set_xscale("log", base=2)
    ax.set_xlabel({"size": "model size", "experts": "experts E", "granularity": "granularity G"}[axis])
    ax.set_ylabel("validation loss")
    ax.legend()
    return _save(fig, out_dir, f"fig_scaling_{axis}")


def stages_plot(run_dir: str, out_dir: str, name: str) -> str | None:
    m = read_metrics(run_dir)
    if m is None or "train/lambda" not in m:
        return None
    m = m.dropna(subset=["train/lambda"])
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, col, title in zip(axes, ["train/sparsity", "train/lambda", "train/lm_loss", "train/weighted_reg_loss"],
                              ["sparsity $S_i$", r"$\lambda_i$", r"$L_{lm}$", r"$\lambda_i L_{reg}$"]):
        ax.plot(m["step"], m[col], lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if col in ("train/lambda", "train/weighted_reg_loss"):
            ax.set_yscale("log")
    return _save(fig, out_dir, name)


def routing_heatmap(run_dir: str, out_dir: str, name: str) -> str | None:
    share = routing_share(run_dir)
    if share is None:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * share.shape[1] + 2), 0.4 * share.shape[0] + 1.5))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    for (layer, e) in zip(*np.where(inactive_cells(share))):
        ax.text(e, layer, "×", ha="center", va="center", color="white")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    n_inactive = int(inactive_cells(share).sum())
    ax.set_title(f"routed-token share ({n_inactive} inactive: ×, < 1/(8·{share.shape[-1]}))")
    fig.colorbar(im, ax=ax)
    return _save(fig, out_dir, name)


def layer_sparsity_plot(runs: list[tuple[str, str]], out_dir: str) -> str | None:
    data = [(label, a["layer_sparsity"]) for label, a in ((lb, read_analysis(d)) for lb, d in runs) if a]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, sp in data:
        ax.plot(range(len(sp)), sp, marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (held-out)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "fig_layer_sparsity")


def active_vs_frequency(runs: list[tuple[str, str]], out_dir: str) -> str | None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for label, d in runs:
        a = read_analysis(d)
        if a is None:
            continue
        freq, act = np.array(a["token_count"], float), np.array(a["token_mean_active"])
        bins = np.unique(np.floor(np.log2(freq)))
        xs = [2 ** b for b in bins]
        ys = [act[np.floor(np.log2(freq)) == b].mean() for b in bins]
        ax.plot(xs, ys, marker="o", label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token frequency (held-out count)")
    ax.set_ylabel("mean active experts")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "fig_active_vs_frequency")


def domain_plot(run_dir: str, out_dir: str, name: str) -> str | None:
    a = read_analysis(run_dir)
    if a is None:
        return None
    doms = a["domain_counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(doms))
    for i, (dom, c) in enumerate(sorted(doms.items())):
        c = np.array(c, float).sum(0)  # over layers
        share = expert_share(c)
        ax.bar(np.arange(len(share)) + i * width, share, width, label=dom)
    ax.set_xlabel("expert")
    ax.set_ylabel("routed-token share")
    ax.legend()
    return _save(fig, out_dir, name)


def flips_plot(runs: list[tuple[str, str]], out_dir: str) -> str | None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for label, d in runs:
        recs = read_jsonl(os.path.join(d, "flips.jsonl"))
        if recs:
            ax.plot([r["step"] for r in recs], [r["flip_rate"] for r in recs], label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flip rate (probe batch)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "fig_flip_rate")


def curves_plot(runs: list[tuple[str, str, str]], out_dir: str) -> str | None:
    """Validation loss vs training step, one line per run (seed), colour and legend by setting."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = set()
    for label, model, d in runs:
        m = read_metrics(d)
        if m is None or "val/loss" not in m:
            continue
        v = m.dropna(subset=["val/loss"])
        ax.plot(v["step"], v["val/loss"], color=COLORS.get(model), alpha=0.7,
                label=label if label not in drawn else None)
        drawn.add(label)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("each method's standard setting, one line per seed", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "fig_val_curves")
