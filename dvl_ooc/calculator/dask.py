"""The plan of :mod:`dvl_ooc.calculator.plan` as a Dask task graph on a cluster.

Shipping: the fitted model (data-free: CG/LiSSA drop their fit data when pickled) reaches every
worker once, recoverably, and without Dask's "Sending large graph" warning
(:meth:`DaskInfluenceCalculator._send`): a small pickle is the literal of one task
``dvl-model-<token>`` (workers fetch its result from one another); a larger one (e.g. the
~218 MB of eigenvectors of a projected Direct model) is written into the store being computed
(``<store>/.dvl_ooc_state/<fingerprint>.model.pkl``) and read by each worker itself, or, in
memory (:meth:`~DaskInfluenceCalculator.influences`), sent as literal parts below the warning
threshold. Each worker prepares it (device, attached fit data) once per calculator token
(:func:`dvl_ooc.calculator.tasks._prepared`); fit data likewise; inputs reach the workers as
described in :mod:`dvl_ooc.calculator.inputs`.

Faults: nothing the graph needs is ``scatter``-ed, so every intermediate result (model, input
chunks, test features) can be recomputed by the scheduler from its task, and a model in the
store is read again by a restarted worker. A worker process that
dies mid-run (SIGKILL, out of memory, a lost machine) costs only its running column task, which
Dask reruns elsewhere (its tiles are rewritten whole, with identical bytes); the run completes
and the store equals an uninterrupted run. A task whose workers die ``allowed-failures`` times
(Dask's setting, default 3) fails the run (``KilledWorker``); a rerun with ``mode="a"`` resumes
it, computing only the missing tiles. Column tasks open the store themselves (from its location: a
local path, an fsspec URL with its storage options, or a pickled Zarr store object; no tile
goes through the scheduler) and write their tiles straight into it, so the store must be
reachable by every worker: a local path on one machine (or a shared file system), object
storage (``s3://...``) for a cluster of machines. Clusters started here come from
:func:`dvl_ooc.runtime.local_cluster` (which refuses to spawn workers from a script without an
``if __name__ == "__main__":`` guard).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..influence.base import InfluenceModel
from ..runtime import local_cluster
from ..runtime import progress as progress_bar
from ..store import InfluenceStore, _write_mode
from .inputs import STATE_DIR, _graph_part_bytes, _hold, _Input, _pickled, _StoredState, _unpickle
from .plan import _BUDGET_FRACTION, _DEFAULT_MAX_TEST_BYTES, _Base, _bounds
from .tasks import TorchWarmup, _column_block_task, _column_task, _test_features_task

__all__ = ["DaskInfluenceCalculator"]


class DaskInfluenceCalculator(_Base):
    """Influence matrices on a Dask cluster (see :mod:`dvl_ooc.calculator.plan` for the plan
    and its costs).

    Args:
        influence_model: a fitted :class:`~dvl_ooc.influence.base.InfluenceModel`.
        client: an existing ``distributed.Client`` (any cluster), used as is. Without one, a
            ``LocalCluster`` of worker processes is started (or, with ``cluster="cuda"``, a
            ``dask_cuda.LocalCUDACluster`` with one GPU per worker) by
            :func:`dvl_ooc.runtime.local_cluster` and closed by :meth:`close`.
        n_workers, threads_per_worker: size of the cluster started here.
        device: device of the model on the workers (None: as it is; ``"cuda"``: each worker's
            GPU, which is ``cuda:0`` inside a ``LocalCUDACluster`` worker). Results come back as
            NumPy on the host.
        cluster: ``"local"`` or ``"cuda"`` (only when no client is given).
        fit_data: the fit data for methods that need it to precondition (CG, LiSSA) when the
            model has none attached; it is scattered once to every worker.
        max_test_feature_bytes: bound on the test features one column task holds.
        memory_budget: bytes one task may use (None: half of the smallest worker's
            ``memory_limit / nthreads``, or of the memory available here when workers have no
            limit); chunks left at their default are shrunk to fit it, explicit ones that do
            not fit are refused (:class:`~dvl_ooc.exceptions.MemoryBudgetError`); see
            :mod:`dvl_ooc.calculator.plan`.
        dashboard_address: where the dashboard of a cluster started here listens.

    Raises:
        MainGuardError: a cluster would be started from a script whose code is not under
            ``if __name__ == "__main__":`` (each spawned worker would re-run the script).
    """

    def __init__(self, influence_model: InfluenceModel, client: Any = None, *,
                 n_workers: int | None = None, threads_per_worker: int = 1,
                 device: str | None = None, cluster: str = "local", fit_data: Any = None,
                 max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES,
                 memory_budget: int | None = None, dashboard_address: str | None = ":0",
                 **cluster_kwargs: Any) -> None:
        super().__init__(influence_model, device=device, fit_data=fit_data,
                         max_test_feature_bytes=max_test_feature_bytes,
                         memory_budget=memory_budget)
        from distributed import Client

        self._own = client is None
        self.cluster = None
        if client is None:
            self.cluster = local_cluster(n_workers, threads_per_worker=threads_per_worker,
                                         kind=cluster, what="DaskInfluenceCalculator",
                                         dashboard_address=dashboard_address, **cluster_kwargs)
            if cluster == "cuda" and self.device is None:
                self.device = "cuda:0"
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
        self._model_future = self._fit_future = None

    def __enter__(self) -> DaskInfluenceCalculator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _default_budget(self) -> int:
        """Half of the smallest ``memory_limit / nthreads`` of the workers (memory available
        here when none has a limit)."""
        per_thread = []
        try:
            for w in self.client.scheduler_info(n_workers=-1)["workers"].values():
                lim, nt = int(w.get("memory_limit") or 0), max(1, int(w.get("nthreads") or 1))
                if lim > 0:
                    per_thread.append(lim // nt)
        except Exception:  # noqa: BLE001 - any client that cannot tell: fall back
            per_thread = []
        if not per_thread:
            return super()._default_budget()
        return int(_BUDGET_FRACTION * min(per_thread))

    # -------------------------------------------------------------- shipping
    def _ship(self, fp: str | None = None, where: Any = None) -> tuple[Any, Any]:
        """Send the fitted (data-free) model, and the fit data if the method needs it, to the
        workers once (see :meth:`_send`; ``where``: the location of the store being written,
        None in memory); returns their handles for the graph tasks. A new token per
        fingerprint makes workers re-prepare after the model changed."""
        fp = fp or self.model.fingerprint()
        # a task's result serves every later graph; a file in a store is written again for
        # every run (the store may have been replaced, with the file, in between)
        if (self._model_future is None or self._shipped_fp != fp
                or isinstance(self._model_future, _StoredState)):
            if fp != self._shipped_fp:
                self._token = uuid.uuid4().hex
            self._model_future = self._send(self.model, "model", fp, where)
            self._shipped_fp = fp
            fit = None
            if self.model.needs_data_to_precondition:
                fit = self.fit_data if self.fit_data is not None else self.model._fit_data
                fit = self._send(fit, "fit-data", fp, where)
            self._fit_future = fit
        return self._model_future, self._fit_future

    def _send(self, obj: Any, name: str, fp: str, where: Any) -> Any:
        """Ship ``obj`` so that every worker gets it once, a lost worker can recover it, and no
        graph submission exceeds Dask's large-graph warning threshold
        (``distributed.admin.large-graph-warning-threshold``; half of it is the part size
        ``P``, :func:`~dvl_ooc.calculator.inputs._graph_part_bytes`). Its pickle of ``B``
        bytes goes

        * ``B <= P``: as the literal of one task (workers fetch its result from one another;
          the scheduler recomputes it from the literal after a lost worker);
        * ``B > P`` with a store (``where``, :meth:`to_zarr`): into the store, as
          ``<store>/.dvl_ooc_state/<fingerprint>.<name>.pkl`` (written whole: a temporary
          file renamed into place, or one object PUT), and only a small reference
          (:class:`~dvl_ooc.calculator.inputs._StoredState`) travels through the graph; each
          worker reads it once (the per-worker cache of :func:`~dvl_ooc.calculator.tasks.
          _prepared`), and a worker started after a crash reads it again. The file stays in the
          store (one per model fingerprint, and a store accepts one fingerprint; every run that
          computes tiles writes it again, replacing an equivalent one), next to the matrix it
          made; ``pickle.load`` gives the fitted model back;
        * ``B > P`` without a store (:meth:`influences`): as ``ceil(B / P)`` literal parts, one
          graph submission each, joined and unpickled by one task (recomputable from the
          parts' literals, as above).

        The client pays one pickling (``B`` bytes, ~1 s per 500 MB); workers, one read or one
        transfer of ``B`` bytes each."""
        data = _pickled(obj)
        part = _graph_part_bytes()
        key = f"dvl-{name}-{self._token}"
        if len(data) <= part:
            return self.client.submit(_unpickle, data, pure=False, key=key)
        if where is not None:
            return _StoredState.write(where, f"{STATE_DIR}/{fp}.{name}.pkl", data)
        parts = [self.client.submit(_hold, data[s:s + part], pure=False,
                                    key=f"{key}-part-{s // part}")
                 for s in range(0, len(data), part)]
        return self.client.submit(_unpickle, *parts, pure=False, key=key)

    def _graph(self, te: _Input, tr: _Input, tc: int, rc: int, groups, todo_or_all,
               where: Any, dtype: str, fingerprint: str | None = None,
               expect: dict[str, Any] | None = None):
        import dask

        model_f, fit_f = self._ship(fingerprint, where)
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
            if where is None:
                out.append(dask.delayed(_column_block_task, pure=True)(
                    model_f, self._token, self.device, fit_f, r_src[j], fl, dtype,
                    dask_key_name=f"influence-column-{rows[0]}-{j}-{self._token}"))
            else:
                out.append(dask.delayed(_column_task, pure=True)(
                    model_f, self._token, self.device, fit_f, r_src[j], fl, where, j, rows,
                    want, si, dtype, expect,
                    dask_key_name=f"write-column-{rows[0]}-{j}-{uuid.uuid4().hex}"))
        return out

    # -------------------------------------------------------------- API
    def influences(self, x_test: Any, y_test: Any, x: Any, y: Any, *,
                   test_chunk: int | None = None, train_chunk: int | None = None,
                   dtype: Any = "float32") -> Any:
        """Lazy ``(n_test, n_train)`` dask array, chunks = tiles ``(test_chunk, train_chunk)``
        (chosen as in :meth:`to_zarr`; the plan is in ``info["plan"]``). Computing it
        materialises the whole matrix: for large matrices use :meth:`to_zarr`."""
        import dask.array as da

        te, tr = self._prepare_inputs(x_test, y_test, x, y)
        plan = self._plan(te, tr, test_chunk, train_chunk, dtype=dtype)
        self._reset_info(plan)
        tc, rc, groups = plan.test_chunk, plan.train_chunk, plan.test_groups
        dt = np.dtype(dtype)
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)
        every = [(j, rows, [True] * len(rows), False) for rows in groups
                 for j in range(len(rb))]
        cols = self._graph(te, tr, tc, rc, groups, every, None, dt.name)
        blocks, it = [], iter(cols)
        for rows in groups:
            n_rows = sum(tb[i][1] - tb[i][0] for i in rows)
            blocks.append([da.from_delayed(next(it), shape=(n_rows, b - a), dtype=dt)
                           for a, b in rb])
        return da.block(blocks).rechunk((tc, rc))

    def to_zarr(self, path: Any, x_test: Any, y_test: Any, x: Any, y: Any, *,
                test_chunk: int | None = None, train_chunk: int | None = None,
                mode: str = "a", self_influence: bool = False, progress: bool = True,
                compressor: Any = None, dtype: Any = "float32", test_index: Any = None,
                train_index: Any = None, test_names: Any = None, train_names: Any = None,
                storage_options: Mapping[str, Any] | None = None,
                **deprecated: Any) -> InfluenceStore:
        """Create, resume or replace the influence store at ``path`` and compute its missing
        tiles. ``path``: a local path, an fsspec URL (``s3://bucket/run.zarr``) with
        ``storage_options`` (fsspec's, e.g. ``endpoint_url``, ``key``, ``secret``), or a Zarr
        store object; every worker must reach it (see :mod:`dvl_ooc.store`).

        ``mode``: ``"a"`` (default) creates the store or resumes one made with the same
        parameters (``StoreMismatchError`` when they differ, data untouched); ``"w-"`` raises
        ``StoreExistsError`` when a store exists; ``"w"`` replaces it. A directory that is not a
        Zarr store is never touched (``StoreError``), nor is a non-writable path. Each task writes
        whole chunks of pre-created arrays (no locks, no ``da.to_zarr``). ``compressor``: None
        (fastest), "lz4", "zstd" or a Zarr codec. ``self_influence=True`` also writes the
        self-influence of the training points. ``test_names`` / ``train_names``: strings naming
        the samples (e.g. image file paths), stored as the coordinates ``test_name`` /
        ``train_name`` and carried into query results. Returns the :class:`InfluenceStore`;
        per-column statistics of this run are in ``self.info["columns"]``. ``overwrite=True`` is the
        deprecated spelling of ``mode="w"``.

        Chunks (:meth:`plan`, before anything is computed or created): ``test_chunk`` /
        ``train_chunk`` left at None start from 1024 / 4096 (a store resumed with mode "a":
        its own chunking) and are halved until the test features of a chunk fit
        ``max_test_feature_bytes`` and each task fits ``memory_budget`` (``info["plan"]["notes"]``
        says so); explicit chunks that do not fit raise ``MemoryBudgetError``. Test groups run
        one after another, so one group's test features are held at a time.
        """
        from distributed import as_completed

        mode = _write_mode("DaskInfluenceCalculator.to_zarr", mode, deprecated)
        te, tr = self._prepare_inputs(x_test, y_test, x, y)
        plan = self._plan(te, tr, test_chunk, train_chunk, dtype=dtype,
                          self_influence=self_influence, path=path, mode=mode,
                          storage_options=storage_options)
        tc, rc, groups = plan.test_chunk, plan.train_chunk, plan.test_groups
        store = self._create_store(path, te, tr, tc, rc, mode=mode,
                                   self_influence=self_influence, compressor=compressor,
                                   dtype=dtype, test_index=test_index, train_index=train_index,
                                   test_names=test_names, train_names=train_names,
                                   storage_options=storage_options)
        todo = self._todo(store, groups, self_influence)
        self._reset_info(plan)
        if not todo:
            return store
        if progress and self._own and self.dashboard_link:
            print(f"dvl_ooc: Dask dashboard at {self.dashboard_link}")
        batches: list[list[Any]] = []  # the todo of each test group, in order
        for item in todo:
            if not batches or batches[-1][0][1] != item[1]:
                batches.append([])
            batches[-1].append(item)
        bar = progress_bar(progress, total=sum(sum(w) for _, _, w, _ in todo), unit="tile",
                           desc="influence tiles")
        futures: list[Any] = []
        try:
            for batch in batches:
                cols = self._graph(te, tr, tc, rc, groups, batch, store.location,
                                   store.attrs["dtype"], store.attrs["fingerprint"],
                                   store.params())
                futures = self.client.compute(cols)
                for fut in as_completed(futures):
                    st = fut.result()
                    self._record(st)
                    bar.update(len(st.tiles))
                futures = []
        except BaseException:
            self.client.cancel(futures)
            raise
        finally:
            bar.close()
        return store
