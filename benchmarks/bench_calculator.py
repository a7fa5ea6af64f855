"""Planned tiling vs per-tile brute force on a 2-worker LocalCluster (digits CNN).

Planned (:class:`dvl_ooc.DaskInfluenceCalculator`): test features once per test chunk, train
gradients once per train chunk, a tile is one matrix product.
Brute force (what pyDVL's DaskInfluenceCalculator does): every tile (i, j) recomputes the test
gradients AND their preconditioning (a CG solve for CgInfluence) and the train gradients.

    solves:     planned n_test            brute n_test * c_train
    gradients:  planned n_test + n_train  brute n_test * c_train + n_train * c_test

Both write the same Zarr layout on the same cluster; values are asserted equal.

    python benchmarks/bench_calculator.py            # full: DigitsCNN (6058 params)
    python benchmarks/bench_calculator.py --quick    # small CNN, fewer points
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dvl_ooc import CgInfluence, DaskInfluenceCalculator, DirectInfluence, InfluenceStore
from dvl_ooc.calculator.inputs import _Input
from dvl_ooc.calculator.tasks import _prepared
from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN, train_classifier


def brute_tile(model, token, fit, xy_test, xy_train, path, i, j):
    """pyDVL-style tile: recompute the test factors (a solve) and the train gradients."""
    m = _prepared(model, token, None, fit)
    t0 = time.perf_counter()
    with torch.no_grad():
        T = m.test_features(m.gradients(*xy_test))
        R = m.train_features(m.gradients(*xy_train))
        tile = (T.to(R.dtype) @ R.T).cpu().numpy().astype(np.float32)
    s = InfluenceStore.open(path, mode="r+")
    s.influences[s.tile_slices(i, j)] = tile
    return time.perf_counter() - t0


def run_brute(calc, path, xt, yt, x, y, tc, rc):
    import dask
    from distributed import wait

    m = calc.model
    s = InfluenceStore.create(path, n_test=len(xt), n_train=len(x), test_chunk=tc,
                              train_chunk=rc, method=type(m).__name__, config=m.config(),
                              fingerprint=m.fingerprint(), mode="w")
    model_f, fit_f = calc._ship()
    te, tr = _Input.make(xt, yt, "test"), _Input.make(x, y, "train")
    tb = [(a, min(len(xt), a + tc)) for a in range(0, len(xt), tc)]
    rb = [(a, min(len(x), a + rc)) for a in range(0, len(x), rc)]
    ts, rs = te.remote(calc.client, tb), tr.remote(calc.client, rb)
    tasks = [dask.delayed(brute_tile, pure=False)(model_f, calc._token, fit_f, ts[i], rs[j],
                                                  str(path), i, j)
             for i in range(len(tb)) for j in range(len(rb))]
    futs = calc.client.compute(tasks)
    wait(futs)
    [f.result() for f in futs]
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CNN and few points")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--test-chunk", type=int, default=None)
    ap.add_argument("--train-chunk", type=int, default=None)
    ap.add_argument("--n-fit", type=int, default=None, help="points the curvature is fit on")
    ap.add_argument("--methods", default="cg,direct")
    args = ap.parse_args()
    q = args.quick
    width, hidden = (4, 32) if q else (8, 64)
    n_test = args.n_test or (32 if q else 128)
    n_train = args.n_train or (480 if q else 1200)
    tc = args.test_chunk or (16 if q else 64)
    rc = args.train_chunk or (30 if q else 75)
    n_fit = args.n_fit or (300 if q else 600)

    torch.set_num_threads(2)
    d = load_digits_split(flip_fraction=0.1, seed=0)
    torch.manual_seed(0)
    net = DigitsCNN(width=width, hidden=hidden)
    train_classifier(net, d.x_train, d.y_train, epochs=30, seed=0)
    xfit = torch.as_tensor(d.x_train[:n_fit])
    yfit = torch.as_tensor(d.y_train[:n_fit])
    rng = np.random.default_rng(0)
    # inputs beyond the 1257 digits: jittered copies (only the amount of work matters here)
    idx = rng.integers(0, len(d.x_train), n_train)
    x = (d.x_train[idx] + 0.05 * rng.standard_normal((n_train, 1, 8, 8))).astype(np.float32)
    y = d.y_train[idx]
    xt, yt = d.x_test[:n_test], d.y_test[:n_test]
    p = sum(t.numel() for t in net.parameters())

    t0 = time.perf_counter()
    direct = DirectInfluence(net, F.cross_entropy, regularization=1e-6, hessian="gauss-newton")
    direct.fit((xfit, yfit))
    top = float(direct._state[0]["eigenvalues"].max())
    lam = 1e-2 * top
    direct.regularization = direct._resolve_regularization(lam)
    t_direct_fit = time.perf_counter() - t0
    models = {}
    if "direct" in args.methods:
        models["DirectInfluence"] = direct
    if "cg" in args.methods:
        models["CgInfluence"] = CgInfluence(net, F.cross_entropy, regularization=lam,
                                            hessian="gauss-newton", rtol=1e-7,
                                            max_iter=1000).fit((xfit, yfit))
    print(f"DigitsCNN p={p}, n_fit={n_fit}, lambda={lam:.3g} (1e-2 x top GN eigenvalue; "
          f"Direct fit {t_direct_fit:.1f}s), n_test={n_test}, n_train={n_train}, "
          f"tiles {tc}x{rc} -> {-(-n_test // tc)}x{-(-n_train // rc)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_calc_"))
    rows = []
    from distributed import Client

    from dvl_ooc.runtime import local_cluster

    with local_cluster(2, threads_per_worker=1, what="bench_calculator") as cluster, \
            Client(cluster) as client:
        for name, m in models.items():
            calc = DaskInfluenceCalculator(m, client)
            calc._ship()
            client.run(lambda: None)
            t0 = time.perf_counter()
            s = calc.to_zarr(tmp / f"{name}-planned", xt, yt, x, y, test_chunk=tc,
                             train_chunk=rc, progress=False)
            t_plan = time.perf_counter() - t0
            t0 = time.perf_counter()
            b = run_brute(calc, tmp / f"{name}-brute", xt, yt, x, y, tc, rc)
            t_brute = time.perf_counter() - t0
            a, bb = s.influences[:], b.influences[:]
            err = float(np.linalg.norm(a - bb) / np.linalg.norm(bb))
            assert err <= 1e-5, f"{name}: planned and brute force differ (rel {err:.2e})"
            ref = direct.influences(xt, yt, x, y).numpy()
            err_direct = float(np.linalg.norm(a - ref) / np.linalg.norm(ref))
            rows.append((name, t_plan, t_brute, t_brute / t_plan, err, err_direct))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'method':<16}{'planned s':>11}{'brute s':>10}{'speed-up':>10}"
          f"{'rel diff':>11}{'vs Direct':>11}")
    for name, tp, tb, r, e, ed in rows:
        print(f"{name:<16}{tp:>11.2f}{tb:>10.2f}{r:>9.1f}x{e:>11.1e}{ed:>11.1e}")


if __name__ == "__main__":
    main()
