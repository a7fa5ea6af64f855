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

Cost model (n_test, n_train samples; c_train train chunks; G test groups, usually 1):

    preconditioning solves:   n_test  (+ n_train for self-influence)     (pyDVL: n_test * c_train)
    gradient computations:    n_test + G * n_train           (pyDVL: n_test * c_train + n_train)
    tile products:            n_test * n_train * k_train multiply-adds (the default ``T @ R.T``)

Widths (:class:`InfluencePlan`): ``p`` = ``model.grads.num_params``, the width of the gradients
the model computes; ``k_test, k_train`` = :meth:`InfluenceModel.feature_dims`, the widths of the
test and train feature rows:

    full-gradient methods (Direct, CG, LiSSA, EK-FAC):     p = k_test = k_train = parameters
    projected (``projection=dict(k_in=, k_out=)``):        p = k_test = k_train = k
                                                           (gradients are never p-dimensional)
    low-rank (Arnoldi, Nystroem, rank r):                  k_test = k_train = r << p
    EK-FAC with compressed test factors:                   k_test < k_train (the model's
                                                           ``tile()`` contracts the two forms)

Memory per task (``it``: the model's itemsize, ``st``: the store's; ``tc, rc``: test and train
chunk; ``rows``: test rows of a group; ``mb``: the gradient micro-batch; ``d``: elements of one
input sample and ``xs`` its itemsize: the data chunk as read and converted to the model's
dtype):

    test-features task:  tc * (p + k_test) * it + 2 * min(mb, tc) * p * it + tc * d * (xs + it)
    column task:         rows * k_test * it                 test features of the group
                       + rc * p * it                        gradients of the train chunk
                       + rc * k_train * it                  train features (unless they ARE
                                                            the gradients, as for Direct)
                       + rc * k_test * it                   self-influence only
                       + rows * rc * st + tc * rc * it      the tile column, one tile in flight
                       + 2 * min(mb, rc) * p * it           per-sample gradient micro-batch
                       + rc * d * (xs + it)                 the data chunk

An :class:`~dvl_ooc.influence.Ensemble` of ``M`` members (widths ``p = sum p_m``, ``k = sum
k_m``) adds, to both tasks, one member's rows in flight before they are copied into the
ensemble's arrays: ``tc * f * it`` (test) and ``rc * f * it`` (column) with ``f = max_m
max(p_m, kt_m, kr_m)``, and, with ``M >= 2``, a second tile ``tc * rc * it`` (the running sum
next to the member's tile); its train features are the gradients themselves (no bytes) when
every member's are.

Bounds, checked before anything is computed (:meth:`_Base.plan`): the test features of a group
stay within ``min(max_test_feature_bytes, memory_budget / 2)`` (test chunks are grouped under
it; for very large ``n_test`` with wide features the test set is streamed in G groups and each
train chunk's gradients are recomputed once per group), and each task within
``memory_budget`` (default: half the memory available to a worker thread). Chunks left at
their default (``test_chunk=None``: 1024, ``train_chunk=None``: 4096) are halved until they fit
(deterministic for a given budget; a store resumed with mode "a" keeps its own chunking and is
checked like an explicit choice); an explicit chunk that does not fit is refused with a
:class:`~dvl_ooc.exceptions.MemoryBudgetError` naming the size and the ways out. Methods with
iterative solves (CG, LiSSA) add their work matrices (their ``_solve_bytes`` estimate) to the
test-features task and to self-influence; the activations of the forward pass are not
estimated.
``to_zarr`` of both calculators holds one group's test features at a time (groups run one
after another).

Resuming: the store is created, resumed or replaced according to the write mode ``mode``
("a", "w-", "w"; see :meth:`dvl_ooc.store.InfluenceStore.create`); :meth:`_Base._todo` lists the
store's chunk keys once and plans only the missing tiles, which are then written with the same
bytes as in an uninterrupted run.

State: ``info["plan"]`` (:meth:`InfluencePlan.as_dict` of the last run, with ``notes`` saying
which chunk was shrunk and why) and ``info["columns"]`` of the last ``to_zarr`` run, one plain
dict per column task (worker, pid, column, tiles, self_influence, t_features, t_matmul, t_write,
t_end).

Dry run (:func:`dry_run_plan`): the same plan from ``n_test``, ``n_train`` and the shape of one
sample, with no data (lazy Dask arrays of zeros, never computed), no cluster, no store and, where
the feature widths do not depend on it, no fit: to size a cluster before renting it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import DvlOocError, InputError, MemoryBudgetError, NotFittedError, StoreError
from ..influence.base import InfluenceModel
from ..influence.ensemble import Ensemble
from ..runtime import available_memory, format_bytes
from ..store import InfluenceStore
from .inputs import _Input
from .tasks import _ColumnStats

__all__ = ["InfluencePlan", "dry_run_plan"]

_DEFAULT_MAX_TEST_BYTES = 1 << 30
#: chunk sizes used when ``test_chunk`` / ``train_chunk`` are left at None (then halved to fit)
DEFAULT_TEST_CHUNK = 1024
DEFAULT_TRAIN_CHUNK = 4096
#: the default memory budget of a task: this fraction of the memory available to one worker
#: thread (Dask's ``memory_limit / nthreads``, else the memory available to this process)
_BUDGET_FRACTION = 0.5

#: one planned column: (train chunk j, test chunks of the group, which of them are missing,
#: whether the self-influence chunk j is missing)
Todo = tuple[int, list[int], list[bool], bool]


def _check_chunk(name: str, v: Any, n: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise InputError(f"{name} must be a positive integer number of samples, got {v!r}")
    return min(int(v), n)


def _bounds(n: int, c: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + c)) for s in range(0, n, c)]


def _grid_cost(m: InfluenceModel, test_blocks: list[tuple[int, int]],
               train_blocks: list[tuple[int, int]], k_train: int) -> int:
    """``m.tile_multiply_adds`` summed over the tiles of the two block lists (one call per
    distinct pair of block sizes)."""
    from collections import Counter

    ct = Counter(e - s for s, e in test_blocks)
    cr = Counter(e - s for s, e in train_blocks)
    return sum(a * b * m.tile_multiply_adds(t, r, k_train)
               for t, a in ct.items() for r, b in cr.items())


def _aliases_gradients(m: InfluenceModel) -> bool:
    """Whether ``m.train_features(g)`` is ``g`` itself (no bytes of its own): the base method,
    or an ensemble all of whose members use it."""
    members = m.members if isinstance(m, Ensemble) else [m]
    return all(type(x).train_features is InfluenceModel.train_features for x in members)


def _ensemble_in_flight(m: InfluenceModel) -> tuple[int, int]:
    """``(f, extra tiles)`` of an ensemble (module docstring): the widest row one member has
    in flight, ``max_m max(p_m, kt_m, kr_m)``, and 1 with two or more members (the running
    sum of a tile next to the member's tile); ``(0, 0)`` for any other model."""
    if not isinstance(m, Ensemble):
        return 0, 0
    p, kt, kr = m._dims()
    return max(max(w) for w in zip(p, kt, kr)), int(len(m.members) > 1)


def _largest_fitting(n: int, fits: Callable[[int], bool]) -> int:
    """The largest ``c`` in ``1..n`` with ``fits(c)`` (monotone), 0 when none."""
    if not fits(1):
        return 0
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass
class InfluencePlan:
    """What a calculator run will do and hold, computed before anything is (see the cost model
    and memory bounds of :mod:`dvl_ooc.calculator.plan`). All sizes in bytes.

    Attributes:
        method: the influence model's class name.
        n_test, n_train: samples on each axis.
        p: width of the gradients the model computes (``model.grads.num_params``: the number
            of attributed parameters, or ``k`` with ``projection=``).
        k_test, k_train: widths of the test and train feature rows (``feature_dims()``).
        projected: whether the model works on projected gradients.
        test_chunk, train_chunk: the tile shape used.
        test_chunk_source, train_chunk_source: ``"explicit"``, ``"default"``, ``"shrunk"``
            (a default halved to fit the bounds) or ``"store"`` (the chunking of the store
            being resumed).
        groups: number of test groups G (each train gradient is computed G times).
        group_rows: test rows of the largest group.
        tiles: tiles of the matrix (``ceil(n_test/test_chunk) * ceil(n_train/train_chunk)``).
        itemsize, store_itemsize: bytes per feature / per stored influence.
        feature_bound: bound on the test features of a group:
            ``min(max_test_feature_bytes, memory_budget // 2)``.
        memory_budget: bound on one task's memory.
        bytes: the estimate by part (keys as in the module docstring's memory table).
        test_task_bytes, column_task_bytes: the two task estimates; ``task_bytes`` their max.
        gradient_computations: ``n_test + groups * n_train``.
        preconditioning_solves: ``n_test`` (+ ``n_train`` with self-influence).
        tile_multiply_adds: the model's :meth:`tile_multiply_adds
            <dvl_ooc.influence.base.InfluenceModel.tile_multiply_adds>` summed over the tiles:
            ``n_test * n_train * k_train`` for the default ``T @ R.T``; EK-FAC with ``rank``
            adds the expansion of each test row's factors once per train chunk.
        store_bytes: the influences as stored, uncompressed: ``n_test * n_train *
            store_itemsize`` (+ ``n_train * store_itemsize`` of self-influence).
        notes: what was shrunk or adopted, and why.
        test_groups: the test chunk indices of each group.
    """

    method: str
    n_test: int
    n_train: int
    p: int
    k_test: int
    k_train: int
    projected: bool
    test_chunk: int
    train_chunk: int
    test_chunk_source: str
    train_chunk_source: str
    groups: int
    group_rows: int
    tiles: int
    itemsize: int
    store_itemsize: int
    feature_bound: int
    memory_budget: int
    bytes: dict[str, int]
    test_task_bytes: int
    column_task_bytes: int
    task_bytes: int
    gradient_computations: int
    preconditioning_solves: int
    tile_multiply_adds: int
    store_bytes: int
    notes: list[str] = field(default_factory=list)
    test_groups: list[list[int]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), without the group lists."""
        d = dataclasses.asdict(self)
        d.pop("test_groups")
        return d

    def summary(self) -> str:
        """A few lines for a log or a command line."""
        fb = format_bytes
        proj = " (projected)" if self.projected else ""
        lines = [
            f"{self.method}: {self.n_test} test x {self.n_train} train, gradients of width "
            f"p={self.p}{proj}, features k_test={self.k_test}, k_train={self.k_train}",
            f"tiles {self.test_chunk} x {self.train_chunk} ({self.test_chunk_source}, "
            f"{self.train_chunk_source}): {self.tiles} tiles in {self.groups} test group(s) of "
            f"at most {self.group_rows} rows; store {fb(self.store_bytes)} uncompressed",
            f"cost: {self.gradient_computations} gradient computations, "
            f"{self.preconditioning_solves} preconditioning solves, "
            f"{self.tile_multiply_adds:.3g} tile multiply-adds",
            f"memory per task: {fb(self.task_bytes)} of a {fb(self.memory_budget)} budget "
            f"(test features of a group {fb(self.bytes['group_features'])} <= "
            f"{fb(self.feature_bound)}; train gradients {fb(self.bytes['train_gradients'])}, "
            f"train features {fb(self.bytes['train_features'])}, tile column "
            f"{fb(self.bytes['tile_column'])})",
        ]
        return "\n".join(lines + self.notes)


class _Base:
    """Planning shared by the sequential and the Dask calculators."""

    def __init__(self, influence_model: InfluenceModel, *, device: str | None = None,
                 fit_data: Any = None, max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES,
                 memory_budget: int | None = None) -> None:
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
        if memory_budget is not None and (isinstance(memory_budget, bool)
                                          or int(memory_budget) <= 0):
            raise InputError(f"memory_budget must be a positive number of bytes or None, got "
                             f"{memory_budget!r}")
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        #: diagnostics of the last run (plain data): ``info["plan"]``, ``info["columns"]``
        self.info: dict[str, Any] = {"columns": []}

    # -------------------------------------------------------------- diagnostics
    def _reset_info(self, plan: InfluencePlan | None = None) -> None:
        self.info = {"columns": []}
        if plan is not None:
            self.info["plan"] = plan.as_dict()

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

    def _feature_dims(self) -> tuple[int, int]:
        """``(k_test, k_train)`` (:meth:`InfluenceModel.feature_dims`); the gradient width when
        the model cannot tell yet (e.g. CG/LiSSA without their fit data attached here)."""
        m = self.model
        try:
            k_test, k_train = m.feature_dims()
        except NotFittedError:
            k_test = k_train = m.grads.num_params
        return int(k_test), int(k_train)

    def _feature_dim(self) -> tuple[int, np.dtype]:
        """Test feature dimension k and dtype."""
        dt = np.dtype(str(self.model.grads.dtype).removeprefix("torch."))
        return self._feature_dims()[0], dt

    def _default_budget(self) -> int:
        """Memory one task may use when ``memory_budget`` is None: a fraction of the memory
        available to this process (the Dask calculator: to one worker thread)."""
        return int(_BUDGET_FRACTION * available_memory())

    # -------------------------------------------------------------- plan
    def _groups(self, n_test: int, test_chunk: int, bound: int | None = None
                ) -> list[list[int]]:
        """Test chunks split into groups whose features fit ``bound`` (default
        ``max_test_feature_bytes``); a group holds at least one chunk (:meth:`plan` makes
        sure that one chunk fits)."""
        k, dt = self._feature_dim()
        bound = self.max_test_feature_bytes if bound is None else bound
        n_chunks = -(-n_test // test_chunk)
        per = max(1, bound // max(1, test_chunk * k * dt.itemsize))
        ids = list(range(n_chunks))
        return [ids[s : s + per] for s in range(0, n_chunks, per)]

    def _prepare_inputs(self, x_test: Any, y_test: Any, x: Any, y: Any
                        ) -> tuple[_Input, _Input]:
        self._check_model()
        te = _Input.make(x_test, y_test, "test data")
        tr = _Input.make(x, y, "train data")
        return te, tr

    def plan(self, x_test: Any, y_test: Any, x: Any, y: Any, *, test_chunk: int | None = None,
             train_chunk: int | None = None, dtype: Any = "float32",
             self_influence: bool = False, path: Any = None, mode: str = "a",
             storage_options: Mapping[str, Any] | None = None) -> InfluencePlan:
        """The plan of a run with these arguments, computed without computing anything: tile
        shape, test groups, the cost-model counts and the per-task memory estimate (see
        :mod:`dvl_ooc.calculator.plan`). ``path``, ``mode`` and ``storage_options``: those of
        a ``to_zarr`` run (a store resumed with mode "a" keeps its chunking).

        Raises:
            MemoryBudgetError: an explicit chunk (or a resumed store's) does not fit the bounds,
                or not even one sample does; the message names the size and the ways out.
        """
        te, tr = self._prepare_inputs(x_test, y_test, x, y)
        return self._plan(te, tr, test_chunk, train_chunk, dtype=dtype,
                          self_influence=self_influence, path=path, mode=mode,
                          storage_options=storage_options)

    @staticmethod
    def _stored_chunks(path: Any, mode: str, n_test: int, n_train: int,
                       storage_options: Mapping[str, Any] | None = None
                       ) -> tuple[int, int] | None:
        """The chunking of the store a mode-"a" run at ``path`` would resume, if any."""
        if path is None or mode != "a":
            return None
        if isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path) and \
                not (Path(path) / "zarr.json").is_file():
            return None  # local fast path: nothing there
        try:
            old = InfluenceStore.open(path, mode="r", storage_options=storage_options,
                                      allow_unfinished=True)
        except StoreError:
            return None
        if old.shape != (n_test, n_train):
            return None  # create() refuses it, naming n_test / n_train
        return old.chunks

    def _ways_out(self, what: str) -> str:
        from ..influence.ekfac import EkfacInfluence

        m = self.model
        ways = [f"a smaller {what} (or leave it unset: it is then chosen to fit)"]
        if isinstance(m, EkfacInfluence):  # no projection=: its own compression
            ways.append("EkfacInfluence(rank=r) (compressed test factors, (d_in + d_out) r "
                        "per layer instead of d_in d_out), or another method with "
                        "projection=dict(k_in=16, k_out=16)")
        elif m.projector is None:
            ways.append("projection=dict(k_in=16, k_out=16) (features of dimension k instead "
                        "of p)")
        else:
            ways.append("smaller projection k_in/k_out")
        ways += ["layers=[...] (attribute through fewer layers)",
                 "a low-rank method or a smaller rank (EkfacInfluence rank=, "
                 "ArnoldiInfluence/NystroemSketchInfluence rank=)"]
        return "; ".join(ways)

    def _plan(self, te: _Input, tr: _Input, test_chunk: Any, train_chunk: Any, *,
              dtype: Any = "float32", self_influence: bool = False,
              path: Any = None, mode: str = "a",
              storage_options: Mapping[str, Any] | None = None) -> InfluencePlan:
        fb = format_bytes
        m = self.model
        k_test, k_train = self._feature_dims()
        p = int(m.grads.num_params)
        it = self._feature_dim()[1].itemsize
        st = np.dtype(dtype).itemsize
        mb = int(getattr(m.grads, "micro_batch_size", 64))
        aliased = _aliases_gradients(m)  # R is g itself
        fly, extra_tiles = _ensemble_in_flight(m)
        budget = self.memory_budget if self.memory_budget is not None else \
            self._default_budget()
        budget_name = (f"memory_budget={fb(budget)}" if self.memory_budget is not None else
                       f"the memory budget {fb(budget)} (default: {_BUDGET_FRACTION:g} of the "
                       "memory available to a worker thread)")
        bound = min(self.max_test_feature_bytes, budget // 2)
        bound_name = (f"max_test_feature_bytes={fb(self.max_test_feature_bytes)}"
                      if bound == self.max_test_feature_bytes else f"half of {budget_name}")
        d_te, xs_te = te.sample_size()
        d_tr, xs_tr = tr.sample_size()
        stored = self._stored_chunks(path, mode, te.n, tr.n, storage_options)
        notes: list[str] = []

        def source(arg: Any, which: int) -> tuple[int, str]:
            if arg is not None:
                return arg, "explicit"
            if stored is not None:
                return stored[which], "store"
            return (DEFAULT_TEST_CHUNK, DEFAULT_TRAIN_CHUNK)[which], "default"

        solve = getattr(m, "_solve_bytes", None)  # iterative solvers: their work matrices

        def solve_work(n: int) -> int:
            """Preconditioning work of ``n`` gradients beyond their ``(n, k_test)`` result."""
            if solve is None:
                return 0
            rows = min(int(getattr(m, "rhs_chunk", None) or n), n)
            return max(0, max(solve(b, n, rows) for b in m.blocks) - n * k_test * it)

        # ---- test chunk: its features within the group bound, its task within the budget
        def test_parts(tc: int) -> dict[str, int]:
            return {"test_chunk_features": tc * k_test * it,
                    "test_gradients": tc * p * it,
                    "test_transients": (2 * min(mb, tc) * p * it + tc * d_te * (xs_te + it)
                                        + solve_work(tc) + tc * fly * it)}

        def test_fits(tc: int) -> bool:
            b = test_parts(tc)
            return b["test_chunk_features"] <= bound and sum(b.values()) <= budget

        tc_arg, tc_src = source(test_chunk, 0)
        tc = _check_chunk("test_chunk", tc_arg, te.n)
        if not test_fits(tc):
            b = test_parts(tc)
            limit = _largest_fitting(te.n, test_fits)
            if tc_src == "default" and limit:
                tc0 = tc
                while not test_fits(tc):
                    tc = max(1, tc // 2)
                tc_src = "shrunk"
                notes.append(f"test_chunk shrunk from {tc0} to {tc}: the features of one test "
                             f"chunk of {tc0} ({tc0} x {k_test} x {it} B = "
                             f"{fb(tc0 * k_test * it)}) and its task "
                             f"({fb(sum(test_parts(tc0).values()))}) must fit {bound_name} "
                             f"and {budget_name}")
            else:
                over = (f"{fb(b['test_chunk_features'])} of test features ({tc} x {k_test} x "
                        f"{it} B), more than {bound_name}"
                        if b["test_chunk_features"] > bound else
                        f"about {fb(sum(b.values()))} for its task (gradients {tc} x {p} x "
                        f"{it} B = {fb(b['test_gradients'])}), more than {budget_name}")
                arg = ("the store being resumed has test_chunk" if tc_src == "store"
                       else "test_chunk")
                fit = (f"at most {limit} fits" if limit else "not even 1 test point fits")
                raise MemoryBudgetError(
                    f"{type(m).__name__}: {arg}={tc} would need {over}. Ways out: "
                    f"{self._ways_out('test_chunk')} ({fit}); or a larger "
                    "max_test_feature_bytes / memory_budget"
                    + ("; or mode='w' to recreate the store with other chunks"
                       if tc_src == "store" else "")
                )
        groups = self._groups(te.n, tc, bound)
        if len(groups) > 1:
            notes.append(f"the test features ({fb(te.n * k_test * it)}) exceed {bound_name}: "
                         f"the test set is streamed in {len(groups)} groups and every train "
                         f"gradient is computed {len(groups)} times (projection= or layers= "
                         "make the features smaller)")
        tb = _bounds(te.n, tc)
        rows = max(sum(tb[i][1] - tb[i][0] for i in g) for g in groups)
        group_features = rows * k_test * it

        # ---- train chunk: the column task within the budget
        def column_parts(rc: int) -> dict[str, int]:
            return {"group_features": group_features,
                    "train_gradients": rc * p * it,
                    "train_features": 0 if aliased else rc * k_train * it,
                    "self_influence": rc * k_test * it + solve_work(rc) if self_influence
                    else 0,
                    "tile_column": rows * rc * st + (1 + extra_tiles) * tc * rc * it,
                    "train_transients": (2 * min(mb, rc) * p * it + rc * d_tr * (xs_tr + it)
                                         + rc * fly * it)}

        def column_fits(rc: int) -> bool:
            return sum(column_parts(rc).values()) <= budget

        rc_arg, rc_src = source(train_chunk, 1)
        rc = _check_chunk("train_chunk", rc_arg, tr.n)
        if not column_fits(rc):
            b = column_parts(rc)
            limit = _largest_fitting(tr.n, column_fits)
            if rc_src == "default" and limit:
                rc0 = rc
                while not column_fits(rc):
                    rc = max(1, rc // 2)
                rc_src = "shrunk"
                notes.append(f"train_chunk shrunk from {rc0} to {rc}: a column task of {rc0} "
                             f"train points needs about {fb(sum(b.values()))}, more than "
                             f"{budget_name}")
            else:
                arg = ("the store being resumed has train_chunk" if rc_src == "store"
                       else "train_chunk")
                fit = (f"at most {limit} fits" if limit else
                       f"not even 1 train point fits next to {fb(group_features)} of test "
                       "features: lower max_test_feature_bytes")
                raise MemoryBudgetError(
                    f"{type(m).__name__}: {arg}={rc} would need about {fb(sum(b.values()))} per "
                    f"column task (gradients {rc} x {p} x {it} B = {fb(b['train_gradients'])}, "
                    f"train features {fb(b['train_features'])}, test features of a group "
                    f"{fb(group_features)}, tile column {fb(b['tile_column'])}), more than "
                    f"{budget_name}. Ways out: {self._ways_out('train_chunk')} ({fit}); or a "
                    "larger memory_budget"
                    + ("; or mode='w' to recreate the store with other chunks"
                       if rc_src == "store" else "")
                )
        parts = {**test_parts(tc), **column_parts(rc)}
        test_b, col_b = sum(test_parts(tc).values()), sum(column_parts(rc).values())
        n_groups = len(groups)
        return InfluencePlan(
            method=type(m).__name__, n_test=te.n, n_train=tr.n, p=p, k_test=k_test,
            k_train=k_train, projected=m.projector is not None, test_chunk=tc,
            train_chunk=rc, test_chunk_source=tc_src, train_chunk_source=rc_src,
            groups=n_groups, group_rows=rows, tiles=len(tb) * -(-tr.n // rc), itemsize=it,
            store_itemsize=st, feature_bound=bound, memory_budget=budget, bytes=parts,
            test_task_bytes=test_b, column_task_bytes=col_b, task_bytes=max(test_b, col_b),
            gradient_computations=te.n + n_groups * tr.n,
            preconditioning_solves=te.n + (tr.n if self_influence else 0),
            tile_multiply_adds=_grid_cost(m, tb, _bounds(tr.n, rc), int(k_train)),
            store_bytes=(te.n + int(self_influence)) * tr.n * st, notes=notes,
            test_groups=groups,
        )

    def _create_store(self, path: Any, te: _Input, tr: _Input, tc: int, rc: int,
                      *, mode: str, self_influence: bool, compressor: Any, dtype: Any,
                      test_index: Any, train_index: Any, test_names: Any = None,
                      train_names: Any = None,
                      storage_options: Mapping[str, Any] | None = None) -> InfluenceStore:
        m = self.model
        try:  # what fit measured (no data passes); informational, not matched on resume
            diagnostics = m.diagnostics(estimate=False)
        except (DvlOocError, AttributeError):
            diagnostics = None
        return InfluenceStore.create(
            path, n_test=te.n, n_train=tr.n, test_chunk=tc, train_chunk=rc,
            method=type(m).__name__, config=m.config(), fingerprint=m.fingerprint(),
            data_fingerprint=f"{te.fingerprint()}:{tr.fingerprint()}", dtype=dtype,
            test_index=test_index, train_index=train_index, test_labels=te.labels(),
            train_labels=tr.labels(), test_names=test_names, train_names=train_names,
            self_influence=self_influence, compressor=compressor, mode=mode,
            storage_options=storage_options, diagnostics=diagnostics,
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


class _DryRun(_Base):
    """The planner of :func:`dry_run_plan`: no fit needed where the widths do not depend on
    it."""

    def _check_model(self) -> None:
        if not self.model.is_fitted:
            self._feature_dims()  # refuses a model whose widths come from its fit

    def _feature_dims(self) -> tuple[int, int]:
        m = self.model
        if m.is_fitted:
            return super()._feature_dims()
        try:
            k_test, k_train = m.feature_dims()
        except NotFittedError:
            if type(m).train_features is not InfluenceModel.train_features:
                raise NotFittedError(
                    f"{type(m).__name__}: the width of its features comes from its fit; fit it "
                    "first (a few samples do: the width does not depend on how many) or plan "
                    "with a fitted model"
                ) from None
            k_test = k_train = m.grads.num_params  # features are (preconditioned) gradients
        return int(k_test), int(k_train)


def dry_run_plan(influence_model: InfluenceModel, n_test: int, n_train: int,
                 sample_shape: Sequence[int], *, memory_budget: int,
                 sample_dtype: Any = "float32", test_chunk: int | None = None,
                 train_chunk: int | None = None, dtype: Any = "float32",
                 self_influence: bool = False,
                 max_test_feature_bytes: int = _DEFAULT_MAX_TEST_BYTES) -> InfluencePlan:
    """The plan of a calculator run on ``n_test`` x ``n_train`` samples of shape
    ``sample_shape`` and dtype ``sample_dtype`` as the calculator reads them (e.g.
    ``(3, 224, 224)``, float16 for ``dvl-ooc images``), from shapes alone: the
    :class:`InfluencePlan` that :meth:`DaskInfluenceCalculator.plan
    <dvl_ooc.calculator.dask.DaskInfluenceCalculator.plan>` gives on data of these shapes with
    this ``memory_budget``, with no data (lazy Dask arrays of zeros, never computed), no
    cluster and no store.

    The model may be unfitted when its feature widths do not depend on the fit: EK-FAC (its
    layers and ``rank``) and the methods whose features are their gradients (Direct, CG,
    LiSSA, with or without ``projection=``); Arnoldi and Nystroem need a fit (any few
    samples: the width does not depend on how many).

    Args:
        memory_budget: bytes one task may use on the workers that will run the job (the Dask
            calculator's default is half of a worker's ``memory_limit / nthreads``); required
            so that the plan does not depend on this machine.
        test_chunk, train_chunk, dtype, self_influence, max_test_feature_bytes: as for the
            calculators.

    Raises:
        NotFittedError: an unfitted model whose feature width comes from its fit.
        MemoryBudgetError: as :meth:`DaskInfluenceCalculator.plan
            <dvl_ooc.calculator.dask.DaskInfluenceCalculator.plan>`.
    """
    import dask.array as da

    shape = tuple(int(s) for s in sample_shape)

    def lazy(n: int) -> tuple[Any, Any]:
        return (da.zeros((int(n), *shape), dtype=sample_dtype),
                da.zeros(int(n), dtype=np.int64))

    planner = _DryRun(influence_model, memory_budget=memory_budget,
                      max_test_feature_bytes=max_test_feature_bytes)
    return planner.plan(*lazy(n_test), *lazy(n_train), test_chunk=test_chunk,
                        train_chunk=train_chunk, dtype=dtype, self_influence=self_influence)
