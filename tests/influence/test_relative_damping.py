"""Damping relative to the spectrum: ``regularization=Relative(1e-3)`` / ``"1e-3*top"`` /
``Relative(0.1, of="mean")``, resolved per block at fit time from the fitted spectrum, recorded
in ``info["fit"]`` and ``config()``, and carried to every worker by the pickled model."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import MB, case
from torch import nn

from dvl_ooc.exceptions import InputError, RegularizationError
from dvl_ooc.influence import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    Relative,
)


@pytest.fixture(scope="module")
def c():
    return case()


def blocks_of(c, M):
    out, o = [], 0
    for size in (260, 50):  # fc1 (weight, bias), fc2 (weight, bias)
        out.append(M[o:o + size, o:o + size])
        o += size
    return out


def test_top_resolves_per_block_and_is_recorded(c):
    m = DirectInfluence(c.model, c.loss, blocks="layer", regularization=Relative(1e-3),
                        micro_batch_size=MB)
    names = [b.name for b in m.blocks]
    assert m.config()["regularization"] == {n: "0.001*top" for n in names}  # before fit
    m.fit(c.data)
    want = {n: 1e-3 * float(torch.linalg.eigvalsh(Gb)[-1])
            for n, Gb in zip(names, blocks_of(c, c.G))}
    cfg = m.config()
    assert cfg["regularization_rule"] == {n: "0.001*top" for n in names}
    for n in names:
        assert cfg["regularization"][n] == pytest.approx(want[n], rel=1e-9)
    assert [d["regularization"] for d in m.info["fit"]] == [cfg["regularization"][n]
                                                            for n in names]
    assert {d["regularization_rule"] for d in m.info["fit"]} == {"0.001*top"}
    assert [b["regularization"] for b in m.diagnostics()["blocks"]] == list(
        cfg["regularization"].values())
    # the same numbers as the absolute values it resolved to; the string form is the same rule
    absolute = DirectInfluence(c.model, c.loss, blocks="layer", micro_batch_size=MB,
                               regularization=cfg["regularization"]).fit(c.data)
    assert "regularization_rule" not in absolute.config()
    a = absolute.influences(c.x_test, c.y_test, *c.data)
    assert torch.equal(m.influences(c.x_test, c.y_test, *c.data), a)
    s = DirectInfluence(c.model, c.loss, blocks="layer", regularization="1e-3*top",
                        micro_batch_size=MB).fit(c.data)
    assert s.config() == cfg and s.fingerprint() == m.fingerprint()


def test_absolute_values_are_unchanged(c):
    m = DirectInfluence(c.model, c.loss, regularization=0.01, micro_batch_size=MB)
    assert m.config()["regularization"] == {"model": 0.01}
    assert "regularization_rule" not in m.config() and m.regularization_rule is None
    m.fit(c.data)
    assert m.regularization == {"model": 0.01} and m.info["fit"][0]["regularization"] == 0.01
    mixed = DirectInfluence(c.model, c.loss, blocks="layer", micro_batch_size=MB,
                            regularization={"fc1": 0.01, "fc2": "0.1*mean"}).fit(c.data)
    G2 = blocks_of(c, c.G)[1]
    assert mixed.regularization["fc1"] == 0.01
    assert mixed.regularization["fc2"] == pytest.approx(0.1 * float(G2.trace()) / 50, rel=1e-9)
    assert mixed.config()["regularization_rule"] == {"fc1": None, "fc2": "0.1*mean"}


def test_ekfac_mean_is_the_kronfluence_heuristic(c):
    """``Relative(0.1, of="mean")`` on EK-FAC (fisher="ggn"): 0.1 x trace / p of each layer's
    Gauss-Newton block, i.e. 0.1 x mean(Lambda)."""
    m = EkfacInfluence(c.model, c.loss, regularization=Relative(0.1, of="mean"),
                       micro_batch_size=MB).fit(c.data)
    for (name, lam), Gb in zip(m.regularization.items(), blocks_of(c, c.G)):
        assert lam == pytest.approx(0.1 * float(Gb.trace()) / Gb.shape[0], rel=1e-9), name


def test_cg_and_lissa_resolve_from_the_lanczos_estimate(c):
    top = float(c.eig_G[-1])
    cg = CgInfluence(c.model, c.loss, regularization=Relative(1e-2),
                     micro_batch_size=MB).fit(c.data)
    assert cg.regularization["model"] == pytest.approx(1e-2 * top, rel=1e-6)
    assert cg.info["fit"][0]["diagnostic_passes"] == 20
    rel_lissa = LissaInfluence(c.model, c.loss, regularization=Relative(1e-1), max_iter=50,
                               rtol=None, micro_batch_size=MB).fit(c.data)
    lam = rel_lissa.regularization["model"]
    assert lam == pytest.approx(1e-1 * top, rel=1e-6)
    # the scale is derived from the resolved lambda: the same numbers as the absolute value
    abs_lissa = LissaInfluence(c.model, c.loss, regularization=lam, max_iter=50, rtol=None,
                               micro_batch_size=MB).fit(c.data)
    assert rel_lissa.info["fit"][0]["scale"] == abs_lissa.info["fit"][0]["scale"]
    g = c.x_test.new_zeros(2, c.p).normal_(generator=torch.Generator().manual_seed(0))
    assert torch.equal(rel_lissa.precondition(g), abs_lissa.precondition(g))


_CHILD = """
import json, pickle, sys, torch
torch.set_num_threads(1)
m = pickle.load(open(sys.argv[1], "rb"))
g = torch.load(sys.argv[2])
print(json.dumps({"regularization": m.regularization, "config": m.config(),
                  "fingerprint": m.fingerprint(),
                  "features": m.test_features(g).double().sum().item()}))
"""


def test_every_worker_uses_the_same_lambda(c, tmp_path):
    """The resolved lambda travels with the pickled model: a round trip and a fresh process
    (what a spawned Dask worker does) see the same lambda, config, fingerprint and features."""
    m = ArnoldiInfluence(c.model, c.loss, rank=16, regularization="1e-3*top",
                         micro_batch_size=MB).fit(c.data)
    lam = m.regularization["model"]
    assert lam == pytest.approx(1e-3 * float(c.eig_G[-1]), rel=1e-8)
    clone = pickle.loads(pickle.dumps(m))
    assert clone.regularization == m.regularization and clone.fingerprint() == m.fingerprint()
    g = torch.randn(3, c.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    path, gpath = tmp_path / "m.pkl", tmp_path / "g.pt"
    path.write_bytes(pickle.dumps(m))
    torch.save(g, gpath)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(gpath)], check=True,
                         capture_output=True, text=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["regularization"] == {"model": lam}
    assert got["config"] == json.loads(json.dumps(m.config()))
    assert got["config"]["regularization_rule"] == {"model": "0.001*top"}
    assert got["fingerprint"] == m.fingerprint()
    assert got["features"] == m.test_features(g).double().sum().item()


def test_load_state_and_reassignment(c):
    fitted = NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=Relative(1e-3),
                                     micro_batch_size=MB).fit(c.data)
    fresh = NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=Relative(1e-3),
                                    micro_batch_size=MB).load_state(fitted.state())
    assert fresh.regularization == fitted.regularization
    assert fresh.config() == fitted.config() and fresh.fingerprint() == fitted.fingerprint()
    for other in (Relative(1e-2), 1e-3):
        with pytest.raises(InputError, match="regularization"):
            NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=other,
                                    micro_batch_size=MB).load_state(fitted.state())
    # a new rule on a fitted model resolves from the fitted spectrum, without a new fit
    fitted.regularization = Relative(1e-1)
    refit = NystroemSketchInfluence(c.model, c.loss, rank=20, regularization=Relative(1e-1),
                                    micro_batch_size=MB).fit(c.data)
    assert fitted.regularization == refit.regularization
    assert fitted.info["fit"][0]["regularization"] == refit.regularization["model"]
    assert fitted.config() == refit.config()


def test_invalid_relative_forms_are_refused():
    for bad in (lambda: Relative(0), lambda: Relative(-1e-3), lambda: Relative(1e-3, of="max"),
                lambda: Relative(float("nan"))):
        with pytest.raises(RegularizationError):
            bad()
    model = nn.Linear(2, 1, bias=False).double()
    for reg in ("abc*top", "1e-3*median", "top"):
        with pytest.raises(RegularizationError, match="top"):
            DirectInfluence(model, F.mse_loss, regularization=reg)
    assert str(Relative(1e-3)) == "0.001*top" and Relative.parse("0.1 * mean") == Relative(
        0.1, "mean")
    # no positive curvature to be relative to: refused by name
    x, y = torch.zeros(5, 2, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)
    with pytest.raises(RegularizationError, match="absolute"):
        DirectInfluence(model, F.mse_loss, regularization=Relative(1e-3)).fit((x, y))
