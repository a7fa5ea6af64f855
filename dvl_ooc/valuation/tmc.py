r"""Truncated Monte-Carlo Data Shapley (Ghorbani & Zou 2019) over random permutations.

.. math::

    \phi^{\mathrm{Sh}}_i = \mathbb{E}_{\sigma}\big[u(\sigma_{<i} \cup \{i\}) - u(\sigma_{<i})\big].

Batch (:func:`tmc_batch`): for each permutation :math:`\sigma` (sample ``k``), prefix utilities
:math:`u_j = u(\{\sigma_1..\sigma_j\})` are evaluated in order until the truncation policy
fires at ``t``; then :math:`u_j := u_t` for ``j > t`` without evaluating them. Point
:math:`\sigma_j` gets the marginal :math:`u_j - u_{j-1}`; every point receives one term per
permutation (zero if truncated).

The permutations of a task are walked in lockstep (:func:`_walk`): step ``j`` evaluates prefix
``j`` of every permutation still running in one ``evaluate_many`` call (a vectorised utility
such as :class:`~dvl_ooc.valuation.TorchBatchUtility` trains them together, all of size ``j``);
permutations drop out as they truncate. So no prefix past a truncation point is ever evaluated,
each permutation stops exactly where a one-at-a-time walk would, and the values do not depend
on how many coalitions a utility evaluates together (bit-identical for a deterministic
utility). For a vectorised utility the default ``batch_size`` (permutations per task) is its
``batch_hint``, at most 8: short tasks keep ``MaxTime`` (honoured to within one task) tight,
and on a CPU stacking more than 8 small models gains little (pyDVL's tutorial CNN: 32 models
per pass train 12-18 % faster per model than 8; their convolutions are compute-bound); pass a
larger ``batch_size`` for throughput over a fixed number of permutations, and on a GPU.
Rounds default to two tasks.

Cost: about ``n`` evaluations per permutation (fewer with truncation), plus ``u(all)`` and
``u(empty)`` once per ``fit`` on the driver (they count as evaluations). Evaluations counted
are exactly those requested from the utility.
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


def _walk(job: Job, perms: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Prefix utilities ``(len(perms), n + 1)`` of the permutations, walked in lockstep.

    Step ``j`` evaluates prefix ``j`` of every permutation still running in one
    :func:`evaluate_masks` call; a permutation whose truncation policy fires at ``j`` leaves
    the walk and keeps ``u_j`` for its remaining prefixes. Only evaluated prefixes are counted.
    """
    n, p = job.n, len(perms)
    scores = np.empty((p, n + 1))
    scores[:, 0] = job.empty_utility
    base = job.truncation if job.truncation is not None else TruncationPolicy()
    policies = [copy.deepcopy(base) for _ in range(p)]
    for pol in policies:
        pol.reset(job.total_utility, n)
    order = np.stack(perms) if p else np.empty((0, n), dtype=np.int64)
    masks = np.zeros((p, n), dtype=bool)  # prefix masks, grown one point per step
    running = np.arange(p)
    evals = 0
    for j in range(1, n + 1):
        if not len(running):
            break
        masks[running, order[running, j - 1]] = True
        vals = evaluate_masks(job.utility, masks[running])
        evals += len(running)
        keep = np.ones(len(running), dtype=bool)
        for r, (i, v) in enumerate(zip(running, vals)):
            scores[i, j] = v
            if j < n and policies[i](j, float(v)):
                scores[i, j + 1 :] = v
                keep[r] = False
        running = running[keep]
    return scores, evals


def tmc_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """Marginal-contribution moments of permutations ``start..stop-1`` (see module docstring)."""
    acc = Moments.zeros(job.n)
    perms = [job.sampler.permutation(job.seed, k, job.n) for k in range(start, stop)]
    scores, evals = _walk(job, perms)
    x = np.empty(job.n)
    for perm, s in zip(perms, scores):  # folded in sample order
        x[perm] = np.diff(s)
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
        batch_size: permutations per task, walked in lockstep (default 2; for a utility with
            ``evaluate_many``: its ``batch_hint``, at most 8).
        samples_per_round: permutations between checks (default 8; for a vectorised utility
            ``2 * batch_size``).
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
        hint = getattr(utility, "batch_hint", None)
        if hasattr(utility, "evaluate_many") and hint is not None:
            if kwargs.get("batch_size") is None:
                kwargs["batch_size"] = max(self._default_batch_size, min(int(hint), 8))
            if kwargs.get("samples_per_round") is None:
                kwargs["samples_per_round"] = max(self._default_round, 2 * kwargs["batch_size"])
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
