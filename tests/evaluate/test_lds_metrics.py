"""LDS, noise ceiling and leave-one-out correlation against independent SciPy loops; streamed
store predictions equal in-memory ones; bad input gets specific errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from store_helpers import write_store

from dvl_ooc.evaluate import (
    LdsResult,
    lds,
    loo_correlation,
    loo_deltas,
    loo_masks,
    noise_ceiling,
)
from dvl_ooc.exceptions import (
    IncompleteStoreError,
    InputError,
    LengthMismatchError,
    NonFiniteError,
)
from dvl_ooc.store import InfluenceStore


def _problem(seed=0, n_test=8, n_train=30, J=14, S=3, integer=False):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_test, n_train))
    if integer:  # many ties in the predictions
        scores = rng.integers(-1, 2, size=(n_test, n_train)).astype(float)
    masks = rng.random((J, n_train)) < 0.5
    masks[:, 0] = True  # no empty subset
    signal = masks @ scores.T  # (J, n_test): loss falls as helpful points are added
    targets = -signal[:, None, :] + rng.normal(scale=2.0, size=(J, S, n_test))
    return scores, masks, targets


def _reference_lds(scores, masks, targets, negate=True):
    """Explicit loops: pred[j] = sum of scores over S_j, spearmanr per test point."""
    y = targets.mean(1) if targets.ndim == 3 else targets
    out = []
    for i in range(scores.shape[0]):
        pred = [sum(scores[i, k] for k in range(masks.shape[1]) if masks[j, k])
                for j in range(len(masks))]
        obs = -y[:, i] if negate else y[:, i]
        if np.ptp(pred) == 0 or np.ptp(obs) == 0:
            out.append(np.nan)
        else:
            out.append(stats.spearmanr(pred, obs).statistic)
    return np.array(out)


@pytest.mark.parametrize("integer", [False, True], ids=["continuous", "ties"])
def test_lds_equals_independent_spearman_loops(integer):
    scores, masks, targets = _problem(integer=integer)
    targets[:, :, 3] = 0.25  # a constant target column: undefined, excluded and counted
    ref = _reference_lds(scores, masks, targets)
    res = lds(scores, masks, targets)
    assert isinstance(res, LdsResult)
    np.testing.assert_allclose(res.per_test, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(res.per_test[3]) and res.n_valid == 7
    assert res.mean == pytest.approx(np.nanmean(ref), rel=1e-12)
    assert (res.n_subsets, res.n_seeds, res.correlation) == (14, 3, "spearman")
    assert res.ceiling is not None and res.ceiling_per_test.shape == (8,)
    assert res.ci[0] < res.mean < res.ci[1]


def test_margin_kind_is_not_negated_and_2d_targets_have_no_ceiling():
    scores, masks, targets = _problem(seed=1)
    margins = -targets.mean(1)  # (J, n_test), higher is better
    res = lds(scores, masks, margins, kind="margin")
    np.testing.assert_allclose(res.per_test, _reference_lds(scores, masks, margins, False),
                               rtol=1e-12)
    assert res.ceiling is None and res.n_seeds == 1
    # the same numbers as the loss of the 3-D targets (negation moved into the data)
    np.testing.assert_allclose(lds(scores, masks, targets).per_test, res.per_test, rtol=1e-12)
    # the sign matters: the negated scores give the negated LDS
    np.testing.assert_allclose(lds(-scores, masks, margins, kind="margin").per_test,
                               -res.per_test, rtol=1e-12)


def test_torch_inputs_give_the_numpy_result():
    scores, masks, targets = _problem(seed=2)
    a = lds(scores, masks, targets)
    b = lds(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(masks),
            torch.as_tensor(targets))
    np.testing.assert_array_equal(a.per_test, b.per_test)
    assert a.ci == b.ci and a.ceiling == b.ceiling


def test_t_interval_equals_scipy_and_bootstrap_is_fixed_and_close():
    rng = np.random.default_rng(3)
    J, n_test, n_train = 30, 200, 40
    scores = rng.normal(size=(n_test, n_train))
    masks = rng.random((J, n_train)) < 0.5
    targets = -(masks @ scores.T) + rng.normal(scale=6.0, size=(J, n_test))
    t = lds(scores, masks, targets, ci="t")
    v = t.per_test[np.isfinite(t.per_test)]
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert t.ci == pytest.approx((lo, hi), rel=1e-12)
    b = lds(scores, masks, targets)  # bootstrap, fixed seed
    assert b.ci == lds(scores, masks, targets).ci  # the same interval every time
    assert b.ci != lds(scores, masks, targets, ci_seed=1).ci
    assert b.ci[0] < b.mean < b.ci[1]
    width_t, width_b = hi - lo, b.ci[1] - b.ci[0]
    assert abs(width_b / width_t - 1) < 0.15  # ~normal means: both intervals agree
    assert abs((b.ci[0] + b.ci[1]) / 2 - b.mean) < 0.1 * width_t


def _spearman_cols(a, b):
    return np.array([stats.spearmanr(a[:, i], b[:, i]).statistic for i in range(a.shape[1])])


def test_noise_ceiling_two_seeds_is_spearman_brown_of_the_seed_correlation():
    _, _, targets = _problem(seed=4, S=2, J=25, n_test=12)
    r = _spearman_cols(targets[:, 0], targets[:, 1])
    rel = np.where(r > 0, 2 * r / (1 + r), 0.0)
    c = noise_ceiling(targets)
    np.testing.assert_allclose(c.split_half, r, rtol=1e-12)
    np.testing.assert_allclose(c.per_test, np.sqrt(rel), rtol=1e-12, atol=1e-15)
    assert c.mean == pytest.approx(np.sqrt(rel).mean(), rel=1e-12)
    assert c.n_splits == 1 and c.n_valid == 12


def test_noise_ceiling_four_seeds_averages_the_three_splits():
    _, _, t = _problem(seed=5, S=4, J=20, n_test=6)
    splits = [([0, 1], [2, 3]), ([0, 2], [1, 3]), ([0, 3], [1, 2])]
    r = np.mean([_spearman_cols(t[:, a].mean(1), t[:, b].mean(1)) for a, b in splits], axis=0)
    c = noise_ceiling(t)
    assert c.n_splits == 3
    np.testing.assert_allclose(c.split_half, r, rtol=1e-12)
    np.testing.assert_allclose(c.reliability, np.where(r > 0, 2 * r / (1 + r), 0), rtol=1e-12)


def test_noise_ceiling_three_seeds_solves_the_unequal_halves():
    _, _, t = _problem(seed=6, S=3, J=30, n_test=5)
    # splits {i} | the other two, for i = 0, 1, 2
    r = np.mean([_spearman_cols(t[:, i], np.delete(t, i, axis=1).mean(1)) for i in range(3)],
                axis=0)

    def reliability(k, p):
        return k * p / (1 + (k - 1) * p)

    ref = []
    for ri in r:  # p solves sqrt(R_1(p) R_2(p)) = r by root finding, then R_3(p)
        if ri <= 0:
            ref.append(0.0)
            continue
        p = optimize.brentq(lambda p, ri=ri: math.sqrt(reliability(1, p) * reliability(2, p))
                            - ri, 1e-12, 1.0)
        ref.append(reliability(3, p))
    c = noise_ceiling(t)
    assert c.n_splits == 3
    np.testing.assert_allclose(c.reliability, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_noise_ceiling_on_known_noise_and_a_perfect_predictor_reaches_it(sigma):
    rng = np.random.default_rng(7)
    J, S, n_test, n_train = 400, 4, 60, 50
    tau = rng.normal(size=(n_test, n_train))
    masks = rng.random((J, n_train)) < 0.5
    signal = -(masks @ tau.T)  # the expected loss
    sd = signal.std(0)  # per-test signal scale: noise sigma * sd gives reliability known
    targets = signal[:, None, :] + rng.normal(size=(J, S, n_test)) * (sigma * sd)
    rel = 1 / (1 + sigma ** 2 / S)  # reliability of the 4-seed mean
    pearson = math.sqrt(rel)
    spearman = 6 / math.pi * math.asin(pearson / 2)  # bivariate normal
    c = noise_ceiling(targets)
    assert abs(c.mean - spearman) < 0.02
    assert abs(c.mean - pearson) < 0.03
    # the true scores are a perfect linear datamodel: their LDS is the ceiling
    res = lds(tau, masks, targets)
    assert res.ceiling == pytest.approx(c.mean, rel=1e-12)
    assert abs(res.mean - res.ceiling) < 0.02
    # and noise-free targets give a ceiling of one and an LDS of one
    exact = lds(tau, masks, np.repeat(signal[:, None, :], 2, axis=1))
    assert exact.ceiling == pytest.approx(1.0) and exact.mean == pytest.approx(1.0)


def test_loo_correlation_equals_independent_loops():
    rng = np.random.default_rng(8)
    n_test, n_train, m, S = 6, 40, 12, 2
    scores = rng.normal(size=(n_test, n_train))
    removed = rng.choice(n_train, m, replace=False)
    delta = scores[:, removed].T[:, None, :] + rng.normal(scale=0.8, size=(m, S, n_test))
    dm = delta.mean(1)
    for method, fn in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
        res = loo_correlation(scores, removed, delta, method=method)
        ref = [fn(scores[i, removed], dm[:, i]).statistic for i in range(n_test)]
        np.testing.assert_allclose(res.per_test, ref, rtol=1e-12)
        assert (res.correlation, res.n_subsets, res.n_seeds) == (method, m, S)
        assert res.mean == pytest.approx(np.mean(ref), rel=1e-12)
        assert res.ceiling is not None


def test_loo_masks_and_deltas():
    m = loo_masks(5, [3, 0])
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [0, 1, 1, 1, 1]])
    assert m.dtype == bool
    t = np.arange(3 * 2 * 4, dtype=float).reshape(3, 2, 4) ** 1.5
    d = loo_deltas(t)
    for r in range(2):
        for s in range(2):
            np.testing.assert_allclose(d[r, s], t[r + 1, s] - t[0, s])
    with pytest.raises(InputError, match="repeated"):
        loo_masks(5, [1, 1])
    with pytest.raises(InputError, match="outside"):
        loo_masks(5, [5])


# ------------------------------------------------------------------------------ stores
def test_store_predictions_stream_in_bands_and_equal_in_memory(tmp_path):
    scores, masks, targets = _problem(seed=9, n_test=9, n_train=23)
    values = scores.astype(np.float32)
    path = write_store(tmp_path / "s.zarr", values, (4, 5))
    mem = lds(values, masks, targets)
    for src, kw in ((str(path), {}), (InfluenceStore.open(path), {}), (path, {"band": 3})):
        res = lds(src, masks, targets, **kw)
        np.testing.assert_allclose(res.per_test, mem.per_test, rtol=1e-12, atol=1e-14)
        assert res.ci == pytest.approx(mem.ci, rel=1e-12)
    # the bands are strips of whole stored chunk columns: pred equals the float64 reference
    from dvl_ooc.evaluate.metrics import _predictions

    pred = _predictions(str(path), masks, band=None, max_in_flight=2, storage_options=None)
    np.testing.assert_allclose(pred, values.astype(np.float64) @ masks.T.astype(float),
                               rtol=1e-13, atol=1e-13)
    removed = np.array([22, 0, 7, 13, 5])
    delta = scores[:, removed].T + np.random.default_rng(0).normal(size=(5, 9))
    np.testing.assert_allclose(loo_correlation(str(path), removed, delta).per_test,
                               loo_correlation(values, removed, delta).per_test, rtol=1e-12)


def test_incomplete_or_mismatched_stores_are_refused(tmp_path):
    scores, masks, targets = _problem(seed=10, n_test=9, n_train=23)
    part = write_store(tmp_path / "part.zarr", scores.astype(np.float32), (4, 5),
                       skip_tiles={(1, 2)})
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        lds(part, masks, targets)
    wide = write_store(tmp_path / "wide.zarr", np.zeros((9, 24), np.float32), (4, 5))
    with pytest.raises(LengthMismatchError, match="train"):
        lds(wide, masks, targets)
    tall = write_store(tmp_path / "tall.zarr", np.zeros((10, 23), np.float32), (4, 5))
    with pytest.raises(LengthMismatchError, match="test"):
        lds(tall, masks, targets)


# ------------------------------------------------------------------------------ errors
def test_bad_input_gets_specific_errors():
    scores, masks, targets = _problem(seed=11)
    with pytest.raises(LengthMismatchError, match="subsets"):
        lds(scores, masks[:-1], targets)
    with pytest.raises(LengthMismatchError, match="train"):
        lds(scores[:, :-1], masks, targets)
    with pytest.raises(LengthMismatchError, match="test"):
        lds(scores[:-1], masks, targets)
    empty = masks.copy()
    empty[4] = False
    with pytest.raises(InputError, match=r"subset\(s\) \[4\]"):
        lds(scores, empty, targets)
    with pytest.raises(InputError, match="boolean"):
        lds(scores, masks.astype(int), targets)
    bad = targets.copy()
    bad[2, 1, 5] = np.nan
    with pytest.raises(NonFiniteError, match="subset 2, seed 1, test point 5"):
        lds(scores, masks, bad)
    with pytest.raises(InputError, match="at least 3 subsets"):
        lds(scores, masks[:2], targets[:2])
    with pytest.raises(InputError, match="kind"):
        lds(scores, masks, targets, kind="accuracy")
    with pytest.raises(InputError, match="ci"):
        lds(scores, masks, targets, ci="normal")
    with pytest.raises(NonFiniteError, match="scores"):
        lds(np.where(scores > 1.5, np.inf, scores), masks, targets)
    with pytest.raises(InputError, match="2 seeds"):
        noise_ceiling(targets[:, :1])
    with pytest.raises(LengthMismatchError, match="removed"):
        loo_correlation(scores, [1, 2, 3], targets[:4])
    with pytest.raises(InputError, match="at least 3"):
        loo_correlation(scores, [1, 2], targets[:2])
    with pytest.raises(InputError, match="method"):
        loo_correlation(scores, [1, 2, 3], targets[:3], method="kendall")


def test_streamed_lds_holds_strips_not_the_matrix(tmp_path):
    import tracemalloc

    rng = np.random.default_rng(12)
    n_test, n_train, J = 200, 4000, 10
    values = rng.normal(size=(n_test, n_train)).astype(np.float32)
    path = write_store(tmp_path / "big.zarr", values, (n_test, 100))
    masks = rng.random((J, n_train)) < 0.5
    targets = -(masks @ values.T.astype(np.float64)) + rng.normal(size=(J, n_test))
    ref = lds(values, masks, targets, ceiling=False, ci="t")
    del values
    lds(path, masks[:, :], targets, ceiling=False, ci="t")  # imports, outside the trace
    tracemalloc.start()
    try:
        res = lds(path, masks, targets, ceiling=False, ci="t")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(res.per_test, ref.per_test, rtol=1e-10)
    # the matrix is 3.2 MB in float32, 6.4 MB in float64; a strip of 100 columns 160 KB
    assert peak < 1.5e6, peak
