r"""What runs on the workers: a :class:`Job`, its immutable wire form :class:`PackedJob`, and
the :func:`run_batch` wrapper.

A :class:`Job` holds everything one ``fit`` needs on a worker -- the valuation method's batch
function, the utility with its data, the sampler, the truncation policy and the reference
utilities. Tasks only carry ``(packed job, start, stop)``. :func:`run_batch` limits the
worker's threads and calls ``job.batch(job, start, stop)``, which returns partial moments per
data point for the samples ``start..stop-1`` and the number of utility evaluations spent.

What workers share is **bytes, never a live object**. The driver pickles the job once
(:meth:`PackedJob.pack`, cloudpickle; an unpicklable job fails right there with
:class:`~dvl_ooc.exceptions.JobSerializationError` naming the attribute) and scatters the
frozen :class:`PackedJob` (a token and the bytes) to every worker. Each worker thread rebuilds
its own live job from the bytes on its first task and caches it by token in its process, so it
is unpickled once per worker thread and fit, not per task, even when Dask drops and re-fetches
the bytes; the driver drops the cache entries at the end of the fit (:func:`forget_job`). When a
peer fetches the scattered data (Dask's active memory manager drops extra replicas whenever no
task on a worker waits for them, so this happens during a run), the worker pickles only the
token and the bytes: a utility that mutates itself while it runs
(``torch.func.functional_call`` swaps a module's parameters for batched tensors inside ``vmap``)
can never be caught mid-call by a concurrent serialisation, which is how a 2-worker run used to
fail in ``gather_dep`` (``Could not serialize object of type Job``) and hang.

The batch functions themselves belong to the methods (``tmc.tmc_batch``, ``msr.msr_batch``,
``combinatorial.cmc_batch``). Dask workers start by spawn, so a batch function must be a
module-level function of an importable module (it is pickled by reference).

Within a batch, samples are folded in index order with Welford updates; the driver merges
batch partials in batch order (Chan), so a run's values do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..exceptions import JobSerializationError
from .result import Moments

__all__ = ["BatchFn", "Job", "PackedJob", "blas_threads", "forget_job", "forget_job_on_worker",
           "run_batch", "torch_threads"]

#: ``batch(job, start, stop) -> (partial moments by name, utility evaluations)``
BatchFn = Callable[["Job", int, int], tuple[dict[str, Moments], int]]


@dataclass
class Job:
    """What every task of one ``fit`` needs (sent once to all workers as a :class:`PackedJob`).

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


def _dumps(obj: Any) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _culprit(obj: Any, path: str, depth: int = 0) -> tuple[str, BaseException] | None:
    """The deepest attribute path under ``obj`` that fails to pickle, with its error."""
    try:
        _dumps(obj)
        return None
    except Exception as e:  # noqa: BLE001 - any pickling failure is what we look for
        err: BaseException = e
    if depth < 4:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        elif isinstance(getattr(obj, "__dict__", None), dict):
            items = list(vars(obj).items())
        elif isinstance(obj, dict):
            items = [(repr(k), v) for k, v in obj.items()]
        else:
            items = []
        for name, value in items:
            hit = _culprit(value, f"{path}.{name}", depth + 1)
            if hit is not None:
                return hit
    return path, err


_LIVE: OrderedDict[tuple[str, int], Job] = OrderedDict()  # (token, thread) -> live job
_LIVE_LOCK = threading.Lock()
_LIVE_MAX = 64  # entries kept at most (the driver forgets its token at the end of a fit)


@dataclass(frozen=True)
class PackedJob:
    """A :class:`Job` pickled once on the driver: immutable, cheap and safe to ship.

    Attributes:
        token: unique per ``fit``; keys this process's cache of live jobs.
        payload: the cloudpickled job.
    """

    token: str
    payload: bytes

    @classmethod
    def pack(cls, job: Job) -> PackedJob:
        """Pickle ``job`` now; :class:`JobSerializationError` (naming the attribute) if not."""
        try:
            payload = _dumps(job)
        except Exception as e:  # noqa: BLE001 - reported with the failing attribute
            where, err = _culprit(job, "job") or ("job", e)
            raise JobSerializationError(
                f"the valuation's job cannot be sent to the workers: {where} "
                f"({type(_at(job, where)).__name__}) does not pickle ({type(err).__name__}: "
                f"{err}). Everything the utility holds must be picklable (cloudpickle): drop "
                "open files, locks, clients or generators from it, or run without workers "
                "(n_workers=None, client=None).") from e
        return cls(uuid.uuid4().hex, payload)

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return object.__sizeof__(self) + len(self.payload)

    def job(self) -> Job:
        """The calling thread's live job, unpickled on its first call in this process (also
        when the worker dropped and re-fetched the bytes: the cache is keyed by token)."""
        key = (self.token, threading.get_ident())
        with _LIVE_LOCK:
            job = _LIVE.get(key)
            if job is not None:
                _LIVE.move_to_end(key)
                return job
        job = pickle.loads(self.payload)
        with _LIVE_LOCK:
            _LIVE[key] = job
            while len(_LIVE) > _LIVE_MAX:
                _LIVE.popitem(last=False)
        return job


def forget_job(token: str) -> int:
    """Drop this process's live jobs of ``token``; returns how many were dropped."""
    with _LIVE_LOCK:
        keys = [k for k in _LIVE if k[0] == token]
        for k in keys:
            del _LIVE[k]
    return len(keys)


async def forget_job_on_worker(token: str) -> None:
    """:func:`forget_job` as a coroutine: ``client.run(..., wait=False)`` (fire and forget at
    the end of a fit) accepts only coroutine functions."""
    forget_job(token)


def _at(obj: Any, path: str) -> Any:
    """The object at an attribute path made by :func:`_culprit` (best effort)."""
    for name in path.split(".")[1:]:
        if isinstance(obj, dict):
            obj = next((v for k, v in obj.items() if repr(k) == name), obj)
        else:
            obj = getattr(obj, name, obj)
    return obj


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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads = ``n`` inside the block (restored after; ``None``: as is).

    Only when torch is already imported (a torch utility has been unpickled or built)."""
    torch = sys.modules.get("torch")
    if n is None or torch is None or torch.get_num_threads() == int(n):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


_INTEROP_SET = False


def _one_interop_thread_on_worker() -> None:
    """On a Dask worker process, one torch inter-op thread (legal only before any inter-op
    work, so tried once, on the first task)."""
    global _INTEROP_SET
    if _INTEROP_SET:
        return
    _INTEROP_SET = True
    torch = sys.modules.get("torch")
    try:
        from distributed import get_worker

        get_worker()
    except Exception:  # noqa: BLE001 - not on a worker: leave the driver's settings alone
        return
    if torch is not None:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def run_batch(job: Job | PackedJob, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """Partial moments of samples ``start..stop-1`` and the number of utility evaluations.

    BLAS/OpenMP and torch intra-op threads are limited to ``job.blas_threads`` during the
    batch: valuation parallelises over tasks, one thread per task avoids oversubscription."""
    if isinstance(job, PackedJob):
        job = job.job()
    _one_interop_thread_on_worker()
    if not callable(job.batch):
        raise TypeError(f"job.batch must be a batch function, not {type(job.batch).__name__}")
    with blas_threads(job.blas_threads), torch_threads(job.blas_threads):
        return job.batch(job, start, stop)
