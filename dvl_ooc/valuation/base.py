r"""Monte-Carlo valuation as a chunked reduction: the base class every method subclasses.

Execution plan of ``fit``:

1. bind the utility to the training data; the method builds its
   :class:`~dvl_ooc.valuation.tasks.Job` (TMC evaluates ``u(all)`` and ``u(empty)`` once, on
   the driver);
2. on a cluster, pickle the job once on the driver into a frozen
   :class:`~dvl_ooc.valuation.tasks.PackedJob` (an unpicklable job fails here, with
   :class:`~dvl_ooc.exceptions.JobSerializationError` naming the attribute) and scatter those
   bytes to every worker (``client.scatter(..., broadcast=True)``); each worker thread rebuilds
   the live job once and keeps it, so workers only ever ship immutable bytes -- never re-sent
   per task;
3. cut the samples from the start into rounds of ``samples_per_round`` consecutive indices and
   the rounds into tasks of ``batch_size``; keep ``2 x (worker threads)`` tasks in flight
   (pipelined across rounds, so no worker waits for the slowest task of a round); each task
   returns partial moments; the driver merges a finished task once every earlier task is
   merged (sample order) and checks the stopping criterion at every round end; when it fires,
   the tasks in flight are cancelled and discarded.

Failures: a task that raises on a worker is re-raised in the driver as soon as it is known
(the worker's exception and traceback, with a note naming the samples); lost inputs surface as
Dask's cancellation error; if for ``stall_timeout`` seconds no task finishes and no worker of
the cluster executes anything, :class:`~dvl_ooc.exceptions.ClusterStalledError` says so with
the tasks' scheduler states instead of waiting forever.

Time budget: the driver watches :meth:`~dvl_ooc.valuation.stopping.StoppingCriterion.deadline`
(``MaxTime``) between task completions; at the deadline it cancels the tasks in flight and keeps
the completed prefix of tasks in sample order (waiting for the first task if none has
finished), so ``n_samples`` may end mid-round and the run overruns by at most one task.

Threads: workers of a cluster started here get one BLAS/OpenMP thread each
(:func:`dvl_ooc.runtime.local_cluster`); on a worker, torch gets as many intra-op threads as the
worker has task threads and one inter-op thread; ``blas_threads`` limits BLAS per task.

Reproducibility: sample ``k`` depends only on ``(seed, k)`` (see
:mod:`~dvl_ooc.valuation.samplers`), and partials are merged in sample order, so for a given
seed, ``batch_size`` and ``samples_per_round`` the values are **bit-identical for any number
of workers** (sequential included). Changing ``batch_size`` changes only the grouping of the
Chan merges: values agree to float64 rounding (relative ~1e-15). The stopping rule is checked
every ``samples_per_round`` samples, whatever the cluster, so runs stop at the same sample
count (``MaxTime`` excepted: time is not reproducible). A run continued with
``fit(..., result=previous)`` starts at sample ``previous.n_samples`` with the same seed and
gives the same result as one longer run.

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
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._compat import deprecated_alias
from ..exceptions import ClusterStalledError, InputError
from ..runtime import local_cluster, progress
from .result import ValuationResult
from .stopping import StoppingCriterion
from .tasks import (
    BatchFn,
    Job,
    PackedJob,
    blas_threads,
    forget_job_on_worker,
    run_batch,
    torch_threads,
)

__all__ = ["MonteCarloValuation"]


class _Done:
    """A task the sequential executor has already run."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _SequentialExecutor:
    """Runs each task in this process when it is submitted (one in flight)."""

    window = 1

    def put(self, job: Job) -> None:
        self.job = job

    def submit(self, a: int, b: int) -> _Done:
        return _Done(run_batch(self.job, a, b))

    def wait(self, handles: list, timeout: float) -> set:
        return set(handles)

    def result(self, h: _Done) -> tuple[dict, int]:
        return h.value

    def failed(self, h: _Done) -> bool:
        return False

    def cancel(self, handles: list) -> None:
        pass

    def busy(self) -> bool:
        return True

    def describe(self, handles: list) -> str:  # pragma: no cover - never stalls
        return ""

    def close(self) -> None:
        self.job = None


class _DaskExecutor:
    """Tasks on a Dask cluster; the job is pickled once and scattered as bytes.

    ``window`` tasks (two per worker thread) are kept in flight so that a worker never waits
    for the driver between tasks, nor for the slowest task of a round.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        workers = client.scheduler_info().get("workers", {})
        threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        self.window = 2 * max(1, threads)
        self.handle: Any = None
        self.token = ""

    def put(self, job: Job) -> None:
        packed = PackedJob.pack(job)  # raises JobSerializationError here, not on a worker
        self.token = packed.token
        self.handle = self.client.scatter(packed, broadcast=True, hash=False)

    def submit(self, a: int, b: int) -> Any:
        return self.client.submit(run_batch, self.handle, a, b, pure=False,
                                  key=f"run_batch-{self.token}-{a}-{b}")

    def wait(self, handles: list, timeout: float) -> set:
        """The futures of ``handles`` that are done, waiting up to ``timeout`` for one."""
        from distributed import wait

        done = {f for f in handles if f.done()}
        if done or not handles:
            return done
        with contextlib.suppress(TimeoutError):
            wait(handles, timeout=max(timeout, 1e-3), return_when="FIRST_COMPLETED")
        return {f for f in handles if f.done()}

    def result(self, f: Any) -> tuple[dict, int]:
        return f.result()

    def failed(self, f: Any) -> bool:
        return f.status in ("error", "cancelled", "lost")

    def cancel(self, handles: list) -> None:
        if handles:
            with contextlib.suppress(Exception):
                self.client.cancel(handles)

    def busy(self) -> bool:
        """Whether any worker of the cluster is executing a task (heartbeat metrics)."""
        try:
            workers = self.client.scheduler_info().get("workers", {})
        except Exception:  # noqa: BLE001 - cannot tell: do not call it a stall
            return True
        return any(w.get("metrics", {}).get("task_counts", {}).get("executing", 0)
                   for w in workers.values())

    def describe(self, handles: list) -> str:
        """Scheduler-side states of the pending tasks (for the stall message)."""
        keys = [f.key for f in handles]

        def states(dask_scheduler: Any) -> dict:  # nested: pickled by value
            out: dict[str, int] = {}
            for k in keys:
                ts = dask_scheduler.tasks.get(k)
                st = ts.state if ts is not None else "forgotten"
                out[st] = out.get(st, 0) + 1
            out["workers"] = len(dask_scheduler.workers)
            return out

        try:
            return repr(self.client.run_on_scheduler(states))
        except Exception as e:  # noqa: BLE001 - best effort
            return f"(scheduler not reachable: {type(e).__name__}: {e})"

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(Exception):
                self.client.cancel([self.handle])
                self.client.run(forget_job_on_worker, self.token, wait=False)  # fire and forget
            self.handle = None


@contextlib.contextmanager
def _executor(client: Any, n_workers: int | None, what: str) -> Iterator:
    if client is not None:
        ex = _DaskExecutor(client)
        try:
            yield ex
        finally:
            ex.close()
        return
    if n_workers is None or n_workers <= 1:
        yield _SequentialExecutor()
        return
    from distributed import Client

    with local_cluster(int(n_workers), threads_per_worker=1, what=what) as cluster, \
            Client(cluster) as c:
        ex = _DaskExecutor(c)
        try:
            yield ex
        finally:
            ex.close()


class _Task:
    """Samples ``start..stop-1``; ``round_end``: the last task of a round."""

    __slots__ = ("handle", "round_end", "start", "stop")

    def __init__(self, start: int, stop: int, round_end: bool, handle: Any) -> None:
        self.start, self.stop, self.round_end, self.handle = start, stop, round_end, handle


def _ranges(start: int, per_round: int, batch_size: int) -> Iterator[tuple[int, int, bool]]:
    """Task ranges from ``start`` on, round by round (the grouping fixes the merge order)."""
    while True:
        stop = start + per_round
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            yield a, b, b == stop
        start = stop


_POLL_S = 0.5  # seconds between the driver's checks while no task finishes


def _raise_failure(ex: Any, t: _Task, what: str) -> None:
    """Re-raise a failed task's exception (the worker's, with its traceback) in the driver."""
    try:
        ex.result(t.handle)
    except BaseException as e:
        if hasattr(e, "add_note"):
            e.add_note(f"raised by the task of samples {t.start}..{t.stop - 1} of {what}")
        raise
    raise ClusterStalledError(f"{what}: the task of samples {t.start}..{t.stop - 1} was "
                              f"{getattr(t.handle, 'status', 'lost')} without an error")


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
        blas_threads: BLAS/OpenMP and torch intra-op threads per task while fitting (``None``:
            leave as is).
        stall_timeout: on a cluster, raise :class:`~dvl_ooc.exceptions.ClusterStalledError`
            when for this many seconds no task of the run finished and no worker executed any
            task (``None``: wait forever). Task failures are raised as soon as they are known,
            whatever this is.
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
                 allow_unbounded: bool = False, blas_threads: int | None = 1,
                 stall_timeout: float | None = 60.0) -> None:
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
        if stall_timeout is not None and not stall_timeout > 0:
            raise InputError(f"stall_timeout must be positive or None, got {stall_timeout!r}")
        self.stall_timeout = stall_timeout
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
        with blas_threads(self.blas_threads), torch_threads(self.blas_threads):
            job = self._job(u, n, seed)
        job.blas_threads = self.blas_threads
        self.is_done.reset()
        evaluations = state.evaluations + job.setup_evaluations
        what = f"{type(self).__name__}(n_workers={self.n_workers})"
        bar = progress(self.progress, unit="sample")
        try:
            with _executor(self.client, self.n_workers, what) as ex:
                ex.put(job)
                t1 = time.perf_counter()
                self._sample(ex, state, start, evaluations, bar, what)
        finally:
            bar.close()
        t2 = time.perf_counter()
        self.info = {"setup_s": t1 - t0, "sampling_s": t2 - t1, "total_s": t2 - t0}
        self.result = state
        return self

    def _sample(self, ex: Any, state: ValuationResult, start: int, evaluations: int,
                bar: Any, what: str) -> None:
        """Run tasks from sample ``start`` on, merging them into ``state`` in sample order.

        Up to ``ex.window`` tasks are in flight; a finished task is merged once all tasks
        before it are, the stopping rule is checked at every round end (so where a run stops
        does not depend on the cluster), a task failure is raised as soon as it is known, and a
        deadline (``MaxTime``) ends the run with the completed prefix of tasks.
        """
        deadline = self.is_done.deadline()
        ranges = _ranges(start, self.samples_per_round, self.batch_size)
        pending: deque[_Task] = deque()
        done: set = set()
        submitting, merged = True, 0
        last_progress = last_query = time.monotonic()
        try:
            while True:
                while submitting and len(pending) < ex.window:
                    a, b, end = next(ranges)
                    pending.append(_Task(a, b, end, ex.submit(a, b)))
                now = time.monotonic()
                timeout = _POLL_S
                if deadline is not None and submitting and now < deadline:
                    timeout = min(timeout, deadline - now)
                new = ex.wait([t.handle for t in pending if t.handle not in done], timeout)
                if new:
                    done |= new
                    last_progress = time.monotonic()
                    for t in pending:  # a failure anywhere surfaces now, not in its turn
                        if t.handle in new and ex.failed(t.handle):
                            _raise_failure(ex, t, what)
                while pending and pending[0].handle in done:
                    t = pending.popleft()
                    done.discard(t.handle)
                    part, e = ex.result(t.handle)
                    state.moments = {k: state.moments[k].merge(part[k]) for k in state.moments}
                    evaluations += e
                    state.n_samples, state.evaluations = t.stop, evaluations
                    merged += 1
                    bar.update(t.stop - t.start)
                    if t.round_end and self.is_done(state, evaluations):
                        return
                if deadline is not None and time.monotonic() >= deadline:
                    if merged:
                        return
                    submitting = False  # nothing merged yet: finish the first task only
                    ex.cancel([t.handle for t in list(pending)[1:]])
                    while len(pending) > 1:
                        done.discard(pending.pop().handle)
                if not new:
                    now = time.monotonic()
                    if now - last_progress >= _POLL_S and now - last_query >= _POLL_S:
                        last_query = now
                        if ex.busy():
                            last_progress = now
                        elif (self.stall_timeout is not None
                              and now - last_progress >= self.stall_timeout):
                            raise ClusterStalledError(
                                f"{what}: no task finished and no worker ran any task for "
                                f"{now - last_progress:.0f} s (stall_timeout="
                                f"{self.stall_timeout:g}); states of its "
                                f"{len(pending)} pending tasks: "
                                f"{ex.describe([t.handle for t in pending])}. Check that the "
                                "workers are alive and can run the tasks (resources, "
                                "restrictions), or raise stall_timeout.")
        finally:
            ex.cancel([t.handle for t in pending])

    def values(self) -> ValuationResult:
        """The result of the last ``fit`` (pyDVL style)."""
        if self.result is None:
            from ..exceptions import NotFittedError

            raise NotFittedError("call fit() first")
        return self.result
