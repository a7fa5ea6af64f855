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

    def project(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
        """``(n, k_out, k_in)``: the input rows times ``P_in^T`` (plus its bias column, no ones
        column formed), the output rows times ``P_out^T``, one ``bmm`` over the positions."""
        bias = self._projected_bias(module, P_in)
        n, d_in = a.shape[0], a.shape[-1]
        Ap = a.reshape(n, -1, d_in) @ P_in[:, :d_in].T  # (n, L, k_in)
        if bias:
            Ap = Ap + P_in[:, d_in]
        Gp = g.reshape(n, -1, g.shape[-1]) @ P_out.T  # (n, L, k_out)
        return torch.bmm(Gp.transpose(1, 2), Ap)
