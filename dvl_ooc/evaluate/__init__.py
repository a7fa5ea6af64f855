"""Evaluation of attributions against retraining: the linear datamodeling score and friends.

Typical use::

    from dvl_ooc.evaluate import TorchRetrainer, ground_truth, lds
    retrainer = TorchRetrainer(net, (x_train, y_train), (x_test, y_test), config=cfg)
    gt = ground_truth(retrainer, "gt.zarr", n_subsets=100, n_seeds=3, n_workers=2)
    result = lds("influences.zarr", gt.masks, gt.targets, kind=gt.kind)   # or gt.lds(...)
    print(result)          # mean [95 % interval] (noise ceiling; valid test points)

Modules: :mod:`.metrics` (LDS, noise ceiling, leave-one-out correlation: NumPy/SciPy only),
:mod:`.retrain` (:class:`TorchRetrainer`: subsets -> per-test targets, stacked or one model at
a time), :mod:`.groundtruth` (the resumable Dask job and its Zarr store; not named
``ground_truth``, which would clash with the function of that name in this namespace). Names
resolve on first access, so ``import dvl_ooc.evaluate`` loads neither torch nor zarr nor
distributed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

#: public name -> submodule defining it (imported on first access, PEP 562)
_LAZY = {
    "CeilingResult": "metrics", "LdsResult": "metrics", "lds": "metrics",
    "loo_correlation": "metrics", "loo_deltas": "metrics", "loo_masks": "metrics",
    "noise_ceiling": "metrics", "TorchRetrainer": "retrain", "model_targets": "retrain",
    "reinitialised": "retrain", "GroundTruth": "groundtruth", "draw_masks": "groundtruth",
    "ground_truth": "groundtruth",
}

if TYPE_CHECKING:
    from .groundtruth import GroundTruth, draw_masks, ground_truth
    from .metrics import (
        CeilingResult,
        LdsResult,
        lds,
        loo_correlation,
        loo_deltas,
        loo_masks,
        noise_ceiling,
    )
    from .retrain import TorchRetrainer, model_targets, reinitialised

__all__ = [
    "CeilingResult",
    "GroundTruth",
    "LdsResult",
    "TorchRetrainer",
    "draw_masks",
    "ground_truth",
    "lds",
    "loo_correlation",
    "loo_deltas",
    "loo_masks",
    "model_targets",
    "noise_ceiling",
    "reinitialised",
]


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        for other, where in _LAZY.items():  # every name of that module at once
            if where == _LAZY[name]:
                globals()[other] = getattr(module, other)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
