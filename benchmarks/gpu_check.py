"""CUDA correctness and timing of every influence model (needs a GPU; prints a table).

Each method is fitted in float64 on the CPU and on ``cuda`` from the same trained digits model;
the influence matrices must agree to float64 rounding (relative error < 1e-8, LiSSA/CG to their
solver tolerance), which validates the device handling of gradients, curvature products and
fitted states. Then the float32 digits CNN is timed on both devices. First, In-Run Shapley
(every mode) and TracIn on CUDA against the CPU, and training with the tracker against plain
training on CUDA.

    python benchmarks/gpu_check.py                  # needs a GPU
    python benchmarks/gpu_check.py --inrun-dry-run  # the In-Run part, cpu vs cpu (no GPU)
    python benchmarks/gpu_check.py --dry-run        # everything, cpu vs cpu (no GPU)
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

import dvl_ooc
from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN, DigitsMLP, train_classifier


def _methods(reg: float) -> dict:
    gn = dict(regularization=reg, hessian="gauss-newton")
    return {
        "direct": lambda m: dvl_ooc.DirectInfluence(m, F.cross_entropy, **gn),
        "cg": lambda m: dvl_ooc.CgInfluence(m, F.cross_entropy, rtol=1e-10, **gn),
        "lissa": lambda m: dvl_ooc.LissaInfluence(m, F.cross_entropy, max_iter=200, **gn),
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


def _inrun_values(device: str, d, kw: dict, steps: int = 6) -> tuple[np.ndarray, list]:
    """Six SGD steps of a float64 digits CNN with the tracker on ``device``."""
    torch.manual_seed(0)
    model = DigitsCNN().double().to(device)
    x = torch.as_tensor(d.x_train[: 32 * steps]).double().to(device)
    y = torch.as_tensor(d.y_train[: 32 * steps]).to(device)
    xv = torch.as_tensor(d.x_test[:20]).double().to(device)
    yv = torch.as_tensor(d.y_test[:20]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tr = dvl_ooc.InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), val_batch_size=8,
                              **kw) if kw is not None else None
    for s in range(steps):
        idx = torch.arange(32 * s, 32 * (s + 1))
        opt.zero_grad()
        if tr is None:
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        else:
            tr.step(x[idx], y[idx], idx, lr=0.1)
        opt.step()
    params = [p.detach().cpu() for p in model.parameters()]
    return (tr.values if tr is not None else None), params


def inrun_check(device: str) -> None:
    """In-Run Shapley and TracIn on ``device`` against the CPU (float64), and the tracker's
    training against plain training on ``device`` (deterministic kernels: bit for bit)."""
    d = load_digits_split(seed=0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    print(f"\nIn-Run Shapley, float64 digits CNN, 6 steps of 32, 20 validation points: "
          f"{device} vs cpu")
    print(f"{'mode':<34} {'rel err':>10} {'weights == plain':>17}")
    _, plain = _inrun_values(device, d, None)
    for label, kw in (("summed", {}), ("per validation point", {"per_validation_point": True}),
                      ("combined, summed", {"combined": True}),
                      ("combined, per validation point",
                       {"combined": True, "per_validation_point": True}),
                      ("second order", {"second_order": True}),
                      ("layers fc1+fc2", {"layers": ["fc1", "fc2"]})):
        ref, _ = _inrun_values("cpu", d, kw)
        got, weights = _inrun_values(device, d, kw)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if kw.get("combined"):  # rebuilt gradients: equal to rounding, not bit for bit
            same = "allclose" if all(torch.allclose(a, b, rtol=1e-10, atol=1e-12)
                                     for a, b in zip(weights, plain)) else "NOT close"
        else:
            same = all(torch.equal(a, b) for a, b in zip(weights, plain))
        print(f"{label:<34} {err:>10.2e} {str(same):>17}")
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(0)
    model = DigitsCNN().double()
    ckpts = [{k: v.clone() for k, v in model.state_dict().items()}]
    x = torch.as_tensor(d.x_train[:300]).double()
    y = torch.as_tensor(d.y_train[:300])
    vals = {}
    for dev in ("cpu", device):
        tc = dvl_ooc.TracInCP(model.to(dev), F.cross_entropy, ckpts, 0.1, projection_dim=128)
        vals[dev] = tc.self_influence(x.to(dev), y.to(dev)).double().cpu().numpy()
    err = np.linalg.norm(vals[device] - vals["cpu"]) / np.linalg.norm(vals["cpu"])
    print(f"TracInCP self-influence (projection 128): rel err {err:.2e}")
    print("timings: python benchmarks/bench_inrun.py --device cuda")


def main() -> None:
    import sys

    if "--inrun-dry-run" in sys.argv:  # the In-Run part with cpu in place of cuda
        inrun_check("cpu")
        return
    # --dry-run: the whole script with cpu in place of cuda (checks the script, not CUDA)
    dev = "cpu" if "--dry-run" in sys.argv else "cuda"
    if dev == "cuda":
        assert torch.cuda.is_available(), "needs a GPU"
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    try:
        inrun_check(dev)
    except Exception as e:  # noqa: BLE001 - report and go on with the influence models
        print(f"In-Run check FAILED: {type(e).__name__}: {e}")
    d = load_digits_split(seed=0)
    torch.manual_seed(0)
    mlp = train_classifier(DigitsMLP(hidden=16).double(), d.x_train[:400], d.y_train[:400],
                           epochs=30)
    print(f"\nfloat64 MLP (1210 params), 400 train x 100 test: {dev} vs cpu")
    print(f"{'method':<10} {'rel err':>10} {'cpu fit s':>10} {'gpu fit s':>10}")
    for name, make in _methods(1e-2).items():
        try:
            a, fa, _ = _run(make, mlp, "cpu", torch.float64, d, 400, 100)
            b, fb, _ = _run(make, mlp, dev, torch.float64, d, 400, 100)
        except Exception as e:  # noqa: BLE001
            print(f"{name:<10} FAILED: {type(e).__name__}: {e}")
            continue
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
        try:
            a, fa, ia = _run(make, cnn, "cpu", torch.float32, d, 1257, 540)
            _run(make, cnn, dev, torch.float32, d, 64, 8)  # warm-up kernels
            b, fb, ib = _run(make, cnn, dev, torch.float32, d, 1257, 540)
        except Exception as e:  # noqa: BLE001
            print(f"{name:<10} FAILED: {type(e).__name__}: {e}")
            continue
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        print(f"{name:<10} {fa:>10.2f} {ia:>15.3f} {fb:>10.2f} {ib:>15.3f} {err:>9.1e}")


if __name__ == "__main__":
    main()
