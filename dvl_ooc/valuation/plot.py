"""Plotting helper (matplotlib is imported lazily, only when a plot is made)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .result import ValuationResult

__all__ = ["plot_values"]


def plot_values(result: ValuationResult, *, level: float = 0.95, ax: Any = None,
                title: str | None = None, xlabel: str = "data index",
                ylabel: str = "value") -> Any:
    """Values with normal confidence intervals of coverage ``level`` as error bars.

    Typical use: ``plot_values(result.sort()[:20])`` for the lowest-valued points.
    Returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(result)), 3.5))
    lo, hi = result.confidence_interval(level)
    v = result.values
    pos = np.arange(len(result))
    ax.errorbar(pos, v, yerr=np.vstack([v - lo, hi - v]), fmt="o", capsize=3)
    labels = result.names if result.names is not None else result.indices
    ax.set_xticks(pos, [str(x) for x in labels], rotation=90 if len(result) > 10 else 0)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{result.algorithm or 'values'} ({int(level * 100)}% CI)")
    return ax
