"""Tiled influence matrices: a plan, not brute force.

Every influence model splits the influence matrix into two feature maps,

    I[t, r] = < test_features(g_t), train_features(g_r) >,   g = per-sample loss gradient,

(default: ``test_features = (H + lambda I)^{-1} g`` of dimension p and ``train_features = g``;
low-rank methods return k-dimensional features, k << p). The matrix is cut into tiles
``(test chunk i) x (train chunk j)``; tile ``(i, j)`` is ONE matrix product
``T_i @ R_j.T`` (T_i: test features of chunk i, R_j: train features of chunk j) written to
exactly one Zarr chunk.

Plan (what the task graph does):

1. one task per test chunk i computes ``T_i`` (gradients + preconditioning of n_test_i points);
2. one task per train chunk j (and test group g) reads its data chunk, computes the gradients and
   ``R_j`` once, then writes its whole tile column ``T_i @ R_j.T`` for every test chunk i of the
   group (and the self-influence chunk on request). The test features of the group are task
   dependencies: Dask moves them to each worker once and keeps them while columns need them.

Cost model (n_test, n_train samples; c_train train chunks; G test groups, usually 1):

    preconditioning solves:   n_test                         (pyDVL: n_test * c_train)
    gradient computations:    n_test + G * n_train           (pyDVL: n_test * c_train + n_train)
    tile products:            n_test * n_train * k multiply-adds (k = feature dimension)

Memory per worker is bounded by chunk sizes: the test features of one group
(``test_group_rows * k`` floats, at most ``max_test_feature_bytes``), one train chunk of data,
gradients and features (``train_chunk * p``) and one tile column. All test features must fit
in ``max_test_feature_bytes`` for G = 1; for very large ``n_test`` with full-p features the test
set is streamed in G groups and each train chunk's gradients are recomputed once per group.

Shipping: the fitted model (data-free: CG/LiSSA drop their fit data when pickled) is scattered
once to every worker (``broadcast=True``) and prepared (device, attached fit data) once per
worker; NumPy inputs are scattered once per chunk, Dask arrays enter as their blocks, Zarr arrays
and torch Datasets are read by the workers (the Dataset is pickled once, indexed by ranges).

Stores are resumable: a tile is done iff its chunk key exists (listed once); reruns compute only
the missing tiles and write the same bytes (see :mod:`dvl_ooc.store`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import as_tensor
from ..exceptions import InputError, LengthMismatchError, NotFittedError
from ..influence.base import InfluenceModel
from ..store import InfluenceStore

__all__ = ["DaskInfluenceCalculator", "SequentialInfluenceCalculator"]

_DEFAULT_MAX_TEST_BYTES = 1 << 30


# ============================================================================ inputs
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


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise InputError(f"cannot use an object array of shape {arr.shape} as input")
    return arr


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
            x = _to_numpy(x)
        if ky == "array":
            y = _to_numpy(y)
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
                    return _to_numpy(t)
            tensors = getattr(ds, "tensors", None)
            if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
                return _to_numpy(tensors[1])
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
                    h.update(np.ascontiguousarray(_to_numpy(part)).tobytes())
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
        """One Dask-resolvable object per chunk that evaluates to ``(x_chunk, y_chunk)``."""
        import dask

        if not bounds:
            return []
        if self.kind_x == "dataset":
            ds_f = client.scatter(self.x, broadcast=True, hash=False)
            return [dask.delayed(_read_dataset, pure=True)(ds_f, a, b) for a, b in bounds]
        sides = []
        for a, k in ((self.x, self.kind_x), (self.y, self.kind_y)):
            if k == "array":
                sides.append(client.scatter([a[s:e] for s, e in bounds], hash=False))
            elif k == "zarr":
                sides.append([dask.delayed(_read_zarr, pure=True)(a, s, e) for s, e in bounds])
            else:
                sides.append(_dask_blocks(a, bounds))
        return [dask.delayed(_pair, pure=True)(xs, ys) for xs, ys in zip(*sides)]


def _dask_blocks(a: Any, bounds: Sequence[tuple[int, int]]) -> list[Any]:
    """Delayed blocks of ``a`` along axis 0 covering exactly ``bounds`` (other axes whole)."""
    parts = [a[s:e] for s, e in bounds]
    out = []
    for p in parts:
        p = p.rechunk({i: -1 for i in range(p.ndim)})
        out.append(p.to_delayed().ravel()[0])
    return out


# ============================================================================ worker side
_CACHE: dict[str, InfluenceModel] = {}
_CACHE_LOCK = threading.Lock()


def _warmup() -> None:
    """Import and exercise torch (autograd + vmap) once per worker process (~seconds cold)."""
    from torch.func import grad, vmap

    w = torch.zeros(3, requires_grad=False)
    vmap(grad(lambda v, x: (v * x).sum()), in_dims=(None, 0))(w, torch.ones(2, 3))


def _prepared(model: InfluenceModel, token: str, device: str | None, fit_data: Any
              ) -> InfluenceModel:
    """The worker's copy of the model, moved to its device and given its fit data, once."""
    m = _CACHE.get(token)
    if m is not None:
        return m
    with _CACHE_LOCK:
        m = _CACHE.get(token)
        if m is None:
            # work on a private copy: the scattered object must stay picklable (Dask may send
            # it on to other workers) and methods may cache torch.func tensors when used
            model = copy.deepcopy(model)
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


def _features(model: InfluenceModel, xy: tuple[Any, Any], side: str) -> torch.Tensor:
    x, y = xy
    g = model.gradients(x, y)
    return model.test_features(g) if side == "test" else model.train_features(g)


def _test_features_task(model: Any, token: str, device: str | None, fit_data: Any,
                        xy: tuple[Any, Any]) -> np.ndarray:
    m = _prepared(model, token, device, fit_data)
    # no torch.no_grad() around model code: methods may use forward-mode AD (LiSSA, hvps)
    return _features(m, xy, "test").detach().cpu().numpy()


@dataclass
class _ColumnStats:
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
                  dtype: np.dtype, self_inf: bool, st: _ColumnStats):
    """Train features of one chunk once, then yield ``(k, tile)`` for each test feature block."""
    t0 = time.perf_counter()
    x, y = xy
    g = m.gradients(x, y).detach()
    R = m.train_features(g).detach()
    s = None
    if self_inf:
        s = (m.test_features(g).detach() * R).sum(1).cpu().numpy().astype(dtype)
    del g
    st.t_features += time.perf_counter() - t0
    yield -1, s
    for k, T in enumerate(feats):
        t0 = time.perf_counter()
        T = as_tensor(T, device=R.device)
        with torch.no_grad():
            tile = (T.to(R.dtype) @ R.T).cpu().numpy().astype(dtype, copy=False)
        st.t_matmul += time.perf_counter() - t0
        yield k, tile


def _column_task(model: Any, token: str, device: str | None, fit_data: Any,
                 xy: tuple[Any, Any], feats: list[np.ndarray], path: str, j: int,
                 rows: list[int], want: list[bool], self_inf: bool, dtype: str) -> _ColumnStats:
    """Write the missing tiles of tile column ``j`` (test chunks ``rows``) to the store."""
    import zarr

    m = _prepared(model, token, device, fit_data)
    st = _ColumnStats(_worker_id(), os.getpid(), j)
    store = InfluenceStore.open(path, mode="r+")
    arr = store.influences
    sel = [f for f, w in zip(feats, want) if w]
    todo = [i for i, w in zip(rows, want) if w]
    for k, tile in _column_tiles(m, xy, sel, np.dtype(dtype), self_inf, st):
        t0 = time.perf_counter()
        if k < 0:
            if tile is not None:
                rs = store.tile_slices(0, j)[1]
                zarr.open_array(store=path, path="self_influence", mode="r+",
                                config={"write_empty_chunks": True})[rs] = tile
                st.self_influence = True
        else:
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


# ============================================================================ planning
def _check_chunk(name: str, v: Any, n: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise InputError(f"{name} must be a positive integer number of samples, got {v!r}")
    return min(int(v), n)


def _bounds(n: int, c: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + c)) for s in range(0, n, c)]


class _Base:
    """Planning shared by the sequential and the Dask calculators."""

    def __init__(self, influence_model: InfluenceModel, *, device: str | None = None,
                 fit_data: Any = None, max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES
                 ) -> None:
        if not isinstance(influence_model, InfluenceModel):
            raise InputError(
                f"expected a fitted dvl_ooc InfluenceModel, got {type(influence_model).__name__}"
            )
        self.model = influence_model
        self.device = device
        self.fit_data = fit_data
        if int(max_test_feature_bytes) <= 0:
            raise InputError("max_test_feature_bytes must be positive")
        self.max_test_feature_bytes = int(max_test_feature_bytes)
        self.last_stats: list[_ColumnStats] = []

    def _check_model(self) -> None:
        m = self.model
        if not m.is_fitted:
            raise NotFittedError(
                f"{type(m).__name__} is not fitted; call .fit(train_data) before computing "
                "influences"
            )
        if m.needs_data_to_precondition and m._fit_data is None and self.fit_data is None:
            raise NotFittedError(
                f"{type(m).__name__} needs its fit data to precondition; call "
                ".attach_data(train_data) or pass fit_data=(x, y) to the calculator"
            )

    def _feature_dim(self) -> tuple[int, np.dtype]:
        """Feature dimension k and dtype, from train_features of one zero gradient (cheap)."""
        m = self.model
        p = m.grads.num_params
        try:
            z = torch.zeros(1, p, dtype=m.grads.dtype, device=m.grads.device)
            with torch.no_grad():
                f = m.train_features(z)
            return int(f.shape[1]), np.dtype(str(f.dtype).removeprefix("torch."))
        except NotFittedError:
            return p, np.dtype(str(m.grads.dtype).removeprefix("torch."))

    def _groups(self, n_test: int, test_chunk: int) -> list[list[int]]:
        """Test chunks split into groups whose features fit ``max_test_feature_bytes``."""
        k, dt = self._feature_dim()
        n_chunks = -(-n_test // test_chunk)
        per = max(1, self.max_test_feature_bytes // max(1, test_chunk * k * dt.itemsize))
        ids = list(range(n_chunks))
        return [ids[s : s + per] for s in range(0, n_chunks, per)]

    def _prepare_inputs(self, x_test, y_test, x, y, test_chunk, train_chunk):
        self._check_model()
        te = _Input.make(x_test, y_test, "test data")
        tr = _Input.make(x, y, "train data")
        tc = _check_chunk("test_chunk", test_chunk, te.n)
        rc = _check_chunk("train_chunk", train_chunk, tr.n)
        return te, tr, tc, rc

    def _create_store(self, path, te, tr, tc, rc, *, overwrite, self_influence, compressor,
                      dtype, test_index, train_index) -> InfluenceStore:
        m = self.model
        return InfluenceStore.create(
            path, n_test=te.n, n_train=tr.n, test_chunk=tc, train_chunk=rc,
            method=type(m).__name__, config=m.config(), fingerprint=m.fingerprint(),
            data_fingerprint=f"{te.fingerprint()}:{tr.fingerprint()}", dtype=dtype,
            test_index=test_index, train_index=train_index, test_labels=te.labels(),
            train_labels=tr.labels(), self_influence=self_influence, compressor=compressor,
            overwrite=overwrite,
        )

    @staticmethod
    def _todo(store: InfluenceStore, groups: list[list[int]], self_influence: bool
              ) -> list[tuple[int, list[int], list[bool], bool]]:
        """Per (group, column): test chunks of the group, which of them are missing, and
        whether the self-influence chunk is missing. Keys are listed once."""
        done = store.done_tiles()
        done_self = store.done_self_influence() if self_influence else set()
        out = []
        n_cols = store.grid[1]
        for gi, rows in enumerate(groups):
            for j in range(n_cols):
                want = [(i, j) not in done for i in rows]
                si = self_influence and gi == 0 and j not in done_self
                if any(want) or si:
                    out.append((j, rows, want, si))
        return out


# ============================================================================ sequential
class SequentialInfluenceCalculator(_Base):
    """The same plan in this process, without Dask (reference, small problems, debugging).
    Writes the same store as :class:`DaskInfluenceCalculator`."""

    def __init__(self, influence_model: InfluenceModel, *, device: str | None = None,
                 fit_data: Any = None, max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES
                 ) -> None:
        super().__init__(influence_model, device=device, fit_data=fit_data,
                         max_test_feature_bytes=max_test_feature_bytes)
        self._token = uuid.uuid4().hex

    def _local_model(self) -> InfluenceModel:
        m = self.model
        if self.device is not None and torch.device(self.device) != m.grads.device:
            m = copy.deepcopy(m).to(self.device)  # never move the caller's model
        if m.needs_data_to_precondition and m._fit_data is None:
            m.attach_data(self.fit_data)
        return m

    def influences(self, x_test: Any, y_test: Any, x: Any, y: Any, *, test_chunk: int = 1024,
                   train_chunk: int = 4096, dtype: Any = "float32") -> Any:
        """Lazy ``(n_test, n_train)`` dask array (local scheduler), one block per tile."""
        import dask
        import dask.array as da

        te, tr, tc, rc = self._prepare_inputs(x_test, y_test, x, y, test_chunk, train_chunk)
        m = self._local_model()
        dt = np.dtype(dtype)
        groups = self._groups(te.n, tc)
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)

        def test_feat(i):
            return _features(m, te.local(*tb[i]), "test").detach().cpu().numpy()

        def column(rows, j):
            st = _ColumnStats("local", os.getpid(), j)
            feats = [test_feat(i) for i in rows]
            return np.concatenate([t for k, t in _column_tiles(
                m, tr.local(*rb[j]), feats, dt, False, st) if k >= 0], axis=0)

        blocks = []
        for rows in groups:
            n_rows = sum(tb[i][1] - tb[i][0] for i in rows)
            blocks.append([da.from_delayed(dask.delayed(column, pure=True)(rows, j),
                                           shape=(n_rows, b - a), dtype=dt)
                           for j, (a, b) in enumerate(rb)])
        return da.block(blocks).rechunk((tc, rc))

    def to_zarr(self, path: str | os.PathLike, x_test: Any, y_test: Any, x: Any, y: Any, *,
                test_chunk: int = 1024, train_chunk: int = 4096, overwrite: bool = False,
                self_influence: bool = False, progress: bool = True, compressor: Any = None,
                dtype: Any = "float32", test_index: Any = None, train_index: Any = None
                ) -> InfluenceStore:
        """Compute the missing tiles into the store at ``path``; see
        :meth:`DaskInfluenceCalculator.to_zarr`."""
        te, tr, tc, rc = self._prepare_inputs(x_test, y_test, x, y, test_chunk, train_chunk)
        store = self._create_store(path, te, tr, tc, rc, overwrite=overwrite,
                                   self_influence=self_influence, compressor=compressor,
                                   dtype=dtype, test_index=test_index, train_index=train_index)
        todo = self._todo(store, self._groups(te.n, tc), self_influence)
        self.last_stats = []
        if not todo:
            return store
        m = self._local_model()
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)
        needed = sorted({i for _, rows, want, _ in todo for i, w in zip(rows, want) if w})
        feats = {i: _test_features_task(m, self._token, None, None, te.local(*tb[i]))
                 for i in needed}
        bar = _progress(progress, sum(sum(w) for _, _, w, _ in todo), None)
        for j, rows, want, si in todo:
            st = _column_task(m, self._token, None, None, tr.local(*rb[j]),
                              [feats.get(i) for i in rows], str(path), j, rows, want, si,
                              store.attrs["dtype"])
            self.last_stats.append(st)
            bar.update(len(st.tiles))
        bar.close()
        return store


# ============================================================================ Dask
def _progress(enabled: bool, total: int, desc: str | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="tile", desc=desc or "influence tiles")


class DaskInfluenceCalculator(_Base):
    """Influence matrices on a Dask cluster (see the module docstring for the plan and costs).

    Args:
        influence_model: a fitted :class:`~dvl_ooc.influence.base.InfluenceModel`.
        client: an existing ``distributed.Client`` (any cluster), used as is. Without one, a
            ``LocalCluster`` of worker processes is started (or, with ``cluster="cuda"``, a
            ``dask_cuda.LocalCUDACluster`` with one GPU per worker) and closed by :meth:`close`.
        n_workers, threads_per_worker: size of the cluster started here.
        device: device of the model on the workers (None: as it is; ``"cuda"``: each worker's
            GPU, which is ``cuda:0`` inside a ``LocalCUDACluster`` worker). Results come back as
            NumPy on the host.
        cluster: ``"local"`` or ``"cuda"`` (only when no client is given).
        fit_data: the fit data for methods that need it to precondition (CG, LiSSA) when the
            model has none attached; it is scattered once to every worker.
        max_test_feature_bytes: bound on the test features one column task holds (see above).
        dashboard_address: where the dashboard of a cluster started here listens.
    """

    def __init__(self, influence_model: InfluenceModel, client: Any = None, *,
                 n_workers: int | None = None, threads_per_worker: int = 1,
                 device: str | None = None, cluster: str = "local", fit_data: Any = None,
                 max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES,
                 dashboard_address: str | None = ":0", **cluster_kwargs: Any) -> None:
        super().__init__(influence_model, device=device, fit_data=fit_data,
                         max_test_feature_bytes=max_test_feature_bytes)
        from distributed import Client

        self._own = client is None
        self.cluster = None
        if client is None:
            if cluster == "cuda":
                try:
                    from dask_cuda import LocalCUDACluster
                except ImportError as e:
                    raise InputError("cluster='cuda' needs dask-cuda with the extra matching "
                                     "torch's CUDA major version: pip install "
                                     "'dask-cuda[cu12]' or 'dask-cuda[cu13]'") from e
                self.cluster = LocalCUDACluster(n_workers=n_workers,
                                                threads_per_worker=threads_per_worker,
                                                dashboard_address=dashboard_address,
                                                **cluster_kwargs)
                if self.device is None:
                    self.device = "cuda:0"
            elif cluster == "local":
                from distributed import LocalCluster

                self.cluster = LocalCluster(n_workers=n_workers,
                                            threads_per_worker=threads_per_worker,
                                            processes=True, dashboard_address=dashboard_address,
                                            **cluster_kwargs)
            else:
                raise InputError(f"cluster must be 'local' or 'cuda', got {cluster!r}")
            client = Client(self.cluster)
        self.client = client
        if TorchWarmup is not None:
            client.register_plugin(TorchWarmup())
        self._model_future: Any = None
        self._shipped_fp = ""
        self._fit_future: Any = None
        self._token = uuid.uuid4().hex

    @property
    def dashboard_link(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def close(self) -> None:
        """Close the client and cluster if this calculator started them."""
        if self._own:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        self._model_future = None

    def __enter__(self) -> DaskInfluenceCalculator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- shipping
    def _ship(self, fp: str | None = None) -> tuple[Any, Any]:
        """Scatter the fitted (data-free) model, and fit data if needed, once to every worker.
        A new token per fingerprint makes workers re-prepare after the model changed."""
        fp = fp or self.model.fingerprint()
        if self._model_future is None or self._shipped_fp != fp:
            self._token = uuid.uuid4().hex
            self._model_future = self.client.scatter(self.model, broadcast=True, hash=False)
            self._shipped_fp = fp
            fit = None
            if self.model.needs_data_to_precondition:
                fit = self.fit_data if self.fit_data is not None else self.model._fit_data
                fit = self.client.scatter(fit, broadcast=True, hash=False)
            self._fit_future = fit
        return self._model_future, self._fit_future

    def _graph(self, te: _Input, tr: _Input, tc: int, rc: int, groups, todo_or_all,
               path: str | None, dtype: str, fingerprint: str | None = None):
        import dask

        model_f, fit_f = self._ship(fingerprint)
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)
        need_t = sorted({i for _, rows, want, _ in todo_or_all for i, w in zip(rows, want) if w})
        need_r = sorted({j for j, *_ in todo_or_all})
        t_src = dict(zip(need_t, te.remote(self.client, [tb[i] for i in need_t])))
        r_src = dict(zip(need_r, tr.remote(self.client, [rb[j] for j in need_r])))
        feats = {i: dask.delayed(_test_features_task, pure=True)(
            model_f, self._token, self.device, fit_f, t_src[i],
            dask_key_name=f"test-features-{i}-{self._token}") for i in need_t}
        out = []
        for j, rows, want, si in todo_or_all:
            fl = [feats[i] if w else None for i, w in zip(rows, want)]
            if path is None:
                out.append(dask.delayed(_column_block_task, pure=True)(
                    model_f, self._token, self.device, fit_f, r_src[j], fl, dtype,
                    dask_key_name=f"influence-column-{rows[0]}-{j}-{self._token}"))
            else:
                out.append(dask.delayed(_column_task, pure=True)(
                    model_f, self._token, self.device, fit_f, r_src[j], fl, path, j, rows,
                    want, si, dtype,
                    dask_key_name=f"write-column-{rows[0]}-{j}-{uuid.uuid4().hex}"))
        return out

    # -------------------------------------------------------------- API
    def influences(self, x_test: Any, y_test: Any, x: Any, y: Any, *, test_chunk: int = 1024,
                   train_chunk: int = 4096, dtype: Any = "float32") -> Any:
        """Lazy ``(n_test, n_train)`` dask array, chunks = tiles ``(test_chunk, train_chunk)``.
        Computing it materialises the whole matrix: for large matrices use :meth:`to_zarr`."""
        import dask.array as da

        te, tr, tc, rc = self._prepare_inputs(x_test, y_test, x, y, test_chunk, train_chunk)
        dt = np.dtype(dtype)
        groups = self._groups(te.n, tc)
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)
        plan = [(j, rows, [True] * len(rows), False) for rows in groups for j in range(len(rb))]
        cols = self._graph(te, tr, tc, rc, groups, plan, None, dt.name)
        blocks, it = [], iter(cols)
        for rows in groups:
            n_rows = sum(tb[i][1] - tb[i][0] for i in rows)
            blocks.append([da.from_delayed(next(it), shape=(n_rows, b - a), dtype=dt)
                           for a, b in rb])
        return da.block(blocks).rechunk((tc, rc))

    def to_zarr(self, path: str | os.PathLike, x_test: Any, y_test: Any, x: Any, y: Any, *,
                test_chunk: int = 1024, train_chunk: int = 4096, overwrite: bool = False,
                self_influence: bool = False, progress: bool = True, compressor: Any = None,
                dtype: Any = "float32", test_index: Any = None, train_index: Any = None
                ) -> InfluenceStore:
        """Create (or resume) the influence store at ``path`` and compute its missing tiles.

        Each task writes whole chunks of pre-created arrays (no locks, no ``da.to_zarr``); a
        store created with other parameters raises ``StoreMismatchError`` unless
        ``overwrite=True``; a non-writable path raises ``StoreError``. ``compressor``: None
        (fastest), "lz4", "zstd" or a Zarr codec. ``self_influence=True`` also writes the
        self-influence of the training points. Returns the :class:`InfluenceStore`; per-column
        statistics of this run are in ``self.last_stats``.
        """
        from distributed import as_completed

        te, tr, tc, rc = self._prepare_inputs(x_test, y_test, x, y, test_chunk, train_chunk)
        store = self._create_store(path, te, tr, tc, rc, overwrite=overwrite,
                                   self_influence=self_influence, compressor=compressor,
                                   dtype=dtype, test_index=test_index, train_index=train_index)
        groups = self._groups(te.n, tc)
        todo = self._todo(store, groups, self_influence)
        self.last_stats = []
        if not todo:
            return store
        if progress and self._own and self.dashboard_link:
            print(f"dvl_ooc: Dask dashboard at {self.dashboard_link}")
        cols = self._graph(te, tr, tc, rc, groups, todo, str(store.path), store.attrs["dtype"],
                           store.attrs["fingerprint"])
        futures = self.client.compute(cols)
        bar = _progress(progress, sum(sum(w) for _, _, w, _ in todo), None)
        try:
            for fut in as_completed(futures):
                st = fut.result()
                self.last_stats.append(st)
                bar.update(len(st.tiles))
        except BaseException:
            self.client.cancel(futures)
            raise
        finally:
            bar.close()
        return store
