"""Deprecated valuation names: each still works for one release and warns."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from dvl_ooc.valuation import InteractionGame, MaxChecks, TMCShapleyValuation


def test_timings_is_a_deprecated_read_only_alias_of_info():
    v = TMCShapleyValuation(InteractionGame(np.ones(3)), is_done=MaxChecks(1), seed=0).fit()
    assert set(v.info) == {"setup_s", "sampling_s", "total_s"}
    with pytest.warns(DeprecationWarning, match="info"):
        assert v.timings is v.info
    with pytest.raises(AttributeError):
        v.timings = {}


def test_methods_module_is_deprecated_and_reexports_the_classes():
    sys.modules.pop("dvl_ooc.valuation.methods", None)
    with pytest.warns(DeprecationWarning, match="dvl_ooc.valuation.methods"):
        methods = importlib.import_module("dvl_ooc.valuation.methods")
    assert methods.TMCShapleyValuation is TMCShapleyValuation
    g = InteractionGame(np.arange(3.0))
    res = methods.MSRBanzhafValuation(g, is_done=MaxChecks(1), seed=0).fit().result
    assert len(res) == 3
