"""A torch classifier as a scikit-learn estimator, for :class:`~dvl_ooc.valuation.ModelUtility`.

Its own module because it subclasses scikit-learn's ``BaseEstimator`` and ``ClassifierMixin``:
importing scikit-learn takes about 2 s (scipy.stats, pandas), which ``import dvl_ooc``, the CLI
and every Dask worker would otherwise pay even when no estimator is used.
``dvl_ooc.valuation.TorchEstimator`` loads it on first use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..exceptions import InputError, NotFittedError
from .training import TrainingConfig, resolve_config, train_module

__all__ = ["TorchEstimator"]


try:  # scikit-learn is optional: without it TorchEstimator provides get/set_params itself
    from sklearn.base import BaseEstimator as _Base
    from sklearn.base import ClassifierMixin as _ClassifierMixin
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    class _ClassifierMixin:  # type: ignore[no-redef]
        _estimator_type = "classifier"

        def score(self, x: Any, y: Any) -> float:
            return float(np.mean(self.predict(x) == np.asarray(y)))

    class _Base:  # type: ignore[no-redef]
        _PARAMS: tuple[str, ...] = ()

        def get_params(self, deep: bool = True) -> dict[str, Any]:
            return {k: getattr(self, k) for k in self._PARAMS}

        def set_params(self, **params: Any) -> Any:
            for k, v in params.items():
                if k not in self._PARAMS:
                    raise InputError(f"unknown parameter {k!r}; valid: {self._PARAMS}")
                setattr(self, k, v)
            return self


class TorchEstimator(_ClassifierMixin, _Base):
    """A torch classifier as a scikit-learn estimator (``fit`` / ``predict`` / ``score``).

    ``fit`` trains a copy of the *initial* ``module`` (every subset starts from the same
    weights) with :func:`~dvl_ooc.valuation.training.train_module` and ``config`` -- the same
    schedule and defaults as :class:`~dvl_ooc.valuation.TorchBatchUtility`, so both give the
    same model for the same subset -- or with ``train_fn(module, x, y)`` if given. ``predict``
    is the arg-max of the logits (class ``c`` is output ``c``); ``score`` the accuracy. It is a
    scikit-learn ``BaseEstimator`` + ``ClassifierMixin`` (``clone``, ``get_params`` and scorer
    names such as ``"accuracy"`` or ``"f1_macro"`` work).

    Args:
        module: the torch module (not modified).
        train_fn: optional custom training function (then ``config`` is unused).
        config: a :class:`~dvl_ooc.valuation.TrainingConfig` (default ``TrainingConfig()``).
        epochs, lr, weight_decay, batch_size, seed: override single fields of ``config``.
    """

    _PARAMS = ("module", "train_fn", "config", "epochs", "lr", "weight_decay", "batch_size",
               "seed")

    def __init__(self, module: Any, train_fn: Callable | None = None, *,
                 config: TrainingConfig | None = None, epochs: int | None = None,
                 lr: float | None = None, weight_decay: float | None = None,
                 batch_size: int | None = None, seed: int | None = None) -> None:
        self.module, self.train_fn, self.config = module, train_fn, config
        self.epochs, self.lr, self.weight_decay = epochs, lr, weight_decay
        self.batch_size, self.seed = batch_size, seed

    @property
    def training_config(self) -> TrainingConfig:
        """The effective :class:`~dvl_ooc.valuation.TrainingConfig`."""
        return resolve_config(self.config, epochs=self.epochs, lr=self.lr,
                              weight_decay=self.weight_decay, batch_size=self.batch_size,
                              seed=self.seed)

    def fit(self, x: Any, y: Any) -> TorchEstimator:
        cfg = self.training_config  # validates the settings even with a train_fn
        net = copy.deepcopy(self.module)
        if self.train_fn is None:
            train_module(net, x, y, cfg)
        else:
            torch.manual_seed(cfg.seed)
            out = self.train_fn(net, x, y)
            net = out if out is not None else net
        self.fitted_ = net.eval()
        with torch.no_grad():
            n_out = self._logits(np.asarray(x)[:1]).shape[-1]
        self.classes_ = np.arange(n_out)
        return self

    def _logits(self, x: Any) -> torch.Tensor:
        net = getattr(self, "fitted_", None)
        if net is None:
            raise NotFittedError("TorchEstimator: call fit(x, y) before predict/score")
        p = next(net.parameters(), None)
        dtype = p.dtype if p is not None else torch.get_default_dtype()
        device = p.device if p is not None else torch.device("cpu")
        xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        return net(xt.to(device=device, dtype=dtype))

    @torch.no_grad()
    def predict(self, x: Any) -> np.ndarray:
        return self._logits(x).argmax(-1).cpu().numpy()

    @torch.no_grad()
    def predict_proba(self, x: Any) -> np.ndarray:
        return self._logits(x).softmax(-1).double().cpu().numpy()

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "fitted_", None) is not None
