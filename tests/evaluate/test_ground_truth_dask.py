"""Ground-truth jobs on a real LocalCluster of 2 worker processes: the same bytes as in process,
tasks spread over both workers, resume of missing chunks, and a worker SIGKILLed mid-run costs
only its task (the run completes with identical bytes)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dvl_ooc.evaluate import GroundTruth, TorchRetrainer, ground_truth
from dvl_ooc.valuation import TrainingConfig

# 8 blocks x 2 seeds = 16 tasks of ~0.1-0.3 s: long enough to kill a worker mid-run
KW = dict(n_subsets=16, n_seeds=2, alpha=0.5, seed=1, subsets_per_task=2, progress=False)
N_TASKS = 16


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="the ground-truth tests") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def retrainer(digits):
    """Only package classes and torch modules: a restarted worker imports nothing from tests."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    return TorchRetrainer(net, (digits.x_train[:200], digits.y_train[:200]),
                          (digits.x_test[:50], digits.y_test[:50]),
                          config=TrainingConfig(epochs=8, batch_size=32, seed=2))


@pytest.fixture(scope="module")
def reference(retrainer, tmp_path_factory):
    """The job in this process (one torch thread per task, as on the workers)."""
    path = tmp_path_factory.mktemp("gt") / "sync.zarr"
    ground_truth(retrainer, path, client="sync", **KW)
    return path


def chunk_files(path: Path) -> dict[str, bytes]:
    root = path / "targets" / "c"
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and not f.name.endswith(".partial")}


def test_dask_run_equals_the_in_process_run_and_resumes_missing_chunks(
        client, retrainer, reference, tmp_path):
    path = tmp_path / "dask.zarr"
    gt = ground_truth(retrainer, path, client=client, **KW)
    ref = chunk_files(reference)
    assert len(ref) == N_TASKS and chunk_files(path) == ref
    assert len({t["worker"] for t in gt.info["tasks"]}) == 2  # both workers trained
    assert all(not t["worker"].startswith("local-") for t in gt.info["tasks"])
    for k in ("0/1/0", "5/0/0", "7/1/0"):
        (path / "targets" / "c" / k).unlink()
    gt = ground_truth(retrainer, path, client=client, **KW)
    assert sorted(gt.info["tasks_run"]) == [(0, 1), (5, 0), (7, 1)]
    assert chunk_files(path) == ref


def _kill_a_busy_worker(client, path: Path, seen: dict) -> None:
    """Once a chunk is written, SIGKILL a worker process that is running a ground-truth task."""
    t0 = time.time()
    while time.time() - t0 < 60:
        try:
            done = len(GroundTruth.open(path).done_tasks())
        except Exception:  # noqa: BLE001 - not created yet
            done = 0
        if done >= 1:
            busy = [w for w, keys in client.processing().items()
                    if any(str(k).startswith("ground-truth-") for k in keys)]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                seen.update(done=done, pid=pid)
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.01)


def test_a_killed_worker_costs_only_its_task(client, retrainer, reference, tmp_path):
    client.wait_for_workers(2)
    path = tmp_path / "killed.zarr"
    seen: dict = {}
    killer = threading.Thread(target=_kill_a_busy_worker, args=(client, path, seen))
    killer.start()
    try:
        gt = ground_truth(retrainer, path, client=client, **KW)
    finally:
        killer.join()
    assert seen, "no worker was killed"
    assert seen["done"] < N_TASKS  # killed mid-run
    assert gt.is_complete and sorted(gt.info["tasks_run"]) == gt.all_tasks()
    assert chunk_files(path) == chunk_files(reference)
    client.wait_for_workers(2)  # the nanny restarted the killed worker


def test_own_cluster_from_n_workers(retrainer, reference, tmp_path):
    kw = {**KW, "n_subsets": 2}  # the first block of the reference job
    gt = ground_truth(retrainer, tmp_path / "own.zarr", n_workers=1, **kw)
    assert gt.is_complete
    assert all(t["worker"].startswith("tcp://") for t in gt.info["tasks"])
    np.testing.assert_array_equal(gt.targets, GroundTruth.open(reference).targets[:2])
