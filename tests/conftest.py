"""Shared fixtures: small float64 problems on the scikit-learn digits images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsCNN, DigitsMLP, train_classifier

torch.set_num_threads(1)  # tiny models: threads only add spin-wait overhead


@pytest.fixture(scope="session")
def digits():
    return load_digits_split(flip_fraction=0.1, seed=0)


class Problem:
    """A trained float64 model with train/test subsets and its exact reference quantities."""

    def __init__(self, name, model, x_tr, y_tr, x_te, y_te):
        from reference import ref_grads, ref_hessian

        self.name = name
        self.model = model.double().eval()
        self.loss = F.cross_entropy
        self.x_train = torch.as_tensor(x_tr).double()
        self.y_train = torch.as_tensor(y_tr).long()
        self.x_test = torch.as_tensor(x_te).double()
        self.y_test = torch.as_tensor(y_te).long()
        self.H = ref_hessian(self.model, self.loss, self.x_train, self.y_train)
        eig = torch.linalg.eigvalsh(self.H)
        self.top_eig = float(eig[-1])
        self.min_eig = float(eig[0])
        self.g_train = ref_grads(self.model, self.loss, self.x_train, self.y_train)
        self.g_test = ref_grads(self.model, self.loss, self.x_test, self.y_test)

    @property
    def p(self) -> int:
        return self.H.shape[0]

    def small_reg(self, rel: float = 1e-3) -> float:
        """A small damping relative to the spectrum that keeps H + lambda I positive definite."""
        return max(rel * self.top_eig, -self.min_eig + rel * self.top_eig)


def _train(model, d, n_train, n_test, epochs=40, seed=0):
    torch.manual_seed(seed)
    model = model.double()
    train_classifier(model, d.x_train[:n_train], d.y_train[:n_train], epochs=epochs, seed=seed)
    return model


@pytest.fixture(scope="session")
def linear_problem(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    _train(model, digits, 300, 40)
    return Problem("linear", model, digits.x_train[:300], digits.y_train[:300],
                   digits.x_test[:40], digits.y_test[:40])


@pytest.fixture(scope="session")
def mlp_problem(digits):
    torch.manual_seed(1)
    model = DigitsMLP(hidden=12)
    _train(model, digits, 250, 30)
    return Problem("mlp", model, digits.x_train[:250], digits.y_train[:250],
                   digits.x_test[:30], digits.y_test[:30])


@pytest.fixture(scope="session")
def cnn_problem(digits):
    torch.manual_seed(2)
    model = DigitsCNN(width=3, hidden=12)
    _train(model, digits, 200, 30)
    return Problem("cnn", model, digits.x_train[:200], digits.y_train[:200],
                   digits.x_test[:30], digits.y_test[:30])


@pytest.fixture(params=["linear_problem", "mlp_problem", "cnn_problem"])
def problem(request):
    return request.getfixturevalue(request.param)


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)
