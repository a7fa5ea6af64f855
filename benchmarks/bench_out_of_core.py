"""Out-of-core: an influence matrix larger than RAM written to Zarr with bounded memory.

Default (full) size: 40,000 test x 200,000 train float32 = 32 GB (29.8 GiB) of influences, with
a low-rank method (ArnoldiInfluence, rank 32, Gauss-Newton curvature of the digits CNN) so that
a tile costs k = 32 multiply-adds per entry. Inputs are Zarr arrays read by the workers
themselves (jittered digits images); the client never holds more than one tile.

Reports: wall time, GB/s written, the split of worker time into features (gradients + projection),
matrix products and Zarr writes, achieved GFLOP/s in the products, peak RSS of the client and of
each worker (target < 4 GiB), and a spot check of random tiles against an in-process computation.

    python benchmarks/bench_out_of_core.py --quick             # ~0.3 GB, minutes on 2 cores
    python benchmarks/bench_out_of_core.py --path /big/disk/s   # full 32 GB (needs the disk)
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
import zarr

from dvl_ooc import DaskInfluenceCalculator
from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN, train_classifier


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _make_inputs(root: Path, d, n: int, chunk: int, seed: int, name: str):
    """Jittered digits images as Zarr arrays (written chunk by chunk, never all in memory)."""
    rng = np.random.default_rng(seed)
    zx = zarr.create_array(str(root / f"{name}_x"), shape=(n, 1, 8, 8), chunks=(chunk, 1, 8, 8),
                           dtype="float32", overwrite=True)
    zy = zarr.create_array(str(root / f"{name}_y"), shape=(n,), chunks=(chunk,), dtype="int64",
                           overwrite=True)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        idx = rng.integers(0, len(d.x_train), e - s)
        zx[s:e] = (d.x_train[idx] + 0.05 * rng.standard_normal((e - s, 1, 8, 8))).astype(
            np.float32)
        zy[s:e] = d.y_train[idx]
    return zx, zy


def _low_rank_model(net, x, y, rank: int):
    try:
        from dvl_ooc.influence.arnoldi import ArnoldiInfluence
    except ImportError:  # pragma: no cover - documented stand-in if Arnoldi is missing
        ArnoldiInfluence = None
    if ArnoldiInfluence is None:
        raise SystemExit("ArnoldiInfluence is not available")
    m = ArnoldiInfluence(net, F.cross_entropy, rank=rank, hessian="gauss-newton",
                         regularization=1e-3)
    m.fit((x, y))
    top = float(max(w.abs().max() for w in m.eigenvalues))
    m2 = ArnoldiInfluence(net, F.cross_entropy, rank=rank, hessian="gauss-newton",
                          regularization=1e-2 * top)
    return m2.fit((x, y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,048 x 40,960 (0.34 GB)")
    ap.add_argument("--n-test", type=int, default=40_000)
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--test-chunk", type=int, default=4096)
    ap.add_argument("--train-chunk", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compressor", default="none", help="none | lz4 | zstd")
    ap.add_argument("--path", default=None, help="store path (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n_test, args.n_train, args.test_chunk, args.train_chunk = 2048, 40_960, 1024, 4096

    torch.set_num_threads(2)
    d = load_digits_split(flip_fraction=0.1, seed=0)
    torch.manual_seed(0)
    net = DigitsCNN()
    train_classifier(net, d.x_train, d.y_train, epochs=20, seed=0)
    t0 = time.perf_counter()
    model = _low_rank_model(net, torch.as_tensor(d.x_train), torch.as_tensor(d.y_train),
                            args.rank)
    t_fit = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="bench_ooc_"))
    path = Path(args.path) if args.path else tmp / "influences.zarr"
    xt, yt = _make_inputs(tmp, d, args.n_test, args.test_chunk, 1, "test")
    x, y = _make_inputs(tmp, d, args.n_train, args.train_chunk, 2, "train")
    nbytes = args.n_test * args.n_train * 4
    ram = psutil.virtual_memory().total
    p = sum(t.numel() for t in net.parameters())
    print(f"{type(model).__name__} rank {args.rank} on DigitsCNN (p={p}), fit {t_fit:.1f}s; "
          f"matrix {args.n_test} x {args.n_train} float32 = {nbytes / 2**30:.2f} GiB "
          f"(RAM {ram / 2**30:.1f} GiB: {'larger' if nbytes > ram else 'smaller'} than RAM); "
          f"tiles {args.test_chunk} x {args.train_chunk}, {args.workers} workers x 1 thread")

    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(args.workers, threads_per_worker=1, what="bench_out_of_core") as cluster, \
            Client(cluster) as client:
        calc = DaskInfluenceCalculator(model, client)
        t0 = time.perf_counter()
        store = calc.to_zarr(path, xt, yt, x, y, test_chunk=args.test_chunk,
                             train_chunk=args.train_chunk, progress=args.progress,
                             compressor=args.compressor, mode="w")
        wall = time.perf_counter() - t0
        worker_rss = client.run(_peak_rss_gib)
    stats = calc.info["columns"]
    t_feat = sum(s["t_features"] for s in stats)
    t_mm = sum(s["t_matmul"] for s in stats)
    t_wr = sum(s["t_write"] for s in stats)
    busy = t_feat + t_mm + t_wr
    assert store.is_complete
    # spot check: random tiles against an in-process computation of the same features
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3):
        i, j = (int(rng.integers(0, g)) for g in store.grid)
        ri, rj = store.tile_slices(i, j)
        with torch.no_grad():
            T = model.test_features(model.gradients(xt[ri], yt[ri]))
            R = model.train_features(model.gradients(x[rj], y[rj]))
            ref = (T.to(R.dtype) @ R.T).numpy()
        got = store.influences[ri, rj]
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    assert worst < 1e-4, worst
    flops = 2.0 * args.n_test * args.n_train * (model.train_features(
        torch.zeros(1, p)).shape[1])
    print(f"{'wall s':>9}{'GB/s':>8}{'features':>10}{'matmul':>9}{'write':>8}"
          f"{'GFLOP/s':>9}{'client GiB':>12}{'worker GiB (peak)':>20}")
    wr = ", ".join(f"{v:.2f}" for v in worker_rss.values())
    print(f"{wall:>9.1f}{nbytes / wall / 1e9:>8.3f}{t_feat / busy:>10.1%}{t_mm / busy:>9.1%}"
          f"{t_wr / busy:>8.1%}{flops / max(t_mm, 1e-9) / 1e9:>9.1f}{_peak_rss_gib():>12.2f}"
          f"{wr:>20}")
    print(f"(worker time: features {t_feat:.1f}s, matmul {t_mm:.1f}s, write {t_wr:.1f}s over "
          f"{len(stats)} column tasks, {store.n_tiles} tiles; spot-check max rel err {worst:.1e})")
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
