"""Influence models: fit the curvature once, then precondition gradients."""

from .arnoldi import ArnoldiInfluence
from .base import InfluenceModel
from .cg import CgInfluence
from .diagnostics import Relative
from .direct import DirectInfluence
from .ekfac import EkfacInfluence
from .ensemble import Ensemble
from .lissa import LissaInfluence
from .nystroem import NystroemSketchInfluence
from .tracin import TracInCP

__all__ = [
    "ArnoldiInfluence",
    "CgInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "Ensemble",
    "InfluenceModel",
    "LissaInfluence",
    "NystroemSketchInfluence",
    "Relative",
    "TracInCP",
]
