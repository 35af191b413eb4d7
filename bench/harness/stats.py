"""Percentiles as the reports use them."""

import math


def nearest_rank(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted values: the smallest value with at least `fraction` of all at or below it."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]
