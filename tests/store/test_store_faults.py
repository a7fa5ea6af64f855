"""Faults of the store under a running Dask job (2 worker processes), on a real S3 server (moto)
and on local disk: the object store unreachable for a while, a full disk, two runs on one store
at once; and a chunk file is never seen half-written while tiles are written.

Outcomes (documented in :mod:`dvl_ooc.store` and the README):

* a short outage (within the S3 client's retries) is ridden out: the run completes and equals
  the local-disk run;
* a longer one fails the run with ``StoreUnavailableError`` (names the store, says to rerun with
  mode='a'); every tile the store lists is whole and right; the rerun after the server is back
  computes only the missing tiles and equals the local-disk run;
* a full disk (a real tmpfs where it can be mounted, and a quota store) fails the run with
  ``StoreFullError``; earlier tiles are intact, no temporary file is left; the rerun after space
  is back completes, byte-identical to an uninterrupted run;
* two runs with the same parameters at once cooperate (both complete, the store is
  byte-identical); with other parameters the second is refused; a creation race between threads
  of both kinds leaves exactly one parameter set, on local disk and on S3.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence, InfluenceStore
from dvl_ooc.exceptions import StoreFullError, StoreMismatchError, StoreUnavailableError

sys.path.insert(0, str(Path(__file__).parent))
import fault_stores as fsx  # noqa: E402
from s3_server import s3_server  # noqa: E402

KW = dict(test_chunk=20, train_chunk=50, progress=False)  # 2 x 6 = 12 tiles of 4000 bytes
N_TILES = 12
TILE_BYTES = 20 * 50 * 4
# fail fast when the server is down (the default botocore retries take ~10 s per request)
FAST = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                          "connect_timeout": 1}}


@pytest.fixture(scope="module")
def s3():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # restarts re-enable request logs
    with s3_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the store-fault tests") as c, \
            Client(c) as client:
        yield c, client


@pytest.fixture(scope="module")
def job(linear_problem):
    p = linear_problem
    m = DirectInfluence(p.model, p.loss, regularization=p.small_reg(1e-3), hessian="exact")
    m.fit((p.x_train, p.y_train))
    return m, (p.x_test, p.y_test, p.x_train, p.y_train)


def _chunks(root: Path) -> dict[str, bytes]:
    d = root / "influences" / "c"
    return {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()}


def _poll_chunks(root: Path, stop: threading.Event, seen: dict) -> None:
    """Read every chunk file of ``root`` over and over until ``stop``: record reads, files that
    were absent (fine) and reads that were not a whole tile (a half-written file)."""
    d = root / "influences" / "c"
    while not stop.is_set():
        for sub, _, files in os.walk(d):
            for f in files:
                if not f.isdigit():
                    continue  # zarr's temporary <key>.<uuid>.partial files
                try:
                    b = (Path(sub) / f).read_bytes()
                except FileNotFoundError:
                    continue
                seen["reads"] += 1
                key = f"{Path(sub).name}/{f}"
                seen.setdefault("last", {})[key] = b
                if len(b) != TILE_BYTES:
                    seen["partial"].append((key, len(b)))
        time.sleep(0.002)  # (leave the GIL to the client in this process)


@pytest.fixture(scope="module")
def reference(cluster, job, tmp_path_factory):
    """The uninterrupted run on local disk (its chunk bytes), read all along by a poller."""
    m, data = job
    path = tmp_path_factory.mktemp("faults") / "reference.zarr"
    seen: dict = {"reads": 0, "partial": []}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_chunks, args=(path, stop, seen))
    poller.start()
    try:
        store = DaskInfluenceCalculator(m, cluster[1]).to_zarr(path, *data, **KW)
    finally:
        stop.set()
        poller.join()
    assert store.is_complete
    return dict(path=path, chunks=_chunks(path), values=store.influences[:], seen=seen)


def _tiles_right(store: InfluenceStore, values: np.ndarray) -> set:
    """The tiles the store lists, each checked to be whole and equal to the reference."""
    done = store.done_tiles()
    a = store.influences[:]
    for i, j in done:
        sl = store.tile_slices(i, j)
        assert np.array_equal(a[sl], values[sl]), f"tile {(i, j)} listed but not right"
    return done


def _when_tiles(count, n: int, action, timeout: float = 60.0) -> threading.Thread:
    """A thread that runs ``action()`` once ``count() >= n``."""

    def run() -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if count() >= n:
                    break
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.02)
        action()

    th = threading.Thread(target=run)
    th.start()
    return th


# ------------------------------------------------------------------ a chunk is never half-seen
def test_chunk_files_never_seen_half_written(reference):
    """A reader polling the chunk files while two workers write them sees each file absent or
    whole (zarr >= 3.1.3 writes a temporary file and renames it), with its final bytes."""
    seen = reference["seen"]
    assert seen["reads"] >= N_TILES  # the poller saw the tiles appear
    assert seen["partial"] == []
    assert all(b == reference["chunks"][k] for k, b in seen["last"].items())


# ------------------------------------------------------------------ object store unavailable
def _s3_tiles(s3, name: str):
    fs = s3.fs()
    return lambda: len(fs.find(f"{s3.bucket}/{name}/influences/c"))


@pytest.mark.slow  # ~15 s on 2 loaded cores
def test_short_outage_is_ridden_out(cluster, job, reference, s3):
    """The server stops for 0.5 s mid-run: the S3 client's retries (botocore's defaults) ride
    it out; the run completes and equals the local-disk run."""
    m, data = job
    url = s3.url("short.zarr")

    def outage() -> None:
        s3.stop()
        time.sleep(0.5)
        s3.start()

    th = _when_tiles(_s3_tiles(s3, "short.zarr"), 3, outage)
    try:
        store = DaskInfluenceCalculator(m, cluster[1]).to_zarr(
            url, *data, storage_options=s3.storage_options, **KW)
    finally:
        th.join()
        if s3._server is None:
            s3.start()
    assert store.is_complete
    assert np.array_equal(store.influences[:], reference["values"])


def test_long_outage_fails_clearly_and_a_rerun_resumes(cluster, job, reference, s3):
    """The server stays down longer than the client's retries: the run fails with
    ``StoreUnavailableError`` (not a generic error, not "no store"), the store never lists a
    tile it does not hold, and a rerun after the server is back computes only the missing
    tiles and equals the local-disk run."""
    m, data = job
    url, name = s3.url("long.zarr"), "long.zarr"
    so = {**s3.storage_options, **FAST}
    calc = DaskInfluenceCalculator(m, cluster[1])
    th = _when_tiles(_s3_tiles(s3, name), 3, s3.stop)
    t0 = time.perf_counter()
    try:
        with pytest.raises(StoreUnavailableError, match="unreachable") as err:
            calc.to_zarr(url, *data, storage_options=so, **KW)
        t_fail = time.perf_counter() - t0
        th.join()
        msg = str(err.value)
        assert url in msg and "mode='a'" in msg and "only the missing tiles" in msg
        # while it is down, opening or rerunning says the same (client side), quickly
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            InfluenceStore.open(url, storage_options=so)
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            calc.to_zarr(url, *data, storage_options=so, **KW)
    finally:
        th.join()
        s3.start()
    assert t_fail < 30
    before = _tiles_right(InfluenceStore.open(url, storage_options=so), reference["values"])
    assert 3 <= len(before) < N_TILES
    calc.to_zarr(url, *data, storage_options=s3.storage_options, **KW)
    redone = {tuple(t) for c in calc.info["columns"] for t in c["tiles"]}
    assert redone and not redone & before  # only missing tiles were computed
    store = InfluenceStore.open(url, storage_options=s3.storage_options)
    assert store.is_complete and np.array_equal(store.influences[:], reference["values"])


def test_listing_sees_tiles_written_by_other_processes(s3):
    """Regression: with s3fs's listings cache, a process that had listed a store answered
    "not found" for tiles written afterwards by others (read back as NaN, a resumed store
    looked wrong). Stores open their fsspec file system without it."""
    so, url = s3.storage_options, s3.url("listing.zarr")
    st = InfluenceStore.create(url, storage_options=so, n_test=4, n_train=4, test_chunk=2,
                               train_chunk=2, method="M", config={}, fingerprint="f")
    st.influences[0:2, 0:2] = np.ones((2, 2), np.float32)
    assert st.done_tiles() == {(0, 0)}
    fs = s3.fs()  # another client writes tile (0, 1)
    fs.pipe(f"{s3.bucket}/listing.zarr/influences/c/0/1",
            fs.cat(f"{s3.bucket}/listing.zarr/influences/c/0/0"))
    again = InfluenceStore.open(url, storage_options=so)
    assert again.done_tiles() == {(0, 0), (0, 1)}
    assert np.array_equal(again.influences[0:2, 2:4], np.ones((2, 2), np.float32))


# ------------------------------------------------------------------ disk full
@pytest.mark.parametrize("disk", ["tmpfs", "quota"])
def test_full_disk_fails_clearly_and_a_rerun_resumes(cluster, job, reference, tmp_path, disk):
    """Writing tiles onto a full disk (a real 'No space left on device'): ``StoreFullError``
    naming the store and the rerun; the tiles written before are whole and right, no temporary
    file is left; after space is back the rerun completes, byte-identical to an uninterrupted
    run."""
    m, data = job
    calc = DaskInfluenceCalculator(m, cluster[1])
    if disk == "tmpfs":
        if not fsx.can_mount_tmpfs(tmp_path):
            pytest.skip("cannot mount a tmpfs here (needs root); the quota store covers it")
        mount = tmp_path / "disk"
        ctx = fsx.tmpfs(mount, 4 << 20)
    else:
        import contextlib

        mount = tmp_path
        ctx = contextlib.nullcontext(mount)
    with ctx:
        path = mount / "run.zarr"
        if disk == "tmpfs":
            # leave room for the store's metadata and coordinates plus 4 tiles
            room = (fsx.pages(reference["path"], skip="influences/c") + 2 + 4) * fsx.PAGE
            ballast = mount / "ballast"
            ballast.write_bytes(b"\0" * (fsx.free_bytes(mount) - room))
            full, freed = path, lambda: ballast.unlink()
        else:
            full = fsx.QuotaStore(path, max_chunks=4)
            freed = None
        with pytest.raises(StoreFullError, match="no space left") as err:
            calc.to_zarr(full, *data, **KW)
        msg = str(err.value)
        assert str(path) in msg and "mode='a'" in msg and "free space" in msg
        files = [f.name for f in path.rglob("*") if f.is_file()]
        assert not [f for f in files if "partial" in f]  # no temporary file left behind
        before = _tiles_right(InfluenceStore.open(path), reference["values"])
        assert 1 <= len(before) < N_TILES
        assert all(reference["chunks"][k] == b for k, b in _chunks(path).items())
        if freed is not None:
            freed()
            again = path
        else:
            again = fsx.QuotaStore(path)
        calc.to_zarr(again, *data, **KW)
        redone = {tuple(t) for c in calc.info["columns"] for t in c["tiles"]}
        assert redone and not redone & before
        assert InfluenceStore.open(path).is_complete
        assert _chunks(path) == reference["chunks"]


# ------------------------------------------------------------------ two runs at once
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_two_runs_same_parameters_cooperate(cluster, job, reference, s3, tmp_path, where):
    """Two clients run the same job on one store at the same moment: both complete (each
    creation finds or finishes the same metadata; tiles are deterministic) and the store is
    byte-identical to an uninterrupted run."""
    from distributed import Client

    m, data = job
    if where == "local":
        target, so = tmp_path / "both.zarr", None
    else:
        target, so = s3.url(f"both-{tmp_path.name}.zarr"), s3.storage_options
    results: dict = {}
    barrier = threading.Barrier(2)

    def run(k: int, client) -> None:
        calc = DaskInfluenceCalculator(m, client)
        barrier.wait()
        try:
            results[k] = calc.to_zarr(target, *data, storage_options=so, **KW)
            results[f"tiles{k}"] = sum(len(c["tiles"]) for c in calc.info["columns"])
        except Exception as e:  # noqa: BLE001 - reported below
            results[k] = e

    with Client(cluster[0].scheduler_address) as second:
        threads = [threading.Thread(target=run, args=(k, c))
                   for k, c in enumerate((cluster[1], second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(isinstance(results[k], InfluenceStore) for k in (0, 1)), results
    assert results["tiles0"] + results["tiles1"] >= N_TILES  # between them, every tile
    store = InfluenceStore.open(target, storage_options=so)
    assert store.is_complete and store.attrs["state"] == "complete"
    assert np.array_equal(store.influences[:], reference["values"])
    if where == "local":
        assert _chunks(target) == reference["chunks"]
        assert [p.name for p in tmp_path.iterdir()] == ["both.zarr"]  # no creation leftovers


def test_second_run_other_parameters_refused(cluster, job, reference, linear_problem, tmp_path):
    """A run with other parameters started while the first writes the store is refused
    (``StoreMismatchError`` naming the differing fields); the first completes unharmed."""
    m, data = job
    p = linear_problem
    other = DirectInfluence(p.model, p.loss, regularization=p.small_reg(1e-1), hessian="exact")
    other.fit((p.x_train, p.y_train))
    path = tmp_path / "shared.zarr"
    out: dict = {}

    def first() -> None:
        out["store"] = DaskInfluenceCalculator(m, cluster[1]).to_zarr(path, *data, **KW)

    t = threading.Thread(target=first)
    t.start()
    try:
        t0 = time.time()
        while time.time() - t0 < 60 and t.is_alive():
            try:
                if InfluenceStore.open(path).done_tiles():
                    break
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.01)
        running = t.is_alive()
        with pytest.raises(StoreMismatchError, match="different parameters.*fingerprint"):
            DaskInfluenceCalculator(other, cluster[1]).to_zarr(path, *data, **KW)
    finally:
        t.join()
    assert running  # refused while the first run was writing
    assert out["store"].is_complete and _chunks(path) == reference["chunks"]


P = dict(n_test=6, n_train=8, test_chunk=3, train_chunk=4, method="M", config={"a": 1},
         data_fingerprint="d")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_creation_race_leaves_one_parameter_set(s3, tmp_path, where):
    """Four threads create one location at the same moment, two with each of two parameter
    sets: one set wins; every creator with it gets the store, every other one is refused with
    ``StoreMismatchError``; the store is complete, with the winner's parameters, and nothing
    of the losers is left."""
    if where == "local":
        target, so = tmp_path / "race.zarr", None
    else:
        target, so = s3.url(f"race-{tmp_path.name}.zarr"), s3.storage_options
    barrier = threading.Barrier(4)
    out: dict[int, object] = {}

    def create(k: int) -> None:
        barrier.wait()
        try:
            out[k] = InfluenceStore.create(target, storage_options=so,
                                           fingerprint=f"fp{k % 2}", **P)
        except Exception as e:  # noqa: BLE001 - checked below
            out[k] = e

    threads = [threading.Thread(target=create, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = {k % 2 for k, v in out.items() if isinstance(v, InfluenceStore)}
    assert len(won) == 1, out
    w = won.pop()
    for k, v in out.items():
        if k % 2 == w:
            assert isinstance(v, InfluenceStore), v
        else:
            assert isinstance(v, StoreMismatchError), v
    store = InfluenceStore.open(target, mode="r+", storage_options=so)
    assert store.attrs["fingerprint"] == f"fp{w}" and store.attrs["state"] == "complete"
    store.influences[0:3, 0:4] = np.ones((3, 4), np.float32)
    assert InfluenceStore.open(target, storage_options=so).done_tiles() == {(0, 0)}
    if where == "local":
        assert [p.name for p in tmp_path.iterdir()] == ["race.zarr"]


def test_a_query_during_an_outage_fails_clearly_and_a_retry_answers(job, s3, tmp_path):
    """A query on an S3 store whose server goes down raises ``StoreUnavailableError`` naming
    the store and the query (not botocore's error from inside a Dask task, and not the
    writers' "rerun with mode='a'"); once the server is back the same query answers, equal
    to the one on local disk."""
    from dvl_ooc import SequentialInfluenceCalculator
    from dvl_ooc.query import query_quantiles, query_topk

    m, data = job
    url, so = s3.url("query.zarr"), {**s3.storage_options, **FAST}
    calc = SequentialInfluenceCalculator(m)
    calc.to_zarr(url, *data, storage_options=s3.storage_options, **KW)
    local = calc.to_zarr(tmp_path / "local.zarr", *data, **KW)
    src = InfluenceStore.open(url, storage_options=so)
    s3.stop()
    try:
        with pytest.raises(StoreUnavailableError, match="unreachable") as err:
            query_quantiles(src, 0.25, same_label=False)
        msg = str(err.value)
        assert url in msg and "query_quantiles" in msg and "run it again" in msg, msg
        assert "mode='a'" not in msg
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            query_topk(url, 3, storage_options=so)  # opening by URL: the same error
    finally:
        s3.start()
    got = query_quantiles(src, 0.25, same_label=False)
    ref = query_quantiles(local, 0.25, same_label=False)
    assert np.array_equal(got.values, ref.values, equal_nan=True)
