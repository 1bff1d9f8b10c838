"""The report stage over real tiny runs: tables trace back to summaries, broken runs are skipped by
name, output is byte-identical across invocations, and a multirun regenerates its report by itself."""

import glob
import json
import logging
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest

from conftest import FAST
from remoe.report.build import build_report
from remoe.report.collect import collect
from remoe.report.tables import aggregate, to_latex, to_markdown
from remoe.train.record import read_summary


def test_renderers_on_a_small_frame():
    df = pd.DataFrame({"model": ["topk", "remoe_x"], "val": ["1.00 ± 0.10", "0.9"]})
    assert to_markdown(df) == "| model | val |\n|---|---|\n| topk | 1.00 ± 0.10 |\n| remoe_x | 0.9 |\n"
    tex = to_latex(df)
    assert tex.startswith("\\begin{tabular}{ll}\n\\toprule\nmodel & val \\\\\n\\midrule\n")
    assert "remoe\\_x & 0.9 \\\\" in tex and "1.00 $\\pm$ 0.10" in tex and tex.endswith("\\bottomrule\n\\end{tabular}\n")


def test_aggregate_mean_std_and_n():
    df = pd.DataFrame({"model": ["a", "a", "b"], "x": [1.0, 3.0, 5.0]})
    out = aggregate(df, ["model"], {"x": 2}, "ours")
    assert out.to_dict("records") == [{"source": "ours", "model": "a", "n": 2, "x": "2.00 ± 1.41"},
                                      {"source": "ours", "model": "b", "n": 1, "x": "5.00"}]


def test_report_over_a_multirun(tiny_sweep, tmp_path):
    out = tmp_path / "rep"
    res = build_report([str(tiny_sweep)], str(out))
    assert res["runs"] == 6 and res["skipped"] == []
    t = pd.read_csv(out / "tables" / "routing_methods.csv", dtype=str)
    ours = t[t["source"].str.startswith("ours")]
    assert sorted(ours["model"]) == ["dense", "remoe", "topk"] and set(ours["n"]) == {"2"}
    paper_rows = t[t["source"].str.startswith("paper")]["model"].tolist()  # Table 2: all seven, and Dense×8
    assert paper_rows == ["dense", "hash", "lory (not implemented)", "sparsemixer-v2 (not implemented)", "ec",
                          "topk", "remoe", "dense×8"]
    # every number traces back to the runs' summaries
    for _, row in ours.iterrows():
        runs = [read_summary(Path(p).parent) for p in glob.glob(str(tiny_sweep / "**" / "summary.json"), recursive=True)]
        vals = [r["val_loss"] for r in runs if r["model"] == row["model"]]
        assert row["val_loss"] == f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"
        choice = [100 * r["downstream"]["remoe_choice"]["acc"] for r in runs if r["model"] == row["model"]]
        assert row["Choice"] == f"{statistics.mean(choice):.2f} ± {statistics.stdev(choice):.2f}"
    for ext in ("md", "tex", "csv"):
        assert (out / "tables" / f"routing_methods.{ext}").exists()
    assert not (out / "tables" / "throughput.md").exists()  # training runs' tokens/s are never compared
    figs = {Path(p).name for p in res["figures"]}
    assert {"fig_remoe_stages.png", "fig_heatmap_remoe.png", "fig_heatmap_topk.png", "fig_val_curves.png",
            "fig_layer_sparsity.png", "fig_active_vs_frequency.png", "fig_flip_rate.png"} <= figs
    index = (out / "README.md").read_text()
    assert "routing_methods" in index and "fig_remoe_stages.png" in index and "## Missing, failed or duplicate runs" in index
    # the claims section states a verdict with the numbers behind it
    assert "## The paper's claims at this scale" in index
    assert "ReMoE reaches a lower validation loss than TopK at every E" in index and "(n=2)" in index
    # ... and the verdict is the rule's, recomputed here from the summaries (one setting: E=8, 2 paired seeds)
    from scipy import stats

    runs = [read_summary(Path(p).parent) for p in glob.glob(str(tiny_sweep / "**" / "summary.json"), recursive=True)]
    by = {m: [r["val_loss"] for r in sorted(runs, key=lambda r: r["seed"]) if r["model"] == m] for m in ("remoe", "topk")}
    p = stats.ttest_rel(by["remoe"], by["topk"]).pvalue
    diff = statistics.mean(by["remoe"]) - statistics.mean(by["topk"])
    word = "inconclusive" if not p < 0.05 else ("holds" if diff < 0 else "does not hold")
    line = next(x for x in index.splitlines() if x.startswith("  - experts=8: topk"))
    assert f"**{word}** (difference {diff:+.4f}, paired t-test over 2 shared seeds, p={p:.3g}" in line, line
    assert f"- **{word}**: ReMoE reaches a lower validation loss than TopK at every E" in index  # at a glance


def test_report_covers_every_routing_method(tiny_sweep, train, tmp_path):
    """The routing baselines trained by a real multirun: rows in the routing-methods table, a load heatmap
    each, and a line each in the inactive-expert claim."""
    _, out = train("-m", "model=hash,ec,auxfree", "seed=1", "eval.n_docs=30", "report_on_multirun_end=false",
                   "logger=csv", *FAST)
    res = build_report([str(tiny_sweep), str(out)], str(tmp_path / "rep"))
    assert res["runs"] == 9 and res["skipped"] == []
    t = pd.read_csv(tmp_path / "rep" / "tables" / "routing_methods.csv", dtype=str)
    ours = t[t["source"].str.startswith("ours")]
    assert sorted(ours["model"]) == ["auxfree", "dense", "ec", "hash", "remoe", "topk"]
    assert ours[ours["model"] == "ec"]["n"].tolist() == ["1"] and ours["Choice"].notna().all()
    figs = {Path(p).name for p in res["figures"]}
    assert {f"fig_heatmap_{m}.png" for m in ("hash", "ec", "auxfree", "topk", "remoe")} <= figs
    index = (tmp_path / "rep" / "README.md").read_text()
    claim = index[index.index("Load balancing leaves no inactive expert"):]
    for m in ("hash, without", "ec, with", "auxfree, with", "topk, with", "remoe, with"):
        assert f"  - {m} load balancing, E=8: inactive cells" in claim, m  # the census, per method and E


def test_small_scale_study_from_stored_runs(tiny_sweep, tmp_path):
    """The small-scale ReMoE study's page: one row per arm, each compared with paper-exact ReMoE under the
    report's rules, and its figures (the committed reports/remoe_small_scale.md is built this way)."""
    from remoe.report.small_scale import build

    path = build([str(tiny_sweep)], str(tmp_path), notes="Findings here.")
    text = Path(path).read_text()
    assert text.count("| remoe ") == 1 and "| topk " in text and "| dense " in text and "Findings here." in text
    assert "- topk reaches a lower validation loss than remoe: **" in text and "(n=" not in text.split("## Arms")[0]
    for fig in ("fig_ss_val_curves.png", "fig_ss_layers_lambda.png"):
        assert (tmp_path / "remoe_small_scale" / "figures" / fig).exists() and fig in text


def test_small_scale_arms_name_every_factor_changed_from_the_standard_setting():
    """An arm is the method plus each factor it changes (and nothing else): runs differing in one factor
    never share a row, and the standard setting's label is the bare method."""
    from remoe.report.small_scale import arms

    std = dict(regularizer="lb_l1", lambda0=1e-8, alpha=1.2, lambda_per_layer=False, router_lr_scale=1.0,
               ffn_mult=None, aux_loss_coef=None, steps=2000, train_tokens=2000 * 4096)
    rows = [dict(std, model="remoe"), dict(std, model="remoe", lambda0=1e-4),
            dict(std, model="remoe", lambda_per_layer=True), dict(std, model="remoe", router_lr_scale=0.1),
            dict(std, model="remoe", steps=1000), dict(std, model="dense", ffn_mult=8),
            dict(std, model="topk", aux_loss_coef=0.0)]
    assert list(arms(pd.DataFrame(rows))) == [
        "remoe", "remoe, λ0=0.0001", "remoe, per-layer λ", "remoe, router LR ×0.1", "remoe, 8,192 tokens/step",
        "dense×8", "topk, aux coef=0"]


def test_runs_off_the_papers_recipe_are_labelled_and_never_a_methods_standard_row():
    """An optim option off the paper's recipe (tables.RECIPE) names the run's row and keeps it out of the
    method's standard rows (the routing-methods table, the claims); a record without the fields is the paper's."""
    from remoe.report.collect import describe
    from remoe.report.tables import _standard, variant
    from remoe.train.record import RunSummary

    def row(**kw):  # as collect() makes it
        return describe(RunSummary.from_json({"model": "dense", "ffn_mult": 1, **kw}).to_json())

    df = pd.DataFrame([row(), row(ffn_mult=8), row(ffn_mult=8, ffn_down_lr="fan_in"),
                       row(model="topk", aux_loss_coef=0.01, router_lr_scale=0.1, ffn_down_lr="fan_in"),
                       row(model="topk", aux_loss_coef=0.01)])
    assert list(variant(df)) == ["dense", "dense×8", "dense×8, W2 LR by fan_in",
                                 "topk, router LR ×0.1, W2 LR by fan_in", "topk"]
    assert list(_standard(df, "dense")) == [True, False, False, False, False]
    assert list(_standard(df, "topk")) == [False, False, False, False, True]


def test_report_is_deterministic(tiny_sweep, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_report([str(tiny_sweep)], str(a))
    build_report([str(tiny_sweep)], str(b))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".md", ".tex", ".csv"))
    assert files
    for f in files:
        if f.name != "README.md":  # the index names its output folder's runs identically too
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "README.md").read_text() == (b / "README.md").read_text()


def test_corrupt_and_failed_runs_are_skipped_by_name(tiny_sweep, tmp_path, caplog):
    root = tmp_path / "runs"
    shutil.copytree(tiny_sweep, root, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    paths = sorted(glob.glob(str(root / "**" / "summary.json"), recursive=True))
    Path(paths[0]).write_text("{ not json")
    broken = Path(paths[0]).parent
    caplog.set_level(logging.WARNING, logger="remoe.report")
    res = build_report([str(root)], str(tmp_path / "rep"))
    assert res["runs"] == 5 and [d for d, _ in res["skipped"]] == [str(broken)]
    assert str(broken) in caplog.text and "corrupt summary.json" in caplog.text
    assert "corrupt summary.json" in (tmp_path / "rep" / "README.md").read_text()
    assert len(collect([str(root)]).runs) == 5


def test_multirun_leaves_its_report_behind(tiny_sweep):
    [sweep_dir] = glob.glob(str(tiny_sweep / "multirun" / "tiny_sweep" / "*"))
    index = Path(sweep_dir) / "report" / "README.md"
    assert index.exists() and "routing_methods" in index.read_text()
    assert (Path(sweep_dir) / "report" / "tables" / "routing_methods.md").exists()


@pytest.mark.parametrize("n", [0])
def test_empty_roots_still_write_an_index(tmp_path, n):
    res = build_report([str(tmp_path / "nothing")], str(tmp_path / "rep"))
    assert res["runs"] == n and (tmp_path / "rep" / "README.md").exists()


def test_throughput_table_comes_from_benchmark_json_with_reps_and_spread(tmp_path):
    import json

    rows = [{"model": m, "size": "tiny", "experts": 8, "granularity": 1, "device": "cpu", "precision": "fp32",
             "train_tokens_per_s": tps, "train_tflops": 0.1, "infer_tflops": 0.2, "reps": 5,
             "train_spread": 0.04}
            for m, tps in (("topk", 39000.0), ("remoe", 40000.0))]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "bench_model.json").write_text(json.dumps({"rows": rows}))
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep"), force=True)
    t = pd.read_csv(tmp_path / "rep" / "tables" / "throughput.csv", dtype=str)
    ours = t[t["source"].str.startswith("ours")]
    assert list(ours["model"]) == ["topk", "remoe"]
    assert set(ours["reps"]) == {"5"} and set(ours["spread"]) == {"±4.0%"}


@pytest.mark.parametrize("study", ["remoe_small_scale", "small_scale_depth4", "small_scale_factors"])
def test_committed_small_scale_page_regenerates_from_its_records(tmp_path, study):
    """Issue 12's pages (reports/remoe_small_scale.md; reports/<study>/remoe_small_scale.md for the studies
    run from one later commit each) are generated from the committed records, not written by hand."""
    from conftest import ROOT
    from remoe.report.small_scale import build

    folder = ROOT / "reports" / study
    notes = folder / "notes.md"
    page = ROOT / "reports" / "remoe_small_scale.md" if study == "remoe_small_scale" else \
        folder / "remoe_small_scale.md"
    path = build([str(folder / "runs")], str(tmp_path), notes=notes.read_text() if notes.exists() else None)
    assert Path(path).read_text() == page.read_text()
    figures = {p.name for p in (page.parent / "remoe_small_scale" / "figures").iterdir()}
    assert figures == {p.name for p in (tmp_path / "remoe_small_scale" / "figures").iterdir()}


def test_small_scale_page_refuses_bad_input_in_one_line(tmp_path):
    """`python -m remoe.report.small_scale` follows the entry scripts' rule: a missing folder, unreadable notes or
    a folder without completed runs is one line and exit 2, before anything is written."""
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "empty").mkdir()
    for args, why in ((["--runs", "nope"], "no such folder"),
                      (["--runs", str(tmp_path / "empty"), "--notes", "nope.md"], "cannot read"),
                      (["--runs", str(tmp_path / "empty")], "no completed run")):
        p = subprocess.run([sys.executable, "-m", "remoe.report.small_scale", *args, "--out", str(tmp_path / "out")],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 2 and why in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "out").exists()


def test_kept_records_report_as_the_runs_do(tiny_sweep, tmp_path):
    """`report.py --keep-records` copies completed runs' compact records (no checkpoints) and never
    replaces one already kept; a report from the records equals the report from the runs."""
    import json
    import lzma
    import subprocess
    import sys

    from conftest import ROOT
    from remoe.train.record import COMPRESSED, RECORD_FILES, keep_records

    src = tmp_path / "src"
    shutil.copytree(tiny_sweep, src, ignore=shutil.ignore_patterns("wandb"))
    failed = Path(sorted(glob.glob(str(src / "**" / "summary.json"), recursive=True))[0]).parent
    s = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**s, "status": "failed"}))
    kept = keep_records(str(src), str(tmp_path / "records"))
    assert len(kept) == 5 and not any(Path(k).name == failed.name and Path(k).parent.name == failed.parent.name
                                      for k in kept)
    stored = {n + ".xz" if n in COMPRESSED else n for n in RECORD_FILES}  # the large files xz-compressed
    for k in kept:
        assert {p.name for p in Path(k).iterdir()} <= stored and (Path(k) / "metrics.csv.xz").exists()
        live = src / Path(k).relative_to(tmp_path / "records")
        assert lzma.decompress((Path(k) / "metrics.csv.xz").read_bytes()) == (live / "metrics.csv").read_bytes()
    marker = Path(kept[0]) / "summary.json"
    marker.write_text(marker.read_text() + " ")
    assert keep_records(str(src), str(tmp_path / "records")) == [] and marker.read_text().endswith(" ")
    marker.write_text(marker.read_text()[:-1])
    shutil.rmtree(failed)  # the same runs on both sides
    build_report([str(src)], str(tmp_path / "a"))
    build_report([str(tmp_path / "records")], str(tmp_path / "b"))
    for f in sorted((tmp_path / "a" / "tables").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "tables" / f.name).read_bytes(), f.name
    p = subprocess.run([sys.executable, str(ROOT / "src" / "report.py"), "--keep-records", str(tmp_path / "nope"),
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2 and "no such folder" in p.stderr and not (tmp_path / "x").exists()
    # a kept record of another setting under the same name (e.g. a study at more steps): refused, nothing copied
    cfg = Path(kept[0]) / "config_resolved.yaml"
    cfg.write_text(cfg.read_text().replace("  max_steps: 6\n", "  max_steps: 60\n"))
    shutil.rmtree(kept[1])
    p = subprocess.run([sys.executable, str(ROOT / "src" / "report.py"), "--keep-records", str(src),
                        str(tmp_path / "records")], capture_output=True, text=True)
    assert p.returncode == 2 and "record of another setting (trainer.max_steps: 60 there, 6 here" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not Path(kept[1]).exists()


# the first replication (size=study, 1,000 steps), kept beside the study4k one that replaced it in reports/
STUDY1K_ARGS = "--runs reports/study1k/runs --notes reports/study1k/notes.md --bench reports/bench/bench_*.json"


def _report_args(where: str) -> list[str]:
    """The committed report's command line: its study driver's REPORT_ARGS (globs expanded from the root)."""
    import re
    import shlex

    from conftest import ROOT
    driver = {"reports": "replicate_cpu.sh", "reports/powered": "powered.sh"}.get(where)
    if driver is None:
        args = STUDY1K_ARGS
    else:
        script = (ROOT / "sweeps" / driver).read_text()
        args = re.search(r'^REPORT_ARGS="(.*)"', script, re.MULTILINE).group(1)
    return [a for pat in shlex.split(args) for a in (sorted(glob.glob(pat, root_dir=ROOT)) if "*" in pat else [pat])]


# the regime check's rows each committed report must show: the powered study runs no ReMoE at E=8
REGIME_ROWS = {"reports": {"dense", "dense×8", "topk", "remoe"}, "reports/study1k": {"dense", "dense×8", "topk", "remoe"},
               "reports/powered": {"dense", "dense×8"}}


@pytest.mark.parametrize("where", ["reports", "reports/study1k", "reports/powered"])
def test_committed_report_regenerates_from_committed_records(tmp_path, where):
    """Issues 20 and 40: reports/ is exactly what the replication's `records` stage makes from the committed
    run records (reports/runs), reports/study1k/ what the same command makes from the first replication's
    (reports/study1k/runs), and reports/powered/ what the powered study's `records` stage makes from its
    records: same tables, index and figure names, byte for byte, and no stale file."""
    import subprocess
    import sys

    from conftest import ROOT

    args = _report_args(where)
    out = tmp_path / "reports"
    p = subprocess.run([sys.executable, "src/report.py", *args, "--out", str(out)], cwd=ROOT, check=False,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    methods = pd.read_csv(out / "tables" / "routing_methods.csv", dtype=str)
    assert REGIME_ROWS[where] <= set(methods["model"])  # the regime check's rows are shown
    lines = (out / "README.md").read_text().splitlines()
    runs = [line.split(" | ") for line in lines if "/model-dense" in line]
    assert runs and all(r[1] == ("dense×8" if "dense8" in r[0] else "dense") for r in runs)  # Runs table too
    made = {f.relative_to(out) for f in out.rglob("*") if f.is_file()}
    committed = {f.relative_to(ROOT / where) for d in ("tables", "figures")
                 for f in (ROOT / where / d).rglob("*") if f.is_file()} | {Path("README.md"), Path("report.json")}
    assert made == committed
    for f in sorted(made):
        if f.suffix != ".png":  # figures: same names; PNG bytes follow the matplotlib build
            assert (out / f).read_bytes() == (ROOT / where / f).read_bytes(), f


def test_a_report_of_other_runs_is_never_replaced_without_force(tiny_sweep, tmp_path):
    """Issue 42: `report.py --runs outputs --out reports` replaced the committed report. A folder holding a
    report made from other runs, or an index that does not say which runs it came from, is refused (one line,
    exit 2, nothing written); the same runs, or those plus new ones, update it; --force replaces it."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    from remoe.report.build import ReportClobber

    a, b = tmp_path / "a", tmp_path / "b"  # two run roots: b holds some of a's runs only, under other names
    shutil.copytree(tiny_sweep, a)
    b.mkdir()
    for d in sorted(p.parent for p in a.rglob("summary.json"))[:2]:
        shutil.copytree(d, b / ("other_" + d.name))
    out = tmp_path / "rep"
    build_report([str(a)], str(out))
    made = json.loads((out / "report.json").read_text())["runs"]
    assert len(made) == 6 and all(not r.startswith("/") for r in made)  # relative to the root: portable
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.raises(ReportClobber, match="report of other runs"):
        build_report([str(b)], str(out))
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # nothing written
    p = subprocess.run([sys.executable, "src/report.py", "--runs", str(b), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--force" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    build_report([str(a), str(b)], str(out))  # the same runs plus new ones: an update
    build_report([str(b)], str(out), force=True)
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 2
    hand = tmp_path / "hand"  # an index nobody recorded the runs of
    hand.mkdir()
    (hand / "README.md").write_text("my notes\n")
    with pytest.raises(ReportClobber, match="does not say which runs"):
        build_report([str(a)], str(hand))
    assert (hand / "README.md").read_text() == "my notes\n"


def test_figures_name_their_runs_with_integer_layer_and_expert_ticks(tmp_path, monkeypatch):
    """Issue 42/43: each figure says which run(s) and setting it shows, layers and experts sit on integer ticks
    (read back from the figures as saved), and legends lie beside the axes, not over the data."""
    from conftest import ROOT
    from remoe.report import figures

    saved = {}
    real_save = figures._save

    def keep(fig, out_dir, name):
        fig.canvas.draw()
        axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
        saved[name] = {
            "titles": [a.get_title() for a in axes] + [fig._suptitle.get_text() if fig._suptitle else ""],
            "xticks": [list(a.get_xticks()) for a in axes], "yticks": [list(a.get_yticks()) for a in axes],
            "xlabels": [[t.get_text() for t in a.get_xticklabels()] for a in axes],
            "legend_outside": [a.get_legend().get_window_extent().x0 >= a.get_window_extent().x1
                               for a in axes if a.get_legend()]}
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(figures, "_save", keep)
    build_report([str(ROOT / "reports" / "runs")], str(tmp_path / "rep"))
    assert {"fig_heatmap_remoe", "fig_heatmap_topk", "fig_domain_remoe", "fig_layer_sparsity",
            "fig_remoe_stages", "fig_scaling_experts", "fig_val_curves"} <= set(saved)
    for name, f in saved.items():
        assert any(t.strip() for t in f["titles"]), name  # every figure says what it shows
        assert all(f["legend_outside"]), name
    for name in ("fig_heatmap_remoe", "fig_heatmap_topk", "fig_remoe_stages", "fig_domain_remoe"):
        title = " ".join(saved[name]["titles"])
        assert "E=8 k=1 G=1" in title and "4,000 steps" in title and "seed 1" in title, (name, title)
    heat = saved["fig_heatmap_remoe"]
    assert heat["xticks"][0] == list(range(8)) and heat["yticks"][0] == [0, 1]  # experts 0-7, layers 0-1
    dom = saved["fig_domain_remoe"]
    assert dom["xticks"][0] == list(range(8)) and dom["xlabels"][0] == [str(e) for e in range(8)]
    assert saved["fig_layer_sparsity"]["xticks"][0] == [0, 1]
    assert saved["fig_scaling_experts"]["xlabels"][0] == ["4", "8", "16", "32"]


def test_a_method_defined_outside_the_package_reaches_the_tables_with_no_report_edit(tmp_path):
    """Issue 41: the report reads a run's standard setting and load balancing from summary.json (written by the
    method's record()), never from method names: a method defined here, in a test file, with its own knob,
    shows up in the routing-methods table at its standard setting only, and as load-balanced or not as it
    says."""
    from dataclasses import dataclass

    from remoe.model import ModelConfig, build_method
    from remoe.model.routing import METHODS, TopK
    from remoe.report import tables
    from remoe.report.collect import collect
    from remoe.train.record import RunSummary

    class Jitter(TopK):
        name = "jittertest"

        @dataclass(frozen=True)
        class Knobs(TopK.Knobs):
            jitter: float = 0.0  # a knob no report code has heard of

    try:
        cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=2, ffn_hidden=64, vocab_size=64,
                          routing="jittertest")
        settings = {"std": {}, "jitter": {"jitter": 0.1}, "nolb": {"load_balancing": False}}
        for label, knobs in settings.items():
            rec = build_method(cfg, **knobs).record()
            for seed in (1, 2):
                d = tmp_path / f"{label}-{seed}"
                d.mkdir()
                s = RunSummary(status="completed", model="jittertest", size="tiny", seed=seed, steps=10,
                               train_tokens=1000, val_loss=4.0 + seed / 100 + len(label) / 10).update(**rec)
                (d / "summary.json").write_text(json.dumps(s.to_json()))
        df = collect([str(tmp_path)]).runs
        by = {label: df[df["run_dir"].str.contains(f"/{label}-")] for label in settings}
        assert by["std"]["off_standard"].tolist() == ["", ""]
        assert by["jitter"]["off_standard"].tolist() == ["jitter", "jitter"]
        assert tables.load_balanced(df).tolist() == [r != "nolb" for r in
                                                     df["run_dir"].map(lambda p: p.rsplit("/", 1)[1][:-2])]
        table = tables.routing_methods(df)
        ours = table[table["source"] != tables.paper.SETTING]
        assert ours["model"].tolist() == ["jittertest"] and ours["n"].tolist() == [2]
        assert ours["val_loss"].iloc[0].startswith("4.315")  # the standard runs' mean (4.31, 4.32), no other
    finally:
        METHODS.pop("jittertest", None)


def test_a_run_without_load_balancing_is_off_standard_only_on_the_lb_axis():
    """A new run's off_standard names the load_balancing switch as well as the summary field it sets (ReMoE:
    regularizer l1): the LB ablation, which allows exactly the LB knobs, must still take it."""
    from remoe.model import ModelConfig, build_method
    from remoe.report.tables import LB_KNOBS, at_standard

    cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=2, ffn_hidden=64, vocab_size=64, routing="remoe")
    rec = build_method(cfg, load_balancing=False).record()
    assert set(rec["off_standard"]) == {"regularizer", "load_balancing"} and rec["load_balanced"] is False
    df = pd.DataFrame([{"off_standard": " ".join(rec["off_standard"])}])
    assert at_standard(df, but=LB_KNOBS).all() and not at_standard(df).any()


def test_compare_prints_what_the_machine_check_page_quotes(tmp_path):
    """`report.py --compare` (remoe/report/compare.py) replaced the studies' private compare scripts: on the
    committed records it prints exactly the block reports/machine_check/README.md quotes (same first difference,
    windows, val loss); bad input is one line and exit 2."""
    import subprocess
    import sys

    from conftest import ROOT

    r = "lb_ablation_cpu/load_balancing-False__model-topk__seed-1"
    p = subprocess.run([sys.executable, "src/report.py", "--compare", f"reports/runs/{r}",
                        f"reports/machine_check/runs/{r}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    page = (ROOT / "reports" / "machine_check" / "README.md").read_text()
    quoted = page.split("```\nmachines:", 1)[1].split("```", 1)[0]
    assert p.stdout.split("\n", 1)[1] == "machines:" + quoted
    assert "train loss identical through step 25, first difference at 26" in p.stdout
    # the same through the `remoe` command (remoe/__main__.py: `remoe report ...` runs src/report.py)
    verb = subprocess.run([sys.executable, "-m", "remoe", "report", "--compare", f"reports/runs/{r}",
                           f"reports/machine_check/runs/{r}"], cwd=ROOT, capture_output=True, text=True)
    assert verb.returncode == 0 and verb.stdout == p.stdout, verb.stderr
    listing = subprocess.run([sys.executable, "-m", "remoe", "--help"], cwd=ROOT, capture_output=True, text=True)
    for name in ("train", "evaluate", "report", "bench", "export", "plan", "prepare-data"):
        assert f"\n  {name} " in listing.stdout and "not found" not in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "remoe", "trian"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no verb 'trian'" in bad.stderr
    for args, why in ((["--compare", str(tmp_path), f"reports/runs/{r}"], "holds no run record"),
                      (["--compare", "nope", "nope"], "no such folder"),
                      (["--compare", f"reports/runs/{r}", f"reports/runs/{r}", "--windows", "9-1"], "FIRST-LAST"),
                      (["--windows", "0-9"], "only with --compare")):
        p = subprocess.run([sys.executable, "src/report.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 2 and why in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
