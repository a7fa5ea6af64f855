"""ValuationResult / Moments: parallel merge against one-pass statistics, indexing, persistence."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from dvl_ooc.exceptions import InputError, StoreNotFoundError
from dvl_ooc.valuation import (
    InteractionGame,
    MaxChecks,
    Moments,
    MSRBanzhafValuation,
    TMCShapleyValuation,
    ValuationResult,
    plot_values,
)

matplotlib.use("Agg")


def test_moments_chan_merge_equals_one_pass_and_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(101, 5))
    one = Moments.from_samples(x)
    np.testing.assert_allclose(one.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(one.variance(), x.var(0, ddof=1), rtol=1e-12)
    # uneven chunks, including an empty one, merged in order
    merged = Moments.zeros(5)
    for a, b in [(0, 7), (7, 7), (7, 50), (50, 51), (51, 101)]:
        merged = merged.merge(Moments.from_samples(x[a:b]))
    assert np.array_equal(merged.count, one.count)
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.m2, one.m2, rtol=1e-12)
    # masked updates (MSR style) equal per-column statistics of the selected rows
    mask = rng.random(x.shape) < 0.4
    m = Moments.zeros(5)
    for row, w in zip(x, mask):
        m.update(row, where=w)
    for j in range(5):
        col = x[mask[:, j], j]
        assert m.count[j] == len(col)
        np.testing.assert_allclose(m.mean[j], col.mean(), rtol=1e-13)
        np.testing.assert_allclose(m.variance()[j], col.var(ddof=1), rtol=1e-12)


def _game():
    rng = np.random.default_rng(3)
    return InteractionGame(rng.normal(size=6), rng.normal(size=(6, 6)) * 0.5, noise=0.2)


@pytest.mark.parametrize("cls", [TMCShapleyValuation, MSRBanzhafValuation])
def test_result_add_equals_one_run_over_the_union_of_samples(cls):
    g = _game()
    kw = dict(batch_size=4, samples_per_round=8)
    a = cls(g, is_done=MaxChecks(2), seed=11, **kw).fit().result
    b = cls(g, is_done=MaxChecks(3), seed=12, **kw).fit().result
    merged = a + b
    assert merged.n_samples == a.n_samples + b.n_samples
    assert np.array_equal(merged.counts, a.counts + b.counts)
    # the union of samples, recomputed in one pass from the per-sample terms
    if cls is TMCShapleyValuation:
        terms = []
        for seed, k in [(11, k) for k in range(16)] + [(12, k) for k in range(24)]:
            perm = np.random.default_rng([seed, k]).permutation(6)
            u = [g(perm[:j]) for j in range(7)]
            t = np.empty(6)
            t[perm] = np.diff(u)
            terms.append(t)
        ref = Moments.from_samples(np.array(terms))
        np.testing.assert_allclose(merged.values, ref.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(merged.variances, ref.variance(), rtol=1e-10)
    else:
        masks, us = [], []
        for seed, k in [(11, k) for k in range(16)] + [(12, k) for k in range(24)]:
            m = np.random.default_rng([seed, k]).random(6) < 0.5
            masks.append(m)
            us.append(g(np.flatnonzero(m)))
        masks, us = np.array(masks), np.array(us)
        ref_v = np.array([us[masks[:, j]].mean() - us[~masks[:, j]].mean() for j in range(6)])
        ref_se = np.sqrt([us[masks[:, j]].var(ddof=1) / masks[:, j].sum()
                          + us[~masks[:, j]].var(ddof=1) / (~masks[:, j]).sum()
                          for j in range(6)])
        np.testing.assert_allclose(merged.values, ref_v, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(merged.stderr, ref_se, rtol=1e-10)


def test_add_aligns_by_data_index_and_takes_the_union():
    a = ValuationResult.from_values([1.0, 2.0, 3.0], indices=[10, 11, 12], counts=[2, 2, 2],
                                    variances=[1.0, 1.0, 1.0])
    b = ValuationResult.from_values([5.0, 4.0], indices=[12, 13], counts=[2, 6])
    c = a + b
    assert list(c.indices) == [10, 11, 12, 13]
    np.testing.assert_allclose(c.values, [1.0, 2.0, 4.0, 4.0])
    assert list(c.counts) == [2, 2, 4, 6]
    # M2: 1 + 0 + (5-3)^2 * 2 * 2 / 4 = 5 -> variance 5 / 3
    np.testing.assert_allclose(c.get(12).variance, 5.0 / 3.0)
    assert sum([a, b]).counts.sum() == c.counts.sum()
    with pytest.raises(InputError):
        _ = a + ValuationResult.zeros(3, kind="msr")


def test_sort_slice_select_get_and_confidence_interval():
    r = ValuationResult.from_values([0.3, -0.1, 0.2, 0.0], indices=[7, 8, 9, 10],
                                    variances=[4.0, 1.0, 0.0, 9.0], counts=[4, 1, 3, 9],
                                    names=["a", "b", "c", "d"])
    s = r.sort()
    assert list(s.indices) == [8, 10, 9, 7]
    assert list(s[:2].names) == ["b", "d"]
    assert list(r.sort(reverse=True).indices) == [7, 9, 10, 8]
    assert list(r.select([9, 7]).values) == [0.2, 0.3]
    item = r.get(7)
    assert item.name == "a" and item.count == 4 and item.stderr == pytest.approx(1.0)
    with pytest.raises(KeyError):
        r.get(99)
    lo, hi = r.confidence_interval(0.95)
    np.testing.assert_allclose(hi - r.values, 1.959963984540054 * r.stderr, rtol=1e-12)
    np.testing.assert_allclose(r.values - lo, hi - r.values)
    with pytest.raises(InputError):
        r.sort(key="nonsense")


def test_save_load_round_trip(tmp_path):
    r = MSRBanzhafValuation(_game(), is_done=MaxChecks(1), seed=5).fit().result
    r.names = np.array([f"p{i}" for i in range(len(r))])
    path = r.save(tmp_path / "res")
    back = ValuationResult.load(path)
    assert back.kind == "msr" and back.seed == 5 and back.n_samples == r.n_samples
    assert np.array_equal(back.values, r.values) and np.array_equal(back.stderr, r.stderr)
    assert list(back.names) == list(r.names)
    with pytest.raises(StoreNotFoundError):
        ValuationResult.load(tmp_path / "missing.npz")


def test_plot_values_draws_error_bars():
    r = ValuationResult.from_values([0.1, -0.2, 0.3], variances=[1.0, 4.0, 0.0], counts=[4] * 3)
    ax = plot_values(r.sort(), level=0.9)
    lines = ax.containers[0]
    x, y = lines[0].get_data()
    np.testing.assert_allclose(y, [-0.2, 0.1, 0.3])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "0", "2"]
