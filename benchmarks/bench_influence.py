"""Influence models on the digits CNN: fit time, 540 x 1257 matrix time, peak RSS, error vs Direct.

Each measurement runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own.
Settings that keep one run within minutes on 2 cores: CG to rtol 1e-4 (max_iter 300), LiSSA
with stochastic batches of 256 and max_iter 200 (far from converged at small λ: it shows the cost
of iterative solvers with many right-hand sides, which the calculator pays once per test point).
Curvature: Gauss-Newton for every method (EK-FAC only supports it; CG/Nyström need a PSD
matrix), λ = ``--rel-reg`` × the top eigenvalue (read from Direct's fit).

    python benchmarks/bench_influence.py                 # all methods + Direct memory sweep
    python benchmarks/bench_influence.py --methods direct,arnoldi --batch-sizes 32,256

Target (issue 2): DirectInfluence on the ~6k-parameter CNN fits with peak RSS < 2 GiB whatever
the DataLoader batch size (pyDVL's DirectInfluence was killed at 24 GiB with batch 256).
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

HERE = os.path.dirname(os.path.abspath(__file__))


def _setup(seed: int = 0):
    import torch

    from dvl_ooc.demo.datasets import load_digits_split
    from dvl_ooc.demo.nets import DigitsCNN, accuracy, train_classifier

    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    d = load_digits_split(flip_fraction=0.0, seed=seed)
    model = DigitsCNN()
    train_classifier(model, d.x_train, d.y_train, epochs=40, seed=seed)
    return model, d, accuracy(model, d.x_test, d.y_test)


def _make(method: str, model, reg: float):
    import torch.nn.functional as F

    import dvl_ooc

    loss = F.cross_entropy
    common = dict(regularization=reg, hessian="gauss-newton")
    if method == "direct":
        return dvl_ooc.DirectInfluence(model, loss, **common)
    if method == "cg":
        return dvl_ooc.CgInfluence(model, loss, rtol=1e-4, max_iter=300, **common)
    if method == "cg-nystroem":
        return dvl_ooc.CgInfluence(model, loss, preconditioner="nystroem", rtol=1e-4,
                                   max_iter=300, **common)
    if method == "lissa":
        return dvl_ooc.LissaInfluence(model, loss, max_iter=200, batch_size=256, rtol=None,
                                      **common)
    if method == "arnoldi":
        return dvl_ooc.ArnoldiInfluence(model, loss, rank=64, **common)
    if method == "nystroem":
        return dvl_ooc.NystroemSketchInfluence(model, loss, rank=256, **common)
    if method == "ekfac":
        return dvl_ooc.EkfacInfluence(model, loss, **common)
    raise SystemExit(f"unknown method {method}")


def run_one(method: str, reg: float, batch_size: int, out: str) -> dict:
    """One method in this process: fit on a DataLoader of ``batch_size``, then 540 x 1257."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    model, d, acc = _setup()
    loader = DataLoader(
        TensorDataset(torch.as_tensor(d.x_train), torch.as_tensor(d.y_train)),
        batch_size=batch_size,
    )
    inf = _make(method, model, reg)
    t0 = time.perf_counter()
    inf.fit(loader)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    I = inf.influences(d.x_test, d.y_test, d.x_train, d.y_train).detach().cpu().numpy()
    t_inf = time.perf_counter() - t0
    np.save(out, I.astype(np.float64))
    res = {
        "method": method,
        "batch_size": batch_size,
        "fit_s": t_fit,
        "influences_s": t_inf,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "params": inf.grads.num_params,
        "test_acc": acc,
    }
    if method == "direct":
        res["top_eig"] = float(inf.state()["blocks"][0]["eigenvalues"][-1])
    return res


def _sub(method: str, reg: float, batch_size: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--reg", repr(reg),
           "--batch-size", str(batch_size), "--npy", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"method": method, "batch_size": batch_size, "error": p.stderr.strip()[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    return float(pearsonr(a.ravel(), b.ravel())[0]), float(spearmanr(a.ravel(), b.ravel())[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="direct,cg,cg-nystroem,lissa,arnoldi,nystroem,ekfac")
    ap.add_argument("--rel-reg", type=float, default=1e-3)
    ap.add_argument("--batch-sizes", default="32,256,1257",
                    help="DataLoader batch sizes for the Direct memory sweep")
    ap.add_argument("--one")
    ap.add_argument("--reg", type=float)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--npy")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.reg, a.batch_size, a.npy)))
        return

    tmp = tempfile.mkdtemp()
    # Direct first with a provisional λ to read the spectrum, then everything at rel-reg * top
    probe = _sub("direct", 1e-3, 256, os.path.join(tmp, "probe.npy"))
    if "error" in probe:
        raise SystemExit(f"direct failed: {probe['error']}")
    reg = a.rel_reg * probe["top_eig"]
    print(f"digits CNN: {probe['params']} parameters, test accuracy {probe['test_acc']:.3f}, "
          f"top GN eigenvalue {probe['top_eig']:.4g}, λ = {reg:.4g} ({a.rel_reg:g} × top)\n")

    rows = []
    ref_path = os.path.join(tmp, "direct.npy")
    rows.append(_sub("direct", reg, 256, ref_path))
    ref = np.load(ref_path)
    for m in a.methods.split(","):
        if m == "direct":
            continue
        path = os.path.join(tmp, f"{m}.npy")
        r = _sub(m, reg, 256, path)
        if "error" not in r:
            I = np.load(path)
            r["rel_err"] = float(np.linalg.norm(I - ref) / np.linalg.norm(ref))
            r["pearson"], r["spearman"] = _corr(I, ref)
        rows.append(r)
    rows[0].update(rel_err=0.0, pearson=1.0, spearman=1.0)

    hdr = (f"{'method':<12} {'fit s':>8} {'540x1257 s':>11} {'peak RSS GiB':>13} "
           f"{'rel err':>9} {'pearson':>8} {'spearman':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<12} ERROR {r['error']}")
            continue
        print(f"{r['method']:<12} {r['fit_s']:>8.2f} {r['influences_s']:>11.2f} "
              f"{r['peak_rss_gib']:>13.2f} {r['rel_err']:>9.2e} {r['pearson']:>8.4f} "
              f"{r['spearman']:>9.4f}")

    print("\nDirectInfluence peak RSS by DataLoader batch size (target < 2 GiB):")
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        r = _sub("direct", reg, bs, os.path.join(tmp, f"d{bs}.npy"))
        if "error" in r:
            print(f"  batch {bs:>5}: ERROR {r['error']}")
        else:
            print(f"  batch {bs:>5}: fit {r['fit_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
