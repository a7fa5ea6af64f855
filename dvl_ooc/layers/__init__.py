"""Per-layer-type machinery: capture of layer inputs and output gradients, and the operations
that the factorisation ``grad W = sum_l g_l a_l^T`` of Linear, Conv2d and Embedding layers
makes cheap (per-sample gradients, ghost products, directional derivatives, Kronecker-factor
rows, projected gradients), owned by one :class:`LayerKind` per layer type
(:data:`LAYER_KINDS`, :func:`kind_of`); :class:`GradientProjector` turns the projected
gradients into ``(n, k)`` features.
"""

from .base import LAYER_KINDS, LayerKind, kind_of, register_kind
from .capture import LayerCapture
from .kinds import (
    CAPTURABLE_LAYERS,
    SUPPORTED_LAYERS,
    Conv2dKind,
    EmbeddingKind,
    LinearKind,
    combined_to_params,
    dot_with_param_vector,
    embedding_output_grad_matrix,
    embedding_per_sample_grads,
    layer_dot_products,
    layer_input_matrix,
    layer_output_grad_matrix,
    layer_param_grads,
    pairwise_layer_products,
    per_sample_layer_grads,
)
from .projection import GradientProjector, ProjectionBlock
from .selection import supported_modules

__all__ = [
    "CAPTURABLE_LAYERS",
    "LAYER_KINDS",
    "SUPPORTED_LAYERS",
    "Conv2dKind",
    "EmbeddingKind",
    "GradientProjector",
    "LayerCapture",
    "LayerKind",
    "LinearKind",
    "ProjectionBlock",
    "combined_to_params",
    "dot_with_param_vector",
    "embedding_output_grad_matrix",
    "embedding_per_sample_grads",
    "kind_of",
    "layer_dot_products",
    "layer_input_matrix",
    "layer_output_grad_matrix",
    "layer_param_grads",
    "pairwise_layer_products",
    "per_sample_layer_grads",
    "register_kind",
    "supported_modules",
]
