"""A fitted state larger than Dask's large-graph warning threshold reaches the workers without
the "Sending large graph" warning, gives the same bytes as the single-literal shipping, and a
lost worker still recovers it: from the store (``to_zarr``) or from the literal parts (in
memory). The threshold (``distributed.admin.large-graph-warning-threshold``) is lowered below
the model's pickle instead of building a huge model."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence, InfluenceStore
from dvl_ooc.calculator import tasks
from dvl_ooc.calculator.inputs import STATE_DIR, _hold, _pickled, _StoredState
from dvl_ooc.demo.nets import DigitsCNN

N_TRAIN, N_TEST = 160, 40
N_TILES = 2 * 20
KW = dict(test_chunk=20, train_chunk=8, self_influence=True, progress=False)
SMALL = "1MB"  # the threshold in these tests (the model's pickle is ~3 MB)
LARGE_GRAPH = "Sending large graph"


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the large-state tests") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def job():
    """A small CNN (package classes only: restarted workers import nothing from the tests)
    whose Direct state (eigenvectors of the 800-parameter Gauss-Newton matrix) pickles to
    ~3 MB, and NumPy inputs of ~50 kB (literals of the tile graph, below the threshold)."""
    torch.manual_seed(0)
    net = DigitsCNN(width=3, hidden=12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=g)
    m = DirectInfluence(net, F.cross_entropy, regularization=1e-2, hessian="gauss-newton")
    m.fit((x[:N_TRAIN], y[:N_TRAIN]))
    assert len(_pickled(m)) > 2 * dask.utils.parse_bytes(SMALL)
    return m, (x[N_TRAIN:].numpy(), y[N_TRAIN:].numpy(), x[:N_TRAIN].numpy(),
               y[:N_TRAIN].numpy())


@pytest.fixture(scope="module")
def reference(client, job, tmp_path_factory):
    """The run with Dask's default threshold: the model is the literal of one task."""
    m, data = job
    calc = DaskInfluenceCalculator(m, client)
    store = calc.to_zarr(tmp_path_factory.mktemp("large") / "ref.zarr", *data, **KW)
    assert not isinstance(calc._model_future, _StoredState)
    assert not (Path(store.path) / STATE_DIR).exists()
    return store


def _chunk_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    for name in ("influences", "self_influence"):
        root = path / name / "c"
        out.update({f"{name}/{f.relative_to(root)}": f.read_bytes() for f in root.rglob("*")
                    if f.is_file() and not f.name.endswith(".partial")})
    return out


class _Recorded:
    """Warnings (all of them, every time) and the ``distributed`` log inside the block."""

    def __enter__(self) -> _Recorded:
        import logging

        self._w = warnings.catch_warnings(record=True)
        self.warnings = self._w.__enter__()
        warnings.simplefilter("always")
        self.records: list[str] = []
        rec = self.records

        class H(logging.Handler):
            def emit(self, r: logging.LogRecord) -> None:
                rec.append(r.getMessage())

        self._h, self._log = H(), logging.getLogger("distributed")
        self._log.addHandler(self._h)
        return self

    def __exit__(self, *exc: object) -> None:
        self._log.removeHandler(self._h)
        self._w.__exit__(*exc)

    def large_graph(self) -> list[str]:
        return [str(w.message) for w in self.warnings if LARGE_GRAPH in str(w.message)] + \
            [r for r in self.records if LARGE_GRAPH in r]


def test_the_threshold_is_in_force(client, job):
    """The check below can fail: under the lowered threshold, the model as one task literal
    (the shipping before this change) prints the warning."""
    m, _ = job
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": SMALL}), \
            _Recorded() as rec:
        f = client.submit(_hold, m, pure=False)
        f.result()
        del f
    assert rec.large_graph()


def _kill_a_busy_worker(client, path: Path, after: int, seen: dict) -> None:
    """Once ``after`` tiles are in the store, SIGKILL a worker that runs a column task."""
    t0 = time.time()
    while time.time() - t0 < 60:
        try:
            done = len(InfluenceStore.open(path).done_tiles())
        except Exception:  # noqa: BLE001 - not created yet
            done = 0
        if done >= after:
            busy = [w for w, keys in client.processing().items()
                    if any(str(k).startswith("write-column") for k in keys)]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                seen.update(done=done, pid=pid)
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.01)


def test_large_state_via_the_store_and_a_killed_worker(client, job, reference, tmp_path):
    """No warning; the state is written into the store and only a reference travels; a worker
    SIGKILLed mid-run: the run completes, byte-identical to the single-literal run; the
    restarted worker (a fresh process, nothing cached) builds the model from the store."""
    m, data = job
    client.wait_for_workers(2)
    pids_before = set(client.run(os.getpid).values())
    path = tmp_path / "killed.zarr"
    seen: dict = {}
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": SMALL}), \
            _Recorded() as rec:
        calc = DaskInfluenceCalculator(m, client)
        killer = threading.Thread(target=_kill_a_busy_worker, args=(client, path, 4, seen))
        killer.start()
        try:
            store = calc.to_zarr(path, *data, **KW)
        finally:
            killer.join()
    assert seen and seen["pid"] in pids_before and seen["done"] < N_TILES, \
        "no worker was killed mid-run"
    assert rec.large_graph() == []
    # the state went into the store; only a small reference travelled through the graph
    ref = calc._model_future
    assert isinstance(ref, _StoredState) and len(pickle.dumps(ref)) < 2000
    fp = m.fingerprint()
    assert ref.key == f"{STATE_DIR}/{fp}.model.pkl"
    state_file = path / ref.key
    assert state_file.stat().st_size == ref.nbytes > 2 * dask.utils.parse_bytes(SMALL)
    assert pickle.loads(state_file.read_bytes()).fingerprint() == fp
    # complete, and the same bytes as the single-literal run
    assert store.is_complete and store.n_tiles == N_TILES
    assert InfluenceStore.open(path).is_complete
    assert _chunk_bytes(path) == _chunk_bytes(Path(reference.path))
    # the restarted worker (a fresh process) builds the model from the stored reference alone
    # (a token nobody has prepared: nothing cached)
    client.wait_for_workers(2)
    new = [w for w, pid in client.run(os.getpid).items() if pid not in pids_before]
    assert len(new) == 1
    xt, yt = data[0][:20], data[1][:20]
    got = client.submit(tasks._test_features_task, calc._model_future, "fresh-token", None,
                        None, (xt, yt), workers=new, allow_other_workers=False,
                        pure=False).result()
    with torch.no_grad():
        want = m.test_features(m.gradients(torch.as_tensor(xt), torch.as_tensor(yt))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    client.run(lambda: tasks._CACHE.pop("fresh-token", None))


def test_in_memory_parts_without_warning_and_recomputed_after_a_lost_worker(client, job,
                                                                            reference):
    """``influences()`` (no store): the state goes as literal parts below the threshold; the
    worker holding the joined model is killed before the tiles are computed, and the
    scheduler rebuilds it from the parts' literals (released by then) on another worker."""
    from distributed import wait

    m, data = job
    client.wait_for_workers(2)
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": SMALL}), \
            _Recorded() as rec:
        calc = DaskInfluenceCalculator(m, client)
        model_f, _ = calc._ship()
        wait(model_f)
        assert model_f.key == f"dvl-model-{calc._token}"
        parts = [k for k in client.run_on_scheduler(
            lambda dask_scheduler: list(map(str, dask_scheduler.tasks)))
            if k.startswith(f"dvl-model-{calc._token}-part-")]
        assert len(parts) >= 6  # ~3 MB in parts of 0.5 MB
        holder = next(iter(client.who_has(model_f)[model_f.key]))
        pid = client.run(os.getpid, workers=[holder])[holder]
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        while holder in client.scheduler_info()["workers"] and time.time() - t0 < 30:
            time.sleep(0.05)
        lazy = calc.influences(*data, test_chunk=20, train_chunk=8)
        values = lazy.compute()
    assert rec.large_graph() == []
    np.testing.assert_array_equal(values, reference.influences[:])


def test_large_fit_data_of_cg_goes_through_the_store(client, job, tmp_path):
    """CG preconditions with its fit data on the workers: fit data above the (lowered)
    threshold goes into the store, the small model as a task literal (Zarr inputs keep the tile
    graph small); no warning, and the tiles equal the sequential calculator's, byte for
    byte."""
    import zarr

    from dvl_ooc import CgInfluence, SequentialInfluenceCalculator

    _, (xt, yt, x, y) = job
    m = CgInfluence(job[0].model, F.cross_entropy, regularization=1.0, hessian="gauss-newton",
                    rtol=1e-4)
    m.fit((torch.as_tensor(x), torch.as_tensor(y)))
    assert len(_pickled(m)) < 20_000 < len(_pickled(m._fit_data))  # (the net is small)

    def z(a, name):
        arr = zarr.open_array(tmp_path / f"{name}.zarr", mode="w", shape=a.shape,
                              chunks=(16, *a.shape[1:]), dtype=a.dtype)
        arr[:] = a
        return arr

    data = (z(xt[:4], "xt"), z(yt[:4], "yt"), z(x, "x"), z(y, "y"))
    kw = dict(test_chunk=4, train_chunk=80, progress=False)
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "40kB"}), \
            _Recorded() as rec:
        calc = DaskInfluenceCalculator(m, client)
        store = calc.to_zarr(tmp_path / "cg.zarr", *data, **kw)
    assert rec.large_graph() == []
    assert not isinstance(calc._model_future, _StoredState)
    assert isinstance(calc._fit_future, _StoredState)
    assert calc._fit_future.key.endswith(".fit-data.pkl")
    seq = SequentialInfluenceCalculator(m).to_zarr(tmp_path / "seq.zarr", *data, **kw)
    np.testing.assert_array_equal(store.influences[:], seq.influences[:])
