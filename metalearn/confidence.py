"""The 95% confidence interval every accuracy is reported with (evaluation and report share it; no torch)."""

import math

Z95 = 1.96  # two-sided 95% quantile of the normal distribution


def ci95(spread: float, count: int) -> float:
    """Half-width of the 95% interval of a mean of `count` values whose sample standard deviation is `spread`."""
    return Z95 * spread / math.sqrt(count)
