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
    """

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
                test_chunk: int = 1024, train_chunk: int = 4096, mode: str = "a",
                self_influence: bool = False, progress: bool = True, compressor: Any = None,
                dtype: Any = "float32", test_index: Any = None, train_index: Any = None,
                **deprecated: Any) -> InfluenceStore:
        """Compute the missing tiles into the store at ``path``; see
        :meth:`DaskInfluenceCalculator.to_zarr <dvl_ooc.calculator.DaskInfluenceCalculator.to_zarr>`
        (same arguments, write modes and store)."""
        mode = _write_mode("SequentialInfluenceCalculator.to_zarr", mode, deprecated)
        te, tr, tc, rc = self._prepare_inputs(x_test, y_test, x, y, test_chunk, train_chunk)
        store = self._create_store(path, te, tr, tc, rc, mode=mode,
                                   self_influence=self_influence, compressor=compressor,
                                   dtype=dtype, test_index=test_index, train_index=train_index)
        todo = self._todo(store, self._groups(te.n, tc), self_influence)
        self._reset_info()
        if not todo:
            return store
        m = self._local_model()
        tb, rb = _bounds(te.n, tc), _bounds(tr.n, rc)
        needed = sorted({i for _, rows, want, _ in todo for i, w in zip(rows, want) if w})
        feats = {i: _test_features_task(m, self._token, None, None, te.local(*tb[i]))
                 for i in needed}
        bar = progress_bar(progress, total=sum(sum(w) for _, _, w, _ in todo), unit="tile",
                           desc="influence tiles")
        for j, rows, want, si in todo:
            st = _column_task(m, self._token, None, None, tr.local(*rb[j]),
                              [feats.get(i) for i in rows], str(path), j, rows, want, si,
                              store.attrs["dtype"])
            self._record(st)
            bar.update(len(st.tiles))
        bar.close()
        return store
