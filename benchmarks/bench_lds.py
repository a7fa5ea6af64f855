"""LDS of every method, single and ensembled, beside dattri (TRAK) and kronfluence (EK-FAC).

Usage::

    python benchmarks/bench_lds.py --workload digits-mlp          # (a) exact methods fit
    python benchmarks/bench_lds.py --workload malaria-resnet      # (b) BatchNorm ResNet-18 layout
    python benchmarks/bench_lds.py --workload digits-cnn          # (c) the demo's CNN
    python benchmarks/bench_lds.py --workload digits-mlp --quick  # smoke run (minutes)

What it does, per workload (everything cached in ``--work``, default ``bench_out/lds/<name>``;
rerunning resumes: the ground truth store computes only missing subsets, finished rows are read
back unless ``--force``):

1. the data (``data.npz``), the network (``arch.json``) and ``--members`` networks trained on
   the whole training set with seeds ``0..M-1`` (``member_<m>.pt``; initialisation and data
   order from the seed);
2. the counterfactual ground truth: ``--subsets`` random halves of the training set, each
   trained with ``--seeds`` seeds, every test point's loss recorded
   (:func:`dvl_ooc.evaluate.ground_truth` on ``--workers`` Dask workers, into ``gt.zarr``);
3. one subprocess per row (so that wall time and peak RSS are the row's own): dvl_ooc's
   methods on member 0 (``x1``) and as :class:`dvl_ooc.influence.Ensemble` of all members
   (``xM``), at their defaults and at recommended damping; dattri's TRAK (``trak``, TRAK-1 and
   TRAK-M, in dattri's venv) and kronfluence's EK-FAC (``kron``, single and the mean over the
   members, in kronfluence's venv), via ``benchmarks/peers/lds_peers.py``;
4. the table: LDS (mean over test points of the Spearman correlation over subsets between the
   summed scores and the negated loss, :func:`dvl_ooc.evaluate.lds`) with its 95 % interval,
   the noise ceiling from the seeds, wall time and peak RSS of the row, and the ratio of each
   LDS to the reference row (kronfluence's single-model EK-FAC where it ran, otherwise TRAK-M).
   dattri's own ``dattri.metric.lds`` is run on the same scores in its venv as a cross-check of
   the metric (``--check-metric``).

Peers live in their own virtual environments (never dependencies of dvl_ooc)::

    python3.11 -m venv /work/peers/dattri && /work/peers/dattri/bin/pip install torch==2.13.0 dattri
    python3.11 -m venv /work/peers/kron && /work/peers/kron/bin/pip install torch==2.13.0 && \\
      /work/peers/kron/bin/pip install --no-deps kronfluence accelerate && \\
      /work/peers/kron/bin/pip install einops einconv opt-einsum safetensors tqdm pyyaml \\
        psutil huggingface_hub

Rows whose venv is missing are skipped with a note. ``--device cuda`` runs dvl_ooc's rows and
the training on the GPU (the same script, unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
DATTRI = "/work/peers/dattri/bin/python"
KRON = "/work/peers/kron/bin/python"


# ----------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    arch: dict[str, Any]
    train: dict[str, Any]  # TrainingConfig fields
    rows: list[str]
    n_train: int | None = None
    n_test: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: dvl_ooc rows: ``name -> (class, keyword arguments)``; ``{reg}`` values resolved at fit
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "direct": ("DirectInfluence", {}),
    "direct-mean": ("DirectInfluence", {"regularization": "0.1*mean"}),
    "direct-layer": ("DirectInfluence", {"blocks": "layer"}),
    "direct-layer-mean": ("DirectInfluence", {"blocks": "layer", "regularization": "0.1*mean"}),
    "direct-k8": ("DirectInfluence", {"projection": {"k_in": 8, "k_out": 8, "dense_dim": 64}}),
    "cg": ("CgInfluence", {}),
    "lissa": ("LissaInfluence", {}),
    "arnoldi": ("ArnoldiInfluence", {"rank": 64}),
    "nystroem": ("NystroemSketchInfluence", {"rank": 64}),
    "ekfac": ("EkfacInfluence", {}),
    "ekfac-mean": ("EkfacInfluence", {"regularization": "0.1*mean"}),
    "tracin": ("TracInCP", {}),
    # the `dvl-ooc images` recipe's methods (projected Gauss-Newton; relative damping)
    "images-direct": ("DirectInfluence", {"projection": {"k_in": 16, "k_out": 16,
                                                         "dense_dim": 64},
                                          "regularization": "1e-3*top"}),
    "images-direct-layer": ("DirectInfluence", {"projection": {"k_in": 16, "k_out": 16,
                                                               "dense_dim": 64},
                                                "blocks": "layer",
                                                "regularization": "0.1*mean"}),
    "images-ekfac": ("EkfacInfluence", {"layers": "supported", "rank": 64,
                                        "regularization": "1e-3*top"}),
    "images-ekfac-mean": ("EkfacInfluence", {"layers": "supported", "rank": 64,
                                             "regularization": "0.1*mean",
                                             "micro_batch_size": 32}),
    # the same EK-FAC without test-factor compression: the streamed exact in-memory path
    "ekfac-mean-exact": ("EkfacInfluence", {"layers": "supported", "regularization": "0.1*mean",
                                            "micro_batch_size": 32}),
    # ... with kronfluence's Fisher (labels sampled from the model, one backward pass)
    "ekfac-mean-sampled": ("EkfacInfluence", {"layers": "supported", "fisher": "sampled",
                                              "regularization": "0.1*mean",
                                              "micro_batch_size": 32}),
}

#: rows run on one network only: the iterative solvers cost one solve per test point (CG: 990 s
#: for the digits MLP's 540 test points on a loaded 2-core machine), and equal Direct there
SINGLE_ONLY = {"cg", "lissa"}

WORKLOADS: dict[str, Workload] = {
    "digits-mlp": Workload(
        "digits-mlp",
        arch={"module": "dvl_ooc.demo.nets", "name": "DigitsMLP",
              "kwargs": {"hidden": 32}, "dtype": "float32"},
        train={"epochs": 30, "lr": 5e-3, "batch_size": 64, "weight_decay": 1e-3},
        rows=["direct", "direct-mean", "direct-layer-mean", "direct-k8", "cg", "lissa",
              "arnoldi", "nystroem", "ekfac", "ekfac-mean", "ekfac-mean-sampled", "tracin",
              "trak", "kron"]),
    "digits-cnn": Workload(
        "digits-cnn",
        arch={"module": "dvl_ooc.demo.nets", "name": "DigitsCNN",
              "kwargs": {"width": 4, "hidden": 32}, "dtype": "float32"},
        train={"epochs": 30, "lr": 5e-3, "batch_size": 64, "weight_decay": 1e-3},
        rows=["direct", "direct-mean", "direct-layer-mean", "arnoldi", "ekfac", "ekfac-mean",
              "ekfac-mean-sampled", "tracin", "trak", "kron"]),
    "malaria-resnet": Workload(
        "malaria-resnet",
        arch={"module": "dvl_ooc.demo.resnet", "name": "ResNet18",
              "kwargs": {"n_classes": 2, "width": 8, "in_channels": 3, "stem": "cifar"},
              "dtype": "float32"},
        train={"epochs": 10, "lr": 2e-3, "batch_size": 64, "weight_decay": 1e-4,
               "update_bn": True},
        rows=["images-direct", "images-direct-layer", "images-ekfac", "images-ekfac-mean",
              "ekfac-mean-exact", "ekfac-mean-sampled", "tracin", "trak", "kron"],
        n_train=600, n_test=150, extra={"size": 24, "flip": 0.1}),
}


# ----------------------------------------------------------------------------- data
def _digits(flip: float = 0.0) -> dict[str, np.ndarray]:
    from dvl_ooc.demo.datasets import load_digits_split

    d = load_digits_split(flip_fraction=flip)
    return {"x_train": d.x_train.astype(np.float32), "y_train": d.y_train.astype(np.int64),
            "x_test": d.x_test.astype(np.float32), "y_test": d.y_test.astype(np.int64)}


def _malaria(n_train: int, n_test: int, size: int, flip: float, seed: int = 0
             ) -> dict[str, np.ndarray]:
    """Malaria-layout cell images (:func:`dvl_ooc.demo.malaria.malaria_image`), resized to
    ``size`` px, ``flip`` of the training labels flipped (seeded)."""
    import torch
    import torch.nn.functional as F

    from dvl_ooc.demo.malaria import malaria_image

    n = n_train + n_test
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    xs = []
    for i in range(n):
        img = malaria_image(seed, i, bool(labels[i]), min_size=size + 8, max_size=size + 24)
        t = torch.as_tensor(img).permute(2, 0, 1)[None].float() / 255.0
        xs.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[0])
    x = torch.stack(xs).numpy().astype(np.float32)
    y = labels.astype(np.int64)
    y_train = y[:n_train].copy()
    flipped = rng.choice(n_train, size=int(round(flip * n_train)), replace=False)
    y_train[flipped] = 1 - y_train[flipped]
    return {"x_train": x[:n_train], "y_train": y_train, "x_test": x[n_train:],
            "y_test": y[n_train:]}


def build_net(arch: dict[str, Any]):
    import importlib

    import torch

    cls = getattr(importlib.import_module(arch["module"]), arch["name"])
    return cls(**arch.get("kwargs", {})).to(getattr(torch, arch.get("dtype", "float32")))


def training_config(w: Workload, seed: int):
    from dvl_ooc.valuation.training import TrainingConfig

    return TrainingConfig(seed=seed, **w.train)


def prepare(w: Workload, work: Path, members: int, quick: bool) -> dict[str, np.ndarray]:
    """Data, architecture and the member networks (cached in ``work``)."""
    import torch

    from dvl_ooc.evaluate import reinitialised
    from dvl_ooc.valuation.training import train_module

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data.npz").exists():
        if w.name.startswith("digits"):
            data = _digits()
        else:
            n_tr, n_te = (w.n_train, w.n_test) if not quick else (300, 60)
            data = _malaria(n_tr, n_te, w.extra["size"], w.extra["flip"])
        np.savez(work / "data.npz", **data)
        (work / "arch.json").write_text(json.dumps(w.arch))
    with np.load(work / "data.npz") as z:
        data = {k: z[k] for k in z.files}
    for m in range(members):
        path = work / f"member_{m}.pt"
        if path.exists():
            continue
        net = reinitialised(build_net(w.arch), 10_000 + m)
        t0 = time.perf_counter()
        train_module(net, data["x_train"], data["y_train"], training_config(w, 10_000 + m))
        torch.save(net.state_dict(), path)
        print(f"#   member {m} trained in {time.perf_counter() - t0:.1f} s", flush=True)
    return data


# ----------------------------------------------------------------------------- rows
def row_main(args: argparse.Namespace) -> int:
    """One dvl_ooc row in this process: fit, influences, scores file, one JSON line."""
    import resource

    import torch
    import torch.nn.functional as F

    from dvl_ooc import influence as inf

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    with np.load(work / "data.npz") as z:
        data = {k: z[k] for k in z.files}
    arch = json.loads((work / "arch.json").read_text())
    cls_name, kw = OURS[args.row]
    cls = getattr(inf, cls_name)
    t0 = time.perf_counter()
    models = []
    for m in args.row_members:
        net = build_net(arch)
        net.load_state_dict(torch.load(work / f"member_{m}.pt", map_location="cpu"))
        net.to(args.device).eval()
        kwargs = dict(kw)
        if cls_name == "TracInCP":
            model = cls(net, F.cross_entropy, checkpoints=[net.state_dict()])
        else:
            if cls_name in ("ArnoldiInfluence", "NystroemSketchInfluence"):
                kwargs.setdefault("seed", 0)
            model = cls(net, F.cross_entropy, **kwargs)
        models.append(model)
    x_tr = torch.as_tensor(data["x_train"]).to(args.device)
    y_tr = torch.as_tensor(data["y_train"]).to(args.device)
    x_te = torch.as_tensor(data["x_test"]).to(args.device)
    y_te = torch.as_tensor(data["y_test"]).to(args.device)
    if len(models) == 1:
        model = models[0]
    else:
        model = inf.Ensemble(models)
    model.fit((x_tr, y_tr))
    with torch.no_grad():
        scores = model.influences(x_te, y_te, x_tr, y_tr)
    scores = scores.detach().cpu().numpy().astype(np.float32)
    seconds = time.perf_counter() - t0
    np.save(args.out, scores)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"row": args.row, "members": args.row_members, "seconds": round(seconds, 2),
                      "peak_rss_mb": round(rss, 1)}))
    return 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any] | None:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        print(f"# row failed: {' '.join(cmd[-6:])}\n{p.stderr[-2000:]}", flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_row(row: str, members: list[int], work: Path, args: argparse.Namespace
            ) -> dict[str, Any] | None:
    tag = f"{row}@x{len(members)}"
    out = work / f"scores_{tag}.npy"
    meta = work / f"scores_{tag}.json"
    if out.exists() and meta.exists() and not args.force:
        return json.loads(meta.read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    mem = [str(m) for m in members]
    if row == "trak":
        if not shutil.which(args.dattri_python):
            return None
        cmd = [args.dattri_python, str(PEERS / "lds_peers.py"), "trak", str(work),
               "--members", *mem, "--out", str(out), "--proj-dim", str(args.proj_dim)]
    elif row.startswith("kron"):
        if not shutil.which(args.kron_python):
            return None
        damping = "heuristic" if row == "kron" else row.split(":", 1)[1]
        cmd = [args.kron_python, str(PEERS / "lds_peers.py"), "kronfluence", str(work),
               "--members", *mem, "--out", str(out), "--damping", damping]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--work", str(work),
               "--row-members", *mem, "--out", str(out), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = _run(cmd, env)
    if res is not None:
        meta.write_text(json.dumps(res))
    return res


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="digits-mlp")
    p.add_argument("--work", default=None, help="cache folder (default bench_out/lds/<name>)")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--members", type=int, default=5, help="networks in the ensembles")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", nargs="*", default=None, help="rows to run (default: all)")
    p.add_argument("--no-ensemble", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--force", action="store_true", help="recompute finished rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row process")
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--dattri-python", default=DATTRI)
    p.add_argument("--kron-python", default=KRON)
    # row mode (internal)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-members", type=int, nargs="+", default=[0], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row is not None:
        return row_main(args)

    w = WORKLOADS[args.workload]
    if args.quick:
        args.subsets, args.seeds, args.members = min(args.subsets, 20), min(args.seeds, 2), \
            min(args.members, 2)
    work = Path(args.work or ROOT / "bench_out" / "lds" / (w.name + ("-quick" if args.quick
                                                                     else "")))
    t0 = time.perf_counter()
    data = prepare(w, work, args.members, args.quick)
    print(f"# {w.name}: {len(data['x_train'])} train x {len(data['x_test'])} test, "
          f"{args.members} members  [{time.perf_counter() - t0:.1f} s]", flush=True)

    gt = ground_truth(w, work, data, args)
    rows = args.rows or w.rows
    results = []
    for row in rows:
        single = args.no_ensemble or row in SINGLE_ONLY
        for members in ([[0]] + ([] if single else [list(range(args.members))])):
            res = run_row(row, members, work, args)
            if res is None:
                print(f"# skipped {row} x{len(members)}", flush=True)
                continue
            scores = np.load(work / f"scores_{row}@x{len(members)}.npy")
            results.append((row, len(members), res, score_lds(scores, gt)))
            print(f"#   {row:22s} x{len(members)}  LDS {results[-1][3].mean:.3f}  "
                  f"[{res['seconds']:.1f} s, {res['peak_rss_mb']:.0f} MB]", flush=True)
    table(w, gt, results)
    return 0


def ground_truth(w: Workload, work: Path, data: dict[str, np.ndarray], args: argparse.Namespace):
    """The retraining ground truth (resumable store ``gt.zarr``)."""
    import torch

    from dvl_ooc.evaluate import TorchRetrainer
    from dvl_ooc.evaluate import ground_truth as run_gt

    torch.manual_seed(0)  # the retrainer's fingerprint includes the (unused) initial weights
    net = build_net(w.arch)
    retrainer = TorchRetrainer(net, (data["x_train"], data["y_train"]),
                               (data["x_test"], data["y_test"]),
                               config=training_config(w, 0), target="loss")
    t0 = time.perf_counter()
    gt = run_gt(retrainer, str(work / "gt.zarr"), n_subsets=args.subsets, n_seeds=args.seeds,
                n_workers=args.workers, seed=0)
    print(f"# ground truth: {args.subsets} subsets x {args.seeds} seeds on {args.workers} "
          f"workers  [{time.perf_counter() - t0:.1f} s]", flush=True)
    return gt


def score_lds(scores: np.ndarray, gt):
    from dvl_ooc.evaluate import lds

    return lds(scores, gt.masks, gt.targets)


def table(w: Workload, gt, results: list) -> None:
    ref = next((r for r in results if r[0] == "kron" and r[1] == 1), None) or \
        next((r for r in results if r[0] == "trak" and r[1] > 1), None)
    ceiling = results[0][3].ceiling if results else None
    print(f"\n{w.name}: LDS over {gt.masks.shape[0]} subsets x {gt.targets.shape[1]} seeds; "
          f"noise ceiling {ceiling if ceiling is None else round(ceiling, 3)}; "
          f"reference row: {ref[0] + ' x' + str(ref[1]) if ref else '-'}")
    print(f"{'row':24s} {'models':>6s} {'LDS':>7s} {'95% CI':>17s} {'vs ref':>7s} "
          f"{'time s':>8s} {'peak MB':>8s}")
    for row, m, res, r in results:
        ratio = r.mean / ref[3].mean if ref and ref[3].mean else float("nan")
        print(f"{row:24s} {m:6d} {r.mean:7.3f} [{r.ci[0]:6.3f}, {r.ci[1]:6.3f}] {ratio:7.2f} "
              f"{res['seconds']:8.1f} {res['peak_rss_mb']:8.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
