"""The registry's public face: the registered kinds, and module-level functions that dispatch
to the kind of their module (:func:`~dvl_ooc.layers.base.kind_of`).

Shapes: ``a`` and ``g`` are raw captured rows (layer input; per-sample output gradient),
``A``/``G`` the row matrices ``(n, L, d_in [+1])`` / ``(n, L, d_out)`` (embedding: ``A`` is the
``(n, L)`` index tensor and ``G`` has padding positions zeroed). See :mod:`dvl_ooc.layers.base`
for the factorisation and the cost of each product.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LAYER_KINDS, LayerKind, Method, kind_of, register_kind

# importing a kind registers it; this order is the order in messages
# isort: off
from .linear import LinearKind
from .conv2d import Conv2dKind
from .embedding import EmbeddingKind

# isort: on

__all__ = [
    "CAPTURABLE_LAYERS",
    "LAYER_KINDS",
    "SUPPORTED_LAYERS",
    "Conv2dKind",
    "EmbeddingKind",
    "LayerKind",
    "LinearKind",
    "Method",
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
]

#: layer types with dense Kronecker factors (LayerCapture's default, EK-FAC)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t for t, k in LAYER_KINDS.items() if k.kronecker)
#: every registered layer type (LayerCapture with ``include_embeddings=True``, In-Run)
CAPTURABLE_LAYERS: tuple[type[nn.Module], ...] = tuple(LAYER_KINDS)


def layer_input_matrix(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(n, L, d_in [+1])`` rows whose outer products with output gradients give
    the per-sample weight gradient; a trailing column of ones stands for the bias.

    For ``nn.Embedding`` the result is the ``(n, L)`` integer index tensor."""
    return kind_of(module).input_matrix(module, a)


def layer_output_grad_matrix(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(n, L, d_out)`` rows matching :func:`layer_input_matrix`."""
    return kind_of(module).output_grad_matrix(module, g)


def combined_to_params(module: nn.Module, G: torch.Tensor) -> torch.Tensor:
    """Map combined ``(..., d_out, d_in [+1])`` gradients to the flat order (weight, bias)."""
    return kind_of(module).to_params(module, G)


def embedding_output_grad_matrix(module: nn.Embedding, idx: torch.Tensor,
                                 g: torch.Tensor) -> torch.Tensor:
    """Output gradients ``(n, L, d)`` of an embedding, zeroed where ``idx == padding_idx``
    (the padding row never receives gradient)."""
    return EmbeddingKind().masked_output_grads(module, idx, g)


def embedding_per_sample_grads(module: nn.Embedding, idx: torch.Tensor,
                               g: torch.Tensor) -> torch.Tensor:
    """Per-sample embedding-table gradients ``(n, num_embeddings * d)``."""
    return EmbeddingKind().per_sample_grads(module, idx, g)


def per_sample_layer_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(n, p_layer)`` gradients (weight, then bias) of a layer from its raw input and
    output-gradient rows (Conv2d on CPU: a grouped-convolution kernel, no ``im2col``)."""
    return kind_of(module).per_sample_grads(module, a, g)


def layer_param_grads(module: nn.Module, a: torch.Tensor,
                      g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed parameter gradients ``{"weight", "bias"}`` of a layer from its raw rows."""
    return kind_of(module).param_grads(module, a, g)


def dot_with_param_vector(module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                          W: dict[str, torch.Tensor]) -> torch.Tensor:
    """``<per-sample gradient of row i, W>`` for every row, without unfolding.

    ``a`` is the layer input and ``g`` the per-sample output gradient (raw shapes), ``W`` a
    parameter-shaped vector ``{"weight": ..., "bias": ...}``. It is the directional derivative
    ``sum_l g_il . (W a_il)``: for ``Conv2d`` a convolution of the inputs with ``W`` (no
    ``im2col``), for ``Linear`` a matrix product, for ``Embedding`` a gather. Cost: one forward.
    """
    return kind_of(module).dot_with_param_vector(module, a, g, W)


def layer_dot_products(module: nn.Module, A_t: torch.Tensor, G_t: torch.Tensor,
                       A_v: torch.Tensor, G_v: torch.Tensor, *, reduce: bool = False,
                       method: Method = "auto", max_elements: int = 2**24) -> torch.Tensor:
    """Train x validation per-sample gradient dot products of one layer.

    Args:
        module: the ``Linear``/``Conv2d``/``Embedding`` layer.
        A_t, G_t: train rows from :func:`layer_input_matrix` (embedding: the ``(n, L)``
            indices) and the per-sample output gradients ``(n, L, d_out)`` (embedding: padding
            positions zeroed, :func:`embedding_output_grad_matrix`).
        A_v, G_v: the same for the validation rows.
        reduce: return the row sums ``(n,)`` (summed validation loss) instead of ``(n, m)``.
        method: ``"ghost"``, ``"materialize"`` or ``"auto"`` (cheaper by the kind's cost model).
        max_elements: bound on temporary ``(chunk, L, m, L)`` tensors.
    """
    return kind_of(module).dot_products(module, A_t, G_t, A_v, G_v, reduce=reduce,
                                        method=method, max_elements=max_elements)


def pairwise_layer_products(module: nn.Module, a_t: torch.Tensor, g_t: torch.Tensor,
                            a_v: torch.Tensor, g_v: torch.Tensor, *, method: Method = "auto",
                            max_elements: int = 2**24) -> torch.Tensor:
    """Train x validation per-sample gradient dot products ``(n, m)`` of one layer from its raw
    rows (layer inputs and output gradients as captured), by the cheaper of ghost and
    materialised products (or ``method``). Materialised products of ``Linear``/``Conv2d``
    layers use :func:`per_sample_layer_grads`; train rows are processed in chunks so that
    temporaries stay below ``max_elements``."""
    return kind_of(module).pairwise_products(module, a_t, g_t, a_v, g_v, method=method,
                                             max_elements=max_elements)
