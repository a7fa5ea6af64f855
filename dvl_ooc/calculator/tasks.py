"""Worker-side task bodies of the calculators, and the per-worker prepared-model cache.

Tasks (each a plain function, importable on spawned workers):

* :func:`_test_features_task` - the test features ``T_i`` of one test chunk;
* :func:`_column_task` - one train chunk ``j``: gradients and train features ``R_j`` once, then
  the tiles ``T_i @ R_j.T`` of the requested test chunks (and the self-influence chunk
  ``<test_features(g_r), train_features(g_r)>`` on request), each written whole into its Zarr
  chunk of the store; returns a :class:`_ColumnStats`;
* :func:`_column_block_task` - the same tile column, returned in memory (lazy arrays).

Reproducibility: inputs and test features that arrive from another worker are first copied into
aligned memory (:func:`_aligned`), so that a tile's bytes do not depend on which worker computed
what (the same store, byte for byte, whichever way the tasks were spread or rerun).

State: the fitted model (a data-free pickle) arrives as the result of a graph task, or as a
reference to its pickle in the store (:class:`~dvl_ooc.calculator.inputs._StoredState`, see
:mod:`dvl_ooc.calculator.dask`), and is prepared once per worker and calculator token by
:func:`_prepared` (a private copy moved to the worker's device, with the fit data attached for
methods that precondition with it), kept in the module-level ``_CACHE`` (at most 9 entries).
:class:`TorchWarmup` imports and exercises torch once on every new worker.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import as_tensor
from ..exceptions import NotFittedError
from ..influence.base import InfluenceModel
from ..store import InfluenceStore, store_io_errors
from .inputs import _StoredState

__all__: list[str] = []

_CACHE: dict[str, InfluenceModel] = {}
_CACHE_LOCK = threading.Lock()


def _warmup() -> None:
    """Import and exercise torch (autograd + vmap) once per worker process (~seconds cold)."""
    from torch.func import grad, vmap

    w = torch.zeros(3, requires_grad=False)
    vmap(grad(lambda v, x: (v * x).sum()), in_dims=(None, 0))(w, torch.ones(2, 3))


def _prepared(model: InfluenceModel | _StoredState, token: str, device: str | None,
              fit_data: Any) -> InfluenceModel:
    """The worker's copy of the model, moved to its device and given its fit data, once per
    worker process and ``token`` (the per-worker cached loader: a model or fit data given as a
    :class:`~dvl_ooc.calculator.inputs._StoredState` is read from the store here, once)."""
    m = _CACHE.get(token)
    if m is not None:
        return m
    with _CACHE_LOCK:
        m = _CACHE.get(token)
        if m is None:
            if isinstance(model, _StoredState):  # read from the store: a private copy
                model = model.load()
            else:
                # work on a private copy: the task's result must stay picklable (Dask may send
                # it on to other workers) and methods may cache torch.func tensors when used;
                # the copy drops attached fit data (as pickling does): attach the original's
                if fit_data is None:
                    fit_data = model._fit_data
                model = copy.deepcopy(model)
            if isinstance(fit_data, _StoredState):
                fit_data = fit_data.load()
            if device is not None:
                model.to(device)
            if model.needs_data_to_precondition and model._fit_data is None:
                if fit_data is None:
                    raise NotFittedError(
                        f"{type(model).__name__} needs its fit data on the workers; pass "
                        "fit_data=(x, y) to the calculator"
                    )
                model.attach_data(fit_data)
            if len(_CACHE) > 8:
                _CACHE.clear()
            _CACHE[token] = m = model
    return m


def _worker_id() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"local-{os.getpid()}"


_ALIGN = 64  # bytes: torch's CPU allocator alignment


def _aligned(a: Any) -> Any:
    """``a`` itself, or a copy in fresh 64-byte aligned memory when ``a`` is a CPU NumPy array
    or tensor whose data is not. BLAS kernels (matmul, linear layers) round differently for
    other alignments, and data that arrives from another worker is deserialized at arbitrary
    offsets: without this the same tile can differ in its last bits from run to run."""
    if isinstance(a, np.ndarray) and a.size and a.ctypes.data % _ALIGN:
        buf = np.empty(a.nbytes + _ALIGN, np.uint8)
        off = (-buf.ctypes.data) % _ALIGN
        out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out
    if (isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.numel()
            and a.data_ptr() % _ALIGN):
        return a.clone(memory_format=torch.contiguous_format)
    return a


def _features(model: InfluenceModel, xy: tuple[Any, Any], side: str) -> torch.Tensor:
    x, y = (_aligned(a) for a in xy)
    g = model.gradients(x, y)
    return model.test_features(g) if side == "test" else model.train_features(g)


def _test_features_task(model: Any, token: str, device: str | None, fit_data: Any,
                        xy: tuple[Any, Any]) -> np.ndarray:
    m = _prepared(model, token, device, fit_data)
    # no torch.no_grad() around model code: methods may use forward-mode AD (LiSSA, hvps)
    return _features(m, xy, "test").detach().cpu().numpy()


@dataclass
class _ColumnStats:
    """What one column task did: where it ran, which tiles it wrote, where its time went
    (seconds); reported as a plain dict in the calculators' ``info["columns"]``."""

    worker: str
    pid: int
    column: int
    tiles: list[tuple[int, int]] = field(default_factory=list)
    self_influence: bool = False
    t_features: float = 0.0
    t_matmul: float = 0.0
    t_write: float = 0.0
    t_end: float = 0.0


def _column_tiles(m: InfluenceModel, xy: tuple[Any, Any], feats: Sequence[Any],
                  dtype: np.dtype, self_inf: bool, st: _ColumnStats
                  ) -> Iterator[tuple[int, Any]]:
    """Train features of one chunk once, then yield ``(k, tile)`` for each test feature block
    (first ``(-1, self-influence chunk or None)``)."""
    t0 = time.perf_counter()
    x, y = (_aligned(a) for a in xy)
    g = m.gradients(x, y).detach()
    R = m.train_features(g).detach()
    s = None
    if self_inf:
        s = m.paired(m.test_features(g).detach(), R).cpu().numpy().astype(dtype)
    del g
    st.t_features += time.perf_counter() - t0
    yield -1, s
    for k, T in enumerate(feats):
        t0 = time.perf_counter()
        T = as_tensor(_aligned(T), device=R.device)
        with torch.no_grad():
            tile = m.tile(T, R).cpu().numpy().astype(dtype, copy=False)
        st.t_matmul += time.perf_counter() - t0
        yield k, tile


def _open_for_writing(where: Any, expect: dict[str, Any] | None) -> InfluenceStore:
    """The store, opened by the worker itself from its location (local path, URL with storage
    options, or Zarr store object); refuses to write into a store whose parameters are not
    ``expect`` (replaced under the running job). A creation still being finished by a
    cooperating run with the same parameters is fine."""
    store = InfluenceStore.open(where, mode="r+", allow_unfinished=expect is not None)
    if expect is not None:
        store.check_params(expect)
    return store


def _column_task(model: Any, token: str, device: str | None, fit_data: Any,
                 xy: tuple[Any, Any], feats: list[np.ndarray], where: Any, j: int,
                 rows: list[int], want: list[bool], self_inf: bool, dtype: str,
                 expect: dict[str, Any] | None = None) -> _ColumnStats:
    """Write the missing tiles of tile column ``j`` (test chunks ``rows``) into the store at
    ``where`` (see :func:`_open_for_writing`). A full disk or quota raises
    :class:`~dvl_ooc.exceptions.StoreFullError`, an unreachable store (after the storage
    client's retries) :class:`~dvl_ooc.exceptions.StoreUnavailableError`: each names the store
    and says that a ``mode="a"`` rerun resumes; tiles are whole or absent either way."""
    m = _prepared(model, token, device, fit_data)
    st = _ColumnStats(_worker_id(), os.getpid(), j)
    name = getattr(where, "display", str(where))
    with store_io_errors(name, f"opening it to write tile column {j}"):
        store = _open_for_writing(where, expect)
        arr = store.influences
    sel = [f for f, w in zip(feats, want) if w]
    todo = [i for i, w in zip(rows, want) if w]
    for k, tile in _column_tiles(m, xy, sel, np.dtype(dtype), self_inf, st):
        t0 = time.perf_counter()
        if k < 0:
            if tile is not None:
                rs = store.tile_slices(0, j)[1]
                with store_io_errors(name, f"writing the self-influence of train chunk {j}"):
                    store.self_influence[rs] = tile  # type: ignore[index]
                st.self_influence = True
        else:
            with store_io_errors(name, f"writing tile {(todo[k], j)}"):
                arr[store.tile_slices(todo[k], j)] = tile
            st.tiles.append((todo[k], j))
        st.t_write += time.perf_counter() - t0
    st.t_end = time.time()
    return st


def _column_block_task(model: Any, token: str, device: str | None, fit_data: Any,
                       xy: tuple[Any, Any], feats: list[np.ndarray], dtype: str) -> np.ndarray:
    """The tile column of one train chunk against a group of test feature blocks, in memory."""
    m = _prepared(model, token, device, fit_data)
    st = _ColumnStats(_worker_id(), os.getpid(), -1)
    tiles = [t for k, t in _column_tiles(m, xy, feats, np.dtype(dtype), False, st) if k >= 0]
    return np.concatenate(tiles, axis=0)


try:  # warm-up of new workers (including ones restarted after a crash)
    from distributed.diagnostics.plugin import WorkerPlugin

    class TorchWarmup(WorkerPlugin):
        """Import torch and run one vmap(grad) on every (new) worker, once."""

        name = "dvl-ooc-torch-warmup"

        def setup(self, worker: Any) -> None:
            _warmup()
except ImportError:  # pragma: no cover
    TorchWarmup = None  # type: ignore[assignment,misc]
