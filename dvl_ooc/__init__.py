"""dvl_ooc: out-of-core data attribution for PyTorch models on Dask and Zarr."""

from typing import TYPE_CHECKING

from . import exceptions
from ._compat import install_module_aliases
from .exceptions import DvlOocError

#: public name -> module that defines it, imported on first access (PEP 562): ``import
#: dvl_ooc`` stays cheap for the CLI and for Dask workers, which need only a few submodules
#: (torch, scikit-learn, zarr, xarray and distributed together take several seconds to import)
_LAZY = {
    "DaskInfluenceCalculator": "calculator", "InfluencePlan": "calculator",
    "SequentialInfluenceCalculator": "calculator", "ImageFolder": "data",
    "IndexedDataset": "data", "ModelGradients": "grads", "resolve_blocks": "grads",
    "DirectInfluence": "influence", "InfluenceModel": "influence", "Relative": "influence",
    "ArnoldiInfluence": "influence.arnoldi", "CgInfluence": "influence.cg",
    "EkfacInfluence": "influence.ekfac", "Ensemble": "influence.ensemble",
    "LissaInfluence": "influence.lissa",
    "NystroemSketchInfluence": "influence.nystroem", "TracInCP": "influence.tracin",
    "InRunShapley": "inrun", "GradientProjector": "layers", "LayerCapture": "layers",
    "query_mean": "query", "query_quantiles": "query", "query_self_influence": "query",
    "query_topk": "query", "InfluenceStore": "store", "FitConfig": "training",
    "fit_network": "training",
}

if TYPE_CHECKING:
    from . import evaluate, valuation
    from .calculator import DaskInfluenceCalculator, InfluencePlan, SequentialInfluenceCalculator
    from .data import ImageFolder, IndexedDataset
    from .grads import ModelGradients, resolve_blocks
    from .influence import DirectInfluence, InfluenceModel, Relative
    from .influence.arnoldi import ArnoldiInfluence
    from .influence.cg import CgInfluence
    from .influence.ekfac import EkfacInfluence
    from .influence.ensemble import Ensemble
    from .influence.lissa import LissaInfluence
    from .influence.nystroem import NystroemSketchInfluence
    from .influence.tracin import TracInCP
    from .inrun import InRunShapley
    from .layers import GradientProjector, LayerCapture
    from .query import query_mean, query_quantiles, query_self_influence, query_topk
    from .store import InfluenceStore
    from .training import FitConfig, fit_network

__version__ = "0.1.0"

install_module_aliases()

__all__ = [
    "ArnoldiInfluence",
    "CgInfluence",
    "DaskInfluenceCalculator",
    "DirectInfluence",
    "DvlOocError",
    "EkfacInfluence",
    "Ensemble",
    "FitConfig",
    "GradientProjector",
    "InfluenceModel",
    "InfluencePlan",
    "InfluenceStore",
    "LayerCapture",
    "LissaInfluence",
    "ModelGradients",
    "NystroemSketchInfluence",
    "Relative",
    "SequentialInfluenceCalculator",
    "__version__",
    "evaluate",
    "exceptions",
    "fit_network",
    "resolve_blocks",
    "ImageFolder",
    "InRunShapley",
    "IndexedDataset",
    "TracInCP",
    "query_mean",
    "query_quantiles",
    "query_self_influence",
    "query_topk",
    "valuation",
]


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in ("evaluate", "valuation"):  # subpackages, loaded on first access
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
