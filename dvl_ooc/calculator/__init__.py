"""Calculators: tile the test x train influence matrix and compute it in memory or into a store."""

from .core import DaskInfluenceCalculator, SequentialInfluenceCalculator

__all__ = ["DaskInfluenceCalculator", "SequentialInfluenceCalculator"]
