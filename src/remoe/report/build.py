"""The report: collect runs -> tables (md/tex/csv) + figures (png) + README.md index. Idempotent: the
same runs give byte-identical tables; broken runs are skipped, named in the index, and the rest report."""

from __future__ import annotations

import glob
import json
import logging
import os

from . import figures, tables
from ..runs import RunSummary
from .collect import collect

log = logging.getLogger("remoe.report")

TITLES = {
    "routing_methods": "Routing methods (paper Table 2 layout)",
    "scaling_size": "Scaling in model size N",
    "scaling_experts": "Scaling in expert count E",
    "scaling_granularity": "Scaling in granularity G",
    "lb_ablation": "Load-balancing ablation",
    "sensitivity_lambda0": "Sensitivity to λ0 (α = 1.2)",
    "sensitivity_alpha": "Sensitivity to α (λ0 = 1e-8)",
    "throughput": "Throughput (paper Table 7 layout)",
}


def _short(path: str, roots: list[str]) -> str:
    for r in roots:
        r = os.path.abspath(r)
        if path.startswith(r):
            return os.path.relpath(path, r)
    return path


def build_report(roots: list[str], out_dir: str = "reports", bench_globs: list[str] | None = None,
                 notes: str | None = None, force: bool = False) -> dict | None:
    """Returns what was made, or None (writing nothing) when no run is usable and `out_dir` already holds
    a report, unless `force`: a typo in --runs must not replace a report with an empty one."""
    from ..runs import write_text_atomic

    col = collect(roots)
    df = col.runs
    if not len(df) and not force and os.path.exists(os.path.join(out_dir, "README.md")):
        return None
    os.makedirs(out_dir, exist_ok=True)
    bench = []
    for pattern in bench_globs or [os.path.join(r, "**", "bench*.json") for r in roots]:
        for p in sorted(glob.glob(pattern, recursive=True)):
            try:
                rows = json.load(open(p))
                bench.extend(rows.get("rows", []) if isinstance(rows, dict) else rows)
            except (OSError, ValueError) as e:
                col.skipped.append((p, f"corrupt bench JSON ({type(e).__name__})"))
    made_tables, made_figs = {}, []
    if len(df):
        # the same configuration and seed run by two sweeps is one sample, not two
        ident = RunSummary.keys(identity=True)
        dup = df.astype({c: str for c in ident}).duplicated(subset=ident, keep="first")
        for d in df[dup]["run_dir"]:
            col.skipped.append((d, "duplicate of an identical configuration and seed (counted once)"))
        df = df[~dup].reset_index(drop=True)
        builders = {
            "routing_methods": lambda: tables.routing_methods(df),
            "scaling_size": lambda: tables.scaling(df, "size") if df["size"].nunique() > 1 else None,
            "scaling_experts": lambda: tables.scaling(df, "experts"),
            "scaling_granularity": lambda: tables.scaling(df, "granularity"),
            "lb_ablation": lambda: tables.lb_ablation(df),
            "sensitivity_lambda0": lambda: tables.sensitivity(df, "lambda0"),
            "sensitivity_alpha": lambda: tables.sensitivity(df, "alpha"),
            "throughput": lambda: tables.throughput(df, bench),
        }
        for name, fn in builders.items():
            t = fn()
            if t is not None:
                tables.write_table(t, os.path.join(out_dir, "tables"), name)
                made_tables[name] = t
        fig_dir = os.path.join(out_dir, "figures")
        os.makedirs(fig_dir, exist_ok=True)
        label = lambda r: f"{r['model']} E{r['experts']:.0f} G{r['granularity']:.0f} s{r['seed']}"  # noqa: E731
        moe = df[df["model"].isin(["topk", "remoe"])]
        remoe = df[df["model"] == "remoe"]
        first = lambda d: d.iloc[0] if len(d) else None  # noqa: E731
        std_remoe = first(remoe[(remoe["experts"] == 8) & (remoe["granularity"] == 1) & (remoe["lambda0"] == 1e-8)
                                & (remoe["alpha"] == 1.2)]) if len(remoe) else None
        std_remoe = std_remoe if std_remoe is not None else first(remoe)
        std_topk = first(moe[(moe["model"] == "topk") & (moe["experts"] == 8)]) if len(moe) else None
        candidates = [figures.scaling_plot(df, a, fig_dir) for a in ("size", "experts", "granularity")]
        if std_remoe is not None:
            candidates += [figures.stages_plot(std_remoe["run_dir"], fig_dir, "fig_remoe_stages"),
                           figures.routing_heatmap(std_remoe["run_dir"], fig_dir, "fig_heatmap_remoe"),
                           figures.domain_plot(std_remoe["run_dir"], fig_dir, "fig_domain_remoe")]
        if std_topk is not None:
            candidates += [figures.routing_heatmap(std_topk["run_dir"], fig_dir, "fig_heatmap_topk"),
                           figures.domain_plot(std_topk["run_dir"], fig_dir, "fig_domain_topk")]
        per_e = [r for _, r in moe.drop_duplicates(["model", "experts", "granularity"]).iterrows()]
        candidates += [
            figures.layer_sparsity_plot([(label(r), r["run_dir"]) for _, r in remoe.drop_duplicates(
                ["experts", "granularity"]).iterrows()], fig_dir),
            figures.active_vs_frequency([(label(r), r["run_dir"]) for _, r in remoe.drop_duplicates(
                ["experts", "granularity"]).iterrows()], fig_dir),
            figures.flips_plot([(label(r), r["run_dir"]) for r in per_e], fig_dir),
            figures.curves_plot([(label(r), r["model"], r["run_dir"]) for _, r in df.iterrows()], fig_dir),
        ]
        made_figs = [p for p in candidates if p]
    from .claims import claims

    index = _index(df, col.skipped, made_tables, made_figs, roots, out_dir, notes, claims(df) if len(df) else "")
    write_text_atomic(os.path.join(out_dir, "README.md"), index)
    return {"runs": len(df), "skipped": col.skipped, "tables": sorted(made_tables), "figures": made_figs}


def _index(df, skipped, made_tables, made_figs, roots, out_dir, notes, claims_md="") -> str:
    lines = ["# Report", "", "Generated by `python src/report.py` from the run directories below; "
             "regenerate it with the same command. Rows labelled `paper` are the paper's numbers "
             "(182M active parameters, 30B tokens of The Pile): a far larger setting than CPU runs.", ""]
    if notes:
        lines += [notes.strip(), ""]
    if claims_md:
        lines += [claims_md]
    lines += ["## Tables", ""]
    for name, t in made_tables.items():
        lines += [f"### {TITLES[name]}", "", f"[md](tables/{name}.md) · [tex](tables/{name}.tex) · "
                  f"[csv](tables/{name}.csv)", "", tables.to_markdown(t), ""]
    if not made_tables:
        lines += ["(no table: no completed run matches a table's setting)", ""]
    lines += ["## Figures", ""]
    for p in made_figs:
        rel = os.path.relpath(p, out_dir)
        lines += [f"![{os.path.basename(p)}]({rel})", ""]
    lines += ["## Runs", "", "| run | model | size | E | k | G | seed | steps | val loss | commit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        num = lambda v: "–" if v is None or v != v else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {_short(r['run_dir'], roots)} | {r['model']} | {r['size']} | {num(r['experts'])} | "
                     f"{num(r['topk'])} | {num(r['granularity'])} | {r['seed']} | {r['steps']} | "
                     f"{r['val_loss']:.4f} | {str(r.get('git_commit'))[:12]} |")
    lines += ["", "## Missing, failed or duplicate runs", ""]
    lines += [f"- {_short(d, roots)}: {why}" for d, why in skipped] or ["none"]
    return "\n".join(lines) + "\n"
