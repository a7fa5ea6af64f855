"""Influence models: fit the curvature once, then precondition gradients."""

from .base import InfluenceModel
from .direct import DirectInfluence

__all__ = ["DirectInfluence", "InfluenceModel"]
