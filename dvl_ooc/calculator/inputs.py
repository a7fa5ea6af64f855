"""Input adapters: every data source the calculators accept, behind one interface.

:class:`_Input` normalises ``(x, y)`` into a source with a sample axis of length ``n`` and
answers three questions: the labels (when one scalar per sample is cheaply available), a
fingerprint of the data (recorded in the store so that a resume with other data is refused),
and the chunk ``[start, stop)`` of samples, read either in this process (:meth:`_Input.local`)
or by the workers (:meth:`_Input.remote`).

Sources and how they reach the workers (every chunk is a task of the graph, so that the
scheduler can recompute it on another worker when the worker holding it dies; nothing is
``scatter``-ed, since scattered data lost with its worker cannot be recovered):

* NumPy arrays / torch tensors / array-likes: converted with :func:`dvl_ooc.data.to_numpy`;
  each chunk ``[start, stop)`` is a literal of one graph task (it travels client -> scheduler
  -> one worker, and the scheduler keeps it until the tasks that need it are done: for inputs
  larger than the scheduler's memory, use Zarr or Dask arrays);
* Dask arrays: enter the task graph as their blocks (rechunked to the requested bounds);
* Zarr arrays: read by the workers themselves (``a[start:stop]``), nothing is shipped;
* a ``torch.utils.data.Dataset`` of ``(x, y)`` pairs (or a ``DataLoader``, whose dataset is
  used): one graph task holds the pickled Dataset (fetched from worker to worker), indexed by
  ranges, collated with ``default_collate``.

The fitted model (and CG/LiSSA fit data) travels in one of three forms chosen by the size of
its pickle (:meth:`dvl_ooc.calculator.dask.DaskInfluenceCalculator._send`): one task literal,
literal parts below Dask's large-graph warning threshold (:func:`_graph_part_bytes`) joined by
one task (:func:`_unpickle`), or a file in the store that each worker reads itself
(:class:`_StoredState`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import to_numpy
from ..exceptions import InputError, LengthMismatchError

__all__: list[str] = []


def _is_dask(a: Any) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover
        return False
    return isinstance(a, da.Array)


def _is_zarr(a: Any) -> bool:
    import zarr

    return isinstance(a, zarr.Array)


def _kind(a: Any) -> str:
    if _is_dask(a):
        return "dask"
    if _is_zarr(a):
        return "zarr"
    return "array"


def _read_zarr(a: Any, start: int, stop: int) -> np.ndarray:
    return np.asarray(a[start:stop])


def _read_dataset(ds: Dataset, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import default_collate

    items = [ds[i] for i in range(start, stop)]
    if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
        raise InputError("a Dataset must yield (x, y) pairs")
    x, y = default_collate([(it[0], it[1]) for it in items])
    return x, y


def _pair(x: Any, y: Any) -> tuple[Any, Any]:
    return x, y


def _hold(obj: Any) -> Any:
    """A graph task whose result is its literal argument (data the scheduler can recompute)."""
    return obj


# ------------------------------------------------------------------ shipping the fitted state
#: where the pickled fitted state lives inside a store (see :class:`_StoredState`)
STATE_DIR = ".dvl_ooc_state"


def _pickled(obj: Any) -> bytes:
    """``obj`` pickled as Dask pickles a task literal (cloudpickle: by reference where
    importable, by value for ``__main__``); loaded back with :func:`pickle.loads`."""
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


def _unpickle(*parts: bytes) -> Any:
    """A graph task: the object whose pickle is the concatenation of ``parts``."""
    import pickle

    return pickle.loads(parts[0] if len(parts) == 1 else b"".join(parts))


def _graph_part_bytes() -> int:
    """The largest literal one graph submission carries: half of Dask's
    ``distributed.admin.large-graph-warning-threshold`` (default 10 MB), at least 1 KiB, so that
    a submission of one part never prints Dask's "Sending large graph" warning."""
    import dask
    from dask.utils import parse_bytes

    limit = dask.config.get("distributed.admin.large-graph-warning-threshold", "10MB")
    return max(1024, int(parse_bytes(limit)) // 2)


@dataclass(frozen=True)
class _StoredState:
    """Reference to a pickled object stored under ``key`` in the store at ``where`` (a
    :class:`~dvl_ooc.store._Location`: local path, URL with its storage options, or Zarr store
    object). Only this reference travels through the graph; every worker reads the bytes
    itself (:meth:`load`, called once per worker and calculator token by
    :func:`dvl_ooc.calculator.tasks._prepared`), so a worker started after a crash loads it
    again from the store, with no other worker involved."""

    where: Any
    key: str
    nbytes: int  # (for reports)

    @staticmethod
    def write(where: Any, key: str, data: bytes) -> _StoredState:
        """Write ``data`` under ``key`` as one whole object (an atomic write: Zarr's
        ``LocalStore`` writes a temporary file and renames it, an object store's PUT is
        whole), replacing what is there; a full or unreachable store raises
        :class:`~dvl_ooc.exceptions.StoreFullError` /
        :class:`~dvl_ooc.exceptions.StoreUnavailableError`."""
        from zarr.core.buffer import default_buffer_prototype

        from ..store import _sync, store_io_errors

        with store_io_errors(where.display, "writing the fitted state for the workers"):
            zs = where.zarr_store(read_only=False)
            _sync(zs.set(key, default_buffer_prototype().buffer.from_bytes(data)))
        return _StoredState(where, key, len(data))

    def load(self) -> Any:
        """The object, read from the store and unpickled (a private copy)."""
        from zarr.core.buffer import default_buffer_prototype

        from ..exceptions import StoreError
        from ..store import _sync, store_io_errors

        with store_io_errors(self.where.display, f"reading the fitted state {self.key}"):
            zs = self.where.zarr_store(read_only=True)
            try:
                buf = _sync(zs.get(self.key, prototype=default_buffer_prototype()))
            except FileNotFoundError:
                buf = None
        if buf is None:
            raise StoreError(
                f"the fitted state {self.key!r} is missing from the store at "
                f"{self.where.display!r} (removed while the run was going on?); run the "
                "computation again: mode='a' resumes and writes it again")
        return _unpickle(buf.to_bytes())


def _sample_rows(n: int, k: int = 32) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(np.int64))


@dataclass
class _Input:
    """Normalised (x, y) source with a sample axis of length ``n``."""

    what: str
    x: Any
    y: Any
    kind_x: str  # "array" | "dask" | "zarr" | "dataset"
    kind_y: str
    n: int

    @classmethod
    def make(cls, x: Any, y: Any, what: str) -> _Input:
        if isinstance(x, DataLoader):
            x = x.dataset
        if isinstance(x, Dataset) and not isinstance(x, (np.ndarray, torch.Tensor)):
            if y is not None:
                raise InputError(f"{what}: pass a Dataset of (x, y) pairs with y=None")
            n = len(x)  # type: ignore[arg-type]
            if n == 0:
                raise InputError(f"{what}: the Dataset is empty")
            return cls(what, x, None, "dataset", "dataset", n)
        if x is None or y is None:
            raise InputError(f"{what}: pass both x and y (or a Dataset of (x, y) pairs as x)")
        kx, ky = _kind(x), _kind(y)
        if kx == "array":
            x = to_numpy(x)
        if ky == "array":
            y = to_numpy(y)
        for name, a in (("x", x), ("y", y)):
            if len(a.shape) == 0:
                raise InputError(f"{what}: {name} needs a leading sample axis")
            if any(s is None or (isinstance(s, float) and s != s) for s in a.shape):
                raise InputError(f"{what}: {name} has unknown dask chunk sizes; call "
                                 "compute_chunk_sizes() first")
        if x.shape[0] != y.shape[0]:
            raise LengthMismatchError(
                f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]}; pass one label "
                "per sample"
            )
        if x.shape[0] == 0:
            raise InputError(f"{what}: no samples")
        return cls(what, x, y, kx, ky, int(x.shape[0]))

    # -------------------------------------------------------------- metadata
    def labels(self) -> np.ndarray | None:
        """Labels if they are cheaply available as one scalar per sample, else None."""
        if self.kind_y == "dataset":
            ds = self.x
            for attr in ("targets", "labels"):
                t = getattr(ds, attr, None)
                if t is not None:
                    return to_numpy(t)
            tensors = getattr(ds, "tensors", None)
            if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
                return to_numpy(tensors[1])
            return None
        if len(self.y.shape) != 1:
            return None
        if self.kind_y == "dask":
            return np.asarray(self.y.compute())
        return np.asarray(self.y[:])

    def fingerprint(self) -> str:
        """Hash of the shapes, dtypes and a strided sample of rows (all of them when small)."""
        h = hashlib.sha256()
        h.update(f"{self.n}|{self.kind_x}".encode())
        rows = _sample_rows(self.n)
        if self.kind_x == "dataset":
            for i in rows[:16]:
                item = self.x[int(i)]
                for part in item[:2]:
                    h.update(np.ascontiguousarray(to_numpy(part)).tobytes())
            return h.hexdigest()[:32]
        for a, k in ((self.x, self.kind_x), (self.y, self.kind_y)):
            h.update(f"{tuple(a.shape)}|{np.dtype(a.dtype).str}".encode())
            if k == "array" and a.nbytes <= (64 << 20):
                h.update(np.ascontiguousarray(a).tobytes())
            elif k == "dask":
                h.update(np.ascontiguousarray(np.asarray(a[rows].compute())).tobytes())
            else:
                h.update(np.ascontiguousarray(np.asarray(a[rows] if k == "array" else
                                                         a.get_orthogonal_selection(
                                                             (rows,)))).tobytes())
        return h.hexdigest()[:32]

    def sample_size(self) -> tuple[int, int]:
        """``(elements, itemsize)`` of one input sample ``x[i]`` (for memory estimates; a
        Dataset's first item is read once; ``(0, 0)`` when it is not array-like)."""
        if self.kind_x == "dataset":
            try:
                a = np.asarray(to_numpy(self.x[0][0]))
            except Exception:  # noqa: BLE001 - an item that is not array-like: not estimated
                return 0, 0
            return int(a.size), int(a.dtype.itemsize)
        return int(np.prod(self.x.shape[1:], dtype=np.int64)), int(np.dtype(self.x.dtype).itemsize)

    # -------------------------------------------------------------- chunks
    def local(self, start: int, stop: int) -> tuple[Any, Any]:
        """Read one chunk in this process."""
        if self.kind_x == "dataset":
            return _read_dataset(self.x, start, stop)
        out = []
        for a, k in ((self.x, self.kind_x), (self.y, self.kind_y)):
            if k == "dask":
                out.append(np.asarray(a[start:stop].compute(scheduler="synchronous")))
            else:
                out.append(np.asarray(a[start:stop]))
        return out[0], out[1]

    def remote(self, client: Any, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        """One Dask delayed object per chunk that evaluates to ``(x_chunk, y_chunk)``; each is
        computed by a task of the graph (recomputable after a lost worker, see the module
        docstring). ``client`` is unused (kept for other adapters)."""
        import dask

        if not bounds:
            return []
        tag = f"{self.what.replace(' ', '-')}-{uuid.uuid4().hex}"
        if self.kind_x == "dataset":
            ds_d = dask.delayed(_hold, pure=False)(self.x, dask_key_name=f"dataset-{tag}")
            return [dask.delayed(_read_dataset, pure=False)(
                ds_d, a, b, dask_key_name=f"input-{a}-{b}-{tag}") for a, b in bounds]
        sides = []
        for a, k in ((self.x, self.kind_x), (self.y, self.kind_y)):
            if k == "array":  # literal slices, joined into one task per chunk below
                sides.append([a[s:e] for s, e in bounds])
            elif k == "zarr":
                sides.append([dask.delayed(_read_zarr, pure=True)(a, s, e) for s, e in bounds])
            else:
                sides.append(_dask_blocks(a, bounds))
        return [dask.delayed(_pair, pure=False)(xs, ys, dask_key_name=f"input-{s}-{e}-{tag}")
                for (s, e), xs, ys in zip(bounds, *sides)]


def _dask_blocks(a: Any, bounds: Sequence[tuple[int, int]]) -> list[Any]:
    """Delayed blocks of ``a`` along axis 0 covering exactly ``bounds`` (other axes whole)."""
    parts = [a[s:e] for s, e in bounds]
    out = []
    for p in parts:
        p = p.rechunk({i: -1 for i in range(p.ndim)})
        out.append(p.to_delayed().ravel()[0])
    return out
