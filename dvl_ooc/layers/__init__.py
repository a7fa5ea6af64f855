"""Per-layer-type machinery: capture of layer inputs and output gradients, and the operations
that the factorisation ``grad W = sum_l g_l a_l^T`` of Linear, Conv2d and Embedding layers
makes cheap (per-sample gradients, ghost products, Kronecker factors, projections)."""

from .capture import LayerCapture
from .kinds import (
    CAPTURABLE_LAYERS,
    SUPPORTED_LAYERS,
    combined_to_params,
    embedding_output_grad_matrix,
    embedding_per_sample_grads,
    layer_input_matrix,
    layer_output_grad_matrix,
)

__all__ = [
    "CAPTURABLE_LAYERS",
    "SUPPORTED_LAYERS",
    "LayerCapture",
    "combined_to_params",
    "embedding_output_grad_matrix",
    "embedding_per_sample_grads",
    "layer_input_matrix",
    "layer_output_grad_matrix",
]
