"""Streaming queries against dense NumPy references on small stores written with zarr."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from store_helpers import write_store

from dvl_ooc.exceptions import (
    IncompleteStoreError,
    InputError,
    StoreError,
    StoreNotFoundError,
)
from dvl_ooc.query import (
    load_query,
    query_mean,
    query_quantiles,
    query_self_influence,
    query_topk,
    saved_queries,
)

N_TEST, N_TRAIN, CHUNKS = 37, 53, (10, 8)


@pytest.fixture(scope="module")
def dense():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((N_TEST, N_TRAIN)).astype(np.float32)
    # test labels lack class 4; train labels have classes 0..4
    tl = rng.integers(0, 4, N_TEST).astype(np.int64)
    rl = rng.integers(0, 5, N_TRAIN).astype(np.int64)
    si = rng.standard_normal(N_TRAIN).astype(np.float32)
    return v, tl, rl, si


@pytest.fixture(scope="module")
def store(dense, tmp_path_factory):
    v, tl, rl, si = dense
    p = tmp_path_factory.mktemp("q") / "s.zarr"
    return write_store(p, v, CHUNKS, test_label=tl, train_label=rl, self_influence=si,
                       train_index=np.arange(N_TRAIN) * 3 + 100)


def ref_same_label_quantile(v, tl, rl, q, method):
    out = np.full((len(q), v.shape[1]), np.nan, dtype=v.dtype)
    for r in range(v.shape[1]):
        rows = tl == rl[r]
        if rows.any():
            out[:, r] = np.quantile(v[rows, r], q, method=method)
    return out


@pytest.mark.parametrize("method", ["linear", "lower", "nearest", "hazen", "median_unbiased"])
@pytest.mark.parametrize("band", [None, 5, 64])
def test_quantiles_equal_numpy(store, dense, method, band):
    v, tl, rl, _ = dense
    q = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]
    res = query_quantiles(store, q, method=method, band=band)
    assert res.dims == ("quantile", "train")
    np.testing.assert_array_equal(res.values, np.quantile(v, q, axis=0, method=method))
    np.testing.assert_array_equal(res["train"].values, np.arange(N_TRAIN) * 3 + 100)
    np.testing.assert_array_equal(res["train_label"].values, rl)
    grouped = query_quantiles(store, q, same_label=True, method=method, band=band)
    np.testing.assert_array_equal(grouped.values, ref_same_label_quantile(v, tl, rl, q, method))


def test_quantile_scalar_and_absent_class(store, dense):
    v, tl, rl, _ = dense
    res = query_quantiles(store, 0.25, same_label=True)
    assert res.dims == ("train",)
    assert np.isnan(res.values[rl == 4]).all() and (rl == 4).any()
    assert np.isfinite(res.values[rl != 4]).all()
    r = int(np.flatnonzero(rl == 2)[0])
    assert res.values[r] == np.quantile(v[tl == 2, r], 0.25)


def test_quantiles_with_distributed_client(store, dense):
    from distributed import Client, LocalCluster

    v = dense[0]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        res = query_quantiles(store, [0.25, 0.75], max_in_flight=4)
    np.testing.assert_array_equal(res.values, np.quantile(v, [0.25, 0.75], axis=0))


@pytest.mark.parametrize("band", [None, 3, 100])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_equals_dense_sort(store, dense, band, k):
    v = dense[0].astype(np.float64)
    ds = query_topk(store, k, band=band)
    order = np.argsort(-v, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ds["helpful_position"].values, order)
    np.testing.assert_array_equal(ds["helpful_train"].values, order * 3 + 100)
    np.testing.assert_array_equal(ds["helpful_influence"].values,
                                  np.take_along_axis(v, order, 1))
    order = np.argsort(v, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ds["harmful_position"].values, order)
    np.testing.assert_array_equal(ds["harmful_influence"].values,
                                  np.take_along_axis(v, order, 1))
    np.testing.assert_array_equal(ds["test_label"].values, dense[1])


def test_topk_ties_and_k_above_n(tmp_path):
    v = np.zeros((4, 7), np.float32)
    v[:, 5] = 1.0
    p = write_store(tmp_path / "t.zarr", v, (3, 2))
    ds = query_topk(p, 10)
    assert ds.sizes["k"] == 7
    np.testing.assert_array_equal(ds["helpful_position"].values[0], [5, 0, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(ds["harmful_position"].values[0], [0, 1, 2, 3, 4, 6, 5])


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_mean_sum(store, dense, reduce):
    v, tl, rl, _ = dense
    f = np.mean if reduce == "mean" else np.sum
    res = query_mean(store, reduce=reduce, band=3)
    np.testing.assert_allclose(res.values, f(v.astype(np.float64), axis=0), rtol=1e-12)
    g = query_mean(store, reduce=reduce, same_label=True)
    ref = np.array([f(v[tl == rl[r], r].astype(np.float64)) if (tl == rl[r]).any() else np.nan
                    for r in range(N_TRAIN)])
    np.testing.assert_allclose(g.values, ref, rtol=1e-12)


def test_self_influence_ranking(store, dense):
    si = dense[3]
    ds = query_self_influence(store)
    order = np.argsort(-si.astype(np.float64), kind="stable")
    np.testing.assert_array_equal(ds["position"].values, order)
    np.testing.assert_array_equal(ds["train"].values, order * 3 + 100)
    np.testing.assert_array_equal(ds["train_label"].values, dense[2][order])
    np.testing.assert_array_equal(ds["rank"].values, np.arange(N_TRAIN))
    asc = query_self_influence(store, ascending=True)
    np.testing.assert_array_equal(asc["position"].values, np.argsort(si, kind="stable"))


def test_incomplete_store(dense, tmp_path):
    v, tl, rl, _ = dense
    p = write_store(tmp_path / "inc.zarr", v, CHUNKS, test_label=tl, train_label=rl,
                    skip_tiles={(1, 2)})
    with pytest.raises(IncompleteStoreError, match="allow_incomplete"):
        query_quantiles(p, 0.5)
    with pytest.raises(IncompleteStoreError):
        query_topk(p, 3)
    res = query_quantiles(p, 0.5, allow_incomplete=True)
    vm = v.copy()
    vm[10:20, 16:24] = np.nan
    np.testing.assert_array_equal(res.values, np.quantile(vm, 0.5, axis=0))
    assert np.isnan(res.values[16:24]).all() and np.isfinite(res.values[:16]).all()
    ds = query_topk(p, 4, allow_incomplete=True)
    ref = np.argsort(-np.where(np.isnan(vm), -np.inf, vm), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ds["helpful_position"].values, ref)
    m = query_mean(p, allow_incomplete=True)
    np.testing.assert_allclose(m.values, np.nanmean(vm.astype(np.float64), axis=0), rtol=1e-12)
    with pytest.raises(StoreError, match="self-influence"):
        query_self_influence(p, allow_incomplete=True)


def test_save_and_load(store, dense):
    q = query_quantiles(store, [0.25, 0.5], same_label=True, save="q25")
    t = query_topk(store, 3, save="top3")
    assert saved_queries(store) == ["q25", "top3"]
    back = load_query(store, "q25")
    xr.testing.assert_identical(back["quantile_influence"], q)
    xr.testing.assert_identical(load_query(store, "top3"), t)
    # the store itself still opens as before
    ds = xr.open_zarr(store)
    assert ds["influences"].shape == (N_TEST, N_TRAIN)
    with pytest.raises(StoreNotFoundError, match="nope"):
        load_query(store, "nope")
    with pytest.raises(InputError):
        query_mean(store, save="../evil")


def test_errors(store, tmp_path):
    with pytest.raises(StoreNotFoundError):
        query_quantiles(tmp_path / "missing.zarr", 0.5)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("hi")
    with pytest.raises(StoreNotFoundError):
        query_quantiles(tmp_path / "foreign", 0.5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        query_quantiles(store, [0.5, 1.5])
    with pytest.raises(InputError, match="method"):
        query_quantiles(store, 0.5, method="bogus")
    with pytest.raises(InputError):
        query_topk(store, 0)
    with pytest.raises(InputError):
        query_mean(store, reduce="median")
    with pytest.raises(InputError):
        query_quantiles(store, 0.5, band=0)
    nolab = write_store(tmp_path / "nl.zarr", np.ones((3, 4), np.float32), (2, 2))
    with pytest.raises(InputError, match="labels"):
        query_quantiles(nolab, 0.5, same_label=True)
