r"""Counterfactual ground truth: retrain on many subsets with several seeds, as a resumable job.

:func:`ground_truth` draws ``J`` training subsets (or takes given masks), trains ``S`` models on
each with a retrainer (:class:`~dvl_ooc.evaluate.TorchRetrainer` or any callable
``fn(masks, seed) -> targets``) and stores every test point's target in a Zarr store; the
result feeds :func:`~dvl_ooc.evaluate.lds` (:meth:`GroundTruth.lds`).

Subsets: subset ``j`` holds ``k = round(alpha * n_train)`` distinct points,
``numpy_rng(seed, j).permutation(n_train)[:k]`` (:func:`dvl_ooc.seeding.numpy_rng`), so it
depends only on ``(seed, j)``: more subsets extend a job's draw. Training seeds are ``0..S-1``
(the retrainer derives initialisation and data order from them, the same for every subset).

Store (a Zarr v3 group at a local path, an fsspec URL with ``storage_options`` or a Zarr store
object; opened by :meth:`GroundTruth.open`, readable with ``xarray.open_zarr``):

* ``masks`` ``(J, n_train)`` bool, dims ``(subset, train)``, written at creation;
* ``targets`` ``(J, S, n_test)`` float32, dims ``(subset, seed, test)``, ``fill_value=NaN``,
  chunks ``(subsets_per_task, 1, n_test)``: **one task = one block of subsets x one seed = one
  chunk**, written whole by the task that computed it; a task is done iff its chunk exists
  (listed once per run, never ``nchunks_initialized``; empty chunks are written too);
* coordinates ``subset``, ``seed``, ``test``, ``train`` (int64 positions);
* group attribute ``dvl_ooc``: ``kind="ground_truth"``, the target kind (``target``),
  ``n_train``, ``n_test``, ``n_subsets``, ``n_seeds``, ``alpha`` and ``seed`` (None for given
  masks), ``subsets_per_task``, the retrainer's ``fingerprint`` (architecture, initial weights,
  training configuration, data), a digest of the masks, version, creation time and ``state``.

Write modes (as the influence stores, :mod:`dvl_ooc.store`): ``"a"`` creates or resumes a
store with the same parameters (:class:`~dvl_ooc.exceptions.StoreMismatchError` otherwise,
naming the fields; nothing written); ``"w-"`` creates only
(:class:`~dvl_ooc.exceptions.StoreExistsError`); ``"w"`` replaces. A location holding something
other than a Zarr store is never touched. Every input is checked before anything is written.
On local disk the store is built in a sibling directory and renamed into place (it appears
whole); elsewhere its ``state`` flips from ``"creating"`` to ``"complete"`` last, and
:meth:`GroundTruth.open` refuses an unfinished creation (a ``mode="a"`` rerun finishes it).

Execution: without a client and with ``n_workers=0`` (or ``client="sync"``) tasks run in this
process; otherwise on a Dask cluster (the given ``distributed.Client``, or a ``LocalCluster``
of ``n_workers`` single-threaded processes from :func:`dvl_ooc.runtime.local_cluster`, closed
at the end). The retrainer is shipped once as the literal of one task (``dvl-retrainer-...``,
fetched worker to worker, never ``scatter``-ed), so a worker that dies mid-run costs only its
running task: Dask recomputes what it held and reruns the task elsewhere, whose chunk is
rewritten whole. Each task opens the store itself, checks that its parameters are still this
job's, and writes its chunk; torch and BLAS get ``threads_per_task`` threads per task (the
valuation tasks' :func:`~dvl_ooc.valuation.tasks.torch_threads`).

Reproducibility: a task's targets depend only on the retrainer, its masks block and its seed,
so for the same ``threads_per_task`` the store holds the same bytes whichever process computed
each chunk, in process or on any number of workers, interrupted and resumed or not (tested).

Cost: ``J * S`` trainings, in ``ceil(J / subsets_per_task) * S`` tasks; memory per task: one
retrainer call (``subsets_per_task`` stacked models) plus ``subsets_per_task x n_test`` targets.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import (
    DvlOocError,
    InputError,
    LengthMismatchError,
    NonFiniteError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
    UnfinishedStoreError,
)
from ..seeding import numpy_rng
from .metrics import _check_masks

__all__ = ["GroundTruth", "draw_masks", "ground_truth"]

FORMAT = 1
ATTR = "dvl_ooc"
KIND = "ground_truth"
MASKS, TARGETS = "masks", "targets"
#: parameters that must agree for a store to be resumed
MATCH_FIELDS = ("format", "kind", "target", "n_train", "n_test", "n_subsets", "n_seeds", "alpha",
                "seed", "subsets_per_task", "fingerprint", "masks_digest")
_RUNTIME = {"write_empty_chunks": True}
_DEFAULT_MAX_BLOCK = 32


# ------------------------------------------------------------------------------ subsets
def draw_masks(n_train: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``(n_subsets, n_train)`` bool masks: row ``j`` holds ``round(alpha * n_train)`` points,
    ``numpy_rng(seed, j).permutation(n_train)[:k]`` (depends only on ``(seed, j)``)."""
    n, j = int(n_train), int(n_subsets)
    if n < 1 or j < 1:
        raise InputError(f"n_train and n_subsets must be positive, got {n_train}, {n_subsets}")
    if not 0 < float(alpha) < 1:
        raise InputError(f"alpha (the fraction of the training set in each subset) must lie in "
                         f"(0, 1), got {alpha}")
    k = min(n, max(1, int(round(float(alpha) * n))))
    out = np.zeros((j, n), dtype=bool)
    for r in range(j):
        out[r, numpy_rng(seed, r).permutation(n)[:k]] = True
    return out


def _masks_digest(masks: np.ndarray) -> str:
    h = hashlib.sha256(f"{masks.shape}".encode())
    h.update(np.packbits(masks, axis=1).tobytes())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------ store
def _params(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in MATCH_FIELDS}


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _open_group(loc: Any, mode: str) -> Any:
    """The Zarr group at ``loc`` (``StoreNotFoundError`` if there is none)."""
    import zarr

    from ..store import _mapped_io_error

    zs = loc.zarr_store(read_only=mode == "r")
    if loc.local is not None and not (loc.local / "zarr.json").is_file():
        raise StoreNotFoundError(f"no ground-truth store at {loc.display!r} (no zarr.json); "
                                 "create one with dvl_ooc.evaluate.ground_truth(...)")
    try:
        return zarr.open_group(store=zs, mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as e:  # noqa: BLE001 - anything unreadable is "not a store"
        mapped = _mapped_io_error(loc.display, "opening the store", e)
        if mapped is not None:
            raise mapped from e
        raise StoreNotFoundError(f"no readable ground-truth store at {loc.display!r} "
                                 f"({type(e).__name__}: {e})") from e


def _meta_of(group: Any, display: str) -> dict[str, Any]:
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, Mapping) or meta.get("kind") != KIND:
        raise StoreNotFoundError(f"{display!r} is a Zarr group but not a dvl_ooc ground-truth "
                                 "store")
    return dict(meta)


def _chunk_keys(loc: Any, group: Any) -> set[tuple[int, int]]:
    """``(block, seed)`` of the target chunks whose key exists: one listing (local disk: a
    directory walk; temporary ``*.partial`` files of in-flight writes are not chunks)."""
    from ..store import _alist, _sync, store_io_errors

    out: set[tuple[int, int]] = set()
    if loc.local is not None:
        root = Path(loc.local) / TARGETS / "c"
        if not root.is_dir():
            return out
        for b in os.scandir(root):
            if not (b.name.isdigit() and b.is_dir()):
                continue
            for s in os.scandir(b.path):
                if s.name.isdigit() and s.is_dir() and os.path.isfile(os.path.join(s.path, "0")):
                    out.add((int(b.name), int(s.name)))
        return out
    prefix = f"{TARGETS}/c/"
    try:
        with store_io_errors(loc.display, "listing the done tasks"):
            keys = _sync(_alist(group.store.list_prefix(prefix)))
    except FileNotFoundError:
        return out
    for k in keys:
        parts = k[len(prefix):].split("/") if k.startswith(prefix) else []
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[2] == "0":
            out.add((int(parts[0]), int(parts[1])))
    return out


def _build(loc: Any, zs: Any, meta: dict[str, Any], masks: np.ndarray) -> None:
    """Write the group (``state: "creating"``), masks, the targets array and coordinates, then
    flip ``state`` to ``"complete"``. Idempotent for the same parameters; deletes nothing."""
    import zarr

    from ..store import _consolidate

    j, n_train = masks.shape
    s, n_test, spt = meta["n_seeds"], meta["n_test"], meta["subsets_per_task"]

    def require(group: Any, name: str, **kw: Any) -> Any:
        try:
            return group.create_array(name, **kw)
        except zarr.errors.ContainsArrayError:  # an interrupted creation made it already
            return group[name]

    try:
        group = zarr.open_group(store=zs, mode="a", zarr_format=3, use_consolidated=False,
                                attributes={ATTR: {**meta, "state": "creating"}})
    except zarr.errors.ContainsGroupError:
        group = zarr.open_group(store=zs, mode="r+", zarr_format=3, use_consolidated=False)
    a = require(group, MASKS, shape=(j, n_train), chunks=(max(1, spt), n_train), dtype=bool,
                fill_value=False, dimension_names=["subset", "train"])
    a[:] = masks
    require(group, TARGETS, shape=(j, s, n_test), chunks=(spt, 1, n_test), dtype="float32",
            fill_value=np.nan, dimension_names=["subset", "seed", "test"], compressors=None,
            config=_RUNTIME)
    for name, n in (("subset", j), ("seed", s), ("test", n_test), ("train", n_train)):
        c = require(group, name, shape=(n,), chunks=(max(1, min(n, 1 << 20)),), dtype="int64",
                    dimension_names=[name])
        c[:] = np.arange(n, dtype=np.int64)
    _consolidate(zs)
    group = zarr.open_group(store=zs, mode="r+", zarr_format=3, use_consolidated=False)
    group.attrs.update({ATTR: {**meta, "state": "complete"}})
    _consolidate(zs)


def _create(loc: Any, meta: dict[str, Any], masks: np.ndarray, mode: str) -> None:
    """Create, resume (check) or replace the store at ``loc`` according to ``mode`` (module
    docstring)."""
    from ..store import _check_writable, _contents, _mapped_io_error, store_io_errors

    if loc.local is not None:
        _check_writable(loc.local)
    with store_io_errors(loc.display, "creating the store"):
        zs = loc.zarr_store(read_only=False)
        has_meta, has_any = _contents(loc, zs)
        if has_any and not has_meta:
            raise StoreError(f"{loc.display!r} exists and is not a Zarr store; refusing to touch "
                             "it (remove it yourself or choose another location)")
        if has_meta and mode == "w-":
            raise StoreExistsError(f"a Zarr store exists at {loc.display!r} and mode='w-' creates "
                                   "only; pass mode='a' to resume it, mode='w' to replace it, or "
                                   "choose another location")
        if has_meta and mode == "a":
            try:
                old = _meta_of(_open_group(loc, "r"), loc.display)
            except StoreNotFoundError as e:
                raise StoreMismatchError(f"{loc.display!r} holds a Zarr store that is not a "
                                         "ground-truth store; pass mode='w' to replace it, or "
                                         "choose another location") from e
            diff = [k for k in MATCH_FIELDS if old.get(k) != meta.get(k)]
            if diff:
                detail = "; ".join(f"{k}: stored {old.get(k)!r} != requested {meta.get(k)!r}"
                                   for k in diff)
                raise StoreMismatchError(
                    f"the ground-truth store at {loc.display!r} was created with different "
                    f"parameters ({detail}). Pass mode='w' to replace it, or choose another "
                    "location")
            if old.get("state") == "complete":
                return
            _build(loc, zs, meta, masks)  # finish an interrupted creation
            return
        if has_meta and mode == "w":
            try:
                if loc.local is not None:
                    shutil.rmtree(loc.local)
                else:
                    from ..store import _sync

                    _sync(zs.delete_dir(""))
            except OSError as e:
                raise (_mapped_io_error(loc.display, "replacing the store", e) or StoreError(
                    f"cannot replace the store at {loc.display!r}: {e}")) from e
        if loc.local is None:
            _build(loc, zs, meta, masks)
            return
    # local disk: build aside and rename into place (atomic on POSIX): the store appears whole
    from ..store import _Location

    p = Path(loc.local)
    tmp = p.parent / f".{p.name}.creating-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with store_io_errors(loc.display, "creating the store"):
            t = _Location(tmp)
            _build(t, t.zarr_store(read_only=False), meta, masks)
            p.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, p)  # onto the empty directory
    except DvlOocError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (p / "zarr.json").is_file() and mode != "w":  # another run created it meanwhile
            _create(loc, meta, masks, "a")
            return
        raise StoreError(f"cannot write the store at {loc.display!r}: {e}") from e


# ------------------------------------------------------------------------------ result
class GroundTruth:
    """An open ground-truth store: masks, targets and parameters (see the module docstring).

    Attributes: ``masks`` ``(J, n_train)`` bool and ``targets`` ``(J, S, n_test)`` float32
    (NumPy, read on access; NaN where a task has not run), ``kind`` (``"loss"`` /
    ``"margin"``), ``n_subsets``, ``n_seeds``, ``n_train``, ``n_test``, ``alpha``, ``seed``,
    ``subsets_per_task``, ``fingerprint``, ``attrs`` (all stored parameters), ``path``,
    ``info`` (of the :func:`ground_truth` run that returned it: tasks run, timings).
    """

    def __init__(self, location: Any, group: Any) -> None:
        self.location = location
        self.group = group
        self.attrs = _meta_of(group, location.display)
        self.info: dict[str, Any] = {}

    @classmethod
    def open(cls, store: Any, *, storage_options: Mapping[str, Any] | None = None
             ) -> GroundTruth:
        """Open the ground-truth store at ``store`` (local path, fsspec URL with
        ``storage_options``, Zarr store object) read-only. ``StoreNotFoundError`` when there
        is none, :class:`~dvl_ooc.exceptions.UnfinishedStoreError` while its creation has not
        finished. Missing tasks are allowed (:attr:`is_complete`; their targets are NaN)."""
        from ..store import _Location

        loc = _Location(store, storage_options)
        gt = cls(loc, _open_group(loc, "r"))
        if gt.attrs.get("state") != "complete":
            raise UnfinishedStoreError(
                f"the creation of the ground-truth store at {loc.display!r} has not finished; "
                "rerun ground_truth(...) with mode='a' and the same parameters to finish it")
        return gt

    @property
    def path(self) -> str:
        return self.location.display

    @property
    def kind(self) -> str:
        return str(self.attrs["target"])

    @property
    def n_train(self) -> int:
        return int(self.attrs["n_train"])

    @property
    def n_test(self) -> int:
        return int(self.attrs["n_test"])

    @property
    def n_subsets(self) -> int:
        """``J``."""
        return int(self.attrs["n_subsets"])

    @property
    def n_seeds(self) -> int:
        """``S``: training seeds ``0..S-1`` per subset."""
        return int(self.attrs["n_seeds"])

    @property
    def alpha(self) -> float | None:
        """Subset fraction of drawn subsets (None for given masks)."""
        return self.attrs["alpha"]

    @property
    def seed(self) -> int | None:
        """Seed of drawn subsets (None for given masks)."""
        return self.attrs["seed"]

    @property
    def subsets_per_task(self) -> int:
        return int(self.attrs["subsets_per_task"])

    @property
    def fingerprint(self) -> str:
        """The retrainer's fingerprint recorded at creation."""
        return str(self.attrs["fingerprint"])

    @property
    def masks(self) -> np.ndarray:
        return np.asarray(self.group[MASKS][:], dtype=bool)

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.group[TARGETS][:])

    @property
    def n_blocks(self) -> int:
        return -(-self.n_subsets // self.subsets_per_task)

    def all_tasks(self) -> list[tuple[int, int]]:
        """Every ``(block, seed)`` task, in run order (seed-major within a block)."""
        return [(b, s) for b in range(self.n_blocks) for s in range(self.n_seeds)]

    def done_tasks(self) -> set[tuple[int, int]]:
        """``(block, seed)`` tasks whose chunk exists (one listing)."""
        return _chunk_keys(self.location, self.group)

    def missing_tasks(self) -> list[tuple[int, int]]:
        done = self.done_tasks()
        return [t for t in self.all_tasks() if t not in done]

    @property
    def is_complete(self) -> bool:
        return not self.missing_tasks()

    def block_rows(self, block: int) -> tuple[int, int]:
        """Subset rows ``[start, stop)`` of task block ``block``."""
        spt = self.subsets_per_task
        return block * spt, min(self.n_subsets, (block + 1) * spt)

    def lds(self, scores: Any, **kwargs: Any) -> Any:
        """:func:`~dvl_ooc.evaluate.lds` of ``scores`` against this ground truth (its masks,
        targets and kind)."""
        from .metrics import lds

        return lds(scores, self.masks, self.targets, kind=self.kind, **kwargs)

    def noise_ceiling(self, **kwargs: Any) -> Any:
        """:func:`~dvl_ooc.evaluate.noise_ceiling` of the targets."""
        from .metrics import noise_ceiling

        return noise_ceiling(self.targets, kind=self.kind, **kwargs)

    def to_xarray(self, **kwargs: Any) -> Any:
        """``xarray.open_zarr`` of the store (lazy, labelled ``masks`` and ``targets``)."""
        import xarray as xr

        return xr.open_zarr(self.group.store, **kwargs)

    def __repr__(self) -> str:
        done = len(self.done_tasks())
        return (f"GroundTruth({self.path!r}, {self.kind}, {self.n_subsets} subsets x "
                f"{self.n_seeds} seeds, n_train={self.n_train}, n_test={self.n_test}, tasks "
                f"{done}/{self.n_blocks * self.n_seeds})")


# ------------------------------------------------------------------------------ tasks
def _hold(obj: Any) -> Any:
    """A graph task whose result is its literal argument (recomputable after a lost worker)."""
    return obj


def _worker_id() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"local-{os.getpid()}"


def _compute(retrainer: Callable, masks: np.ndarray, seed: int, n_test: int | None,
             threads: int | None) -> np.ndarray:
    """``retrainer(masks, seed)`` under the thread limits, checked: ``(m, n_test)``, finite."""
    from ..valuation.tasks import _one_interop_thread_on_worker, blas_threads, torch_threads

    _one_interop_thread_on_worker()
    with blas_threads(threads), torch_threads(threads):
        out = retrainer(masks, seed)
    if type(out).__module__.startswith("torch"):
        out = out.detach().cpu().numpy()
    out = np.asarray(out, dtype=np.float64)
    want = (len(masks), n_test if n_test is not None else (out.shape[-1] if out.ndim else -1))
    if out.shape != want:
        raise LengthMismatchError(f"the retrainer returned targets of shape {out.shape} for "
                                  f"{len(masks)} subsets and seed {seed}; expected {want} "
                                  "(one row per subset, one column per test point)")
    if not np.isfinite(out).all():
        rows = np.flatnonzero(~np.isfinite(out).all(1))
        raise NonFiniteError(f"the retrainer returned NaN/infinite targets for seed {seed}, "
                             f"subset rows {rows[:5].tolist()} of the block (a diverged "
                             "training: lower the learning rate); nothing written for this task")
    return out


def _write(loc: Any, expect: Mapping[str, Any], block: int, seed: int, start: int,
           targets: np.ndarray) -> None:
    """Write one task's chunk, after checking that the store still has this job's
    parameters (a store replaced under a running job is never written with its chunks)."""
    import zarr

    from ..store import store_io_errors

    with store_io_errors(loc.display, f"writing task (block {block}, seed {seed})"):
        group = _open_group(loc, "r+")
        have = _params(_meta_of(group, loc.display))
        if have != _params(expect):
            diff = [k for k in MATCH_FIELDS if have.get(k) != expect.get(k)]
            raise StoreMismatchError(f"the ground-truth store at {loc.display!r} no longer has "
                                     f"this job's parameters ({', '.join(diff)} differ): it was "
                                     "replaced by another run; chunk not written")
        arr = zarr.open_array(store=group.store, path=TARGETS, mode="r+", config=_RUNTIME,
                              zarr_format=3)
        arr[start : start + len(targets), seed : seed + 1, :] = \
            targets.astype(np.float32)[:, None, :]


def _ground_truth_task(retrainer: Callable, loc: Any, expect: Mapping[str, Any], block: int,
                       seed: int, start: int, masks: np.ndarray, threads: int | None
                       ) -> dict[str, Any]:
    """One task: train the models of subsets ``start..start+len(masks)-1`` with training seed
    ``seed`` and write their targets as chunk ``(block, seed)``."""
    t0, c0 = time.perf_counter(), time.thread_time()
    out = _compute(retrainer, masks, seed, int(expect["n_test"]), threads)
    t1, c1 = time.perf_counter(), time.thread_time()
    _write(loc, expect, block, seed, start, out)
    return {"block": block, "seed": seed, "rows": len(masks), "worker": _worker_id(),
            "pid": os.getpid(), "train_s": t1 - t0, "train_cpu_s": c1 - c0,
            "write_s": time.perf_counter() - t1}


# ------------------------------------------------------------------------------ the job
def _resolve_retrainer(retrainer: Any, kind: str | None, fingerprint: str | None
                       ) -> tuple[str, str, dict[str, Any]]:
    if not callable(retrainer):
        raise InputError(f"retrainer must be a TorchRetrainer or a callable fn(masks, seed) -> "
                         f"targets, not {type(retrainer).__name__}")
    own = getattr(retrainer, "target", None) or getattr(retrainer, "kind", None)
    if kind is None:
        kind = own if isinstance(own, str) else "loss"
    elif isinstance(own, str) and own != kind:
        raise InputError(f"kind={kind!r} contradicts the retrainer's target {own!r}")
    if kind not in ("loss", "margin"):
        raise InputError(f"kind must be 'loss' or 'margin', got {kind!r}")
    if fingerprint is None:
        fp = getattr(retrainer, "fingerprint", None)
        if callable(fp):
            fingerprint = str(fp())
        else:
            fn = getattr(retrainer, "__func__", retrainer)
            fingerprint = (f"{getattr(fn, '__module__', '?')}."
                           f"{getattr(fn, '__qualname__', type(fn).__qualname__)}")
    desc = retrainer.describe() if callable(getattr(retrainer, "describe", None)) else {
        "class": type(retrainer).__qualname__}
    return kind, str(fingerprint), _jsonable(desc)


def _peek(loc: Any) -> dict[str, Any] | None:
    """The stored parameters of a complete-or-not ground-truth store at ``loc``, or None."""
    try:
        return _meta_of(_open_group(loc, "r"), loc.display)
    except StoreNotFoundError:
        return None


def ground_truth(retrainer: Callable[[np.ndarray, int], Any], store: Any, *,
                 n_subsets: int = 100, n_seeds: int = 3, alpha: float = 0.5, seed: int = 0,
                 masks: Any = None, client: Any = None, n_workers: int | None = None,
                 subsets_per_task: int | None = None, mode: str = "a", progress: bool = True,
                 kind: str | None = None, fingerprint: str | None = None,
                 max_tasks: int | None = None, threads_per_task: int | None = 1,
                 storage_options: Mapping[str, Any] | None = None) -> GroundTruth:
    """Train ``n_seeds`` models on each of ``n_subsets`` training subsets and store every test
    point's target; create, resume or replace the store at ``store`` (module docstring).

    Args:
        retrainer: a :class:`~dvl_ooc.evaluate.TorchRetrainer`, or any callable
            ``fn(masks, seed) -> targets`` taking a bool block ``(m, n_train)`` and a training
            seed ``0..S-1`` and returning ``(m, n_test)`` (NumPy or torch). Optional attributes
            used when present: ``n_train``, ``n_test``, ``target``/``kind``, ``fingerprint()``,
            ``describe()``. Without ``fingerprint()`` the store records the callable's
            qualified name (pass ``fingerprint=`` to detect a changed function on resume);
            without ``n_test`` the first task runs here first to learn it.
        store: a local path, an fsspec URL (with ``storage_options``) or a Zarr store object;
            every worker must reach it.
        n_subsets, alpha, seed: ``J`` subsets of ``round(alpha * n_train)`` points drawn from
            ``seed`` (:func:`draw_masks`); ignored when ``masks`` is given.
        n_seeds: ``S`` training seeds per subset.
        masks: given subsets ``(J, n_train)`` bool (e.g. :func:`~dvl_ooc.evaluate.loo_masks`).
        client: a ``distributed.Client``; ``"sync"`` (or ``None`` with ``n_workers=0``) runs
            in this process; ``None`` starts a ``LocalCluster`` of ``n_workers`` processes.
        subsets_per_task: subsets per task and chunk (``None``: the store's when resuming,
            else ``min(32, ceil(J / 4))``).
        mode: ``"a"`` (create or resume), ``"w-"`` (create only), ``"w"`` (replace).
        progress: show a tqdm bar (trainings).
        kind: the target kind recorded (default: the retrainer's ``target``, else ``"loss"``).
        fingerprint: identifies the retrainer in the store (default above).
        max_tasks: run at most this many of the missing tasks (the rest stay missing: a later
            ``mode="a"`` call resumes).
        threads_per_task: torch/BLAS threads around each retrainer call (None: as set).

    Returns: the :class:`GroundTruth`, with ``info`` = ``tasks_total``, ``tasks_before``
    (done before this call), ``tasks_run`` (the ``(block, seed)`` computed now),
    ``trainings``, ``wall_s``, ``tasks`` (per task: worker, pid, ``train_s`` and
    ``train_cpu_s`` (wall and CPU seconds of the retrainer call: their ratio shows how much
    of a core the task got), ``write_s``).

    Raises: :class:`~dvl_ooc.exceptions.InputError` / ``LengthMismatchError`` (bad masks or
    options, an empty subset, masks not matching the retrainer's training set),
    ``StoreMismatchError``, ``StoreExistsError``, ``StoreError`` -- all before anything is
    written; errors of the retrainer as raised on the worker.
    """
    from ..store import _Location, _write_mode

    t_start = time.perf_counter()
    mode = _write_mode("ground_truth", mode, {})
    kind, fingerprint, desc = _resolve_retrainer(retrainer, kind, fingerprint)
    if int(n_seeds) < 1:
        raise InputError(f"n_seeds must be a positive integer, got {n_seeds}")
    n_seeds = int(n_seeds)
    own_n_train = getattr(retrainer, "n_train", None)
    if masks is not None:
        m = _check_masks(masks, min_rows=1)
        if own_n_train is not None and m.shape[1] != int(own_n_train):
            raise LengthMismatchError(f"masks have {m.shape[1]} columns but the retrainer has "
                                      f"{own_n_train} training points")
        alpha_v, seed_v = None, None
    else:
        if own_n_train is None:
            raise InputError("the retrainer has no n_train attribute: pass masks= (the subsets, "
                             "e.g. draw_masks(n_train, n_subsets, alpha, seed))")
        m = draw_masks(int(own_n_train), n_subsets, alpha, seed)
        alpha_v, seed_v = float(alpha), int(seed)
    if subsets_per_task is not None and int(subsets_per_task) < 1:
        raise InputError(f"subsets_per_task must be a positive integer, got {subsets_per_task}")
    if max_tasks is not None and int(max_tasks) < 0:
        raise InputError(f"max_tasks must be >= 0, got {max_tasks}")
    sync = client == "sync" or (client is None and n_workers == 0)
    if isinstance(client, str) and client != "sync":
        raise InputError(f"client must be a distributed.Client, 'sync' or None, got {client!r}")
    loc = _Location(store, storage_options)
    if mode == "w-" and loc.local is not None and (loc.local / "zarr.json").is_file():
        _create(loc, {}, m, mode)  # raises StoreExistsError before anything is trained
    old = _peek(loc) if mode == "a" else None
    n_test = getattr(retrainer, "n_test", None)
    if n_test is None and old is not None:
        n_test = old.get("n_test")
    if subsets_per_task is None:
        spt = int(old["subsets_per_task"]) if old is not None else min(
            _DEFAULT_MAX_BLOCK, max(1, math.ceil(len(m) / 4)))
    else:
        spt = int(subsets_per_task)
    from .. import __version__

    meta: dict[str, Any] = {
        "format": FORMAT, "kind": KIND, "target": kind, "n_train": int(m.shape[1]),
        "n_test": None if n_test is None else int(n_test), "n_subsets": int(len(m)),
        "n_seeds": n_seeds, "alpha": alpha_v, "seed": seed_v, "subsets_per_task": spt,
        "fingerprint": fingerprint, "masks_digest": _masks_digest(m), "version": __version__,
        "retrainer": desc,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if old is not None and n_test is not None:  # refuse a mismatch before training anything
        diff = [k for k in MATCH_FIELDS if old.get(k) != _jsonable(meta).get(k)]
        if diff:
            _create(loc, _jsonable(meta), m, mode)  # raises StoreMismatchError with details
    first: dict[tuple[int, int], np.ndarray] = {}
    if n_test is None:  # a plain callable: learn n_test from the first task, run here
        first[(0, 0)] = _compute(retrainer, m[:spt], 0, None, threads_per_task)
        meta["n_test"] = int(first[(0, 0)].shape[1])
    meta = _jsonable(meta)
    _create(loc, meta, m, mode)
    gt = GroundTruth(loc, _open_group(loc, "r"))
    tasks = gt.all_tasks()
    done = gt.done_tasks()
    todo = [t for t in tasks if t not in done]
    info: dict[str, Any] = {"tasks_total": len(tasks), "tasks_before": len(done),
                            "tasks_run": [], "tasks": [], "trainings": 0}
    for (b, s), out in first.items():
        if (b, s) in todo and (max_tasks is None or int(max_tasks) > 0):
            _write(loc, meta, b, s, 0, out)
            todo.remove((b, s))
            info["tasks_run"].append((b, s))
            info["trainings"] += len(out)
    if max_tasks is not None:
        todo = todo[: max(0, int(max_tasks) - len(info["tasks_run"]))]
    if todo:
        from ..runtime import progress as progress_bar

        bar = progress_bar(progress, total=sum(len(range(*gt.block_rows(b))) for b, _ in todo),
                           unit="training", desc="ground truth")
        try:
            run = _run_sync if sync else _run_dask
            for rec in run(retrainer, loc, meta, m, gt, todo, client, n_workers,
                           threads_per_task):
                info["tasks_run"].append((rec["block"], rec["seed"]))
                info["tasks"].append(rec)
                info["trainings"] += rec["rows"]
                bar.update(rec["rows"])
        finally:
            bar.close()
    info["wall_s"] = time.perf_counter() - t_start
    gt = GroundTruth.open(loc)
    gt.info = info
    return gt


def _run_sync(retrainer: Callable, loc: Any, meta: dict[str, Any], masks: np.ndarray,
              gt: GroundTruth, todo: list[tuple[int, int]], client: Any,
              n_workers: int | None, threads: int | None) -> Any:
    for b, s in todo:
        a, e = gt.block_rows(b)
        yield _ground_truth_task(retrainer, loc, meta, b, s, a, masks[a:e], threads)


def _run_dask(retrainer: Callable, loc: Any, meta: dict[str, Any], masks: np.ndarray,
              gt: GroundTruth, todo: list[tuple[int, int]], client: Any,
              n_workers: int | None, threads: int | None) -> Any:
    """The tasks on a Dask cluster (module docstring); yields each task's record as it ends.
    A failing task cancels the others (chunks written so far are kept: rerun to resume)."""
    from distributed import Client, as_completed

    from ..runtime import local_cluster

    cluster = None
    if client is None:
        cluster = local_cluster(n_workers, threads_per_worker=1, what="ground_truth")
        client = Client(cluster)
    token = uuid.uuid4().hex
    futures: list[Any] = []
    try:
        held = client.submit(_hold, retrainer, pure=False, key=f"dvl-retrainer-{token}")
        for b, s in todo:
            a, e = gt.block_rows(b)
            futures.append(client.submit(
                _ground_truth_task, held, loc, meta, b, s, a, masks[a:e], threads, pure=False,
                key=f"ground-truth-{b}-{s}-{token}"))
        for fut in as_completed(futures):
            yield fut.result()
    except BaseException:
        with contextlib.suppress(Exception):
            client.cancel(futures)
        raise
    finally:
        if cluster is not None:
            client.close()
            cluster.close()
