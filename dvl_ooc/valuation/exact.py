r"""Exact Shapley and Banzhaf values by enumerating all :math:`2^n` coalitions (small ``n``).

.. math::

    \phi^{\mathrm{Sh}}_i = \sum_{S \subseteq N \setminus \{i\}}
        \frac{1}{n \binom{n-1}{|S|}} \big[u(S \cup \{i\}) - u(S)\big], \qquad
    \phi^{\mathrm{Bz}}_i = \frac{1}{2^{n-1}} \sum_{S \subseteq N \setminus \{i\}}
        \big[u(S \cup \{i\}) - u(S)\big].

Coalitions are coded as bit masks; each of the :math:`2^n` utilities is evaluated once
(vectorised utilities in chunks), then the sums are ``O(n 2^n)`` array operations.
"""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np

from ..exceptions import InputError
from .result import ValuationResult
from .tasks import blas_threads
from .utility import evaluate_masks

__all__ = ["MAX_EXACT_POINTS", "all_coalition_utilities", "exact_banzhaf", "exact_shapley"]

MAX_EXACT_POINTS = 16


def _bind(utility: Any, x: Any, y: Any) -> Any:
    if x is None:
        return utility
    if not hasattr(utility, "with_data"):
        raise InputError(f"{type(utility).__name__} takes no data")
    return utility.with_data(x, y)


def all_coalition_utilities(utility: Any, chunk: int = 1024) -> np.ndarray:
    """``U[code]`` for every coalition, ``code`` the bit mask (bit ``i`` = point ``i`` in)."""
    n = int(utility.n_points)
    if n < 1:
        raise InputError("nothing to value: the data set is empty")
    if n > MAX_EXACT_POINTS:
        raise InputError(f"exact enumeration of {n} points needs 2^{n} model fits; use at most "
                         f"{MAX_EXACT_POINTS} points or TMCShapleyValuation / "
                         "MSRBanzhafValuation")
    codes = np.arange(2**n, dtype=np.int64)
    out = np.empty(2**n)
    with blas_threads(1):
        for s in range(0, 2**n, chunk):
            c = codes[s : s + chunk]
            masks = ((c[:, None] >> np.arange(n)) & 1).astype(bool)
            out[s : s + chunk] = evaluate_masks(utility, masks)
    return out


def _marginals(U: np.ndarray, n: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    codes = np.arange(2**n, dtype=np.int64)
    without = codes[(codes >> i) & 1 == 0]
    sizes = np.array([bin(c).count("1") for c in without])
    return U[without | (1 << i)] - U[without], sizes


def exact_shapley(utility: Any, x: Any = None, y: Any = None) -> ValuationResult:
    """Exact Shapley values of a utility (a game, or a ``ModelUtility`` with data ``x, y``)."""
    u = _bind(utility, x, y)
    U = all_coalition_utilities(u)
    n = int(u.n_points)
    w = np.array([1.0 / (n * comb(n - 1, s)) for s in range(n)])
    vals = np.empty(n)
    for i in range(n):
        d, sizes = _marginals(U, n, i)
        vals[i] = np.sum(w[sizes] * d)
    res = ValuationResult.from_values(vals, algorithm="exact_shapley")
    res.evaluations = 2**n
    return res


def exact_banzhaf(utility: Any, x: Any = None, y: Any = None) -> ValuationResult:
    """Exact Banzhaf values (mean marginal over all coalitions of the other points)."""
    u = _bind(utility, x, y)
    U = all_coalition_utilities(u)
    n = int(u.n_points)
    vals = np.array([_marginals(U, n, i)[0].mean() for i in range(n)])
    res = ValuationResult.from_values(vals, algorithm="exact_banzhaf")
    res.evaluations = 2**n
    return res
