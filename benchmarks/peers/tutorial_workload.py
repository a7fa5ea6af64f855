"""The workload of pyDVL's TMC-Shapley tutorial, shared by both sides of the comparison.

Imported by ``benchmarks/bench_valuation.py --tutorial`` (dvl_ooc's venv) and by
``benchmarks/peers/pydvl_tmc_tutorial.py`` (pyDVL's venv), so both value the very same points
with the very same network. Needs only numpy, scikit-learn and torch (no pyDVL, no dvl_ooc).

Source: pyDVL's notebook ``notebooks/shapley_skorch.ipynb`` ("Computing Shapley values for a
torch model", aai-institute/pyDVL, 2025-09) with ``SimpleCNN`` from
``notebooks/support/banzhaf.py`` and the split of ``notebooks/support/datasets.py``:

* data: scikit-learn's digits, pixels / 16 as float32 images ``(1, 8, 8)``, labels int64;
  ``train_test_split(train_size=0.7, random_state=36, stratify=y)`` (1257 train / 540 test);
* model: ``SimpleCNN`` = Conv2d(1->8, 5x5, same) -> Conv2d(8->4, 3x3, same) -> MaxPool2d(2)
  -> Flatten -> Linear(64->10) -> Softmax (no activations; the softmax output goes into
  ``CrossEntropyLoss``, as in the notebook), 1,150 parameters;
* training: skorch ``NeuralNetClassifier(criterion=CrossEntropyLoss, optimizer=Adam, lr=0.01,
  batch_size=128, train_split=None)``, the notebook's ``max_epochs=24``; skorch's DataLoader
  does not shuffle (minibatches in the order pyDVL passes the subset);
* valuation: ``TMCShapleyValuation(truncation=RelativeTruncation(rtol=0.05,
  burn_in_fraction=0.3))``, accuracy on the test split, ``MinUpdates(100)``, joblib with 6 jobs.

The benchmark's workload (issue 14) shrinks it to fit a 2-core machine: the first ``n_train``
(300) points of that training split, ``flip_fraction`` (10 %) of their labels flipped to another
class (seeded), 10 epochs, and a wall-clock budget instead of ``MinUpdates(100)``. The test set
is the notebook's 540-point test split. ``--epochs 24 --n-train 1257 --flip 0`` is the
notebook's own run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: the tutorial's settings (the notebook's values; ``epochs`` is the issue's 10, notebook 24)
TUTORIAL = {
    "split_seed": 36, "train_size": 0.7, "lr": 0.01, "batch_size": 128, "epochs": 10,
    "notebook_epochs": 24, "rtol": 0.05, "burn_in_fraction": 0.3, "n_train": 300,
    "flip_fraction": 0.1,
}
FRACTIONS = (0.10, 0.15, 0.20)


class SimpleCNN(nn.Module):
    """The tutorial's network (``notebooks/support/banzhaf.py``), input ``(B, 1, 8, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels=1, out_channels=8, kernel_size=(5, 5), padding="same"),
            nn.Conv2d(in_channels=8, out_channels=4, kernel_size=(3, 3), padding="same"),
            nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
            nn.Linear(in_features=64, out_features=10),
            nn.Softmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class Workload:
    x_train: np.ndarray  # (n, 1, 8, 8) float32
    y_train: np.ndarray  # (n,) int64, with the flipped labels
    flipped: np.ndarray  # (n,) bool
    x_test: np.ndarray   # (540, 1, 8, 8) float32
    y_test: np.ndarray   # (540,) int64


def load_workload(n_train: int = 300, flip_fraction: float = 0.1, seed: int = 0) -> Workload:
    """The tutorial's split, its first ``n_train`` training points, seeded label flips."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=TUTORIAL["train_size"], random_state=TUTORIAL["split_seed"], stratify=y)
    n = min(int(n_train), len(x_tr))
    x_tr, y_tr = x_tr[:n], y_tr[:n].copy()
    rng = np.random.default_rng(seed)
    k = int(round(flip_fraction * n))
    idx = rng.choice(n, size=k, replace=False)
    y_tr[idx] = (y_tr[idx] + rng.integers(1, 10, size=k)) % 10  # always another class
    flipped = np.zeros(n, dtype=bool)
    flipped[idx] = True
    return Workload(x_tr, y_tr, flipped, x_te, y_te)


def detection(values: np.ndarray, flipped: np.ndarray, fracs=FRACTIONS) -> list[float]:
    """Share of flipped labels among the lowest-valued ``fracs`` of the points."""
    order = np.argsort(np.asarray(values), kind="stable")
    return [float(np.asarray(flipped)[order[: int(round(f * len(order)))]].mean())
            for f in fracs]
