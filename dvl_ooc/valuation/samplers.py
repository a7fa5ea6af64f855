r"""Samplers (what one Monte-Carlo sample is) and truncation policies for permutations.

Determinism: sample ``k`` of a run with seed ``s`` is drawn from its own generator
``numpy_rng(s, k)`` (:mod:`dvl_ooc.seeding`) -- never from a shared stream -- so the samples do
not depend on how they are split into batches, tasks or workers, nor on whether a run is
continued from a saved result (which simply starts at the next ``k``).

* :class:`PermutationSampler` -- uniform random permutations :math:`\sigma` of the ``n`` points.
  The Shapley value is the expectation of the marginal
  :math:`u(\sigma_{<i} \cup \{i\}) - u(\sigma_{<i})` over permutations. ``antithetic=True``
  pairs sample ``2j+1`` with the reverse of sample ``2j`` (variance reduction).
* :class:`MSRSampler` -- uniform subsets of the power set (each point independently with
  probability 1/2). One utility evaluation updates every point (maximum sample reuse): the
  Banzhaf value is :math:`E[u(S) \mid i \in S] - E[u(S) \mid i \notin S]`.

Truncation (TMC, Ghorbani & Zou 2019): while walking a permutation, once a policy decides the
prefix utility is close enough to the full-data utility, the remaining marginals are set to 0
without training. Policies are called as ``policy(k, score)`` after evaluating the prefix of
size ``k``; ``reset(total, n)`` starts a new permutation.
"""

from __future__ import annotations

import numpy as np

from ..exceptions import InputError
from ..seeding import numpy_rng

__all__ = [
    "DeviationTruncation",
    "FixedTruncation",
    "MSRSampler",
    "NoTruncation",
    "PermutationSampler",
    "RelativeTruncation",
    "TruncationPolicy",
    "UniformSampler",
]


class PermutationSampler:
    """Uniform random permutations; ``antithetic`` pairs each with its reverse."""

    def __init__(self, antithetic: bool = False) -> None:
        self.antithetic = bool(antithetic)

    def permutation(self, seed: int, k: int, n: int) -> np.ndarray:
        if self.antithetic:
            p = numpy_rng(seed, k // 2).permutation(n)
            return p[::-1].copy() if k % 2 else p
        return numpy_rng(seed, k).permutation(n)

    def __repr__(self) -> str:
        return f"PermutationSampler(antithetic={self.antithetic})"


class MSRSampler:
    """Uniform subsets: every point is in the sample independently with probability 1/2."""

    def subset_mask(self, seed: int, k: int, n: int) -> np.ndarray:
        return numpy_rng(seed, k).random(n) < 0.5

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


UniformSampler = MSRSampler


class TruncationPolicy:
    """Decides when to stop walking a permutation (base class: never)."""

    def reset(self, total: float, n: int) -> None:
        self.total, self.n = float(total), int(n)

    def __call__(self, k: int, score: float) -> bool:
        return False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if k not in ("total", "n") and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class NoTruncation(TruncationPolicy):
    """Evaluate every prefix (plain permutation Monte-Carlo Shapley)."""


def _fraction(name: str, v: float) -> float:
    if not 0 <= v <= 1:
        raise InputError(f"{name} must be in [0, 1], got {v!r}")
    return float(v)


class FixedTruncation(TruncationPolicy):
    """Stop after a fixed ``fraction`` of each permutation."""

    def __init__(self, fraction: float) -> None:
        self.fraction = _fraction("fraction", fraction)

    def __call__(self, k: int, score: float) -> bool:
        return k >= self.fraction * self.n


class RelativeTruncation(TruncationPolicy):
    """Stop when ``|u(prefix) - u(all)| <= rtol * |u(all)|``, after ``burn_in_fraction * n``."""

    def __init__(self, rtol: float = 0.05, burn_in_fraction: float = 0.0) -> None:
        if not rtol >= 0:
            raise InputError(f"rtol must be >= 0, got {rtol!r}")
        self.rtol = float(rtol)
        self.burn_in_fraction = _fraction("burn_in_fraction", burn_in_fraction)

    def __call__(self, k: int, score: float) -> bool:
        if k < self.burn_in_fraction * self.n:
            return False
        return abs(score - self.total) <= self.rtol * abs(self.total)


class DeviationTruncation(TruncationPolicy):
    """Stop when ``|u(prefix) - u(all)| < sigmas * std`` of the prefix scores seen so far.

    The standard deviation of this permutation's prefix scores measures how much the utility
    still moves; checks start after ``burn_in_fraction * n`` points (and at least 2 scores).
    """

    def __init__(self, sigmas: float = 1.0, burn_in_fraction: float = 0.0) -> None:
        if not sigmas > 0:
            raise InputError(f"sigmas must be positive, got {sigmas!r}")
        self.sigmas = float(sigmas)
        self.burn_in_fraction = _fraction("burn_in_fraction", burn_in_fraction)

    def reset(self, total: float, n: int) -> None:
        super().reset(total, n)
        self._c, self._mean, self._m2 = 0, 0.0, 0.0

    def __call__(self, k: int, score: float) -> bool:
        self._c += 1
        d = score - self._mean
        self._mean += d / self._c
        self._m2 += d * (score - self._mean)
        if k < self.burn_in_fraction * self.n or self._c < 2:
            return False
        std = (self._m2 / (self._c - 1)) ** 0.5
        return abs(score - self.total) < self.sigmas * std
