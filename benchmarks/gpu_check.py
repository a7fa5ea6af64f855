"""CUDA correctness and timing of every influence model (needs a GPU; prints a table).

Each method is fitted in float64 on the CPU and on ``cuda`` from the same trained digits model;
the influence matrices must agree to float64 rounding (relative error < 1e-8, LiSSA/CG to their
solver tolerance), which validates the device handling of gradients, curvature products and
fitted states. Then the float32 digits CNN is timed on both devices.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

import dvl_ooc
from dvl_ooc.datasets import load_digits_split
from dvl_ooc.nets import DigitsCNN, DigitsMLP, train_classifier


def _methods(reg: float) -> dict:
    gn = dict(regularization=reg, hessian="gauss-newton")
    return {
        "direct": lambda m: dvl_ooc.DirectInfluence(m, F.cross_entropy, **gn),
        "cg": lambda m: dvl_ooc.CgInfluence(m, F.cross_entropy, rtol=1e-10, **gn),
        "lissa": lambda m: dvl_ooc.LissaInfluence(m, F.cross_entropy, depth=200, **gn),
        "arnoldi": lambda m: dvl_ooc.ArnoldiInfluence(m, F.cross_entropy, rank=64, **gn),
        "nystroem": lambda m: dvl_ooc.NystroemSketchInfluence(m, F.cross_entropy, rank=64,
                                                              seed=0, **gn),
        "ekfac": lambda m: dvl_ooc.EkfacInfluence(m, F.cross_entropy, **gn),
    }


def _run(make, model, device, dtype, d, n_train, n_test):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    to = dict(device=device)
    xtr = torch.as_tensor(d.x_train[:n_train]).to(dtype=dtype, **to)
    ytr = torch.as_tensor(d.y_train[:n_train]).to(**to)
    xte = torch.as_tensor(d.x_test[:n_test]).to(dtype=dtype, **to)
    yte = torch.as_tensor(d.y_test[:n_test]).to(**to)
    inf = make(m)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    inf.fit((xtr, ytr))
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    I = inf.influences(xte, yte, xtr, ytr)
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return I.double().cpu().numpy(), t1 - t0, t2 - t1


def main() -> None:
    assert torch.cuda.is_available(), "needs a GPU"
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    d = load_digits_split(seed=0)
    torch.manual_seed(0)
    mlp = train_classifier(DigitsMLP(hidden=16).double(), d.x_train[:400], d.y_train[:400],
                           epochs=30)
    print("\nfloat64 MLP (1210 params), 400 train x 100 test: CUDA vs CPU")
    print(f"{'method':<10} {'rel err':>10} {'cpu fit s':>10} {'gpu fit s':>10}")
    for name, make in _methods(1e-2).items():
        a, fa, _ = _run(make, mlp, "cpu", torch.float64, d, 400, 100)
        b, fb, _ = _run(make, mlp, "cuda", torch.float64, d, 400, 100)
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        print(f"{name:<10} {err:>10.2e} {fa:>10.3f} {fb:>10.3f}")

    torch.manual_seed(0)
    cnn = train_classifier(DigitsCNN(), d.x_train, d.y_train, epochs=30)
    print("\nfloat32 digits CNN (6058 params), 1257 train x 540 test")
    print(f"{'method':<10} {'cpu fit s':>10} {'cpu 540x1257 s':>15} {'gpu fit s':>10} "
          f"{'gpu 540x1257 s':>15} {'rel diff':>9}")
    for name, make in _methods(1e-2).items():
        if name == "lissa":
            continue
        a, fa, ia = _run(make, cnn, "cpu", torch.float32, d, 1257, 540)
        _run(make, cnn, "cuda", torch.float32, d, 64, 8)  # warm-up kernels
        b, fb, ib = _run(make, cnn, "cuda", torch.float32, d, 1257, 540)
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        print(f"{name:<10} {fa:>10.2f} {ia:>15.3f} {fb:>10.2f} {ib:>15.3f} {err:>9.1e}")


if __name__ == "__main__":
    main()
