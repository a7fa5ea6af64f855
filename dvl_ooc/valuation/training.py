r"""One training configuration for the torch utilities, and the reference training loop.

:class:`TrainingConfig` is shared by :class:`~dvl_ooc.valuation.TorchEstimator` (one model at a
time, through :class:`~dvl_ooc.valuation.ModelUtility`) and
:class:`~dvl_ooc.valuation.TorchBatchUtility` (many stacked models per pass), so that both
train the same model for the same subset.

Schedule (both paths): for a subset :math:`S` (its points in increasing index order) and epoch
:math:`e`, the positions ``0..|S|-1`` are shuffled by ``numpy_rng(seed, e).permutation(|S|)``
(:func:`dvl_ooc.seeding.numpy_rng`; no shuffle with ``shuffle=False``) and cut into minibatches
of ``batch_size`` (the last one smaller); each minibatch takes one optimiser step on the mean
per-sample loss. Adam follows ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient);
``"sgd"`` is plain gradient descent with the same L2 term.

Defaults: the workload of pyDVL's TMC-Shapley tutorial on digits (a small CNN trained by
skorch's ``NeuralNetClassifier``): 10 epochs of Adam, learning rate 0.01, minibatches of 128,
no weight decay. With ``batch_size >= |S|`` training is full-batch (one step per epoch).

:func:`train_module` is the reference implementation: the library's one training loop,
:func:`dvl_ooc.training.fit_network`, over one ``nn.Module`` (:meth:`TrainingConfig.fit_config`).
Cost: ``epochs * ceil(|S| / batch_size)`` forward/backward passes of at most ``batch_size``
samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import InputError
from ..training import FitConfig, fit_network, seeded_order, update_batchnorm

__all__ = ["TrainingConfig", "train_module", "update_batchnorm"]

_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainingConfig:
    """How every model of a utility is trained (see the module docstring).

    Attributes:
        epochs: passes over the subset.
        lr: learning rate.
        batch_size: minibatch size (``>= |S|``: full batch).
        weight_decay: L2 penalty added to the gradient (``torch.optim.Adam``'s ``weight_decay``).
        optimizer: ``"adam"`` or ``"sgd"``.
        seed: seed of the per-epoch shuffles.
        shuffle: shuffle the subset every epoch (otherwise index order).
        betas, eps: Adam's constants.
        update_bn: after the last epoch, recompute the running statistics of every BatchNorm
            layer as the plain average over the subset (one no-grad pass in training mode,
            ``torch.optim.swa_utils.update_bn``). With a constant learning rate the running
            averages (momentum 0.1) lag behind the weights, and an eval-mode network can be
            far worse than in training mode (a malaria-layout ResNet: test accuracy 0.54
            instead of 0.96 after 125 Adam steps); no effect without BatchNorm layers (so the
            stacked path, which refuses them, is unaffected).
    """

    epochs: int = 10
    lr: float = 1e-2
    batch_size: int = 128
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0
    shuffle: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    update_bn: bool = False

    def __post_init__(self) -> None:
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise InputError(f"epochs and batch_size must be positive integers, got "
                             f"epochs={self.epochs!r}, batch_size={self.batch_size!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise InputError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr!r}, "
                             f"weight_decay={self.weight_decay!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise InputError(f"optimizer must be one of {_OPTIMIZERS}, not {self.optimizer!r}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not self.eps > 0:
            raise InputError(f"betas must be in [0, 1) and eps > 0, got {self.betas}, {self.eps}")
        for name, cast in (("epochs", int), ("batch_size", int), ("seed", int), ("lr", float),
                           ("weight_decay", float), ("eps", float), ("shuffle", bool),
                           ("update_bn", bool)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        object.__setattr__(self, "betas", (float(b1), float(b2)))

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def order(self, epoch: int, n: int) -> np.ndarray:
        """Positions ``0..n-1`` of a subset in the order (0-based) epoch ``epoch`` visits them
        (:func:`dvl_ooc.training.seeded_order`)."""
        return seeded_order(self.seed, epoch, n) if self.shuffle else np.arange(n)

    def steps_per_epoch(self, n: int) -> int:
        return -(-int(n) // self.batch_size)

    def fit_config(self) -> FitConfig:
        """The same training as a :class:`dvl_ooc.training.FitConfig` (constant rate, the
        ``"seeded"`` order or ``"none"``, one tensor at a time as the stacked path)."""
        return FitConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                         weight_decay=self.weight_decay, optimizer=self.optimizer,
                         seed=self.seed, order="seeded" if self.shuffle else "none",
                         betas=self.betas, eps=self.eps, update_bn=self.update_bn,
                         foreach=False)


def resolve_config(config: TrainingConfig | None, **overrides: Any) -> TrainingConfig:
    """``config`` (default :class:`TrainingConfig()`) with the non-``None`` keyword overrides."""
    if config is not None and not isinstance(config, TrainingConfig):
        raise InputError(f"config must be a TrainingConfig, not {type(config).__name__}")
    return (config or TrainingConfig()).replace(**overrides)


def check_stackable(model: nn.Module) -> None:
    """Stacked training needs a module without batch statistics or random layers."""
    from ..exceptions import UnsupportedModelError

    for name, mod in model.named_modules():
        bad = isinstance(mod, nn.modules.batchnorm._BatchNorm) or (
            isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0)
        if bad:
            raise UnsupportedModelError(
                f"layer {name!r} ({type(mod).__name__}) behaves differently in training (batch "
                "statistics or randomness), which stacked training cannot reproduce per model; "
                "remove it or use ModelUtility(TorchEstimator(model)) (one model at a time)")


def train_module(module: nn.Module, x: Any, y: Any, config: TrainingConfig | None = None, *,
                 loss: Callable = F.cross_entropy) -> nn.Module:
    """Train ``module`` in place on ``(x, y)`` with ``config``; returns it in eval mode.

    ``x`` is cast to the dtype of the module's parameters; ``loss(logits, y, reduction="none")``
    gives per-sample losses whose mean over a minibatch is minimised. The loop is
    :func:`dvl_ooc.training.fit_network` with :meth:`TrainingConfig.fit_config` (data moved to
    the parameters' device once); a module without trainable parameters is only put in eval
    mode.
    """
    cfg = config or TrainingConfig()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return module.eval()
    dtype, device = params[0].dtype, params[0].device
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    xt = xt.to(device=device, dtype=dtype)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(device)
    return fit_network(module, (xt, yt.long()), cfg.fit_config(),
                       loss=lambda out, target: loss(out, target, reduction="none").mean())
