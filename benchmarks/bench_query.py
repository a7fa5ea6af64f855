"""Streaming store queries vs the naive xarray way: time and peak RSS.

Writes a synthetic influence store (``n_test x n_train`` float32, random labels) and measures,
each in a fresh subprocess (its own ``ru_maxrss``):

* ``dvl_ooc.query.query_quantiles(store, 0.25, same_label=True)``: tall strips, one stored
  column band at a time;
* the naive xarray recipe: ``ds.influences.where(test_label == train_label).quantile(0.25,
  dim="test")`` (dask-backed; rechunks the whole matrix);
* ``query_topk(store, 10)`` and ``query_mean(store)``;
* only the imports (the RSS every case starts from).

The quantile results are checked to be equal. Example:

    python benchmarks/bench_query.py --n-test 2000 --n-train 50000 --chunks 500,2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CASES = ("streaming quantile", "xarray where().quantile()", "streaming top-10", "streaming mean",
         "imports only (baseline RSS)")


def make_store(path: str, n_test: int, n_train: int, chunks: tuple[int, int]) -> None:
    import zarr

    from dvl_ooc.store import InfluenceStore

    rng = np.random.default_rng(0)
    s = InfluenceStore.create(
        path, n_test=n_test, n_train=n_train, test_chunk=chunks[0], train_chunk=chunks[1],
        method="Synthetic", config={}, fingerprint="bench",
        test_labels=rng.integers(0, 10, n_test), train_labels=rng.integers(0, 10, n_train),
        mode="w",
    )
    a = zarr.open_array(store=path, path="influences", mode="r+")
    for j in range(0, n_train, chunks[1]):
        e = min(n_train, j + chunks[1])
        a[:, j:e] = rng.standard_normal((n_test, e - j)).astype(np.float32)
    assert s.is_complete


def run_case(case: str, path: str, out: str) -> None:
    import xarray as xr

    from dvl_ooc.query import query_mean, query_quantiles, query_topk

    t = time.perf_counter()
    if case == CASES[0]:
        res = query_quantiles(path, 0.25, same_label=True).values
    elif case == CASES[1]:
        ds = xr.open_zarr(path)
        inf = ds["influences"]
        same = ds["test_label"] == ds["train_label"]
        res = inf.where(same).quantile(0.25, dim="test").values
    elif case == CASES[2]:
        query_topk(path, 10)
        res = None
    elif case == CASES[3]:
        query_mean(path)
        res = None
    else:
        res = None
    dt = time.perf_counter() - t
    if res is not None:
        np.save(out + ".npy", res)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out, "w") as f:
        json.dump({"seconds": dt, "peak_rss_mib": rss}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--chunks", default="250,1000")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        run_case(args.case, args.path, args.result)
        return
    chunks = tuple(int(c) for c in args.chunks.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store.zarr")
        t = time.perf_counter()
        make_store(path, args.n_test, args.n_train, chunks)  # type: ignore[arg-type]
        mib = args.n_test * args.n_train * 4 / 2**20
        print(f"store {args.n_test} x {args.n_train} float32 ({mib:.0f} MiB), chunks {chunks}, "
              f"written in {time.perf_counter() - t:.1f} s")
        rows = []
        for i, case in enumerate(CASES):
            res = os.path.join(tmp, f"r{i}.json")
            subprocess.run([sys.executable, __file__, "--case", case, "--path", path,
                            "--result", res], check=True)
            with open(res) as f:
                rows.append((case, json.load(f)))
        q_stream = np.load(os.path.join(tmp, "r0.json.npy"))
        q_xr = np.load(os.path.join(tmp, "r1.json.npy"))
        equal = np.allclose(q_stream, q_xr, rtol=1e-6, equal_nan=True)
    base = rows[1][1]
    print(f"{'query':<28}{'seconds':>10}{'peak RSS MiB':>14}{'time vs xarray':>16}")
    for case, r in rows:
        print(f"{case:<28}{r['seconds']:>10.2f}{r['peak_rss_mib']:>14.0f}"
              f"{r['seconds'] / base['seconds']:>16.2f}")
    print(f"quantiles equal (streaming vs xarray, rtol 1e-6): {equal}")


if __name__ == "__main__":
    main()
