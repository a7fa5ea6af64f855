r"""A vectorised utility: train many small torch models on different subsets at once.

For coalitions :math:`S_1..S_m` (rows of a boolean mask matrix :math:`M`) the parameters of
``m`` copies of one small model are stacked, :math:`\Theta \in \mathbb{R}^{m \times p}`, all
starting from the same initial weights, and trained full-batch on the masked mean loss

.. math:: L(\Theta) = \sum_{k=1}^m \Big[\frac{1}{|S_k|} \sum_i M_{ki}\, \ell(f_{\theta_k}(x_i), y_i)
          + \frac{\lambda}{2}\|\theta_k\|^2\Big].

The summands share no parameters, so the gradient of :math:`L` with respect to
:math:`\theta_k` is the gradient of model ``k``'s own loss and an element-wise optimiser (Adam)
trains the ``m`` models independently in one pass. Forward passes use
``torch.func.functional_call`` under ``torch.func.vmap`` over the stacked parameters, i.e.
batched matrix products instead of ``m`` small ones. Each model is then scored (accuracy by
default) on the test set; an empty coalition scores ``default``.

Cost per call: ``epochs`` full-batch forward/backward passes over ``m x |union of S_k|``
samples -- the same arithmetic as training the ``m`` models one at a time, but in
``epochs`` large kernels instead of ``m * epochs`` small ones, which is where the speed-up of
small models comes from (measured in ``benchmarks/bench_valuation.py``).

The result for a coalition does not depend on which other coalitions share its pass up to
float32 rounding of batched kernels.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..exceptions import InputError, NoTrainableParametersError
from .utility import as_xy

__all__ = ["TorchBatchUtility"]


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None or torch.get_num_threads() == n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchBatchUtility:
    """Vectorised utility for small torch classifiers (logistic regression, small MLPs).

    Args:
        model: the module; its current parameters are the common initialisation.
        test_data: ``(x_test, y_test)``.
        epochs: full-batch optimisation steps (Adam with learning rate ``lr``).
        weight_decay: L2 penalty ``lambda`` on all parameters.
        models_per_pass: how many coalitions are trained together (``batch_hint``).
        loss: per-sample loss ``loss(logits, y, reduction="none")`` (cross-entropy).
        default: the score of the empty coalition.
        dtype, device: where training runs.
        num_threads: torch intra-op threads while training (restored afterwards); ``None``
            leaves torch's setting. One thread per task is the default because valuation
            parallelises over workers: on a loaded 2-core machine two threads per small
            model made training 50x slower (spinning OpenMP threads).
    """

    def __init__(self, model: nn.Module, test_data: Any, *, epochs: int = 100, lr: float = 0.1,
                 weight_decay: float = 1e-3, models_per_pass: int = 32,
                 loss: Any = F.cross_entropy, default: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 num_threads: int | None = 1) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"TorchBatchUtility needs a torch.nn.Module, not {type(model)}")
        params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        if not params:
            raise NoTrainableParametersError("the model has no trainable parameters")
        if int(models_per_pass) < 1 or int(epochs) < 1:
            raise InputError("models_per_pass and epochs must be positive integers")
        self.model = copy.deepcopy(model).to(dtype=dtype, device=device).eval()
        self.init_params = {k: v.to(dtype=dtype, device=device) for k, v in params.items()}
        self.buffers = {k: v.to(device=device) for k, v in self.model.named_buffers()}
        xt, yt = as_xy(test_data, what="test_data")
        self.x_test = torch.as_tensor(xt, dtype=dtype, device=device)
        self.y_test = torch.as_tensor(yt, device=device).long()
        self.epochs, self.lr, self.weight_decay = int(epochs), float(lr), float(weight_decay)
        self.models_per_pass = int(models_per_pass)
        self.loss, self.default = loss, float(default)
        self.dtype, self.device = dtype, torch.device(device)
        self.num_threads = num_threads
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    @property
    def batch_hint(self) -> int:
        return self.models_per_pass

    def with_data(self, x: Any, y: Any = None) -> TorchBatchUtility:
        new = copy.copy(self)
        xn, yn = as_xy(x, y, what="training data")
        new.x = torch.as_tensor(xn, dtype=self.dtype, device=self.device)
        new.y = torch.as_tensor(yn, device=self.device).long()
        return new

    @property
    def n_points(self) -> int:
        if self.x is None:
            raise InputError("no training data yet; call with_data(x, y) or pass data to fit")
        return len(self.x)

    def __call__(self, subset: Any) -> float:
        mask = np.zeros(self.n_points, dtype=bool)
        mask[np.asarray(subset, dtype=np.int64)] = True
        return float(self.evaluate_many(mask[None])[0])

    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        """Scores of models trained on each row of the boolean ``masks`` (m, n_points)."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n_points:
            raise InputError(f"masks must have shape (m, {self.n_points}), got {masks.shape}")
        out = np.full(len(masks), self.default, dtype=np.float64)
        nonempty = np.flatnonzero(masks.any(1))
        with _torch_threads(self.num_threads):
            for s in range(0, len(nonempty), self.models_per_pass):
                rows = nonempty[s : s + self.models_per_pass]
                out[rows] = self._train_and_score(masks[rows])
        return out

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.model, (p, self.buffers), (x,))

        return vmap(f)(params)

    def train(self, masks: np.ndarray) -> dict[str, torch.Tensor]:
        """Stacked parameters ``(m, ...)`` of models trained on the (non-empty) rows of masks."""
        masks = np.asarray(masks, dtype=bool)
        if not masks.any(1).all():
            raise InputError("every coalition trained together must be non-empty")
        m = len(masks)
        used = np.flatnonzero(masks.any(0))  # train only on points some coalition contains
        x, y = self.x[used], self.y[used]
        w = torch.as_tensor(masks[:, used], dtype=self.dtype, device=self.device)
        w = w / w.sum(1, keepdim=True)
        params = {k: v.unsqueeze(0).repeat(m, *([1] * v.ndim)).requires_grad_(True)
                  for k, v in self.init_params.items()}
        opt = torch.optim.Adam(list(params.values()), lr=self.lr)
        yy = y.repeat(m)
        with torch.enable_grad(), _torch_threads(self.num_threads):
            for _ in range(self.epochs):
                opt.zero_grad(set_to_none=True)
                logits = self._forward(params, x)  # (m, |used|, C)
                per = self.loss(logits.reshape(m * len(used), -1), yy, reduction="none")
                total = (per.view(m, -1) * w).sum()
                if self.weight_decay:
                    total = total + 0.5 * self.weight_decay * sum(
                        (p**2).sum() for p in params.values())
                total.backward()
                opt.step()
        return {k: v.detach() for k, v in params.items()}

    def _train_and_score(self, masks: np.ndarray) -> np.ndarray:
        params = self.train(masks)
        with torch.no_grad():
            pred = self._forward(params, self.x_test).argmax(-1)  # (m, n_test)
            return (pred == self.y_test).to(torch.float64).mean(1).cpu().numpy()
