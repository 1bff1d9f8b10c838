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
from scipy.optimize import brentq

P = 0.05  # two-sided significance level
TREND_PAIRS = 0.8  # share of adjacent steps that must move the claimed way
TREND_RHO = 0.8  # |Spearman rho| a trend needs
REGIME_SIGMAS = 2.0  # the regime check: each gap above this many times the larger seed std

POWER = 0.8  # the power a minimum detectable effect is stated at

RULES = f"""**How verdicts are decided.** A comparison "A is lower than B" (validation loss) *holds* when a
t-test finds the difference at p < {P} (two-sided) in the claimed direction, *does not hold* when it finds
it at p < {P} in the opposite direction, and is *inconclusive* otherwise — also whenever a side has fewer
than 2 seeds. **Pairs are really paired:** the test is paired (scipy `ttest_rel`) only when both sides ran
the same (seed, CPU model, model/data code) triples — the CPU model with its torch thread count where the
record has it; the same seed gives the same batches, and a routed run moves by about one seed's spread
between CPUs (`reports/machine_check/`) — else Welch's (`ttest_ind`, unequal
variances); each line says which, and why not paired. **Several tests, one claim:** a claim made for every
point of an axis ("at every E") is a family of tests; p-values are Holm-adjusted within it (both raw and
adjusted p are shown) and each point's verdict uses the adjusted p. **What a test could see:** every
comparison states its *minimum detectable effect* (MDE): the difference its n and observed spread would detect
with {POWER:.0%} power at p < {P} (noncentral t), so an inconclusive verdict says how large an effect it could
have missed; where the paper reports an effect at that point, the seeds that would detect it. A trend "y falls
(rises) with x" *holds* when at least {TREND_PAIRS:.0%} of adjacent steps move that way and Spearman ρ has
that sign with |ρ| ≥ {TREND_RHO}, *does not hold* when the same is true the other way, and is inconclusive
otherwise (fewer than 3 points included); where each point is a mean over seeds (ReMoE − TopK against E),
the least-squares slope over the points must also differ from zero at p < {P} in that direction, its variance
from each point's standard error over seeds (Welch–Satterthwaite degrees of freedom), or the trend is
inconclusive. A table row pools only runs that differ in nothing but the seed
(every field of a setting's identity in `train.record.RunSummary`); mean ± sample std over seeds, n = seeds. The
*regime check* (can this scale rank routing methods?) asks more: Dense×8 < TopK < Dense with each gap above
{REGIME_SIGMAS:g}× the larger of the two sides' seed standard deviations, at least 3 seeds a side; the claims
about routing methods are read against it."""


@dataclass(frozen=True)
class Verdict:
    word: str  # "holds" | "does not hold" | "inconclusive"
    why: str

    def __str__(self) -> str:
        return f"**{self.word}** ({self.why})"


def power(effect: float, sd: float, n: int, paired: bool = True, n_b: int | None = None,
          alpha: float = P) -> float:
    """Power of the two-sided t-test to find a true difference `effect` (noncentral t). paired: n pairs whose
    differences have sample std `sd`; else Welch with n and n_b runs, each side's std `sd`."""
    if paired:
        df, se = n - 1, sd / math.sqrt(n)
    else:
        n_b = n_b or n
        df, se = n + n_b - 2, sd * math.sqrt(1 / n + 1 / n_b)
    if df < 1 or not se > 0:
        return float("nan")
    t = stats.t.ppf(1 - alpha / 2, df)
    ncp = abs(effect) / se
    up, low = stats.nct.sf(t, df, ncp), stats.nct.cdf(-t, df, ncp)
    if not math.isfinite(up):  # scipy's noncentral t gives nan far in its tails: the normal limit there
        up = float(stats.norm.sf(t - ncp))
    return float(up + (low if math.isfinite(low) else 0.0))


def mde(sd: float, n: int, paired: bool = True, n_b: int | None = None, alpha: float = P,
        target: float = POWER) -> float | None:
    """The smallest |difference| detected with `target` power (None when untestable)."""
    if not sd > 0 or (n - 1 if paired else n + (n_b or n) - 2) < 1:
        return None
    hi = sd
    while power(hi, sd, n, paired, n_b, alpha) < target:
        hi *= 2
    return float(brentq(lambda d: power(d, sd, n, paired, n_b, alpha) - target, 0.0, hi, xtol=sd * 1e-6))


def seeds_needed(effect: float, sd: float, alpha: float = P, target: float = POWER, most: int = 10_000) -> int | None:
    """Paired seeds needed to detect `effect` with `target` power at `alpha` (two-sided), given the sd of
    the paired differences; None beyond `most`."""
    if not sd > 0:
        return None
    n = 2
    while power(effect, sd, n, True, None, alpha) < target:
        n = n + 1 if n < 64 else int(n * 1.25)
        if n > most:
            return None
    return n


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment within one family (None: no test, left out of the family)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Comparison:
    """The test of the claim mean(a) < mean(b), before a verdict: difference, p (None: untestable), which
    test, the spread it saw and the minimum detectable effect (MDE) at POWER."""

    diff: float
    p: float | None
    test: str
    n: int
    n_b: int
    sd: float | None = None  # paired: std of the differences; Welch: the larger side's std
    paired: bool = False
    note: str = ""  # why untestable (fewer than 2 seeds, no variance)
    ci: tuple[float, float] | None = None  # the difference's two-sided (1 − P) confidence interval, same test
    se: float | None = None  # the difference's standard error under the same test
    df: float | None = None  # its degrees of freedom (n − 1 paired; Welch–Satterthwaite otherwise)

    @property
    def mde(self) -> float | None:
        return None if self.sd is None else mde(self.sd, self.n, self.paired, self.n_b)

    def verdict(self, p_adjusted: float | None = None, family: int = 1, paper_effect: float | None = None) -> Verdict:
        """Holds / does not hold / inconclusive on the (Holm-adjusted, within a family of `family`) p; the
        detail names the test, raw and adjusted p, the MDE and the seeds the paper's effect would need."""
        if self.p is None:
            if self.note == "same":  # no variance: the sign is the same at every seed
                return Verdict("holds" if self.diff < 0 else "does not hold",
                               f"difference {self.diff:+.4f}, the same at every one of {self.n} seeds (no variance "
                               "to test)") if self.diff else Verdict("inconclusive", "no difference")
            return Verdict("inconclusive", self.note)
        p = self.p if p_adjusted is None else p_adjusted
        ps = f"p={self.p:.3g}" + (f", Holm-adjusted over {family} tests p={p:.3g}" if family > 1 else "")
        detail = f"difference {self.diff:+.4f}, {self.test}, {ps}"
        if (m := self.mde) is not None:  # a root-find: once per verdict
            detail += f"; MDE {m:.4f} at {POWER:.0%} power"
        if paper_effect is not None and self.sd is not None:
            need = seeds_needed(paper_effect, self.sd if self.paired else self.sd * math.sqrt(2),
                                alpha=P / family)
            detail += (f"; the paper's {paper_effect:+.3f} would need {need} paired seeds" if need else
                       f"; the paper's {paper_effect:+.3f} would need over 10,000 seeds") + \
                (f" at p < {P}/{family}" if family > 1 else "")
        if p < P:
            return Verdict("holds" if self.diff < 0 else "does not hold", detail)
        return Verdict("inconclusive", detail + f"; p ≥ {P}")


def t_test(a: pd.Series, b: pd.Series) -> Comparison:
    """The comparison mean(a) < mean(b). a, b: values indexed by their pairing key ((seed, CPU model, code
    class) tuples, or plain seeds): paired when both sides hold the same keys, else Welch's."""
    a, b = a.dropna(), b.dropna()
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, None, "", len(a), len(b), note=f"n={len(a)} vs n={len(b)}: fewer than 2 seeds on a side")
    paired = set(a.index) == set(b.index) and a.index.is_unique and b.index.is_unique
    if paired:
        d = a.sort_index().to_numpy() - b.sort_index().to_numpy()
        spread, sd = np.ptp(d), float(np.std(d, ddof=1))
    else:
        spread = np.ptp(a.to_numpy()) + np.ptp(b.to_numpy())
        sd = float(max(a.std(ddof=1), b.std(ddof=1)))
    if spread == 0:
        return Comparison(diff, None, "", len(a), len(b), note="same")
    if paired:
        res = stats.ttest_rel(a.sort_index().to_numpy(), b.sort_index().to_numpy())
        test = f"paired t-test over {len(a)} shared seeds"
    else:
        res = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=False)
        test = f"Welch's t-test, n={len(a)} vs {len(b)}" + _why_unpaired(a.index, b.index)
    ci, df = res.confidence_interval(1 - P), float(res.df)
    se = float((ci.high - ci.low) / 2 / stats.t.ppf(1 - P / 2, df))
    return Comparison(diff, float(res.pvalue), test, len(a), len(b), sd, paired, ci=(float(ci.low), float(ci.high)),
                      se=se, df=df)


def _why_unpaired(ia: pd.Index, ib: pd.Index) -> str:
    seeds = lambda ix: {k[0] if isinstance(k, tuple) else k for k in ix}  # noqa: E731
    if seeds(ia) != seeds(ib):
        return " (not paired: the sides ran different seeds)"
    if len(seeds(ia)) == len(ia) and len(seeds(ib)) == len(ib):
        return " (not paired: a seed's runs trained on different CPUs, thread counts or model/data code)"
    return " (not paired: a side holds several runs of one seed)"


def compare(a: pd.Series, b: pd.Series, paper_effect: float | None = None) -> Verdict:
    """The claim mean(a) < mean(b), one test on its own (a family of one)."""
    return t_test(a, b).verdict(paper_effect=paper_effect)


def family(comparisons: list[Comparison], paper_effects: list[float | None] | None = None) -> list[Verdict]:
    """Verdicts of one claim's family of tests, on Holm-adjusted p-values."""
    adjusted = holm([c.p for c in comparisons])
    effects = paper_effects or [None] * len(comparisons)
    return [c.verdict(p, len([x for x in comparisons if x.p is not None]), e)
            for c, p, e in zip(comparisons, adjusted, effects)]


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


def trend(x: list[float], y: list[float], sign: int, noise: list[tuple[float, float] | None] | None = None) -> Verdict:
    """The claim: y moves with sign `sign` (+1 rises, -1 falls) as x grows. x sorted ascending.

    noise: where each y is a mean over seeds, its (standard error, degrees of freedom). Then the ranks are not
    enough: the least-squares slope of y on x must also differ from 0 beyond seed noise (slope_test), in the
    claimed direction to hold, the other way to not hold; without a noise estimate at every point such a trend
    is inconclusive."""
    pts = [(xi, yi, ni) for xi, yi, ni in zip(x, y, noise or [None] * len(x))
           if yi is not None and not (isinstance(yi, float) and math.isnan(yi))]
    if len(pts) < 3:
        return Verdict("inconclusive", f"{len(pts)} points: fewer than 3")
    xs, ys, ns = zip(*sorted(pts, key=lambda t: t[0]))
    steps = np.sign(np.diff(ys))
    rho = float(stats.spearmanr(xs, ys).statistic)
    share_with, share_against = float((steps == sign).mean()), float((steps == -sign).mean())
    detail = f"Spearman ρ {rho:+.2f}, {share_with:.0%} of adjacent steps the claimed way"
    ranks = 1 if share_with >= TREND_PAIRS and rho * sign >= TREND_RHO else \
        -1 if share_against >= TREND_PAIRS and -rho * sign >= TREND_RHO else 0
    slope = 0
    if noise is not None:
        if any(n is None for n in ns):
            return Verdict("inconclusive", detail + "; a point without a seed-noise estimate (fewer than 2 seeds)")
        b, (lo, hi), p = slope_test(list(xs), list(ys), list(ns))
        detail += f"; slope {b:+.4f} per unit of x, {1 - P:.0%} CI [{lo:+.4f}, {hi:+.4f}], p={p:.3g} over the seeds"
        slope = int(np.sign(b)) * sign if p < P else 0
        if not slope:
            detail += f" (p ≥ {P}: within noise)"
    if ranks == 1 and (noise is None or slope == 1):
        return Verdict("holds", detail)
    if ranks == -1 and (noise is None or slope == -1):
        return Verdict("does not hold", detail)
    return Verdict("inconclusive", detail)


def slope_test(x: list[float], y: list[float], noise: list[tuple[float, float]]) -> tuple[float, tuple[float, float], float]:
    """The least-squares slope of y on x, where each y_i is a mean with standard error se_i on dof_i degrees of
    freedom (noise): a linear contrast b = Σ c_i y_i, c_i = (x_i − x̄) / Σ (x − x̄)², with variance
    Σ c_i² se_i² and Welch–Satterthwaite degrees of freedom. Returns (b, its two-sided (1 − P) CI, p)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    se, dof = (np.asarray(v, float) for v in zip(*noise))
    c = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
    parts = c**2 * se**2
    var = parts.sum()
    b = float(c @ y)
    if var <= 0:
        return b, (b, b), 0.0 if b else 1.0
    df = var**2 / (parts**2 / dof).sum()
    half = float(stats.t.ppf(1 - P / 2, df) * math.sqrt(var))
    return b, (b - half, b + half), float(2 * stats.t.sf(abs(b) / math.sqrt(var), df))


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
