"""Curvature diagnostics of every influence model against float64 eigendecompositions.

Reference spectra come from tests/reference.py (autograd Hessian and a per-sample Gauss-Newton
loop), never from dvl_ooc code; the probe vectors of the error estimates are drawn from the
documented stream ``(seed, block index, 2)``.
"""

from __future__ import annotations

import json

import pytest
import torch
from curvature_cases import MB, case

from dvl_ooc.influence import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    TracInCP,
)
from dvl_ooc.seeding import numpy_rng

F64 = torch.float64


@pytest.fixture(scope="module")
def c():
    return case()


def probes(p: int, block: int = 0, seed: int = 0, r: int = 4) -> torch.Tensor:
    return torch.from_numpy(numpy_rng(seed, block, 2).standard_normal((r, p)))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def reference_summary(w: torch.Tensor, lam: float) -> dict:
    noise = 1e3 * torch.finfo(F64).eps * float(w.abs().max())
    neg = w < -noise
    terms = torch.where(w.abs() <= noise, torch.zeros_like(w), w / (w + lam))
    return {"top": float(w[-1]), "min": float(w[0]), "mean": float(w.mean()),
            "negative_count": int(neg.sum()),
            "negative_mass": float(w[neg].abs().sum() / w.abs().sum()),
            "below": int((w < -lam - noise).sum()),
            "cond": (float(w[-1]) + lam) / (float(w[0]) + lam),
            "effective_rank": float(terms.sum())}


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_direct_is_exact(c, hessian):
    w = c.eig_H if hessian == "exact" else c.eig_G
    lam = (1.2 * abs(float(c.eig_H[0])) if hessian == "exact" else 1e-3 * float(w[-1]))
    m = DirectInfluence(c.model, c.loss, hessian=hessian, regularization=lam,
                        micro_batch_size=MB).fit(c.data)
    d = m.diagnostics()
    json.dumps(d, allow_nan=False)
    b, ref = d["blocks"][0], reference_summary(w, lam)
    assert b["source"] == "eigendecomposition" and b["eigenvalues_known"] == c.p
    assert {b[k] for k in ("top_kind", "min_kind", "mean_kind", "negative_kind",
                           "condition_kind", "effective_rank_kind")} == {"exact"}
    assert rel(b["top_eigenvalue"], ref["top"]) < 1e-9
    assert abs(b["min_eigenvalue"] - ref["min"]) < 1e-9 * ref["top"]
    assert rel(b["mean_eigenvalue"], ref["mean"]) < 1e-9
    assert rel(b["condition_number"], ref["cond"]) < 1e-6
    assert rel(b["effective_rank"], ref["effective_rank"]) < 1e-8
    assert b["negative_count"] == ref["negative_count"]
    assert b["indefinite"] is False and b["below_minus_lambda"] == 0
    if hessian == "exact":
        assert ref["negative_count"] > 10  # the negative part is really measured
        assert abs(b["negative_mass"] - ref["negative_mass"]) < 1e-9
        assert b["negative_share"] == pytest.approx(ref["negative_count"] / c.p)


def test_low_rank_models_bounds_and_error(c):
    """Arnoldi and Nystroem: top eigenvalue, certified lower bound 0 (Gauss-Newton), and the
    error / trace estimates equal their definitions on the documented probes."""
    G, wG = c.G, c.eig_G
    lam = 1e-3 * float(wG[-1])
    Z = probes(c.p)
    errors = {}
    for cls, k in ((ArnoldiInfluence, 8), (ArnoldiInfluence, 48), (NystroemSketchInfluence, 48)):
        m = cls(c.model, c.loss, rank=k, regularization=lam, micro_batch_size=MB).fit(c.data)
        b = m.diagnostics()["blocks"][0]
        V, w = m.eigenvectors[0], m.eigenvalues[0]
        GZ, AZ = Z @ G, ((Z @ V) * w) @ V.T
        res = torch.linalg.vector_norm(GZ - AZ, dim=1) / torch.linalg.vector_norm(GZ, dim=1)
        err = b["approximation_error"]
        assert err["probes"] == 4
        assert abs(err["relative_residual_mean"] - float(res.mean())) < 1e-7
        assert abs(err["relative_residual_max"] - float(res.max())) < 1e-7
        trace = float(w.sum()) + float(((GZ - AZ) * Z).sum(1).mean())
        assert rel(b["mean_eigenvalue"], trace / c.p) < 1e-7
        assert rel(b["mean_eigenvalue"], float(wG.mean())) < 0.2  # deflated Hutchinson
        assert b["min_eigenvalue"] == 0.0 and b["min_kind"] == "lower bound"
        assert b["eigenvalues_known"] == k and b["indefinite"] is False
        assert b["condition_number"] == pytest.approx((b["top_eigenvalue"] + lam) / lam)
        if cls is ArnoldiInfluence:
            assert rel(b["top_eigenvalue"], float(wG[-1])) < 1e-8 and b["top_kind"] == "exact"
            ref_rank = float((wG[-k:] / (wG[-k:] + lam)).sum())  # the k kept eigenvalues
            assert rel(b["effective_rank"], ref_rank) < 1e-6
        else:
            assert b["top_eigenvalue"] <= float(wG[-1]) * (1 + 1e-9)
            assert rel(b["top_eigenvalue"], float(wG[-1])) < 0.05  # a sketch: an estimate
        errors[(cls.__name__, k)] = err["relative_residual_mean"]
    assert errors[("ArnoldiInfluence", 48)] < errors[("ArnoldiInfluence", 8)]


def test_arnoldi_exact_hessian_certified_bound(c):
    """which='LM' on the indefinite exact Hessian: every unresolved eigenvalue is smaller in
    magnitude than the k-th kept one, so min(w_known, -|w_k|) is a certified lower bound."""
    k = 48
    m = ArnoldiInfluence(c.model, c.loss, hessian="exact", rank=k, micro_batch_size=MB,
                         regularization=1.2 * abs(float(c.eig_H[0]))).fit(c.data)
    b = m.diagnostics()["blocks"][0]
    w = c.eig_H[torch.argsort(c.eig_H.abs(), descending=True)]
    assert b["min_kind"] == "lower bound"
    assert b["min_eigenvalue"] == pytest.approx(min(float(w[:k].min()), -abs(float(w[k - 1]))))
    assert b["min_eigenvalue"] <= float(c.eig_H[0]) + 1e-10
    assert b["negative_count"] == int((w[:k] < 0).sum()) and b["negative_kind"] == "among known"


def test_ekfac_spectrum_and_error_against_gauss_newton(c):
    lam = 1e-3
    m = EkfacInfluence(c.model, c.loss, regularization=lam, micro_batch_size=MB).fit(c.data)
    d = m.diagnostics(estimate=False)
    offsets = [0, 260, 310]  # fc1 (weight, bias), fc2 (weight, bias)
    for i, b in enumerate(d["blocks"]):
        C = m.curvature_matrix(i)
        w = torch.linalg.eigvalsh(C)
        ref = reference_summary(w, lam)
        assert b["source"] == "ek-fac" and b["approximation_error"] is None
        assert rel(b["top_eigenvalue"], ref["top"]) < 1e-8
        assert rel(b["mean_eigenvalue"], ref["mean"]) < 1e-8
        assert rel(b["effective_rank"], float((w / (w + lam)).sum())) < 1e-6
        # fisher="ggn": mean(Lambda) is the exact trace / p of the layer's Gauss-Newton block
        Gb = c.G[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]]
        assert rel(b["mean_eigenvalue"], float(Gb.trace()) / Gb.shape[0]) < 1e-8
    d = m.diagnostics(c.data)  # with data: the error against the Gauss-Newton block
    for i, b in enumerate(d["blocks"]):
        Gb = c.G[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]]
        Z = probes(Gb.shape[0], block=i)
        GZ, CZ = Z @ Gb, Z @ m.curvature_matrix(i)
        res = torch.linalg.vector_norm(GZ - CZ, dim=1) / torch.linalg.vector_norm(GZ, dim=1)
        assert abs(b["approximation_error"]["relative_residual_mean"] - float(res.mean())) < 1e-7
    assert m.info["curvature"] == d


def test_lanczos_estimates_for_methods_without_a_spectrum(c):
    """CG with the Gauss-Newton matrix: nothing at fit, a Lanczos estimate on the first
    diagnostics() call (over the attached fit data); with as many steps as parameters the
    extremes are exact. LiSSA with the exact Hessian estimates at fit (the indefinite check):
    the estimates never pass the true extremes."""
    lam = 1e-3 * float(c.eig_G[-1])
    m = CgInfluence(c.model, c.loss, regularization=lam, micro_batch_size=MB).fit(c.data)
    assert "diagnostic_passes" not in m.info["fit"][0]
    assert m.info["curvature"]["blocks"][0]["top_eigenvalue"] is None
    b = m.diagnostics(probes=1, steps=c.p)["blocks"][0]
    assert b["source"] == "lanczos estimate" and b["lanczos_steps"] <= c.p
    assert rel(b["top_eigenvalue"], float(c.eig_G[-1])) < 1e-8
    assert abs(b["min_eigenvalue"] - max(float(c.eig_G[0]), 0.0)) < 1e-8 * float(c.eig_G[-1])
    assert b["indefinite"] is False and b["top_kind"] == "estimate"

    lam = 1.2 * abs(float(c.eig_H[0]))
    m = LissaInfluence(c.model, c.loss, hessian="exact", regularization=lam,
                       micro_batch_size=MB).fit(c.data)
    assert m.info["fit"][0]["diagnostic_passes"] == 20
    b = m.diagnostics(estimate=False)["blocks"][0]
    top, low = float(c.eig_H[-1]), float(c.eig_H[0])
    assert low - 1e-10 <= b["min_eigenvalue"] < 0.9 * low  # found, never below the truth
    assert rel(b["top_eigenvalue"], top) < 1e-6 and b["top_eigenvalue"] <= top * (1 + 1e-12)
    assert 0 < b["negative_share"] < 0.5 and 0 < b["negative_mass"] < 0.5
    assert b["condition_number"] == pytest.approx((b["top_eigenvalue"] + lam)
                                                  / (b["min_eigenvalue"] + lam))
    ref_rank = float((c.eig_H / (c.eig_H + lam)).sum())
    assert 0.5 < b["effective_rank"] / ref_rank < 2  # a 2-run quadrature: rough (28.9 / 18.2)


def test_format_is_plain_data_and_travels_with_the_state(c, tmp_path):
    lam = 1e-3 * float(c.eig_G[-1])
    m = NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=lam,
                                micro_batch_size=MB).fit(c.data)
    d = m.diagnostics()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert set(d) == {"method", "hessian", "indefinite", "advice", "blocks"}
    other = NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=lam,
                                    micro_batch_size=MB)
    path = tmp_path / "nys.pt"
    m.save(str(path))
    other.load(str(path))
    assert other.diagnostics() == d
    tr = TracInCP(c.model, c.loss, checkpoints=[c.model.state_dict()], learning_rates=[1.0])
    t = tr.diagnostics()
    json.dumps(t, allow_nan=False)
    assert t["hessian"] == "identity" and t["blocks"] == [] and t["indefinite"] is False
