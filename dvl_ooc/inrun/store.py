"""The In-Run score store: per-training-sample values accumulated in memory or in Zarr.

Where it lives (``path=``): ``None`` (memory), a local path, an fsspec URL
(``s3://bucket/scores.zarr``) with ``storage_options=``, or a Zarr store object, as influence
stores (:mod:`dvl_ooc.store`, whose location helpers it uses). A full disk or an unreachable
store raise :class:`~dvl_ooc.exceptions.StoreFullError` /
:class:`~dvl_ooc.exceptions.StoreUnavailableError` naming the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from ..exceptions import (
    InputError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
)
from ..store import RESUME_READ, _contents, _Location, store_io_errors


class ScoreStore:
    """Float64 accumulator of scores keyed by training-sample index.

    In memory (``path=None``) it is a NumPy array. Otherwise it is a Zarr v3 array of shape
    ``(n_train,)`` or ``(n_train, n_val)`` chunked along the training axis; :meth:`add` buffers
    per-chunk deltas and :meth:`flush` adds them into the array (read-modify-write per chunk).

    Args:
        n_train, n_val: shape (``n_val=None`` for one score per sample).
        path: ``None`` for memory, a local path, an fsspec URL (with ``storage_options``) or
            a Zarr store object.
        mode: ``"w-"`` create, refusing an existing store (:class:`StoreExistsError`);
            ``"w"`` create, replacing an existing score store; ``"a"`` open an existing store
            with the same shape and attributes and keep accumulating (resume), creating it if
            missing. A non-empty location that is not a Zarr store is never touched.
        chunk_bytes: target bytes per stored chunk (sets the rows per chunk).
        max_buffer_bytes: flush automatically when the buffered deltas exceed this.
        attributes: plain-data metadata recorded in (and checked against) the store.
        storage_options: fsspec options for a URL (``endpoint_url``, ``key``, ``secret``...).
    """

    def __init__(
        self,
        n_train: int,
        n_val: int | None = None,
        path: Any = None,
        *,
        mode: Literal["w-", "w", "a"] = "w-",
        chunk_bytes: int = 8 * 2**20,
        max_buffer_bytes: int = 256 * 2**20,
        attributes: dict[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if n_train < 1:
            raise InputError(f"n_train must be >= 1, got {n_train}")
        if mode not in ("w-", "w", "a"):
            raise InputError(f"mode must be 'w-', 'w' or 'a', got {mode!r}")
        self.shape = (int(n_train),) if n_val is None else (int(n_train), int(n_val))
        row_bytes = 8 * (1 if n_val is None else int(n_val))
        self.chunk_rows = max(1, min(int(n_train), chunk_bytes // row_bytes))
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._buffer: dict[int, np.ndarray] = {}
        self.attributes = dict(attributes or {})
        self.location: _Location | None = None
        self.path: str | None = None
        if path is None:
            if storage_options:
                raise InputError("storage_options= needs a store URL (path=)")
            self._mem: np.ndarray | None = np.zeros(self.shape)
            self.array = None
            return
        import zarr

        self._mem = None
        self.location = loc = _Location(path, storage_options)
        self.path = loc.display  # the local path, the URL or the store object's repr
        with store_io_errors(loc.display, "opening the score store"):
            zs = loc.zarr_store(read_only=False)
            exists, has_any = _contents(loc, zs)
            if has_any and not exists:
                raise StoreError(
                    f"{self.path!r} exists and is not a Zarr store; refusing to touch it "
                    "(remove it yourself or choose another location)"
                )
            if exists and mode == "w-":
                raise StoreExistsError(
                    f"a score store already exists at {self.path!r}; pass mode='a' to keep "
                    "accumulating into it, mode='w' to replace it, or choose another location"
                )
            if mode == "a" and exists:
                arr = zarr.open_array(store=zs, mode="r+", zarr_format=3)
                if tuple(arr.shape) != self.shape:
                    raise StoreMismatchError(
                        f"store {self.path} has shape {tuple(arr.shape)}, expected "
                        f"{self.shape}; use a new location or mode='w' to overwrite"
                    )
                old = {k: v for k, v in arr.attrs.asdict().items() if k != "steps"}
                new = {k: v for k, v in self.attributes.items() if k != "steps"}
                if old != new:
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise StoreMismatchError(
                        f"store {self.path} was written by a different configuration {diff}; "
                        "use a new location or mode='w'"
                    )
                self.array = arr
                self.chunk_rows = int(arr.chunks[0])
            else:
                chunks = (self.chunk_rows,) + self.shape[1:]
                self.array = zarr.create_array(
                    zs, shape=self.shape, chunks=chunks, dtype="float64", fill_value=0.0,
                    attributes=self.attributes, overwrite=True,
                )

    @classmethod
    def open(cls, path: Any, *,
             storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
        """Read a finished store (local path, URL with ``storage_options``, or Zarr store
        object) into memory."""
        import zarr

        loc = _Location(path, storage_options)
        with store_io_errors(loc.display, "reading the score store", RESUME_READ):
            zs = loc.zarr_store(read_only=True)
            if not _contents(loc, zs)[0]:
                raise StoreNotFoundError(f"no score store at {loc.display}")
            return np.asarray(zarr.open_array(store=zs, mode="r", zarr_format=3)[...])

    @property
    def buffered_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffer.values())

    def add(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Add ``values`` (``(b,)`` or ``(b, n_val)``) to the rows ``idx`` (repeats add up)."""
        if self._mem is not None:
            np.add.at(self._mem, idx, values)
            return
        chunk = idx // self.chunk_rows
        for k in np.unique(chunk):
            sel = chunk == k
            buf = self._buffer.get(int(k))
            if buf is None:
                rows = min(self.chunk_rows, self.shape[0] - int(k) * self.chunk_rows)
                buf = self._buffer[int(k)] = np.zeros((rows,) + self.shape[1:])
            np.add.at(buf, idx[sel] - int(k) * self.chunk_rows, values[sel])
        if self.buffered_bytes > self.max_buffer_bytes:
            self.flush()

    def flush(self, **attrs: Any) -> None:
        """Add the buffered deltas into the Zarr array (no-op in memory)."""
        if self.array is None:
            return
        with store_io_errors(str(self.path), "adding scores into the score store"):
            for k in sorted(self._buffer):
                sl = slice(k * self.chunk_rows, k * self.chunk_rows + len(self._buffer[k]))
                self.array[sl] = self.array[sl] + self._buffer[k]
                del self._buffer[k]  # (a failed flush keeps what it has not added)
            if attrs:
                self.array.attrs.update(attrs)

    def to_numpy(self) -> np.ndarray:
        """All accumulated scores (flushes first)."""
        if self._mem is not None:
            return self._mem.copy()
        self.flush()
        return np.asarray(self.array[...])


