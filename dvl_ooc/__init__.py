"""dvl_ooc: out-of-core data attribution for PyTorch models on Dask and Zarr."""

from . import exceptions, valuation
from .calculator import DaskInfluenceCalculator, SequentialInfluenceCalculator
from .data import IndexedDataset
from .exceptions import DvlOocError
from .grads import LayerCapture, ModelGradients, resolve_blocks
from .imagefolder import ImageFolder
from .influence import DirectInfluence, InfluenceModel
from .influence.arnoldi import ArnoldiInfluence
from .influence.cg import CgInfluence
from .influence.ekfac import EkfacInfluence
from .influence.lissa import LissaInfluence
from .influence.nystroem import NystroemSketchInfluence
from .inrun import InRunShapley
from .query import query_mean, query_quantiles, query_self_influence, query_topk
from .store import InfluenceStore
from .tracin import TracInCP

__version__ = "0.1.0"

__all__ = [
    "ArnoldiInfluence",
    "CgInfluence",
    "DaskInfluenceCalculator",
    "DirectInfluence",
    "DvlOocError",
    "EkfacInfluence",
    "InfluenceModel",
    "InfluenceStore",
    "LayerCapture",
    "LissaInfluence",
    "ModelGradients",
    "NystroemSketchInfluence",
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
