"""dvl_ooc: out-of-core data attribution for PyTorch models on Dask and Zarr."""

from . import exceptions
from .exceptions import DvlOocError
from .grads import LayerCapture, ModelGradients, resolve_blocks
from .influence import DirectInfluence, InfluenceModel

__version__ = "0.1.0"

__all__ = [
    "DirectInfluence",
    "DvlOocError",
    "InfluenceModel",
    "LayerCapture",
    "ModelGradients",
    "__version__",
    "exceptions",
    "resolve_blocks",
]
