"""Zarr v3 influence stores: create, open, resume, metadata, on local disk or any fsspec/Zarr store.

Where a store lives (the ``store`` argument of :meth:`InfluenceStore.create` / ``open``,
of the calculators' ``to_zarr`` and of every query): a local path (``str``/``PathLike``, also
``file://...``), an fsspec URL (``s3://bucket/run.zarr``, ``gs://...``, ``memory://...``) with
``storage_options=`` (passed to fsspec, the dask/xarray convention: ``endpoint_url``, ``key``,
``secret``, ...), or a Zarr store object (``zarr.storage.LocalStore``, ``FsspecStore``,
``MemoryStore``; used as is). Workers open the store themselves from the same location (URL and
storage options, or the pickled store object): nothing but that small description travels
through the scheduler. ``memory://`` URLs and ``MemoryStore`` live in one process: fine for the
sequential calculator and queries, not for worker processes.

Layout (a Zarr v3 group, readable by ``xarray.open_zarr(url, storage_options=...)``):

* ``influences`` ``(n_test, n_train)`` float32 (default), chunks ``(test_chunk, train_chunk)``.
  Each chunk is one *tile* written whole by exactly one task; ``fill_value=NaN`` and
  ``write_empty_chunks=True`` so every written tile leaves a key ``influences/c/i/j``.
  **A tile is done iff its key exists.** Single chunk writes are atomic: on object storage an
  object appears whole or not at all; Zarr's ``LocalStore`` (zarr >= :data:`MIN_ZARR_ATOMIC`
  = 3.1.3, checked before a local store is written) writes a temporary ``*.partial`` file and
  renames it, and partial files are never counted. URLs are opened without fsspec's listings
  cache (other processes add tiles all the time).
* ``test`` / ``train`` (int64 sample indices, dimension coordinates) and, when labels are one
  scalar per sample, ``test_label`` / ``train_label`` (non-dimension coordinates).
* optional ``self_influence`` ``(n_train,)`` chunked like the train axis, fill NaN.
* group attribute ``dvl_ooc``: format, kind, version, method, config, fingerprint, n_test,
  n_train, chunks, dtype, created, data_fingerprint, state.

Write modes (``mode=`` of :meth:`InfluenceStore.create` and of the calculators' ``to_zarr``, as
in ``xarray``/``dask`` ``to_zarr``): ``"a"`` (default) creates the store when absent and resumes
it when its parameters match (``StoreMismatchError`` when they differ); ``"w-"`` creates only
(``StoreExistsError`` when a Zarr store is already there); ``"w"`` replaces an existing Zarr
store. A location that holds something other than a Zarr store is never touched, whatever the
mode.

Creation. First an exclusive *creation claim* ``.dvl_ooc_create`` (the parameters and a digest
of the sample indices) is written where the backend allows it (``O_EXCL``-like link on local
disk, a conditional PUT ``If-None-Match: *`` on S3, Zarr's ``set_if_not_exists`` otherwise); a
run that finds a claim with other parameters is refused (``StoreMismatchError``). Then the
group metadata is written first with ``state: "creating"``, then the arrays and coordinates,
then the consolidated metadata, and last the ``state`` flips to ``"complete"`` (one write of
the root ``zarr.json``, atomic on every store). Until then :meth:`InfluenceStore.open` (hence
every query) refuses the store (:class:`~dvl_ooc.exceptions.UnfinishedStoreError`), so an
interrupted creation is never taken for a valid store. On local disk the store is moreover
built in a sibling directory and renamed into place, so it appears whole. A later ``mode="a"``
run with the same parameters finishes an unfinished one (the creation steps are idempotent
and never delete); one with other parameters is refused (``StoreMismatchError``; ``mode="w"``
replaces it). ``mode="a"`` never deletes anything.

Two runs at once on one location: with the same parameters they cooperate (both creations
write the same metadata and coordinates, nothing is deleted, and tiles are deterministic:
whichever run writes a tile, the bytes are the same); with different parameters the second is
refused with ``StoreMismatchError`` (``mode="a"``/``"w-"``). ``mode="w"`` deletes and must not
be run while another run uses the store; as a guard, each column task checks the store's
parameters (:meth:`InfluenceStore.check_params`) before writing and fails rather than write
into a store replaced under it.

Faults. A full disk or quota raises :class:`~dvl_ooc.exceptions.StoreFullError`, a store that
cannot be reached (after the storage client's own retries: botocore retries a refused
connection for ~10 s by default, ``storage_options={"config_kwargs": {"retries": ...}}`` sets
it) :class:`~dvl_ooc.exceptions.StoreUnavailableError`, from the client or from a worker's
task, each naming the store and saying that a ``mode="a"`` rerun resumes
(:func:`store_io_errors`); tiles already written are whole, and kept.

Finding the done tiles lists the store's keys once into a set (``O(#tiles)``; local disk: one
directory walk; fsspec: one recursive listing, paginated by the server), never
``Array.nchunks_initialized`` (quadratic in the chunk count).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .exceptions import (
    DvlOocError,
    InputError,
    StoreError,
    StoreExistsError,
    StoreFullError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreUnavailableError,
    UnfinishedStoreError,
)

__all__ = ["FORMAT", "MATCH_FIELDS", "MIN_ZARR_ATOMIC", "WRITE_MODES", "InfluenceStore",
           "make_codecs", "store_io_errors"]

FORMAT = 1
ATTR = "dvl_ooc"
ARRAY = "influences"
SELF = "self_influence"
#: group attributes (and coordinate arrays) that must agree for a store to be resumed
MATCH_FIELDS = (
    "format", "kind", "method", "config", "fingerprint", "n_test", "n_train", "chunks", "dtype",
    "data_fingerprint",
)
_RUNTIME = {"write_empty_chunks": True}
#: write modes of influence stores: create or resume, create only, replace
WRITE_MODES = ("a", "w-", "w")
#: the first zarr release whose ``LocalStore`` writes every key atomically (a temporary
#: ``<key>.<uuid>.partial`` file, then ``os.replace``; zarr-python PR #3412, issue #3411, in
#: 3.1.3 of 2025-09-18; 3.1.2 and earlier open the key itself and write into it). Local stores
#: rely on it: a chunk file is whole or absent, so "a tile is done iff its chunk exists".
MIN_ZARR_ATOMIC = "3.1.3"


def _version_tuple(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v)
    return tuple(int(g or 0) for g in m.groups()) if m else (0,)


def _check_atomic_local_writes() -> None:
    """``StoreError`` unless the installed zarr writes local chunks atomically
    (:data:`MIN_ZARR_ATOMIC`); checked before any local store is written."""
    if _version_tuple(zarr.__version__) < _version_tuple(MIN_ZARR_ATOMIC):
        raise StoreError(
            f"zarr {zarr.__version__} writes local chunk files in place (a killed or failing "
            f"write leaves a half-written tile that counts as done); dvl_ooc needs zarr >= "
            f"{MIN_ZARR_ATOMIC} for local stores (atomic writes): pip install -U "
            f"'zarr>={MIN_ZARR_ATOMIC}'")


#: exception classes (module, name) that mean "the store's server could not be reached"
_UNREACHABLE = {
    ("botocore.exceptions", "ConnectionError"),  # EndpointConnectionError, ConnectTimeout...
    ("botocore.exceptions", "HTTPClientError"),  # ConnectionClosedError, ReadTimeoutError...
    ("aiohttp.client_exceptions", "ClientConnectionError"),  # refused, reset, disconnected
    ("aiohttp.client_exceptions", "ServerTimeoutError"),
    ("fsspec.exceptions", "FSTimeoutError"),
    ("requests.exceptions", "ConnectionError"),
    ("google.auth.exceptions", "TransportError"),
}
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from (as a traceback shows them)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else (
            None if e.__suppress_context__ else e.__context__)


#: what a write that failed on an unreachable store or a full disk leaves, and how to resume
RESUME_WRITE = ("Tiles written before are kept (each object is whole or absent); once the store "
                "is {state} again, rerun the same call with mode='a': only the missing tiles "
                "are computed")
#: the same for reads (queries): nothing to resume
RESUME_READ = "Reading it changed nothing; try again once the store is {state} again"


def _mapped_io_error(where: str, doing: str, e: BaseException,
                     resume: str = RESUME_WRITE) -> StoreError | None:
    """:class:`StoreFullError` for a full disk or quota, :class:`StoreUnavailableError` for an
    unreachable store (connection refused, reset, timed out: after the storage client's own
    retries), ``None`` for anything else. Both messages name the store and say how to go on
    (``resume``: :data:`RESUME_WRITE` or :data:`RESUME_READ`, ``{state}`` filled in)."""
    for c in _chain(e):
        if isinstance(c, DvlOocError):
            return None
        if isinstance(c, OSError) and c.errno in _FULL:
            return StoreFullError(
                f"no space left for the store at {where!r} while {doing} ({type(c).__name__}: "
                f"{c}): the disk or quota is full (free space or choose a location with room). "
                + resume.format(state="writable"))
        if isinstance(c, (ConnectionError, TimeoutError)) or any(
                (k.__module__, k.__name__) in _UNREACHABLE for k in type(c).__mro__):
            return StoreUnavailableError(
                f"the store at {where!r} is unreachable while {doing} ({type(c).__name__}: {c}), "
                "after the storage client's retries. " + resume.format(state="reachable")
                + ". (Longer outages can be ridden out by the client's retries, e.g. for S3 "
                "storage_options={'config_kwargs': {'retries': {'max_attempts': 10, "
                "'mode': 'standard'}}}.)")
    return None


@contextlib.contextmanager
def store_io_errors(where: str, doing: str, resume: str = RESUME_WRITE) -> Iterator[None]:
    """Re-raise a full disk/quota as :class:`~dvl_ooc.exceptions.StoreFullError` and an
    unreachable store as :class:`~dvl_ooc.exceptions.StoreUnavailableError` (naming the store
    ``where``, what was being done, and how to go on: by default that a ``mode="a"`` rerun
    resumes, with ``resume=RESUME_READ`` that a read changed nothing); anything else
    propagates unchanged."""
    try:
        yield
    except DvlOocError:
        raise
    except Exception as e:
        mapped = _mapped_io_error(where, doing, e, resume)
        if mapped is None:
            raise
        raise mapped from e


def _write_mode(owner: str, mode: str, deprecated: dict[str, Any]) -> str:
    """Check ``mode``; map the deprecated ``overwrite=`` (True: ``"w"``, False: the default
    ``"a"``) with a ``DeprecationWarning``; refuse any other keyword (``TypeError``)."""
    overwrite = deprecated.pop("overwrite", None)
    if deprecated:
        raise TypeError(f"{owner}() got unexpected keyword argument(s): "
                        f"{', '.join(sorted(deprecated))}")
    if overwrite is not None:
        warnings.warn(f"{owner}: overwrite= is deprecated, use mode='w' (replace) or mode='a' "
                      "(create or resume)", DeprecationWarning, stacklevel=3)
        if overwrite:
            if mode not in ("a", "w"):
                raise InputError(f"{owner}: overwrite=True contradicts mode={mode!r}; pass "
                                 "mode= only")
            mode = "w"
    if mode not in WRITE_MODES:
        raise InputError(f"{owner}: mode must be 'a' (create or resume), 'w-' (create only) or "
                         f"'w' (replace), got {mode!r}")
    return mode


def make_codecs(compressor: Any) -> Any:
    """Zarr ``compressors`` argument from a short name: ``None``/"none" (fastest, ~950 MB/s on
    2 cores; dense float influences compress only ~8 %), ``"lz4"`` (blosc-lz4), ``"zstd"``
    (zstd level 0), or any Zarr v3 codec object / tuple of codecs, passed through."""
    if compressor is None or (isinstance(compressor, str) and compressor.lower() == "none"):
        return None
    if isinstance(compressor, str):
        name = compressor.lower()
        if name == "lz4":
            return (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
        if name == "zstd":
            return (zarr.codecs.ZstdCodec(level=0),)
        raise StoreError(f"unknown compressor {compressor!r}: use None, 'lz4', 'zstd' or a codec")
    return compressor


def _jsonable(v: Any) -> Any:
    """Round-trip through JSON so that comparisons see what the store sees (tuples -> lists)."""
    return json.loads(json.dumps(v, default=str))


_PROBE = ".dvl_ooc_probe_"


def _check_writable(path: Path) -> None:
    """Fail early with ``StoreError`` unless a store can be written at ``path`` (real probe:
    permission bits do not stop root, read-only file systems do)."""
    try:
        if path.exists() and not path.is_dir():
            raise StoreError(f"{str(path)!r} is a file, not a store directory; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        # unique per process and thread: runs at once on one location each probe their own
        probe = path / f"{_PROBE}{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        mapped = _mapped_io_error(str(path), "checking that the store can be written", e)
        if mapped is not None:
            raise mapped from e
        raise StoreError(
            f"cannot write a store at {str(path)!r} ({type(e).__name__}: {e}); choose a path in "
            "a writable directory"
        ) from e


def _name_array(names: Any, n: int, what: str) -> np.ndarray | None:
    """``names`` as ``n`` strings (or None)."""
    if names is None:
        return None
    a = np.asarray([str(v) for v in names], dtype=str) if not isinstance(names, np.ndarray) \
        else names.astype(str)
    if a.shape != (n,):
        raise StoreError(f"{what} must be {n} strings (one per sample), got shape {a.shape}")
    return a


def _label_array(labels: Any, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    a = np.asarray(labels)
    if a.ndim != 1 or len(a) != n:
        if a.ndim == 2 and a.shape == (n, 1):
            a = a[:, 0]
        else:
            return None  # not one scalar per sample: omitted (contract)
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        return a
    return None


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


async def _alist(it: Any) -> list[str]:
    return [k async for k in it]


def _is_url(s: str) -> bool:
    return "://" in s or "::" in s


class _Location:
    """Where a store lives: a local directory, an fsspec URL with its storage options, or a
    Zarr store object. Small and picklable: this is what workers receive to open the store."""

    def __init__(self, target: Any, storage_options: Mapping[str, Any] | None = None) -> None:
        from zarr.abc.store import Store

        if isinstance(target, _Location):
            if storage_options:
                raise InputError("storage_options= is given twice")
            target, storage_options = target.target, target.storage_options
        self.local: Path | None = None
        self.storage_options = dict(storage_options or {})
        if isinstance(target, Store):
            if self.storage_options:
                raise InputError("storage_options= applies to fsspec URLs, not to a Zarr store "
                                 "object (configure the store object itself)")
            self.target: Any = target
            root = getattr(target, "root", None)
            if type(target).__name__ == "LocalStore" and root is not None:
                self.local = Path(root)
            self.display = str(root) if self.local is not None else repr(target)
            return
        if not isinstance(target, (str, os.PathLike)):
            raise InputError(f"a store is a path, an fsspec URL or a Zarr store object, got "
                             f"{type(target).__name__}")
        s = os.fspath(target)
        if isinstance(s, bytes):
            s = s.decode()
        if s.startswith("file://") and "::" not in s:
            s = s[len("file://"):]
        if _is_url(s):
            self.target = s
            self.display = s
            return
        if self.storage_options:
            raise InputError(f"storage_options= applies to fsspec URLs (s3://..., gs://...), "
                             f"not to the local path {s!r}")
        self.local = Path(s)
        self.target = str(self.local)
        self.display = str(self.local)

    def zarr_store(self, read_only: bool) -> Any:
        """A Zarr store object for this location (read-only or writable)."""
        from zarr.abc.store import Store
        from zarr.storage import FsspecStore, LocalStore

        if isinstance(self.target, Store):
            if self.local is not None and not read_only:
                _check_atomic_local_writes()
            if self.target.read_only == read_only or not hasattr(self.target, "with_read_only"):
                return self.target
            return self.target.with_read_only(read_only)
        if self.local is not None:
            if not read_only:
                _check_atomic_local_writes()
            return LocalStore(self.local, read_only=read_only)
        # no listings cache: other processes (the workers, a second run) add tiles all the time,
        # and a cached listing made s3fs answer "not found" for them (read back as NaN)
        options = {"use_listings_cache": False, **self.storage_options}
        try:
            return FsspecStore.from_url(self.target, storage_options=options,
                                        read_only=read_only)
        except (ImportError, ValueError, TypeError) as e:
            raise StoreError(f"cannot open the store URL {self.target!r}: {e} (an s3:// URL "
                             "needs the s3fs package, gs:// gcsfs, ...)") from e

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    def __repr__(self) -> str:
        return f"_Location({self.display!r})"


def _consolidate(zs: Any) -> None:
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec"
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(zs)


def _contents(loc: _Location, zs: Any) -> tuple[bool, bool]:
    """``(has zarr.json, has anything)`` at a location (one or two small requests)."""
    if loc.local is not None:
        p = loc.local
        if p.exists() and not p.is_dir():
            raise StoreError(f"{str(p)!r} is a file, not a store directory; choose another path")
        has_meta = (p / "zarr.json").is_file()
        # another run's writability probe is not content
        return has_meta, has_meta or (p.is_dir() and any(
            not q.name.startswith(_PROBE) for q in p.iterdir()))
    try:
        has_meta = bool(_sync(zs.exists("zarr.json")))
        if has_meta:
            return True, True
        for _ in _sync(_alist(zs.list_dir(""))):
            return False, True
        return False, False
    except FileNotFoundError:
        return False, False
    except OSError as e:
        mapped = _mapped_io_error(loc.display, "reading the store location", e)
        raise (mapped or StoreError(f"cannot read the store location {loc.display!r} "
                                    f"({type(e).__name__}: {e})")) from e


def _params(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in MATCH_FIELDS}


LOCK = ".dvl_ooc_create"


def _lock_bytes(meta: Mapping[str, Any], test_index: np.ndarray, train_index: np.ndarray) -> bytes:
    """The creation claim: the parameters and a digest of the sample indices (the same bytes
    for every run with the same parameters)."""
    import hashlib

    h = hashlib.sha256(np.ascontiguousarray(test_index, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(train_index, dtype=np.int64).tobytes())
    return json.dumps({"params": _params(meta), "index": h.hexdigest()},
                      sort_keys=True).encode()


def _read_lock(loc: _Location, zs: Any) -> bytes | None:
    if loc.local is not None:
        try:
            return (loc.local / LOCK).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
    from zarr.core.buffer import default_buffer_prototype

    try:
        buf = _sync(zs.get(LOCK, prototype=default_buffer_prototype()))
    except FileNotFoundError:
        return None
    return None if buf is None else buf.to_bytes()


def _claim(loc: _Location, zs: Any, data: bytes) -> bytes:
    """Write the creation claim unless one exists (exclusive where the backend allows it:
    ``O_EXCL`` on local disk, a conditional PUT ``If-None-Match: *`` on S3, Zarr's
    ``set_if_not_exists`` for store objects); return the claim that is there afterwards."""
    if loc.local is not None:
        import uuid

        loc.local.mkdir(parents=True, exist_ok=True)
        tmp = loc.local / f"{LOCK}.{uuid.uuid4().hex}.partial"
        try:
            tmp.write_bytes(data)
            os.link(tmp, loc.local / LOCK)  # exclusive and atomic: never a half-written claim
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    else:
        fs, root = getattr(zs, "fs", None), getattr(zs, "path", None)
        done = False
        if fs is not None and type(fs).__name__ == "S3FileSystem":
            try:
                _sync(fs._pipe_file(f"{root}/{LOCK}", data, mode="create"))
            except OSError:  # 412 PreconditionFailed: a claim is there already
                pass
            done = True
        if not done:
            from zarr.core.buffer import default_buffer_prototype

            _sync(zs.set_if_not_exists(LOCK, default_buffer_prototype().buffer.from_bytes(data)))
    got = _read_lock(loc, zs)
    if got is None:  # pragma: no cover - a store that loses what was just written
        raise StoreError(f"cannot write the creation claim of the store at {loc.display!r}")
    return got


class InfluenceStore:
    """Python access to an influence store (see the module docstring for the layout and where
    a store may live)."""

    def __init__(self, location: Any, group: zarr.Group) -> None:
        self.location = location if isinstance(location, _Location) else _Location(location)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs[ATTR])

    @property
    def path(self) -> str:
        """The store's location as text: the local path, the URL, or the store object's repr."""
        return self.location.display

    @property
    def url(self) -> Any:
        """The location as passed to :meth:`open` (local path, URL or Zarr store object)."""
        return self.location.target

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self.location.storage_options)

    @property
    def store(self) -> Any:
        """The underlying Zarr store object (read-only when opened with mode "r")."""
        return self.group.store

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, store: Any, mode: str = "r", *,
             storage_options: Mapping[str, Any] | None = None,
             allow_unfinished: bool = False) -> InfluenceStore:
        """Open an existing store (``mode`` "r" or "r+") at a local path, an fsspec URL (with
        ``storage_options``) or a Zarr store object. ``StoreNotFoundError`` if there is none or
        the location holds something else; :class:`~dvl_ooc.exceptions.UnfinishedStoreError`
        while its creation has not finished (``allow_unfinished=True``: the calculators'
        workers, which check the parameters themselves)."""
        if mode not in ("r", "r+"):
            raise InputError(f"InfluenceStore.open: mode must be 'r' or 'r+', got {mode!r}")
        loc = _Location(store, storage_options)
        zs = loc.zarr_store(read_only=mode == "r")
        hint = ("create one with DaskInfluenceCalculator(...).to_zarr(store, ...)")
        if loc.local is not None:
            if not (loc.local / "zarr.json").is_file():
                raise StoreNotFoundError(
                    f"no dvl_ooc influence store at {loc.display!r} (no zarr.json); {hint}")
        try:
            group = zarr.open_group(store=zs, mode=mode, zarr_format=3, use_consolidated=False)
        except Exception as e:  # noqa: BLE001 - anything unreadable is "not a store"
            mapped = _mapped_io_error(loc.display, "opening the store", e)
            if mapped is not None:  # unreachable is not "not a store"
                raise mapped from e
            if isinstance(e, (FileNotFoundError, zarr.errors.GroupNotFoundError)):
                raise StoreNotFoundError(
                    f"no dvl_ooc influence store at {loc.display!r} (no zarr.json); {hint}"
                ) from e
            raise StoreNotFoundError(
                f"{loc.display!r} is not a readable Zarr v3 group: {type(e).__name__}: {e}"
            ) from e
        meta = group.attrs.get(ATTR)
        if not isinstance(meta, Mapping) or meta.get("kind") != "influence":
            raise StoreNotFoundError(
                f"{loc.display!r} is a Zarr group but not a dvl_ooc influence store")
        if meta.get("state", "complete") != "complete" and not allow_unfinished:
            raise UnfinishedStoreError(
                f"the creation of the store at {loc.display!r} has not finished (interrupted, "
                f"or in progress in another run; started {meta.get('created')}); rerun the "
                "computation with mode='a' and the same parameters to finish it, or mode='w' "
                "to replace it")
        with store_io_errors(loc.display, "opening the store"):
            has_array = ARRAY in group
        if not has_array:
            raise StoreNotFoundError(
                f"{loc.display!r} is a dvl_ooc group without an {ARRAY!r} array")
        return cls(loc, group)

    @classmethod
    def create(
        cls,
        store: Any,
        *,
        n_test: int,
        n_train: int,
        test_chunk: int,
        train_chunk: int,
        method: str,
        config: Mapping[str, Any],
        fingerprint: str,
        data_fingerprint: str = "",
        dtype: Any = "float32",
        test_index: Any = None,
        train_index: Any = None,
        test_labels: Any = None,
        train_labels: Any = None,
        test_names: Any = None,
        train_names: Any = None,
        self_influence: bool = False,
        compressor: Any = None,
        mode: str = "a",
        version: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        diagnostics: Mapping[str, Any] | None = None,
        **deprecated: Any,
    ) -> InfluenceStore:
        """Create a store, or reopen an existing one for resuming, according to ``mode``.

        ``store``: a local path, an fsspec URL (``s3://bucket/run.zarr``; ``storage_options``
        go to fsspec) or a Zarr store object. ``mode="a"`` (default): create when absent,
        reopen when the stored parameters match, else ``StoreMismatchError`` (naming the
        differing fields, data untouched); a store whose creation did not finish is finished
        when the parameters match (else ``StoreMismatchError``). ``"w-"``: ``StoreExistsError``
        when a Zarr store exists there. ``"w"``: replace it. ``StoreError`` for a non-writable
        location or a non-empty one that is not a Zarr store (never touched, in any mode).
        ``overwrite=True`` is the deprecated spelling of ``mode="w"``. ``test_names`` /
        ``train_names``: optional strings naming the samples (e.g. image file paths), stored as
        the coordinates ``test_name`` / ``train_name``. Creation is atomic in effect on every
        backend (see the module docstring).
        """
        from . import __version__

        kwargs = dict(n_test=n_test, n_train=n_train, test_chunk=test_chunk,
                      train_chunk=train_chunk, method=method, config=config,
                      fingerprint=fingerprint, data_fingerprint=data_fingerprint, dtype=dtype,
                      test_index=test_index, train_index=train_index, test_labels=test_labels,
                      train_labels=train_labels, test_names=test_names,
                      train_names=train_names, self_influence=self_influence,
                      compressor=compressor, version=version,
                      storage_options=storage_options)
        mode = _write_mode("InfluenceStore.create", mode, deprecated)
        loc = _Location(store, storage_options)
        n_test, n_train = int(n_test), int(n_train)
        test_chunk, train_chunk = int(test_chunk), int(train_chunk)
        for name, v in (("n_test", n_test), ("n_train", n_train), ("test_chunk", test_chunk),
                        ("train_chunk", train_chunk)):
            if v <= 0:
                raise StoreError(f"{name} must be a positive integer, got {v}")
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise StoreError(f"influence dtype must be floating point, got {dtype}")
        codecs = make_codecs(compressor)
        test_index = np.arange(n_test) if test_index is None else np.asarray(test_index)
        train_index = np.arange(n_train) if train_index is None else np.asarray(train_index)
        for name, idx, n in (("test_index", test_index, n_test),
                             ("train_index", train_index, n_train)):
            if idx.shape != (n,) or idx.dtype.kind not in "iu":
                raise StoreError(f"{name} must be {n} integers, got shape {idx.shape} {idx.dtype}")
        names = {"test_name": _name_array(test_names, n_test, "test_names"),
                 "train_name": _name_array(train_names, n_train, "train_names")}
        meta = _jsonable({
            "format": FORMAT,
            "kind": "influence",
            "version": version or __version__,
            "method": method,
            "config": dict(config),
            "fingerprint": fingerprint,
            "n_test": n_test,
            "n_train": n_train,
            "chunks": [test_chunk, train_chunk],
            "dtype": dtype.name,
            "data_fingerprint": data_fingerprint,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            # the model's curvature diagnostics (informational, not matched on resume)
            "diagnostics": None if diagnostics is None else dict(diagnostics),
        })
        if loc.local is not None:
            _check_writable(loc.local)
        with store_io_errors(loc.display, "creating the store"):
            zs = loc.zarr_store(read_only=False)
            has_meta, has_any = _contents(loc, zs)
            claim = _lock_bytes(meta, test_index, train_index)
            lock = _read_lock(loc, zs) if has_any else None
            if has_any and not has_meta and lock is None:
                raise StoreError(
                    f"{loc.display!r} exists and is not a Zarr store; refusing to touch it "
                    "(remove it yourself or choose another location)"
                )
            if (has_meta or lock is not None) and mode == "w-":
                raise StoreExistsError(
                    f"a Zarr store exists at {loc.display!r} and mode='w-' creates only; pass "
                    "mode='a' to resume it, mode='w' to replace it, or choose another location"
                )
            build = dict(loc=loc, zs=zs, meta=meta, claim=claim, n_test=n_test, n_train=n_train,
                         test_chunk=test_chunk, train_chunk=train_chunk, dtype=dtype,
                         codecs=codecs, test_index=test_index, train_index=train_index,
                         test_labels=test_labels, train_labels=train_labels, names=names,
                         self_influence=self_influence)
            if mode == "a" and has_meta:
                try:
                    old = cls.open(loc, mode="r+", allow_unfinished=True)
                except StoreNotFoundError as e:
                    if lock is None:
                        raise StoreMismatchError(
                            f"{loc.display!r} holds a Zarr store that is not a dvl_ooc influence "
                            "store; pass mode='w' to replace it") from e
                    old = None  # our creation, interrupted before its first array
                if old is not None:
                    diff = [k for k in MATCH_FIELDS if old.attrs.get(k) != meta[k]]
                    if not np.array_equal(old.test_index, test_index):
                        diff.append("test_index")
                    if not np.array_equal(old.train_index, train_index):
                        diff.append("train_index")
                    for key, values in names.items():
                        stored = old._read1d(key)
                        if values is not None and stored is not None and not np.array_equal(
                                np.asarray(stored.tolist(), dtype=str), values):
                            diff.append(key)
                    unfinished = old.attrs.get("state", "complete") != "complete"
                    if diff:
                        detail = "; ".join(
                            f"{k}: stored {old.attrs.get(k)!r} != requested {meta.get(k)!r}"
                            for k in diff if k in meta
                        )
                        what = ("has an unfinished creation with different parameters"
                                if unfinished else "was created with different parameters")
                        raise StoreMismatchError(
                            f"the store at {loc.display!r} {what} "
                            f"({', '.join(diff)}){': ' + detail if detail else ''}. Pass "
                            "mode='w' to replace it, or choose another location"
                        )
                    if not unfinished:
                        if self_influence and old.self_influence is None:
                            old._create_self_influence(compressor)
                            _consolidate(zs)
                            old = cls.open(loc, mode="r+")
                        return old
                # same parameters, creation not finished (interrupted, or running elsewhere): finish
                return cls._build(**build)
            if mode == "w" and (has_meta or lock is not None):
                try:
                    if loc.local is not None:
                        shutil.rmtree(loc.local)
                    else:
                        _sync(zs.delete_dir(""))
                        if lock is not None and _read_lock(loc, zs) is not None:
                            _sync(zs.delete(LOCK))
                except OSError as e:
                    raise (_mapped_io_error(loc.display, "replacing the store", e) or StoreError(
                        f"cannot replace the store at {loc.display!r}: {e}")) from e
            if loc.local is None:
                return cls._build(**build)
            # local disk: build aside and rename into place (atomic on POSIX); the store appears
            # whole, and of two runs racing to create it the second rename fails
            p = loc.local
            tmp = p.parent / f".{p.name}.creating-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                cls._build(**{**build, "loc": _Location(tmp), "zs": _Location(tmp).zarr_store(
                    read_only=False)})
                p.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, p)  # onto the empty directory
            except DvlOocError:  # (StoreFullError is an OSError too)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if (p / "zarr.json").is_file() and mode != "w":
                    # another run created it meanwhile: resume it if the parameters match
                    return cls.create(store, **{**kwargs, "mode": "a"})
                raise StoreError(f"cannot write the store at {loc.display!r}: {e}") from e
            return cls.open(loc, mode="r+")

    @classmethod
    def _build(cls, *, loc: _Location, zs: Any, meta: dict[str, Any], claim: bytes,
               n_test: int, n_train: int, test_chunk: int, train_chunk: int, dtype: np.dtype,
               codecs: Any, test_index: np.ndarray, train_index: np.ndarray, test_labels: Any,
               train_labels: Any, names: dict[str, np.ndarray | None], self_influence: bool
               ) -> InfluenceStore:
        """The creation protocol (module docstring): the exclusive creation claim (refused when
        another run claimed the location with other parameters), the group with ``state:
        "creating"``, arrays and coordinates (created only when absent; coordinates rewritten
        with the same values), consolidated metadata, then ``state: "complete"``. Idempotent
        for the same parameters; deletes nothing."""
        try:
            got = _claim(loc, zs, claim)
        except OSError as e:
            mapped = _mapped_io_error(loc.display, "writing the creation claim", e)
            if mapped is not None:
                raise mapped from e
            raise StoreError(f"cannot write the store at {loc.display!r}: "
                             f"{type(e).__name__}: {e}") from e
        if got != claim:
            try:
                other = json.loads(got)["params"]
                diff = [k for k in MATCH_FIELDS if other.get(k) != meta.get(k)] or ["index"]
            except (ValueError, KeyError, TypeError, AttributeError):
                diff = ["(unreadable claim)"]
            raise StoreMismatchError(
                f"another run is creating (or created) a store with other parameters at "
                f"{loc.display!r} ({', '.join(diff)} differ); pass mode='w' to replace it once "
                "that run is over, or choose another location")
        labels = {"test_label": _label_array(test_labels, n_test),
                  "train_label": _label_array(train_labels, n_train)}

        def require(group: zarr.Group, name: str, **kw: Any) -> zarr.Array:
            try:  # (create_array checks for an existing node itself: one request, not two)
                return group.create_array(name, **kw)
            except zarr.errors.ContainsArrayError:  # a cooperating run created it meanwhile
                return group[name]  # type: ignore[return-value]

        try:
            # creates the group, or opens the one a cooperating/interrupted run made (its
            # attributes are then left as they are)
            try:
                group = zarr.open_group(store=zs, mode="a", zarr_format=3,
                                        use_consolidated=False,
                                        attributes={ATTR: {**meta, "state": "creating"}})
            except zarr.errors.ContainsGroupError:  # a cooperating run made it in between
                group = zarr.open_group(store=zs, mode="r+", zarr_format=3,
                                        use_consolidated=False)
            coords = [n for n, v in labels.items() if v is not None]
            coords += [n for n, v in names.items() if v is not None]
            require(group, ARRAY, shape=(n_test, n_train), chunks=(test_chunk, train_chunk),
                    dtype=dtype, fill_value=np.nan, dimension_names=["test", "train"],
                    compressors=codecs, attributes={"coordinates": " ".join(coords)},
                    config=_RUNTIME)
            values: list[tuple[str, str, np.ndarray]] = [
                ("test", "test", test_index.astype(np.int64)),
                ("train", "train", train_index.astype(np.int64))]
            values += [(n, n.split("_")[0], v) for n, v in labels.items() if v is not None]
            values += [(n, n.split("_")[0], v) for n, v in names.items() if v is not None]
            for name, dim, v in values:
                a = require(group, name, shape=v.shape, dtype=str if v.dtype.kind == "U"
                            else v.dtype, chunks=(max(1, min(len(v), 1 << 20)),),
                            dimension_names=[dim])
                a[:] = v
            if self_influence:
                require(group, SELF, shape=(n_train,), chunks=(train_chunk,), dtype=dtype,
                        fill_value=np.nan, dimension_names=["train"], compressors=codecs,
                        config=_RUNTIME)
            _consolidate(zs)
            group = zarr.open_group(store=zs, mode="r+", zarr_format=3)
            group.attrs.update({ATTR: {**meta, "state": "complete"}})
            if loc.local is None:
                # a cooperating run's consolidation (a read-modify-write of the root metadata)
                # may have read the state before this flip and written it back after: the last
                # write of every run is a consolidation after its own flip, so the store ends
                # "complete" once every cooperating creation has finished
                _consolidate(zs)
        except OSError as e:
            mapped = _mapped_io_error(loc.display, "creating the store", e)
            if mapped is not None:
                raise mapped from e
            raise StoreError(f"cannot write the store at {loc.display!r}: "
                             f"{type(e).__name__}: {e}") from e
        # (a cooperating creation may show "creating" for a moment: this one has finished)
        return cls.open(loc, mode="r+", allow_unfinished=True)

    def check_params(self, expected: Mapping[str, Any]) -> None:
        """Raise ``StoreMismatchError`` unless the store's parameters (:data:`MATCH_FIELDS`)
        are ``expected`` (the guard a column task runs before writing: a store replaced under
        a running job is never written with the old job's tiles)."""
        have = _params(self.attrs)
        if have != _params(expected):
            diff = [k for k in MATCH_FIELDS if have.get(k) != expected.get(k)]
            raise StoreMismatchError(
                f"the store at {self.path!r} no longer has the parameters of this run "
                f"({', '.join(diff)} differ): it was replaced by another run; tiles not written")

    def params(self) -> dict[str, Any]:
        """The parameters that must agree for a store to be resumed (:data:`MATCH_FIELDS`)."""
        return _params(self.attrs)

    def _create_self_influence(self, compressor: Any) -> None:
        self.group.create_array(
            SELF, shape=(self.shape[1],), chunks=(self.chunks[1],), dtype=self.attrs["dtype"],
            fill_value=np.nan, dimension_names=["train"], compressors=make_codecs(compressor),
            config=_RUNTIME,
        )

    # ------------------------------------------------------------------ access
    @property
    def influences(self) -> zarr.Array:
        """The ``(n_test, n_train)`` Zarr array (writes of whole chunks keep keys for resume)."""
        mode = "r" if self.group.store.read_only else "r+"
        return zarr.open_array(store=self.group.store, path=ARRAY, mode=mode, config=_RUNTIME,
                               zarr_format=3)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.attrs["n_test"]), int(self.attrs["n_train"])

    @property
    def chunks(self) -> tuple[int, int]:
        c = self.attrs["chunks"]
        return int(c[0]), int(c[1])

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tiles along (test, train)."""
        (n, m), (a, b) = self.shape, self.chunks
        return -(-n // a), -(-m // b)

    @property
    def n_tiles(self) -> int:
        g = self.grid
        return g[0] * g[1]

    def _read1d(self, name: str) -> np.ndarray | None:
        return self.group[name][:] if name in self.group else None

    @property
    def test_index(self) -> np.ndarray:
        return self._read1d("test")  # type: ignore[return-value]

    @property
    def train_index(self) -> np.ndarray:
        return self._read1d("train")  # type: ignore[return-value]

    @property
    def test_labels(self) -> np.ndarray | None:
        return self._read1d("test_label")

    @property
    def train_labels(self) -> np.ndarray | None:
        return self._read1d("train_label")

    @property
    def test_names(self) -> np.ndarray | None:
        """Names of the test samples (e.g. file paths) when the store has them."""
        v = self._read1d("test_name")
        return None if v is None else np.asarray(v.tolist(), dtype=object)

    @property
    def train_names(self) -> np.ndarray | None:
        """Names of the training samples (e.g. file paths) when the store has them."""
        v = self._read1d("train_name")
        return None if v is None else np.asarray(v.tolist(), dtype=object)

    @property
    def self_influence(self) -> zarr.Array | None:
        if SELF not in self.group:
            return None
        mode = "r" if self.group.store.read_only else "r+"
        return zarr.open_array(store=self.group.store, path=SELF, mode=mode, config=_RUNTIME,
                               zarr_format=3)

    def _chunk_keys(self, name: str, ndim: int) -> set[tuple[int, ...]]:
        """Chunk indices of array ``name`` whose key exists: one listing of the store's keys
        under ``<name>/c/`` (local disk: a directory walk, ~2x faster than Zarr's listing);
        temporary ``*.partial`` files of in-flight local writes are not chunks."""
        if self.location.local is not None:
            return self._local_chunk_keys(name, ndim)
        out: set[tuple[int, ...]] = set()
        prefix = f"{name}/c/"
        try:
            with store_io_errors(self.path, "listing the done tiles"):
                keys = _sync(_alist(self.group.store.list_prefix(prefix)))
        except FileNotFoundError:
            return out
        for k in keys:
            parts = k[len(prefix):].split("/") if k.startswith(prefix) else []
            if len(parts) == ndim and all(p.isdigit() for p in parts):
                out.add(tuple(int(p) for p in parts))
        return out

    def _local_chunk_keys(self, name: str, ndim: int) -> set[tuple[int, ...]]:
        root = Path(self.location.local) / name / "c"  # type: ignore[arg-type]
        out: set[tuple[int, ...]] = set()
        if not root.is_dir():
            return out

        def walk(d: Path, prefix: tuple[int, ...]) -> None:
            with os.scandir(d) as it:
                for e in it:
                    if not e.name.isdigit():
                        continue  # temp files of in-flight writes
                    key = (*prefix, int(e.name))
                    if len(key) == ndim:
                        if e.is_file():
                            out.add(key)
                    elif e.is_dir():
                        walk(Path(e.path), key)

        walk(root, ())
        return out

    def done_tiles(self) -> set[tuple[int, int]]:
        """Tiles ``(i, j)`` whose chunk exists (listed once; O(number of tiles))."""
        return self._chunk_keys(ARRAY, 2)  # type: ignore[return-value]

    def done_self_influence(self) -> set[int]:
        """Train chunks ``j`` whose self-influence chunk exists."""
        if SELF not in self.group:
            return set()
        return {k[0] for k in self._chunk_keys(SELF, 1)}

    @property
    def is_complete(self) -> bool:
        if len(self.done_tiles()) != self.n_tiles:
            return False
        if SELF in self.group:
            return len(self.done_self_influence()) == self.grid[1]
        return True

    def tile_slices(self, i: int, j: int) -> tuple[slice, slice]:
        (n, m), (a, b) = self.shape, self.chunks
        return slice(i * a, min(n, (i + 1) * a)), slice(j * b, min(m, (j + 1) * b))

    def to_xarray(self, **kwargs: Any) -> Any:
        """``xarray.open_zarr(store)``: the labelled, lazy (dask-backed) Dataset."""
        import xarray as xr

        return xr.open_zarr(self.group.store, **kwargs)

    def to_dask(self) -> Any:
        """The influence matrix as a dask array with one block per tile."""
        import dask.array as da

        return da.from_zarr(self.influences)

    def __repr__(self) -> str:
        done = len(self.done_tiles())
        return (f"InfluenceStore({self.path!r}, method={self.attrs.get('method')}, "
                f"shape={self.shape}, chunks={self.chunks}, tiles {done}/{self.n_tiles})")
