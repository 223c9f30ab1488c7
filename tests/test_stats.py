"""``xnorpp.stats`` against values computed by hand (t quantiles from tables, p in closed form for df=2)."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from xnorpp.stats import compare, describe, paired_by_seed

T_975 = {1: 12.706205, 2: 4.302653}  # Student t 0.975 quantiles (printed tables)


def _p_df2(t: float) -> float:
    """Two-sided p-value of Student t with 2 degrees of freedom: 1 - |t| / sqrt(t^2 + 2)."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_three_seeds() -> None:
    s = describe([50.0, 52.0, 57.0])
    half = T_975[2] * math.sqrt(13) / math.sqrt(3)  # s^2 = (9 + 1 + 16) / 2 = 13
    assert (s.n, s.mean, s.min, s.max) == (3, 53.0, 50.0, 57.0)
    assert s.std == pytest.approx(math.sqrt(13))
    assert s.ci == pytest.approx((53 - half, 53 + half), abs=1e-5)
    assert s.ci == pytest.approx((44.0433, 61.9567), abs=1e-4)


def test_two_seeds() -> None:
    s = describe([90.0, 94.0])
    assert s.std == pytest.approx(math.sqrt(8))  # (4 + 4) / 1
    assert s.ci == pytest.approx((92 - T_975[1] * 2, 92 + T_975[1] * 2), abs=1e-5)  # s / sqrt(2) = 2


def test_one_seed_has_no_spread_or_interval() -> None:
    s = describe([40.0])
    assert (s.n, s.mean, s.std, s.ci, s.min, s.max) == (1, 40.0, None, None, 40.0, 40.0)
    with pytest.raises(ValueError, match="at least one value"):
        describe([])


def test_identical_values_give_zero_spread_not_nan() -> None:
    s = describe([97.3, 97.3, 97.3])
    assert s.std == 0.0 and s.ci == (97.3, 97.3)


def test_welch_three_seeds() -> None:
    """a = 50, 52, 57 (var 13), b = 40, 44, 42 (var 4): t = 11 / sqrt(17/3), df = (17/3)^2 / (185/18)."""
    c = compare([50.0, 52.0, 57.0], [40.0, 44.0, 42.0], [0, 1, 2], [3, 4, 5])
    assert (c.test, c.n, c.note) == ("Welch", (3, 3), None)
    assert c.diff == 11.0
    assert c.t == pytest.approx(11 / math.sqrt(17 / 3)) and c.df == pytest.approx(578 / 185)
    assert c.p == pytest.approx(0.017441, abs=1e-6)
    ref = scipy_stats.ttest_ind([50, 52, 57], [40, 44, 42], equal_var=False)
    assert c.p == pytest.approx(ref.pvalue) and c.t == pytest.approx(ref.statistic)


def test_welch_two_seeds_in_closed_form() -> None:
    """Equal variances (8) and n = 2 on both sides: df = 2, t = 10 / sqrt(8)."""
    c = compare([90.0, 94.0], [80.0, 84.0])  # no seeds given: unpaired
    assert c.test == "Welch" and c.df == pytest.approx(2.0) and c.t == pytest.approx(10 / math.sqrt(8))
    assert c.p == pytest.approx(_p_df2(10 / math.sqrt(8)))
    assert c.p == pytest.approx(0.071523, abs=1e-6)


def test_paired_by_seed() -> None:
    """d = 2, 1, 4: mean 7/3, s_d = sqrt(7/3), t = sqrt(7), df = 2, p = 1 - sqrt(7)/3."""
    c = compare([50.0, 52.0, 57.0], [48.0, 51.0, 53.0], [0, 1, 2], [0, 1, 2])
    assert (c.test, c.df) == ("paired", 2)
    assert c.diff == pytest.approx(7 / 3) and c.t == pytest.approx(math.sqrt(7))
    assert c.p == pytest.approx(1 - math.sqrt(7) / 3)
    shuffled = compare(
        [57.0, 50.0, 52.0], [51.0, 53.0, 48.0], [2, 0, 1], [1, 2, 0]
    )  # pairs by seed, not position
    assert shuffled.t == pytest.approx(c.t) and shuffled.p == pytest.approx(c.p)
    assert c.p == pytest.approx(scipy_stats.ttest_rel([50, 52, 57], [48, 51, 53]).pvalue)


def test_seeds_pair_only_when_both_sides_ran_the_same_seeds_once() -> None:
    assert paired_by_seed([0, 1, 2], [2, 1, 0])
    assert not paired_by_seed([0, 1, 2], [0, 1])
    assert not paired_by_seed([0, 0, 1], [0, 1, 1])  # a seed twice (two launches pooled)
    assert not paired_by_seed([None, 1], [None, 1])  # seed unknown


def test_one_seed_gives_a_difference_but_no_test() -> None:
    c = compare([40.0], [50.0], [0], [1])
    assert c.diff == -10.0 and c.p is None and c.t is None
    assert c.note == "too few seeds (1 vs 1; 2 per side needed)"
    assert compare([40.0], [50.0], [0], [0]).note == "1 seed: no test"
    assert compare([40.0, 41.0, 42.0], [50.0]).note == "too few seeds (3 vs 1; 2 per side needed)"


def test_identical_values_and_constant_differences_have_no_test_and_no_nan() -> None:
    same = compare([3.0, 3.0], [3.0, 3.0])
    assert (same.diff, same.p, same.note) == (0.0, None, "identical values: t-test undefined")
    flat = compare([4.0, 4.0], [3.0, 3.0])
    assert (flat.diff, flat.p, flat.note) == (1.0, None, "no spread on either side: t-test undefined")
    paired_same = compare([3.0, 5.0], [3.0, 5.0], [0, 1], [0, 1])
    assert (
        paired_same.note == "identical on every seed: no spread, t-test undefined" and paired_same.diff == 0
    )
    shift = compare([90.0, 94.0], [80.0, 84.0], [0, 1], [0, 1])
    assert shift.note == "the same difference on every seed: no spread, t-test undefined" and shift.p is None
    # equal differences of percentages that differ in the last bit count as no spread, not p ~ 0
    rounding = compare([95.9, 96.1], [94.8, 95.0], [0, 1], [0, 1])
    assert rounding.p is None and rounding.diff == pytest.approx(1.1)
