"""Shipping a large fitted state to the Dask workers: the three ways of
:meth:`dvl_ooc.calculator.dask.DaskInfluenceCalculator._send` against the former single task
literal, timed until every worker holds its prepared model (``_prepared``: loaded or copied).

The state is a Direct model whose eigenvector matrix is replaced by a random ``k x k`` float64
one (``--k 5216``: 218 MB, the ``dvl-ooc images`` default's size); only the shipping is timed.
Rows: ``literal`` (the model as one task literal: Dask's "Sending large graph" warning),
``store`` (written into a store, read by each worker), ``parts`` (literal parts below the
warning threshold, joined by one task). ``warned``: whether Dask's warning was raised.

    python benchmarks/bench_ship_state.py [--k 5216] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence, InfluenceStore
from dvl_ooc.calculator import tasks
from dvl_ooc.calculator.inputs import _hold, _pickled


def _touch(handle, token: str) -> int:
    """On a worker: the prepared model (loaded from the store, or copied from the task)."""
    m = tasks._prepared(handle, token, None, None)
    return int(m._state[0]["eigenvectors"].shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=5216)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    m = DirectInfluence(net, F.cross_entropy, regularization=1e-3)
    m.fit((torch.randn(16, 4), torch.randint(0, 3, (16,))))
    m._state[0]["eigenvectors"] = torch.randn(args.k, args.k, dtype=torch.float64)
    t0 = time.perf_counter()
    size = len(_pickled(m))
    print(f"state: {size / 1e6:.0f} MB pickled in {time.perf_counter() - t0:.2f} s; "
          f"{args.workers} workers")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ship_"))
    with local_cluster(args.workers, threads_per_worker=1, what="bench_ship_state",
                       memory_limit="6GiB") as cluster, Client(cluster) as client:
        calc = DaskInfluenceCalculator(m, client)
        store = InfluenceStore.create(tmp / "s.zarr", n_test=2, n_train=2, test_chunk=2,
                                      train_chunk=2, method="M", config={}, fingerprint="f")
        workers = list(client.scheduler_info()["workers"])
        client.run(lambda: tasks._CACHE.clear())
        rows = []
        for rep in range(args.repeat):
            for how in ("literal", "store", "parts"):
                token = uuid.uuid4().hex
                calc._token = token
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    if how == "literal":
                        h = client.submit(_hold, m, pure=False, key=f"dvl-model-{token}")
                    else:
                        h = calc._send(m, "model", f"bench{rep}",
                                       store.location if how == "store" else None)
                    t_send = time.perf_counter() - t0
                    got = [client.submit(_touch, h, token, workers=[a], pure=False,
                                         allow_other_workers=False) for a in workers]
                    assert all(g.result() == args.k for g in got)
                    t_all = time.perf_counter() - t0
                warned = any("large graph" in str(x.message) for x in w)
                rows.append((rep, how, t_send, t_all, warned))
                print(f"  run {rep} {how:<8} client {t_send:6.2f} s, all workers ready "
                      f"{t_all:6.2f} s, warned {warned}")
                del h, got
                client.run(lambda: tasks._CACHE.clear())
        for how in ("literal", "store", "parts"):
            ts = [r[3] for r in rows if r[1] == how]
            print(f"{how:<8} median until every worker is ready: {np.median(ts):.2f} s")


if __name__ == "__main__":
    main()
