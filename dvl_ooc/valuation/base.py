r"""Monte-Carlo valuation as a chunked reduction: the base class every method subclasses.

Execution plan of ``fit``:

1. bind the utility to the training data; the method builds its
   :class:`~dvl_ooc.valuation.tasks.Job` (TMC evaluates ``u(all)`` and ``u(empty)`` once, on
   the driver);
2. scatter the job (utility + data + sampler + the method's batch function) to every worker
   (``client.scatter(..., broadcast=True)``) -- never re-sent per task;
3. repeat rounds: a round is ``samples_per_round`` consecutive sample indices split into
   tasks of ``batch_size`` samples; each task runs the method's batch function and returns
   partial moments; the driver merges them in task order into the running result and then
   checks the stopping criterion.

Reproducibility: sample ``k`` depends only on ``(seed, k)`` (see
:mod:`~dvl_ooc.valuation.samplers`), and partials are merged in sample order, so for a given
seed, ``batch_size`` and ``samples_per_round`` the values are **bit-identical for any number
of workers** (sequential included). Changing ``batch_size`` changes only the grouping of the
Chan merges: values agree to float64 rounding (relative ~1e-15). The stopping rule is checked
every ``samples_per_round`` samples, whatever the cluster, so runs stop at the same sample
count. A run continued with ``fit(..., result=previous)`` starts at sample
``previous.n_samples`` with the same seed and gives the same result as one longer run.

State: ``result`` (the :class:`~dvl_ooc.valuation.result.ValuationResult` of the last ``fit``)
and ``info`` (``setup_s``, ``sampling_s``, ``total_s`` of the last ``fit``).

Adding a method is one module: a module-level batch function
``batch(job, start, stop) -> (partials, evaluations)`` and a subclass of
:class:`MonteCarloValuation` that sets ``algorithm``, ``batch = staticmethod(that_function)``,
``result_kind`` (``"mean"``: one ``"marginal"`` moment per point; ``"msr"``: ``"in"`` and
``"out"``), its default ``batch_size`` / ``samples_per_round`` and a ``sampler`` (override
``_job`` to put more into the job).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._compat import deprecated_alias
from ..exceptions import InputError
from ..runtime import local_cluster, progress
from .result import ValuationResult
from .stopping import StoppingCriterion
from .tasks import BatchFn, Job, blas_threads, run_batch

__all__ = ["MonteCarloValuation"]


class _SequentialExecutor:
    n_workers = 1

    def put(self, job: Job) -> Job:
        return job

    def map_batches(self, handle: Job, ranges: list[tuple[int, int]]) -> Iterator:
        for a, b in ranges:
            yield run_batch(handle, a, b)


class _DaskExecutor:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.n_workers = max(1, len(client.scheduler_info().get("workers", {})))

    def put(self, job: Job) -> Any:
        return self.client.scatter(job, broadcast=True, hash=False)

    def map_batches(self, handle: Any, ranges: list[tuple[int, int]]) -> Iterator:
        futures = [self.client.submit(run_batch, handle, a, b, pure=False) for a, b in ranges]
        for f in futures:  # in sample order (results arrive in any order; merging does not)
            yield f.result()


@contextlib.contextmanager
def _executor(client: Any, n_workers: int | None, what: str) -> Iterator:
    if client is not None:
        yield _DaskExecutor(client)
        return
    if n_workers is None or n_workers <= 1:
        yield _SequentialExecutor()
        return
    from distributed import Client

    with local_cluster(int(n_workers), threads_per_worker=1, what=what) as cluster, \
            Client(cluster) as c:
        yield _DaskExecutor(c)


class MonteCarloValuation:
    """Base class of the Monte-Carlo valuation methods (see the module docstring).

    Args:
        utility: a utility (e.g. :class:`~dvl_ooc.valuation.ModelUtility`).
        is_done: stopping criterion, checked every ``samples_per_round`` samples.
        seed: seed of the sample sequence (random if ``None``; stored in the result).
        batch_size: samples per task; samples_per_round: samples between checks.
        client: a ``distributed.Client``; else ``n_workers > 1`` starts (and closes) a local
            cluster with :func:`dvl_ooc.runtime.local_cluster`; else runs in this process.
        progress: show a progress bar (samples).
        allow_unbounded: accept a stopping criterion without a budget.
        blas_threads: BLAS/OpenMP threads per task while fitting (``None``: leave as is).
    """

    algorithm = ""
    result_kind = "mean"
    batch: BatchFn  # the method's batch function, set by subclasses with staticmethod(...)
    sampler: Any = None
    _default_batch_size = 4
    _default_round = 16

    def __init__(self, utility: Any, *, is_done: StoppingCriterion, seed: int | None = None,
                 batch_size: int | None = None, samples_per_round: int | None = None,
                 client: Any = None, n_workers: int | None = None, progress: bool = False,
                 allow_unbounded: bool = False, blas_threads: int | None = 1) -> None:
        if not callable(utility):
            raise InputError(f"utility must be callable on index subsets, not {type(utility)}")
        if not isinstance(is_done, StoppingCriterion):
            raise InputError("is_done must be a StoppingCriterion, e.g. MinUpdates(100)")
        if not is_done.bounded and not allow_unbounded:
            raise InputError(
                f"the stopping criterion {is_done!r} may never fire; combine it with a budget, "
                "e.g. `criterion | MaxUpdates(1000)` or `| MaxTime(600)`")
        self.utility = utility
        self.is_done = is_done
        self.seed = seed
        self.batch_size = int(batch_size or self._default_batch_size)
        self.samples_per_round = int(samples_per_round or self._default_round)
        if self.batch_size < 1 or self.samples_per_round < 1:
            raise InputError("batch_size and samples_per_round must be positive")
        self.client, self.n_workers, self.progress = client, n_workers, progress
        self.blas_threads = blas_threads
        self.result: ValuationResult | None = None
        self.info: dict[str, Any] = {}

    timings = deprecated_alias("info")

    def _job(self, u: Any, n: int, seed: int) -> Job:
        """The job of one ``fit`` (runs on the driver, BLAS threads limited)."""
        batch = getattr(type(self), "batch", None)
        if batch is None:
            raise NotImplementedError(f"{type(self).__name__} sets no batch function")
        return Job(batch, u, n, seed, self.sampler)

    def _bind(self, x: Any, y: Any) -> Any:
        if x is None:
            if hasattr(self.utility, "x") and getattr(self.utility, "x", None) is None:
                raise InputError("pass the training data to fit(x, y)")
            return self.utility
        if not hasattr(self.utility, "with_data"):
            raise InputError(f"{type(self.utility).__name__} takes no data; call fit() "
                             "without arguments")
        return self.utility.with_data(x, y)

    def fit(self, x: Any = None, y: Any = None, *,
            result: ValuationResult | None = None) -> MonteCarloValuation:
        """Estimate the values of the training points; continue ``result`` if given."""
        u = self._bind(x, y)
        n = int(u.n_points)
        if n < 1:
            raise InputError("nothing to value: the data set is empty")
        seed = self.seed
        if result is not None:
            if result.kind != self.result_kind or (
                    result.algorithm and result.algorithm != self.algorithm):
                raise InputError(f"cannot continue a {result.algorithm!r} result with "
                                 f"{self.algorithm!r}")
            if len(result) != n or not np.array_equal(np.sort(result.indices), np.arange(n)):
                raise InputError(f"the previous result has {len(result)} points, the data {n}")
            result = result.select(np.arange(n))
            if seed is None:
                seed = result.seed
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        if result is None or result.seed != seed:
            start = 0
            state = ValuationResult.zeros(n, kind=self.result_kind, algorithm=self.algorithm)
            if result is not None:
                state = state + result  # different seed: independent samples, plain merge
                state.seed = seed
        else:
            start = result.n_samples
            state = result.copy()
        state.seed, state.algorithm = seed, self.algorithm
        t0 = time.perf_counter()
        with blas_threads(self.blas_threads):
            job = self._job(u, n, seed)
        job.blas_threads = self.blas_threads
        self.is_done.reset()
        evaluations = state.evaluations + job.setup_evaluations
        what = f"{type(self).__name__}(n_workers={self.n_workers})"
        bar = progress(self.progress, unit="sample")
        try:
            with _executor(self.client, self.n_workers, what) as ex:
                handle = ex.put(job)
                t1 = time.perf_counter()
                while True:
                    stop = start + self.samples_per_round
                    ranges = [(a, min(a + self.batch_size, stop))
                              for a in range(start, stop, self.batch_size)]
                    for part, e in ex.map_batches(handle, ranges):
                        merged = {k: state.moments[k].merge(part[k]) for k in state.moments}
                        state.moments = merged
                        evaluations += e
                    state.n_samples, state.evaluations = stop, evaluations
                    start = stop
                    bar.update(self.samples_per_round)
                    if self.is_done(state, evaluations):
                        break
        finally:
            bar.close()
        t2 = time.perf_counter()
        self.info = {"setup_s": t1 - t0, "sampling_s": t2 - t1, "total_s": t2 - t0}
        self.result = state
        return self

    def values(self) -> ValuationResult:
        """The result of the last ``fit`` (pyDVL style)."""
        if self.result is None:
            from ..exceptions import NotFittedError

            raise NotFittedError("call fit() first")
        return self.result
