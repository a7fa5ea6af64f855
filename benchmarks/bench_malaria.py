"""Malaria-scale benchmark: the ``dvl-ooc images`` recipe on a 27,558-image folder.

    python benchmarks/bench_malaria.py --root /tmp/malaria --out /tmp/bench_malaria \\
        --width 20 --epochs 6 --runs direct:k=16 direct:k=32 ekfac:rank=32 nystroem:rank=256

* ``--root`` is generated (synthetic malaria layout, :mod:`dvl_ooc.demo.malaria`, no flips in
  the folder) when it does not exist (``--n`` images);
* 80/20 stratified split, ``--flip-train`` (default 10 %) of the training labels flipped;
* the first run trains the ResNet18 (``--width``: 20 ~ 1.1 M parameters); the others load its
  checkpoint (same network, so the methods are compared on one model);
* every run is a separate ``dvl-ooc images`` process (clean peak-RSS numbers per run) with
  ``--workers`` Dask workers (``--cluster cuda``: one GPU per worker, unchanged otherwise);
* per run: seconds per stage (decode, train, fit, matrix, query), fit+matrix+query, peak RSS of
  the client and of every worker, bytes written, flipped labels among the lowest 10/15/20 %;
* ``--agreement NTEST NTRAIN``: on a subset, compressed vs uncompressed answers of the same
  method where the uncompressed one fits (EK-FAC test-factor rank vs full; projected Direct vs
  exact Direct on the layers where p is small) - Pearson, Spearman and relative error.

Targets (issue 11, 2-core machine, >= 1 M parameters): fit + matrix + query <= 30 min for the
fastest method, peak RSS < 4 GiB per process, >= 80 % of the flipped labels in the lowest 20 %.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GIB = 1 << 30


def _run_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"ekfac:rank=32"`` -> ``("ekfac", {"rank": "32"})``."""
    method, *opts = spec.split(":")
    kv = dict(o.split("=", 1) for o in opts)
    return method, kv


def _tag(spec: str) -> str:
    return spec.replace(":", "_").replace("=", "")


def _reuse_decoded(first: Path, out: Path) -> None:
    """Start ``out`` with the split and the decoded cache of ``first`` (same options, so the
    recipe's stage keys match and it skips both stages)."""
    import shutil

    if (out / "job.json").exists() or not (first / "job.json").exists():
        return
    state = json.loads((first / "job.json").read_text())
    stages = {k: v for k, v in state["stages"].items() if k in ("split", "decode")}
    if set(stages) != {"split", "decode"}:
        return
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(first / "data.zarr", out / "data.zarr")
    shutil.copy(first / "split.json", out / "split.json")
    (out / "job.json").write_text(json.dumps({"stages": stages}))


def run_one(args: argparse.Namespace, spec: str, checkpoint: Path | None,
            first: Path | None = None) -> dict[str, Any]:
    method, kv = _run_spec(spec)
    out = Path(args.out) / _tag(spec)
    if first is not None and first != out:
        _reuse_decoded(first, out)
    cmd = [sys.executable, "-m", "dvl_ooc.cli", "images", str(args.root), "--out", str(out),
           "--size", str(args.size), "--width", str(args.width), "--epochs", str(args.epochs),
           "--flip-train", str(args.flip_train), "--seed", str(args.seed), "--method", method,
           "--workers", str(args.workers), "--cluster", args.cluster, "--no-progress"]
    for key, value in kv.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    if args.fit_samples:
        cmd += ["--fit-samples", str(args.fit_samples)]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        return {"spec": spec, "error": f"exit status {res.returncode}", "wall": wall}
    rep = json.loads((out / "report.json").read_text())
    rep["spec"], rep["wall"] = spec, wall
    return rep


def _row(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [r["spec"], r["error"]] + [""] * 11
    s, mem = r["seconds"], r["memory"]
    det = (r.get("detection") or {}).get("lowest same-label 25th percentile", {})
    fmq = s.get("fit", 0) + s.get("matrix", 0) + s.get("query", 0)
    wk = max(mem["workers_peak_rss"].values()) if mem["workers_peak_rss"] else 0
    return [r["spec"], f"{r['model']['parameters']:,}",
            "/".join(str(k) for k in r["influence"]["feature_dims"]),
            *(f"{s.get(k, 0):.0f}" for k in ("decode", "train", "fit", "matrix", "query")),
            f"{fmq / 60:.1f}", f"{mem['client_peak_rss'] / GIB:.2f}", f"{wk / GIB:.2f}",
            f"{r['store_bytes'] / GIB:.2f}",
            " / ".join(f"{100 * det[k]['recall']:.0f}%" for k in ("10%", "15%", "20%"))
            if det else "-"]


def table(rows: list[dict[str, Any]]) -> str:
    head = ["run", "params", "k test/train", "decode s", "train s", "fit s", "matrix s",
            "query s", "fit+mat+q min", "client GiB", "worker GiB", "store GiB",
            "flipped in low 10/15/20%"]
    cells = [head] + [_row(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].rjust(w[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


# --------------------------------------------------------------------------- agreement
def _corr(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    a, b = a.ravel(), b.ravel()
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0]),
            "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def agreement(args: argparse.Namespace, first: Path) -> list[tuple[str, dict[str, float]]]:
    """Compressed vs uncompressed answers on ``NTEST x NTRAIN`` points of the first run."""
    import torch
    import torch.nn.functional as F
    import zarr

    from dvl_ooc import DirectInfluence, EkfacInfluence
    from dvl_ooc.influence import Relative

    torch.set_num_threads(2)
    n_te, n_tr = args.agreement
    model = torch.load(first / "model.pt", weights_only=False).eval()
    split = json.loads((first / "split.json").read_text())
    g = zarr.open_group(str(first / "data.zarr"), mode="r")
    xt = torch.as_tensor(np.asarray(g["x_test"][:n_te]), dtype=torch.float32)
    xr = torch.as_tensor(np.asarray(g["x_train"][:n_tr]), dtype=torch.float32)
    yt = torch.as_tensor(split["y_test"][:n_te])
    yr = torch.as_tensor(split["y_train"][:n_tr])
    out = []

    # EK-FAC: compressed test factors vs the full preconditioned gradient (whole network)
    t = time.perf_counter()
    damp = Relative(args.damping, of="top")
    full = EkfacInfluence(model, F.cross_entropy, layers="supported", regularization=damp,
                          micro_batch_size=32).fit((xr, yr))
    ref = full.influences(xt, yt, xr, yr).numpy()
    print(f"  EK-FAC uncompressed on {n_te} x {n_tr}: {time.perf_counter() - t:.0f} s",
          flush=True)
    for r in args.agreement_ranks:
        m = EkfacInfluence(model, F.cross_entropy, layers="supported", regularization=damp,
                           rank=r, micro_batch_size=32)
        m.load_state(full.state())
        T = m.test_features(m.gradients(xt, yt))
        est = m.tile(T, m.train_features(m.gradients(xr, yr))).numpy()
        out.append((f"EK-FAC rank {r} vs full", _corr(est, ref)))
    # projected Direct vs exact Direct where p is small: the head and the last BatchNorm
    names = [n for n, _ in model.named_modules()]
    head = [n for n in names if n.endswith("fc")][-1:]
    bn = [n for n in names if n.endswith("bn2")][-1:]
    layers = bn + head
    exact = DirectInfluence(model, F.cross_entropy, layers=layers, regularization=damp,
                            micro_batch_size=64).fit((xr, yr))
    ref = exact.influences(xt, yt, xr, yr).numpy()
    p = exact.grads.num_params
    for k in args.agreement_ks:
        m = DirectInfluence(model, F.cross_entropy, layers=layers, micro_batch_size=64,
                            regularization=damp,
                            projection=dict(k_in=k, k_out=k, dense_dim=4 * k, seed=0)).fit((xr, yr))
        est = m.influences(xt, yt, xr, yr).numpy()
        out.append((f"Direct k={k} vs exact Direct on {layers} (p={p})", _corr(est, ref)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--n", type=int, default=27558, help="images to generate if --root is new")
    ap.add_argument("--out", default="/tmp/bench_malaria")
    ap.add_argument("--runs", nargs="+", default=["direct:k=16", "direct:k=32",
                                                   "ekfac:rank=32", "nystroem:rank=256"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--flip-train", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cluster", default="local")
    ap.add_argument("--fit-samples", type=int, default=None)
    ap.add_argument("--checkpoint", help="use this model for every run (skip training)")
    ap.add_argument("--reuse-decoded", help="a finished run's folder whose split and decoded "
                    "images every run starts from (same --size/--seed/--flip-train)")
    ap.add_argument("--agreement", type=int, nargs=2, metavar=("NTEST", "NTRAIN"))
    ap.add_argument("--agreement-ranks", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--agreement-ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--damping", type=float, default=1e-3)
    args = ap.parse_args()

    root = Path(args.root)
    if not root.exists():
        from dvl_ooc.demo.malaria import make_malaria_folder

        info = make_malaria_folder(root, args.n, seed=args.seed, flip_fraction=0.0)
        print(f"generated {info.n_images} images under {root} in {info.seconds:.0f} s")
    rows = []
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    first = Path(args.reuse_decoded) if args.reuse_decoded else None
    for spec in args.runs:
        rows.append(run_one(args, spec, ckpt, first))
        if first is None and "error" not in rows[-1]:
            first = Path(args.out) / _tag(spec)
        if ckpt is None and "error" not in rows[-1]:
            ckpt = Path(args.out) / _tag(spec) / "model.pt"
        print("\n" + table(rows), flush=True)
    print("\nmalaria benchmark (synthetic folder, "
          f"{rows[0].get('n_train', '?')} train / {rows[0].get('n_test', '?')} test, "
          f"{100 * args.flip_train:.0f}% training labels flipped, {args.workers} workers, "
          f"cluster {args.cluster})")
    print(table(rows))
    if args.agreement:
        first = Path(args.out) / _tag(args.runs[0])
        print(f"\nagreement with the uncompressed method on {args.agreement[0]} x "
              f"{args.agreement[1]} points:")
        for name, c in agreement(args, first):
            print(f"  {name:<60} pearson {c['pearson']:.4f}  spearman {c['spearman']:.4f}  "
                  f"rel. error {c['rel_err']:.3f}")


if __name__ == "__main__":
    main()
