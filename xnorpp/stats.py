"""Statistics over seeds: mean, spread, a confidence interval of the mean, and t-tests between configurations.

For values ``x_1..x_n`` of one configuration (one per seed):

- mean ``m = sum(x) / n``; sample standard deviation ``s = sqrt(sum((x - m)^2) / (n - 1))``;
- 95% confidence interval of the mean (Student t): ``m -+ t_{0.975, n-1} * s / sqrt(n)``.

Two configurations ``a`` and ``b`` are compared by ``mean(a) - mean(b)`` and a two-sided t-test:

- paired by seed when both ran the same seeds (each once): ``d_i = a_i - b_i``,
  ``t = mean(d) / (s_d / sqrt(n))`` with ``n - 1`` degrees of freedom;
- otherwise Welch's test: ``t = (m_a - m_b) / sqrt(v_a/n_a + v_b/n_b)`` with
  ``df = (v_a/n_a + v_b/n_b)^2 / ((v_a/n_a)^2/(n_a-1) + (v_b/n_b)^2/(n_b-1))`` (``v``: sample variance).

``p = 2 * P(T_df > |t|)``. With one seed, or no spread at all, there is no interval or test; the
result says why instead of returning NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["CONFIDENCE", "Comparison", "Summary", "compare", "describe", "paired_by_seed"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """One configuration over seeds; ``std`` and ``ci`` are None for a single value."""

    n: int
    mean: float
    std: float | None
    ci: tuple[float, float] | None
    min: float
    max: float


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample std, Student-t confidence interval of the mean, min and max of ``values``."""
    if not values:
        raise ValueError("describe() needs at least one value")
    n, mean = len(values), statistics.fmean(values)
    std = ci = None
    if n > 1:
        std = statistics.stdev(values)
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        ci = (mean - half, mean + half)
    return Summary(n=n, mean=mean, std=std, ci=ci, min=min(values), max=max(values))


@dataclass(frozen=True)
class Comparison:
    """``mean(a) - mean(b)`` and, where defined, the t-test's statistic, degrees of freedom and p-value.

    ``test`` is ``"paired"`` or ``"Welch"``; ``note`` says why ``p`` is None (too few seeds, no spread).
    """

    diff: float
    test: str
    n: tuple[int, int]
    t: float | None = None
    df: float | None = None
    p: float | None = None
    note: str | None = None


def paired_by_seed(a_seeds: Sequence[object], b_seeds: Sequence[object]) -> bool:
    """True when both sides ran the same seeds, each once (none unknown): the runs pair by seed."""
    return (
        None not in a_seeds
        and len(set(a_seeds)) == len(a_seeds)
        and len(set(b_seeds)) == len(b_seeds)
        and set(a_seeds) == set(b_seeds)
    )


def _p_value(t: float, df: float) -> float:
    return float(2 * student_t.sf(abs(t), df))


def _no_spread(sd: float, values: Sequence[float]) -> bool:
    """``sd`` is zero up to float rounding of ``values`` (equal differences of percentages may differ
    in the last bit, which would make ``t`` huge and ``p`` meaningless)."""
    return sd <= 1e-9 * max(1.0, *(abs(v) for v in values))


def compare(a: Sequence[float], b: Sequence[float], a_seeds: Sequence[object] | None = None,
            b_seeds: Sequence[object] | None = None) -> Comparison:  # fmt: skip
    """Compare ``a`` with ``b``: paired t-test when the seeds pair up (see module doc), else Welch's."""
    if not a or not b:
        raise ValueError("compare() needs at least one value on each side")
    diff = statistics.fmean(a) - statistics.fmean(b)
    n = (len(a), len(b))
    if a_seeds is not None and b_seeds is not None and paired_by_seed(a_seeds, b_seeds):
        by_seed = dict(zip(b_seeds, b))
        d = [x - by_seed[s] for s, x in zip(a_seeds, a)]
        if len(d) < 2:
            return Comparison(diff, "paired", n, note="1 seed: no test")
        sd = statistics.stdev(d)
        if _no_spread(sd, [*a, *b]):
            same = (
                "identical on every seed" if all(x == 0 for x in d) else "the same difference on every seed"
            )
            return Comparison(diff, "paired", n, note=f"{same}: no spread, t-test undefined")
        t = statistics.fmean(d) / (sd / math.sqrt(len(d)))
        return Comparison(diff, "paired", n, t=t, df=len(d) - 1, p=_p_value(t, len(d) - 1))
    if min(n) < 2:
        return Comparison(diff, "Welch", n, note=f"too few seeds ({n[0]} vs {n[1]}; 2 per side needed)")
    va, vb = statistics.variance(a) / n[0], statistics.variance(b) / n[1]
    if _no_spread(math.sqrt(va + vb), [*a, *b]):
        same = "identical values" if diff == 0 else "no spread on either side"
        return Comparison(diff, "Welch", n, note=f"{same}: t-test undefined")
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (n[0] - 1) + vb**2 / (n[1] - 1))
    return Comparison(diff, "Welch", n, t=t, df=df, p=_p_value(t, df))
