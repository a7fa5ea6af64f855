"""The Dask calculator on ``dask_cuda.LocalCUDACluster`` (one GPU per worker): correctness
against the CPU sequential store, then a larger matrix with achieved TFLOP/s in the tiles.

    python benchmarks/gpu_cluster_check.py [--n-test 20000 --n-train 100000]
    python benchmarks/gpu_cluster_check.py --dry-run --n-test 1024 --n-train 4096  # no GPU

Needs a GPU, torch with CUDA and ``dask-cuda`` (``pip install 'dvl-ooc[cuda]'``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence, SequentialInfluenceCalculator
from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN, train_classifier


def _jitter(d, n: int, seed: int):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d.x_train), n)
    x = (d.x_train[idx] + 0.05 * rng.standard_normal((n, 1, 8, 8))).astype(np.float32)
    return x, d.y_train[idx]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--test-chunk", type=int, default=4096)
    ap.add_argument("--train-chunk", type=int, default=8192)
    ap.add_argument("--dry-run", action="store_true",
                    help="a CPU LocalCluster of 2 workers in place of the GPUs (checks the script)")
    a = ap.parse_args()
    assert a.dry_run or torch.cuda.is_available(), "needs a GPU"
    tmp = Path(tempfile.mkdtemp())
    d = load_digits_split(seed=0)
    torch.manual_seed(0)
    net = train_classifier(DigitsCNN(), d.x_train, d.y_train, epochs=30)
    t0 = time.perf_counter()
    inf = DirectInfluence(net, F.cross_entropy, regularization=1e-2, hessian="gauss-newton")
    inf.fit((d.x_train, d.y_train))
    print(f"Direct (GN) fit on CPU: {time.perf_counter() - t0:.1f} s, "
          f"{inf.grads.num_params} parameters")

    with DaskInfluenceCalculator(inf, cluster="local" if a.dry_run else "cuda") as calc:
        print(f"LocalCUDACluster workers: {len(calc.client.scheduler_info()['workers'])}, "
              f"device {calc.device}")
        t0 = time.perf_counter()
        gpu = calc.to_zarr(tmp / "gpu", d.x_test, d.y_test, d.x_train, d.y_train,
                           test_chunk=128, train_chunk=256, progress=False, self_influence=True)
        t_gpu = time.perf_counter() - t0
        t0 = time.perf_counter()
        cpu = SequentialInfluenceCalculator(inf).to_zarr(
            tmp / "cpu", d.x_test, d.y_test, d.x_train, d.y_train, test_chunk=128,
            train_chunk=256, progress=False, self_influence=True)
        t_cpu = time.perf_counter() - t0
        A, B = gpu.influences[:], cpu.influences[:]
        err = np.linalg.norm(A - B) / np.linalg.norm(B)
        serr = np.linalg.norm(gpu.self_influence[:] - cpu.self_influence[:]) / np.linalg.norm(
            cpu.self_influence[:])
        print(f"540 x 1257 digits store: GPU cluster {t_gpu:.2f} s, CPU sequential {t_cpu:.2f} s"
              f", rel. difference {err:.2e} (self-influence {serr:.2e}), complete "
              f"{gpu.is_complete}")

        xt, yt = _jitter(d, a.n_test, 1)
        x, y = _jitter(d, a.n_train, 2)
        t0 = time.perf_counter()
        big = calc.to_zarr(tmp / "big", xt, yt, x, y, test_chunk=a.test_chunk,
                           train_chunk=a.train_chunk, progress=False)
        wall = time.perf_counter() - t0
        stats = calc.info["columns"]
        p = inf.grads.num_params
        flops = 2.0 * a.n_test * a.n_train * p
        t_mm = sum(s["t_matmul"] for s in stats)
        t_feat = sum(s["t_features"] for s in stats)
        t_wr = sum(s["t_write"] for s in stats)
        gb = a.n_test * a.n_train * 4 / 1e9
        print(f"{a.n_test} x {a.n_train} float32 ({gb:.1f} GB), feature dim {p}: wall {wall:.1f} s"
              f", {gb / wall:.2f} GB/s; worker time: features {t_feat:.1f} s, tile products "
              f"{t_mm:.2f} s ({flops / t_mm / 1e12:.1f} TFLOP/s incl. transfer to host), "
              f"writes {t_wr:.1f} s; complete {big.is_complete}")
        i, j = min(3, (a.n_test - 1) // a.test_chunk), min(7, (a.n_train - 1) // a.train_chunk)
        rs, cs = big.tile_slices(i, j)
        ref = inf.influences(xt[rs][:64], yt[rs][:64], x[cs][:64], y[cs][:64]).numpy()
        got = big.influences[rs.start:rs.start + 64, cs.start:cs.start + 64]
        print(f"spot check tile ({i},{j}) vs in-memory CPU: rel. error "
              f"{np.linalg.norm(got - ref) / np.linalg.norm(ref):.2e}")


if __name__ == "__main__":
    main()
