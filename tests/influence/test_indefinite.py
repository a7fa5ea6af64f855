"""One policy for an indefinite H + lambda I: every method warns (default) or refuses
(``raise_on_indefinite=True``) with a message that says what to do; never silent results.

The problem is built on purpose: the exact Hessian of a small trained MLP (p = 310) has
eigenvalues far below -lambda (lambda = 1e-4 x top eigenvalue).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import MB, case
from torch import nn

from dvl_ooc.exceptions import (
    IndefiniteCurvatureError,
    IndefiniteCurvatureWarning,
    RegularizationError,
)
from dvl_ooc.influence import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)

METHODS = {
    "direct": (DirectInfluence, {}),
    "cg": (CgInfluence, {}),
    "lissa": (LissaInfluence, {}),
    "arnoldi-dense": (ArnoldiInfluence, {"rank": 310}),
    "arnoldi-lanczos": (ArnoldiInfluence, {"rank": 48}),
    "nystroem": (NystroemSketchInfluence, {"rank": 310}),
}


@pytest.fixture(scope="module")
def problem():
    c = case()
    assert float(c.eig_H[0]) < -1e-2 * float(c.eig_H[-1])  # indefinite on purpose
    return c


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_warns_then_refuses(problem, name):
    cls, kw = METHODS[name]
    c = problem
    lam = 1e-4 * float(c.eig_H[-1])
    with pytest.warns(IndefiniteCurvatureWarning) as rec:
        m = cls(c.model, c.loss, hessian="exact", regularization=lam, micro_batch_size=MB,
                **kw).fit(c.data)
    msg = next(str(r.message) for r in rec if r.category is IndefiniteCurvatureWarning)
    assert "indefinite" in msg and "hessian='gauss-newton'" in msg
    assert "regularization above" in msg and "|lambda_min|" in msg
    d = m.diagnostics(estimate=False)
    json.dumps(d, allow_nan=False)
    assert d["indefinite"] is True and d["advice"] is not None
    block = d["blocks"][0]
    true_min = float(c.eig_H[0])
    # the reported minimum is below -lambda and never below the true minimum (exact or
    # an estimate that is an upper bound of it)
    assert true_min - 1e-9 <= block["min_eigenvalue"] < -lam
    # the measured |lambda_min| in the message is the way out: above it, no warning
    need = 1.5 * abs(true_min)
    with pytest.raises(IndefiniteCurvatureError, match="gauss-newton"):
        cls(c.model, c.loss, hessian="exact", regularization=lam, micro_batch_size=MB,
            raise_on_indefinite=True, **kw).fit(c.data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteCurvatureWarning)
        ok = cls(c.model, c.loss, hessian="exact", regularization=need, micro_batch_size=MB,
                 raise_on_indefinite=True, **kw).fit(c.data)
    assert ok.diagnostics(estimate=False)["indefinite"] is not True


def test_refused_fit_leaves_model_unfitted(problem):
    c = problem
    m = DirectInfluence(c.model, c.loss, hessian="exact", raise_on_indefinite=True,
                        regularization=1e-4 * float(c.eig_H[-1]))
    with pytest.raises(IndefiniteCurvatureError):
        m.fit(c.data)
    assert not m.is_fitted
    # assigning a regularization above |lambda_min| to a fitted model is re-checked at once
    m.regularization = 1.5 * abs(float(c.eig_H[0]))
    m.fit(c.data)
    with pytest.raises(IndefiniteCurvatureError):
        m.regularization = 1e-4 * float(c.eig_H[-1])
    assert m.regularization["model"] == pytest.approx(1.5 * abs(float(c.eig_H[0])))


def test_gauss_newton_and_compressed_modes_are_definite(problem):
    """The positive semi-definite modes (Gauss-Newton, projection=, EK-FAC) never warn at a
    small lambda and report indefinite=False with a certified bound."""
    c = problem
    lam = 1e-6 * float(c.eig_H[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteCurvatureWarning)
        models = [
            DirectInfluence(c.model, c.loss, regularization=lam, micro_batch_size=MB),
            DirectInfluence(c.model, c.loss, regularization=lam, micro_batch_size=MB,
                            projection={"k_in": 8, "k_out": 4, "seed": 0}),
            NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=lam,
                                    micro_batch_size=MB),
            EkfacInfluence(c.model, c.loss, regularization=lam, micro_batch_size=MB),
        ]
        for m in models:
            m.fit(c.data)
            d = m.diagnostics(estimate=False)
            assert d["indefinite"] is False, type(m).__name__
            for b in d["blocks"]:
                assert b["min_eigenvalue"] >= 0 or b["min_kind"] == "exact"
                assert b["min_eigenvalue"] > -1e-8 * b["top_eigenvalue"]


def test_ekfac_zero_curvature_without_damping_is_refused():
    """EK-FAC is PSD by construction; Lambda + lambda = 0 (an input that is always 0 and no
    damping) is a singular system, refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    x[:, 0] = 0.0
    y = torch.randint(0, 2, (20,))
    with pytest.raises(RegularizationError, match="singular"):
        EkfacInfluence(model, F.cross_entropy, regularization=0.0).fit((x, y))
