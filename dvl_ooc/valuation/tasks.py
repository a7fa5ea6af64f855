r"""What runs on the workers: a :class:`Job` and the :func:`run_batch` wrapper.

A :class:`Job` holds everything one ``fit`` needs on a worker -- the valuation method's batch
function, the utility with its data, the sampler, the truncation policy and the reference
utilities -- and is scattered to the workers once per ``fit``; tasks only carry
``(job, start, stop)``. :func:`run_batch` limits the worker's threads and calls
``job.batch(job, start, stop)``, which returns partial moments per data point for the samples
``start..stop-1`` and the number of utility evaluations spent.

The batch functions themselves belong to the methods (``tmc.tmc_batch``, ``msr.msr_batch``,
``combinatorial.cmc_batch``). Dask workers start by spawn, so a batch function must be a
module-level function of an importable module (it is pickled by reference).

Within a batch, samples are folded in index order with Welford updates; the driver merges
batch partials in batch order (Chan), so a run's values do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .result import Moments

__all__ = ["BatchFn", "Job", "blas_threads", "run_batch"]

#: ``batch(job, start, stop) -> (partial moments by name, utility evaluations)``
BatchFn = Callable[["Job", int, int], tuple[dict[str, Moments], int]]


@dataclass
class Job:
    """What every task of one ``fit`` needs (scattered once to all workers).

    Attributes:
        batch: the method's batch function (module-level, importable on spawned workers).
        utility, n, seed, sampler: the bound utility, its number of points, the run's seed and
            the method's sampler.
        truncation, total_utility, empty_utility: TMC's truncation policy, ``u(all)`` and
            ``u(empty)`` (unused by other methods).
        setup_evaluations: utility evaluations the driver spent building the job.
        blas_threads: BLAS/OpenMP threads per task (``None``: leave as is).
    """

    batch: BatchFn
    utility: Any
    n: int
    seed: int
    sampler: Any
    truncation: Any = None
    total_utility: float = 0.0
    empty_utility: float = 0.0
    setup_evaluations: int = 0
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
    if not callable(job.batch):
        raise TypeError(f"job.batch must be a batch function, not {type(job.batch).__name__}")
    with blas_threads(job.blas_threads):
        return job.batch(job, start, stop)
