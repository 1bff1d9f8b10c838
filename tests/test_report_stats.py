"""The report's statistics on small hand-made run records (no training): rows never pool unlike runs,
verdicts account for seeds, trends need more than a sign, the inactive-expert threshold scales with E."""

import json

import pandas as pd

from remoe.report import build_report
from remoe.report.claims import _remoe_vs_topk, claims, inactive_experts
from remoe.report.collect import collect
from remoe.report.stats import compare, trend
from remoe.report.tables import sensitivity
from remoe.runs import RunSummary

BASE = dict(status="completed", size="tiny", topk=1, granularity=1, experts=8, steps=400,
            train_tokens=1638400, corpus="c0", precision="32-true", ffn_mult=1, git_commit="0" * 40)
KNOBS = {"remoe": dict(regularizer="lb_l1", lambda0=1e-8, alpha=1.2), "topk": dict(aux_loss_coef=0.01)}


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
    line = next(x for x in text.splitlines() if "settles" in x)
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
    regime = text.split("Regime check —")[1].split("\n- ")[0]  # the paper's recipe: its runs alone
    assert "**holds** (at all 2 gaps)" in regime and "Dense×8 3.4020 ± 0.0010 (n=3) < TopK" in regime
    fan_in = text.split("Regime check (every run: W2 LR by fan_in) —")[1].split("\n- ")[0]
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
    assert index.count("Every run here trains off the paper's optimizer recipe, the same way: W2 LR by fan_in") == 1
    assert "- Regime check — Dense×8 < TopK < Dense" in index and "Dense×8 3.2920 ± 0.0010 (n=3)" in index
    assert "experts=16: topk 3.3120 ± 0.0010 (n=3), remoe 3.3020 ± 0.0010 (n=3)" in index
    methods = pd.read_csv(tmp_path / "rep" / "tables" / "routing_methods.csv")
    assert {"dense", "dense×8", "topk", "remoe"} <= set(methods["model"])
    # one run at the paper's recipe among them: the paper's is the standard again, fan_in runs are labelled
    record(tmp_path / "runs", "paper_t", "topk", 1, 3.40)
    build_report([str(tmp_path / "runs")], str(tmp_path / "rep2"))
    index = (tmp_path / "rep2" / "README.md").read_text()
    assert "Every run here trains off" not in index and "Regime check (every run: W2 LR by fan_in)" in index


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
    line = next(x for x in text.splitlines() if "Settling time falls as alpha" in x)
    assert line.endswith("— 1.05: 341, 1.2: 96, 1.3: 140.")
    line = next(x for x in text.splitlines() if "sparsity settles at" in x)
    assert "(the rule: every run settles, median ≤ 200 steps)" in line  # the rule, not a finding
