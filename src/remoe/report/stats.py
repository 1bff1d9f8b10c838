"""The report's verdict rules, written once: used by the claims, printed in the index (RULES).

Three verdicts. A claim **holds** only when the runs show it beyond seed noise, **does not hold** only
when they show the opposite beyond seed noise, and is **inconclusive** otherwise, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

P = 0.05  # two-sided significance level
TREND_PAIRS = 0.8  # share of adjacent steps that must move the claimed way
TREND_RHO = 0.8  # |Spearman rho| a trend needs
REGIME_SIGMAS = 2.0  # the regime check: each gap above this many times the larger seed std

RULES = f"""**How verdicts are decided.** A comparison "A is lower than B" (validation loss) *holds* when a
t-test finds the difference at p < {P} (two-sided) in the claimed direction, *does not hold* when it finds
it at p < {P} in the opposite direction, and is *inconclusive* otherwise — also whenever a side has fewer
than 2 seeds. The test is paired (scipy `ttest_rel`) when both sides ran the same seeds, which see the
same batches (the batch order is a function of seed, corpus and data code), else Welch's (`ttest_ind`,
unequal variances). A trend "y falls (rises) with x" *holds* when at least {TREND_PAIRS:.0%} of adjacent
steps move that way and Spearman ρ has that sign with |ρ| ≥ {TREND_RHO}, *does not hold* when the same is
true the other way, and is inconclusive otherwise (fewer than 3 points included). A table row pools only
runs that differ in nothing but the seed (every field of a setting's identity in `runs.RunSummary`);
mean ± sample std over seeds, n = seeds. The *regime check* (can this scale rank routing methods?) asks
more: Dense×8 < TopK < Dense with each gap above {REGIME_SIGMAS:g}× the larger of the two sides' seed
standard deviations, at least 3 seeds a side; the claims about routing methods are read against it."""


@dataclass(frozen=True)
class Verdict:
    word: str  # "holds" | "does not hold" | "inconclusive"
    why: str

    def __str__(self) -> str:
        return f"**{self.word}** ({self.why})"


def compare(a: pd.Series, b: pd.Series) -> Verdict:
    """The claim mean(a) < mean(b). a, b: values indexed by seed."""
    a, b = a.dropna(), b.dropna()
    if len(a) < 2 or len(b) < 2:
        return Verdict("inconclusive", f"n={len(a)} vs n={len(b)}: fewer than 2 seeds on a side")
    paired = sorted(a.index) == sorted(b.index) and a.index.is_unique
    diff = a.mean() - b.mean()
    if paired:
        spread = np.ptp(a.sort_index().to_numpy() - b.sort_index().to_numpy())
    else:
        spread = np.ptp(a.to_numpy()) + np.ptp(b.to_numpy())
    if spread == 0:  # no seed noise at all: a t statistic is undefined; the sign is the same at every seed
        if diff == 0:
            return Verdict("inconclusive", "no difference")
        return Verdict("holds" if diff < 0 else "does not hold",
                       f"difference {diff:+.4f}, the same at every one of {len(a)} seeds (no variance "
                       "to test)")
    if paired:
        res = stats.ttest_rel(a.sort_index().to_numpy(), b.sort_index().to_numpy())
        test = f"paired t-test over {len(a)} shared seeds"
    else:
        res = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=False)
        test = f"Welch's t-test, n={len(a)} vs {len(b)}"
    p = float(res.pvalue)
    detail = f"difference {diff:+.4f}, {test}, p={p:.3g}"
    if p < P:
        return Verdict("holds" if diff < 0 else "does not hold", detail)
    return Verdict("inconclusive", detail + f" ≥ {P}")


def clear_gap(a: pd.Series, b: pd.Series, min_seeds: int = 3) -> Verdict:
    """The regime check's comparison: mean(a) < mean(b) by more than REGIME_SIGMAS x the larger sample
    std of the two (values indexed by seed)."""
    a, b = a.dropna(), b.dropna()
    if len(a) < min_seeds or len(b) < min_seeds:
        return Verdict("inconclusive", f"n={len(a)} vs n={len(b)}: fewer than {min_seeds} seeds on a side")
    gap, sd = b.mean() - a.mean(), max(a.std(ddof=1), b.std(ddof=1))
    detail = f"gap {gap:+.4f}, {REGIME_SIGMAS:g}× the larger std = {REGIME_SIGMAS * sd:.4f}"
    if gap > REGIME_SIGMAS * sd:
        return Verdict("holds", detail)
    if -gap > REGIME_SIGMAS * sd:
        return Verdict("does not hold", detail + ", the other way")
    return Verdict("inconclusive", detail + ": within noise")


def trend(x: list[float], y: list[float], sign: int) -> Verdict:
    """The claim: y moves with sign `sign` (+1 rises, -1 falls) as x grows. x sorted ascending."""
    pts = [(xi, yi) for xi, yi in zip(x, y)
           if yi is not None and not (isinstance(yi, float) and math.isnan(yi))]
    if len(pts) < 3:
        return Verdict("inconclusive", f"{len(pts)} points: fewer than 3")
    xs, ys = zip(*sorted(pts))
    steps = np.sign(np.diff(ys))
    rho = float(stats.spearmanr(xs, ys).statistic)
    share_with, share_against = float((steps == sign).mean()), float((steps == -sign).mean())
    detail = f"Spearman ρ {rho:+.2f}, {share_with:.0%} of adjacent steps the claimed way"
    if share_with >= TREND_PAIRS and rho * sign >= TREND_RHO:
        return Verdict("holds", detail)
    if share_against >= TREND_PAIRS and -rho * sign >= TREND_RHO:
        return Verdict("does not hold", detail)
    return Verdict("inconclusive", detail)


def all_of(verdicts: list[Verdict], what: str) -> Verdict:
    """A claim made for every point: holds if it holds at each, does not hold if it fails at any,
    else inconclusive."""
    if not verdicts:
        return Verdict("inconclusive", f"no {what} with both methods")
    words = [v.word for v in verdicts]
    if "does not hold" in words:
        return Verdict("does not hold", f"fails at {words.count('does not hold')} of {len(words)} {what}")
    if all(w == "holds" for w in words):
        return Verdict("holds", f"at all {len(words)} {what}")
    return Verdict("inconclusive",
                   f"holds at {words.count('holds')} of {len(words)} {what}, the rest within noise")


def inactive_threshold(n_experts: int) -> float:
    """An expert is inactive when it gets less than 1/8 of a fair share of its layer's routed tokens:
    share < 1/(8 E G) with E G fine-grained experts (the paper's 1/64 at E=8, G=1)."""
    return 1.0 / (8 * n_experts)
