"""The paper's figures, redrawn from run directories (matplotlib, Agg, PNG without timestamps).

Read at a glance: every figure's title says which run(s) and setting it shows (a single run's figure names
its method, E, k, G, steps and seed: `setting`), layers and experts sit on integer ticks, and legends are
drawn beside the axes, never over the data."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..model.stats import expert_share
from .collect import inactive_cells, read_analysis, read_jsonl, read_metrics, routing_share
from .gaps import AXES, PAPER_VAL, one_per_value, paper_gap, remoe_vs_topk
from .stats import P
from .tables import scaling_moe

COLORS = {"dense": "tab:gray", "topk": "tab:blue", "remoe": "tab:red"}


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None}, bbox_inches="tight")  # outside legends kept
    plt.close(fig)
    return path


def integer_ticks(ax, axis: str, n: int, offset: float = 0.0) -> None:
    """Ticks at 0..n-1 (every step-th label when n is large) on `axis` ("x"/"y"), shifted by `offset`."""
    step = max(1, -(-n // 16))
    ticks = np.arange(0, n, step)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks + offset, [str(t) for t in ticks])


def legend_beside(ax, **kw) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def scaling_plot(df: pd.DataFrame, axis: str, out_dir: str) -> str | None:
    """The scaling table's standard settings (tables.scaling_moe), mean ± std over seeds per point."""
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
        values = sorted(moe[axis].dropna().unique())
        ax.set_xticks(values, [f"{v:.0f}" for v in values])
        ax.minorticks_off()
    name = {"size": "model size", "experts": "experts E", "granularity": "granularity G"}[axis]
    ax.set_xlabel(name)
    ax.set_ylabel("validation loss")
    ax.set_title(f"validation loss vs {name}: TopK and ReMoE at k=1, standard knobs, mean ± sd over seeds",
                 fontsize=8)
    legend_beside(ax)
    return _save(fig, out_dir, f"fig_scaling_{axis}")


def gap_plot(df: pd.DataFrame, axis: str, out_dir: str) -> str | None:
    """ReMoE − TopK validation loss against E or G (gaps.remoe_vs_topk, the claims' tests): the mean
    difference with its confidence interval (paired where the runs pair), next to the paper's difference at
    each point (182M, 30B tokens; one run each). Points whose axis value has several settings are not drawn."""
    ours = one_per_value(remoe_vs_topk(df, axis))
    if len(ours) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.array([g.value for g in ours], dtype=float)
    y = np.array([g.test.diff for g in ours])
    ci = [g.test.ci or (d, d) for g, d in zip(ours, y)]
    err = np.array([[d - lo for d, (lo, _) in zip(y, ci)], [hi - d for d, (_, hi) in zip(y, ci)]])
    n = sorted({g.test.n for g in ours})
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color="black",
                label=f"ours: mean, {1 - P:.0%} CI ({'–'.join(map(str, (n[0], n[-1]) if len(n) > 1 else n))} seeds)")
    px = sorted(PAPER_VAL[axis]["topk"])
    ax.plot(px, [paper_gap(axis, v) for v in px], marker="s", ls="--", color="tab:green",
            label="paper (182M, 30B tokens)")
    ax.axhline(0.0, color="tab:gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted(set(px) | set(x.tolist()))
    ax.set_xticks(ticks, [f"{v:.0f}" for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"{axis} {AXES[axis]}")
    ax.set_ylabel("ReMoE − TopK validation loss")
    ax.set_title(f"ReMoE − TopK against {AXES[axis]} (below 0: ReMoE lower), k=1, standard knobs", fontsize=8)
    legend_beside(ax, fontsize=7)
    return _save(fig, out_dir, f"fig_gap_{axis}")


def stages_plot(run_dir: str, out_dir: str, name: str, setting: str = "") -> str | None:
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
    fig.suptitle(f"ReMoE's training stages: {setting}" if setting else "ReMoE's training stages", fontsize=10)
    return _save(fig, out_dir, name)


def routing_heatmap(run_dir: str, out_dir: str, name: str, setting: str = "") -> str | None:
    share = routing_share(run_dir)
    if share is None:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * share.shape[1] + 2), 0.4 * share.shape[0] + 1.5))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    for (layer, e) in zip(*np.where(inactive_cells(share))):
        ax.text(e, layer, "×", ha="center", va="center", color="white")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    integer_ticks(ax, "x", share.shape[1])
    integer_ticks(ax, "y", share.shape[0])
    n_inactive = int(inactive_cells(share).sum())
    ax.set_title(f"routed-token share per layer and expert: {setting}\n"
                 f"({n_inactive} inactive: ×, < 1/(8·{share.shape[-1]}) of the layer's tokens)", fontsize=8)
    fig.colorbar(im, ax=ax)
    return _save(fig, out_dir, name)


def layer_sparsity_plot(runs: list[tuple[str, str]], out_dir: str) -> str | None:
    data = [(label, a["layer_sparsity"]) for label, a in ((lb, read_analysis(d)) for lb, d in runs) if a]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, sp in data:
        ax.plot(range(len(sp)), sp, marker="o", label=label)
    integer_ticks(ax, "x", max(len(sp) for _, sp in data))
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (held-out)")
    ax.set_title("ReMoE per-layer sparsity on held-out text, one line per setting (E, G, seed)", fontsize=8)
    legend_beside(ax, fontsize=7)
    return _save(fig, out_dir, "fig_layer_sparsity")


def active_vs_frequency(runs: list[tuple[str, str]], out_dir: str) -> str | None:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
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
    ax.set_title("ReMoE experts per token vs the token's frequency, one line per setting", fontsize=8)
    legend_beside(ax, fontsize=7)
    return _save(fig, out_dir, "fig_active_vs_frequency")


def domain_plot(run_dir: str, out_dir: str, name: str, setting: str = "") -> str | None:
    a = read_analysis(run_dir)
    if a is None:
        return None
    doms = a["domain_counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(doms))
    for i, (dom, c) in enumerate(sorted(doms.items())):
        c = np.array(c, float).sum(0)  # over layers
        share = expert_share(c)
        ax.bar(np.arange(len(share)) + (i - (len(doms) - 1) / 2) * width, share, width, label=dom)
    integer_ticks(ax, "x", len(share))  # each expert's bars centred on its tick
    ax.set_xlabel("expert")
    ax.set_ylabel("routed-token share")
    ax.set_title(f"routed-token share per expert by domain (all layers): {setting}", fontsize=8)
    legend_beside(ax)
    return _save(fig, out_dir, name)


def flips_plot(runs: list[tuple[str, str]], out_dir: str) -> str | None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for label, d in runs:
        recs = read_jsonl(os.path.join(d, "flips.jsonl"))
        if recs:  # one line style per method, so colours may repeat across settings without confusion
            ax.plot([r["step"] for r in recs], [r["flip_rate"] for r in recs], label=label, lw=1,
                    ls="--" if label.startswith("topk") else "-")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flip rate (probe batch)")
    ax.set_title("routing flips between probes, one line per method and setting", fontsize=8)
    legend_beside(ax, fontsize=7)
    return _save(fig, out_dir, "fig_flip_rate")


def curves_plot(runs: list[tuple[str, str, str]], out_dir: str) -> str | None:
    """Validation loss vs training step, one line per run (seed), colour and legend by setting; the y range
    is that of the last 90% of training, where the methods part (the first steps' loss is off the top)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn, late = set(), []
    for label, model, d in runs:
        m = read_metrics(d)
        if m is None or "val/loss" not in m:
            continue
        v = m.dropna(subset=["val/loss"])
        ax.plot(v["step"], v["val/loss"], color=COLORS.get(model), alpha=0.7,
                label=label if label not in drawn else None)
        drawn.add(label)
        late.extend(v["val/loss"][v["step"] >= 0.1 * v["step"].max()].tolist())
    if not drawn:
        plt.close(fig)
        return None
    if late:
        lo, hi = min(late), max(late)
        ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss, each method's standard setting, one line per seed", fontsize=8)
    legend_beside(ax, fontsize=8)
    return _save(fig, out_dir, "fig_val_curves")
