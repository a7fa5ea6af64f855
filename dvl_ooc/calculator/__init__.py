"""Calculators: tile the test x train influence matrix and compute it in memory or into a store.

Every influence model splits the influence matrix into two feature maps,

    I[t, r] = < test_features(g_t), train_features(g_r) >,   g = per-sample loss gradient,

(default: ``test_features = (H + lambda I)^{-1} g`` of dimension p and ``train_features = g``;
low-rank methods return k-dimensional features, k << p). The calculators cut the matrix into
tiles, each ONE matrix product written to exactly one Zarr chunk, and compute only the missing
ones (resumable stores, see :mod:`dvl_ooc.store`).

Modules, in the order a tile is made:

* :mod:`~dvl_ooc.calculator.inputs` - input adapters (NumPy, torch, Dask, Zarr, Dataset);
* :mod:`~dvl_ooc.calculator.plan` - chunk bounds, test groups under the feature-memory bound,
  the per-task memory estimate and chunk choice (:class:`InfluencePlan`, returned by a
  calculator's ``plan(...)`` before anything is computed), store creation (write modes), the
  todo list; the cost model;
* :mod:`~dvl_ooc.calculator.tasks` - worker-side task bodies and the prepared-model cache;
* :mod:`~dvl_ooc.calculator.sequential` - :class:`SequentialInfluenceCalculator` (in process);
* :mod:`~dvl_ooc.calculator.dask` - :class:`DaskInfluenceCalculator` (any Dask cluster).
"""

from .dask import DaskInfluenceCalculator
from .plan import InfluencePlan
from .sequential import SequentialInfluenceCalculator

__all__ = ["DaskInfluenceCalculator", "InfluencePlan", "SequentialInfluenceCalculator"]
