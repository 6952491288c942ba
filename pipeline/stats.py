"""Small statistics shared by the stages' reports."""

from __future__ import annotations

import math


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927): sane at 0, 1 and small n, unlike p +- z*se.
    `successes` may hold halves (a tie counted half); n = 0 gives the uninformative (0, 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` (a whole number >= 1) degrees of freedom, exactly: Abramowitz & Stegun 26.7.3
    (odd df) and 26.7.4 (even df), the two-sided mass A(|t|) = P(-|t| < T < |t|) as a finite series in cos(theta)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        series, term = (math.cos(theta), math.cos(theta)) if df > 1 else (0.0, 0.0)
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c2
            series += term
        inside = 2 / math.pi * (theta + s * series)
    else:
        series = term = 1.0
        for k in range(2, df - 1, 2):
            term *= (k - 1) / k * c2
            series += term
        inside = s * series
    return (1 - inside) / 2 if t >= 0 else (1 + inside) / 2


def student_t_isf(p: float, df: int) -> float:
    """The t with P(T > t) = p (0 < p < 1/2), by bisection on student_t_sf."""
    low, high = 0.0, 1.0
    while student_t_sf(high, df) > p:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_sf(mid, df) > p else (low, mid)
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2
