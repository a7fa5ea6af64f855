"""TMC-Shapley / MSR-Banzhaf against exact values, determinism, continuation, truncation, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from dvl_ooc.exceptions import InputError, LengthMismatchError, UtilityError
from dvl_ooc.seeding import numpy_rng
from dvl_ooc.valuation import (
    DeviationTruncation,
    FixedTruncation,
    InteractionGame,
    MaxChecks,
    MaxUpdates,
    MinUpdates,
    ModelUtility,
    MSRBanzhafValuation,
    NoTruncation,
    RelativeTruncation,
    TMCShapleyValuation,
    ValuationResult,
    exact_banzhaf,
    exact_shapley,
)


def _game(noise=0.0, n=7, seed=0):
    rng = np.random.default_rng(seed)
    return InteractionGame(rng.normal(size=n), rng.normal(size=(n, n)) * 0.4, bonus=1.5,
                           threshold=3, noise=noise)


def test_exact_enumeration_matches_closed_form_values():
    g = _game()
    np.testing.assert_allclose(exact_shapley(g).values, g.shapley_values(), atol=1e-12)
    np.testing.assert_allclose(exact_banzhaf(g).values, g.banzhaf_values(), atol=1e-12)
    # efficiency of Shapley values: sum = u(N) - u(empty)
    assert exact_shapley(g).values.sum() == pytest.approx(g(np.arange(7)) - g([]))


def _within_stderr(est: ValuationResult, exact: np.ndarray, z: float = 4.0):
    err = np.abs(est.values - exact)
    assert np.all(err <= z * est.stderr + 1e-12), (err / est.stderr).round(2)
    assert np.all(est.stderr > 0)


@pytest.mark.parametrize("antithetic", [False, True])
def test_tmc_converges_to_closed_form_within_reported_stderr(antithetic):
    g = _game()
    res = TMCShapleyValuation(g, is_done=MinUpdates(1200), seed=3, antithetic=antithetic,
                              batch_size=50, samples_per_round=400).fit().result
    _within_stderr(res, g.shapley_values())
    # the stderr shrinks like 1/sqrt(samples): it is a real, small error bar
    assert res.stderr.max() < 0.05


def test_msr_banzhaf_converges_to_closed_form_within_reported_stderr():
    g = _game()
    res = MSRBanzhafValuation(g, is_done=MaxUpdates(6000), seed=4).fit().result
    assert res.kind == "msr" and res.counts.min() >= 6000
    _within_stderr(res, g.banzhaf_values())
    assert res.stderr.max() < 0.05


def test_combinatorial_mc_shapley_converges_to_closed_form():
    from dvl_ooc.valuation import CombinatorialShapleyValuation

    g = _game(n=5)
    res = CombinatorialShapleyValuation(g, is_done=MinUpdates(3000), seed=2).fit().result
    assert res.evaluations == res.n_samples * 6
    _within_stderr(res, g.shapley_values())
    assert res.stderr.max() < 0.1


def test_truncation_policies_cut_the_walk_and_zero_the_tail():
    g = InteractionGame(np.ones(10))  # u(S) = |S|: every marginal is exactly 1
    full = TMCShapleyValuation(g, NoTruncation(), is_done=MaxChecks(1), seed=0,
                               samples_per_round=4).fit().result
    np.testing.assert_allclose(full.values, 1.0)
    assert full.evaluations == 4 * 10 + 2
    v = TMCShapleyValuation(g, FixedTruncation(0.5), is_done=MaxChecks(1), seed=0,
                            samples_per_round=4).fit()
    # positions 1..5 of each permutation have marginal 1, the rest 0 -> values are the
    # fraction of permutations in which a point was among the first five
    cut = np.zeros(10)
    for k in range(4):
        cut[numpy_rng(0, k).permutation(10)[:5]] += 1
    np.testing.assert_allclose(v.result.values, cut / 4)
    # relative truncation: |k - 10| <= 0.2 * 10 fires at k = 8
    r = TMCShapleyValuation(g, RelativeTruncation(0.2), is_done=MaxChecks(1), seed=0,
                            samples_per_round=4).fit().result
    assert r.values.sum() == pytest.approx(8.0)
    # burn-in 0.9 postpones it to k = 9
    r = TMCShapleyValuation(g, RelativeTruncation(0.2, burn_in_fraction=0.9),
                            is_done=MaxChecks(1), seed=0, samples_per_round=4).fit().result
    assert r.values.sum() == pytest.approx(9.0)
    # deviation: std of scores 1..k is sqrt(k(k+1)/12); |k - 10| < std first at k = 8
    d = TMCShapleyValuation(g, DeviationTruncation(1.0), is_done=MaxChecks(1), seed=0,
                            samples_per_round=4).fit().result
    assert d.values.sum() == pytest.approx(8.0)


def test_same_seed_same_values_whatever_the_batch_size():
    g = _game(noise=0.3)
    runs = {}
    for bs in (1, 3, 8, 24):
        v = TMCShapleyValuation(g, RelativeTruncation(0.05, 0.2), is_done=MaxChecks(2),
                                seed=7, batch_size=bs, samples_per_round=24).fit()
        runs[bs] = v.result
    ref = runs[1]
    for r in runs.values():
        assert r.n_samples == 48 and r.evaluations == ref.evaluations
        assert np.array_equal(r.counts, ref.counts)
        np.testing.assert_allclose(r.values, ref.values, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(r.variances, ref.variances, rtol=1e-11, atol=1e-15)
    other = TMCShapleyValuation(g, is_done=MaxChecks(2), seed=8, samples_per_round=24).fit()
    assert not np.allclose(other.result.values, ref.values)
    for bs in (5, 64):  # MSR likewise
        runs[bs] = MSRBanzhafValuation(g, is_done=MaxChecks(2), seed=7, batch_size=bs,
                                       samples_per_round=128).fit().result
    np.testing.assert_allclose(runs[5].values, runs[64].values, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(runs[5].stderr, runs[64].stderr, rtol=1e-11)


@pytest.mark.parametrize("cls", [TMCShapleyValuation, MSRBanzhafValuation])
def test_continuing_from_a_saved_result_equals_one_longer_run(cls, tmp_path):
    g = _game(noise=0.3)
    kw = dict(seed=21, batch_size=4, samples_per_round=16)
    long = cls(g, is_done=MaxChecks(5), **kw).fit().result
    first = cls(g, is_done=MaxChecks(2), **kw).fit().result
    path = first.save(tmp_path / "partial.npz")
    cont = cls(g, is_done=MaxChecks(3), **kw).fit(result=ValuationResult.load(path)).result
    assert cont.n_samples == long.n_samples == 80
    assert np.array_equal(cont.values, long.values)  # same merges in the same order
    assert np.array_equal(cont.variances, long.variances)
    # the seed is taken from the saved result when none is given
    kw2 = dict(kw, seed=None)
    cont2 = cls(g, is_done=MaxChecks(3), **kw2).fit(result=first).result
    assert np.array_equal(cont2.values, long.values)


@pytest.fixture(scope="module")
def tiny_digits(digits):
    # 8 training points of classes 1 and 7 (both present), 60 test points of those classes
    idx_tr = np.concatenate([np.flatnonzero(digits.y_train_clean == c)[:4] for c in (1, 7)])
    keep = np.isin(digits.y_test, (1, 7))
    x_tr = digits.x_train[idx_tr].reshape(8, -1)
    y_tr = digits.y_train_clean[idx_tr].copy()
    y_tr[0] = 7  # one wrong label: it should get the lowest value
    return x_tr, y_tr, digits.x_test[keep][:60].reshape(-1, 64), digits.y_test[keep][:60]


def test_tmc_on_a_tiny_real_model_matches_exact_enumeration(tiny_digits):
    x_tr, y_tr, x_te, y_te = tiny_digits
    u = ModelUtility(LogisticRegression(max_iter=200), test_data=(x_te, y_te), cache_size=512)
    u = u.with_data(x_tr, y_tr)  # one bound utility: its cache makes 2^8 fits in all
    exact = exact_shapley(u)
    assert exact.values.sum() == pytest.approx(u(np.arange(8)))
    assert int(np.argmin(exact.values)) == 0  # the mislabelled point
    res = TMCShapleyValuation(u, is_done=MaxUpdates(500), seed=0, batch_size=50,
                              samples_per_round=250).fit().result
    _within_stderr(res, exact.values)
    assert int(np.argmin(res.values)) == 0
    ban = MSRBanzhafValuation(u, is_done=MaxUpdates(2000), seed=0).fit().result
    _within_stderr(ban, exact_banzhaf(u).values)


def test_model_utility_degenerate_subsets_get_the_default(tiny_digits):
    x_tr, y_tr, x_te, y_te = tiny_digits
    u = ModelUtility(LogisticRegression(), test_data=(x_te, y_te), default=-1.0)
    u = u.with_data(x_tr, y_tr)
    assert u([]) == -1.0
    assert u([1, 2]) == -1.0  # both label 1: a single class
    assert 0.0 <= u([1, 5]) <= 1.0
    assert u.n_points == 8


def test_model_utility_with_a_torch_module_and_training_function(tiny_digits):
    import torch
    from torch import nn

    from dvl_ooc.valuation import TorchEstimator

    x_tr, y_tr, x_te, y_te = tiny_digits
    calls = []

    def train_fn(net, x, y):
        calls.append(len(x))
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        xt, yt = torch.as_tensor(x).float(), torch.as_tensor(y).long()
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt), yt).backward()
            opt.step()

    torch.manual_seed(0)
    net = nn.Linear(64, 10)
    init = net.weight.detach().clone()
    u = ModelUtility(TorchEstimator(net, train_fn), test_data=(x_te, y_te)).with_data(x_tr, y_tr)
    score = u([0, 1, 4, 5])
    assert calls == [4] and torch.equal(net.weight, init)  # trained a copy, not the module
    ref = copy.deepcopy(net)
    train_fn(ref, x_tr[[0, 1, 4, 5]], y_tr[[0, 1, 4, 5]])
    pred = ref(torch.as_tensor(x_te).float()).argmax(1).numpy()
    assert score == pytest.approx(float((pred == y_te).mean()))
    assert u([2]) == 0.0  # one class only: the default


def test_fit_accepts_pairs_torch_datasets_and_split_objects(digits):
    import torch
    from torch.utils.data import TensorDataset

    from dvl_ooc.valuation import knn_shapley
    from dvl_ooc.valuation.utility import as_xy

    x, y = digits.x_train[:6], digits.y_train[:6]
    for data in ((x, y), TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), digits):
        xa, ya = as_xy(data)
        np.testing.assert_array_equal(xa[:6], x)
        np.testing.assert_array_equal(ya[:6], y)

    class CountUtility:  # a minimal data-bound utility: u(S) = |S|
        def with_data(self, x, y):
            self.x, self.y = x, y
            return self

        @property
        def n_points(self):
            return len(self.x)

        def __call__(self, subset):
            return float(len(subset))

    ds = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    a = TMCShapleyValuation(CountUtility(), is_done=MaxChecks(1), seed=0).fit(ds).result
    b = TMCShapleyValuation(CountUtility(), is_done=MaxChecks(1), seed=0).fit(x, y).result
    np.testing.assert_array_equal(a.values, np.ones(6))
    np.testing.assert_array_equal(a.values, b.values)
    assert len(knn_shapley(x, y, x, y, k=1)) == 6


class _Raises:
    def fit(self, x, y):
        raise RuntimeError("boom")

    def score(self, x, y):
        return 0.0


def test_bad_inputs_give_clear_errors(tiny_digits):
    x_tr, y_tr, x_te, y_te = tiny_digits
    with pytest.raises(InputError, match="no fit"):
        ModelUtility(object(), test_data=(x_te, y_te))
    with pytest.raises(InputError, match="test_data"):
        ModelUtility(LogisticRegression())
    u = ModelUtility(LogisticRegression(), test_data=(x_te, y_te))
    val = TMCShapleyValuation(u, is_done=MaxUpdates(4), seed=0)
    with pytest.raises(InputError, match="empty"):
        val.fit(x_tr[:0], y_tr[:0])
    with pytest.raises(LengthMismatchError):
        val.fit(x_tr, y_tr[:5])
    with pytest.raises(InputError, match="training data"):
        val.fit()
    bad = ModelUtility(_Raises(), test_data=(x_te, y_te), min_classes=1)
    with pytest.raises(UtilityError, match="RuntimeError: boom"):
        TMCShapleyValuation(bad, is_done=MaxUpdates(4), seed=0).fit(x_tr, y_tr)
    with pytest.warns(RuntimeWarning, match="boom"):
        tolerant = ModelUtility(_Raises(), test_data=(x_te, y_te), catch_errors=True,
                                default=0.5, min_classes=1)
        assert tolerant.with_data(x_tr, y_tr)([0, 1]) == 0.5
    with pytest.raises(InputError, match="2\\^20"):
        exact_shapley(InteractionGame(np.ones(20)))
    prev = TMCShapleyValuation(_game(), is_done=MaxChecks(1), seed=0).fit().result
    with pytest.raises(InputError, match="continue"):
        MSRBanzhafValuation(_game(), is_done=MaxChecks(1)).fit(result=prev)
    with pytest.raises(InputError, match="points"):
        TMCShapleyValuation(_game(n=5), is_done=MaxChecks(1)).fit(result=prev)


def test_model_utility_keeps_object_label_arrays_and_converts_tensors(tiny_digits):
    import torch

    x_tr, y_tr, x_te, y_te = tiny_digits
    names = np.array(["one", "seven"], dtype=object)
    label = {1: 0, 7: 1}
    y_obj = names[[label[int(v)] for v in y_tr]]  # e.g. string labels from a pandas Series
    yt_obj = names[[label[int(v)] for v in y_te]]
    u = ModelUtility(LogisticRegression(), test_data=(x_te, yt_obj)).with_data(x_tr, y_obj)
    assert u.y.dtype == object
    ref = ModelUtility(LogisticRegression(), test_data=(x_te, y_te)).with_data(x_tr, y_tr)
    assert u([0, 1, 4, 5]) == ref([0, 1, 4, 5])
    ut = ModelUtility(LogisticRegression(), test_data=(torch.as_tensor(x_te), y_te))
    ut = ut.with_data(torch.as_tensor(x_tr), torch.as_tensor(y_tr))
    assert isinstance(ut.x, np.ndarray) and ut([0, 1, 4, 5]) == ref([0, 1, 4, 5])


def test_progress_bar_counts_samples(capsys):
    TMCShapleyValuation(_game(n=4), is_done=MaxChecks(2), seed=0, samples_per_round=8,
                        progress=True).fit()
    assert "16" in capsys.readouterr().err
