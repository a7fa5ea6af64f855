"""No hang, ever: on 2 real worker processes, failures surface in the client within seconds.

What workers share is the job pickled once on the driver (immutable bytes), rebuilt per worker
thread; a live utility that a task mutates (``functional_call`` inside ``vmap``) is never what
a worker ships to a peer. That is the structural fix of a 2-worker ``TorchBatchUtility`` run
that hung (``Could not serialize object of type Job`` in ``gather_dep``). Every call here runs
under a deadline, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import importlib
import pickle
import threading
import time

import cloudpickle
import numpy as np
import pytest
import torch
import valuation_stub_games as stubs
from torch import nn

from dvl_ooc.exceptions import ClusterStalledError, JobSerializationError, UtilityError
from dvl_ooc.valuation import (
    InteractionGame,
    MaxChecks,
    RelativeTruncation,
    TMCShapleyValuation,
    TorchBatchUtility,
)
from dvl_ooc.valuation.tasks import PackedJob, forget_job, run_batch

distributed = pytest.importorskip("distributed")
cloudpickle.register_pickle_by_value(stubs)  # spawned workers cannot import test modules


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    # Dask's active memory manager drops the extra replicas of scattered data whenever no task
    # on a worker waits for it (checked every 2 s by default); that worker's next task fetches
    # the job from its peer, possibly while the peer's task is inside vmap. Running it every
    # 20 ms makes those peer transfers frequent (the old design hung within a few fits).
    with dask.config.set({"distributed.scheduler.active-memory-manager.interval": "20ms"}), \
            local_cluster(2, threads_per_worker=1, what="the no-hang tests") as cluster, \
            Client(cluster) as c:
        c.run(importlib.import_module, "dvl_ooc.valuation")  # warm: torch loaded once
        yield c


def _within(seconds: float, fn):
    """``(value or exception, elapsed)`` of ``fn()``; fails the test if it has not returned
    after ``seconds`` (the worker thread is a daemon: a hang cannot block the suite)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        pytest.fail(f"no answer after {seconds} s: the client hangs")
    return box.get("error", box.get("value")), time.perf_counter() - t0


def _torch_problem(digits, n=5):
    x = digits.x_train[:n].reshape(n, -1).astype(np.float32)
    y = digits.y_train[:n]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    u = TorchBatchUtility(model, test_data=(digits.x_test[:60].reshape(60, -1).astype(np.float32),
                                            digits.y_test[:60]), epochs=2)
    return u, x, y


def test_torch_batch_utility_on_two_workers_many_fits_never_hang(client, digits):
    u, x, y = _torch_problem(digits)
    kw = dict(seed=3, batch_size=1, samples_per_round=4, is_done=MaxChecks(4),
              truncation=RelativeTruncation(0.05, 0.3))
    ref = TMCShapleyValuation(u, **kw).fit(x, y).result
    for i in range(10):  # each fit: a new job, peer transfers between rounds, vmap tasks
        out, elapsed = _within(60, lambda: TMCShapleyValuation(u, client=client, **kw)
                               .fit(x, y).result)
        assert not isinstance(out, BaseException), f"fit {i} raised {out!r}"
        assert np.array_equal(out.values, ref.values), f"fit {i} differs from sequential"
        assert out.n_samples == 16 and out.evaluations == ref.evaluations
    assert np.abs(ref.values).sum() > 0


def test_workers_ship_the_bytes_never_the_live_job():
    g = InteractionGame(np.arange(4.0))
    job = TMCShapleyValuation(g, is_done=MaxChecks(1), seed=0)._job(g, 4, 0)
    packed = PackedJob.pack(job)
    live = packed.job()
    assert live is packed.job() and live is not job  # rebuilt once, then cached
    live.utility.params = stubs.Unshippable()  # what a task mid-vmap leaves on its live job
    with pytest.raises(NotImplementedError):
        pickle.dumps(live)
    shipped = pickle.loads(pickle.dumps(packed))  # what a worker sends a peer: token + bytes
    assert shipped.token == packed.token and shipped.payload == packed.payload
    assert not hasattr(pickle.loads(shipped.payload).utility, "params")
    assert shipped.job() is live  # re-fetched bytes: the live job is found by its token
    other: dict = {}
    th = threading.Thread(target=lambda: other.update(job=packed.job()))
    th.start()
    th.join(10)
    assert other["job"] is not live  # every worker thread has its own live job
    assert forget_job(packed.token) == 2 and packed.job() is not live
    forget_job(packed.token)
    part, evals = run_batch(packed, 0, 3)
    ref, ref_evals = run_batch(job, 0, 3)
    assert evals == ref_evals and np.array_equal(part["marginal"].mean, ref["marginal"].mean)
    forget_job(packed.token)


def test_a_task_that_raises_on_a_worker_is_raised_in_the_client(client):
    g = stubs.FailingGame(np.arange(6.0))
    v = TMCShapleyValuation(g, is_done=MaxChecks(50), seed=0, batch_size=1,
                            samples_per_round=8, client=client)
    err, elapsed = _within(60, v.fit)
    assert isinstance(err, UtilityError), repr(err)
    assert "boom" in str(err)
    assert any("raised by the task of samples" in n for n in getattr(err, "__notes__", []))
    assert elapsed < 20, elapsed
    time.sleep(0.5)  # the driver cancelled the other tasks of the run
    assert not any(client.processing().values())


@pytest.mark.parametrize("game, culprit", [(stubs.LockedGame, "job.utility.lock"),
                                           (stubs.MidCallGame, "job.utility.state")])
def test_a_job_that_does_not_pickle_fails_on_the_driver_before_any_task(client, game, culprit):
    from distributed import get_task_stream

    v = TMCShapleyValuation(game(np.arange(5.0)), is_done=MaxChecks(1), seed=0,
                            client=client)
    with get_task_stream(client) as ts:
        err, elapsed = _within(30, v.fit)
    assert isinstance(err, JobSerializationError), repr(err)
    assert culprit in str(err) and "picklable" in str(err)
    assert err.__cause__ is not None  # the pickling error itself is chained
    assert elapsed < 10, elapsed
    assert not [t for t in ts.data if "run_batch" in str(t.get("key", ""))]
    # the same utility runs in this process (nothing to ship)
    assert TMCShapleyValuation(game(np.arange(5.0)), is_done=MaxChecks(1), seed=0,
                               samples_per_round=2).fit().result.n_samples == 2


def test_tasks_no_worker_can_run_raise_a_stall_error_instead_of_waiting(client):
    import dask

    v = TMCShapleyValuation(InteractionGame(np.arange(4.0)), is_done=MaxChecks(1), seed=0,
                            client=client, stall_timeout=1.5)
    def fit():
        with dask.annotate(resources={"GPU": 1}):  # no worker has one: tasks stay "no-worker"
            return v.fit()

    err, elapsed = _within(60, fit)
    assert isinstance(err, ClusterStalledError), repr(err)
    assert "no-worker" in str(err) and "stall_timeout=1.5" in str(err)
    assert 1.5 <= elapsed < 15, elapsed
