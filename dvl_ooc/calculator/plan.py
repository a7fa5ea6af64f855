"""The plan shared by both calculators: tiles, test groups, the store and the todo list.

The ``(n_test, n_train)`` influence matrix is cut into tiles ``(test chunk i) x (train chunk
j)`` (:func:`_bounds`; the last chunk of each axis may be shorter). Tile ``(i, j)`` is ONE
matrix product ``T_i @ R_j.T`` (``T_i``: test features of chunk i, ``R_j``: train features of
chunk j), written whole into exactly one Zarr chunk of the store.

Plan (what the task graph does):

1. one task per test chunk i computes ``T_i`` (gradients + preconditioning of n_test_i points);
2. one task per train chunk j (and test group g) reads its data chunk, computes the gradients and
   ``R_j`` once, then writes its whole tile column ``T_i @ R_j.T`` for every test chunk i of the
   group (and the self-influence chunk on request). The test features of the group are task
   dependencies: Dask moves them to each worker once and keeps them while columns need them.

Cost model (n_test, n_train samples; c_train train chunks; G test groups, usually 1; k the
feature dimension, p for full-gradient methods, the rank for low-rank ones):

    preconditioning solves:   n_test                         (pyDVL: n_test * c_train)
    gradient computations:    n_test + G * n_train           (pyDVL: n_test * c_train + n_train)
    tile products:            n_test * n_train * k multiply-adds

Memory per worker is bounded by chunk sizes: the test features of one group
(``test_group_rows * k`` floats, at most ``max_test_feature_bytes``), one train chunk of data,
gradients and features (``train_chunk * p``) and one tile column. All test features must fit
in ``max_test_feature_bytes`` for G = 1; for very large ``n_test`` with full-p features the test
set is streamed in G groups (:meth:`_Base._groups`) and each train chunk's gradients are
recomputed once per group.

Resuming: the store is created, resumed or replaced according to the write mode ``mode``
("a", "w-", "w"; see :meth:`dvl_ooc.store.InfluenceStore.create`); :meth:`_Base._todo` lists the
store's chunk keys once and plans only the missing tiles, which are then written with the same
bytes as in an uninterrupted run.

State: ``info["columns"]`` of the last ``to_zarr`` run, one plain dict per column task
(worker, pid, column, tiles, self_influence, t_features, t_matmul, t_write, t_end).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np

from ..exceptions import InputError, NotFittedError
from ..influence.base import InfluenceModel
from ..store import InfluenceStore
from .inputs import _Input
from .tasks import _ColumnStats

__all__: list[str] = []

_DEFAULT_MAX_TEST_BYTES = 1 << 30

#: one planned column: (train chunk j, test chunks of the group, which of them are missing,
#: whether the self-influence chunk j is missing)
Todo = tuple[int, list[int], list[bool], bool]


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
        #: diagnostics of the last ``to_zarr`` run (plain data): ``info["columns"]``
        self.info: dict[str, Any] = {"columns": []}

    # -------------------------------------------------------------- diagnostics
    def _reset_info(self) -> None:
        self.info = {"columns": []}

    def _record(self, st: _ColumnStats) -> None:
        self.info["columns"].append(dataclasses.asdict(st))

    @property
    def last_stats(self) -> list[_ColumnStats]:
        """Deprecated: the per-column statistics as objects; use ``info["columns"]``."""
        warnings.warn(f"{type(self).__name__}: .last_stats is deprecated, use "
                      '.info["columns"]', DeprecationWarning, stacklevel=2)
        return [_ColumnStats(**d) for d in self.info["columns"]]

    # -------------------------------------------------------------- checks
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
        """Test feature dimension k and dtype (:meth:`InfluenceModel.feature_dims`)."""
        m = self.model
        dt = np.dtype(str(m.grads.dtype).removeprefix("torch."))
        try:
            return m.feature_dims()[0], dt
        except NotFittedError:
            return m.grads.num_params, dt

    # -------------------------------------------------------------- plan
    def _groups(self, n_test: int, test_chunk: int) -> list[list[int]]:
        """Test chunks split into groups whose features fit ``max_test_feature_bytes``."""
        k, dt = self._feature_dim()
        n_chunks = -(-n_test // test_chunk)
        per = max(1, self.max_test_feature_bytes // max(1, test_chunk * k * dt.itemsize))
        ids = list(range(n_chunks))
        return [ids[s : s + per] for s in range(0, n_chunks, per)]

    def _prepare_inputs(self, x_test: Any, y_test: Any, x: Any, y: Any, test_chunk: Any,
                        train_chunk: Any) -> tuple[_Input, _Input, int, int]:
        self._check_model()
        te = _Input.make(x_test, y_test, "test data")
        tr = _Input.make(x, y, "train data")
        tc = _check_chunk("test_chunk", test_chunk, te.n)
        rc = _check_chunk("train_chunk", train_chunk, tr.n)
        return te, tr, tc, rc

    def _create_store(self, path: str | os.PathLike, te: _Input, tr: _Input, tc: int, rc: int,
                      *, mode: str, self_influence: bool, compressor: Any, dtype: Any,
                      test_index: Any, train_index: Any) -> InfluenceStore:
        m = self.model
        return InfluenceStore.create(
            path, n_test=te.n, n_train=tr.n, test_chunk=tc, train_chunk=rc,
            method=type(m).__name__, config=m.config(), fingerprint=m.fingerprint(),
            data_fingerprint=f"{te.fingerprint()}:{tr.fingerprint()}", dtype=dtype,
            test_index=test_index, train_index=train_index, test_labels=te.labels(),
            train_labels=tr.labels(), self_influence=self_influence, compressor=compressor,
            mode=mode,
        )

    @staticmethod
    def _todo(store: InfluenceStore, groups: list[list[int]], self_influence: bool
              ) -> list[Todo]:
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
