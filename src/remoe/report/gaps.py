"""ReMoE − TopK at each point of the E or G axis, written once: the tests the claims rest on (paired where
the runs pair, Holm-adjusted within the axis' family), the table that lists them with their confidence
intervals, and the points the gap figure draws next to the paper's."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..model.stats import expert_share, experts_per_token
from . import paper
from .collect import inactive_cells, second_half_routing
from .provenance import by_pair, with_pairs
from .stats import POWER, Comparison, P, Verdict, family, holm, t_test
from .tables import _ours, _standard, identity_keys

AXES = {"experts": "E", "granularity": "G"}
PAPER_VAL = {"experts": paper.VAL_E, "granularity": paper.VAL_G}  # the paper's val loss per method, per point


@dataclass(frozen=True)
class Gap:
    """One setting of the axis with both methods: its runs, the test of ReMoE < TopK (`test.diff` is
    ReMoE − TopK, negative where ReMoE is lower), the paper's ReMoE − TopK there, and the verdict on the
    family's Holm-adjusted p."""

    value: float  # the axis value
    setting: str  # "experts=64", plus any other identity field that varies between the axis' settings
    topk: pd.DataFrame
    remoe: pd.DataFrame
    test: Comparison
    paper: float | None
    p_adjusted: float | None
    verdict: Verdict


def paper_gap(axis: str, value) -> float | None:
    """The paper's ReMoE − TopK validation loss at this point of the E or G axis (182M, 30B tokens)."""
    table = PAPER_VAL[axis]
    try:
        return table["remoe"][int(value)] - table["topk"][int(value)]
    except (KeyError, TypeError, ValueError):
        return None


def remoe_vs_topk(df: pd.DataFrame, axis: str) -> list[Gap]:
    """ReMoE's val loss below TopK's at each value of `axis` (standard settings, k=1, the other axis at the
    paper's E=8 or G=1): one family of tests, one per setting with both methods, in axis order."""
    df = with_pairs(df)
    moe = df[(_standard(df, "topk") | _standard(df, "remoe")) & (df["topk"] == 1)]
    moe = moe[moe["granularity"] == 1] if axis == "experts" else moe[moe["experts"] == 8]
    if moe.empty:
        return []
    # one comparison per setting: the axis value and any other identity field that varies (never pooled)
    keys = [k for k in identity_keys(moe, [axis, "model"]) if k != "model"]
    rows = []
    for key, g in moe.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        t, r = g[g["model"] == "topk"], g[g["model"] == "remoe"]
        if len(t) and len(r):
            setting = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, key))
            rows.append((key[0], setting, t, r, t_test(by_pair(r), by_pair(t)), paper_gap(axis, key[0])))
    tests = [c for *_, c, _ in rows]
    verdicts = family(tests, [e for *_, e in rows])
    adjusted = holm([c.p for c in tests])
    return [Gap(v, s, t, r, c, e, p, verdict) for (v, s, t, r, c, e), p, verdict in zip(rows, adjusted, verdicts)]


def one_per_value(found: list[Gap]) -> list[Gap]:
    """The gaps whose axis value has no other setting, in axis order: the points of a curve or a trend (two
    settings at one value would be two y for one x)."""
    values = [g.value for g in found]
    return sorted((g for g in found if values.count(g.value) == 1), key=lambda g: g.value)


def _num(v, digits: int = 4, sign: bool = True) -> str:
    return "–" if v is None or v != v else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _without_lone_setting(out: pd.DataFrame, axis: str) -> pd.DataFrame:
    """`out` without its setting column when each row's setting names nothing but its axis value."""
    if (out["setting"] == [f"{axis}={v}" for v in out[AXES[axis]]]).all():
        return out.drop(columns="setting")
    return out


def gap_table(df: pd.DataFrame, axis: str) -> pd.DataFrame | None:
    """The family of remoe_vs_topk as a table: per setting the pairs (or runs) tested, each method's mean,
    ReMoE − TopK with its 95% confidence interval, the test, raw and Holm-adjusted p, the minimum
    detectable effect and the verdict; then the paper's ReMoE − TopK at each point (one run each, no
    interval). None with fewer than two settings on the axis (no family, no curve)."""
    gaps = remoe_vs_topk(df, axis)
    if len({g.value for g in gaps}) < 2:
        return None
    runs = pd.concat([x for g in gaps for x in (g.topk, g.remoe)])
    ours = _ours(runs)
    rows = []
    for g in gaps:
        c = g.test
        rows.append({"source": ours, AXES[axis]: f"{g.value:g}", "setting": g.setting,
                     "n": f"{c.n}" if c.paired else f"{c.n} vs {c.n_b}",
                     "topk": _num(g.topk["val_loss"].mean(), sign=False),
                     "remoe": _num(g.remoe["val_loss"].mean(), sign=False),
                     "remoe − topk": _num(c.diff),
                     f"{1 - P:.0%} CI": "–" if c.ci is None else f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]",
                     "test": "paired" if c.paired else ("Welch" if c.p is not None else "–"),
                     "p": "–" if c.p is None else f"{c.p:.3g}",
                     "p (Holm)": "–" if g.p_adjusted is None else f"{g.p_adjusted:.3g}",
                     f"MDE ({POWER:.0%})": _num(c.mde, sign=False),
                     "paper": _num(g.paper, 3), "verdict": g.verdict.word})
    out = _without_lone_setting(pd.DataFrame(rows), axis)
    table = PAPER_VAL[axis]
    ref = [{"source": paper.SETTING, AXES[axis]: f"{v:g}", "n": "1", "topk": f"{table['topk'][v]:.3f}",
            "remoe": f"{table['remoe'][v]:.3f}", "remoe − topk": _num(paper_gap(axis, v), 3)}
           for v in sorted(table["topk"])]
    out = pd.concat([out, pd.DataFrame(ref)], ignore_index=True).fillna("–")
    out.attrs["runs"] = sorted(runs["run_dir"]) if "run_dir" in runs else []
    return out


def pair_table(df: pd.DataFrame, axis: str) -> pd.DataFrame | None:
    """The paired tests of remoe_vs_topk seed by seed: each pair's validation losses and ReMoE − TopK (the
    differences the test's mean, sd and interval are made of), with what the ReMoE run's routing records
    show over the second half of training — experts per token in each layer (TopK routes exactly k·G in
    every layer) and its inactive (layer, expert) cells. None when no setting on the axis pairs."""
    rows, runs = [], []
    for g in remoe_vs_topk(df, axis):
        if not g.test.paired:
            continue
        topk = dict(zip(g.topk["pair"], g.topk["val_loss"]))
        for _, r in g.remoe.sort_values("seed", kind="mergesort").iterrows():
            routed = second_half_routing(r["run_dir"])  # (counts, tokens), read once for both columns
            per_token, share = (None, None) if routed is None else (experts_per_token(*routed), expert_share(routed[0]))
            rows.append({AXES[axis]: f"{g.value:g}", "setting": g.setting, "seed": f"{r['seed']:g}",
                         "topk": _num(topk[r["pair"]], sign=False), "remoe": _num(r["val_loss"], sign=False),
                         "remoe − topk": _num(r["val_loss"] - topk[r["pair"]]),
                         "remoe experts/token by layer": "–" if per_token is None else
                         " · ".join(f"{x:.2f}" for x in per_token),
                         "remoe inactive cells": "–" if share is None else
                         f"{int(inactive_cells(share).sum())} of {share.size}"})
        runs += list(g.topk["run_dir"]) + list(g.remoe["run_dir"])
    if not rows:
        return None
    out = _without_lone_setting(pd.DataFrame(rows), axis)
    out.attrs["runs"] = sorted(runs)
    return out
