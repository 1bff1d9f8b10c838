"""The small-scale ReMoE study (why ReMoE trails TopK and Dense at CPU scale): its table and figures,
from stored runs only. `python -m remoe.report.small_scale --runs DIR [--notes FILE] --out reports`
writes reports/remoe_small_scale.md and its figures under reports/remoe_small_scale/figures/.

An arm is a setting (the method and every factor changed from its standard setting: arms()); every arm
is compared with paper-exact ReMoE on validation loss under the report's rules (stats.compare: paired over
shared seeds).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from ..analysis import expert_similarity
from ..checkpoint import load_checkpoint
from ..cli import ArgumentParser, UsageError, guard
from ..model.routing import METHODS
from .collect import collect, read_metrics, run_dirs
from .figures import _save, plt
from .stats import RULES, compare
from .tables import _key, fmt, to_markdown, variant

BASE = "remoe"  # the paper-exact arm every other arm is compared with
TAIL_STEPS = 500  # the late-training window for lambda and the penalty's share of the loss


KNOB_LABEL = {"lambda0": "λ0", "alpha": "α", "regularizer": "regularizer", "aux_loss_coef": "aux coef"}


def arms(df: pd.DataFrame) -> pd.Series:
    """Each run's arm: its method and recipe (tables.variant: dense×N for a wider dense FFN, router LR, ...)
    plus every other factor it changes from the method's standard setting (its method's Knobs defaults), and its tokens
    per step where that differs from most runs'. Factors not named here (depth, the commit) do not split arms: one
    study per records folder (reports/small_scale_*)."""
    tps = df["train_tokens"] / df["steps"]
    usual = tps.mode().iloc[0] if len(tps) else None
    out = []
    for (i, r), label in zip(df.iterrows(), variant(df)):
        extras = []
        if r["model"] == "remoe" and r.get("lambda_per_layer") is True:
            extras.append("per-layer λ")
        standard = METHODS[r["model"]].standard() if r["model"] in METHODS else {}
        for knob, value in standard.items():
            v = r.get(knob)
            if knob not in ("lambda_per_layer", "ffn_mult") and v is not None and v == v and v != value:
                extras.append(f"{KNOB_LABEL.get(knob, knob)}={_key(v)}")
        if tps[i] != usual:
            extras.append(f"{int(tps[i]):,} tokens/step")
        out.append(", ".join([label, *extras]))
    return pd.Series(out, index=df.index)


def _tail(m: pd.DataFrame | None, col: str) -> pd.Series:
    if m is None or col not in m:
        return pd.Series(dtype=float)
    s = m.dropna(subset=[col])
    return s[s["step"] > s["step"].max() - TAIL_STEPS][col]


SIMILARITY = "expert_similarity.json"


def write_similarity(run_dir: str) -> bool:
    """expert_similarity.json of a run from its final checkpoint (when the checkpoint is still there: the
    committed records keep the JSON, not the checkpoint)."""

    ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt):
        return False
    model, _, _ = load_checkpoint(ckpt)
    if not model.moe_layers():
        return False
    with open(os.path.join(run_dir, SIMILARITY), "w") as f:
        json.dump(expert_similarity(model), f, indent=1)
    return True


def _similarity(run_dir: str) -> float:
    path = os.path.join(run_dir, SIMILARITY)
    if not os.path.isfile(path):
        return np.nan
    return float(np.mean([x["mean"] for x in json.load(open(path))["layers"]]))


def run_facts(run_dir: str) -> dict:
    """Late-training facts of one run from its metrics.csv (and expert_similarity.json)."""
    m = read_metrics(run_dir)
    lam, reg, lm = _tail(m, "train/lambda"), _tail(m, "train/weighted_reg_loss"), _tail(m, "train/lm_loss")
    sp = _tail(m, "train/sparsity")
    share = float((reg.to_numpy() / lm.to_numpy()).mean()) if len(reg) and len(reg) == len(lm) else np.nan
    return {
        "lambda_tail": float(lam.mean()) if len(lam) else np.nan,
        "lambda_tail_min": float(lam.min()) if len(lam) else np.nan,
        "lambda_tail_max": float(lam.max()) if len(lam) else np.nan,
        "penalty_share": share,
        "sparsity_step_std": float(sp.std(ddof=1)) if len(sp) > 1 else np.nan,  # one step's noise about target
        "expert_cos": _similarity(run_dir),
    }


def _ms(v, digits=4) -> str:
    """Mean ± sample std of the non-missing values, in the tables' format (tables.fmt)."""
    v = pd.Series(v, dtype=float).dropna()
    return fmt(v.mean() if len(v) else float("nan"), v.std(ddof=1) if len(v) > 1 else None, len(v), digits)


def table(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    df = df.assign(arm=arms(df))
    facts = pd.DataFrame([run_facts(d) for d in df["run_dir"]], index=df.index)
    df = pd.concat([df, facts], axis=1)
    base = df[df["arm"] == BASE].set_index("seed")["val_loss"]
    rows, lines = [], []
    for name, g in df.groupby("arm", sort=False):
        layers = [
            np.array(str(s).split(), dtype=float) for s in g.get("layer_sparsity", []) if str(s) != "nan"
        ]
        per_layer = " / ".join(f"{x:.3f}" for x in np.mean(layers, axis=0)) if layers else "–"
        verdict = "" if name == BASE else str(compare(g.set_index("seed")["val_loss"], base))
        collapsed = (
            int((g["collapsed_layers"].fillna("").astype(str) != "").sum()) if "collapsed_layers" in g else 0
        )
        rows.append(
            {
                "arm": name,
                "seeds": " ".join(str(int(s)) for s in sorted(g["seed"])),
                "val loss": _ms(g["val_loss"]),
                "layer sparsity (tail)": per_layer,
                "runs with a collapsed layer": f"{collapsed}/{len(g)}",
                f"λ (last {TAIL_STEPS} steps)": _ms(g["lambda_tail"], 3),
                "step sparsity std": _ms(g["sparsity_step_std"], 3) if g["model"].iloc[0] == "remoe" else "–",
                "λ·L_reg / L_lm": _ms(100 * g["penalty_share"], 2)
                + (" %" if g["penalty_share"].notna().any() else ""),
                "expert cosine (mean pair)": _ms(g["expert_cos"], 3),
                f"lower than {BASE}?": verdict,
            }
        )
        if verdict:
            lines.append(f"- {name} reaches a lower validation loss than {BASE}: {verdict}.")
    return pd.DataFrame(rows), lines


def _mean_curve(runs: list[str], col: str) -> pd.Series | None:
    curves = []
    for d in runs:
        m = read_metrics(d)
        if m is not None and col in m:
            curves.append(m.dropna(subset=[col]).groupby("step")[col].mean())
    return pd.concat(curves, axis=1).mean(axis=1) if curves else None


def figures(df: pd.DataFrame, fig_dir: str) -> list[str]:
    os.makedirs(fig_dir, exist_ok=True)
    df = df.assign(arm=arms(df))
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in df.groupby("arm", sort=False):
        c = _mean_curve(list(g["run_dir"]), "val/loss")
        if c is not None:
            ax.plot(c.index, c.to_numpy(), marker=".", label=f"{name} (mean of {len(g)})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.legend()
    out.append(_save(fig, fig_dir, "fig_ss_val_curves"))
    remoe = df[df["model"] == "remoe"]
    if len(remoe):
        names = list(dict.fromkeys(remoe["arm"]))
        fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 6), squeeze=False)
        for j, name in enumerate(names):
            for _, r in remoe[remoe["arm"] == name].sort_values("seed").iterrows():
                m = read_metrics(r["run_dir"])
                if m is None:
                    continue
                layer_cols = sorted(c for c in m if c.startswith("sparsity/layer_"))
                s = m.dropna(subset=layer_cols[:1])
                for c in layer_cols:
                    axes[0][j].plot(s["step"], s[c], lw=0.8, label=f"{c.split('_')[-1]} s{int(r['seed'])}")
                lam_cols = [c for c in m if c.startswith("lambda/layer_")] or ["train/lambda"]
                for c in lam_cols:
                    t = m.dropna(subset=[c])
                    axes[1][j].plot(t["step"], t[c], lw=0.8, label=f"{c.split('/')[-1]} s{int(r['seed'])}")
            axes[0][j].set_title(f"{name}: per-layer sparsity")
            axes[0][j].axhline(
                1 - remoe["topk"].iloc[0] / remoe["experts"].iloc[0], color="k", ls=":", lw=0.8
            )
            axes[1][j].set_title(f"{name}: λ")
            axes[1][j].set_yscale("log")
            for ax in axes[:, j]:
                ax.set_xscale("symlog", linthresh=100)
                ax.set_xlim(left=0)
                ax.set_xlabel("step")
                ax.legend(fontsize=6, ncol=2)
        out.append(_save(fig, fig_dir, "fig_ss_layers_lambda"))
    return out


def build(roots: list[str], out_dir: str, notes: str | None = None) -> str:
    df = collect(roots).runs
    if df.empty:
        raise ValueError(f"no completed run under {roots}")
    tab, lines = table(df)
    fig_dir = os.path.join(out_dir, "remoe_small_scale", "figures")
    figs = figures(df, fig_dir)
    commits = sorted({str(c)[:12] for c in df.get("git_commit", [])})
    steps = sorted({int(s) for s in df["steps"]})
    text = [
        "# Why ReMoE trails TopK and Dense at small scale",
        "",
        (notes.strip() + "\n") if notes else "",
        f"Runs: {len(df)} (size {', '.join(sorted(df['size'].unique()))}, "
        f"{', '.join(map(str, steps))} steps, commit(s) {', '.join(commits)}); generated by "
        "`python -m remoe.report.small_scale` from the "
        "stored runs.",
        "",
        "## Arms",
        "",
        to_markdown(tab),
        "",
        *lines,
        "",
        RULES,
        "",
        "## Figures",
        "",
    ]
    text += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})\n" for p in figs]
    path = os.path.join(out_dir, "remoe_small_scale.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", default="reports")
    p.add_argument("--notes", default=None, help="a Markdown file with the findings, placed at the top")
    p.add_argument("--similarity", action="store_true",
                   help="first write expert_similarity.json into every run folder that still has its checkpoint")
    a = p.parse_args()
    missing = [r for r in a.runs if not os.path.isdir(r)]
    if missing:
        raise UsageError(f"--runs: no such folder {missing[0]!r}")
    try:
        notes = open(a.notes, encoding="utf-8").read() if a.notes else None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--notes: cannot read {a.notes!r} ({type(e).__name__})") from None
    if a.similarity:
        for d in run_dirs(a.runs):
            write_similarity(d)
    try:
        print(build(a.runs, a.out, notes))
    except ValueError as e:  # no completed run under --runs
        raise UsageError(f"--runs: {e}") from None


if __name__ == "__main__":
    guard(main, "small_scale")
