"""pyDVL 0.10 + skorch on the TMC-Shapley tutorial workload, for a time budget; one JSON line.

Runs in pyDVL's own virtualenv (never dvl_ooc's), e.g.::

    /work/peers/pydvl/bin/python benchmarks/peers/pydvl_tmc_tutorial.py --workers 2 --budget 30

What it does: the workload of :mod:`tutorial_workload` (the notebook
``notebooks/shapley_skorch.ipynb``, shrunk to 300 points with 10 % flipped labels, 10 epochs);
``ModelUtility(NeuralNetClassifier(SimpleCNN, ...), accuracy on the test split)``,
``TMCShapleyValuation(truncation=RelativeTruncation(0.05, 0.3), is_done=MaxTime(budget))``
under ``joblib.parallel_config(n_jobs=workers)`` (loky processes; ``n_jobs=1`` runs in this
process, as joblib does). The loky workers are started and have imported torch/skorch before
the clock starts, so worker start-up is not timed (dvl_ooc's cluster start-up is not either).

Adaptations to pyDVL 0.10.0 (the notebook targets the unreleased pyDVL after 0.10):
``Dataset`` is numpy-only and 2-D (``check_X_y``), so images are stored flat ``(n, 64)`` and
the module reshapes them to ``(n, 1, 8, 8)`` (same parameters, same arithmetic);
``SkorchSupervisedScorer`` (not in 0.10) is only ``SupervisedScorer`` with numpy labels, which
is what 0.10's ``SupervisedScorer`` gets here.

Counting: every model training (a non-empty subset; pyDVL scores the empty one with the default
without training) is counted in the process that runs it, in a file per process, and summed
after ``fit``; ``trainings_per_s`` is that count over the wall time of ``fit`` (which includes
the total-utility training of ``RelativeTruncation`` and finishing in-flight batches).

Prints: ``{"method", "workers", "budget_s", "seconds", "trainings", "trainings_per_s",
"detection": [10 %, 15 %, 20 %], "accuracy_all", "torch_threads", "n_train", "n_flipped",
"peak_rss_mb" (max over the processes that trained), "values", "versions"}``;
``accuracy_all`` is the mean test accuracy of 5 models trained on all points (the check that
both sides train the same model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tutorial_workload import TUTORIAL, SimpleCNN, detection, load_workload  # noqa: E402

_COUNT = 0


def _bump(counter_dir: str) -> None:
    """Record one training of this process (overwrites a per-process file)."""
    global _COUNT
    _COUNT += 1
    with open(os.path.join(counter_dir, f"{os.getpid()}.txt"), "w") as f:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        f.write(f"{_COUNT} {torch.get_num_threads()} {rss:.1f}")


class FlatSimpleCNN(SimpleCNN):
    """SimpleCNN on flat ``(n, 64)`` rows (pyDVL 0.10's Dataset is 2-D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, 1, 8, 8))


def _warm() -> int:
    import skorch  # noqa: F401

    return os.getpid()


def make_model(epochs: int, lr: float, batch_size: int, device: str = "cpu"):
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(
        FlatSimpleCNN, criterion=torch.nn.CrossEntropyLoss, lr=lr, max_epochs=epochs,
        batch_size=batch_size, train_split=None, optimizer=torch.optim.Adam, device=device,
        verbose=False, torch_load_kwargs={"weights_only": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds (MaxTime)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=TUTORIAL["n_train"])
    ap.add_argument("--flip", type=float, default=TUTORIAL["flip_fraction"])
    ap.add_argument("--epochs", type=int, default=TUTORIAL["epochs"])
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads in this process (default: torch's / joblib's choice)")
    ap.add_argument("--device", default="cpu", help="skorch's device (cpu, cuda)")
    ap.add_argument("--no-values", action="store_true", help="omit the values from the JSON")
    args = ap.parse_args()

    from joblib import Parallel, delayed, parallel_config
    from pydvl.valuation.dataset import Dataset
    from pydvl.valuation.methods import TMCShapleyValuation
    from pydvl.valuation.samplers import RelativeTruncation
    from pydvl.valuation.scorers import SupervisedScorer
    from pydvl.valuation.stopping import MaxTime
    from pydvl.valuation.utility import ModelUtility

    class CountingModelUtility(ModelUtility):
        """pyDVL's ModelUtility, counting trainings per process."""

        def __init__(self, *a, counter_dir: str, **kw) -> None:
            self.counter_dir = counter_dir
            super().__init__(*a, **kw)

        def _utility(self, sample) -> float:
            value = super()._utility(sample)
            _bump(self.counter_dir)
            return value

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    w = load_workload(args.n_train, args.flip, args.seed)
    n = len(w.x_train)
    train = Dataset(w.x_train.reshape(n, -1), w.y_train)
    test = Dataset(w.x_test.reshape(len(w.x_test), -1), w.y_test)
    model = make_model(args.epochs, TUTORIAL["lr"], TUTORIAL["batch_size"], args.device)

    accs = []
    for _ in range(5):  # the model trained on all points (before the clock starts)
        m = make_model(args.epochs, TUTORIAL["lr"], TUTORIAL["batch_size"], args.device)
        m.fit(*train.data())
        accs.append(float(m.score(*test.data())))

    with tempfile.TemporaryDirectory(prefix="pydvl_count_") as counter_dir:
        scorer = SupervisedScorer(model, test_data=test, default=0.0, range=(0, 1))
        utility = CountingModelUtility(model=model, scorer=scorer, counter_dir=counter_dir)
        truncation = RelativeTruncation(rtol=TUTORIAL["rtol"],
                                        burn_in_fraction=TUTORIAL["burn_in_fraction"])
        valuation = TMCShapleyValuation(utility, truncation=truncation,
                                        is_done=MaxTime(args.budget), seed=args.seed,
                                        progress=False)
        with parallel_config(n_jobs=args.workers):
            if args.workers > 1:  # start the loky workers and import torch/skorch there
                Parallel()(delayed(_warm)() for _ in range(4 * args.workers))
            t = time.perf_counter()
            valuation.fit(train)
            seconds = time.perf_counter() - t
        trainings, threads = 0, []
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for f in Path(counter_dir).glob("*.txt"):
            c, th, r = f.read_text().split()
            trainings += int(c)
            threads.append(int(th))
            rss = max(rss, float(r))
    res = valuation.result
    values = np.zeros(n)
    values[np.asarray(res.indices, dtype=int)] = np.asarray(res.values, dtype=float)
    values = np.nan_to_num(values)

    import pydvl
    import sklearn
    import skorch

    out = {
        "method": "pyDVL 0.10 + skorch", "workers": args.workers, "budget_s": args.budget,
        "seconds": seconds, "trainings": trainings, "trainings_per_s": trainings / seconds,
        "detection": detection(values, w.flipped), "accuracy_all": float(np.mean(accs)),
        "torch_threads": sorted(set(threads)), "n_train": n, "n_flipped": int(w.flipped.sum()),
        "peak_rss_mb": rss, "device": args.device,
        "versions": {"pydvl": pydvl.__version__, "skorch": skorch.__version__,
                     "torch": torch.__version__, "sklearn": sklearn.__version__,
                     "numpy": np.__version__},
    }
    if not args.no_values:
        out["values"] = values.tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
