"""Sizing an ImageNet-size job before renting a cluster (issue 23 §4): a dry-run plan.

    python benchmarks/plan_imagenet.py [--tflops 50] [--io-gbs 1] [--budget-gib 32]

1,281,167 train x 50,000 test images at 3 x 224 x 224 (read as float16, as ``dvl-ooc images``
caches them), a ResNet-18 layout (:class:`dvl_ooc.demo.resnet.ResNet18`, ImageNet stem, 1000
classes) widened to ~25 M parameters, self-influence on, float32 store, default chunks, planned
with :func:`dvl_ooc.calculator.plan.dry_run_plan` (no data, no cluster, no fit: the widths of
EK-FAC's and projected Direct's features do not depend on the fit) for

* the recipe's default: ``EkfacInfluence(layers="supported", rank=64)`` at the default
  ``max_test_feature_bytes`` (1 GiB), and again with it raised to half the task budget;
* projected ``DirectInfluence(projection=dict(k_in=16, k_out=16, dense_dim=64))``.

Hours on N GPU workers = FLOPs / (N x ``--tflops``) + input and store bytes / (N x ``--io-gbs``),
perfect scaling, no overlap, fit not included. The GPU rate is an ASSUMPTION (printed as
such); what is measured is this CPU on one thread: per-sample gradients of the network and one
EK-FAC tile, on a few random images (a few seconds in all).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc import DirectInfluence, EkfacInfluence
from dvl_ooc.calculator.plan import InfluencePlan, dry_run_plan
from dvl_ooc.demo.resnet import ResNet18
from dvl_ooc.runtime import format_bytes

N_TRAIN, N_TEST, SIZE, CLASSES = 1_281_167, 50_000, 224, 1000
SHAPE = (3, SIZE, SIZE)
IN_ITEM = 2  # float16 inputs
RANK, MB = 64, 32  # the recipe's rank and micro-batch
SVD_FACTOR = 2.5  # EK-FAC docstring: rank-r test features cost ~2.5x the preconditioning
GIB = 1 << 30


def _width_for(target: int) -> tuple[int, int]:
    """The width whose parameter count is closest to ``target`` (counted on the meta device)."""
    best = (0, 0)
    for w in range(80, 112):
        with torch.device("meta"):
            n = sum(p.numel() for p in ResNet18(width=w, stem="imagenet",
                                                 n_classes=CLASSES).parameters())
        if best == (0, 0) or abs(n - target) < abs(best[1] - target):
            best = (w, n)
    return best


def _layers(net: nn.Module) -> list[tuple[int, int]]:
    """``(d_out, d_a)`` of every Conv2d / Linear (``d_a``: inputs of one output, +1 for bias)."""
    out = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            d_a = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            out.append((m.out_channels, d_a + (m.bias is not None)))
        elif isinstance(m, nn.Linear):
            out.append((m.out_features, m.in_features + (m.bias is not None)))
    return out


def _forward_macs(net: nn.Module) -> int:
    """Multiply-adds of one forward pass of one image (Conv2d and Linear layers, by hooks)."""
    macs = [0]

    def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        per = (m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
               if isinstance(m, nn.Conv2d) else m.in_features)
        macs[0] += out.numel() * per

    hs = [m.register_forward_hook(hook) for m in net.modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, *SHAPE))
    for h in hs:
        h.remove()
    return macs[0]


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _flops(plan: InfluencePlan, grad_flops: float, layers: list[tuple[int, int]]
           ) -> dict[str, float]:
    """FLOPs of a run by part (2 per multiply-add)."""
    # tiles: the plan's count (for EK-FAC with rank-r test factors it includes their expansion
    # once per (test row, train chunk), layer by layer)
    tile = plan.tile_multiply_adds
    if plan.method == "EkfacInfluence":
        # a solve rotates into the eigenbasis and back, per layer; rank-r rows add the SVDs
        solve = SVD_FACTOR * sum(2 * (o * o * a + o * a * a) for o, a in layers)
    else:
        solve = plan.k_test ** 2  # a k x k product per solve
    return {"gradients": plan.gradient_computations * grad_flops, "tiles": 2 * tile,
            "solves": 2 * plan.preconditioning_solves * solve}


def _io_bytes(plan: InfluencePlan) -> int:
    """Inputs read (the train set once per test group) and influences written."""
    sample = IN_ITEM * SHAPE[0] * SHAPE[1] * SHAPE[2]
    return (plan.n_test + plan.groups * plan.n_train) * sample + plan.store_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflops", type=float, default=50.0,
                    help="ASSUMED effective TFLOP/s of one GPU (default 50: an H100)")
    ap.add_argument("--io-gbs", type=float, default=1.0,
                    help="ASSUMED GB/s of input reads + store writes per worker")
    ap.add_argument("--budget-gib", type=float, default=32.0,
                    help="memory_budget of one task (Dask's default on a worker with "
                    "memory_limit=64GiB, 1 thread: 32 GiB)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32, 64])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()

    width, n_params = _width_for(25_000_000)
    torch.manual_seed(0)
    net = ResNet18(width=width, stem="imagenet", n_classes=CLASSES).eval()
    layers = _layers(net)
    fwd = _forward_macs(net)
    grad_flops = 3 * 2 * fwd  # forward + backward to the inputs + to the weights
    print(f"network: ResNet18(width={width}, stem='imagenet', n_classes={CLASSES}): "
          f"{n_params:,} parameters, {len(layers)} Conv2d/Linear layers; forward "
          f"{2 * fwd / 1e9:.2f} GFLOP per {SIZE} px image (hooks), per-sample gradient "
          f"~{grad_flops / 1e9:.1f} GFLOP (3x forward)")
    ekfac = EkfacInfluence(net, F.cross_entropy, layers="supported", rank=RANK,
                           micro_batch_size=MB)
    direct = DirectInfluence(net, F.cross_entropy, micro_batch_size=MB,
                             projection=dict(k_in=16, k_out=16, dense_dim=64, seed=0))
    print("models: NOT fitted (nothing is fitted on any data): a dry run needs only the "
          "widths of the features, which come from EK-FAC's layers and rank and from the "
          "projection\n")

    budget = int(args.budget_gib * GIB)
    common = dict(memory_budget=budget, sample_dtype="float16", self_influence=True)
    rows = [("EK-FAC r64 (default 1 GiB bound)",
             dry_run_plan(ekfac, N_TEST, N_TRAIN, SHAPE, **common)),
            (f"EK-FAC r64, {format_bytes(budget // 2)} bound",
             dry_run_plan(ekfac, N_TEST, N_TRAIN, SHAPE, max_test_feature_bytes=budget // 2,
                          **common)),
            ("Direct proj k=16", dry_run_plan(direct, N_TEST, N_TRAIN, SHAPE, **common))]
    for name, plan in rows:
        print(f"--- {name}: plan().summary()")
        print(plan.summary(), "\n")

    fb = format_bytes
    cache = (N_TRAIN + N_TEST) * IN_ITEM * SHAPE[0] * SHAPE[1] * SHAPE[2]
    print(f"stored: influences {N_TEST:,} x {N_TRAIN:,} float32 + self-influence = "
          f"{rows[0][1].store_bytes / 1e9:.1f} GB ({fb(rows[0][1].store_bytes)}), uncompressed; "
          f"the recipe's decoded float16 image cache {cache / 1e9:.0f} GB more")
    flops = [_flops(pl, grad_flops, layers) for _, pl in rows]
    print(f"\n{'':32s} {'groups':>6s} {'tiles':>10s} {'chunk':>10s} {'gradients':>14s} "
          f"{'grad PF':>8s} {'tile PF':>8s} {'solve PF':>8s} {'I/O TB':>7s}")
    for (name, pl), f in zip(rows, flops):
        chunk = f"{pl.test_chunk}x{pl.train_chunk}"
        print(f"{name:32s} {pl.groups:6d} {pl.tiles:10,d} {chunk:>10s} "
              f"{pl.gradient_computations:14,d} {f['gradients'] / 1e15:8.0f} "
              f"{f['tiles'] / 1e15:8.0f} {f['solves'] / 1e15:8.0f} {_io_bytes(pl) / 1e12:7.1f}")
    print("(gradients = n_test + groups x n_train per-sample gradients; PF = 1e15 FLOP; I/O = "
          "float16 inputs read once per test group + the store written)")

    # ---- measured here: one CPU thread, a few random images
    x, y = torch.randn(2, *SHAPE), torch.randint(0, CLASSES, (2,))
    ekfac.gradients(x[:1], y[:1])  # warm-up
    t_ek = _timed(lambda: ekfac.gradients(x, y))
    t_pr = _timed(lambda: direct.gradients(x, y))
    p = ekfac.grads.num_params
    k_test = rows[0][1].k_test
    T, R = torch.randn(2, k_test), torch.randn(4, p)
    t_tile = _timed(lambda: ekfac.tile(T, R))
    tile_macs = 2 * p * (RANK + 4)
    cpu = {"gradients": 2 * grad_flops / t_ek, "tiles": 2 * tile_macs / t_tile}
    print(f"\nMEASURED on this CPU, 1 thread, random {SIZE} px images: per-sample gradients "
          f"{2 / t_ek:.2f} images/s (EK-FAC hooks; {cpu['gradients'] / 1e9:.0f} GFLOP/s "
          f"effective), {2 / t_pr:.2f} images/s (projected Direct); one EK-FAC tile 2 test x 4 "
          f"train {t_tile:.2f} s ({cpu['tiles'] / 1e9:.0f} GFLOP/s effective)")
    cpu_h = [sum(f[k] / cpu["tiles" if k == "tiles" else "gradients"] for k in f) / 3600
             for f in flops]
    print("  at these rates one CPU thread would need "
          + ", ".join(f"{name}: {h / 24 / 365:,.1f} years" for (name, _), h in zip(rows, cpu_h)))

    rate = args.tflops * 1e12
    io = args.io_gbs * 1e9
    print(f"\nASSUMED (not measured: no GPU has been lent to this project): {args.tflops:g} "
          "TFLOP/s effective per GPU worker (an H100 SXM: TF32 tensor-core convolutions, "
          "dense peak 495; fp32 GEMMs, peak 67) on every FLOP counted above; "
          f"{args.io_gbs:g} GB/s of input reads + store writes per worker; perfect scaling; "
          "compute and I/O not overlapped; startup, JPEG decoding and the fit (below) not "
          "included: lower bounds")
    print(f"hours on N GPU workers (compute + I/O); 1 GPU = {args.tflops:g} TFLOP/s:")
    print(f"{'N':>4s}  " + "  ".join(f"{name:>32s}" for name, _ in rows))
    for n in args.workers:
        cells = []
        for (_, pl), f in zip(rows, flops):
            c, i = sum(f.values()) / (n * rate) / 3600, _io_bytes(pl) / (n * io) / 3600
            cells.append(f"{c + i:.3g} ({c:.3g} + {i:.3g})")
        print(f"{n:4d}  " + "  ".join(f"{c:>32s}" for c in cells))
    # the fit runs in the client's process (one GPU), on every training image by default
    ek_fit = 3 * (CLASSES - 1) * 2 * fwd  # ggn: C - 1 pseudo-gradients, two data passes
    hours = ", ".join(f"{n:,} images {n * ek_fit / rate / 3600:.3g} h" for n in (N_TRAIN, 10_000))
    print(f"not in the table, the fit (one process, one GPU, not divided by N): EK-FAC with "
          f"fisher='ggn' costs up to ~3 x {CLASSES - 1} forward passes per fit image (its "
          f"{CLASSES - 1} pseudo-gradients, covariance and eigenvalue passes; fewer when a "
          f"confident softmax drops negligible ones): {hours} (--fit-samples); with "
          f"fisher='sampled' (the recipe's --fisher auto above 16 classes) one label per image, "
          f"two data passes: {N_TRAIN * 3 * 2 * fwd / rate / 3600:.3g} h; projected "
          f"Direct one gradient per fit image: {N_TRAIN * grad_flops / rate / 3600:.2g} h")
    print(f"\n[{time.perf_counter() - t_all:.1f} s]")


if __name__ == "__main__":
    main()
