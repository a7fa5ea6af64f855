"""Dask and sequential influence calculators against in-memory and float64 references, on a
real 2-process LocalCluster and real Zarr v3 stores."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from conftest import rel_err
from reference import ref_influences
from torch.utils.data import TensorDataset

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DaskInfluenceCalculator,
    DirectInfluence,
    EkfacInfluence,
    InfluenceStore,
    NystroemSketchInfluence,
    SequentialInfluenceCalculator,
)
from dvl_ooc.exceptions import (
    InputError,
    LengthMismatchError,
    NotFittedError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
)

TESTS = Path(__file__).parent


class SlowDataset(TensorDataset):
    """A TensorDataset whose items take a while (so that a run can be killed part-way)."""

    def __init__(self, *tensors, delay: float = 0.0):
        super().__init__(*tensors)
        self.delay = delay

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the calculator tests") as cluster, \
            Client(cluster) as c:
        c.run(lambda: sys.path.insert(0, str(TESTS)))  # SlowDataset is importable there
        yield c


@pytest.fixture(scope="module")
def direct(mlp_problem):
    p = mlp_problem
    lam = p.small_reg(1e-3)
    m = DirectInfluence(p.model, p.loss, regularization=lam, hessian="exact")
    return m.fit((p.x_train, p.y_train)), lam


def _cg(p):
    lam = p.small_reg(1e-2)
    m = CgInfluence(p.model, p.loss, regularization=lam, hessian="gauss-newton", rtol=1e-9,
                    max_iter=2000)
    return m.fit((p.x_train, p.y_train)), lam


def _data(p):
    return p.x_test.numpy(), p.y_test.numpy(), p.x_train.numpy(), p.y_train.numpy()


def _chunk_bytes(path: Path, name: str = "influences") -> dict[str, bytes]:
    root = path / name / "c"
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


# ---------------------------------------------------------------------- values
@pytest.mark.parametrize("chunks", [(7, 64), (30, 250), (16, 33), (1, 250)])
def test_dask_equals_sequential_equals_memory(client, direct, mlp_problem, tmp_path, chunks):
    p = mlp_problem
    m, lam = direct
    xt, yt, x, y = _data(p)
    calc = DaskInfluenceCalculator(m, client)
    s = calc.to_zarr(tmp_path / "dask", xt, yt, x, y, test_chunk=chunks[0],
                     train_chunk=chunks[1], progress=False)
    assert s.is_complete and s.influences.dtype == np.float32
    assert s.chunks == chunks and s.influences.chunks == chunks
    got = s.influences[:]
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()  # float64
    exact = ref_influences(p.H, lam, p.g_test, p.g_train).numpy()
    # float64 model, float32 storage: the only error is the float32 rounding (~6e-8)
    assert rel_err(got, mem) <= 1e-6
    assert np.abs(got - mem).max() <= 1e-6 * np.abs(mem).max()
    assert rel_err(got, exact) <= 1e-5
    # the same plan in-process, single-threaded like the workers: the same bytes
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = SequentialInfluenceCalculator(m).to_zarr(
            tmp_path / "seq", xt, yt, x, y, test_chunk=chunks[0], train_chunk=chunks[1],
            progress=False)
    finally:
        torch.set_num_threads(n_threads)
    assert seq.is_complete and seq.attrs["fingerprint"] == s.attrs["fingerprint"]
    assert _chunk_bytes(tmp_path / "seq") == _chunk_bytes(tmp_path / "dask")


def test_cg_dask_matches_memory_and_exact(client, mlp_problem, tmp_path):
    """A method that needs its fit data on the workers (dropped when pickled)."""
    p = mlp_problem
    m, lam = _cg(p)
    xt, yt, x, y = _data(p)
    s = DaskInfluenceCalculator(m, client).to_zarr(tmp_path / "cg", xt, yt, x, y,
                                                    test_chunk=13, train_chunk=100,
                                                    progress=False)
    got = s.influences[:]
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    assert rel_err(got, mem) <= 1e-5
    direct = DirectInfluence(p.model, p.loss, regularization=lam, hessian="gauss-newton")
    exact = direct.fit((p.x_train, p.y_train)).influences(p.x_test, p.y_test, p.x_train,
                                                            p.y_train).numpy()
    assert rel_err(got, exact) <= 1e-5


def test_lissa_dask_matches_memory(client, mlp_problem, tmp_path):
    """LiSSA runs forward-mode AD on the workers with its fit data attached there."""
    from dvl_ooc import LissaInfluence

    p = mlp_problem
    m = LissaInfluence(p.model, p.loss, regularization=p.small_reg(1e-2), hessian="gauss-newton",
                       max_iter=60, rtol=None).fit((p.x_train, p.y_train))
    xt, yt, x, y = _data(p)
    s = DaskInfluenceCalculator(m, client).to_zarr(tmp_path / "lissa", xt, yt, x, y,
                                                    test_chunk=13, train_chunk=100,
                                                    progress=False)
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    assert rel_err(s.influences[:], mem) <= 1e-5


@pytest.mark.parametrize("method", ["direct", "lissa"])
def test_sequential_lazy_array_on_threads_matches_memory(mlp_problem, method):
    """The lazy array of the sequential calculator runs tiles on dask's threaded scheduler
    against ONE model object: regression test for the functional_call thread race."""
    import dask

    from dvl_ooc import LissaInfluence

    p = mlp_problem
    lam = p.small_reg(1e-2)
    if method == "direct":
        m = DirectInfluence(p.model, p.loss, regularization=lam, hessian="gauss-newton")
    else:
        # the race is in the shared model's functional calls, not in convergence: few steps
        m = LissaInfluence(p.model, p.loss, regularization=lam, hessian="gauss-newton",
                           max_iter=10, rtol=None)
    m.fit((p.x_train, p.y_train))
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    xt, yt, x, y = _data(p)
    A = SequentialInfluenceCalculator(m).influences(xt, yt, x, y, test_chunk=7, train_chunk=40,
                                                    dtype="float64")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 dask threads x torch's pool oversubscribed 2 busy cores: 126 s
    try:
        with dask.config.set(scheduler="threads", num_workers=2):
            got = A.compute()
    finally:
        torch.set_num_threads(threads)
    assert rel_err(got, mem) <= 1e-10


_LOW_RANK = {
    "ArnoldiInfluence": lambda p, lam: ArnoldiInfluence(p.model, p.loss, rank=8,
                                                        regularization=lam,
                                                        hessian="gauss-newton"),
    "NystroemSketchInfluence": lambda p, lam: NystroemSketchInfluence(p.model, p.loss, rank=8,
                                                                      regularization=lam),
    "EkfacInfluence": lambda p, lam: EkfacInfluence(p.model, p.loss, regularization=lam),
}


@pytest.mark.parametrize("name", sorted(_LOW_RANK))
def test_other_methods_dask_matches_memory(client, mlp_problem, tmp_path, name):
    """Methods with their own feature maps (k-dim for low rank, per-layer for EK-FAC)."""
    p = mlp_problem
    m = _LOW_RANK[name](p, p.small_reg(1e-2)).fit((p.x_train, p.y_train))
    xt, yt, x, y = _data(p)
    s = DaskInfluenceCalculator(m, client).to_zarr(tmp_path / name, xt, yt, x, y,
                                                    test_chunk=13, train_chunk=100,
                                                    progress=False, self_influence=True)
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    assert s.attrs["method"] == name
    assert rel_err(s.influences[:], mem) <= 1e-5
    assert rel_err(s.self_influence[:], m.self_influence(p.x_train, p.y_train).numpy()) <= 1e-5


def test_chunk_size_invariance_and_lazy_array(client, direct, mlp_problem):
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    calc = DaskInfluenceCalculator(m, client)
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    results = []
    for tc, rc in [(30, 250), (8, 47), (3, 120)]:
        A = calc.influences(xt, yt, x, y, test_chunk=tc, train_chunk=rc)
        assert isinstance(A, da.Array) and A.shape == (30, 250) and A.dtype == np.float32
        assert A.chunks[0][0] == tc and A.chunks[1][0] == rc  # one block per tile
        assert sum(A.chunks[1]) == 250 and A.chunks[1][-1] == (250 % rc or rc)  # ragged last
        results.append(A.compute())
    for r in results:
        assert rel_err(r, mem) <= 1e-6
        np.testing.assert_allclose(r, results[0], rtol=0, atol=1e-6 * np.abs(mem).max())
    seq = SequentialInfluenceCalculator(m).influences(xt, yt, x, y, test_chunk=11, train_chunk=60)
    assert seq.chunks[0][0] == 11 and rel_err(seq.compute(), mem) <= 1e-6


def test_dask_test_groups_run_one_after_another(client, direct, mlp_problem, tmp_path):
    """A default test chunk over the feature bound is halved (30 -> 15 -> 7), the 5 test
    groups run one after another (one group's features held at a time), values unchanged; the
    default memory budget is half a worker thread's memory_limit."""
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    k = m.grads.num_params
    calc = DaskInfluenceCalculator(m, client, max_test_feature_bytes=10 * k * 8)
    s = calc.to_zarr(tmp_path / "g", xt, yt, x, y, train_chunk=125, progress=False)
    plan = calc.info["plan"]
    assert s.chunks == (7, 125) and plan["test_chunk_source"] == "shrunk"
    assert plan["groups"] == 5 and plan["gradient_computations"] == 30 + 5 * 250
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    assert s.is_complete and rel_err(s.influences[:], mem) <= 1e-6
    order = [i for st in calc.info["columns"] for i, _ in st["tiles"]]
    assert len(order) == 10 and order == sorted(order)  # group by group
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    assert plan["memory_budget"] == int(0.5 * min(w["memory_limit"] // w["nthreads"]
                                                  for w in workers))


def test_input_kinds_give_identical_stores(client, direct, mlp_problem, tmp_path):
    """NumPy, torch tensors, Dask arrays (misaligned chunks), Zarr arrays and a torch Dataset."""
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    calc = DaskInfluenceCalculator(m, client)
    kw = dict(test_chunk=9, train_chunk=70, progress=False)
    base = _chunk_bytes(Path(calc.to_zarr(tmp_path / "np", xt, yt, x, y, **kw).path))
    zx = zarr.create_array(str(tmp_path / "zx"), shape=x.shape, chunks=(37, 1, 8, 8),
                           dtype=x.dtype)
    zx[:] = x
    zy = zarr.create_array(str(tmp_path / "zy"), shape=y.shape, chunks=(50,), dtype=y.dtype)
    zy[:] = y
    variants = {
        "torch": (p.x_test, p.y_test, p.x_train, p.y_train),
        "dask": (da.from_array(xt, chunks=4), da.from_array(yt, chunks=5),
                 da.from_array(x, chunks=(33, 1, 8, 8)), da.from_array(y, chunks=41)),
        "zarr": (xt, yt, zx, zy),
        "dataset": (TensorDataset(p.x_test, p.y_test), None,
                    TensorDataset(p.x_train, p.y_train), None),
    }
    for name, (a, b, c, d) in variants.items():
        s = calc.to_zarr(tmp_path / name, a, b, c, d, **kw)
        assert _chunk_bytes(Path(s.path)) == base, name
        if name == "dataset":
            assert s.train_labels is not None  # TensorDataset labels are found
            np.testing.assert_array_equal(s.train_labels, y)


def test_xarray_layout_and_self_influence(client, direct, mlp_problem, tmp_path):
    p = mlp_problem
    m, lam = direct
    xt, yt, x, y = _data(p)
    tidx = np.arange(30) * 3 + 1000
    s = DaskInfluenceCalculator(m, client).to_zarr(
        tmp_path / "s", xt, yt, x, y, test_chunk=8, train_chunk=64, self_influence=True,
        progress=False, test_index=tidx, compressor="zstd")
    ds = xr.open_zarr(tmp_path / "s")
    assert ds["influences"].dims == ("test", "train")
    assert ds["influences"].shape == (30, 250) and ds["influences"].dtype == np.float32
    np.testing.assert_array_equal(ds["test"].values, tidx)
    np.testing.assert_array_equal(ds["train"].values, np.arange(250))
    assert set(ds.coords) == {"test", "train", "test_label", "train_label"}
    np.testing.assert_array_equal(ds["test_label"].values, yt)
    np.testing.assert_array_equal(ds["train_label"].values, y)
    meta = ds.attrs["dvl_ooc"]
    assert meta["method"] == "DirectInfluence" and meta["chunks"] == [8, 64]
    assert meta["config"]["regularization"] == {"model": lam}
    assert meta["fingerprint"] == m.fingerprint() and meta["n_train"] == 250
    assert meta["format"] == 1 and meta["kind"] == "influence" and meta["version"]
    assert ds["influences"].data.chunksize == (8, 64)
    exact = ref_influences(p.H, lam, p.g_test, p.g_train).numpy()
    assert rel_err(ds["influences"].values, exact) <= 1e-5
    # self-influence <(H + lam I)^-1 g_r, g_r> against the float64 reference
    A = p.H + lam * torch.eye(p.p, dtype=p.H.dtype)
    ref_self = (torch.linalg.solve(A, p.g_train.T).T * p.g_train).sum(1).numpy()
    assert ds["self_influence"].dims == ("train",)
    assert rel_err(ds["self_influence"].values, ref_self) <= 1e-5
    assert s.is_complete and len(s.done_tiles()) == s.n_tiles == 4 * 4


def test_tasks_ran_on_both_workers_and_model_shipped_once(client, direct, mlp_problem,
                                                          tmp_path):
    from dvl_ooc.calculator import tasks

    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    calc = DaskInfluenceCalculator(m, client)
    calc.to_zarr(tmp_path / "w", xt, yt, x, y, test_chunk=10, train_chunk=10, progress=False)
    workers = set(client.scheduler_info()["workers"])
    assert len(workers) == 2
    columns = calc.info["columns"]
    assert all(type(st) is dict for st in columns)  # plain data
    ran_on = {st["worker"] for st in columns}
    assert ran_on == workers
    assert len({st["pid"] for st in columns}) == 2 and os.getpid() not in {
        st["pid"] for st in columns}
    assert sorted(st["column"] for st in columns) == list(range(25))
    assert sum(len(st["tiles"]) for st in columns) == 3 * 25
    # the model was prepared once per worker under this calculator's token
    tokens = client.run(lambda: list(tasks._CACHE))
    assert all(calc._token in t for t in tokens.values())


# ---------------------------------------------------------------------- resume
_KILLED_RUN = """
import pickle, sys
sys.path[:0] = [{tests!r}, {tests_root!r}]  # SlowDataset's module, and the conftest it imports
from distributed import Client
from dvl_ooc import DaskInfluenceCalculator
model, args, kw = pickle.load(open({blob!r}, "rb"))
with Client({address!r}) as client:
    DaskInfluenceCalculator(model, client).to_zarr(*args, **kw)
"""


def _wait_idle(client, timeout=60.0):
    def busy(dask_scheduler):
        return sum(ts.state in ("processing", "waiting", "queued", "no-worker")
                   for ts in dask_scheduler.tasks.values())

    t0 = time.time()
    while client.run_on_scheduler(busy) and time.time() - t0 < timeout:
        time.sleep(0.2)


def _wait_tiles_settled(path, quiet=3.0, timeout=60.0):
    """A task of a killed client that is already running on a worker thread cannot be
    cancelled: it finishes its column after the scheduler has forgotten it. Wait until the
    set of written tiles has not changed for ``quiet`` seconds."""
    t0 = time.time()
    last, since = None, time.time()
    while time.time() - t0 < timeout:
        now = InfluenceStore.open(path).done_tiles()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return
        time.sleep(0.2)


def test_resume_after_killed_run(client, direct, mlp_problem, tmp_path):
    p = mlp_problem
    m, _ = direct
    slow_te = SlowDataset(p.x_test, p.y_test, delay=0.0)
    slow_tr = SlowDataset(p.x_train, p.y_train, delay=0.02)
    path = tmp_path / "killed"
    kw = dict(test_chunk=10, train_chunk=25, progress=False)
    blob = tmp_path / "blob.pkl"
    with open(blob, "wb") as f:
        pickle.dump((m, (str(path), slow_te, None, slow_tr, None), kw), f)
    script = _KILLED_RUN.format(tests=str(TESTS), tests_root=str(TESTS.parent), blob=str(blob),
                                address=client.scheduler.address)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            # the store appears atomically (built aside, renamed into place)
            if (path / "zarr.json").exists() and len(InfluenceStore.open(path).done_tiles()) >= 3:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the client process dies mid-run
    finally:
        proc.wait()
    _wait_idle(client)  # tasks already running on workers finish their (whole) columns
    _wait_tiles_settled(path)
    store = InfluenceStore.open(path)
    done = store.done_tiles()
    assert 3 <= len(done) < store.n_tiles, "the run was not interrupted part-way"
    before = {k: (f.stat().st_mtime_ns, f.read_bytes()) for k, f in (
        (k, path / "influences" / "c" / str(k[0]) / str(k[1])) for k in done)}

    calc = DaskInfluenceCalculator(m, client)
    resumed = calc.to_zarr(path, slow_te, None, slow_tr, None, **kw)
    computed = {t for st in calc.info["columns"] for t in st["tiles"]}
    # only missing tiles are computed (a straggler of the killed run may have added one more
    # tile after the listing above, which the rerun then also skips)
    assert computed and computed.isdisjoint(done)
    assert computed <= {(i, j) for i in range(3) for j in range(10)} - done
    for k, (mtime, data) in before.items():  # tiles done before were not touched
        f = path / "influences" / "c" / str(k[0]) / str(k[1])
        assert f.stat().st_mtime_ns == mtime and f.read_bytes() == data
    assert resumed.is_complete
    # a rerun of a complete store computes nothing
    calc.to_zarr(path, slow_te, None, slow_tr, None, **kw)
    assert calc.info["columns"] == []
    # identical bytes to an uninterrupted run
    full = calc.to_zarr(tmp_path / "full", slow_te, None, slow_tr, None, **kw)
    assert _chunk_bytes(path) == _chunk_bytes(Path(full.path))
    assert len(_chunk_bytes(path)) == 30


# ---------------------------------------------------------------------- bad input
def test_bad_inputs(client, direct, mlp_problem, tmp_path):
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    calc = DaskInfluenceCalculator(m, client)
    with pytest.raises(LengthMismatchError, match="x has 250 samples but y has 249"):
        calc.to_zarr(tmp_path / "a", xt, yt, x, y[:-1], progress=False)
    with pytest.raises(LengthMismatchError):
        calc.influences(xt[:5], yt, x, y)
    for bad in (0, -3, 2.5, True):  # None: the default chunk, chosen to fit
        with pytest.raises(InputError, match="train_chunk must be a positive integer"):
            calc.to_zarr(tmp_path / "b", xt, yt, x, y, train_chunk=bad, progress=False)
    with pytest.raises(InputError, match="test_chunk"):
        SequentialInfluenceCalculator(m).influences(xt, yt, x, y, test_chunk=0)
    with pytest.raises(InputError, match="Dataset"):
        calc.to_zarr(tmp_path / "c", TensorDataset(p.x_test, p.y_test), yt, x, y)
    unfitted = DirectInfluence(p.model, p.loss, regularization=1.0)
    with pytest.raises(NotFittedError):
        DaskInfluenceCalculator(unfitted, client).to_zarr(tmp_path / "d", xt, yt, x, y)
    with pytest.raises(NotFittedError):
        SequentialInfluenceCalculator(unfitted).influences(xt, yt, x, y)
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_store_with_other_parameters_is_refused_then_overwritten(client, direct, mlp_problem,
                                                                 tmp_path):
    p = mlp_problem
    m, lam = direct
    xt, yt, x, y = _data(p)
    calc = DaskInfluenceCalculator(m, client)
    path = tmp_path / "s"
    calc.to_zarr(path, xt, yt, x, y, test_chunk=10, train_chunk=50, progress=False)
    before = _chunk_bytes(path)
    # Direct stores eigh(H), independent of lambda: a copy with another lambda is a fitted model
    other_lam = copy.deepcopy(m)
    other_lam.regularization = other_lam._resolve_regularization(2 * lam)
    attempts = [
        (calc, (xt, yt, x, y), dict(test_chunk=10, train_chunk=64), "chunks"),
        (calc, (xt, yt, x[:200], y[:200]), dict(test_chunk=10, train_chunk=50), "n_train"),
        (calc, (xt, yt, x[::-1].copy(), y), dict(test_chunk=10, train_chunk=50),
         "data_fingerprint"),
        (DaskInfluenceCalculator(other_lam, client), (xt, yt, x, y),
         dict(test_chunk=10, train_chunk=50), "config"),
    ]
    for c, args, kw, field in attempts:
        with pytest.raises(StoreMismatchError, match=field):
            c.to_zarr(path, *args, progress=False, **kw)
        assert _chunk_bytes(path) == before  # untouched
    # a different method with mode="w" replaces the store
    s = DaskInfluenceCalculator(other_lam, client).to_zarr(
        path, xt, yt, x, y, test_chunk=10, train_chunk=50, mode="w", progress=False)
    assert s.attrs["config"]["regularization"] == {"model": 2 * lam}
    assert _chunk_bytes(path) != before and s.is_complete
    np.testing.assert_allclose(s.influences[:], other_lam.influences(
        p.x_test, p.y_test, p.x_train, p.y_train).numpy(), rtol=1e-5, atol=1e-6)


def test_non_writable_or_foreign_path(direct, mlp_problem, tmp_path):
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    seq = SequentialInfluenceCalculator(m)
    afile = tmp_path / "plain.txt"
    afile.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot write a store"):
        seq.to_zarr(afile / "store", xt, yt, x, y, progress=False)
    with pytest.raises(StoreError, match="is a file"):
        seq.to_zarr(afile, xt, yt, x, y, progress=False)
    if Path("/proc").is_dir():  # not writable even for root
        with pytest.raises(StoreError):
            seq.to_zarr("/proc/dvl_ooc_store", xt, yt, x, y, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a Zarr store"):
        seq.to_zarr(foreign, xt, yt, x, y, mode="w", progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------- write modes
def test_write_modes(direct, mlp_problem, tmp_path):
    """mode="w-" creates only, "a" (default) creates or resumes a matching store, "w" replaces;
    nothing else is ever overwritten."""
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    seq = SequentialInfluenceCalculator(m)
    path = tmp_path / "s"
    s = seq.to_zarr(path, xt, yt, x, y, mode="w-", test_chunk=10, train_chunk=100,
                    progress=False)
    assert s.is_complete and len(seq.info["columns"]) == 3
    before = _chunk_bytes(path)
    with pytest.raises(StoreExistsError, match="mode='w-'"):
        seq.to_zarr(path, xt, yt, x, y, mode="w-", test_chunk=10, train_chunk=100,
                    progress=False)
    assert _chunk_bytes(path) == before
    seq.to_zarr(path, xt, yt, x, y, test_chunk=10, train_chunk=100, progress=False)
    assert seq.info["columns"] == []  # resumed a complete store: nothing computed
    for mode in ("a", "w-"):
        with pytest.raises((StoreMismatchError, StoreExistsError), match="mode='w'"):
            seq.to_zarr(path, xt, yt, x, y, mode=mode, test_chunk=7, train_chunk=100,
                        progress=False)
    assert _chunk_bytes(path) == before
    s = seq.to_zarr(path, xt, yt, x, y, mode="w", test_chunk=7, train_chunk=100,
                    progress=False)
    assert s.chunks == (7, 100) and s.is_complete and len(seq.info["columns"]) == 3
    mem = m.influences(p.x_test, p.y_test, p.x_train, p.y_train).numpy()
    assert rel_err(s.influences[:], mem) <= 1e-6
    with pytest.raises(InputError, match="mode must be"):
        seq.to_zarr(path, xt, yt, x, y, mode="r+", progress=False)
    with pytest.raises(TypeError, match="bogus"):
        seq.to_zarr(path, xt, yt, x, y, bogus=1, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for mode in ("a", "w-", "w"):
        with pytest.raises(StoreError, match="not a Zarr store"):
            seq.to_zarr(foreign, xt, yt, x, y, mode=mode, progress=False)
    assert [f.name for f in foreign.iterdir()] == ["notes.txt"]


def test_deprecated_overwrite_and_last_stats(direct, mlp_problem, tmp_path):
    p = mlp_problem
    m, _ = direct
    xt, yt, x, y = _data(p)
    seq = SequentialInfluenceCalculator(m)
    path = tmp_path / "s"
    seq.to_zarr(path, xt, yt, x, y, test_chunk=10, train_chunk=100, progress=False)
    with pytest.warns(DeprecationWarning, match="overwrite= is deprecated"):
        s = seq.to_zarr(path, xt, yt, x, y, test_chunk=15, train_chunk=100, overwrite=True,
                        progress=False)
    assert s.chunks == (15, 100) and s.is_complete  # overwrite=True is mode="w"
    with pytest.warns(DeprecationWarning, match="last_stats"):
        stats = seq.last_stats
    assert [st.column for st in stats] == [d["column"] for d in seq.info["columns"]]
    assert sorted(t for st in stats for t in st.tiles) == [(i, j) for i in range(2)
                                                           for j in range(3)]
    with pytest.warns(DeprecationWarning, match="overwrite"), \
            pytest.raises(StoreMismatchError):  # overwrite=False is the default mode "a"
        seq.to_zarr(path, xt, yt, x, y, test_chunk=10, train_chunk=100, overwrite=False,
                    progress=False)
    with pytest.warns(DeprecationWarning), pytest.raises(InputError, match="contradicts"):
        seq.to_zarr(path, xt, yt, x, y, mode="w-", overwrite=True, progress=False)
