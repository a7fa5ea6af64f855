"""Data valuation by retraining: Monte-Carlo Shapley / Banzhaf as chunked Dask reductions.

Typical use (pyDVL users will recognise it)::

    from dvl_ooc.valuation import (ModelUtility, TMCShapleyValuation, RelativeTruncation,
                                   MinUpdates)
    utility = ModelUtility(LogisticRegression(), test_data=(x_test, y_test))
    valuation = TMCShapleyValuation(utility, truncation=RelativeTruncation(0.05, 0.3),
                                    is_done=MinUpdates(100), seed=0, n_workers=2)
    result = valuation.fit(x_train, y_train).result
    result.sort()[:10]            # the lowest-valued points

Layout: one module per method (:mod:`.tmc`, :mod:`.msr`, :mod:`.combinatorial`), each with
its math, its batch function (what a Dask task runs) and its class; :mod:`.base` is the driver
they share (rounds, merging, stopping, clusters) and :mod:`.tasks` what the workers run (the
job and the batch wrapper). Samplers, truncation, utilities, stopping criteria and results
have a module each; :mod:`.exact`, :mod:`.knn` and :mod:`.games` give references.
"""

from typing import TYPE_CHECKING

from .base import MonteCarloValuation
from .combinatorial import CombinatorialShapleyValuation
from .exact import exact_banzhaf, exact_shapley
from .features import MaskingUtility, heatmap, patch_groups
from .games import InteractionGame
from .knn import knn_shapley
from .msr import MSRBanzhafValuation
from .plot import plot_values
from .result import Moments, ValuationResult, ValueItem
from .samplers import (
    DeviationTruncation,
    FixedTruncation,
    MSRSampler,
    NoTruncation,
    PermutationSampler,
    RelativeTruncation,
    TruncationPolicy,
    UniformSampler,
)
from .stopping import (
    AbsoluteStandardError,
    HistoryDeviation,
    MaxChecks,
    MaxEvaluations,
    MaxTime,
    MaxUpdates,
    MinUpdates,
    RankCorrelation,
    StoppingCriterion,
)
from .tmc import TMCShapleyValuation
from .torch_utility import TorchBatchUtility
from .training import TrainingConfig
from .utility import ModelUtility

if TYPE_CHECKING:
    from .estimator import TorchEstimator

__all__ = [
    "AbsoluteStandardError",
    "CombinatorialShapleyValuation",
    "DeviationTruncation",
    "FixedTruncation",
    "HistoryDeviation",
    "InteractionGame",
    "MSRBanzhafValuation",
    "MSRSampler",
    "MaskingUtility",
    "MaxChecks",
    "MaxEvaluations",
    "MaxTime",
    "MaxUpdates",
    "MinUpdates",
    "ModelUtility",
    "MonteCarloValuation",
    "Moments",
    "NoTruncation",
    "PermutationSampler",
    "RankCorrelation",
    "RelativeTruncation",
    "StoppingCriterion",
    "TMCShapleyValuation",
    "TorchBatchUtility",
    "TorchEstimator",
    "TrainingConfig",
    "TruncationPolicy",
    "UniformSampler",
    "ValuationResult",
    "ValueItem",
    "exact_banzhaf",
    "exact_shapley",
    "heatmap",
    "knn_shapley",
    "patch_groups",
    "plot_values",
]


def __getattr__(name: str) -> object:
    # loaded on first use: importing it imports scikit-learn (about 2 s; see .estimator)
    if name == "TorchEstimator":
        from .estimator import TorchEstimator

        return TorchEstimator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
