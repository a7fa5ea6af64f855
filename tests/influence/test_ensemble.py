"""Ensemble: the (weighted) mean of the members' influences, in memory, through both
calculators (real 2-process LocalCluster, real Zarr v3 stores) and the store queries.

Two 6-8-3 tanh classifiers (83 parameters each, float64, cross-entropy) trained on the same 60
points from different seeds; references are each member's own in-memory influences averaged
with NumPy, and for Direct members the independent float64 reference of
``tests/reference.py``.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import ref_gauss_newton, ref_grads, ref_influences
from torch import nn

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DaskInfluenceCalculator,
    DirectInfluence,
    EkfacInfluence,
    Ensemble,
    LissaInfluence,
    SequentialInfluenceCalculator,
    TracInCP,
    query_self_influence,
    query_topk,
)
from dvl_ooc.exceptions import (
    EnsembleMismatchError,
    IndefiniteCurvatureWarning,
    InputError,
    LengthMismatchError,
    NotFittedError,
)

F64 = torch.float64
LAM = 0.01


def _net(seed: int, x: torch.Tensor, y: torch.Tensor, checkpoints: list | None = None
         ) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.Tanh(),
                                    fc2=nn.Linear(8, 3))).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for step in range(120):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if checkpoints is not None and step in (59, 119):
            checkpoints.append(copy.deepcopy(net.state_dict()))
    return net.eval()


class Nets:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(72, 6, generator=g, dtype=F64)
        y = (torch.tanh(x @ torch.randn(6, 3, generator=g, dtype=F64))
             + 0.3 * torch.randn(72, 3, generator=g, dtype=F64)).argmax(1)
        self.x, self.y, self.xt, self.yt = x[:60], y[:60], x[60:], y[60:]
        self.train = (self.x, self.y)
        self.checkpoints: list = []
        self.a = _net(0, self.x, self.y, self.checkpoints)
        self.b = _net(1, self.x, self.y)

    def data(self):
        return self.xt.numpy(), self.yt.numpy(), self.x.numpy(), self.y.numpy()


@pytest.fixture(scope="module")
def nets():
    return Nets()


def direct(net, **kw):
    return DirectInfluence(net, F.cross_entropy, regularization=LAM, **kw)


def ekfac(net, rank=1):
    return EkfacInfluence(net, F.cross_entropy, regularization=LAM, rank=rank)


def cg(net):
    return CgInfluence(net, F.cross_entropy, regularization=LAM, rtol=1e-12, max_iter=500)


MEMBERS = {  # name -> factory(nets) of an unfitted member on network a
    "direct": lambda N: direct(N.a),
    "direct-projected": lambda N: direct(N.a, projection=dict(k_in=4, k_out=3, seed=1)),
    "ekfac-rank1": lambda N: ekfac(N.a),
    "cg": lambda N: cg(N.a),
    "lissa": lambda N: LissaInfluence(N.a, F.cross_entropy, regularization=0.5, max_iter=10,
                                      rtol=None),
    "arnoldi": lambda N: ArnoldiInfluence(N.a, F.cross_entropy, regularization=LAM, rank=6),
    "tracin": lambda N: TracInCP(N.a, F.cross_entropy, N.checkpoints, [0.5, 0.25]),
}


def _close(got, want, rtol=1e-12):
    got, want = (torch.as_tensor(np.array(a.detach().numpy() if isinstance(a, torch.Tensor)
                                          else a, dtype=np.float64)) for a in (got, want))
    assert got.shape == want.shape
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rtol, err


# ---------------------------------------------------------------------- values in memory
@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_one_member_equals_the_member(nets, name):
    """Ensemble([m]) gives m's influences, self-influences, factors and calculator tiles."""
    N = nets
    m = MEMBERS[name](N).fit(N.train)
    ens = Ensemble([m])
    assert ens.is_fitted and ens.weights == [1.0]
    ref = m.influences(N.xt, N.yt, N.x, N.y)
    _close(ens.influences(N.xt, N.yt, N.x, N.y), ref)
    _close(ens.self_influence(N.x, N.y), m.self_influence(N.x, N.y))
    _close(ens.influences_from_factors(ens.influence_factors(N.xt, N.yt), N.x, N.y), ref)
    assert ens.feature_dims() == m.feature_dims()
    calc = SequentialInfluenceCalculator(ens)
    tiles = calc.influences(N.xt, N.yt, N.x, N.y, test_chunk=5, train_chunk=25,
                            dtype="float64").compute()
    tol = 1e-9 if name == "cg" else 1e-12  # CG solves chunks of right-hand sides separately
    _close(tiles, ref, tol)
    assert calc.info["plan"]["p"] == m.gradients(N.xt[:1], N.yt[:1]).shape[1]


def test_two_members_equal_the_mean_of_their_matrices(nets):
    """Direct on net a + compressed EK-FAC on net b: the mean of the two matrices (and with
    weights, the weighted mean); Direct + Direct against the independent float64 reference."""
    N = nets
    da, eb = direct(N.a).fit(N.train), ekfac(N.b).fit(N.train)
    A = da.influences(N.xt, N.yt, N.x, N.y).numpy()
    B = eb.influences(N.xt, N.yt, N.x, N.y).numpy()
    ens = Ensemble([da, eb])
    _close(ens.influences(N.xt, N.yt, N.x, N.y), (A + B) / 2)
    sa, sb = da.self_influence(N.x, N.y).numpy(), eb.self_influence(N.x, N.y).numpy()
    _close(ens.self_influence(N.x, N.y), (sa + sb) / 2)
    _close(ens.influences_from_factors(ens.influence_factors(N.xt, N.yt), N.x, N.y),
           (A + B) / 2)
    # the calculators' feature split, tile by tile (EK-FAC's low-rank tiles inside)
    tiles = SequentialInfluenceCalculator(ens).influences(
        N.xt, N.yt, N.x, N.y, test_chunk=7, train_chunk=16, dtype="float64").compute()
    _close(tiles, (A + B) / 2)
    weighted = Ensemble([da, eb], weights=[3, 1])
    assert weighted.weights == [0.75, 0.25]
    _close(weighted.influences(N.xt, N.yt, N.x, N.y), 0.75 * A + 0.25 * B)
    _close(weighted.self_influence(N.x, N.y), 0.75 * sa + 0.25 * sb)
    assert weighted.fingerprint() != ens.fingerprint()
    nested = Ensemble([Ensemble([da, eb], weights=[1, 2]), da])  # flattened
    assert nested.members == [da, eb, da] and np.allclose(nested.weights, [1 / 6, 1 / 3, 1 / 2])
    _close(nested.influences(N.xt, N.yt, N.x, N.y), (2 * A + B) / 3)
    # independent reference: float64 Gauss-Newton solves per network, averaged
    refs = []
    for net in (N.a, N.b):
        H = ref_gauss_newton(net, F.cross_entropy, N.x, N.y)
        refs.append(ref_influences(H, LAM, ref_grads(net, F.cross_entropy, N.xt, N.yt),
                                   ref_grads(net, F.cross_entropy, N.x, N.y)).numpy())
    both = Ensemble([da, direct(N.b).fit(N.train)])
    _close(both.influences(N.xt, N.yt, N.x, N.y), (refs[0] + refs[1]) / 2, 1e-10)


def test_from_models_and_from_checkpoints(nets, tmp_path):
    N = nets
    ens = Ensemble.from_models([N.a, N.b], direct).fit(N.train)
    assert [m.model for m in ens.members] == [N.a, N.b] and ens.models == [N.a, N.b]
    A = direct(N.a).fit(N.train).influences(N.xt, N.yt, N.x, N.y)
    B = direct(N.b).fit(N.train).influences(N.xt, N.yt, N.x, N.y)
    _close(ens.influences(N.xt, N.yt, N.x, N.y), (A + B) / 2)
    path = tmp_path / "b.pt"
    torch.save({"state_dict": N.b.state_dict()}, path)
    before = copy.deepcopy(N.a.state_dict())
    cks = Ensemble.from_checkpoints(N.a, [N.a.state_dict(), path], direct).fit(N.train)
    _close(cks.influences(N.xt, N.yt, N.x, N.y), (A + B) / 2)
    assert all(torch.equal(v, before[k]) for k, v in N.a.state_dict().items())
    with pytest.raises(InputError, match="checkpoint 0"):
        Ensemble.from_checkpoints(N.a, [{"fc1.weight": torch.zeros(2, 2)}], direct)
    with pytest.raises(InputError, match="at least one"):
        Ensemble.from_models([], direct)


def test_tracin_member_mixes_with_fitted_methods(nets):
    """TracIn (nothing to fit, n_fit 0) does not count as a fitted member or a training-set
    size; the mix averages the two score matrices."""
    N = nets
    tr = MEMBERS["tracin"](N)
    d = direct(N.b)
    ens = Ensemble([tr, d]).fit(N.train)  # no 'mix of fitted and unfitted' error
    assert ens.n_fit == 60
    want = (tr.influences(N.xt, N.yt, N.x, N.y) + d.influences(N.xt, N.yt, N.x, N.y)) / 2
    _close(ens.influences(N.xt, N.yt, N.x, N.y), want)
    tiles = SequentialInfluenceCalculator(ens).influences(
        N.xt, N.yt, N.x, N.y, test_chunk=4, train_chunk=32, dtype="float64").compute()
    _close(tiles, want)


# ---------------------------------------------------------------------- state and shipping
def test_state_pickle_save_and_fingerprint(nets, tmp_path):
    N = nets
    ens = Ensemble([direct(N.a), ekfac(N.b), cg(N.b)]).fit(N.train)
    ref = ens.influences(N.xt, N.yt, N.x, N.y)
    cfg = ens.config()
    assert cfg["method"] == "Ensemble" and len(cfg["members"]) == 3
    assert json.loads(json.dumps(cfg)) == cfg
    # pickles data-free: the CG member's fit data is dropped and must be re-attached
    clone = pickle.loads(pickle.dumps(ens))
    assert clone.needs_data_to_precondition and clone._fit_data is None
    with pytest.raises(NotFittedError, match="member 2"):
        clone.influences(N.xt, N.yt, N.x, N.y)
    clone.attach_data(N.train)
    _close(clone.influences(N.xt, N.yt, N.x, N.y), ref, 0)
    assert clone.fingerprint() == ens.fingerprint()
    fresh = Ensemble([direct(N.a), ekfac(N.b), cg(N.b)]).load_state(ens.state())
    fresh.attach_data(N.train)
    _close(fresh.influences(N.xt, N.yt, N.x, N.y), ref, 0)
    assert fresh.fingerprint() == ens.fingerprint()
    ens.save(str(tmp_path / "ens.pt"))
    other = Ensemble([direct(copy.deepcopy(N.a)), ekfac(copy.deepcopy(N.b)),
                      cg(copy.deepcopy(N.b))])
    other.load(str(tmp_path / "ens.pt")).attach_data(N.train)
    _close(other.influences(N.xt, N.yt, N.x, N.y), ref, 0)
    with pytest.raises(InputError, match="weights"):
        Ensemble([direct(N.a), ekfac(N.b), cg(N.b)], weights=[1, 2, 3]).load_state(ens.state())
    # the fingerprint follows every member: weights, rank, regularization, network weights
    fp = ens.fingerprint()
    ens.members[1].rank = 2
    assert ens.fingerprint() != fp
    ens.members[1].rank = 1
    assert ens.fingerprint() == fp
    ens.regularization = 2 * LAM
    assert ens.fingerprint() != fp
    assert set(ens.regularization) == {"0/model", "1/fc1", "1/fc2", "2/model"}
    assert all(v == 2 * LAM for v in ens.regularization.values())
    b2 = copy.deepcopy(N.b)
    with torch.no_grad():
        b2.fc2.bias += 1e-3
    assert Ensemble([direct(N.a), direct(b2)]).fit(N.train).fingerprint() != \
        Ensemble([direct(N.a), direct(N.b)]).fit(N.train).fingerprint()
    diag = ens.diagnostics(estimate=False)
    assert [b["block"] for b in diag["blocks"]][:3] == ["0/model", "1/fc1", "1/fc2"]
    assert len(diag["members"]) == 3 and json.loads(json.dumps(diag)) == diag


# ---------------------------------------------------------------------- Dask store
@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the ensemble tests") as cluster, \
            Client(cluster) as c:
        yield c


def test_dask_store_and_queries_equal_the_mean(nets, client, tmp_path):
    """Direct(a) + compressed EK-FAC(b) + CG(b) (its fit data shipped by the calculator): ONE
    store whose tiles and self-influence are the mean of the three in-memory matrices; the
    queries on it agree with NumPy on the mean; the store records the ensemble."""
    N = nets
    members = [direct(N.a).fit(N.train), ekfac(N.b).fit(N.train), cg(N.b).fit(N.train)]
    mats = [m.influences(N.xt, N.yt, N.x, N.y).numpy() for m in members]
    selfs = [m.self_influence(N.x, N.y).numpy() for m in members]
    mean, self_mean = sum(mats) / 3, sum(selfs) / 3
    ens = pickle.loads(pickle.dumps(Ensemble(members)))  # no fit data attached
    with pytest.raises(NotFittedError):
        DaskInfluenceCalculator(ens, client).to_zarr(tmp_path / "nodata", *N.data(),
                                                     progress=False)
    assert not (tmp_path / "nodata").exists()
    calc = DaskInfluenceCalculator(ens, client, fit_data=N.train)
    store = calc.to_zarr(tmp_path / "ens.zarr", *N.data(), test_chunk=5, train_chunk=16,
                         self_influence=True, progress=False)
    assert store.is_complete and store.attrs["method"] == "Ensemble"
    assert store.attrs["fingerprint"] == ens.fingerprint()
    assert [c["method"] for c in store.attrs["config"]["members"]] == [
        "DirectInfluence", "EkfacInfluence", "CgInfluence"]
    got = store.influences[:]
    assert got.dtype == np.float32
    _close(got, mean, 1e-6)  # float32 storage
    _close(store.self_influence[:], self_mean, 1e-6)
    k = 4
    top = query_topk(tmp_path / "ens.zarr", k=k, scheduler="synchronous")
    want_top = np.argsort(-mean, axis=1, kind="stable")[:, :k]
    want_low = np.argsort(mean, axis=1, kind="stable")[:, :k]
    assert np.array_equal(top["helpful_train"].values, want_top)
    assert np.array_equal(top["harmful_train"].values, want_low)
    _close(top["helpful_influence"].values, np.take_along_axis(mean, want_top, 1), 1e-6)
    si = query_self_influence(tmp_path / "ens.zarr")
    assert np.array_equal(si["position"].values, np.argsort(-self_mean, kind="stable"))
    _close(si["self_influence"].values, np.sort(self_mean)[::-1], 1e-6)
    # the lazy array of the Dask calculator: the same mean
    lazy = calc.influences(*N.data(), test_chunk=12, train_chunk=32, dtype="float64")
    _close(lazy.compute(), mean, 1e-9)
    # the sequential calculator writes the same store (the CG member's data from fit_data=)
    seq = SequentialInfluenceCalculator(ens, fit_data=N.train).to_zarr(
        tmp_path / "seq.zarr", *N.data(), test_chunk=5, train_chunk=16, self_influence=True,
        progress=False)
    assert seq.attrs["fingerprint"] == store.attrs["fingerprint"]
    _close(seq.influences[:], got, 1e-6)
    _close(seq.self_influence[:], store.self_influence[:], 1e-6)
    # an equal ensemble rebuilt from the state resumes the store: nothing left to compute
    fresh = Ensemble([direct(N.a), ekfac(N.b), cg(N.b)]).load_state(Ensemble(members).state())
    again = DaskInfluenceCalculator(fresh, client, fit_data=N.train)
    again.to_zarr(tmp_path / "ens.zarr", *N.data(), test_chunk=5, train_chunk=16,
                  self_influence=True, progress=False)
    assert again.info["columns"] == []
    # a changed member is another computation: the store refuses to be mixed with it
    from dvl_ooc.exceptions import StoreMismatchError

    other = Ensemble([members[0], members[1]])
    with pytest.raises(StoreMismatchError):
        DaskInfluenceCalculator(other, client).to_zarr(tmp_path / "ens.zarr", *N.data(),
                                                       test_chunk=5, train_chunk=16,
                                                       self_influence=True, progress=False)
    _close(store.influences[:], mean, 1e-6)  # untouched


def test_fit_on_workers_equals_fit_in_process(nets, client):
    """One task per member on the workers; the states loaded here equal an in-process fit,
    and the warnings of a worker's fit reach the caller (the exact Hessian of net a has
    eigenvalues near -1e-2, below -lambda: IndefiniteCurvatureWarning)."""
    N = nets

    def build():
        exact = DirectInfluence(N.a, F.cross_entropy, hessian="exact", regularization=1e-3)
        return Ensemble([exact, ekfac(N.b), cg(N.b), MEMBERS["tracin"](N)])

    with pytest.warns(IndefiniteCurvatureWarning):
        local = build().fit(N.train)
    with pytest.warns(IndefiniteCurvatureWarning, match="ensemble member 0"):
        remote = build().fit(N.train, client=client)
    assert remote.is_fitted and remote.n_fit == 60
    assert remote.members[2]._fit_data is not None  # CG: the data attached here
    for a, b in zip(local.members, remote.members):
        sa, sb = a.state(), b.state()
        assert sa["config"] == sb["config"] and sa["n_fit"] == sb["n_fit"]
        for da_, db_ in zip(sa["blocks"], sb["blocks"]):
            assert da_.keys() == db_.keys()
            for key in da_:
                assert torch.allclose(da_[key], db_[key], rtol=1e-12, atol=1e-14), key
    assert remote.info["fit"] and {d["member"] for d in remote.info["fit"]} == {0, 1, 2}
    _close(remote.influences(N.xt, N.yt, N.x, N.y), local.influences(N.xt, N.yt, N.x, N.y))


# ---------------------------------------------------------------------- errors
def test_bad_members_are_refused(nets, tmp_path):
    N = nets
    with pytest.raises(InputError, match="at least one"):
        Ensemble([])
    with pytest.raises(InputError, match="list"):
        Ensemble(direct(N.a))
    with pytest.raises(InputError, match="member 1"):
        Ensemble([direct(N.a), N.b])
    with pytest.raises(LengthMismatchError):
        Ensemble([direct(N.a), direct(N.b)], weights=[1.0])
    with pytest.raises(InputError, match="weights"):
        Ensemble([direct(N.a), direct(N.b)], weights=[1.0, -1.0])
    # different training-set sizes
    small = direct(N.b).fit((N.x[:40], N.y[:40]))
    with pytest.raises(EnsembleMismatchError, match="n_fit"):
        Ensemble([direct(N.a).fit(N.train), small])
    # different dtypes / devices
    with pytest.raises(EnsembleMismatchError, match="dtype"):
        Ensemble([direct(N.a), direct(copy.deepcopy(N.b).float())])
    with pytest.raises(EnsembleMismatchError, match="device"):
        Ensemble([direct(N.a), direct(copy.deepcopy(N.b).to("meta"))])
    # unfitted members where fitted ones are needed; nothing written
    ens = Ensemble([direct(N.a).fit(N.train), ekfac(N.b)])
    with pytest.raises(NotFittedError, match="member 1"):
        ens.influences(N.xt, N.yt, N.x, N.y)
    with pytest.raises(NotFittedError):
        SequentialInfluenceCalculator(ens).to_zarr(tmp_path / "s", *N.data(), progress=False)
    assert not (tmp_path / "s").exists()
    # a mix of fitted and unfitted members is fitted only when told how
    with pytest.raises(EnsembleMismatchError, match="refit"):
        ens.fit(N.train)
    fp0 = ens.members[0].fingerprint()
    ens.fit(N.train, refit=False)
    assert ens.is_fitted and ens.members[0].fingerprint() == fp0
    with pytest.raises(EnsembleMismatchError, match="refit=True"):
        ens.fit((N.x[:40], N.y[:40]))
    ens.fit((N.x[:40], N.y[:40]), refit=True)
    assert ens.n_fit == 40 and all(m.n_fit == 40 for m in ens.members)
    with pytest.raises(InputError, match="members' widths"):
        ens.tile(torch.zeros(2, 5, dtype=F64), torch.zeros(3, 5, dtype=F64))
    with pytest.raises(InputError, match="batch_size"):
        ens.influences(N.xt, N.yt, N.x, N.y, batch_size=0)
    with pytest.raises(AttributeError, match="models"):
        ens.model  # noqa: B018
