"""``nn.Embedding``: the "input matrix" is the ``(n, L)`` index tensor (one-hot rows), so
products with it are gathers and scatters; positions holding ``padding_idx`` get no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ..exceptions import UnsupportedModelError
from .base import LayerKind, Method, register_kind

__all__ = ["EmbeddingKind"]


@register_kind
class EmbeddingKind(LayerKind):
    module_type = nn.Embedding
    kronecker = False

    def check(self, module: nn.Module, name: str | None = None) -> None:
        if module.max_norm is not None:
            raise self._fail(name, "nn.Embedding with max_norm renormalises its weights inside "
                                   "forward; per-sample gradients are not supported for it "
                                   "(use max_norm=None)")
        if module.scale_grad_by_freq:
            raise self._fail(name, "nn.Embedding with scale_grad_by_freq=True has "
                                   "batch-dependent gradients; per-sample gradients are not "
                                   "defined for it")

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def input_matrix(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The ``(n, L)`` integer indices."""
        self.check(module)
        return a.reshape(a.shape[0], -1)

    def masked_output_grads(self, module: nn.Module, idx: torch.Tensor,
                            g: torch.Tensor) -> torch.Tensor:
        """Output gradients ``(n, L, d)`` zeroed where ``idx == padding_idx``."""
        G = g.reshape(g.shape[0], -1, g.shape[-1])
        if module.padding_idx is not None:
            keep = idx.reshape(idx.shape[0], -1) != module.padding_idx
            G = G * keep.unsqueeze(-1).to(G.dtype)
        return G

    def rows(self, module: nn.Module, a: torch.Tensor,
             g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_matrix(module, a), self.masked_output_grads(module, a, g)

    def raw_dims(self, module: nn.Module, a: torch.Tensor,
                 g: torch.Tensor) -> tuple[int, int, int]:
        return a[0].numel(), 1, g.shape[-1]

    def to_params(self, module: nn.Module, G: torch.Tensor) -> torch.Tensor:
        return G.reshape(*G.shape[:-2], -1)

    def per_sample_grads(self, module: nn.Module, a: torch.Tensor,
                         g: torch.Tensor) -> torch.Tensor:
        """``(n, num_embeddings * d)``: a scatter of the output-gradient rows onto the looked-up
        table rows."""
        self.check(module)
        n = a.shape[0]
        I = a.reshape(n, -1)
        G = self.masked_output_grads(module, a, g)
        V, d = module.num_embeddings, G.shape[-1]
        out = torch.zeros(n * V, d, dtype=G.dtype, device=G.device)
        rows = (torch.arange(n, device=I.device).unsqueeze(1) * V + I).reshape(-1)
        out.index_add_(0, rows, G.reshape(-1, d))
        return out.reshape(n, V * d)

    def param_grads(self, module: nn.Module, a: torch.Tensor,
                    g: torch.Tensor) -> dict[str, torch.Tensor]:
        G = self.masked_output_grads(module, a, g)
        W = torch.zeros_like(module.weight)
        return {"weight": W.index_add_(0, a.reshape(-1), G.reshape(-1, G.shape[-1]))}

    def dot_with_param_vector(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                              W: dict[str, torch.Tensor]) -> torch.Tensor:
        """A gather of the table rows of ``W``."""
        G = self.masked_output_grads(module, a, g)
        return (G * W["weight"][a.reshape(a.shape[0], -1)]).sum((1, 2))

    # ------------------------------------------------------------------ projected gradients
    def projection_dims(self, module: nn.Module, bias: bool | None = None) -> tuple[int, int]:
        """``(embedding_dim, num_embeddings)``: ``P_out`` acts on the output gradient, ``P_in`` on
        the one-hot index (the projected gradient is ``P_out dW^T P_in^T``)."""
        return module.embedding_dim, module.num_embeddings

    def project(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
        """``(n, k_out, k_in)``: ``P_in`` times a one-hot index is a column gather of ``P_in``;
        padding positions contribute nothing."""
        self.check(module)
        self._projected_bias(module, P_in)
        n = a.shape[0]
        Ap = P_in.T[a.reshape(n, -1)]  # (n, L, k_in)
        Gp = self.masked_output_grads(module, a, g) @ P_out.T  # (n, L, k_out)
        return torch.bmm(Gp.transpose(1, 2), Ap)

    def from_params(self, module: nn.Module, V: torch.Tensor, bias: bool) -> torch.Tensor:
        return V.reshape(V.shape[0], module.num_embeddings, module.embedding_dim).transpose(1, 2)

    # ------------------------------------------------------------------ products
    def product_costs(self, module: nn.Module, n: int, Lt: int, m: int, Lv: int, d_in: int,
                      d_out: int, reduce: bool) -> tuple[float, float]:
        """Ghost products compare indices (``d_in = 1``); materialised products use the ``U``
        distinct rows looked up in the step."""
        ghost = n * m * Lt * Lv * (d_out + 1.0)
        u = min(module.num_embeddings, n * Lt + m * Lv)
        mat = (n * Lt + m * Lv) * d_out
        if not reduce:
            mat += (n * m + n + m) * u * d_out
        return ghost, float(mat)

    def input_products(self, A_t: torch.Tensor, A_v: torch.Tensor) -> torch.Tensor:
        c, Lt = A_t.shape[:2]
        m, Lv = A_v.shape[:2]
        return A_t.reshape(c, Lt, 1, 1) == A_v.reshape(1, 1, m, Lv)

    def product_rows(self, A_t: torch.Tensor, A_v: torch.Tensor) -> torch.Tensor:
        return torch.unique(torch.cat([A_t.reshape(-1), A_v.reshape(-1)]))

    def materialized_grads(self, module: nn.Module, A: torch.Tensor, G: torch.Tensor,
                           rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample table gradients restricted to ``rows`` (sorted), ``(n, len(rows) d)``."""
        if rows is None:
            rows = torch.unique(A)
        n, L, d = G.shape
        U = len(rows)
        pos = torch.searchsorted(rows, A.reshape(-1)).reshape(n, L)
        out = torch.zeros(n * U, d, dtype=G.dtype, device=G.device)
        out.index_add_(0, (torch.arange(n, device=G.device)[:, None] * U + pos).reshape(-1),
                       G.reshape(-1, d))
        return out.reshape(n, U * d)

    def summed_grad(self, module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        d = G.shape[-1]
        V = torch.zeros(module.num_embeddings, d, dtype=G.dtype, device=G.device)
        return V.index_add_(0, A.reshape(-1), G.reshape(-1, d))

    def reduce_with_vector(self, module: nn.Module, A: torch.Tensor, G: torch.Tensor,
                           W: torch.Tensor) -> torch.Tensor:
        return (G * W[A]).sum((1, 2))

    def pairwise_products(self, module: nn.Module, a_t: torch.Tensor, g_t: torch.Tensor,
                          a_v: torch.Tensor, g_v: torch.Tensor, *, method: Method = "auto",
                          max_elements: int = 2**24) -> torch.Tensor:
        return self.dot_products(module, *self.rows(module, a_t, g_t),
                                 *self.rows(module, a_v, g_v), method=method,
                                 max_elements=max_elements)

    # ------------------------------------------------------------------ Kronecker factors
    def _no_factors(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            "nn.Embedding has no dense Kronecker factors (its input factor is a diagonal of "
            "index counts); freeze it or use an influence model without Kronecker factors"
        )

    def factor_input_rows(self, module: nn.Module, a: torch.Tensor, *, weight: bool = True,
                          bias: bool | None = None) -> torch.Tensor:
        raise self._no_factors()

    def factor_output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        raise self._no_factors()
