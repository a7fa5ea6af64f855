r"""Shapley values from uniformly sampled subsets with importance weights (combinatorial MC).

Batch (:func:`cmc_batch`): for each uniform subset ``S`` (sample ``k``) and every point ``i``,
with :math:`T = S \setminus \{i\}`, the term

.. math:: \frac{2^{n-1}}{n \binom{n-1}{|T|}} \big[u(T \cup \{i\}) - u(T)\big]

is an unbiased sample of the Shapley value (``T`` is uniform over subsets of the others).

Cost: ``n + 1`` evaluations per sample, in one ``evaluate_many`` call. Its variance grows fast
with ``n`` (importance weights up to :math:`2^{n-1}/n`): a reference estimator for small ``n``,
not for data sets.
"""

from __future__ import annotations

from math import comb, log
from typing import Any

import numpy as np

from .base import MonteCarloValuation
from .result import Moments
from .samplers import MSRSampler
from .stopping import StoppingCriterion
from .tasks import Job
from .utility import evaluate_masks

__all__ = ["CombinatorialShapleyValuation", "cmc_batch"]


def cmc_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """Importance-weighted marginal moments of subsets ``start..stop-1`` (module docstring)."""
    n = job.n
    # log of the importance weight 2^(n-1) / (n * C(n-1, s)) for s = 0..n-1
    logw = np.array([(n - 1) * log(2) - log(n) - log(comb(n - 1, s)) for s in range(n)])
    acc, evals = Moments.zeros(n), 0
    eye = np.eye(n, dtype=bool)
    for k in range(start, stop):
        s = job.sampler.subset_mask(job.seed, k, n)
        masks = np.vstack([s[None], s[None] ^ eye])  # S, then S with point i toggled
        u = evaluate_masks(job.utility, masks)
        evals += n + 1
        with_i = np.where(s, u[0], u[1:])
        without_i = np.where(s, u[1:], u[0])
        size_without = s.sum() - s  # |S \ {i}|
        acc.update(np.exp(logw[size_without]) * (with_i - without_i))
    return {"marginal": acc}, evals


class CombinatorialShapleyValuation(MonteCarloValuation):
    """Shapley values from uniformly sampled subsets with importance weights (combinatorial MC).

    ``n + 1`` evaluations per sampled subset; unbiased but with a variance that explodes with
    ``n`` -- a check for small games; use :class:`~dvl_ooc.valuation.TMCShapleyValuation` for
    data sets. Arguments as in :class:`~dvl_ooc.valuation.TMCShapleyValuation`.
    """

    algorithm = "combinatorial_shapley"
    batch = staticmethod(cmc_batch)
    _default_batch_size = 16
    _default_round = 64

    def __init__(self, utility: Any, *, is_done: StoppingCriterion, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(utility, is_done=is_done, seed=seed, **kwargs)
        self.sampler = MSRSampler()
