"""Stores on object storage: a real S3 server (moto, on 127.0.0.1) written by the Dask calculator
with 2 worker processes, read by queries and ``xarray.open_zarr``; equal to the same job on local
disk; resume after a lost tile; the creation protocol (interrupted, concurrent) on S3."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence, InfluenceStore
from dvl_ooc import store as store_mod
from dvl_ooc.exceptions import InputError, StoreMismatchError, UnfinishedStoreError
from dvl_ooc.query import query_quantiles, query_topk

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import s3_server  # noqa: E402

KW = dict(test_chunk=10, train_chunk=100, progress=False)
P = dict(n_test=5, n_train=7, test_chunk=2, train_chunk=3, method="M", config={"a": 1},
         fingerprint="f" * 8, data_fingerprint="d" * 8)


@pytest.fixture(scope="module")
def s3():
    with s3_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the object-storage tests") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def job(linear_problem, client, s3, tmp_path_factory):
    """The same Dask job written to local disk and to ``s3://…/run.zarr``."""
    p = linear_problem
    m = DirectInfluence(p.model, p.loss, regularization=p.small_reg(1e-3), hessian="exact")
    m.fit((p.x_train, p.y_train))
    data = (p.x_test, p.y_test, p.x_train, p.y_train)
    local = tmp_path_factory.mktemp("objstore") / "run.zarr"
    calc = DaskInfluenceCalculator(m, client)
    calc.to_zarr(local, *data, self_influence=True, **KW)
    url = s3.url("run.zarr")
    remote = calc.to_zarr(url, *data, self_influence=True, storage_options=s3.storage_options,
                          **KW)
    workers = {c["worker"] for c in calc.info["columns"]}
    return dict(calc=calc, data=data, local=local, url=url, remote=remote, workers=workers)


def test_dask_job_on_s3_equals_local_disk(job, s3):
    so = s3.storage_options
    loc = InfluenceStore.open(job["local"])
    rem = InfluenceStore.open(job["url"], storage_options=so)
    assert len(job["workers"]) == 2  # both worker processes wrote tiles to the server
    assert rem.is_complete and rem.n_tiles == 12 and rem.path == job["url"]
    assert rem.done_tiles() == loc.done_tiles()
    a, b = rem.influences[:], loc.influences[:]
    assert np.isfinite(a).all() and np.array_equal(a, b)
    assert np.array_equal(rem.self_influence[:], loc.self_influence[:])
    ds = xr.open_zarr(job["url"], storage_options=so)  # what a user does by hand
    assert ds["influences"].dims == ("test", "train")
    assert np.array_equal(ds["influences"].values, b)
    np.testing.assert_array_equal(ds["train_label"].values, loc.train_labels)
    q_r = query_quantiles(job["url"], [0.1, 0.5], storage_options=so)
    q_l = query_quantiles(job["local"], [0.1, 0.5])
    assert np.array_equal(q_r.values, q_l.values)
    t_r = query_topk(job["url"], 3, storage_options=so, save="top3")
    t_l = query_topk(job["local"], 3)
    assert np.array_equal(t_r["helpful_train"].values, t_l["helpful_train"].values)
    from dvl_ooc.query import load_query, saved_queries

    assert saved_queries(job["url"], storage_options=so) == ["top3"]
    assert np.array_equal(load_query(job["url"], "top3", storage_options=so)[
        "harmful_influence"].values, t_l["harmful_influence"].values)
    # the listing is the store's own: one recursive listing of the server's keys
    fs = s3.fs()
    keys = fs.find(f"{s3.bucket}/run.zarr/influences/c")
    assert len(keys) == 12


def test_resume_on_s3_recomputes_only_the_lost_tile(job, s3):
    so, calc = s3.storage_options, job["calc"]
    before = InfluenceStore.open(job["url"], storage_options=so).influences[:]
    fs = s3.fs()
    fs.rm(f"{s3.bucket}/run.zarr/influences/c/2/1")  # one tile object lost
    st = InfluenceStore.open(job["url"], storage_options=so)
    assert (2, 1) not in st.done_tiles() and len(st.done_tiles()) == 11
    assert np.isnan(st.influences[st.tile_slices(2, 1)]).all()
    calc.to_zarr(job["url"], *job["data"], self_influence=True, storage_options=so, **KW)
    assert {t for c in calc.info["columns"] for t in c["tiles"]} == {(2, 1)}
    after = InfluenceStore.open(job["url"], storage_options=so)
    assert after.is_complete and np.array_equal(after.influences[:], before)
    calc.to_zarr(job["url"], *job["data"], self_influence=True, storage_options=so, **KW)
    assert calc.info["columns"] == []  # complete: nothing computed


def test_interrupted_creation_on_s3_is_never_a_valid_store(s3, monkeypatch):
    so, url = s3.storage_options, s3.url("interrupted.zarr")

    def boom(zs):
        raise KeyboardInterrupt("killed during creation")

    monkeypatch.setattr(store_mod, "_consolidate", boom)
    with pytest.raises(KeyboardInterrupt):
        InfluenceStore.create(url, storage_options=so, **P)
    monkeypatch.undo()
    with pytest.raises(UnfinishedStoreError, match="has not finished"):
        InfluenceStore.open(url, storage_options=so)
    with pytest.raises(UnfinishedStoreError):
        query_topk(url, 2, storage_options=so, allow_incomplete=True)
    with pytest.raises(StoreMismatchError, match="unfinished creation"):  # other parameters
        InfluenceStore.create(url, storage_options=so, **{**P, "fingerprint": "other"})
    s = InfluenceStore.create(url, storage_options=so, **P)  # same parameters: finished
    assert s.attrs["state"] == "complete" and s.done_tiles() == set()
    assert InfluenceStore.open(url, storage_options=so).shape == (5, 7)


def test_concurrent_creation_other_parameters_refused(s3):
    """The creation claim is an exclusive object (conditional PUT): a second run with other
    parameters is refused, one with the same parameters cooperates; mode='w' replaces."""
    so, url = s3.storage_options, s3.url("claimed.zarr")
    fs = s3.fs()
    other = store_mod._lock_bytes({**P, "fingerprint": "theirs"}, np.arange(5), np.arange(7))
    fs.pipe(f"{s3.bucket}/claimed.zarr/{store_mod.LOCK}", other)  # another run got there first
    with pytest.raises(StoreMismatchError, match="another run is creating.*fingerprint"):
        InfluenceStore.create(url, storage_options=so, **P)
    assert fs.find(f"{s3.bucket}/claimed.zarr") == [f"{s3.bucket}/claimed.zarr/{store_mod.LOCK}"]
    s = InfluenceStore.create(url, storage_options=so, mode="w", **P)  # replaces the claim
    s.influences[0:2, 0:3] = np.ones((2, 3), np.float32)
    again = InfluenceStore.create(url, storage_options=so, **P)  # same parameters: resumed
    assert again.done_tiles() == {(0, 0)}
    # exclusive claim on S3: a conditional PUT over an existing claim fails
    with pytest.raises(OSError):
        fs.pipe_file(f"{s3.bucket}/claimed.zarr/{store_mod.LOCK}", other, mode="create")


def test_memory_url_and_store_objects(tmp_path):
    import zarr

    for target in ("memory://objstore-test.zarr", zarr.storage.MemoryStore(),
                   zarr.storage.LocalStore(tmp_path / "ls.zarr"), f"file://{tmp_path}/f.zarr"):
        s = InfluenceStore.create(target, **P)
        s.influences[2:4, 3:6] = np.zeros((2, 3), np.float32)
        r = InfluenceStore.open(target)
        assert r.done_tiles() == {(1, 1)} and r.shape == (5, 7)
    with pytest.raises(InputError, match="storage_options= applies to fsspec URLs"):
        InfluenceStore.create(tmp_path / "x", storage_options={"anon": True}, **P)
