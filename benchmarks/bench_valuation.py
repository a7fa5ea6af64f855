"""Data-cleaning check for TMC-Shapley on digits with 10 % flipped labels, plus throughput.

What it measures (prints tables):

1. TMC-Shapley values of the training points for a softmax-regression classifier (the
   vectorised torch utility; score = accuracy on a validation half of the test split);
   share of flipped labels among the lowest 10/15/20 % (chance level: the flip rate), with
   KNN-Shapley as a closed-form baseline.
2. Accuracy on the held-out other half after dropping the lowest-valued points, versus keeping
   everything and versus dropping the same number of random points (mean of 5 draws).
3. Utility evaluations per second of the TMC run on a LocalCluster with 1 and 2 workers (same
   permutations; cluster start-up excluded) and of a one-at-a-time scikit-learn utility.
4. Speed-up of the vectorised torch utility (``models_per_pass`` coalitions trained in one
   pass) over the same training one model at a time, and over a plain per-model torch loop.

Usage: ``python benchmarks/bench_valuation.py --quick`` (a few minutes on 2 cores).

``--tutorial``: dvl_ooc against pyDVL 0.10 + skorch on the workload of pyDVL's own TMC-Shapley
tutorial (``notebooks/shapley_skorch.ipynb``; see ``benchmarks/peers/tutorial_workload.py``):
the tutorial's digits split (seed 36), its first 300 training points with 10 % of the labels
flipped (seeded), its ``SimpleCNN`` (Adam, lr 0.01, minibatches of 128, 10 epochs, no shuffle as
skorch's DataLoader), accuracy on the 540 test digits, ``RelativeTruncation(0.05, 0.3)``; pyDVL
runs for a wall-clock budget (``MaxTime``, default 120 s), dvl_ooc for a fixed number of
permutations (``--dvl-permutations``, default 16; ``0``: the same budget). Fixed work because a
dvl_ooc task walks 8 permutations in lockstep (one to two minutes here): under a budget only
the tasks merged by the deadline count, which hides the second worker's (keep at least 8
permutations per task per worker: 16 for ``TorchBatchUtility`` with 2 workers). Rows, each with
1 and 2 workers:

* ``pyDVL 0.10 + skorch``: ``benchmarks/peers/pydvl_tmc_tutorial.py`` run in pyDVL's own venv
  (``--pydvl-python``, default ``/work/peers/pydvl/bin/python``; skipped with a note if absent)
  with ``joblib.parallel_config(n_jobs=workers)``; torch pinned to 1 thread per process
  (``--pydvl-threads 0`` leaves torch's default, which oversubscribes a busy machine badly);
* ``dvl_ooc ModelUtility``: ``ModelUtility(TorchEstimator(net, config=...), "accuracy")``;
* ``dvl_ooc TorchBatchUtility``: the stacked-model utility with the same ``TrainingConfig``;

the dvl_ooc rows on a ``LocalCluster`` with 1 or 2 single-threaded worker processes (start-up
and imports before the clock, as pyDVL's loky workers). Columns: trainings (utility evaluations:
models trained; dvl_ooc's count adds ``u(empty)`` and 1-class subsets, scored without training),
seconds of ``fit`` (pyDVL: budget + overrun, it checks between batches), trainings/s, ratio
to pyDVL at equal workers, 2-worker / 1-worker ratio, share of flipped labels among the lowest
10/15/20 % values (chance: 10 %), mean test accuracy of 5 models trained on all points
(different initialisations; shows the training settings match), peak RSS (max over processes).

Targets (issue 14): >= 5x pyDVL's trainings/s at equal workers, detection no worse than
pyDVL's, 2 workers >= 1.8x one worker. Run it on a quiet machine: another process on the 2 cores
halves the throughput of whichever run it overlaps.

    python benchmarks/bench_valuation.py --tutorial --budget 40  # ~25 min (ModelUtility is slow)
    python benchmarks/bench_valuation.py --tutorial --budget 40 --methods batch  # ~9 min
    # pyDVL's venv (outside the repo, never a dependency of dvl_ooc):
    #   python3.11 -m venv /work/peers/pydvl && /work/peers/pydvl/bin/pip install torch==2.13.0
    #   /work/peers/pydvl/bin/pip install "pydvl==0.10.0" "skorch==1.4.0" "numpy<2"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.runtime import local_cluster
from dvl_ooc.valuation import (
    MaxChecks,
    MaxTime,
    MaxUpdates,
    ModelUtility,
    RelativeTruncation,
    TMCShapleyValuation,
    TorchBatchUtility,
    TorchEstimator,
    knn_shapley,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def lowest_share(values: np.ndarray, flipped: np.ndarray, fracs=(0.10, 0.15, 0.20)) -> list:
    order = np.argsort(values, kind="stable")
    return [float(flipped[order[: int(round(f * len(values)))]].mean()) for f in fracs]


def accuracy_after_drop(util: TorchBatchUtility, x, y, x_eval, y_eval, drop_idx) -> float:
    keep = np.ones(len(x), bool)
    keep[drop_idx] = False
    ev = TorchBatchUtility(util.model, (x_eval, y_eval), epochs=util.epochs, lr=util.lr,
                           weight_decay=util.weight_decay).with_data(x, y)
    return float(ev.evaluate_many(keep[None])[0])


def plain_loop_train(model, x, y, masks, epochs, lr, wd) -> float:
    """Baseline: one nn.Module per coalition, same full-batch Adam steps."""
    t = time.perf_counter()
    for m in masks:
        idx = torch.as_tensor(np.flatnonzero(m))
        net = copy.deepcopy(model)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(epochs):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss = loss + 0.5 * wd * sum((p**2).sum() for p in net.parameters())
            loss.backward()
            opt.step()
    return time.perf_counter() - t


# --- --tutorial: dvl_ooc vs pyDVL 0.10 + skorch on pyDVL's TMC-Shapley tutorial ------------
PEERS = Path(__file__).resolve().parent / "peers"
DEFAULT_PYDVL = "/work/peers/pydvl/bin/python"


def _workload_module():
    if str(PEERS) not in sys.path:
        sys.path.insert(0, str(PEERS))
    import tutorial_workload

    return tutorial_workload


def tutorial_net(seed: int) -> nn.Module:
    """The tutorial's SimpleCNN as a plain ``nn.Sequential`` (its ``layers``: the same module
    and arithmetic, and workers unpickle it without importing ``benchmarks/peers``)."""
    torch.manual_seed(seed)
    return _workload_module().SimpleCNN().layers


def tutorial_config(epochs: int, seed: int):
    """The tutorial's training settings as dvl_ooc's shared training configuration."""
    from dvl_ooc.valuation.training import TrainingConfig

    t = _workload_module().TUTORIAL
    return TrainingConfig(epochs=epochs, lr=t["lr"], batch_size=t["batch_size"],
                          weight_decay=0.0, optimizer="adam", shuffle=False, seed=seed)


def tutorial_utility(kind: str, w, epochs: int, seed: int, models_per_pass: int,
                     device: str = "cpu"):
    """The dvl_ooc utility of a row (``kind``: "model" or "batch"), not yet bound to data;
    ``device="cuda"``: trains on the GPU (``cuda:0`` of the process that runs it)."""
    cfg, test = tutorial_config(epochs, seed), (w.x_test, w.y_test)
    if kind == "model":
        return ModelUtility(TorchEstimator(tutorial_net(seed).to(device), config=cfg),
                            "accuracy", test_data=test)
    return TorchBatchUtility(tutorial_net(seed), test, config=cfg,
                             models_per_pass=models_per_pass, device=device)


def tutorial_valuation(utility, budget: float, seed: int, client, args):
    """TMC-Shapley with the tutorial's truncation and a wall-clock budget, or with exactly
    ``args.dvl_permutations`` permutations (one round) when that is set."""
    from dvl_ooc.valuation import MaxChecks

    t = _workload_module().TUTORIAL
    extra = {k: v for k, v in (("batch_size", args.dvl_batch_size),
                               ("samples_per_round", args.dvl_round)) if v}
    stop = MaxTime(budget)
    if args.dvl_permutations:
        extra["samples_per_round"] = args.dvl_permutations
        stop = MaxChecks(1)
    return TMCShapleyValuation(utility, RelativeTruncation(t["rtol"], t["burn_in_fraction"]),
                               is_done=stop, seed=seed, client=client, **extra)


def _worker_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_dvl(kind: str, workers: int, w, args) -> dict:
    """One dvl_ooc row: TMC on a LocalCluster of ``workers`` 1-thread processes."""
    from distributed import Client

    tw = _workload_module()
    dev = args.device
    util = tutorial_utility(kind, w, args.epochs, args.seed, args.models_per_pass, dev)
    accs = []  # mean test accuracy of 5 models trained on all points (5 initialisations)
    for s in range(5):
        u = tutorial_utility(kind, w, args.epochs, args.seed + s, args.models_per_pass, dev)
        accs.append(float(u.with_data(w.x_train, w.y_train)(np.arange(len(w.x_train)))))
    kind_cl = "cuda" if dev.startswith("cuda") else "local"
    with local_cluster(workers, threads_per_worker=1, kind=kind_cl,
                       what="bench_valuation") as cl, Client(cl) as client:
        client.run(lambda: __import__("dvl_ooc.valuation.training"))  # imports torch, etc.
        val = tutorial_valuation(util, args.budget, args.seed, client, args)
        t = time.perf_counter()
        val.fit(w.x_train, w.y_train)
        seconds = time.perf_counter() - t
        rss = max(client.run(_worker_rss_mb).values())
    res = val.result
    name = "dvl_ooc ModelUtility" if kind == "model" else "dvl_ooc TorchBatchUtility"
    return {"method": name, "workers": workers, "seconds": seconds,
            "trainings": int(res.evaluations), "trainings_per_s": res.evaluations / seconds,
            "detection": tw.detection(np.nan_to_num(res.values), w.flipped),
            "accuracy_all": float(np.mean(accs)), "peak_rss_mb": max(rss, peak_rss_mb()),
            "permutations": int(res.n_samples), "device": dev}


def run_pydvl(workers: int, args) -> dict:
    """One pyDVL row: the peer script in pyDVL's venv, as a subprocess (one JSON line)."""
    cmd = [args.pydvl_python, str(PEERS / "pydvl_tmc_tutorial.py"), "--workers", str(workers),
           "--budget", str(args.budget), "--seed", str(args.seed), "--n-train",
           str(args.n_train), "--flip", str(args.flip), "--epochs", str(args.epochs),
           "--torch-threads", str(args.pydvl_threads), "--device", args.device, "--no-values"]
    name = "pyDVL 0.10 + skorch"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10 * args.budget + 600)
    except subprocess.TimeoutExpired:
        return {"method": name, "workers": workers, "error": "timed out"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"method": name, "workers": workers,
                "error": f"exit {p.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def print_tutorial_table(rows: list[dict]) -> None:
    base = {r["workers"]: r["trainings_per_s"] for r in rows
            if r["method"].startswith("pyDVL") and "error" not in r}
    one = {r["method"]: r["trainings_per_s"] for r in rows
           if r["workers"] == 1 and "error" not in r}
    print(f"{'method':<28}{'workers':>8}{'trainings':>10}{'seconds':>9}{'train/s':>9}"
          f"{'vs pyDVL':>9}{'2w/1w':>7}{'det10':>7}{'det15':>7}{'det20':>7}{'acc all':>9}"
          f"{'RSS MB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<28}{r['workers']:>8}   failed: {r['error']}")
            continue
        tps = r["trainings_per_s"]
        vs = f"{tps / base[r['workers']]:.2f}x" if r["workers"] in base else "-"
        sc = (f"{tps / one[r['method']]:.2f}x" if r["workers"] > 1 and r["method"] in one
              else "")
        d = "".join(f"{x:>7.0%}" for x in r["detection"])
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
        print(f"{r['method']:<28}{r['workers']:>8}{r['trainings']:>10}{r['seconds']:>9.1f}"
              f"{tps:>9.1f}{vs:>9}{sc:>7}{d}{r['accuracy_all']:>9.3f}{rss:>8}")


def _report_row(row: dict) -> None:
    """One finished row as a JSON line (kept if a later run fails or is interrupted)."""
    print("# done: " + json.dumps({k: v for k, v in row.items() if k != "values"}), flush=True)


def tutorial_main(args) -> None:
    tw = _workload_module()
    torch.set_num_threads(1)
    w = tw.load_workload(args.n_train, args.flip, args.seed)
    workers = [int(x) for x in args.workers.split(",")]
    print(f"# pyDVL TMC-Shapley tutorial workload: {len(w.x_train)} digits "
          f"({int(w.flipped.sum())} flipped labels), {len(w.x_test)} test digits; SimpleCNN, "
          f"Adam lr {tw.TUTORIAL['lr']}, minibatch {tw.TUTORIAL['batch_size']}, "
          f"{args.epochs} epochs; RelativeTruncation({tw.TUTORIAL['rtol']}, "
          f"{tw.TUTORIAL['burn_in_fraction']}); pyDVL budget {args.budget:.0f} s per run, dvl_ooc "
          f"{args.dvl_permutations or 'same budget'} permutations; "
          f"seed {args.seed}; device {args.device}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    rows = []
    have_pydvl = bool(shutil.which(args.pydvl_python))
    if not have_pydvl:
        print(f"# note: {args.pydvl_python} not found: pyDVL rows skipped (see the docstring "
              "for the venv recipe)")
    for wk in workers:
        if have_pydvl:
            rows.append(run_pydvl(wk, args))
            _report_row(rows[-1])
    for kind in args.methods.split(","):
        for wk in workers:
            try:
                rows.append(run_dvl(kind, wk, w, args))
            except Exception as e:  # noqa: BLE001 - report the row as failed, keep going
                name = "dvl_ooc ModelUtility" if kind == "model" else \
                    "dvl_ooc TorchBatchUtility"
                rows.append({"method": name, "workers": wk,
                             "error": f"{type(e).__name__}: {e}"[:300]})
            _report_row(rows[-1])
    print()
    print_tutorial_table(rows)
    print(f"\ndet10/15/20: share of flipped labels among the lowest-valued 10/15/20 % (chance "
          f"{w.flipped.mean():.0%}); acc all: test accuracy, model trained on all points; "
          f"load average {os.getloadavg()[0]:.1f} at the end. Targets: >= 5x pyDVL at equal "
          "workers, detection no worse, 2w/1w >= 1.8x.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--permutations", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--tutorial-epochs", type=int, default=10,
                    help="--tutorial: epochs (the issue's 10; the notebook trains 24)")
    ap.add_argument("--seed", type=int, default=0)
    tu = ap.add_argument_group("--tutorial (dvl_ooc vs pyDVL on pyDVL's TMC tutorial)")
    tu.add_argument("--tutorial", action="store_true", help="run the pyDVL comparison")
    tu.add_argument("--budget", type=float, default=120.0, help="seconds per run (MaxTime)")
    tu.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    tu.add_argument("--methods", default="model,batch",
                    help="dvl_ooc rows: model (ModelUtility), batch (TorchBatchUtility)")
    tu.add_argument("--pydvl-python", default=DEFAULT_PYDVL, help="python of pyDVL's venv")
    tu.add_argument("--pydvl-threads", type=int, default=1,
                    help="torch threads per pyDVL process (0: torch's default)")
    tu.add_argument("--device", default="cpu",
                    help="cuda: every row trains on the GPU (pyDVL: skorch's device; dvl_ooc: "
                         "a dask_cuda.LocalCUDACluster, one worker per GPU)")
    tu.add_argument("--flip", type=float, default=0.1, help="share of flipped labels")
    tu.add_argument("--models-per-pass", type=int, default=32, help="TorchBatchUtility")
    tu.add_argument("--dvl-batch-size", type=int, default=None,
                    help="permutations per task (default: the library's)")
    tu.add_argument("--dvl-round", type=int, default=None,
                    help="permutations per round (default: the library's)")
    tu.add_argument("--dvl-permutations", type=int, default=16,
                    help="dvl_ooc rows: exactly this many permutations instead of the budget "
                         "(fixed work, so every worker's tasks count; 0: use --budget)")
    args = ap.parse_args()
    if args.tutorial:
        args.n_train = args.n_train or 300
        args.epochs = args.tutorial_epochs
        tutorial_main(args)
        return
    n_train = args.n_train or (200 if args.quick else 1257)
    n_perm = args.permutations or (48 if args.quick else 400)
    torch.set_num_threads(1)

    d = load_digits_split(flip_fraction=0.1, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    sub = np.sort(rng.choice(len(d.x_train), size=min(n_train, len(d.x_train)), replace=False))
    x, y, flipped = d.x_train[sub], d.y_train[sub], d.flipped[sub]
    half = len(d.x_test) // 2
    x_val, y_val = d.x_test[:half], d.y_test[:half]
    x_eval, y_eval = d.x_test[half:], d.y_test[half:]
    util = TorchBatchUtility(make_model(), (x_val, y_val), epochs=args.epochs, lr=0.1,
                             weight_decay=1e-3, models_per_pass=32)
    print(f"# digits: {len(x)} training points ({int(flipped.sum())} flipped labels, "
          f"{flipped.mean():.1%}), {half} validation, {len(x_eval)} evaluation points; "
          f"softmax regression, {args.epochs} full-batch Adam steps per model; "
          f"torch {torch.__version__}, 1 thread per process")

    # --- 1. TMC-Shapley on a LocalCluster (1 and 2 workers: same seed, same values) ---------
    from distributed import Client

    trunc = RelativeTruncation(rtol=0.02, burn_in_fraction=0.3)
    runs = {}
    for workers in (1, 2):
        with local_cluster(workers, threads_per_worker=1, what="bench_valuation") as cl, \
                Client(cl) as client:
            client.run(lambda: __import__("dvl_ooc.valuation"))  # warm-up: imports torch
            perms = n_perm if workers == 2 else max(8, n_perm // 3)
            val = TMCShapleyValuation(util, trunc, is_done=MaxUpdates(perms), seed=args.seed,
                                      batch_size=1, samples_per_round=8, client=client)
            val.fit(x, y)
            runs[workers] = val
    v2 = runs[2]
    res = v2.result
    print(f"\n## 1. TMC-Shapley ({res.n_samples} permutations, {res.evaluations} evaluations, "
          f"RelativeTruncation(0.02, burn_in 0.3), stopping checked every 8 permutations)")
    knn = knn_shapley(x, y, x_val, y_val, k=5)
    rows = [("TMC-Shapley", lowest_share(res.values, flipped)),
            ("KNN-Shapley (k=5)", lowest_share(knn.values, flipped)),
            ("random (expected)", [float(flipped.mean())] * 3)]
    print(f"{'method':<20}{'lowest 10%':>12}{'lowest 15%':>12}{'lowest 20%':>12}"
          "   (share of flipped labels)")
    for name, shares in rows:
        print(f"{name:<20}" + "".join(f"{s:>12.1%}" for s in shares))
    print(f"median stderr / median |value|: "
          f"{np.median(res.stderr) / np.median(np.abs(res.values)):.2f}")

    # --- 2. accuracy after dropping ------------------------------------------------------
    print("\n## 2. Accuracy on the evaluation half after dropping points")
    base = accuracy_after_drop(util, x, y, x_eval, y_eval, [])
    print(f"{'dropped':<10}{'lowest TMC':>12}{'lowest KNN':>12}{'random':>12}{'all kept':>10}")
    for frac in (0.10, 0.20):
        k = int(round(frac * len(x)))
        low = accuracy_after_drop(util, x, y, x_eval, y_eval, np.argsort(res.values)[:k])
        lowk = accuracy_after_drop(util, x, y, x_eval, y_eval, np.argsort(knn.values)[:k])
        rnd = np.mean([accuracy_after_drop(util, x, y, x_eval, y_eval,
                                           np.random.default_rng(s).choice(len(x), k, False))
                       for s in range(5)])
        print(f"{frac:<10.0%}{low:>12.3f}{lowk:>12.3f}{rnd:>12.3f}{base:>10.3f}")

    # --- 3. throughput -------------------------------------------------------------------
    print("\n## 3. Utility evaluations per second (TMC fit, cluster start-up excluded)")
    print(f"{'utility':<34}{'workers':>8}{'perms':>7}{'evals':>8}{'time s':>9}{'evals/s':>10}")
    for w, v in runs.items():
        r, t = v.result, v.info["sampling_s"]
        print(f"{'torch vectorised (32/pass)':<34}{w:>8}{r.n_samples:>7}{r.evaluations:>8}"
              f"{t:>9.1f}{r.evaluations / t:>10.1f}")
    e1 = runs[1].result.evaluations / runs[1].info["sampling_s"]
    e2 = runs[2].result.evaluations / runs[2].info["sampling_s"]
    print(f"2-worker / 1-worker throughput: {e2 / e1:.2f}x")
    from sklearn.linear_model import LogisticRegression

    sk = ModelUtility(LogisticRegression(max_iter=200), test_data=(x_val.reshape(half, -1),
                                                                   y_val))
    sv = TMCShapleyValuation(sk, trunc, is_done=MaxChecks(1), seed=args.seed, batch_size=1,
                             samples_per_round=1)
    sv.fit(x.reshape(len(x), -1), y)
    r, t = sv.result, sv.info["sampling_s"]
    print(f"{'sklearn LogisticRegression (1/fit)':<34}{1:>8}{r.n_samples:>7}{r.evaluations:>8}"
          f"{t:>9.1f}{r.evaluations / t:>10.1f}")

    # --- 4. vectorised utility speed-up --------------------------------------------------
    print("\n## 4. Vectorised torch utility vs one model at a time (64 random prefixes)")
    bound = util.with_data(x, y)
    perm = np.random.default_rng(1).permutation(len(x))
    sizes = np.linspace(1, len(x), 64).astype(int)
    masks = np.zeros((64, len(x)), bool)
    for i, s in enumerate(sizes):
        masks[i, perm[:s]] = True
    timings = {}
    for mpp in (1, 8, 32, 64):
        u = TorchBatchUtility(make_model(), (x_val, y_val), epochs=args.epochs, lr=0.1,
                              weight_decay=1e-3, models_per_pass=mpp).with_data(x, y)
        u.evaluate_many(masks[:2])  # warm-up
        t = time.perf_counter()
        scores = u.evaluate_many(masks)
        timings[mpp] = time.perf_counter() - t
        if mpp == 1:
            ref_scores = scores
        agree = np.mean(np.abs(scores - ref_scores) < 1e-9)
        print(f"models_per_pass={mpp:<4} {timings[mpp]:8.2f} s  {64 / timings[mpp]:8.1f} evals/s"
              f"  speed-up {timings[1] / timings[mpp]:5.1f}x   same scores: {agree:.0%}")
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y).long()
    t_plain = plain_loop_train(make_model(), xt, yt, masks, args.epochs, 0.1, 1e-3)
    print(f"plain per-model nn.Module loop (training only): {t_plain:.2f} s -> vectorised "
          f"(32/pass) is {t_plain / timings[32]:.1f}x faster")
    del bound
    print(f"\npeak RSS (driver): {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
