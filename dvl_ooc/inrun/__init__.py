"""In-Run Data Shapley: the tracker, its score store and the layer products it uses."""

from .kernels import (
    dot_with_param_vector,
    layer_dot_products,
    pairwise_layer_products,
    per_sample_layer_grads,
    supported_modules,
)
from .store import ScoreStore
from .tracker import InRunShapley

__all__ = [
    "InRunShapley",
    "ScoreStore",
    "dot_with_param_vector",
    "layer_dot_products",
    "pairwise_layer_products",
    "per_sample_layer_grads",
    "supported_modules",
]
