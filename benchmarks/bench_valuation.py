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
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.runtime import local_cluster
from dvl_ooc.valuation import (
    MaxChecks,
    MaxUpdates,
    ModelUtility,
    RelativeTruncation,
    TMCShapleyValuation,
    TorchBatchUtility,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--permutations", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
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
