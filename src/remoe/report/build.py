"""The report: collect runs -> tables (md/tex/csv) + figures (png) + README.md index. Idempotent: the
same runs give byte-identical tables; broken runs are skipped, named in the index, and the rest report."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import tempfile

from ..cli import UsageError
from ..io import remove_leftovers, write_text_atomic
from ..train.optim import RECIPE
from ..train.record import RunSummary
from . import figures, gaps, tables
from .claims import claims
from .collect import collect, short_path
from .provenance import provenance
from .stats import RULES

log = logging.getLogger("remoe.report")

TITLES = {
    "routing_methods": "Routing methods (paper Table 2 layout)",
    "scaling_size": "Scaling in model size N",
    "scaling_experts": "Scaling in expert count E",
    "scaling_granularity": "Scaling in granularity G",
    "gap_experts": "ReMoE − TopK against E: the claim's tests, with confidence intervals",
    "gap_granularity": "ReMoE − TopK against G: the claim's tests, with confidence intervals",
    "pairs_experts": "ReMoE − TopK against E, pair by pair (same seed, same batches)",
    "pairs_granularity": "ReMoE − TopK against G, pair by pair (same seed, same batches)",
    "lb_ablation": "Load-balancing ablation",
    "sensitivity_lambda0": "Sensitivity to λ0 (α = 1.2)",
    "sensitivity_alpha": "Sensitivity to α (λ0 = 1e-8)",
    "memorisation": "Memorisation: validation − training loss at the end of each pass over the corpus",
    "throughput": "Throughput (paper Table 7 layout)",
}
COLUMNS = ("Columns: `source` ours (scale, training tokens) or the paper's row; `n` runs pooled (seeds); `val_loss` "
           "validation loss, mean ± sd over the seeds; task columns: downstream accuracy in % (Cloze, Choice: the "
           "offline local suite; ARC-c … RACE: the paper's lm-eval tasks); `Avg.` the mean of the row's task "
           "accuracies (× 100); – not measured.")
CAPTIONS = {  # what a table's columns mean, where the title does not say it
    "memorisation": "Each `pass k` column: the validation loss at the last validation of pass k minus the mean "
                    "training loss of the pass's last 50 steps (`pass_steps`: optimizer steps per pass). Pass 1 "
                    "sees no text twice, so its gap is the split's own train/validation difference; what it "
                    "grows by after pass 1 is memorisation of text seen before. Shown whenever runs repeat data.",
    **{f"gap_{axis}": f"One row per {symbol} with both methods (k=1, standard knobs): `n` pairs (paired "
                      "t-test, same seed, CPU model and model/data code) or `a vs b` runs (Welch's); `topk`, "
                      "`remoe` mean validation loss; `remoe − topk` their difference (below 0: ReMoE lower) with "
                      "its 95% confidence interval from the same test (one comparison's, not widened for the "
                      "family: an interval clear of 0 with a Holm-adjusted p ≥ 0.05 is not a verdict); `p` raw, "
                      "`p (Holm)` adjusted within the family of this table's rows; `MDE (80%)` the |difference| "
                      "the test would detect with 80% power; `paper` the paper's ReMoE − TopK there; `verdict` "
                      "the claim's at that point (the rules above). The paper's rows: one run each, no interval."
       for axis, symbol in gaps.AXES.items()},
    **{f"pairs_{axis}": f"One row per same-seed pair behind the paired ReMoE − TopK tests (the claim's; the "
                        f"`gap_{axis}` table's where it is made; seed, CPU model and model/data code equal): "
                        "`topk`, `remoe` the pair's validation losses, `remoe − topk` their difference (the "
                        "test's mean, sd and interval are made of these); from the ReMoE run's routing records "
                        "over the second half of training, `remoe experts/token by layer` (TopK routes exactly "
                        "k·G = G in every layer; ReMoE's one λ holds only their total near k·G) and `remoe "
                        "inactive cells`, its (layer, expert) cells whose share of the layer's routed tokens is "
                        "below 1/(8·E·G), of all its cells. Descriptive: no test is made per pair."
       for axis in gaps.AXES},
}


class ReportClobber(UsageError):
    """The output folder holds a report this build would destroy: not one made from these runs."""


def run_ids(roots: list[str], run_dirs) -> list[str]:
    """Each run as its folder relative to the root it was found under: what a report was made from,
    independent of where the roots lie."""
    ids = []
    for d in run_dirs:
        root = next((r for r in roots if os.path.abspath(d).startswith(os.path.abspath(r) + os.sep)), None)
        ids.append(os.path.relpath(d, root) if root else os.path.basename(os.path.normpath(d)))
    return sorted(set(ids))


def check_clobber(out_dir: str, ids: list[str]) -> None:
    """Refuse (ReportClobber) to replace a report that was not made from these runs: one whose record
    (MADE_FROM) lists a run that is not among them, or an index with no record (made by hand, or by a
    version before the record). The same runs, or the same plus new ones (a sweep that went on), pass."""
    index, record = os.path.join(out_dir, "README.md"), os.path.join(out_dir, MADE_FROM)
    if not os.path.exists(index) and not os.path.exists(record):
        return
    try:
        with open(record) as f:
            before = json.load(f)["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ReportClobber(f"--out: {out_dir} holds a report that does not say which runs it was made from "
                            f"(no readable {MADE_FROM}); write elsewhere (e.g. --out outputs/report) or pass "
                            "--force to replace it") from None
    lost = sorted(set(before) - set(ids))
    if lost:
        raise ReportClobber(f"--out: {out_dir} holds the report of other runs ({len(lost)} of its {len(before)} "
                            f"runs are not under --runs, e.g. {lost[0]}); write elsewhere (e.g. --out "
                            "outputs/report) or pass --force to replace it")


def build_report(roots: list[str], out_dir: str = "reports", bench_globs: list[str] | None = None,
                 notes: str | None = None, force: bool = False) -> dict | None:
    """Returns what was made, or None (writing nothing) when no run is usable and `out_dir` already holds
    a report, unless `force`: a typo in --runs must not replace a report with an empty one. Raises
    ReportClobber (writing nothing) when `out_dir` holds a report not made from these runs, unless `force`."""
    col = collect(roots)
    df = col.runs
    if not len(df) and not force and os.path.exists(os.path.join(out_dir, "README.md")):
        return None
    ids = run_ids(roots, df["run_dir"] if len(df) else [])
    if not force:
        check_clobber(out_dir, ids)
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_stages(out_dir)
    final, out_dir = out_dir, tempfile.mkdtemp(prefix=f"{STAGE}{os.getpid()}-", dir=out_dir)
    try:
        made = _build(col, roots, out_dir, bench_globs, notes)
        with open(os.path.join(out_dir, MADE_FROM), "w") as f:
            json.dump({"made_by": "src/report.py", "runs": ids}, f, indent=1)
            f.write("\n")
        _swap_in(out_dir, final)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {**made, "figures": [os.path.join(final, os.path.relpath(p, out_dir)) for p in made["figures"]]}


STAGE, OLD = ".report-partial-", ".report-old-"  # build.py's own folders inside the output folder
MADE_FROM = "report.json"  # which runs a report was made from (check_clobber)
OUTPUTS = ("tables", "figures", MADE_FROM, "README.md")  # what a report owns in its folder; the index last


def _swap_in(stage: str, out_dir: str) -> None:
    """Put a finished report in place of the previous one: its folders, then the index, each by rename (a
    report killed while it was being built changed nothing; the previous outputs go only once the new ones
    are in)."""
    old = tempfile.mkdtemp(prefix=f"{OLD}{os.getpid()}-", dir=out_dir)
    try:
        for name in OUTPUTS:
            if os.path.isdir(os.path.join(out_dir, name)) and name != "README.md":
                os.replace(os.path.join(out_dir, name), os.path.join(old, name))
            if os.path.exists(os.path.join(stage, name)):
                os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_stages(out_dir: str) -> None:
    """Staging folders of a report build that was killed (its process is gone)."""
    remove_leftovers(out_dir, rf"({re.escape(STAGE)}|{re.escape(OLD)})(?P<pid>\d+)-.*")


def _build(col, roots: list[str], out_dir: str, bench_globs, notes) -> dict:
    """The whole report written into out_dir (a staging folder)."""
    df = col.runs
    bench = []
    for p in bench_files(roots, bench_globs):
        try:
            with open(p) as f:
                rows = json.load(f)
            rows = rows.get("rows", []) if isinstance(rows, dict) else rows
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("rows are not JSON objects")
            bench.extend(rows)
        except (OSError, ValueError) as e:
            col.skipped.append((p, f"corrupt bench JSON ({type(e).__name__})"))
    made_tables, made_figs, study_recipe = {}, [], []
    if len(df):
        # the same configuration and seed run by two sweeps is one sample, not two
        ident = RunSummary.keys(identity=True)
        dup = df.astype({c: str for c in ident}).duplicated(subset=ident, keep="first")
        for d in df[dup]["run_dir"]:
            col.skipped.append((d, "duplicate of an identical configuration and seed (counted once)"))
        df = df[~dup].reset_index(drop=True)
        # a study off the paper's recipe throughout: its recipe is its standard (said once in the index);
        # tables, figures and claims then compare its runs as they compare runs at the paper's
        if study_recipe := tables.shared_recipe(df):
            df = df.assign(**{k: v for k, v in RECIPE.items() if k in df})
        builders = {
            "routing_methods": lambda: tables.routing_methods(df),
            "scaling_size": lambda: tables.scaling(df, "size") if df["size"].nunique() > 1 else None,
            "scaling_experts": lambda: tables.scaling(df, "experts"),
            "scaling_granularity": lambda: tables.scaling(df, "granularity"),
            "gap_experts": lambda: gaps.gap_table(df, "experts"),
            "gap_granularity": lambda: gaps.gap_table(df, "granularity"),
            "pairs_experts": lambda: gaps.pair_table(df, "experts"),
            "pairs_granularity": lambda: gaps.pair_table(df, "granularity"),
            "lb_ablation": lambda: tables.lb_ablation(df),
            "sensitivity_lambda0": lambda: tables.sensitivity(df, "lambda0"),
            "sensitivity_alpha": lambda: tables.sensitivity(df, "alpha"),
            "memorisation": lambda: tables.memorisation(df, corpora(roots)),
        }
        for name, fn in builders.items():
            t = fn()
            if t is not None:
                tables.write_table(t, os.path.join(out_dir, "tables"), name)
                made_tables[name] = t
        made_figs = _figures(df, os.path.join(out_dir, "figures"))
    t = tables.throughput(bench)  # benchmark JSON only: no training run is needed, or used
    if t is not None:
        tables.write_table(t, os.path.join(out_dir, "tables"), "throughput")
        made_tables["throughput"] = t
    index = _index(df, col.skipped, made_tables, made_figs, roots, out_dir, notes,
                   claims(df, roots) if len(df) else "", study_recipe)
    write_text_atomic(os.path.join(out_dir, "README.md"), index)
    return {"runs": len(df), "skipped": col.skipped, "tables": sorted(made_tables), "figures": made_figs}


def corpora(roots: list[str]) -> dict:
    """{corpus fingerprint: {train_sequences, seq_len}} from a corpora.json directly under each root: what
    records written before summary.json held those fields need (e.g. reports/runs/corpora.json)."""
    out = {}
    for root in roots:
        try:
            with open(os.path.join(root, "corpora.json")) as f:
                found = json.load(f)
            out.update({k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {})
        except (OSError, ValueError):
            pass
    return out


def bench_files(roots: list[str], patterns: list[str] | None) -> list[str]:
    """Benchmark JSON: the given files/globs, or bench*.json anywhere under the roots (os.walk: symbolic
    links to folders are not followed, so a link loop cannot make the report walk forever)."""
    if patterns:
        return sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
    found = set()
    for root in roots:
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            found.update(os.path.join(dirpath, f) for f in files if f.startswith("bench") and f.endswith(".json"))
    return sorted(found)


def run_setting(r) -> str:
    """One run as a figure names it: method, E, k, G, steps, seed."""
    num = lambda v: "–" if v is None or v != v else f"{v:.0f}"  # noqa: E731
    steps = r.get("steps")
    return (f"{r['model']}, E={num(r.get('experts'))} k={num(r.get('topk'))} G={num(r.get('granularity'))}, "
            f"{'?' if steps is None or steps != steps else f'{steps:,.0f}'} steps, seed {num(r.get('seed'))}")


# One line under each figure in the index (by file name; heatmaps of other methods use fig_heatmap_)
FIGURE_CAPTIONS = {
    "fig_scaling_size": "Validation loss against model size; TopK and ReMoE at k=1, mean ± sd over seeds.",
    "fig_scaling_experts": "Validation loss against the number of experts E (paper Fig. 6b); dashed: dense.",
    "fig_scaling_granularity": "Validation loss against granularity G (paper Fig. 6c); dashed: dense.",
    "fig_gap_experts": "ReMoE − TopK validation loss against E, ours with its confidence interval (the claim's "
                       "test at each E) and the paper's (Fig. 6b's two curves, subtracted).",
    "fig_gap_granularity": "ReMoE − TopK validation loss against G, ours with its confidence interval and the "
                           "paper's (Fig. 6c, subtracted).",
    "fig_remoe_stages": "One ReMoE run's sparsity, λ, LM loss and weighted regulariser by step: Stages I–III "
                        "(paper Fig. 3).",
    "fig_heatmap_": "Share of each layer's routed tokens per expert in one run (paper Fig. 7); × marks an "
                    "expert that gets almost nothing.",
    "fig_domain_": "Share of routed tokens per expert, by domain of the text (code / prose), summed over layers "
                   "(paper Fig. 8).",
    "fig_layer_sparsity": "ReMoE's sparsity per layer on held-out text: which layers route fewer tokens.",
    "fig_active_vs_frequency": "Experts a token activates against how often the token occurs (paper Fig. 9).",
    "fig_flip_rate": "Share of routing decisions that change between probes of the same batch (stability).",
    "fig_val_curves": "Validation loss during training, each method's standard setting, one line per seed.",
}


def figure_caption(path: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    return next((c for k, c in FIGURE_CAPTIONS.items() if name == k or (k.endswith("_") and name.startswith(k))),
                "")


def _figures(df, fig_dir: str) -> list[str]:
    """The paper's figures from the runs' records. Each method's standard setting only (sweep runs such
    as lambda0=1 are not drawn under a bare method name); E, G and the seed label every line."""
    os.makedirs(fig_dir, exist_ok=True)
    label = lambda r: f"{r['model']} E{r['experts']:.0f} G{r['granularity']:.0f} s{r['seed']}"  # noqa: E731
    moe = df[(tables._standard(df, "topk") | tables._standard(df, "remoe")) & (df["topk"] == 1)]
    remoe = moe[moe["model"] == "remoe"]
    std = df[tables._standard(df, "dense")
             | (df.index.isin(moe.index) & (df["experts"] == 8) & (df["granularity"] == 1))]
    curve_label = lambda r: ("dense (ffn_mult 1)" if r["model"] == "dense"  # noqa: E731
                             else f"{r['model']} E8 k1 G1, standard knobs")
    first = lambda d: d.iloc[0] if len(d) else None  # noqa: E731
    std_remoe = first(remoe[(remoe["experts"] == 8) & (remoe["granularity"] == 1)])
    std_remoe = std_remoe if std_remoe is not None else first(remoe)
    std_topk = first(moe[(moe["model"] == "topk") & (moe["experts"] == 8)]) if len(moe) else None
    candidates = [figures.scaling_plot(df, a, fig_dir) for a in ("size", "experts", "granularity")]
    candidates += [figures.gap_plot(df, a, fig_dir) for a in ("experts", "granularity")]
    if std_remoe is not None:
        s = run_setting(std_remoe)
        candidates += [figures.stages_plot(std_remoe["run_dir"], fig_dir, "fig_remoe_stages", s),
                       figures.routing_heatmap(std_remoe["run_dir"], fig_dir, "fig_heatmap_remoe", s),
                       figures.domain_plot(std_remoe["run_dir"], fig_dir, "fig_domain_remoe", s)]
    if std_topk is not None:
        s = run_setting(std_topk)
        candidates += [figures.routing_heatmap(std_topk["run_dir"], fig_dir, "fig_heatmap_topk", s),
                       figures.domain_plot(std_topk["run_dir"], fig_dir, "fig_domain_topk", s)]
    others = df[tables.standard_moe(df) & ~df["model"].isin(["topk", "remoe"])]
    for model, runs in others.groupby("model", sort=True):  # the other routing methods' load heatmaps
        at_e8 = runs[(runs["experts"] == 8) & (runs["granularity"] == 1)]
        row = (at_e8 if len(at_e8) else runs).iloc[0]
        candidates.append(figures.routing_heatmap(row["run_dir"], fig_dir, f"fig_heatmap_{model}", run_setting(row)))
    per_e = [r for _, r in moe.drop_duplicates(["model", "experts", "granularity"]).iterrows()]
    candidates += [
        figures.layer_sparsity_plot([(label(r), r["run_dir"]) for _, r in remoe.drop_duplicates(
            ["experts", "granularity"]).iterrows()], fig_dir),
        figures.active_vs_frequency([(label(r), r["run_dir"]) for _, r in remoe.drop_duplicates(
            ["experts", "granularity"]).iterrows()], fig_dir),
        figures.flips_plot([(label(r), r["run_dir"]) for r in per_e], fig_dir),
        figures.curves_plot([(curve_label(r), r["model"], r["run_dir"]) for _, r in std.iterrows()],
                            fig_dir),
    ]
    return [p for p in candidates if p]


# What a shared recipe option changes, said with it: W2 LR by fan_in moves only FFNs whose hidden width is not
# 4 d_model (remoe.train.optim.lr_multiples), so Dense, and TopK / ReMoE at G=1 and any E, train exactly as under one LR
RECIPE_EFFECT = {("W2 LR by fan_in",): "It changes how a run trains only where an FFN's hidden width differs "
                 "from 4·d_model — Dense×8 (its W2 at lr/8) and experts at G > 1 (lr·G); Dense, and TopK and "
                 "ReMoE at G = 1 (any E), train exactly as under the paper's one LR. "}


def _index(df, skipped, made_tables, made_figs, roots, out_dir, notes, claims_md="", study_recipe=()) -> str:
    lines = ["# Report", ""]
    if notes:  # the findings first: a reader's first lines say what holds (issue 40)
        lines += [notes.strip(), ""]
    lines += ["## How this page is made", "",
              "Generated by `python src/report.py` from the run directories below; regenerate it with the same "
              "command. Rows whose source starts with `paper` are the paper's numbers, each labelled with its own "
              "setting (182M active parameters on The Pile: 30B tokens, or its shorter sensitivity runs): a far "
              "larger setting than CPU runs.", ""]
    if study_recipe:
        lines += [f"**Every run here is configured off the paper's optimizer recipe, the same way: "
                  f"{', '.join(study_recipe)}** (docs/routing-methods.md: optim.ffn_down_lr). "
                  + RECIPE_EFFECT.get(tuple(study_recipe), "")
                  + "Tables, figures and claims compare these runs with each other, and their labels leave it "
                  "out.", ""]
    lines += [RULES, ""]
    if claims_md:
        lines += [claims_md]
    lines += ["## Tables", ""]
    for name, t in made_tables.items():
        lines += [f"### {TITLES[name]}", "", *([CAPTIONS[name], ""] if name in CAPTIONS else []),
                  *([COLUMNS, ""] if "val_loss" in t.columns else []),
                  f"[md](tables/{name}.md) · [tex](tables/{name}.tex) · [csv](tables/{name}.csv)", "",
                  tables.to_markdown(t),
                  provenance(df, t.attrs.get("runs", [])), ""]
    if not made_tables:
        lines += ["(no table: no completed run matches a table's setting)", ""]
    lines += ["## Figures", ""]
    for p in made_figs:
        rel = os.path.relpath(p, out_dir)
        lines += [f"![{os.path.basename(p)}]({rel})", "", *([f"*{figure_caption(p)}*", ""] if figure_caption(p) else [])]
    lines += ["## Runs", "", "Each run's model, for Hugging Face transformers (docs/evaluation-and-export.md; checkpoints are "
              "not part of the committed records): `python src/export.py checkpoint=<run>/checkpoints/last.ckpt "
              "out=<folder>`.", "",
              "| run | model | size | E | k | G | seed | steps | val loss | commit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (_, r), m in zip(df.iterrows(), tables.method(df) if len(df) else []):  # no run: no columns either
        num = lambda v: "–" if v is None or v != v else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {short_path(r['run_dir'], roots)} | {m} | {r['size']} | {num(r['experts'])} | "
                     f"{num(r['topk'])} | {num(r['granularity'])} | {r['seed']} | {r['steps']} | "
                     f"{r['val_loss']:.4f} | {str(r.get('git_commit'))[:12]} |")
    has = df["collapsed_layers"].fillna("").astype(str) != "" if "collapsed_layers" in df else []
    collapsed = df[has] if len(has) else df[:0]
    lines += ["", "## Runs with collapsed layers", "",
              "A layer whose mean experts per token over the last 10% of steps (at most 50) stays below "
              "0.1 k: most tokens skip its FFN.", ""]
    lines += [f"- {short_path(r['run_dir'], roots)}: layer(s) {r['collapsed_layers']} (per-layer sparsity "
              f"{r.get('layer_sparsity', '?')})" for _, r in collapsed.iterrows()] or ["none"]
    lines += ["", "## Missing, failed or duplicate runs", ""]
    lines += [f"- {short_path(d, roots)}: {why}" for d, why in skipped] or ["none"]
    return "\n".join(lines) + "\n"
