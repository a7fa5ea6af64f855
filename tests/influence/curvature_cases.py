"""Small float64 problems with known spectra for the curvature-diagnostics tests.

A 64-4-10 MLP (p = 310) trained on 80 digits: its exact Hessian is indefinite (negative
eigenvalues well below -1e-4 x top), its Gauss-Newton matrix is positive semi-definite.
References are independent float64 eigendecompositions (tests/reference.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from reference import ref_gauss_newton, ref_hessian

from dvl_ooc.demo.datasets import load_digits_split
from dvl_ooc.demo.nets import DigitsMLP, train_classifier

MB = 512  # one micro-batch per data pass


class Case:
    def __init__(self) -> None:
        d = load_digits_split(flip_fraction=0.1, seed=0)
        torch.manual_seed(3)
        self.model = DigitsMLP(hidden=4).double()
        train_classifier(self.model, d.x_train[:80], d.y_train[:80], epochs=30)
        self.model.eval()
        self.loss = F.cross_entropy
        self.x = torch.as_tensor(d.x_train[:80]).double()
        self.y = torch.as_tensor(d.y_train[:80]).long()
        self.x_test = torch.as_tensor(d.x_test[:6]).double()
        self.y_test = torch.as_tensor(d.y_test[:6]).long()
        self.H = ref_hessian(self.model, self.loss, self.x, self.y)
        self.eig_H = torch.linalg.eigvalsh(self.H)
        self.p = self.H.shape[0]

    @property
    def data(self):
        return (self.x, self.y)

    @functools.cached_property
    def G(self) -> torch.Tensor:
        return ref_gauss_newton(self.model, self.loss, self.x, self.y)

    @functools.cached_property
    def eig_G(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.G)

    def layer_sizes(self) -> list[int]:
        return [p.numel() for p in self.model.parameters()]


@functools.lru_cache(maxsize=1)
def case() -> Case:
    return Case()
