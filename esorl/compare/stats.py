"""The comparison's statistics, fixed before any run: per-seed *paired* differences against
``exact`` (every arm of a seed sees the same prompts and rollout noise), their mean with a
95 % t confidence interval, a paired t-test (scipy), and Holm's correction across arms. A
difference is stated only when every arm has at least :data:`MIN_SEEDS` paired seeds and the
Holm-adjusted p-value is below :data:`ALPHA`; otherwise the report says it was not tested."""

from __future__ import annotations

import math

#: fewest paired seeds for which the report states a difference at all
MIN_SEEDS = 5
ALPHA = 0.05


def paired_difference(arm: dict, ref: dict) -> dict:
    """``arm`` and ``ref``: ``{seed: value}``. Returns ``n`` (paired seeds), ``mean`` (arm − ref),
    ``ci`` (95 % t interval, NaN below 2 seeds) and ``p`` (two-sided paired t-test, NaN below 2
    seeds or when every difference is equal)."""
    from scipy import stats

    seeds = sorted(set(arm) & set(ref))
    d = [arm[s] - ref[s] for s in seeds]
    n = len(d)
    out = {"n": n, "mean": sum(d) / n if n else float("nan"), "ci": (float("nan"), float("nan")), "p": float("nan")}
    if n >= 2:
        sd = stats.tstd(d)
        if sd > 0:
            out["ci"] = tuple(float(x) for x in stats.t.interval(0.95, n - 1, loc=out["mean"], scale=sd / math.sqrt(n)))
            out["p"] = float(stats.ttest_rel([arm[s] for s in seeds], [ref[s] for s in seeds]).pvalue)
        else:
            out["ci"] = (out["mean"], out["mean"])
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN and does not count)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p == p), key=lambda i: pvalues[i])
    m, out, running = len(idx), [float("nan")] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(res: dict, p_adj: float) -> str:
    """The sentence the report states, from the numbers only."""
    if res["n"] < MIN_SEEDS:
        return f"not tested ({res['n']} paired seed(s); a difference is stated from {MIN_SEEDS} on)"
    if p_adj == p_adj and p_adj < ALPHA:
        return f"differs (paired t-test, Holm-adjusted p = {p_adj:.3g})"
    return f"no difference detected (paired t-test, Holm-adjusted p = {p_adj:.3g})"
