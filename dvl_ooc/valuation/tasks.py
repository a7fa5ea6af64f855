r"""Task kernels: one batch of samples ``[start, stop)`` -> partial moments per data point.

These functions run on Dask workers (which start by spawn, so they live in an importable
module). A :class:`Job` holds everything a batch needs -- the utility with its data, the
sampler, the truncation policy and the two reference utilities -- and is scattered to the
workers once per ``fit``; tasks only carry ``(job, start, stop)``.

TMC-Shapley batch: for each permutation :math:`\sigma` (sample ``k``), prefix utilities
:math:`u_j = u(\{\sigma_1..\sigma_j\})` are evaluated in order (``batch_hint`` prefixes per call
for vectorised utilities) until the truncation policy fires at ``t``; then
:math:`u_j := u_t` for ``j > t``. Point :math:`\sigma_j` gets the marginal
:math:`u_j - u_{j-1}`; every point receives one term per permutation (zero if truncated).

Combinatorial MC Shapley batch ("cmc"): for each uniform subset ``S`` (sample ``k``) and every
point ``i``, with :math:`T = S \setminus \{i\}`, the term
:math:`\frac{2^{n-1}}{n \binom{n-1}{|T|}} [u(T \cup \{i\}) - u(T)]` is an unbiased sample of
the Shapley value (``T`` is uniform over subsets of the others); ``n + 1`` evaluations per
sample, in one ``evaluate_many`` call. Its variance grows fast with ``n`` (importance weights
up to :math:`2^{n-1}/n`): a reference estimator for small ``n``, not for data sets.

MSR-Banzhaf batch: for each subset mask ``S`` (sample ``k``) one utility :math:`u(S)` updates
the ``"in"`` moments of the points in ``S`` and the ``"out"`` moments of the others.

Within a batch, samples are folded in index order with Welford updates; the driver merges
batch partials in batch order (Chan), so a run's values do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .result import Moments
from .samplers import MSRSampler, PermutationSampler, TruncationPolicy
from .utility import evaluate_masks

__all__ = ["Job", "blas_threads", "run_batch"]


@dataclass
class Job:
    """What every task of one ``fit`` needs (scattered once to all workers)."""

    kind: str  # "tmc" or "msr"
    utility: Any
    n: int
    seed: int
    sampler: PermutationSampler | MSRSampler
    truncation: TruncationPolicy | None = None
    total_utility: float = 0.0
    empty_utility: float = 0.0
    blas_threads: int | None = 1


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Limit BLAS/OpenMP threads (numpy, scipy, scikit-learn) to ``n`` inside the block.

    Valuation parallelises over models; a multi-threaded BLAS inside each small fit only
    oversubscribes the cores (15x slower fits measured on a loaded 2-core machine).
    """
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=int(n)):
        yield


_THREADS_SET = False


def _limit_threads_on_worker() -> None:
    """On a Dask worker, give torch as many threads as the worker has (once per process)."""
    global _THREADS_SET
    if _THREADS_SET:
        return
    _THREADS_SET = True
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except Exception:  # noqa: BLE001 - not on a worker: leave settings alone
        return
    try:
        import torch

        torch.set_num_threads(max(1, int(nthreads)))
    except ImportError:  # pragma: no cover
        pass


def run_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """Partial moments of samples ``start..stop-1`` and the number of utility evaluations."""
    _limit_threads_on_worker()
    if job.kind not in ("tmc", "msr", "cmc"):
        raise ValueError(f"unknown job kind {job.kind!r}")
    with blas_threads(job.blas_threads):
        if job.kind == "tmc":
            return _tmc_batch(job, start, stop)
        if job.kind == "cmc":
            return _cmc_batch(job, start, stop)
        return _msr_batch(job, start, stop)


def _prefix_scores(job: Job, perm: np.ndarray, policy: TruncationPolicy) -> tuple[np.ndarray, int]:
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


def _tmc_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
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


def _msr_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    masks = np.stack([job.sampler.subset_mask(job.seed, k, job.n) for k in range(start, stop)])
    scores = evaluate_masks(job.utility, masks)
    acc_in, acc_out = Moments.zeros(job.n), Moments.zeros(job.n)
    for m, s in zip(masks, scores):
        acc_in.update(np.full(job.n, s), where=m)
        acc_out.update(np.full(job.n, s), where=~m)
    return {"in": acc_in, "out": acc_out}, len(masks)


def _cmc_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    from math import comb, log

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
