"""Sampling noise of a measured share (RSR, edit success): the 95 % Wilson score interval.

A bar judged on 200 facts carries about ±6 points of noise, on 50 about ±12; every such figure is
reported with its interval so a reader can tell a miss by 0.3 points from a miss by 10.
"""

from __future__ import annotations

import math


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float] | None:
    """[low, high] for `hits` successes in `n` trials (95 % at z = 1.96); None for n = 0. Wilson's interval
    stays inside [0, 1] and is sound at 0 and n hits, where the normal approximation collapses."""
    if n <= 0:
        return None
    p, zz = hits / n, z * z
    centre = (p + zz / (2 * n)) / (1 + zz / n)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def share_interval(share: float | None, n: int) -> list[float] | None:
    """The interval of a share already measured on n items (a report that did not record its interval)."""
    if share is None or not math.isfinite(share):
        return None
    return wilson_interval(round(share * n), n)


def interval_text(ci: list[float] | None) -> str:
    """' (95 % CI 58.2-71.3 %)' for people, or '' where there is none."""
    return f" (95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f} %)" if ci else ""
