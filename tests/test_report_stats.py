"""balancemm.report.stats: Student's t in pure Python, checked against scipy, and the paired t-test by hand."""

from __future__ import annotations

import math

import pytest
from scipy import special, stats

from balancemm.report.stats import betainc, paired_t, t_cdf, t_ppf, t_sf

DFS = (0.5, 1, 2, 3.5, 7, 30, 200, 10_000)


@pytest.mark.parametrize("a", [0.25, 0.5, 1.0, 4.5, 100.0])
@pytest.mark.parametrize("b", [0.5, 2.0, 50.0])
def test_betainc_matches_scipy(a: float, b: float) -> None:
    for x in (0.0, 1e-6, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0):
        assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("df", DFS)
def test_t_cdf_and_tails_match_scipy(df: float) -> None:
    for t in (-1e6, -40.0, -3.0, -1.0, -0.1, 0.0, 0.5, 2.0, 12.7, 1e3):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-300)
        # The upper tail is computed directly, so it keeps its relative precision far out.
        assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-300)
    assert t_cdf(math.inf, df) == 1.0 and t_cdf(-math.inf, df) == 0.0


@pytest.mark.parametrize("df", DFS)
def test_t_ppf_matches_scipy_and_inverts_the_cdf(df: float) -> None:
    for p in (1e-12, 1e-4, 0.025, 0.3, 0.5, 0.8, 0.975, 0.9995):
        assert t_ppf(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
        assert t_cdf(t_ppf(p, df), df) == pytest.approx(p, rel=1e-9)


def test_closed_forms() -> None:
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/π, F⁻¹(p) = tan(π(p - 1/2)).
    assert t_cdf(3.0, 1) == pytest.approx(0.5 + math.atan(3.0) / math.pi, rel=1e-13)
    assert t_ppf(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    # df = 2: F(t) = 1/2 + t / (2·sqrt(t² + 2)).
    assert t_cdf(-1.5, 2) == pytest.approx(0.5 - 1.5 / (2 * math.sqrt(1.5**2 + 2)), rel=1e-13)


def test_invalid_arguments() -> None:
    for p in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            t_ppf(p, 3)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError):
        betainc(1.0, 1.0, 1.5)
    with pytest.raises(ValueError):
        paired_t([0.1, 0.2], [0.1])


def test_paired_t_by_hand() -> None:
    # x - y = 0.10, 0.05, 0.10: mean 0.25/3 = 0.083333; deviations +1/60, -1/30, +1/60; sum of squares
    # 1/3600 + 4/3600 + 1/3600 = 1/600; variance (ddof 1) 1/1200; sd 0.0288675; se = sd/√3 = 1/60;
    # t = (1/12) / (1/60) = 5 with df = 2.
    # df = 2: P(|T| > t) = 1 - t/sqrt(t² + 2) → p = 1 - 5/√27 = 0.0377496.
    # 97.5 % quantile q: q/sqrt(q² + 2) = 0.95 → q² = 2·0.9025/0.0975 → q = 4.302653;
    # CI = 1/12 ± q/60 = [0.011622, 0.155044].
    r = paired_t([0.80, 0.75, 0.90], [0.70, 0.70, 0.80])
    assert r is not None
    assert (r.n, r.df, r.level) == (3, 2, 0.95)
    assert r.mean == pytest.approx(1 / 12) and r.std == pytest.approx(math.sqrt(1 / 1200))
    assert r.t == pytest.approx(5.0)
    assert r.p == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-10)
    q = math.sqrt(2 * 0.9025 / 0.0975)
    assert r.ci_low == pytest.approx(1 / 12 - q / 60, rel=1e-9) and r.ci_high == pytest.approx(1 / 12 + q / 60)
    assert r.p == pytest.approx(stats.ttest_rel([0.80, 0.75, 0.90], [0.70, 0.70, 0.80]).pvalue, rel=1e-10)


def test_paired_t_edge_cases() -> None:
    assert paired_t([0.5], [0.4]) is None and paired_t([], []) is None
    # All differences 0.25 (exact in binary): std 0, t undefined, p = 0, zero-width interval at 0.25.
    r = paired_t([0.5, 0.75, 0.25], [0.25, 0.5, 0.0])
    assert r is not None and (r.std, r.t, r.p, r.ci_low, r.ci_high) == (0.0, None, 0.0, 0.25, 0.25)
    # All differences 0: p = 1.
    r = paired_t([0.6, 0.7], [0.6, 0.7])
    assert r is not None and (r.mean, r.p, r.ci_low, r.ci_high) == (0.0, 1.0, 0.0, 0.0)
    # 0.8 - 0.7 and 0.9 - 0.8 differ in the last bits of a double but are the same difference.
    r = paired_t([0.8, 0.9], [0.7, 0.8])
    assert r is not None and r.std == 0.0 and r.p == 0.0 and r.ci_low == r.ci_high
