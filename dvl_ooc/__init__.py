"""dvl_ooc: out-of-core data attribution for PyTorch models on Dask and Zarr."""

from . import exceptions, valuation
from ._compat import install_module_aliases
from .calculator import DaskInfluenceCalculator, InfluencePlan, SequentialInfluenceCalculator
from .data import ImageFolder, IndexedDataset
from .exceptions import DvlOocError
from .grads import ModelGradients, resolve_blocks
from .influence import DirectInfluence, InfluenceModel, Relative
from .influence.arnoldi import ArnoldiInfluence
from .influence.cg import CgInfluence
from .influence.ekfac import EkfacInfluence
from .influence.lissa import LissaInfluence
from .influence.nystroem import NystroemSketchInfluence
from .influence.tracin import TracInCP
from .inrun import InRunShapley
from .layers import GradientProjector, LayerCapture
from .query import query_mean, query_quantiles, query_self_influence, query_topk
from .store import InfluenceStore

__version__ = "0.1.0"

install_module_aliases()

__all__ = [
    "ArnoldiInfluence",
    "CgInfluence",
    "DaskInfluenceCalculator",
    "DirectInfluence",
    "DvlOocError",
    "EkfacInfluence",
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
    "exceptions",
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
