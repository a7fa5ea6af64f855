"""Benchmark: In-Run Data Shapley tracker vs plain training vs naive per-sample backward passes,
and TracIn / In-Run mislabel detection on flipped-label digits.

Per model (digits CNN on 8x8, a larger CNN on 32x32 upsampled digits) it times SGD steps of

* plain training,
* plain training plus the validation gradient at every step (the floor of any exact method),
* training with ``InRunShapley``: summed validation loss; the same with ``combined=True`` (one
  forward/backward over train + validation rows); one score per validation point (also
  combined); attribution through the two linear layers only (``layers=``),
* the naive way: one backward per training sample and one for the validation loss per step,

and prints CPU seconds per epoch (median step time x steps) and ratios to plain training, plus
the largest relative difference between tracker and naive values (they must agree). Then it
trains on digits with 10 % flipped labels and reports the share of flipped points among the
10 % / 20 % highest TracIn self-influences (and lowest In-Run values).

    python benchmarks/bench_inrun.py [--quick] [--threads N] [--batch B] [--n-val M]
                                     [--malloc-tuned] [--device cuda]

``--resnet N [N ...]``: the cost of ``dvl-ooc images --inrun`` instead. Per generated
malaria-layout folder of N images (``make_malaria_folder``, 10 % of the files in the wrong class
folder; 64 px, 80 / 20 split) it trains the recipe's ResNet18 (BatchNorm in training mode,
width 16, imagenet stem, AdamW, batch 64, flips) with the recipe's training function, plain and
with the In-Run tracker as the recipe runs it (:func:`dvl_ooc.recipes.images.inrun_tracker`:
the summed value over all test images, from ``val_sample`` test images per step), alternating
the variants ``--reps`` times, and prints the training time of each (median process CPU
seconds, and wall seconds), the ratio of CPU times, whether the trained networks are
identical, and the ROC AUC of the In-Run ranking (lowest value first) for the training files in
the wrong folder (the test files get their true labels back: values against a clean test loss;
``--test-per-batch F [F ...]``: one In-Run row per fraction of the batch)::

    python benchmarks/bench_inrun.py --resnet 400 1600 [--epochs 2] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN
from dvl_ooc.influence.tracin import TracInCP
from dvl_ooc.inrun import InRunShapley


class CNN32(nn.Module):
    """A ~120k-parameter CNN for (1, 32, 32) images."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def tune_malloc() -> None:
    """glibc returns freed blocks above the mmap threshold to the OS, so every training step
    page-faults its activations in again (25-35 % of a CNN32 step here). Raising the mmap and
    trim thresholds keeps them (what jemalloc/tcmalloc users get); it speeds up every variant."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 62)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The resident set size now (MB), from ``/proc/self/statm``."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def batches(n, b, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[s : s + b] for s in range(0, n, b)]


def sgd_plain(model, x, y, lr, xv, yv):
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(idx):
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    return step, lambda: None


def sgd_floor(model, x, y, lr, xv, yv):
    """Plain training plus the validation gradient at every step: what any exact per-step
    method must at least compute (the tracker adds the per-sample products to this)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(idx):
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        model.eval()
        torch.autograd.grad(F.cross_entropy(model(xv), yv, reduction="sum"), params)
        model.train()
        opt.step()

    return step, lambda: None


def sgd_tracker(model, x, y, lr, xv, yv, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), **kw)

    def step(idx):
        opt.zero_grad()
        tr.step(x[idx], y[idx], idx, lr=lr)
        opt.step()

    return step, lambda: tr.values


def sgd_naive(model, x, y, lr, xv, yv):
    """One backward per training sample, one for the summed validation loss, per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    vals = np.zeros(len(x))

    def step(idx):
        model.eval()
        gv = torch.autograd.grad(F.cross_entropy(model(xv), yv, reduction="sum"), params)
        model.train()
        for i in idx.tolist():
            gi = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            vals[i] += lr / len(idx) * float(sum((a * b).sum() for a, b in zip(gi, gv)))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    return step, lambda: vals


def bench_speed(name, make, x, y, xv, yv, batch, lr, epochs, naive_steps, head, device):
    """Every variant trains its own copy of the same initial model on the same batches; the
    variants take turns step by step (in rotating order), so that load changes on a shared
    machine hit all of them alike. Epoch time = median CPU time per step x steps per epoch."""
    init = make().state_dict()

    def fresh():
        m = make()
        m.load_state_dict(init)
        return m.to(device).train()

    x, y, xv, yv = (t.to(device) for t in (x, y, xv, yv))
    if device.type == "cuda":  # wall time of the device work (CPU time says nothing there)
        def clock():
            torch.cuda.synchronize(device)
            return time.perf_counter()
    else:
        clock = time.process_time

    m = len(xv)
    variants = {
        "plain": partial(sgd_plain),
        "plain + val. gradient (floor)": partial(sgd_floor),
        f"tracker (sum over {m} val)": partial(sgd_tracker),
        f"tracker combined (sum, {m} val)": partial(sgd_tracker, combined=True),
        f"tracker ({m} per-val scores)": partial(sgd_tracker, per_validation_point=True),
        f"tracker combined ({m} per-val)": partial(sgd_tracker, per_validation_point=True,
                                                    combined=True),
        f"tracker, layers={'+'.join(head)} (sum)": partial(sgd_tracker, layers=head),
        "naive": partial(sgd_naive),
    }
    run = {k: f(fresh(), x, y, lr, xv, yv) for k, f in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    n_steps = 0
    for e in range(epochs):
        order = batches(len(x), batch, e)
        n_steps = len(order)
        for s, idx in enumerate(order):
            turn = keys[s % len(keys):] + keys[: s % len(keys)]
            for k in turn:
                if k == "naive" and (e > 0 or s >= naive_steps + 1):
                    continue
                t = clock()
                run[k][0](idx)
                times[k].append(clock() - t)
    rows = []
    # the first step of each variant warms up kernels and allocators: not timed
    per_step = {k: float(np.median(v[1:])) for k, v in times.items()}
    for k, t in per_step.items():
        label = f"naive (from {len(times[k]) - 1} steps)" if k == "naive" else k
        rows.append((name, label, t * n_steps, t / per_step["plain"]))
    k_sum, k_pv = f"tracker (sum over {m} val)", f"tracker ({m} per-val scores)"
    v_sum, v_pv = run[k_sum][1](), run[k_pv][1]()
    pv_ok = np.allclose(v_pv.sum(1), v_sum, rtol=1e-3, atol=1e-6)
    # agreement with the naive loop over the steps it ran (same start, same batches)
    sub = batches(len(x), batch, 0)[: naive_steps + 1]
    step_n, vals_n = sgd_naive(fresh(), x, y, lr, xv, yv)
    step_t, vals_t = sgd_tracker(fresh(), x, y, lr, xv, yv)
    for idx in sub:
        step_n(idx)
        step_t(idx)
    seen = np.concatenate([i.numpy() for i in sub])
    v_n, v_t = vals_n(), vals_t()
    agree = np.abs(v_t[seen] - v_n[seen]).max() / np.abs(v_n[seen]).max()
    return rows, per_step["naive"] / per_step[k_sum], agree, pv_ok


def mislabel(quick: bool):
    d = load_digits_split(flip_fraction=0.1, seed=0)
    x = torch.as_tensor(d.x_train)
    y = torch.as_tensor(d.y_train).long()
    xv = torch.as_tensor(d.x_test[:100])
    yv = torch.as_tensor(d.y_test[:100]).long()
    epochs = 8 if quick else 20

    def run(layers):
        """The same SGD run (the tracker leaves training bit-identical), in-run values from
        all layers or from ``layers`` only, and TracIn checkpoints every second epoch."""
        torch.manual_seed(0)
        model = DigitsCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), layers=layers)
        ckpts, lrs = [], []
        t0 = time.perf_counter()
        for e in range(epochs):
            for idx in batches(len(x), 64, e):
                opt.zero_grad()
                tr.step(x[idx], y[idx], idx, lr=0.1)
                opt.step()
            if e % 2 == 1:
                ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
                lrs.append(0.1)
        return model, tr.values, ckpts, lrs, time.perf_counter() - t0

    model, values, ckpts, lrs, t_train = run(None)
    _, values_head, _, _, t_head = run(["fc1", "fc2"])
    out = []
    for proj in (None, 256):
        tc = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=proj)
        t0 = time.perf_counter()
        si = tc.self_influence(x, y).numpy()
        t_si = time.perf_counter() - t0
        label = "TracInCP self-influence" + ("" if proj is None else f" (proj d={proj})")
        out.append((label, si, t_si))
    out.append(("In-Run value (lowest = harmful)", -values, t_train))
    out.append(("In-Run value, fc1+fc2 only", -values_head, t_head))
    print(f"\nMislabel detection: digits, {d.flipped.sum()} of {len(x)} labels flipped, "
          f"DigitsCNN, {epochs} epochs SGD, {len(ckpts)} checkpoints, 100 validation points")
    print(f"{'score':<38}{'top 10%':>10}{'top 20%':>10}{'recall@20%':>12}{'time s':>9}")
    for label, score, t in out:
        order = np.argsort(-score)
        r = []
        for frac in (0.1, 0.2):
            top = order[: int(frac * len(score))]
            r.append(d.flipped[top].mean())
        recall = d.flipped[order[: int(0.2 * len(score))]].sum() / d.flipped.sum()
        print(f"{label:<38}{r[0]:>10.2f}{r[1]:>10.2f}{recall:>12.2f}{t:>9.2f}")
    print("(random ranking: 0.10 share of flipped points in any top set)")


def bench_resnet(sizes, epochs: int, reps: int, width: int, size: int,
                 test_per_batch: list[float] | None = None) -> None:
    """Plain vs In-Run training of the images recipe's ResNet18 on generated folders (the
    variants alternate run by run, so that load changes on a shared machine hit all alike)."""
    import csv
    import tempfile
    from pathlib import Path

    from dvl_ooc.data import ImageFolder
    from dvl_ooc.demo.malaria import make_malaria_folder
    from dvl_ooc.demo.resnet import ResNet18, channel_stats, train_resnet
    from dvl_ooc.query import roc_auc
    from dvl_ooc.recipes.images import INRUN_TEST_PER_BATCH, inrun_tracker

    fractions = test_per_batch or [INRUN_TEST_PER_BATCH]
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), float32; "
          f"ResNet18(width={width}, stem='imagenet') on {size}x{size} images, AdamW, batch 64, "
          f"{epochs} epoch(s); times: process CPU s (wall s), median of {reps}; RSS +MB: the "
          "largest growth of the resident set over one run (a leak grows with the epochs)")
    print(f"{'images':>7}{'train':>7}{'test':>6}  {'training':<22}{'CPU s':>8}{'wall s':>8}"
          f"{'ratio':>7}{'RSS +MB':>9}{'same net':>9}{'AUC':>7}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "cells"
            make_malaria_folder(root, n, seed=0, flip_fraction=0.1, min_size=48, max_size=80,
                                workers=1)
            ds = ImageFolder(root, size=size)
            x = np.stack([ds.load(i) for i in range(len(ds))]).astype(np.float16)
            y = np.asarray(ds.targets)
            with open(root / "flipped.csv", newline="") as fh:
                wrong = {r["path"] for r in csv.DictReader(fh)}
        rng = np.random.default_rng(0)
        perm = rng.permutation(n)
        n_te = n // 5
        te, tr = perm[:n_te], perm[n_te:]
        flipped = np.array([p in wrong for p in ds.paths])
        # the generator flips labels folder-wide: give the test part its true labels back
        # (2 classes), so that the values are taken against a clean test loss
        y = np.where(flipped & np.isin(np.arange(n), te), 1 - y, y)
        known = flipped[tr]
        mean, std = channel_stats((x[tr], y[tr]), background=None)
        variants: list[float | None] = [None, *fractions]
        times: dict[float | None, list[tuple[float, float]]] = {v: [] for v in variants}
        growth: dict[float | None, float] = dict.fromkeys(variants, 0.0)
        nets, values, k_used = {}, {}, {}
        for v in variants:  # untimed warm-up of both variants (one-off kernel set-up costs)
            warm = ResNet18(2, width, 3, "imagenet", mean=mean, std=std, seed=0)
            warm_tr = tr[:256]
            train_resnet(warm, (x[warm_tr], y[warm_tr]), epochs=1, lr=2e-3, batch_size=64,
                         seed=0, backward=None if v is None else inrun_tracker(
                             warm, x[te], y[te], len(warm_tr), batch_size=64, seed=0,
                             test_per_batch=v).step)
        for _ in range(reps):
            for v in variants:
                model = ResNet18(2, width, 3, "imagenet", mean=mean, std=std, seed=0)
                tracker = None if v is None else inrun_tracker(
                    model, x[te], y[te], len(tr), batch_size=64, seed=0, test_per_batch=v)
                r0 = rss_mb()
                c0, w0 = time.process_time(), time.perf_counter()
                train_resnet(model, (x[tr], y[tr]), epochs=epochs, lr=2e-3, batch_size=64,
                             seed=0, backward=None if tracker is None else tracker.step)
                times[v].append((time.process_time() - c0, time.perf_counter() - w0))
                growth[v] = max(growth[v], rss_mb() - r0)
                nets[v] = model.state_dict()
                if tracker is not None:
                    values[v], k_used[v] = tracker.values, tracker.val_sample or n_te
        med = {v: np.median(np.array(t), axis=0) for v, t in times.items()}
        for v in variants:
            cpu, wall = med[v]
            label = "plain" if v is None else f"In-Run, {k_used[v]} test/step"
            same = "" if v is None else str(all(torch.equal(nets[None][k], nets[v][k])
                                                for k in nets[None]))
            auc = "" if v is None else f"{roc_auc(known, -values[v]):.3f}"
            print(f"{n:>7}{len(tr):>7}{n_te:>6}  {label:<22}{cpu:>8.1f}{wall:>8.1f}"
                  f"{cpu / med[None][0]:>7.2f}{growth[v]:>9.0f}{same:>9}{auc:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (full run)")
    ap.add_argument("--device", default="cpu",
                    help="device of the speed table (cuda: synchronised wall time per step)")
    ap.add_argument("--malloc-tuned", action="store_true",
                    help="keep freed memory in the process (glibc mallopt), so that large "
                         "temporaries are not page-faulted in again at every step")
    ap.add_argument("--resnet", type=int, nargs="+", metavar="N",
                    help="time the images recipe's training plain vs with --inrun on generated "
                         "folders of N images each (instead of everything else)")
    ap.add_argument("--reps", type=int, default=2, help="--resnet: runs of each (median)")
    ap.add_argument("--width", type=int, default=16, help="--resnet: ResNet18 width")
    ap.add_argument("--size", type=int, default=64, help="--resnet: image size in pixels")
    ap.add_argument("--test-per-batch", type=float, nargs="+",
                    help="--resnet: test images per step / batch size, one In-Run row each "
                         "(default: the recipe's)")
    args = ap.parse_args()
    if args.malloc_tuned:
        tune_malloc()
    torch.set_num_threads(args.threads)
    if args.resnet:
        bench_resnet(args.resnet, 1 if args.quick else args.epochs, args.reps, args.width,
                     args.size, args.test_per_batch)
        return
    d = load_digits_split(seed=0)
    x8 = torch.as_tensor(d.x_train)
    y = torch.as_tensor(d.y_train).long()
    xv8 = torch.as_tensor(d.x_test[: args.n_val])
    yv = torch.as_tensor(d.y_test[: args.n_val]).long()
    n32 = 384 if args.quick else len(x8)
    x32 = F.interpolate(x8[:n32], size=(32, 32), mode="bilinear", align_corners=False)
    xv32 = F.interpolate(xv8, size=(32, 32), mode="bilinear", align_corners=False)
    epochs = 1 if args.quick else args.epochs

    device = torch.device(args.device)
    timing = "synchronised wall" if device.type == "cuda" else "process CPU"
    print(f"torch {torch.__version__}, {device}, {args.threads} thread(s), float32, SGD, batch "
          f"{args.batch}, {args.n_val} validation points; median {timing} time per step over "
          f"{epochs} epoch(s), variants interleaved step by step; allocator "
          f"{'tuned' if args.malloc_tuned else 'default'}")
    all_rows, notes = [], []
    torch.manual_seed(0)
    for name, make, x, yy, xv in (
        ("DigitsCNN 8x8", lambda: DigitsCNN(), x8, y, xv8),
        ("CNN32 32x32", lambda: CNN32(), x32, y[:n32], xv32),
    ):
        naive_steps = 2 if args.quick else 8
        rows, speedup, agree, pv_ok = bench_speed(name, make, x, yy, xv, yv, args.batch, 0.05,
                                                  epochs, naive_steps, ["fc1", "fc2"], device)
        all_rows += rows
        notes.append(f"{name}: n_train={len(x)}, tracker {speedup:.1f}x faster than naive; "
                     f"max |tracker - naive| / max|naive| = {agree:.1e}; "
                     f"per-val scores sum to summed scores: {pv_ok}")
    print(f"\n{'model':<16}{'method':<34}{'s/epoch':>12}{'x plain':>9}")
    for name, method, t, ratio in all_rows:
        print(f"{name:<16}{method:<34}{t:>12.3f}{ratio:>9.2f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    for n in notes:
        print(n)
    mislabel(args.quick)


if __name__ == "__main__":
    main()
