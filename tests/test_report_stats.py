"""The report's statistics on small hand-made run records (no training): rows never pool unlike runs,
verdicts account for seeds, trends need more than a sign, the inactive-expert threshold scales with E."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from remoe.report.build import build_report
from remoe.report.claims import _remoe_vs_topk, claims
from remoe.report.collect import collect, inactive_experts
from remoe.report.stats import compare, slope_test, trend
from remoe.report.tables import sensitivity
from remoe.train.record import RunSummary

BASE = dict(status="completed", size="tiny", topk=1, granularity=1, experts=8, steps=400,
            train_tokens=1638400, corpus="c0", precision="32-true", ffn_mult=1, git_commit="0" * 40)
KNOBS = {"remoe": dict(regularizer="lb_l1", lambda0=1e-8, alpha=1.2), "topk": dict(aux_loss_coef=0.01)}


def _claim(text: str, words: str) -> str:
    """A claim's own line (the at-a-glance list above the claims repeats its title)."""
    return next(x for x in text.splitlines() if x.startswith("- ") and not x.startswith("- **") and words in x)


def record(root, name, model, seed, val_loss, **kw):
    d = root / name
    d.mkdir(parents=True)
    s = RunSummary().update(**{**BASE, **KNOBS.get(model, {}), "model": model, "seed": seed,
                               "val_loss": val_loss, **kw})
    s.write(str(d))
    return d


def test_a_row_never_pools_runs_that_differ_in_more_than_the_seed(tmp_path):
    # lambda0=1e-8 at G=1 (2 seeds) and at G=2 (1 seed): the old table pooled them into one n=3 row
    for i, (g, lam, seed, v) in enumerate([(1, 1e-8, 1, 4.50), (1, 1e-8, 2, 4.52), (2, 1e-8, 1, 4.70),
                                           (1, 1e-4, 1, 4.60)]):
        record(tmp_path, f"r{i}", "remoe", seed, v, granularity=g, lambda0=lam, settling_step=100 + i)
    t = sensitivity(collect([str(tmp_path)]).runs, "lambda0")
    ours = t[t["source"].str.startswith("ours")]
    rows = {(r["lambda0"], r["granularity"]): r["n"] for _, r in ours.iterrows()}
    assert rows == {("1e-08", "1"): 2, ("1e-08", "2"): 1, ("0.0001", "1"): 1} or \
        rows == {(1e-08, "1"): 2, (1e-08, "2"): 1, (0.0001, "1"): 1}


def test_a_weak_non_monotone_trend_is_inconclusive():
    v = trend([1e-16, 1e-12, 1e-8, 1e-4, 1.0], [140, 120, 86, 272, 110], -1)  # rho = -0.2, a bump at 1e-4
    assert v.word == "inconclusive" and "ρ -0.20" in v.why
    assert trend([1, 2, 3, 4, 5], [414, 211, 110, 80, 52], -1).word == "holds"
    assert trend([1, 2, 3, 4, 5], [52, 80, 110, 211, 414], -1).word == "does not hold"


def test_a_single_seed_comparison_is_inconclusive():
    v = compare(pd.Series([4.40], index=[1]), pd.Series([4.60], index=[1]))
    assert v.word == "inconclusive" and "fewer than 2 seeds" in v.why


def test_a_clear_difference_over_three_seeds_holds_and_its_reverse_does_not():
    a = pd.Series([4.50, 4.51, 4.52], index=[1, 2, 3])
    b = pd.Series([4.60, 4.62, 4.61], index=[1, 2, 3])
    assert compare(a, b).word == "holds" and "paired" in compare(a, b).why
    assert compare(b, a).word == "does not hold"
    noisy = pd.Series([4.45, 4.70, 4.55], index=[4, 5, 6])  # other seeds: Welch, overlapping
    assert compare(a, noisy).word == "inconclusive" and "Welch" in compare(a, noisy).why


def test_claims_use_the_rule_per_setting(tmp_path):
    for seed, (t, r) in enumerate([(4.60, 4.50), (4.62, 4.51), (4.61, 4.52)], start=1):
        record(tmp_path, f"t{seed}", "topk", seed, t)
        record(tmp_path, f"r{seed}", "remoe", seed, r)
    df = collect([str(tmp_path)]).runs
    verdict, lines, gaps = _remoe_vs_topk(df, "experts")
    assert verdict.word == "holds" and "paired t-test over 3 shared seeds" in lines[0]
    record(tmp_path, "t9", "topk", 9, 4.0, steps=2000, train_tokens=8192000)  # another budget: not pooled
    record(tmp_path, "r9", "remoe", 9, 4.1, steps=2000, train_tokens=8192000)
    verdict, lines, _ = _remoe_vs_topk(collect([str(tmp_path)]).runs, "experts")
    assert len(lines) == 2 and verdict.word == "inconclusive" and any("n=1 vs n=1" in x for x in lines)


def test_a_run_that_never_settles_is_named_with_its_sparsity(tmp_path):
    """study4k ReMoE G=4 seed 2 (λ stuck at 2.8e-45) ended at 0.818 against 0.875: the claim names it."""
    for seed, st in ((1, 76), (2, None), (3, 80)):
        record(tmp_path / "sweep", f"remoe-{seed}", "remoe", seed, 4.5, settling_step=st,
               target_sparsity=0.875, sparsity=0.8183 if st is None else 0.875)
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    line = _claim(text, "settles")
    assert "**does not hold**" in line and "2/3 runs settle" in line
    assert line.endswith("Never settled: sweep/remoe-2 (tail sparsity 0.818, target 0.875).")


def test_a_fair_share_expert_of_32_is_not_inactive(tmp_path):
    """At E=32 a fair share is 1/32; the paper's 1/64 (for E=8) would call healthy experts inactive."""
    d = record(tmp_path, "e32", "topk", 1, 4.5, experts=32)
    n = 320_000  # routed (token, expert) pairs per layer
    layer0 = [n // 40, n // 80] + [(n - n // 40 - n // 80) // 30] * 30  # 1/40 and 1/80 of the tokens
    layer1 = [n // 320] + [(n - n // 320) // 31] * 31  # 1/320: below 1/(8*32) = 1/256
    recs = {"step": 0, "counts": [layer0, layer1], "tokens": [n, n]}
    (d / "routing.jsonl").write_text(json.dumps(recs) + "\n")
    assert inactive_experts(str(d)) == 1  # only the 1/320 expert (1/64 would also count 1/80)
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    assert "1/(8·E·G)" in text and "1 of 1 load-balanced runs have any" in text


def test_load_balancing_is_judged_at_one_setting_never_pooled(tmp_path):
    """With against without load balancing compares runs that differ only in the LB knob: ReMoE LB-L1 at E=32
    (many inactive cells) must not be pooled with E=8 against plain L1, which ran at E=8 only."""
    def rec(name, seed, inactive, experts=8, **kw):
        d = record(tmp_path, name, "remoe", seed, 4.5, experts=experts, **kw)
        n = 8000 * experts  # routed pairs per layer: a fair share each, `inactive` of them 1/(16E) of it
        low = n // (16 * experts)
        counts = [low] * inactive + [(n - low * inactive) // (experts - inactive)] * (experts - inactive)
        (d / "routing.jsonl").write_text(json.dumps({"step": 0, "counts": [counts, counts], "tokens": [n, n]})
                                         + "\n")
    for seed, (l1, e32) in enumerate(((1, 3), (2, 3), (1, 3)), start=1):
        rec(f"lb-e8-{seed}", seed, 0)
        rec(f"lb-e32-{seed}", seed, e32, experts=32)
        rec(f"l1-e8-{seed}", seed, l1, regularizer="l1")
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    line = next(x for x in text.splitlines() if "remoe (E=" in x)
    # cells per run: 2 layers x `inactive`; E=8 only: 0 with LB against 2, 4, 2 without: paired over 3 seeds
    assert line.startswith("  - remoe (E=8, k=1, G=1): inactive cells with LB 0.0 ± 0.0 (n=3), without "
                           "2.7 ± 1.2 (n=3): fewer with LB **inconclusive**"), line
    assert "remoe (E=32" not in text and "no setting run both" not in text


def test_the_index_states_the_rules_and_each_tables_commits(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        record(runs, f"t{seed}", "topk", seed, 4.6 + seed / 100, cpu={"model": "AMD EPYC", "flags": []})
        record(runs, f"r{seed}", "remoe", seed, 4.5 + seed / 100, git_commit="1" * 40 + "-dirty",
               cpu={"model": "Intel(R) Xeon(R) Processor" if seed == 2 else "AMD EPYC", "flags": []})
        record(runs, f"d{seed}", "dense", seed, 4.55, experts=None, topk=None, granularity=None)
    build_report([str(runs)], str(tmp_path / "rep"))
    index = (tmp_path / "rep" / "README.md").read_text()
    assert "How verdicts are decided" in index and "Welch" in index
    # the machines too: a routed run at one seed takes another path on another CPU's float kernels
    assert ("trained at commit(s) 000000000000 (4), 111111111111-dirty (2) on AMD EPYC (3), "
            "Intel(R) Xeon(R) Processor (1), unknown (2);") in index
    assert index.count("**Trained on different CPUs") == 1  # the routing-methods table only
    assert "cannot be checked here" in index


def test_the_index_lists_runs_with_collapsed_layers(tmp_path):
    runs = tmp_path / "runs"
    record(runs, "ok", "remoe", 1, 4.5, collapsed_layers=[], layer_sparsity=[0.87, 0.88])
    record(runs, "bad", "remoe", 2, 4.6, collapsed_layers=[1], layer_sparsity=[0.78, 0.99])
    build_report([str(runs)], str(tmp_path / "rep"))
    index = (tmp_path / "rep" / "README.md").read_text()
    section = index.split("## Runs with collapsed layers")[1].split("##")[0]
    assert "bad: layer(s) 1 (per-layer sparsity 0.78 0.99)" in section and "ok:" not in section


def test_regime_check_needs_each_gap_above_twice_the_larger_std(tmp_path):
    """Dense×8 < TopK < Dense, each gap > 2× the larger seed std, 3 seeds a side; the per-layer λ line
    compares with the global controller's runs."""
    from remoe.report.stats import clear_gap

    s = lambda *v: pd.Series(v, index=[1, 2, 3])  # noqa: E731
    assert clear_gap(s(3.40, 3.41, 3.42), s(3.50, 3.51, 3.49)).word == "holds"  # gap 0.09 > 2 x 0.01
    assert clear_gap(s(3.40, 3.46, 3.52), s(3.50, 3.56, 3.62)).word == "inconclusive"  # 0.10 < 2 x 0.06
    assert clear_gap(s(3.60, 3.61, 3.62), s(3.50, 3.51, 3.49)).word == "does not hold"
    assert clear_gap(pd.Series([3.40, 3.41]), pd.Series([3.50, 3.51])).word == "inconclusive"  # 2 seeds
    for seed in (1, 2, 3):
        record(tmp_path, f"d8_{seed}", "dense", seed, 3.40 + seed / 1000, ffn_mult=8)
        record(tmp_path, f"t_{seed}", "topk", seed, 3.45 + seed / 1000)
        record(tmp_path, f"d_{seed}", "dense", seed, 3.47 + seed / 1000)
        record(tmp_path, f"r_{seed}", "remoe", seed, 3.46 + seed / 1000, lambda_per_layer=False)
        record(tmp_path, f"rl_{seed}", "remoe", seed, 3.50 + seed / 500, lambda_per_layer=True)
        for model, v, mult in (("dense", 3.48, 8), ("topk", 3.45, 1), ("dense", 3.47, 1)):  # another recipe
            record(tmp_path, f"fan_{model}{mult}_{seed}", model, seed, v + seed / 1000, ffn_mult=mult,
                   ffn_down_lr="fan_in")
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    regime = text.split("\n- Regime check —")[1].split("\n- ")[0]  # the paper's recipe: its runs alone
    assert "**holds** (at all 2 gaps)" in regime and "Dense×8 3.4020 ± 0.0010 (n=3) < TopK" in regime
    fan_in = text.split("\n- Regime check (every run: W2 LR by fan_in) —")[1].split("\n- ")[0]
    assert "Dense×8 3.4820 ± 0.0010 (n=3) < TopK 3.4520" in fan_in and "**does not hold**" in fan_in
    per_layer = [x for x in text.splitlines() if x.startswith("- Per-layer λ")]
    assert len(per_layer) == 1 and "**does not hold**" in per_layer[0] and "global 3.4620" in per_layer[0]


def test_a_study_off_the_recipe_throughout_is_compared_within_its_recipe(tmp_path):
    """size=study4k trains every run at W2 LR by fan_in: the index says so once, and the claims and tables
    read its runs as standard (before, no run was any method's standard row: every claim was empty)."""
    for seed in (1, 2, 3):
        for name, model, v, kw in (("d8", "dense", 3.29, dict(ffn_mult=8)), ("t", "topk", 3.33, {}),
                                   ("d", "dense", 3.39, {}), ("r", "remoe", 3.36, {}),
                                   ("t16", "topk", 3.31, dict(experts=16)), ("r16", "remoe", 3.30, dict(experts=16))):
            record(tmp_path / "runs", f"{name}_{seed}", model, seed, v + seed / 1000, ffn_down_lr="fan_in", **kw)
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep"))
    index = (tmp_path / "rep" / "README.md").read_text()
    assert index.count("Every run here is configured off the paper's optimizer recipe, the same way: W2 LR by "
                       "fan_in") == 1 and "train exactly as under the paper's one LR" in index
    assert "- Regime check — Dense×8 < TopK < Dense" in index and "Dense×8 3.2920 ± 0.0010 (n=3)" in index
    assert "experts=16: topk 3.3120 ± 0.0010 (n=3), remoe 3.3020 ± 0.0010 (n=3)" in index
    methods = pd.read_csv(tmp_path / "rep" / "tables" / "routing_methods.csv")
    assert {"dense", "dense×8", "topk", "remoe"} <= set(methods["model"])
    # one run at the paper's recipe among them: the paper's is the standard again, fan_in runs are labelled
    record(tmp_path / "runs", "paper_t", "topk", 1, 3.40)
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep2"))
    index = (tmp_path / "rep2" / "README.md").read_text()
    assert "Every run here is configured off" not in index and "Regime check (every run: W2 LR by fan_in)" in index


def test_the_settling_trend_pools_only_the_sweeps_runs(tmp_path):
    """study4k: the α = 1.2 point of "settling time falls as α grows" averaged the per-layer λ runs (125, 309,
    111 steps) into the global λ's (136, 76, 76): 139 instead of 96. Only the standard setting but α counts."""
    for seed, st in ((1, 136), (2, 76), (3, 76)):
        record(tmp_path, f"std-{seed}", "remoe", seed, 4.5, settling_step=st)
    for seed, st in ((1, 125), (2, 309), (3, 111)):
        record(tmp_path, f"pl-{seed}", "remoe", seed, 4.5, settling_step=st, lambda_per_layer=True)
    record(tmp_path, "g4", "remoe", 1, 4.5, settling_step=900, granularity=4)  # another setting: not pooled
    record(tmp_path, "a105", "remoe", 1, 4.5, settling_step=341, alpha=1.05)
    record(tmp_path, "a13", "remoe", 1, 4.5, settling_step=140, alpha=1.3)
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    line = _claim(text, "Settling time falls as alpha")
    assert line.endswith("— 1.05: 341, 1.2: 96, 1.3: 140.")
    line = _claim(text, "sparsity settles at")
    assert "(the rule: every run settles, median ≤ 200 steps)" in line  # the rule, not a finding


# ---- issue 39: what each verdict could see, families of tests, pairs that are really paired ------------------
def test_power_and_the_minimum_detectable_effect_match_the_noncentral_t():
    """At E=8 the paired ReMoE − TopK sd is ≈ 0.028: 3 seeds detect the paper's 0.015 about 10% of the time;
    the MDE is the effect detected with 80% power, and the seeds the paper's effect needs are the first n that
    reach it (checked against a direct simulation of the paired t-test)."""
    import numpy as np
    from scipy import stats as st

    from remoe.report.stats import mde, power, seeds_needed

    assert 0.08 < power(0.015, 0.028, 3) < 0.10
    m = mde(0.028, 3)
    assert abs(power(m, 0.028, 3) - 0.8) < 1e-6 and 0.085 < m < 0.095
    n = seeds_needed(0.015, 0.028)
    assert power(0.015, 0.028, n) >= 0.8 > power(0.015, 0.028, n - 1)
    rng = np.random.default_rng(0)
    d = rng.normal(0.015, 0.028, size=(20000, n))  # paired differences at the paper's effect
    hits = st.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05
    assert abs(hits.mean() - power(0.015, 0.028, n)) < 0.015
    assert power(0.015, 0.028, 3, paired=False, n_b=3) < power(0.015, 0.028, 3)  # Welch: less power
    assert seeds_needed(0.015, 0.028, alpha=0.05 / 4) > n  # a family's strictest Holm level needs more


def test_holm_adjusts_within_a_claims_family_and_the_verdict_uses_it(tmp_path):
    from remoe.report.stats import holm

    assert holm([0.038, 0.58, 0.29, 0.24]) == pytest.approx([0.152, 0.72, 0.72, 0.72])
    assert holm([0.01, None, 0.04]) == pytest.approx([0.02, None, 0.04])
    # ReMoE below TopK at E=4 alone (raw p < 0.05), level at E=8 / 16 / 32: one family of four tests
    deltas = {4: (-0.050, -0.060, -0.055), 8: (0.01, -0.02, 0.03), 16: (0.02, -0.01, 0.0), 32: (-0.01, 0.02, 0.0)}
    for e, ds in deltas.items():
        for seed, d in enumerate(ds, start=1):
            record(tmp_path, f"t{e}_{seed}", "topk", seed, 3.40 + seed / 100, experts=e)
            record(tmp_path, f"r{e}_{seed}", "remoe", seed, 3.40 + seed / 100 + d, experts=e)
    verdict, lines, _ = _remoe_vs_topk(collect([str(tmp_path)]).runs, "experts")
    e4 = next(x for x in lines if x.startswith("experts=4"))
    assert "p=0.00" in e4 and "Holm-adjusted over 4 tests p=" in e4 and "**holds**" in e4  # 0.0026 x 4 < 0.05
    assert "MDE" in e4 and "the paper's -0.010 would need" in e4
    assert verdict.word == "inconclusive"  # holds at E=4 only: the claim "at every E" is not shown
    single = compare(pd.Series([3.35, 3.36, 3.345], index=[1, 2, 3]), pd.Series([3.40, 3.43, 3.39], index=[1, 2, 3]))
    assert single.word == "holds" and "Holm" not in single.why  # a family of one: no adjustment


def test_runs_are_paired_only_on_the_same_seed_cpu_and_model_code(tmp_path):
    """A machine moves a routed run by about one seed's spread: the same seed on another CPU (or another
    torch thread count, where recorded: issue 40), or another model code, is not a pair (Welch's test, said
    so); same seed, CPU and model code (commits that differ only outside src/remoe/model and src/remoe/data
    count as one code) is."""
    same = ("4e9e3759886b583316ccc1a2dcc794515324de08", "13636db350c98bf0cbb47245b30248c884ffa1cb")  # reports only
    other = "897bd36d7519de7cad73ffabe5cb5bba90ef0a8d"  # before the λ floor: model code differs
    cpu = lambda m, **kw: {"model": m, "flags": [], **kw}  # noqa: E731
    cases = {"paired": [(cpu("A"), same[0], cpu("A"), same[1])] * 3,
             "threads": [(cpu("A", threads=2), same[0], cpu("A", threads=2), same[0])] * 2
             + [(cpu("A", threads=2), same[0], cpu("A", threads=1), same[0])],
             "cpu": [(cpu("A"), same[0], cpu("A"), same[0])] * 2 + [(cpu("A"), same[0], cpu("B"), same[0])],
             "code": [(cpu("A"), same[0], cpu("A"), other)] * 3}
    for name, rows in cases.items():
        root = tmp_path / name
        for seed, (ct, gt, cr, gr) in enumerate(rows, start=1):
            record(root, f"t{seed}", "topk", seed, 3.40 + seed / 100, cpu=ct, git_commit=gt)
            record(root, f"r{seed}", "remoe", seed, 3.39 + seed / 100 + seed / 1000, cpu=cr, git_commit=gr)
        _, lines, _ = _remoe_vs_topk(collect([str(root)]).runs, "experts")
        if name == "paired":
            assert "paired t-test over 3 shared seeds" in lines[0], lines[0]
        else:
            assert "Welch's t-test, n=3 vs 3 (not paired: a seed's runs trained on different CPUs, thread counts or model/data " \
                   "code)" in lines[0], lines[0]
    # part of a study done: the sides' seeds differ, and the line says so (the powered study mid-stage)
    a = pd.Series([3.41, 3.42, 3.43], index=[1, 2, 3])
    b = pd.Series([3.40, 3.45, 3.41, 3.44, 3.42], index=[1, 2, 3, 4, 5])
    assert compare(a, b).why.count("Welch's t-test, n=3 vs 5 (not paired: the sides ran different seeds)") == 1
    two = pd.Series([3.41, 3.44, 3.42], index=[1, 1, 2])
    assert "(not paired: a side holds several runs of one seed)" in compare(two, b.loc[[1, 2]]).why


def test_paper_rows_carry_their_own_budget_and_the_index_says_what_a_shared_recipe_changes(tmp_path):
    for seed in (1, 2):
        for lam, st in ((1e-8, 90), (1e-4, 60)):
            record(tmp_path / "runs", f"l{lam}_{seed}", "remoe", seed, 3.4, lambda0=lam, settling_step=st,
                   ffn_down_lr="fan_in")
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep"))
    t = pd.read_csv(tmp_path / "rep" / "tables" / "sensitivity_lambda0.csv")
    sources = set(t["source"])
    assert any(s.startswith("paper") and "shorter sensitivity runs" in s for s in sources)
    assert not any("30B tokens" in s for s in sources if s.startswith("paper"))
    index = (tmp_path / "rep" / "README.md").read_text()
    assert "Dense, and TopK and ReMoE at G = 1 (any E), train exactly as under the paper's one LR" in index


def test_the_memorisation_table_reads_each_pass_end(tmp_path):
    """Runs that see their corpus twice or more: validation − training loss at the end of each pass (the
    last validation at or before it, the mean train loss of the pass's last 50 steps), with a pass =
    train_sequences / sequences per step; records without train_sequences use the root's corpora.json."""
    import csv

    def run(name, model, seed, train_at, val_at, **kw):
        d = record(tmp_path / "runs", name, model, seed, 3.4, steps=300, train_tokens=300 * 32 * 128, **kw)
        with open(d / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train/lm_loss", "val/loss"])
            for s in range(300):
                w.writerow([s, train_at(s), ""])
                if s % 50 == 49:
                    w.writerow([s, "", val_at(s)])
    # 3,200 training sequences, 32 per step: a pass is 100 steps
    run("topk1", "topk", 1, lambda s: 4.0 - (s // 100) * 0.5, lambda s: 4.1, train_sequences=3200, seq_len=128)
    run("remoe1", "remoe", 1, lambda s: 4.0 - (s // 100) * 0.3, lambda s: 4.1, corpus="fp")
    (tmp_path / "runs" / "corpora.json").write_text(json.dumps({"fp": {"train_sequences": 3200, "seq_len": 128}}))
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep"))
    t = pd.read_csv(tmp_path / "rep" / "tables" / "memorisation.csv", dtype=str).set_index("variant")
    # pass k ends at step 100 k: train loss then 4.0 - 0.5 (k - 1) for TopK, 4.0 - 0.3 (k - 1) for ReMoE
    assert [t.loc["topk", f"pass {k}"] for k in (1, 2, 3)] == ["0.100", "0.600", "1.100"]
    assert [t.loc["remoe", f"pass {k}"] for k in (1, 2, 3)] == ["0.100", "0.400", "0.700"]
    assert "grows by after pass 1 is memorisation" in (tmp_path / "rep" / "README.md").read_text()


def test_a_comparison_states_its_confidence_interval():
    """Issue 40: the gap curve's intervals come from the verdict's own test: paired, the mean difference ±
    t(0.975, n−1)·sd/√n; Welch, the same from Welch's standard error and degrees of freedom."""
    from scipy import stats as st

    from remoe.report.stats import t_test
    a = pd.Series([4.50, 4.53, 4.49, 4.55], index=[1, 2, 3, 4])
    b = pd.Series([4.58, 4.57, 4.60, 4.56], index=[1, 2, 3, 4])
    c = t_test(a, b)
    d = (a - b).to_numpy()
    half = st.t.ppf(0.975, 3) * d.std(ddof=1) / len(d) ** 0.5
    assert c.paired and c.ci == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    b.index = [5, 6, 7, 8]  # other seeds: Welch
    c = t_test(a, b)
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 4
    dof = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 3)
    half = st.t.ppf(0.975, dof) * (va + vb) ** 0.5
    assert not c.paired and c.ci == pytest.approx((c.diff - half, c.diff + half), abs=1e-12)
    assert t_test(a[:1], b).ci is None  # untestable: no interval


def test_the_gap_table_and_figure_are_the_claims_tests(tmp_path):
    """Issue 40: ReMoE − TopK per E lists the claim's own tests (the same verdicts, Holm over the rows), with
    each interval, next to the paper's difference at every E; the figure is drawn from the same tests."""
    from remoe.report.figures import gap_plot
    from remoe.report.gaps import gap_table
    vals = {8: [(4.60, 4.50), (4.62, 4.51), (4.61, 4.52)], 32: [(4.40, 4.41), (4.45, 4.42), (4.41, 4.44)]}
    for e, pairs in vals.items():
        for seed, (t, r) in enumerate(pairs, start=1):
            record(tmp_path, f"t{e}_{seed}", "topk", seed, t, experts=e)
            record(tmp_path, f"r{e}_{seed}", "remoe", seed, r, experts=e)
    df = collect([str(tmp_path)]).runs
    table = gap_table(df, "experts")
    ours = table[table["source"].str.startswith("ours")].set_index("E")
    _, lines, _ = _remoe_vs_topk(df, "experts")
    assert list(ours.index) == ["8", "32"] and list(ours["test"]) == ["paired", "paired"]
    assert ours.loc["8", "verdict"] == "holds" and "**holds**" in lines[0]
    assert ours.loc["32", "verdict"] == "inconclusive" and "**inconclusive**" in lines[1]
    assert ours.loc["8", "remoe − topk"] == f"{(4.50 + 4.51 + 4.52 - 4.60 - 4.62 - 4.61) / 3:+.4f}"
    lo, hi = (float(x) for x in ours.loc["32", "95% CI"].strip("[]").split(", "))
    assert lo < 0 < hi and ours.loc["8", "paper"] == "-0.015"  # the paper's 1.921 − 1.936 at E=8
    p8, p32 = (float(ours.loc[e, "p"]) for e in ("8", "32"))
    assert float(ours.loc["8", "p (Holm)"]) == pytest.approx(2 * min(p8, p32), rel=1e-2)  # Holm over 2
    paper_rows = table[table["source"].str.startswith("paper")]
    assert list(paper_rows["E"]) == ["4", "8", "16", "32", "64", "128"]
    (tmp_path / "fig").mkdir()
    assert gap_plot(df, "experts", str(tmp_path / "fig")).endswith("fig_gap_experts.png")
    assert gap_table(df[df["experts"] == 8], "experts") is None  # one point: no family, no curve
    assert gap_plot(df[df["experts"] == 8], "experts", str(tmp_path / "fig")) is None


def test_the_pair_table_lists_each_paired_tests_differences_and_routing(tmp_path):
    """Issue 40: the seed-by-seed table under the gap table is made of the paired tests' own pairs (their mean
    is the table's ReMoE − TopK), with each ReMoE run's experts per token per layer and inactive cells over
    the second half of training; an unpaired setting (other seeds) is left out, and no pair, no table."""
    from remoe.report.gaps import gap_table, pair_table
    vals = {8: [(4.60, 4.50), (4.62, 4.51), (4.61, 4.52)], 32: [(4.40, 4.41), (4.45, 4.42), (4.41, 4.44)]}
    for e, pairs in vals.items():
        for seed, (t, r) in enumerate(pairs, start=1):
            record(tmp_path, f"t{e}_{seed}", "topk", seed, t, experts=e)
            d = record(tmp_path, f"r{e}_{seed}", "remoe", seed, r, experts=e)
            n = 1000 * e  # routed (token, expert) pairs: layer 0 spread evenly, layer 1 on 2 experts only
            early = {"step": 0, "tokens": [1000, 1000], "counts": [[n // e] * e, [n // e] * e]}
            late = {"step": 10, "tokens": [1024, 1024], "counts": [[3 * seed * 1024 // e] * e,
                                                                    [512, 512] + [0] * (e - 2)]}
            (d / "routing.jsonl").write_text("\n".join(json.dumps(x) for x in (early, late)) + "\n")
    for seed in (4, 5):  # E=16: TopK and ReMoE at different seeds, so Welch's: not a pair
        record(tmp_path, f"t16_{seed}", "topk", seed, 4.5 + seed / 100, experts=16)
        record(tmp_path, f"r16_{seed + 2}", "remoe", seed + 2, 4.4 + seed / 50, experts=16)
    df = collect([str(tmp_path)]).runs
    table = pair_table(df, "experts")
    assert list(table.columns) == ["E", "seed", "topk", "remoe", "remoe − topk", "remoe experts/token by layer",
                                   "remoe inactive cells"]
    assert list(zip(table["E"], table["seed"])) == [(e, s) for e in ("8", "32") for s in ("1", "2", "3")]
    row = table.iloc[4]  # E=32, seed 2: the second half is the late record alone
    assert (row["topk"], row["remoe"], row["remoe − topk"]) == ("4.4500", "4.4200", "-0.0300")
    assert row["remoe experts/token by layer"] == "6.00 · 1.00" and row["remoe inactive cells"] == "30 of 64"
    gap = gap_table(df, "experts")
    gap = gap[gap["source"].str.startswith("ours")].set_index("E")
    for e in ("8", "32"):
        mean = sum(float(x) for x in table[table["E"] == e]["remoe − topk"]) / 3
        assert f"{mean:+.4f}" == gap.loc[e, "remoe − topk"]  # the test's pairs, nothing else
    assert "16" not in set(table["E"]) and gap.loc["16", "test"] == "Welch"
    assert pair_table(df[df["experts"] == 16], "experts") is None


def test_a_claim_with_nothing_tested_is_not_stated(tmp_path):
    """Issue 40's regime stage has TopK and dense runs only: no ReMoE − TopK verdict is stated (not even
    'inconclusive') until some setting has both methods; then the E claim appears, the G claim does not."""
    for seed in (1, 2, 3):
        record(tmp_path, f"t{seed}", "topk", seed, 4.17 + seed / 100)
        record(tmp_path, f"d{seed}", "dense", seed, 4.21 + seed / 100, experts=None, topk=None, granularity=None)
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    assert "ReMoE reaches a lower validation loss" not in text
    for seed in (1, 2, 3):
        record(tmp_path, f"r{seed}", "remoe", seed, 4.16 + seed / 100)
    text = claims(collect([str(tmp_path)]).runs, [str(tmp_path)])
    assert "than TopK at every E" in text and "than TopK at every G" in text  # E=8 is G=1: both axes


def test_the_index_opens_with_the_findings(tmp_path):
    """Issue 40: a report's first lines are its notes (what holds, what does not), before how the page is made
    and the rules."""
    for seed in (1, 2):
        record(tmp_path / "runs", f"t{seed}", "topk", seed, 4.1 + seed / 100)
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep"), notes="**In plain words.** Nothing holds yet.\n")
    lines = (tmp_path / "rep" / "README.md").read_text().splitlines()
    assert lines[:3] == ["# Report", "", "**In plain words.** Nothing holds yet."]
    assert lines.index("## How this page is made") < next(i for i, x in enumerate(lines) if "How verdicts" in x)


def test_a_trend_of_means_over_seeds_holds_only_beyond_seed_noise():
    """Three monotone means (ReMoE's gap at E = 32, 64, 128 in the powered study): the ranks alone would say
    'holds'; with each point's standard error over its seeds the slope must clear noise too."""
    x, y = [5.0, 6.0, 7.0], [-0.0285, -0.0120, -0.0032]
    assert trend(x, y, +1).word == "holds"  # ranks only (one seed a point: the λ0 / α sweeps)
    noisy = [(0.0435 / 5**0.5, 4), (0.0312 / 7**0.5, 6), (0.0191 / 7**0.5, 6)]
    v = trend(x, y, +1, noisy)
    assert v.word == "inconclusive" and "within noise" in v.why
    tight = [(0.001, 6)] * 3
    assert trend(x, y, +1, tight).word == "holds"
    assert trend(x, y[::-1], +1, tight).word == "does not hold"
    assert trend(x, y, +1, [tight[0], None, tight[2]]).word == "inconclusive"  # no noise estimate at a point


def test_the_slope_test_is_ordinary_least_squares_when_the_points_share_their_noise():
    x, y, se = [1.0, 2.0, 4.0, 8.0], [0.3, 0.1, 0.4, 0.9], 0.2
    b, (lo, hi), p = slope_test(x, y, [(se, 1e9)] * 4)  # ~infinite dof: a z-test
    fit = np.polyfit(x, y, 1)
    sxx = sum((xi - np.mean(x)) ** 2 for xi in x)
    z = fit[0] / (se / sxx**0.5)
    assert b == pytest.approx(fit[0], rel=1e-12)
    assert p == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), rel=1e-6)
    assert hi - b == pytest.approx(scipy_stats.norm.ppf(0.975) * se / sxx**0.5, rel=1e-6)


def test_a_comparison_carries_its_standard_error_and_degrees_of_freedom():
    """The trend's noise per point comes from the point's own test: paired sd/√n on n − 1, Welch's otherwise."""
    from remoe.report.stats import t_test

    a, b = pd.Series([4.50, 4.53, 4.52], index=[1, 2, 3]), pd.Series([4.60, 4.62, 4.66], index=[1, 2, 3])
    c = t_test(a, b)
    assert c.paired and c.df == 2 and c.se == pytest.approx(np.std(a - b, ddof=1) / 3**0.5, rel=1e-9)
    w = pd.Series([4.45, 4.70, 4.55, 4.61], index=[4, 5, 6, 7])
    c = t_test(a, w)
    va, vb = a.var(ddof=1) / 3, w.var(ddof=1) / 4
    assert not c.paired and c.se == pytest.approx((va + vb) ** 0.5, rel=1e-9)
    assert c.df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3), rel=1e-9)
