"""Functional per-sample gradients and curvature products, organised by parameter blocks."""

from typing import Any

from .functional import (
    MODEL_LOCK,
    HessianMode,
    LossFn,
    ModelGradients,
    ParamBlock,
    output_hessian_factors,
    resolve_blocks,
)
from .projected import ProjectedGradients

__all__ = ["MODEL_LOCK", "HessianMode", "LossFn", "ModelGradients", "ParamBlock",
           "ProjectedGradients", "output_hessian_factors", "resolve_blocks"]

#: layer-capture names that lived here before the per-layer registry (``dvl_ooc.layers``)
_MOVED_TO_LAYERS = ("LayerCapture", "layer_input_matrix", "layer_output_grad_matrix",
                    "combined_to_params", "SUPPORTED_LAYERS", "CAPTURABLE_LAYERS")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LAYERS:
        import warnings

        from .. import layers

        warnings.warn(f"dvl_ooc.grads.{name} moved to dvl_ooc.layers.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(layers, name)
    raise AttributeError(f"module 'dvl_ooc.grads' has no attribute {name!r}")
