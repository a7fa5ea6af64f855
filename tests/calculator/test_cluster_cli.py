"""A cluster started the way a multi-machine user starts one: a ``dask scheduler`` process and a
``dask worker`` process (2 worker processes) launched as separate commands and connected by
address (not ``LocalCluster``), the store on a real S3 server (moto on 127.0.0.1); the result
equals the sequential calculator's on local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dvl_ooc import (
    DaskInfluenceCalculator,
    DirectInfluence,
    InfluenceStore,
    SequentialInfluenceCalculator,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from s3_server import s3_server  # noqa: E402

DASK = Path(sys.executable).with_name("dask")  # the entry point of this environment


def _dask_cli(*args: str) -> list[str]:
    if not DASK.exists():
        pytest.skip(f"no dask command next to {sys.executable}")
    return [str(DASK), *args]


def _start(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               DASK_DISTRIBUTED__WORKER__DAEMON="False")
    # a new session: the worker's nanny processes are killed with it (os.killpg)
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=cwd,
                            env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # leftovers of the group (the nanny's worker processes)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:  # being written
                pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no scheduler file after {timeout} s:\n{log.read_text()}")


def test_scheduler_and_workers_from_the_command_line_write_to_s3(linear_problem, tmp_path):
    from distributed import Client

    p = linear_problem
    m = DirectInfluence(p.model, p.loss, regularization=p.small_reg(1e-3), hessian="exact")
    m.fit((p.x_train, p.y_train))
    data = (p.x_test.numpy(), p.y_test.numpy(), p.x_train.numpy(), p.y_train.numpy())
    kw = dict(test_chunk=16, train_chunk=64, self_influence=True, progress=False)
    ref = SequentialInfluenceCalculator(m).to_zarr(tmp_path / "seq", *data, **kw)

    sched_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []
    with s3_server() as s3:
        try:
            procs.append(_start(_dask_cli("scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--no-dashboard", "--scheduler-file", str(sched_file)),
                                tmp_path / "scheduler.log", tmp_path))
            address = _wait_for_file(sched_file, procs[0], tmp_path / "scheduler.log")["address"]
            # what a second machine runs: the scheduler's address, nothing else shared
            procs.append(_start(_dask_cli("worker", address, "--nworkers", "2", "--nthreads", "1",
                                          "--no-dashboard", "--memory-limit", "2GiB"),
                                tmp_path / "worker.log", tmp_path))
            with Client(address, timeout=60) as client:
                client.wait_for_workers(2, timeout=90)
                calc = DaskInfluenceCalculator(m, client)
                url = s3.url("cli-run.zarr")
                store = calc.to_zarr(url, *data, storage_options=s3.storage_options, **kw)
                pids = {st["pid"] for st in calc.info["columns"]}
                assert len(pids) == 2 and os.getpid() not in pids  # both worker processes
                # a rerun resumes: nothing left to compute
                calc.to_zarr(url, *data, storage_options=s3.storage_options, **kw)
                assert calc.info["columns"] == []
            back = InfluenceStore.open(url, storage_options=s3.storage_options)
            assert back.is_complete and back.n_tiles == ref.n_tiles == 3 * 5
            assert store.done_tiles() == ref.done_tiles()
            a, b = back.influences[:], ref.influences[:]
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
            np.testing.assert_allclose(back.self_influence[:], ref.self_influence[:], rtol=1e-5)
        finally:
            for proc in reversed(procs):
                _stop(proc)
    assert all(proc.poll() is not None for proc in procs)
