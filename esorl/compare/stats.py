"""The comparison's statistics, fixed before any run (docs/ESOLM.md §10).

Every arm of one seed sees the same prompts, the same first rollouts and the same held-out
evaluation noise, so arms are compared with ``exact`` through **per-seed paired differences**
``d_s = metric(arm, s) − metric(exact, s)``:

- effect size: the mean of ``d`` with its 95 % Student-t confidence interval (scipy);
- primary test: the two-sided **Wilcoxon signed-rank** test of ``d`` (scipy, the exact
  permutation distribution of the statistic, valid with tied differences, zero differences
  dropped), because per-seed RL outcomes are not normal; its direction is the sign of the
  Hodges–Lehmann estimate (the median of the Walsh averages);
- multiplicity: **Holm**'s step-down correction across the arms compared with ``exact``
  (statsmodels), per metric;
- a difference is stated only when the arm has at least :data:`MIN_SEEDS` paired seeds and the
  Holm-adjusted Wilcoxon p-value is below :data:`ALPHA`.

With ``n`` paired seeds and no ties the smallest two-sided Wilcoxon p-value is ``2 / 2**n``
(0.0625 at ``n = 5``, 0.0078 at ``n = 8``), and Holm's first step multiplies it by the number
of arms compared: with 8 arms a difference needs at least 9 seeds. Where the design cannot
reach α = 0.05, :func:`verdict` says "not testable" rather than "no difference".
"""

from __future__ import annotations

import math

#: fewest paired seeds for which a difference is tested at all
MIN_SEEDS = 5
#: family-wise error rate of each metric's family of tests (Holm)
ALPHA = 0.05


def min_wilcoxon_p(n: int, family: int = 1) -> float:
    """The smallest p-value a difference can get with ``n`` non-zero paired differences: the
    exact two-sided Wilcoxon ``2 / 2**n`` (all differences of one sign), times ``family`` for
    Holm's first step across that many arms (e.g. 8 arms need ``n ≥ 9`` to reach 0.05)."""
    return min(1.0, family * 2.0 / 2**n) if n > 0 else 1.0


def paired_difference(arm: dict, ref: dict) -> dict:
    """Paired comparison of ``arm`` against ``ref`` (``{seed: value}``; only seeds in both count).

    Returns ``n`` (paired seeds), ``mean`` (mean of arm − ref), ``ci`` (95 % t interval; NaN
    below 2 seeds; a point when every difference is equal), ``p_wilcoxon`` (two-sided exact
    Wilcoxon signed-rank, zero differences dropped as Wilcoxon's rule; 1.0 when every
    difference is zero; NaN below 1 seed), ``p_t`` (paired t-test, secondary; NaN when
    undefined) and ``diffs`` (per seed).
    """
    from scipy import stats

    seeds = sorted(set(arm) & set(ref))
    d = [float(arm[s]) - float(ref[s]) for s in seeds]
    n = len(d)
    out = {"n": n, "seeds": seeds, "diffs": d, "mean": sum(d) / n if n else float("nan"), "ci": (float("nan"), float("nan")),
           "p_wilcoxon": float("nan"), "p_t": float("nan")}
    if n == 0:
        return out
    nonzero = [x for x in d if x != 0.0]
    out["n_nonzero"] = len(nonzero)
    # the exact permutation distribution of the signed-rank statistic (all 2^n sign flips up to
    # n = 13, which is exact with ties too; a 9999-resample estimate beyond)
    # (one non-zero difference: both sign flips are as extreme, p = 1; scipy needs two)
    out["p_wilcoxon"] = float(stats.wilcoxon(nonzero, alternative="two-sided", method=stats.PermutationMethod()).pvalue) if len(nonzero) > 1 else 1.0
    # Hodges–Lehmann: the median of the Walsh averages, the location Wilcoxon's test is about
    walsh = [(d[i] + d[j]) / 2 for i in range(n) for j in range(i, n)]
    out["hodges_lehmann"] = float(sorted(walsh)[len(walsh) // 2]) if len(walsh) % 2 else float(sum(sorted(walsh)[len(walsh) // 2 - 1 : len(walsh) // 2 + 1]) / 2)
    if n >= 2:
        sd = stats.tstd(d)
        if sd > 0:
            out["ci"] = tuple(float(x) for x in stats.t.interval(0.95, n - 1, loc=out["mean"], scale=sd / math.sqrt(n)))
            out["p_t"] = float(stats.ttest_rel([arm[s] for s in seeds], [ref[s] for s in seeds]).pvalue)
        else:
            out["ci"] = (out["mean"], out["mean"])
            out["p_t"] = 1.0 if out["mean"] == 0 else 0.0
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (statsmodels ``multipletests``); NaN entries stay NaN
    and do not count towards the family size."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(pvalues) if p == p]
    out = [float("nan")] * len(pvalues)
    if idx:
        adj = multipletests([pvalues[i] for i in idx], alpha=ALPHA, method="holm")[1]
        for i, a in zip(idx, adj):
            out[i] = float(a)
    return out


def compare_arms(values: dict[str, dict], ref: str = "exact") -> dict[str, dict]:
    """``values``: ``{arm: {seed: metric}}``. Every arm other than ``ref`` against ``ref``:
    :func:`paired_difference` plus ``p_holm`` (Holm across those arms, on the Wilcoxon
    p-values) and ``verdict`` (:func:`verdict`)."""
    if ref not in values:
        raise KeyError(f"the reference arm {ref!r} has no results")
    arms = [a for a in values if a != ref]
    res = {a: paired_difference(values[a], values[ref]) for a in arms}
    family = sum(1 for a in arms if res[a]["p_wilcoxon"] == res[a]["p_wilcoxon"])
    for a, p in zip(arms, holm([res[a]["p_wilcoxon"] for a in arms])):
        res[a]["p_holm"] = p
        res[a]["verdict"] = verdict(res[a], p, family)
    return res


def verdict(res: dict, p_adj: float, family: int = 1) -> str:
    """The sentence the report states about one paired comparison, from its numbers only:
    ``identical`` (every paired difference is exactly zero), ``higher`` / ``lower`` (Holm-adjusted
    Wilcoxon p below :data:`ALPHA` with at least :data:`MIN_SEEDS` seeds), ``no difference
    detected``, or ``not testable`` (too few seeds for any Holm-adjusted p below :data:`ALPHA`
    in a family of ``family`` arms)."""
    n = res["n"]
    lo, hi = res["ci"]
    ci = f"mean {res['mean']:+.3g}, 95% CI [{lo:+.3g}, {hi:+.3g}]"
    if n and all(d == 0.0 for d in res.get("diffs", [])):
        return f"no difference: identical on all {n} paired seed(s)"
    nz = res.get("n_nonzero", n)
    floor = min_wilcoxon_p(nz, family)
    if n < MIN_SEEDS or floor >= ALPHA:
        return (f"not testable with {n} paired seed(s) ({nz} non-zero differences) and {family} arm(s) compared: the smallest possible "
                f"Holm-adjusted Wilcoxon p is {floor:.3g} (≥ {ALPHA}); {ci}")
    if p_adj == p_adj and p_adj < ALPHA:
        side = "higher" if res.get("hodges_lehmann", res["mean"]) > 0 else "lower"
        return f"{side} than exact (Wilcoxon, Holm-adjusted p = {p_adj:.3g}, n = {n}; {ci})"
    return f"no difference detected (Wilcoxon, Holm-adjusted p = {p_adj:.3g}, n = {n}; {ci})"


def auc(steps: list[float], values: list[float]) -> float:
    """Normalised area under a curve: the trapezoid integral of ``values`` over ``steps``
    divided by the step range (so it is in the metric's units: the curve's time-average)."""
    import numpy as np

    if len(steps) < 2:
        return float(values[0]) if values else float("nan")
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """``ys`` linearly interpolated at ``x`` (the last value after the end; NaN before the start):
    the held-out reward at a wall-clock budget."""
    import numpy as np

    if not xs or x < xs[0]:
        return float("nan")
    return float(np.interp(x, xs, ys))
