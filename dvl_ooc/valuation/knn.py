r"""KNN-Shapley in closed form (Jia et al. 2019), ``O(n_test * n log n)``.

For the unweighted K-nearest-neighbour classifier with utility (per test point ``t``)

.. math:: u_t(S) = \frac{1}{K} \sum_{j=1}^{\min(K, |S|)} [y_{\alpha_j(S)} = y_t],

with :math:`\alpha_j(S)` the ``j``-th nearest neighbour of ``t`` in ``S``, sort the training
points by distance to ``t`` (:math:`\alpha_1, ..., \alpha_n`) and let
:math:`m_j = [y_{\alpha_j} = y_t]`; then

.. math:: s_{\alpha_n} = \frac{m_n}{n}, \qquad
          s_{\alpha_j} = s_{\alpha_{j+1}} + \frac{m_j - m_{j+1}}{K} \frac{\min(K, j)}{j}.

The value of a point is the mean of :math:`s` over test points (the utility is the mean of
:math:`u_t`); ``variances`` / ``counts`` describe the spread over test points. Ties in distance
are broken by training index (stable sort).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import InputError
from .result import Moments, ValuationResult
from .utility import as_xy

__all__ = ["knn_shapley"]


def knn_shapley(x_train: Any, y_train: Any, x_test: Any, y_test: Any, k: int = 5, *,
                chunk_size: int = 256) -> ValuationResult:
    """Exact Shapley values of training points for a K-NN classifier (Euclidean distance)."""
    xtr, ytr = as_xy(x_train, y_train, what="training data")
    xte, yte = as_xy(x_test, y_test, what="test data")
    if int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    xtr = xtr.reshape(len(xtr), -1).astype(np.float64)
    xte = xte.reshape(len(xte), -1).astype(np.float64)
    if xtr.shape[1] != xte.shape[1]:
        raise InputError("training and test points have different numbers of features")
    n = len(xtr)
    j = np.arange(1, n)  # 1-based positions of the recurrence terms
    coef = np.minimum(k, j) / (k * j)
    acc = Moments.zeros(n)
    sq_tr = (xtr**2).sum(1)
    for s in range(0, len(xte), chunk_size):
        xb, yb = xte[s : s + chunk_size], yte[s : s + chunk_size]
        d2 = sq_tr[None, :] - 2 * xb @ xtr.T + (xb**2).sum(1)[:, None]
        order = np.argsort(d2, axis=1, kind="stable")
        match = (ytr[order] == yb[:, None]).astype(np.float64)  # (b, n), sorted by distance
        sv = np.empty_like(match)
        sv[:, -1] = match[:, -1] / n
        if n > 1:
            terms = (match[:, :-1] - match[:, 1:]) * coef  # term for position j (1-based)
            sv[:, :-1] = sv[:, -1:] + np.cumsum(terms[:, ::-1], axis=1)[:, ::-1]
        vals = np.empty_like(sv)
        np.put_along_axis(vals, order, sv, axis=1)
        part = Moments(np.full(n, len(vals), np.int64), vals.mean(0),
                       ((vals - vals.mean(0)) ** 2).sum(0))
        acc = acc.merge(part)
    res = ValuationResult(np.arange(n), {"marginal": acc}, algorithm="knn_shapley")
    res.extra = {"k": int(k)}
    return res
