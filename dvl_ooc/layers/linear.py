"""``nn.Linear``: inputs ``(n, d_in)`` or sequences ``(n, T, d_in)``; ``L`` = positions."""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerKind, register_kind

__all__ = ["LinearKind"]


@register_kind
class LinearKind(LayerKind):
    """Per-sample gradient ``G_i^T A_i``: one batched matrix product."""

    module_type = nn.Linear

    def input_matrix(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        A = a.reshape(a.shape[0], -1, a.shape[-1])
        if self.has_bias(module):
            A = torch.cat([A, torch.ones_like(A[..., :1])], dim=-1)
        return A

    def per_sample_grads(self, module: nn.Module, a: torch.Tensor,
                         g: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        A = a.reshape(n, -1, a.shape[-1])
        G = g.reshape(n, -1, g.shape[-1])
        parts = [torch.bmm(G.transpose(1, 2), A).reshape(n, -1)]
        if module.bias is not None:
            parts.append(G.sum(1))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def param_grads(self, module: nn.Module, a: torch.Tensor,
                    g: torch.Tensor) -> dict[str, torch.Tensor]:
        G = g.reshape(-1, g.shape[-1])
        out = {"weight": G.T @ a.reshape(-1, a.shape[-1])}
        if module.bias is not None:
            out["bias"] = G.sum(0)
        return out

    def dot_with_param_vector(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                              W: dict[str, torch.Tensor]) -> torch.Tensor:
        n = a.shape[0]
        Ww, Wb = W["weight"], W.get("bias")
        A = a.reshape(n, -1, a.shape[-1])
        G = g.reshape(n, -1, g.shape[-1])
        s = ((A @ Ww.T) * G).sum((1, 2))
        if Wb is not None:
            s = s + G.sum(1) @ Wb
        return s
