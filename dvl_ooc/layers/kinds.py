"""Per-layer-type operations: how a Linear, Conv2d or Embedding layer's per-sample weight
gradient factorises into captured layer inputs and output gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import UnsupportedModelError

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
#: layers LayerCapture can record with ``include_embeddings=True`` (the "input matrix" of an
#: embedding is its ``(n, L)`` index tensor, not activations)
CAPTURABLE_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


def _check_embedding(module: nn.Embedding) -> None:
    if module.max_norm is not None:
        raise UnsupportedModelError(
            "nn.Embedding with max_norm renormalises its weights inside forward; per-sample "
            "gradients are not supported for it (use max_norm=None)"
        )
    if module.scale_grad_by_freq:
        raise UnsupportedModelError(
            "nn.Embedding with scale_grad_by_freq=True has batch-dependent gradients; "
            "per-sample gradients are not defined for it"
        )


def embedding_output_grad_matrix(module: nn.Embedding, idx: torch.Tensor,
                                 g: torch.Tensor) -> torch.Tensor:
    """Output gradients ``(n, L, d)`` of an embedding, zeroed where ``idx == padding_idx``
    (the padding row never receives gradient)."""
    G = g.reshape(g.shape[0], -1, g.shape[-1])
    if module.padding_idx is not None:
        G = G * (idx.reshape(idx.shape[0], -1) != module.padding_idx).unsqueeze(-1).to(G.dtype)
    return G


def embedding_per_sample_grads(module: nn.Embedding, idx: torch.Tensor,
                               g: torch.Tensor) -> torch.Tensor:
    """Per-sample embedding-table gradients ``(n, num_embeddings * d)``: scatter of the output
    gradient rows onto the looked-up table rows."""
    _check_embedding(module)
    n = idx.shape[0]
    I = idx.reshape(n, -1)
    G = embedding_output_grad_matrix(module, idx, g)
    V, d = module.num_embeddings, G.shape[-1]
    out = torch.zeros(n * V, d, dtype=G.dtype, device=G.device)
    rows = (torch.arange(n, device=I.device).unsqueeze(1) * V + I).reshape(-1)
    out.index_add_(0, rows, G.reshape(-1, d))
    return out.reshape(n, V * d)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding_mode != "zeros":
        raise UnsupportedModelError(
            f"Conv2d with padding_mode={module.padding_mode!r} is not supported; use 'zeros'"
        )
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        k, d = module.kernel_size, module.dilation
        if any((d[i] * (k[i] - 1)) % 2 for i in range(2)):
            raise UnsupportedModelError(
                "padding='same' with an even receptive field is not supported"
            )
        return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    return tuple(pad)  # type: ignore[return-value]


def layer_input_matrix(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(n, L, d_in [+1])`` rows whose outer products with output gradients give
    the per-sample weight gradient; a trailing column of ones stands for the bias.

    For ``nn.Embedding`` the result is the ``(n, L)`` integer index tensor."""
    if isinstance(module, nn.Embedding):
        _check_embedding(module)
        return a.reshape(a.shape[0], -1)
    if isinstance(module, nn.Linear):
        A = a.reshape(a.shape[0], -1, a.shape[-1])
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UnsupportedModelError("Conv2d with groups > 1 is not supported")
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation,
                        padding=_conv_padding(module), stride=module.stride)
        A = cols.transpose(1, 2)
    else:
        raise UnsupportedModelError(
            f"layer capture supports nn.Linear and nn.Conv2d, not {type(module).__name__}"
        )
    if getattr(module, "bias", None) is not None:
        A = torch.cat([A, torch.ones_like(A[..., :1])], dim=-1)
    return A


def layer_output_grad_matrix(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(n, L, d_out)`` rows matching :func:`layer_input_matrix`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return g.reshape(g.shape[0], -1, g.shape[-1])
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    raise UnsupportedModelError(
        f"layer capture supports nn.Linear and nn.Conv2d, not {type(module).__name__}"
    )


def combined_to_params(module: nn.Module, G: torch.Tensor) -> torch.Tensor:
    """Map combined ``(..., d_out, d_in [+1])`` gradients to the flat order (weight, bias)."""
    has_bias = getattr(module, "bias", None) is not None
    lead = G.shape[:-2]
    if has_bias:
        w, b = G[..., :-1], G[..., -1]
        return torch.cat([w.reshape(*lead, -1), b.reshape(*lead, -1)], dim=-1)
    return G.reshape(*lead, -1)


