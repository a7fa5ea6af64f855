"""The plan of :mod:`dvl_ooc.calculator.plan` run in this process, without a cluster.

Same tiles, same task bodies (:mod:`dvl_ooc.calculator.tasks`) and the same store bytes as the
Dask calculator; useful as a reference, for small problems and for debugging. The lazy array of
:meth:`SequentialInfluenceCalculator.influences` runs on dask's local scheduler against one
model object.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..influence.base import InfluenceModel
from ..runtime import progress as progress_bar
from ..store import InfluenceStore, _write_mode
from .plan import _DEFAULT_MAX_TEST_BYTES, _Base, _bounds
from .tasks import _column_task, _column_tiles, _ColumnStats, _features, _test_features_task

__all__ = ["SequentialInfluenceCalculator"]


class SequentialInfluenceCalculator(_Base):
    """The same plan in this process, without Dask (reference, small problems, debugging).
    Writes the same store as :class:`~dvl_ooc.calculator.DaskInfluenceCalculator`.

    Args:
        influence_model: a fitted :class:`~dvl_ooc.influence.base.InfluenceModel`.
        device: device to compute on (None: the model's; a copy is moved, never the caller's).
        fit_data: the fit data for methods that need it to precondition (CG, LiSSA) when the
            model has none attached.
        max_test_feature_bytes: bound on the test features held at once (see
            :mod:`dvl_ooc.calculator.plan`).
        memory_budget: bytes one task may use (None: half the memory available when a run
            starts); chunks left at their default are shrunk to fit it, explicit ones that do
            not fit are refused (:class:`~dvl_ooc.exceptions.MemoryBudgetError`).
    """

    def __init__(self, influence_model: InfluenceModel, *, device: str | None = None,
                 fit_data: Any = None, max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES,
                 memory_budget: int | None = None) -> None:
        super().__init__(influence_model, device=device, fit_data=fit_data,
                         max_test_feature_bytes=max_test_feature_bytes,
                         memory_budget=memory_budget)
        self._token = uuid.uuid4().hex

    def _local_model(self) -> InfluenceModel:
        m = self.model
        if self.device is not None and torch.device(self.device) != m.grads.device:
            m = copy.deepcopy(m).to(self.device)  # never move the caller's model
        if m.needs_data_to_precondition and m._fit_data is None:
            m.attach_data(self.fit_data)
        return m

    def influences(self, x_test: Any, y_test: Any, x: Any, y: Any, *,
                   test_chunk: int | None = None, train_chunk: int | None = None,
                   dtype: Any = "float32") -> Any:
        """Lazy ``(n_test, n_train)`` dask array (local scheduler), one block per tile; chunks
        as :meth:`plan` chooses them (``info["plan"]``)."""
        import dask
        import dask.array as da

        te, tr = self._prepare_inputs(x_test, y_test, x, y)
        plan = self._plan(te, tr, test_chunk, train_chunk, dtype=dtype)
        self._reset_info(plan)
        tc, rc, groups = plan.test_chunk, plan.train_chunk, plan.test_groups
        m = self._local_model()
        dt = np.dtype(dtype)
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

    def to_zarr(self, path: Any, x_test: Any, y_test: Any, x: Any, y: Any, *,
                test_chunk: int | None = None, train_chunk: int | None = None,
                mode: str = "a", self_influence: bool = False, progress: bool = True,
                compressor: Any = None, dtype: Any = "float32", test_index: Any = None,
                train_index: Any = None, test_names: Any = None, train_names: Any = None,
                storage_options: Mapping[str, Any] | None = None,
                **deprecated: Any) -> InfluenceStore:
        """Compute the missing tiles into the store at ``path`` (a local path, an fsspec URL
        with ``storage_options``, or a Zarr store object); see
        :meth:`DaskInfluenceCalculator.to_zarr <dvl_ooc.calculator.DaskInfluenceCalculator.to_zarr>`
        (same arguments, write modes, chunk choice and store). One test group's features are
        held at a time."""
        mode = _write_mode("SequentialInfluenceCalculator.to_zarr", mode, deprecated)
        te, tr = self._prepare_inputs(x_test, y_test, x, y)
        plan = self._plan(te, tr, test_chunk, train_chunk, dtype=dtype,
                          self_influence=self_influence, path=path, mode=mode,
                          storage_options=storage_options)
        tc, rc = plan.test_chunk, plan.train_chunk
        store = self._create_store(path, te, tr, tc, rc, mode=mode,
                                   self_influence=self_influence, compressor=compressor,
                                   dtype=dtype, test_index=test_index, train_index=train_index,
                                   test_names=test_names, train_names=train_names,
                                   storage_options=storage_options)
        todo = self._todo(store, plan.test_groups, self_influence)
        self._reset_info(plan)
        if not todo:
            return store
        m = self._local_model()
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)
        feats: dict[int, Any] = {}  # the test features of the current group only
        bar = progress_bar(progress, total=sum(sum(w) for _, _, w, _ in todo), unit="tile",
                           desc="influence tiles")
        for j, rows, want, si in todo:  # grouped: _todo lists the columns group by group
            need = [i for i, w in zip(rows, want) if w]
            if any(i not in feats for i in need):
                feats = {i: v for i, v in feats.items() if i in rows}
                feats.update({i: _test_features_task(m, self._token, None, None,
                                                     te.local(*tb[i]))
                              for i in need if i not in feats})
            st = _column_task(m, self._token, None, None, tr.local(*rb[j]),
                              [feats.get(i) if w else None for i, w in zip(rows, want)],
                              store.location, j, rows, want, si, store.attrs["dtype"],
                              store.params())
            self._record(st)
            bar.update(len(st.tiles))
        bar.close()
        return store
