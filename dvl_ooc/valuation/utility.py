r"""Utilities: the score of a model trained on a subset of the training data.

.. math::  u(S) = \mathrm{score}\big(\mathrm{fit}(\mathrm{model}, \{(x_i, y_i)\}_{i \in S}),
           D_{\mathrm{test}}\big), \qquad u(\emptyset) = \mathrm{default}.

A utility is any object with

* ``n_points`` -- the number of players (training points, feature groups, ...),
* ``__call__(subset) -> float`` -- ``subset`` an integer index array,
* optionally ``evaluate_many(masks) -> ndarray`` for an ``(m, n_points)`` boolean array (a
  vectorised utility evaluates many coalitions in one pass) and ``batch_hint`` (how many masks
  it likes per call),
* optionally ``with_data(x, y)`` returning a copy bound to training data (valuations call it in
  ``fit``).

Cost model: one evaluation of :class:`ModelUtility` is one model fit on ``|S|`` points plus one
scoring pass over the test set; Monte-Carlo Shapley needs ``O(n)`` evaluations per permutation.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..data import to_numpy
from ..exceptions import InputError, LengthMismatchError, UtilityError

__all__ = ["ModelUtility", "as_xy", "evaluate_masks"]


def as_xy(x: Any, y: Any = None, *, what: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Normalise ``(x, y)`` / a pair / an object with ``x_train, y_train`` / a torch Dataset."""
    if y is None:
        if isinstance(x, (tuple, list)) and len(x) == 2:
            x, y = x
        elif hasattr(x, "x_train") and hasattr(x, "y_train"):
            x, y = x.x_train, x.y_train
        elif hasattr(x, "__getitem__") and hasattr(x, "__len__") and not hasattr(x, "shape"):
            items = [x[i] for i in range(len(x))]
            if not items:
                raise InputError(f"{what}: the data set is empty")
            if not all(isinstance(t, (tuple, list)) and len(t) >= 2 for t in items):
                raise InputError(f"{what}: a dataset must yield (x, y) pairs")
            x = np.stack([_as_array(t[0]) for t in items])
            y = np.stack([_as_array(t[1]) for t in items])
        else:
            raise InputError(f"{what}: pass (x, y) arrays, an (x, y) pair or a Dataset, "
                             f"not {type(x).__name__}")
    x, y = _as_array(x), _as_array(y)
    if x.ndim == 0 or y.ndim == 0:
        raise InputError(f"{what}: x and y need a leading sample axis")
    if len(x) != len(y):
        raise LengthMismatchError(f"{what}: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise InputError(f"{what}: the data set is empty; valuation needs at least one point")
    return x, y


def _as_array(a: Any) -> np.ndarray:
    """:func:`dvl_ooc.data.to_numpy` for tensors; other array-likes through ``np.asarray``, so
    that object arrays pass: scikit-learn estimators take string or mixed-type columns (e.g.
    labels from a pandas Series), which ``to_numpy`` refuses."""
    return to_numpy(a) if isinstance(a, torch.Tensor) else np.asarray(a)


class TaskCancelled(Exception):
    """The Dask task running this batch was cancelled by its client (see
    :func:`task_cancelled`); nobody waits for its result, so it stops."""


def task_cancelled() -> bool:
    """Whether this code runs in a Dask task that its client has cancelled.

    Dask cannot interrupt a running task: a cancelled one runs to its end, keeping the worker
    busy (for the next ``fit``) and making ``cluster.close()`` wait for it and then kill the
    worker. The driver cancels the tasks it no longer needs when a valuation stops, so batches
    check this between utility evaluations (a local look at the worker's task state, no
    message) and stop. ``False`` outside a worker and for a task resumed after its cancel."""
    try:
        from distributed import get_worker

        w = get_worker()
        ts = w.state.tasks.get(w.get_current_task())
    except Exception:  # noqa: BLE001 - not in a worker task (or distributed missing)
        return False
    return ts is None or ts.state == "cancelled"


def evaluate_masks(utility: Any, masks: np.ndarray) -> np.ndarray:
    """Utilities of the coalitions in the rows of a boolean ``masks`` array.

    Raises:
        TaskCancelled: in a Dask task that its client has cancelled."""
    if task_cancelled():
        raise TaskCancelled("the client cancelled this task: its result is not needed")
    masks = np.asarray(masks, dtype=bool)
    if hasattr(utility, "evaluate_many"):
        out = np.asarray(utility.evaluate_many(masks), dtype=np.float64)
    else:
        out = np.array([utility(np.flatnonzero(m)) for m in masks], dtype=np.float64)
    if out.shape != (len(masks),):
        raise UtilityError(f"utility returned shape {out.shape} for {len(masks)} coalitions")
    return out


def _is_classifier(model: Any) -> bool:
    try:
        from sklearn.base import is_classifier

        return bool(is_classifier(model))
    except Exception:  # noqa: BLE001 - sklearn missing or not an sklearn estimator
        return getattr(model, "_estimator_type", None) == "classifier"


def _clone(model: Any) -> Any:
    try:
        from sklearn.base import clone

        return clone(model)
    except Exception:  # noqa: BLE001 - not an sklearn estimator (or sklearn missing)
        return copy.deepcopy(model)


class ModelUtility:
    """Train a scikit-learn style estimator on a subset, score it on held-out data.

    Args:
        model: an unfitted estimator with ``fit(x, y)`` (cloned for every subset); a torch
            module can be wrapped with :class:`TorchEstimator`.
        scorer: ``None`` (the estimator's ``score(x, y)``), a scikit-learn scorer name such as
            ``"accuracy"``, or a callable ``scorer(fitted_model, x_test, y_test) -> float``.
        test_data: ``(x_test, y_test)`` the score is computed on.
        default: the score of degenerate subsets: empty, or (for classifiers) fewer than
            ``min_classes`` distinct labels.
        min_classes: defaults to 2 for classifiers and 1 otherwise.
        cache_size: keep the utilities of this many most recent distinct subsets (0: no cache).
        catch_errors: if True, a subset whose fit or score raises gets ``default`` (with one
            warning); if False (default) a :class:`~dvl_ooc.exceptions.UtilityError` is raised.
    """

    def __init__(self, model: Any, scorer: str | Callable | None = None, *,
                 test_data: Any = None, default: float = 0.0, min_classes: int | None = None,
                 cache_size: int = 0, catch_errors: bool = False) -> None:
        if not callable(getattr(model, "fit", None)):
            raise InputError(f"{type(model).__name__} has no fit(x, y) method; pass a "
                             "scikit-learn style estimator or wrap a torch module in "
                             "TorchEstimator")
        if test_data is None:
            raise InputError("ModelUtility needs test_data=(x_test, y_test) to score models on")
        self.x_test, self.y_test = as_xy(test_data, what="test_data")
        if scorer is None:
            if not callable(getattr(model, "score", None)):
                raise InputError(f"{type(model).__name__} has no score(x, y); pass a scorer")
            self._score = lambda m, x, y: m.score(x, y)
        elif isinstance(scorer, str):
            from sklearn.metrics import get_scorer

            self._score = get_scorer(scorer)
        elif callable(scorer):
            self._score = scorer
        else:
            raise InputError(f"scorer must be None, a name or a callable, not {type(scorer)}")
        self.model = model
        self.scorer = scorer
        self.default = float(default)
        self.min_classes = (2 if _is_classifier(model) else 1) if min_classes is None \
            else int(min_classes)
        self.cache_size = int(cache_size)
        self.catch_errors = bool(catch_errors)
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._warned = False

    def with_data(self, x: Any, y: Any = None) -> ModelUtility:
        """A copy bound to the training data (the players are its samples)."""
        new = copy.copy(self)
        new.x, new.y = as_xy(x, y, what="training data")
        new._cache = OrderedDict()
        return new

    @property
    def n_points(self) -> int:
        if self.x is None:
            raise InputError("this utility has no training data yet; call with_data(x, y) or "
                             "pass the data to the valuation's fit")
        return len(self.x)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        state.pop("_score", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        scorer = state["scorer"]
        if scorer is None:
            self._score = lambda m, x, y: m.score(x, y)
        elif isinstance(scorer, str):
            from sklearn.metrics import get_scorer

            self._score = get_scorer(scorer)
        else:
            self._score = scorer

    def __call__(self, subset: Any) -> float:
        idx = np.sort(np.asarray(subset, dtype=np.int64).ravel())
        n = self.n_points
        if len(idx) and (idx[0] < 0 or idx[-1] >= n):
            raise InputError(f"subset indices must be in [0, {n})")
        key = idx.tobytes()
        if self.cache_size and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._evaluate(idx)
        if self.cache_size:
            self._cache[key] = value
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return value

    def _evaluate(self, idx: np.ndarray) -> float:
        if len(idx) == 0:
            return self.default
        y = self.y[idx]
        if self.min_classes > 1 and len(np.unique(y)) < self.min_classes:
            return self.default
        try:
            model = _clone(self.model)
            model.fit(self.x[idx], y)
            value = float(self._score(model, self.x_test, self.y_test))
        except Exception as e:  # noqa: BLE001 - user code: re-raised with context or scored
            if not self.catch_errors:
                raise UtilityError(
                    f"the utility raised {type(e).__name__}: {e} (on a subset of {len(idx)} "
                    "points); fix the model/scorer or pass catch_errors=True to score failing "
                    "subsets with the default") from e
            if not self._warned:
                warnings.warn(f"utility failed ({type(e).__name__}: {e}); scoring failing "
                              f"subsets with default={self.default}", RuntimeWarning,
                              stacklevel=2)
                self._warned = True
            return self.default
        if not np.isfinite(value):
            raise UtilityError(f"the scorer returned {value} on a subset of {len(idx)} points")
        return value


def __getattr__(name: str) -> Any:
    # TorchEstimator lives in .estimator (it subclasses scikit-learn's BaseEstimator, so
    # importing it imports scikit-learn, ~2 s); still importable from here
    if name == "TorchEstimator":
        from .estimator import TorchEstimator

        return TorchEstimator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
