r"""Games with closed-form values, to test estimators against.

:class:`InteractionGame` has additive weights, pairwise interactions and a symmetric threshold
bonus:

.. math:: u(S) = \sum_{i \in S} w_i + \sum_{i<j,\ i,j \in S} A_{ij} + b\,[|S| \ge t].

Its values follow from linearity and symmetry of the two solution concepts:

* Shapley: :math:`\phi_i = w_i + \tfrac12 \sum_{j \ne i} A_{ij} + b/n` (for ``1 <= t <= n``;
  the bonus is shared equally and only the grand coalition pays it out in full),
* Banzhaf: :math:`\beta_i = w_i + \tfrac12 \sum_{j \ne i} A_{ij}
  + b \binom{n-1}{t-1} / 2^{n-1}` (``i`` is pivotal iff exactly ``t-1`` others are in).
"""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np

from ..exceptions import InputError

__all__ = ["InteractionGame"]


class InteractionGame:
    """Additive + pairwise + threshold game with known Shapley and Banzhaf values."""

    def __init__(self, weights: Any, interactions: Any = None, bonus: float = 0.0,
                 threshold: int = 1, noise: float = 0.0) -> None:
        self.w = np.asarray(weights, dtype=np.float64)
        n = len(self.w)
        if n < 1:
            raise InputError("a game needs at least one player")
        A = np.zeros((n, n)) if interactions is None else np.asarray(interactions, np.float64)
        if A.shape != (n, n):
            raise InputError(f"interactions must be ({n}, {n})")
        self.A = np.triu(A, 1) + np.triu(A, 1).T
        self.bonus, self.threshold = float(bonus), int(threshold)
        if not 1 <= self.threshold <= n:
            raise InputError(f"threshold must be in [1, {n}]")
        self.noise = float(noise)

    batch_hint = 64  # coalitions per evaluate_many call in permutation walks

    @property
    def n_points(self) -> int:
        return len(self.w)

    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        m = np.asarray(masks, dtype=np.float64)
        out = m @ self.w + 0.5 * np.einsum("ki,ij,kj->k", m, self.A, m)
        out += self.bonus * (m.sum(1) >= self.threshold)
        if self.noise:  # deterministic pseudo-noise: a fixed function of the coalition
            codes = (np.asarray(masks, bool) * (1 << np.arange(self.n_points))).sum(1)
            out += self.noise * np.sin(codes * 12.9898 + 78.233)
        return out

    def __call__(self, subset: Any) -> float:
        mask = np.zeros(self.n_points, dtype=bool)
        mask[np.asarray(subset, dtype=np.int64)] = True
        return float(self.evaluate_many(mask[None])[0])

    def shapley_values(self) -> np.ndarray:
        if self.noise:
            raise InputError("no closed form with noise")
        return self.w + 0.5 * self.A.sum(1) + self.bonus / self.n_points

    def banzhaf_values(self) -> np.ndarray:
        if self.noise:
            raise InputError("no closed form with noise")
        n, t = self.n_points, self.threshold
        return self.w + 0.5 * self.A.sum(1) + self.bonus * comb(n - 1, t - 1) / 2 ** (n - 1)
