"""Valuation on a real Dask LocalCluster (2 worker processes): identical to the sequential run.

Each method's batch function is pickled by reference and run by spawned workers."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from dvl_ooc.valuation import (
    CombinatorialShapleyValuation,
    MaxChecks,
    ModelUtility,
    MSRBanzhafValuation,
    RelativeTruncation,
    TMCShapleyValuation,
)

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the valuation tests") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def small_problem(digits):
    x = digits.x_train[:10].reshape(10, -1)
    y = digits.y_train[:10]
    return x, y, digits.x_test[:80].reshape(-1, 64), digits.y_test[:80]


def test_tmc_and_msr_on_two_workers_are_bit_identical_to_sequential(client, small_problem):
    x, y, xt, yt = small_problem
    u = ModelUtility(LogisticRegression(max_iter=100), test_data=(xt, yt), cache_size=2048)
    kw = dict(seed=5, batch_size=2, samples_per_round=8)
    seq = TMCShapleyValuation(u, RelativeTruncation(0.05, 0.3), is_done=MaxChecks(2), **kw)
    par = TMCShapleyValuation(u, RelativeTruncation(0.05, 0.3), is_done=MaxChecks(2),
                              client=client, **kw)
    from distributed import get_task_stream

    a = seq.fit(x, y).result
    with get_task_stream(client) as ts:
        b = par.fit(x, y).result
    # 16 permutations in tasks of 2 -> 8 tasks (keys "run_batch-<token>-<start>-<stop>"),
    # spread over both worker processes; tasks submitted ahead past the stop are discarded
    batches = [t for t in ts.data if "run_batch" in str(t.get("key", ""))
               and int(str(t["key"]).split("-")[-2]) < 16]
    assert len(batches) == 8
    assert len({t["worker"] for t in batches}) == 2
    assert set(par.info) == {"setup_s", "sampling_s", "total_s"}
    assert par.info["sampling_s"] > 0
    assert a.n_samples == b.n_samples == 16
    assert a.evaluations == b.evaluations
    assert np.array_equal(a.values, b.values) and np.array_equal(a.variances, b.variances)
    assert np.abs(a.values).sum() > 0
    kw = dict(seed=6, batch_size=16, samples_per_round=64)
    m_seq = MSRBanzhafValuation(u, is_done=MaxChecks(1), **kw).fit(x, y).result
    m_par = MSRBanzhafValuation(u, is_done=MaxChecks(1), client=client, **kw).fit(x, y).result
    assert np.array_equal(m_seq.values, m_par.values)
    assert np.array_equal(m_seq.stderr, m_par.stderr)
    kw = dict(seed=7, batch_size=4, samples_per_round=8)  # combinatorial MC likewise
    c_seq = CombinatorialShapleyValuation(u, is_done=MaxChecks(1), **kw).fit(x[:6], y[:6])
    c_par = CombinatorialShapleyValuation(u, is_done=MaxChecks(1), client=client, **kw)
    c_par.fit(x[:6], y[:6])
    assert np.array_equal(c_seq.result.values, c_par.result.values)
    assert c_par.result.evaluations == 8 * 7


def test_own_local_cluster_is_started_and_closed(small_problem):
    from dvl_ooc.valuation import InteractionGame

    g = InteractionGame(np.arange(5.0), noise=0.1)
    kw = dict(seed=1, batch_size=4, samples_per_round=16)
    seq = TMCShapleyValuation(g, is_done=MaxChecks(1), **kw).fit().result
    par = TMCShapleyValuation(g, is_done=MaxChecks(1), n_workers=2, **kw).fit().result
    assert np.array_equal(seq.values, par.values)


def test_maxtime_on_two_workers_stops_within_one_task_and_keeps_a_reproducible_prefix(client):
    import importlib

    import cloudpickle
    import valuation_stub_games as stubs

    from dvl_ooc.valuation import InteractionGame, MaxTime

    cloudpickle.register_pickle_by_value(stubs)  # spawned workers cannot import test modules
    client.run(importlib.import_module, "dvl_ooc.valuation")  # warm workers: not timed here
    w = np.array([0.5, -1.0, 2.0, 0.25, 1.5])
    task_s = 5 * 0.04  # one permutation per task, 0.04 s per coalition
    v = TMCShapleyValuation(stubs.SlowGame(w, delay=0.04), is_done=MaxTime(1.5), seed=2,
                            batch_size=1, samples_per_round=1000, client=client)
    t0 = time.perf_counter()
    res = v.fit().result
    elapsed = time.perf_counter() - t0
    assert elapsed <= 1.5 + task_s + 1.0, elapsed  # a round would take 100 s
    assert 0 < res.n_samples < 1000 and res.evaluations == 2 + 5 * res.n_samples
    ref = TMCShapleyValuation(InteractionGame(w), is_done=MaxChecks(1), seed=2, batch_size=1,
                              samples_per_round=res.n_samples).fit().result
    assert np.array_equal(res.values, ref.values) and np.array_equal(res.stderr, ref.stderr)


def test_cancelled_tasks_stop_at_their_next_evaluation(client, tmp_path):
    # Dask cannot interrupt a running task: tasks the driver cancels when the valuation stops
    # (the next round's, started speculatively) used to run to their end, keeping the workers
    # busy and cluster.close() waiting. Batches now check between evaluations and stop.
    import importlib

    import cloudpickle
    import valuation_stub_games as stubs

    cloudpickle.register_pickle_by_value(stubs)
    client.run(importlib.import_module, "dvl_ooc.valuation")
    log = tmp_path / "calls.txt"
    w = np.array([0.5, -1.0, 2.0, 0.25, 1.5])
    # tasks of 2 permutations: 5 lockstep calls of 2 coalitions x 0.3 s = 3 s each; a round is
    # the two tasks of the first window, the next two start as soon as the workers are free
    game = stubs.LoggedSlowGame(w, delay=0.3, path=str(log))
    v = TMCShapleyValuation(game, is_done=MaxChecks(1), seed=4, batch_size=2,
                            samples_per_round=4, client=client)
    res = v.fit().result
    t_end = time.time()
    assert res.n_samples == 4
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the workers go idle within one evaluation (0.6 s)
        busy = sum(client.run(lambda dask_worker: len(dask_worker.state.executing)).values())
        if not busy:
            break
        time.sleep(0.05)
    idle_after = time.time() - t_end
    time.sleep(1.0)  # a task that kept running would go on logging calls
    late = [t for t in map(float, log.read_text().split()) if t > t_end + 0.05]
    assert idle_after < 2.0, idle_after  # a cancelled task ran on (3 s per task)
    assert len(late) <= 2, late  # at most the evaluation in progress, one per worker


def _malloc_env():
    import os

    return os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_workers_start_with_large_malloc_thresholds(client):
    # Dask sets MALLOC_TRIM_THRESHOLD_=65536, which freezes glibc's mmap threshold at 128 KiB
    # and trims the heap after every step (torch training ~30 % slower in workers); the module
    # cluster is not the first of this test process, so Dask's leaked 65536 is replaced too
    envs = set(client.run(_malloc_env).values())
    assert envs == {(str(32 << 20), str(64 << 20))}


def test_workers_added_by_scale_get_the_malloc_settings_too(client):
    # the settings travel in the cluster's worker spec (not only in the environment while the
    # cluster is created), so a worker started later by cluster.scale() has them as well
    cluster = client.cluster
    first = set(client.run(_malloc_env))
    cluster.scale(3)
    try:
        client.wait_for_workers(3, timeout=60)
        envs = client.run(_malloc_env)
        assert len(envs) == 3 and set(envs) > first
        assert set(envs.values()) == {(str(32 << 20), str(64 << 20))}
    finally:
        cluster.scale(2)
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)


def test_a_user_malloc_setting_wins_and_the_environment_is_restored(monkeypatch):
    import os

    import dask

    from dvl_ooc.runtime import _chosen_malloc_env, _worker_malloc_env

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what Dask leaves behind
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    chosen = _chosen_malloc_env()
    assert chosen == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                      "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
    with _worker_malloc_env(chosen):  # the path of a user's own worker_class
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(64 << 20)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")  # the user's own value
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": "1"}):
        assert _chosen_malloc_env() == {}
