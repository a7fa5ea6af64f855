"""Zarr v3 influence stores: create, open, resume, metadata.

Layout (a Zarr v3 group directory, readable by ``xarray.open_zarr(path)``):

* ``influences`` ``(n_test, n_train)`` float32 (default), chunks ``(test_chunk, train_chunk)``.
  Each chunk is one *tile* written whole by exactly one task; ``fill_value=NaN`` and
  ``write_empty_chunks=True`` so every written tile leaves a key ``influences/c/i/j``.
  **A tile is done iff its key exists** (chunk writes of a ``LocalStore`` are atomic: temp file
  and rename, so a killed writer never leaves a half-written chunk).
* ``test`` / ``train`` (int64 sample indices, dimension coordinates) and, when labels are one
  scalar per sample, ``test_label`` / ``train_label`` (non-dimension coordinates).
* optional ``self_influence`` ``(n_train,)`` chunked like the train axis, fill NaN.
* group attribute ``dvl_ooc``: format, kind, version, method, config, fingerprint, n_test,
  n_train, chunks, dtype, created, data_fingerprint.

Write modes (``mode=`` of :meth:`InfluenceStore.create` and of the calculators' ``to_zarr``, as
in ``xarray``/``dask`` ``to_zarr``): ``"a"`` (default) creates the store when absent and resumes
it when its parameters match (``StoreMismatchError`` when they differ); ``"w-"`` creates only
(``StoreExistsError`` when a Zarr store is already there); ``"w"`` replaces an existing Zarr
store. A directory that is not a Zarr store is never touched, whatever the mode.

Finding the done tiles lists the key directory once into a set (``O(#tiles)``), never
``Array.nchunks_initialized`` (quadratic in the chunk count).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .exceptions import (
    InputError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
)

__all__ = ["FORMAT", "MATCH_FIELDS", "WRITE_MODES", "InfluenceStore", "make_codecs"]

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


def _check_writable(path: Path) -> None:
    """Fail early with ``StoreError`` unless a store can be written at ``path`` (real probe:
    permission bits do not stop root, read-only file systems do)."""
    try:
        if path.exists() and not path.is_dir():
            raise StoreError(f"{str(path)!r} is a file, not a store directory; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dvl_ooc_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
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


def _consolidate(p: Path) -> None:
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec"
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(p))


class InfluenceStore:
    """Python access to an influence store (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs[ATTR])

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> InfluenceStore:
        """Open an existing store (``mode`` "r" or "r+"); ``StoreNotFoundError`` if there is
        none at ``path`` or the path holds something else."""
        p = Path(path)
        if not (p / "zarr.json").is_file():
            raise StoreNotFoundError(
                f"no dvl_ooc influence store at {str(p)!r} (no zarr.json); create one with "
                "DaskInfluenceCalculator(...).to_zarr(path, ...)"
            )
        try:
            group = zarr.open_group(store=str(p), mode=mode, zarr_format=3, use_consolidated=False)
        except Exception as e:  # noqa: BLE001 - anything unreadable is "not a store"
            raise StoreNotFoundError(f"{str(p)!r} is not a readable Zarr v3 group: {e}") from e
        meta = group.attrs.get(ATTR)
        if not isinstance(meta, Mapping) or meta.get("kind") != "influence" or ARRAY not in group:
            raise StoreNotFoundError(
                f"{str(p)!r} is a Zarr group but not a dvl_ooc influence store"
            )
        return cls(p, group)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
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
        **deprecated: Any,
    ) -> InfluenceStore:
        """Create a store, or reopen an existing one for resuming, according to ``mode``.

        ``mode="a"`` (default): create when absent, reopen when the stored parameters match,
        else ``StoreMismatchError`` (naming the differing fields, data untouched). ``"w-"``:
        ``StoreExistsError`` when a Zarr store exists at ``path``. ``"w"``: replace it.
        ``StoreError`` for a non-writable path or a non-empty directory that is not a Zarr store
        (never touched, in any mode). ``overwrite=True`` is the deprecated spelling of
        ``mode="w"``. ``test_names`` / ``train_names``: optional strings naming the samples
        (e.g. image file paths), stored as the coordinates ``test_name`` / ``train_name``.
        """
        from . import __version__

        mode = _write_mode("InfluenceStore.create", mode, deprecated)
        p = Path(path)
        n_test, n_train = int(n_test), int(n_train)
        test_chunk, train_chunk = int(test_chunk), int(train_chunk)
        for name, v in (("n_test", n_test), ("n_train", n_train), ("test_chunk", test_chunk),
                        ("train_chunk", train_chunk)):
            if v <= 0:
                raise StoreError(f"{name} must be a positive integer, got {v}")
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise StoreError(f"influence dtype must be floating point, got {dtype}")
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
        })
        _check_writable(p)
        if p.exists():
            if any(p.iterdir()) and not (p / "zarr.json").exists():
                raise StoreError(
                    f"{str(p)!r} exists and is not a Zarr store; refusing to touch it "
                    "(remove it yourself or choose another path)"
                )
            if (p / "zarr.json").exists() and mode == "w-":
                raise StoreExistsError(
                    f"a Zarr store exists at {str(p)!r} and mode='w-' creates only; pass "
                    "mode='a' to resume it, mode='w' to replace it, or choose another path"
                )
            if (p / "zarr.json").exists() and mode == "a":
                try:
                    old = cls.open(p, mode="r+")
                except StoreNotFoundError as e:
                    raise StoreMismatchError(
                        f"{str(p)!r} holds a Zarr store that is not a dvl_ooc influence store; "
                        "pass mode='w' to replace it"
                    ) from e
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
                if diff:
                    detail = "; ".join(
                        f"{k}: stored {old.attrs.get(k)!r} != requested {meta.get(k)!r}"
                        for k in diff if k in meta
                    )
                    raise StoreMismatchError(
                        f"the store at {str(p)!r} was created with different parameters "
                        f"({', '.join(diff)}){': ' + detail if detail else ''}. Pass "
                        "mode='w' to replace it, or choose another path"
                    )
                if self_influence and old.self_influence is None:
                    old._create_self_influence(compressor)
                    _consolidate(p)
                    old = cls.open(p, mode="r+")
                return old
            if mode == "w" and (p / "zarr.json").exists():
                shutil.rmtree(p)
        # build the store in a sibling temp dir and rename it into place: a run killed during
        # creation never leaves a half-made store at ``path``
        tmp = p.parent / f".{p.name}.creating-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3,
                                    attributes={ATTR: meta})
            codecs = make_codecs(compressor)
            group.create_array(
                ARRAY, shape=(n_test, n_train), chunks=(test_chunk, train_chunk), dtype=dtype,
                fill_value=np.nan, dimension_names=["test", "train"], compressors=codecs,
                attributes={"coordinates": " ".join(
                    [n for n, lab in (("test_label", _label_array(test_labels, n_test)),
                                      ("train_label", _label_array(train_labels, n_train)))
                     if lab is not None] + [n for n, v in names.items() if v is not None])},
                config=_RUNTIME,
            )
            for name, values in (("test", test_index), ("train", train_index)):
                a = group.create_array(name, shape=values.shape, dtype="int64",
                                       chunks=(max(1, min(len(values), 1 << 20)),),
                                       dimension_names=[name])
                a[:] = values.astype(np.int64)
            for name, dim, labels, n in (("test_label", "test", test_labels, n_test),
                                         ("train_label", "train", train_labels, n_train)):
                lab = _label_array(labels, n)
                if lab is not None:
                    a = group.create_array(name, shape=lab.shape, dtype=lab.dtype,
                                           chunks=(max(1, min(n, 1 << 20)),),
                                           dimension_names=[dim])
                    a[:] = lab
            for name, values in names.items():
                if values is not None:
                    a = group.create_array(name, shape=values.shape, dtype=str,
                                           chunks=(max(1, min(len(values), 1 << 20)),),
                                           dimension_names=[name.split("_")[0]])
                    a[:] = values
            store = cls(tmp, group)
            if self_influence:
                store._create_self_influence(compressor)
            _consolidate(tmp)
            p.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, p)  # onto the empty directory: atomic on POSIX
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot write the store at {str(p)!r}: {e}") from e
        return cls.open(p, mode="r+")

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
        return zarr.open_array(store=self.path, path=ARRAY, mode=mode, config=_RUNTIME)

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
        return zarr.open_array(store=self.path, path=SELF, mode=mode, config=_RUNTIME)

    def _chunk_keys(self, name: str, ndim: int) -> set[tuple[int, ...]]:
        root = Path(self.path) / name / "c"
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
        """``xarray.open_zarr(path)``: the labelled, lazy (dask-backed) Dataset."""
        import xarray as xr

        return xr.open_zarr(self.path, **kwargs)

    def to_dask(self) -> Any:
        """The influence matrix as a dask array with one block per tile."""
        import dask.array as da

        return da.from_zarr(self.influences)

    def __repr__(self) -> str:
        done = len(self.done_tiles())
        return (f"InfluenceStore({self.path!r}, method={self.attrs.get('method')}, "
                f"shape={self.shape}, chunks={self.chunks}, tiles {done}/{self.n_tiles})")
