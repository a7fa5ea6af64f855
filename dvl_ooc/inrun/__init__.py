"""In-Run Data Shapley: the tracker and its score store. The layer products it uses belong to
the per-layer registry (:mod:`dvl_ooc.layers`) and are re-exported here."""

from ..layers import (
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
