r"""Banzhaf values with the maximum-sample-reuse (MSR) estimator (Wang & Jia 2023).

.. math::

    \phi^{\mathrm{Bz}}_i = \mathbb{E}_{S}\big[u(S) \mid i \in S\big]
                           - \mathbb{E}_{S}\big[u(S) \mid i \notin S\big].

Batch (:func:`msr_batch`): for each uniform subset mask ``S`` (sample ``k``, every point in
with probability 1/2) one utility :math:`u(S)` updates the ``"in"`` moments of the points in
``S`` and the ``"out"`` moments of the others; a vectorised utility evaluates a task's subsets
in one ``evaluate_many`` call.

Cost: one evaluation per sampled subset, which updates every point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import MonteCarloValuation
from .result import Moments
from .samplers import MSRSampler
from .stopping import StoppingCriterion
from .tasks import Job
from .utility import evaluate_masks

__all__ = ["MSRBanzhafValuation", "msr_batch"]


def msr_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """``"in"`` / ``"out"`` moments of the subsets ``start..stop-1`` (see module docstring)."""
    masks = np.stack([job.sampler.subset_mask(job.seed, k, job.n) for k in range(start, stop)])
    scores = evaluate_masks(job.utility, masks)
    acc_in, acc_out = Moments.zeros(job.n), Moments.zeros(job.n)
    for m, s in zip(masks, scores):
        acc_in.update(np.full(job.n, s), where=m)
        acc_out.update(np.full(job.n, s), where=~m)
    return {"in": acc_in, "out": acc_out}, len(masks)


class MSRBanzhafValuation(MonteCarloValuation):
    """Banzhaf values with the maximum-sample-reuse estimator (Wang & Jia 2023).

    Every sampled subset costs one evaluation and updates all points. Arguments as in
    :class:`~dvl_ooc.valuation.TMCShapleyValuation` (``batch_size`` subsets per task;
    vectorised utilities evaluate a task's subsets in one call).
    """

    algorithm = "msr_banzhaf"
    result_kind = "msr"
    batch = staticmethod(msr_batch)
    _default_batch_size = 64
    _default_round = 256

    def __init__(self, utility: Any, *, is_done: StoppingCriterion, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(utility, is_done=is_done, seed=seed, **kwargs)
        self.sampler = MSRSampler()
