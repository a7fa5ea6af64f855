"""Deprecated names of the influence models: each warns and still works (one test per name)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dvl_ooc import ArnoldiInfluence, CgInfluence, DirectInfluence, LissaInfluence
from dvl_ooc.exceptions import ConvergenceWarning, InputError


def _sq(out, target):
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 2).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    return model, (x, y)


def test_cg_maxiter_is_max_iter(small):
    model, data = small
    with pytest.warns(DeprecationWarning, match="maxiter= is deprecated, use max_iter="):
        m = CgInfluence(model, _sq, maxiter=2, rtol=1e-12)
    assert m.max_iter == 2
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        m.fit(data).influences(data[0][:3], data[1][:3])
    assert m.info["solve"][0]["iterations"] == 2


def test_cg_method_is_solver(small):
    model, data = small
    with pytest.warns(DeprecationWarning, match="method= is deprecated, use solver="):
        m = CgInfluence(model, _sq, method="block")
    assert m.solver == "block" and m.config()["solver"] == "block"
    m.fit(data).influences(data[0][:3], data[1][:3])
    assert m.info["solve"][0]["converged"] == 3


def test_lissa_depth_is_max_iter(small):
    model, data = small
    with pytest.warns(DeprecationWarning, match="depth= is deprecated, use max_iter="):
        m = LissaInfluence(model, _sq, depth=7, rtol=None)
    assert m.max_iter == 7 and m.config()["max_iter"] == 7
    m.fit(data).influences(data[0][:2], data[1][:2])
    assert m.info["solve"][0]["iterations"] == 7


def test_arnoldi_tol_is_rtol(small):
    model, _ = small
    with pytest.warns(DeprecationWarning, match="tol= is deprecated, use rtol="):
        m = ArnoldiInfluence(model, _sq, tol=1e-5)
    assert m.rtol == 1e-5 and m.config()["rtol"] == 1e-5


def test_fit_info_is_info_fit(small):
    model, data = small
    m = DirectInfluence(model, _sq).fit(data)
    with pytest.warns(DeprecationWarning, match=r"info\['fit'\]"):
        assert m.fit_info is m.info["fit"]
    assert m.info["fit"][0]["size"] == 12


def test_last_info_is_info_solve(small):
    model, data = small
    m = CgInfluence(model, _sq).fit(data)
    m.influences(data[0][:2], data[1][:2])
    with pytest.warns(DeprecationWarning, match=r"info\['solve'\]"):
        assert m.last_info is m.info["solve"]
    assert m.info["solve"][0]["converged"] == 2


def test_old_and_new_name_together_or_unknown_names_fail(small):
    model, _ = small
    with pytest.raises(InputError, match="max_iter= only"):
        CgInfluence(model, _sq, maxiter=5, max_iter=6)
    with pytest.raises(TypeError, match="unexpected keyword argument 'depht'"):
        LissaInfluence(model, _sq, depht=5)


def test_moved_helpers_stay_importable():
    from dvl_ooc.influence import base, cg, sketch

    assert cg.nystroem_sketch is sketch.nystroem_sketch
    assert cg.validate_fit_data is base.validate_fit_data
