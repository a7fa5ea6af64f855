"""Influence matrices on GPUs: one ``LocalCUDACluster`` worker per GPU, or any Dask cluster.

Needs a machine with NVIDIA GPUs and ``pip install 'dask-cuda[cu12]'`` (the extra must match
torch's CUDA major version: ``[cu13]`` for CUDA 13 builds of torch). Not run in CI.

    python examples/gpu_cluster.py --out gpu_out                 # all local GPUs
    python examples/gpu_cluster.py --scheduler tcp://host:8786   # an existing Dask cluster

How it works: the fitted influence model (data-free state: weights and curvature factors) is
scattered once to every worker; with ``cluster="cuda"`` each worker moves it once to its own GPU
(inside a ``LocalCUDACluster`` worker that GPU is always ``cuda:0``), computes its tiles there
and writes them to the shared Zarr store as NumPy. The store path must be visible to every
worker (a local disk for a single machine, a shared file system for several machines).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence
from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN, train_classifier
from dvl_ooc.query import query_quantiles, query_topk


def main() -> None:
    ap = argparse.ArgumentParser(description="influence matrix on GPU workers")
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--scheduler", help="address of an existing Dask scheduler")
    ap.add_argument("--n-workers", type=int, default=None, help="GPUs to use (default: all)")
    args = ap.parse_args()

    d = load_digits_split(flip_fraction=0.1)
    model = train_classifier(DigitsCNN(), d.x_train, d.y_train, epochs=30)
    inf = DirectInfluence(model, F.cross_entropy, regularization=0.1, hessian="gauss-newton")
    inf.fit((torch.as_tensor(d.x_train), torch.as_tensor(d.y_train)))

    if args.scheduler:  # an existing cluster (GPU workers started with dask-cuda-worker)
        from distributed import Client

        calc = DaskInfluenceCalculator(inf, Client(args.scheduler), device="cuda")
    else:  # one worker per local GPU, closed with the calculator
        calc = DaskInfluenceCalculator(inf, cluster="cuda", n_workers=args.n_workers)
    with calc:
        print("dashboard:", calc.dashboard_link)
        store = calc.to_zarr(Path(args.out) / "influences.zarr", d.x_test, d.y_test,
                             d.x_train, d.y_train, test_chunk=540, train_chunk=256,
                             self_influence=True)
    print(store)
    q = query_quantiles(store, [0.1, 0.25], same_label=True)
    print("lowest same-label 25th percentiles:",
          q.sel(quantile=0.25).sortby(q.sel(quantile=0.25)).train.values[:10])
    print(query_topk(store, 3).isel(test=slice(0, 3)))


if __name__ == "__main__":
    main()
