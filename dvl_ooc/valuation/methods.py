"""Deprecated module: the valuation methods live one per module now.

Import them from :mod:`dvl_ooc.valuation` (or :mod:`~dvl_ooc.valuation.tmc`,
:mod:`~dvl_ooc.valuation.msr`, :mod:`~dvl_ooc.valuation.combinatorial`; the shared driver is
:mod:`~dvl_ooc.valuation.base`). This module re-exports them for one release.
"""

from __future__ import annotations

import warnings

from .base import MonteCarloValuation
from .combinatorial import CombinatorialShapleyValuation
from .msr import MSRBanzhafValuation
from .tmc import TMCShapleyValuation

warnings.warn("dvl_ooc.valuation.methods is deprecated: import the valuation methods from "
              "dvl_ooc.valuation (modules tmc, msr, combinatorial, base)", DeprecationWarning,
              stacklevel=2)

_MonteCarloValuation = MonteCarloValuation  # the base class's old private name

__all__ = [
    "CombinatorialShapleyValuation",
    "MSRBanzhafValuation",
    "MonteCarloValuation",
    "TMCShapleyValuation",
]
