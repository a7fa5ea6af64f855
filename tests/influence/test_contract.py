"""The contract every influence model keeps, parametrised over all of them.

One tiny float64 regression problem (a 6-8-3 tanh MLP, 83 parameters, squared-error loss) keeps
the whole file fast. Its loss has a constant output Hessian, so on the last layer the
Gauss-Newton block is exactly Kronecker-factored and EK-FAC is exact there too: every method
can be checked against DirectInfluence (itself checked against an independent float64
reference from ``tests/reference.py``). The ``Ensemble`` (Direct on the trained network and
Arnoldi on its step-99 checkpoint, weights 1:3) is held to the same contract; its converged
reference is the weighted mean of Direct on each member's network, summed by hand.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from conftest import rel_err
from reference import ref_gauss_newton, ref_grads, ref_influences
from torch import nn

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    Ensemble,
    LissaInfluence,
    NystroemSketchInfluence,
    SequentialInfluenceCalculator,
    TracInCP,
)
from dvl_ooc.exceptions import ConvergenceWarning, InputError, NotFittedError
from dvl_ooc.influence import InfluenceModel

F64 = torch.float64


def sq_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half squared error, mean over samples (module level: picklable)."""
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


class Tiny:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(68, 6, generator=g, dtype=F64)
        w1, w2 = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(5, 3, generator=g,
                                                                         dtype=F64)
        y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(68, 3, generator=g, dtype=F64)
        torch.manual_seed(0)
        self.model = nn.Sequential(OrderedDict(
            fc1=nn.Linear(6, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3))).double()
        opt = torch.optim.Adam(self.model.parameters(), lr=0.03)
        self.checkpoints = []
        for step in range(150):
            opt.zero_grad()
            sq_loss(self.model(x[:60]), y[:60]).backward()
            opt.step()
            if step in (49, 99):
                self.checkpoints.append(copy.deepcopy(self.model.state_dict()))
        self.model.eval()
        self.late = copy.deepcopy(self.model)  # another network: the checkpoint of step 99
        self.late.load_state_dict(self.checkpoints[1])
        self.loss = sq_loss
        self.x, self.y, self.xt, self.yt = x[:60], y[:60], x[60:64], y[60:64]
        self.train = (self.x, self.y)
        self.top = {}  # the top Gauss-Newton eigenvalue, per parameter selection
        for layers in (None, ("fc2",)):
            m = DirectInfluence(self.model, sq_loss, regularization=1.0,
                                layers=None if layers is None else list(layers)).fit(self.train)
            self.top[layers] = m.info["fit"][0]["max_eigenvalue"]

    def lam(self, layers=None, rel: float = 1e-2) -> float:
        return rel * self.top[None if layers is None else tuple(layers)]

    def influences(self, m: InfluenceModel) -> torch.Tensor:
        return m.influences(self.xt, self.yt, self.x, self.y)


@pytest.fixture(scope="module")
def tiny():
    return Tiny()


def _direct(P, lam, layers=None, model=None):
    return DirectInfluence(P.model if model is None else model, P.loss, regularization=lam,
                           layers=layers)


#: the ensemble's member weights (normalised to 1/4, 3/4)
ENSEMBLE_WEIGHTS = (1.0, 3.0)


def _ensemble(P, lam, rank=5, **kw):
    """Two networks, two methods, unequal weights: mixed feature widths (83 + rank) and a
    member whose train features are not its gradients (the ensemble's copy path)."""
    return Ensemble([DirectInfluence(P.model, P.loss, regularization=lam, **kw),
                     ArnoldiInfluence(P.late, P.loss, regularization=lam, rank=rank, **kw)],
                    weights=ENSEMBLE_WEIGHTS)


def reference(name, P, lam, layers=None):
    """What ``name`` converged must equal: Direct's influences; for the Ensemble the weighted
    mean of Direct on each member's network (an independent sum, not through Ensemble)."""
    if name != "Ensemble":
        return P.influences(_direct(P, lam, layers).fit(P.train))
    w = torch.tensor(ENSEMBLE_WEIGHTS, dtype=F64) / sum(ENSEMBLE_WEIGHTS)
    return sum(wi * P.influences(_direct(P, lam, layers, net).fit(P.train))
               for wi, net in zip(w, (P.model, P.late)))


# name -> (factory(P, lam, **overrides), budget for the generic checks)
MODELS = {
    "DirectInfluence": (_direct, {}),
    "CgInfluence": (lambda P, lam, **kw: CgInfluence(P.model, P.loss, regularization=lam, **kw),
                    {"rtol": 1e-6}),
    "LissaInfluence": (lambda P, lam, **kw: LissaInfluence(P.model, P.loss, regularization=lam,
                                                           **kw),
                       {"max_iter": 40, "rtol": None}),
    "ArnoldiInfluence": (lambda P, lam, **kw: ArnoldiInfluence(P.model, P.loss,
                                                               regularization=lam, **kw),
                         {"rank": 5}),
    "NystroemSketchInfluence": (lambda P, lam, **kw: NystroemSketchInfluence(
        P.model, P.loss, regularization=lam, **kw), {"rank": 5}),
    "EkfacInfluence": (lambda P, lam, **kw: EkfacInfluence(P.model, P.loss, regularization=lam,
                                                           **kw), {}),
    "TracInCP": (lambda P, lam, **kw: TracInCP(P.model, P.loss, P.checkpoints, **kw),
                 {"learning_rates": [0.5, 0.25]}),
    "Ensemble": (_ensemble, {"rank": 5}),
}

#: converged settings (agreement with Direct), budgets that must reduce the error, tolerance
#: and damping relative to the top eigenvalue: 1e-2 (condition number ~100), except for LiSSA,
#: whose Neumann series needs ~ cond * log(1/eps) steps (test_cg_lissa.py checks it at 1e-2)
CONVERGED = {
    "DirectInfluence": ({}, None, 1e-12, 1e-2),
    "CgInfluence": ({"rtol": 1e-11}, ("max_iter", [2, 6, 20]), 1e-8, 1e-2),
    "LissaInfluence": ({"max_iter": 2000, "rtol": 1e-12}, ("max_iter", [5, 25, 125]), 1e-8,
                       1e-1),
    "ArnoldiInfluence": ({"rank": 1000}, ("rank", [2, 8, 32]), 1e-8, 1e-2),
    "NystroemSketchInfluence": ({"rank": 1000}, ("rank", [2, 8, 32]), 1e-8, 1e-2),
    "EkfacInfluence": ({}, None, 1e-8, 1e-2),
    "Ensemble": ({"rank": 1000}, ("rank", [2, 8, 32]), 1e-8, 1e-2),
}
ALL = sorted(MODELS)
APPROX = sorted(k for k, v in CONVERGED.items() if v[1] is not None)


def make(name, P, lam=None, **kw):
    factory, budget = MODELS[name]
    return factory(P, P.lam() if lam is None else lam, **{**budget, **kw})


def fitted(name, P, **kw):
    m = make(name, P, **kw)
    return m if name == "TracInCP" else m.fit(P.train)


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn()


# ---------------------------------------------------------------------- life cycle
@pytest.mark.parametrize("name", ALL)
def test_not_fitted_error_before_fit(tiny, name):
    m = make(name, tiny)
    if name == "TracInCP":  # identity curvature: fitted at construction, fit needs no data
        assert m.is_fitted
        return
    assert not m.is_fitted
    for call in (lambda: m.influences(tiny.xt, tiny.yt), lambda: m.state(),
                 lambda: m.precondition(torch.zeros(2, m.grads.num_params, dtype=F64))):
        with pytest.raises(NotFittedError, match="fit"):
            call()


@pytest.mark.parametrize("name", ALL)
def test_pickle_and_state_round_trips_give_identical_influences(tiny, name):
    m = fitted(name, tiny)
    ref = quiet(lambda: tiny.influences(m))
    clone = pickle.loads(pickle.dumps(m))
    if clone.needs_data_to_precondition:
        clone.attach_data(tiny.train)
    assert torch.equal(quiet(lambda: tiny.influences(clone)), ref)
    fresh = make(name, tiny).load_state(m.state())
    if fresh.needs_data_to_precondition:
        fresh.attach_data(tiny.train)
    assert torch.equal(quiet(lambda: tiny.influences(fresh)), ref)
    assert fresh.fingerprint() == m.fingerprint()


@pytest.mark.parametrize("name", ALL)
def test_config_is_plain_data_and_fingerprint_follows_the_fit(tiny, name):
    m = fitted(name, tiny)
    cfg = m.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["method"] == name
    # an ensemble has no parameters or curvature of its own: layers and hessian are per member
    for c in cfg["members"] if name == "Ensemble" else [cfg]:
        assert "layers" in c
        assert c["hessian"] == ("exact" if name == "TracInCP" else "gauss-newton")  # defaults
    fp = m.fingerprint()
    assert make(name, tiny).fingerprint() != fp or name == "TracInCP"
    if name == "TracInCP":  # the "fit" of TracIn is its checkpoints and learning rates
        other = make(name, tiny, learning_rates=[0.5, 0.5])
    else:
        other = make(name, tiny).fit((tiny.x[:40], tiny.y[:40]))
    assert other.fingerprint() != fp
    assert fitted(name, tiny).fingerprint() == fp  # deterministic


@pytest.mark.parametrize(("name", "scheduler"),
                         [(n, s) for n in ALL for s in ("synchronous", "threads")])
def test_sequential_calculator_equals_model(tiny, name, scheduler):
    """The calculator's tiles (3 + 1 test rows, 25 + 25 + 10 train columns) equal the model's
    own influences, computed in one piece; with ``"threads"`` the tiles run concurrently on
    ONE model object. CG solves chunks of right-hand sides separately: equal up to its rtol."""
    import dask

    m = fitted(name, tiny)
    ref = quiet(lambda: tiny.influences(m))
    lazy = SequentialInfluenceCalculator(m).influences(tiny.xt, tiny.yt, tiny.x, tiny.y,
                                                       test_chunk=3, train_chunk=25,
                                                       dtype="float64")
    with dask.config.set(scheduler=scheduler, num_workers=3):
        got = torch.as_tensor(quiet(lazy.compute))
    tol = 10 * m.rtol if name == "CgInfluence" else 1e-10
    assert torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())), \
        rel_err(got, ref)


# ---------------------------------------------------------------------- agreement with Direct
def test_direct_matches_independent_float64_reference(tiny):
    """Direct (Gauss-Newton) against the float64 reference, for all parameters and for
    ``layers=["fc2"]`` (the reference frees only fc2: the other parameters are constants)."""
    for layers in (None, ["fc2"]):
        ref_model = copy.deepcopy(tiny.model)
        if layers is not None:
            ref_model.fc1.requires_grad_(False)
        G = ref_gauss_newton(ref_model, sq_loss, tiny.x, tiny.y)
        g_tr = ref_grads(ref_model, sq_loss, tiny.x, tiny.y)
        g_te = ref_grads(ref_model, sq_loss, tiny.xt, tiny.yt)
        lam = tiny.lam(layers)
        assert lam == pytest.approx(1e-2 * float(torch.linalg.eigvalsh(G)[-1]), rel=1e-10)
        m = _direct(tiny, lam, layers).fit(tiny.train)
        assert m.grads.num_params == len(G)
        ref = ref_influences(G, lam, g_te, g_tr)
        got = tiny.influences(m)
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    # layers selects, blocks groups: the fc2 block of a layer-wise model differs from layers=
    whole = _direct(tiny, 1.0, ["fc2.weight", "fc2.bias"])
    assert [b.names for b in whole.blocks] == [("fc2.weight", "fc2.bias")]
    assert whole.config()["layers"] == ["fc2.weight", "fc2.bias"]
    with pytest.raises(InputError, match="fc9"):
        _direct(tiny, 1.0, ["fc9"])
    with pytest.raises(InputError, match="not selected"):
        DirectInfluence(tiny.model, sq_loss, layers=["fc2"], blocks={"a": ["fc1"]})


# EK-FAC is exact only where the curvature is Kronecker-factored (the last layer of this
# problem); over all layers it approximates the Gauss-Newton matrix block-wise
_AGREE = [pytest.param(n, lay, id=f"{n}-{'fc2' if lay else 'all'}")
          for n in sorted(CONVERGED) for lay in (None, ["fc2"])
          if not (n == "EkfacInfluence" and lay is None)]


@pytest.mark.parametrize(("name", "layers"), _AGREE)
def test_agrees_with_direct_when_converged(tiny, name, layers):
    """Full rank / converged iterations equal Direct; with ``layers=["fc2"]`` every model
    attributes only fc2."""
    settings, _, tol, rel = CONVERGED[name]
    lam = tiny.lam(layers, rel)
    ref = reference(name, tiny, lam, layers)
    m = make(name, tiny, lam=lam, layers=layers, **settings).fit(tiny.train)
    got = tiny.influences(m)
    assert torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())), \
        rel_err(got, ref)


@pytest.mark.parametrize("name", APPROX)
def test_error_decreases_with_rank_or_iterations(tiny, name):
    _, (key, values), _, rel = CONVERGED[name]
    lam = tiny.lam(rel=rel)
    ref = reference(name, tiny, lam)
    errs = []
    for v in values:
        m = make(name, tiny, lam=lam, **{key: v}).fit(tiny.train)
        errs.append(rel_err(quiet(lambda m=m: tiny.influences(m)), ref))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-3, errs


# ---------------------------------------------------------------------- extension point
class _ScaledIdentity(InfluenceModel):
    """A new method in a few lines: ``(mean ||g||^2 / p + lambda)^-1`` per block, no fit
    override."""

    _state_keys = ("scale",)

    def _fit_block(self, index, block, data, reg):
        g = self.grads.per_sample_grads(*data, block=block)
        scale = (g * g).sum(1).mean() / block.numel
        self.info["fit"].append({"block": block.name, "index": index})
        return {"scale": scale}

    def _precondition_block(self, i, block, g, reg):
        return g / (self._state[i]["scale"] + reg)


def test_new_method_is_a_subclass_without_fit_override(tiny):
    m = _ScaledIdentity(tiny.model, sq_loss, regularization=0.1, blocks="layer")
    assert "fit" not in vars(_ScaledIdentity)
    m.fit(tiny.train)
    m.fit(tiny.train)  # info["fit"] is reset by every fit
    assert [d["index"] for d in m.info["fit"]] == [0, 1]
    g = ref_grads(tiny.model, sq_loss, tiny.x, tiny.y)
    sizes = [b.numel for b in m.blocks]
    scales = [float((part * part).sum(1).mean()) / part.shape[1] for part in g.split(sizes, 1)]
    got = m.precondition(g)
    for part, want, s in zip(got.split(sizes, 1), g.split(sizes, 1), scales):
        assert torch.allclose(part, want / (s + 0.1), rtol=1e-12)
