r"""Truncated Monte-Carlo Data Shapley (Ghorbani & Zou 2019) over random permutations.

.. math::

    \phi^{\mathrm{Sh}}_i = \mathbb{E}_{\sigma}\big[u(\sigma_{<i} \cup \{i\}) - u(\sigma_{<i})\big].

Batch (:func:`tmc_batch`): for each permutation :math:`\sigma` (sample ``k``), prefix utilities
:math:`u_j = u(\{\sigma_1..\sigma_j\})` are evaluated in order (``batch_hint`` prefixes per call
for vectorised utilities) until the truncation policy fires at ``t``; then
:math:`u_j := u_t` for ``j > t``. Point :math:`\sigma_j` gets the marginal
:math:`u_j - u_{j-1}`; every point receives one term per permutation (zero if truncated).

Cost: about ``n`` evaluations per permutation (fewer with truncation), plus ``u(all)`` and
``u(empty)`` once per ``fit`` on the driver (they count as evaluations).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..exceptions import InputError
from .base import MonteCarloValuation
from .result import Moments
from .samplers import NoTruncation, PermutationSampler, TruncationPolicy
from .stopping import StoppingCriterion
from .tasks import Job
from .utility import evaluate_masks

__all__ = ["TMCShapleyValuation", "tmc_batch"]


def _prefix_scores(job: Job, perm: np.ndarray, policy: TruncationPolicy) -> tuple[np.ndarray, int]:
    """Utilities of the prefixes ``0..n`` of ``perm``, constant after truncation."""
    n, u = job.n, job.utility
    scores = np.empty(n + 1)
    scores[0] = job.empty_utility
    chunk = max(1, int(getattr(u, "batch_hint", 1))) if hasattr(u, "evaluate_many") else 1
    policy.reset(job.total_utility, n)
    evals, j, stop_at = 0, 0, n
    while j < n and stop_at == n:
        sizes = np.arange(j + 1, min(j + chunk, n) + 1)
        masks = np.zeros((len(sizes), n), dtype=bool)
        for r, s in enumerate(sizes):
            masks[r, perm[:s]] = True
        vals = evaluate_masks(u, masks)
        evals += len(sizes)
        for s, v in zip(sizes, vals):
            scores[s] = v
            j = s
            if policy(int(s), float(v)):
                stop_at = int(s)
                break
    scores[stop_at + 1 :] = scores[stop_at]
    return scores, evals


def tmc_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """Marginal-contribution moments of permutations ``start..stop-1`` (see module docstring)."""
    acc = Moments.zeros(job.n)
    policy = copy.deepcopy(job.truncation) if job.truncation is not None else TruncationPolicy()
    evals = 0
    x = np.empty(job.n)
    for k in range(start, stop):
        perm = job.sampler.permutation(job.seed, k, job.n)
        scores, e = _prefix_scores(job, perm, policy)
        evals += e
        x[perm] = np.diff(scores)
        acc.update(x)
    return {"marginal": acc}, evals


class TMCShapleyValuation(MonteCarloValuation):
    """Truncated Monte-Carlo Data Shapley (Ghorbani & Zou 2019) over random permutations.

    Args:
        utility: a utility (e.g. :class:`~dvl_ooc.valuation.ModelUtility`).
        truncation: a :class:`~dvl_ooc.valuation.samplers.TruncationPolicy`
            (default: none, i.e. plain permutation Monte-Carlo).
        is_done: stopping criterion, checked every ``samples_per_round`` permutations.
        seed: seed of the permutation sequence (random if ``None``; stored in the result).
        antithetic: pair every permutation with its reverse.
        batch_size: permutations per task; samples_per_round: permutations between checks.
        client: a ``distributed.Client``; else ``n_workers > 1`` starts (and closes) a local
            cluster (:func:`dvl_ooc.runtime.local_cluster`); else runs in this process.
        progress: show a progress bar.
        blas_threads: BLAS/OpenMP threads per task while fitting (``None``: leave as is).
        allow_unbounded: accept a stopping criterion without a budget.

    After ``fit``: ``result`` and ``info`` (``setup_s``, ``sampling_s``, ``total_s``).
    """

    algorithm = "tmc_shapley"
    batch = staticmethod(tmc_batch)
    _default_batch_size = 2
    _default_round = 8

    def __init__(self, utility: Any, truncation: TruncationPolicy | None = None, *,
                 is_done: StoppingCriterion, seed: int | None = None, antithetic: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(utility, is_done=is_done, seed=seed, **kwargs)
        if truncation is not None and not isinstance(truncation, TruncationPolicy):
            raise InputError("truncation must be a TruncationPolicy, e.g. RelativeTruncation()")
        self.truncation = truncation or NoTruncation()
        self.sampler = PermutationSampler(antithetic=antithetic)

    def _job(self, u: Any, n: int, seed: int) -> Job:
        total = float(u(np.arange(n)))
        empty = float(u(np.arange(0)))
        return Job(type(self).batch, u, n, seed, self.sampler, self.truncation, total, empty,
                   setup_evaluations=2)
