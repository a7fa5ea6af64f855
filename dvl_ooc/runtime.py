"""Where work runs: local Dask clusters (one place that starts them, with the spawn-pitfall
check) and progress bars.

The spawn pitfall. ``LocalCluster`` workers are started with the ``spawn`` method: each worker
process re-imports the main script (as ``__mp_main__``) before it can run a task. A flat script
without an ``if __name__ == "__main__":`` guard therefore re-runs all its work (loading data,
training, fitting) in every worker before the cluster fails to start, which looks like a hang
of several minutes with no message. :func:`check_main_guard` detects the situation in the parent
*before* any worker is spawned: it finds the main script's module-level frame on the call stack
and checks, from the script's syntax tree, that the line being executed lies inside an
``if __name__ == "__main__":`` block. Inside a spawned child that is still importing the main
script (``multiprocessing``'s bootstrapping phase) it raises as well.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import multiprocessing
import os
import sys
from collections.abc import Iterator
from typing import Any

from .exceptions import InputError, MainGuardError

__all__ = ["available_memory", "check_main_guard", "format_bytes", "local_cluster", "progress"]


def _is_main_test(node: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either operand order)."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1
            and isinstance(node.ops[0], ast.Eq)):
        return False
    sides = [node.left, node.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


@functools.lru_cache(maxsize=8)
def _guarded_lines(path: str, mtime: float) -> tuple[tuple[int, int], ...] | None:
    """Line ranges of the bodies of ``if __name__ == "__main__":`` blocks in a script."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    ranges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            ranges.append((node.body[0].lineno, node.body[-1].end_lineno or node.lineno))
    return tuple(ranges)


def _unguarded_main_line() -> tuple[str, int] | None:
    """``(script, line)`` when the main script's module-level code is running outside an
    ``if __name__ == "__main__":`` block somewhere up the stack; None otherwise."""
    import os

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return None  # interactive session, notebook, python -c: workers do not re-import it
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            try:
                mtime = os.path.getmtime(path)
            except OSError:
                return None
            ranges = _guarded_lines(os.path.abspath(path), mtime)
            if ranges is None:
                return None
            line = frame.f_lineno
            if any(a <= line <= b for a, b in ranges):
                return None
            return path, line
        frame = frame.f_back
    return None


def check_main_guard(what: str) -> None:
    """Raise :class:`MainGuardError` when starting worker processes now would re-run the main
    script in every worker (see the module docstring). ``what`` names the caller."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise MainGuardError(
            f"{what} was called while a spawned worker process was importing the main script: "
            "put the script's code under `if __name__ == \"__main__\":`"
        )
    hit = _unguarded_main_line()
    if hit is not None:
        path, line = hit
        raise MainGuardError(
            f"{what} starts worker processes, and {path}, line {line}, runs it outside an "
            "`if __name__ == \"__main__\":` block. Each worker process re-imports the main "
            "script, so it would re-run everything above (data loading, training, fitting) "
            "before the cluster could start. Put the script's code under "
            "`if __name__ == \"__main__\":` (or in a function called from there)."
        )


#: set in every local worker process: one BLAS/OpenMP thread per task thread
_ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}


#: set in every local worker process before it starts. Dask's nanny sets
#: ``MALLOC_TRIM_THRESHOLD_=65536``, and setting any glibc malloc tunable switches off glibc's
#: dynamic mmap threshold: every allocation >= 128 KiB became an ``mmap`` + page faults +
#: ``munmap``, and the heap top was returned to the system after every step. Torch training in
#: a worker ran ~30 % slower than in the driver (stacked models), and two one-model workers
#: ran at 6 trainings/s each where two plain processes ran at 9 (3.5x the page faults;
#: ``benchmarks/bench_valuation.py``). 32 MiB is the ceiling glibc's own dynamic mmap threshold
#: would reach; up to 64 MiB of free heap top stays with a worker.
_PRE_SPAWN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
#: Dask's own values of those variables (replaced; any other value is the user's and wins)
_DASK_DEFAULT_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536"}


def _chosen_malloc_env() -> dict[str, str]:
    """The variables of ``_PRE_SPAWN_ENV`` the user has not set (in this process's environment
    or Dask's ``distributed.nanny.pre-spawn-environ``; Dask's own default does not count)."""
    import dask

    cfg = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    chosen = {}
    for k, v in _PRE_SPAWN_ENV.items():
        cur = os.environ.get(k, cfg.get(k))
        if cur is None or str(cur) == _DASK_DEFAULT_ENV.get(k):
            chosen[k] = v
    return chosen


@contextlib.contextmanager
def _worker_malloc_env(chosen: dict[str, str]) -> Iterator[None]:
    """Nannies created inside start their workers with ``chosen``: for a ``worker_class`` of
    the user's, which :func:`_malloc_nanny_class` cannot replace.

    Both places are set because the nanny reads the environment first, and Dask leaves its own
    values in ``os.environ`` after the first cluster of a process; the environment is restored
    on exit.
    """
    import dask

    saved = {k: os.environ.get(k) for k in chosen}
    os.environ.update(chosen)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v
                              for k, v in chosen.items()}):
            yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def local_cluster(n_workers: int | None = None, *, threads_per_worker: int = 1,
                  kind: str = "local", what: str = "a local Dask cluster",
                  dashboard_address: str | None = ":0", **kwargs: Any) -> Any:
    """Start a ``LocalCluster`` of worker processes (``kind="local"``) or a
    ``dask_cuda.LocalCUDACluster`` with one GPU per worker (``kind="cuda"``), after
    :func:`check_main_guard`.

    Thread pinning: each worker process runs ``threads_per_worker`` tasks at once, so its
    OpenMP/MKL/OpenBLAS pools get one thread per task (``OMP_NUM_THREADS`` etc. set to 1 in the
    workers' environment before torch or numpy load; an ``env=`` you pass wins). More would
    oversubscribe the cores: ``n_workers x threads_per_worker`` tasks already run at once.

    Memory allocator: worker processes start with ``MALLOC_MMAP_THRESHOLD_`` = 32 MiB and
    ``MALLOC_TRIM_THRESHOLD_`` = 64 MiB (``_PRE_SPAWN_ENV``; a value you set in this process's
    environment or in Dask's ``distributed.nanny.pre-spawn-environ`` wins), also workers added
    later with ``cluster.scale()``, unless you pass your own ``worker_class``.
    """
    if kind not in ("local", "cuda"):
        raise InputError(f"cluster must be 'local' or 'cuda', got {kind!r}")
    check_main_guard(what)
    if kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            raise InputError("cluster='cuda' needs dask-cuda with the extra matching torch's "
                             "CUDA major version: pip install 'dask-cuda[cu12]' or "
                             "'dask-cuda[cu13]'") from e
        own_class = "worker_class" in kwargs or bool(kwargs.get("log_spilling"))
        return _start(LocalCUDACluster, own_class, n_workers=n_workers,
                      threads_per_worker=threads_per_worker,
                      dashboard_address=dashboard_address, **kwargs)
    from distributed import LocalCluster

    kwargs["env"] = {**_ONE_THREAD_ENV, **(kwargs.get("env") or {})}
    return _start(LocalCluster, "worker_class" in kwargs, n_workers=n_workers,
                  threads_per_worker=threads_per_worker, processes=True,
                  dashboard_address=dashboard_address, **kwargs)


def _start(cluster_class: type, own_class: bool, **kwargs: Any) -> Any:
    """``cluster_class(**kwargs)`` whose workers get the malloc variables: through the cluster's
    worker spec (:func:`_malloc_nanny_class`), or with a worker class of the user's (or
    dask-cuda's spilling logger), through the environment while the cluster starts."""
    chosen = _chosen_malloc_env()
    if not own_class:
        return cluster_class(worker_class=_malloc_nanny_class(), malloc_env=chosen, **kwargs)
    with _worker_malloc_env(chosen):
        return cluster_class(**kwargs)


@functools.cache
def _malloc_nanny_class() -> type:
    """``distributed.Nanny`` that starts its worker process with ``malloc_env`` (the
    variables :func:`_chosen_malloc_env` chose when the cluster was created). The cluster's
    worker spec keeps the class and the variables, so workers added later by
    ``cluster.scale()`` or adaptive scaling get them too."""
    from distributed import Nanny

    class MallocNanny(Nanny):
        def __init__(self, *args: Any, malloc_env: dict[str, str] | None = None,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            given = kwargs.get("env") or {}  # a variable passed as env= is the user's
            for k, v in (malloc_env or {}).items():
                if k not in given:  # before the spawn (glibc reads it) and in the worker
                    self.pre_spawn_env[k] = self.env[k] = v

    MallocNanny.__qualname__ = MallocNanny.__name__ = "MallocNanny"
    return MallocNanny


def progress(enabled: bool, *, total: int | None = None, unit: str = "it",
             desc: str | None = None) -> Any:
    """A ``tqdm`` progress bar (disabled when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc=desc)


def available_memory() -> int:
    """Bytes of memory this process can still allocate (``psutil``'s available memory)."""
    import psutil

    return int(psutil.virtual_memory().available)


def format_bytes(n: float) -> str:
    """``n`` bytes in B/KiB/MiB/GiB/TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
