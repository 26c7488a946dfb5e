"""Student's t distribution and the paired t-test, in pure Python.

The report must run where only the run directories were copied (no scipy, no torch), so the t CDF is
computed from the regularised incomplete beta function (Lentz's continued fraction) and the quantile by
bisection on the CDF.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Smallest magnitude a continued-fraction term may take before Lentz's algorithm would divide by zero.
_TINY = 1e-300
_EPS = 1e-15


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges quickly for x < (a + 1) / (a + b + 2)."""

    def guard(v: float) -> float:
        return _TINY if abs(v) < _TINY else v

    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 10_000):
        # Even step, then odd step of the fraction's recurrence.
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / guard(1.0 + num * d)
        c = guard(1.0 + num / c)
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / guard(1.0 + num * d)
        c = guard(1.0 + num / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0 (got a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1 (got {x})")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The fraction converges fast only below the mean of the beta distribution; above it, use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` degrees of freedom (computed directly, so small tails
    keep their relative precision instead of being 1 - CDF)."""
    if df <= 0 or math.isnan(t):
        raise ValueError(f"t_sf needs df > 0 and a number (got t={t}, df={df})")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) of Student's t with ``df`` degrees of freedom."""
    return 1.0 - t_sf(t, df) if t >= 0 else t_sf(-t, df)


def t_ppf(p: float, df: float) -> float:
    """The quantile: the t with P(T ≤ t) = p, for 0 < p < 1 (bisection on the tail)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf needs 0 < p < 1 (got {p})")
    if p == 0.5:
        return 0.0
    # Solve on the smaller tail, taken as given for p < 0.5: 1 - (1 - p) would lose its relative precision.
    return -_upper_quantile(p, df) if p < 0.5 else _upper_quantile(1.0 - p, df)


def _upper_quantile(q: float, df: float) -> float:
    """The t > 0 with P(T > t) = q, for 0 < q < 0.5."""
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > q:
        lo, hi = hi, 2.0 * hi
    # t_sf is decreasing in t: keep t_sf(lo) > q >= t_sf(hi) until the bracket is at rounding level.
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_sf(mid, df) > q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of ``x - y``: ``n`` pairs, mean difference and its sample std (ddof = 1), the
    ``level`` confidence interval of the mean difference, the t statistic (None when the std is 0), the
    degrees of freedom and the two-sided p-value."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t: float | None
    df: int
    p: float
    level: float


def paired_t(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> PairedTest | None:
    """Two-sided paired Student's t-test of H0: mean(x - y) = 0; None with fewer than two pairs.

    When all differences are equal (std 0, up to float rounding of the inputs) the t statistic is undefined:
    then p = 0 if the common difference is not 0 and 1 if it is, and the interval has zero width.
    """
    if len(x) != len(y):
        raise ValueError(f"paired_t needs pairs (got {len(x)} and {len(y)} values)")
    n = len(x)
    if n < 2:
        return None
    d = [a - b for a, b in zip(x, y, strict=True)]
    mean = sum(d) / n
    scale = max(1.0, max(abs(v) for v in d))
    # Differences of fractions like 0.8 - 0.7 and 0.9 - 0.8 differ in the last bits; they are equal.
    if max(d) - min(d) <= 1e-12 * scale:
        return PairedTest(n, mean, 0.0, mean, mean, None, n - 1, 0.0 if mean != 0 else 1.0, level)
    std = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    se = std / math.sqrt(n)
    t = mean / se
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    return PairedTest(n, mean, std, mean - half, mean + half, t, n - 1, min(1.0, 2.0 * t_sf(abs(t), n - 1)), level)
