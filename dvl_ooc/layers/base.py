"""The per-layer-type registry: one :class:`LayerKind` per supported module type.

Algorithm. For a ``Linear`` (inputs ``(n, d_in)`` or sequences ``(n, T, d_in)``), ``Conv2d``
(unfolded patches) or ``Embedding`` layer the per-sample weight gradient of sample ``i`` is::

    grad W_i = G_i^T A_i = sum_l g_il a_il^T

with ``A_i`` the ``(L, d_in [+1 for the bias])`` layer-input rows ("input matrix") and ``G_i``
the ``(L, d_out)`` output-gradient rows at the ``L`` positions (1, time steps, or output pixels).
For an embedding, ``a_il`` is the one-hot vector of the looked-up index, so the input matrix is
the ``(n, L)`` index tensor and products with it are gathers / scatters. Everything a method
needs from a layer follows from this factorisation, and each kind implements it once:

* ``per_sample_grads``: ``(n, p_layer)`` gradients in the flat (weight, bias) order;
* ghost products ``<G_i^T A_i, G_j^T A_j> = sum_{l,l'} (a_il . a_jl') (g_il . g_jl')``
  (embedding: ``[idx_il == idx_jl']`` for ``a_il . a_jl'``), cost ``n m L_t L_v (d_in + d_out)``;
  materialised products, cost ``(n L_t + m L_v) d_in d_out`` (+ ``n m d_in d_out``);
* the directional derivative ``<grad W_i, V> = sum_l g_il . (V a_il)`` (one forward's cost);
* the Kronecker-factor rows of EK-FAC (input rows with a ones column for the bias, output rows);
* projected gradients ``P_out (G_i^T A_i) P_in^T = sum_l (P_out g_il)(P_in a_il)^T`` of size
  ``k_out x k_in`` (the LoGra idea: project both factors, then one small product over the
  positions), cost ``2 L (k_in d_in + k_out d_out + k_in k_out)`` per sample, temporaries
  ``L (k_in + k_out)`` per sample; the per-sample gradient is never formed
  (:class:`~dvl_ooc.layers.projection.GradientProjector` builds features from them).

A kind is stateless: every method takes the module. :func:`kind_of` finds the kind of a module
(through its type's MRO, so subclasses of ``nn.Linear`` are Linear layers); a new layer type is
one subclass registered with :func:`register_kind`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from ..exceptions import InputError, UnsupportedModelError

__all__ = ["LAYER_KINDS", "LayerKind", "Method", "kind_of", "register_kind"]

Method = Literal["auto", "ghost", "materialize"]


def _row_chunk(n: int, per_row: int, max_elements: int) -> int:
    return max(1, min(n, max_elements // max(per_row, 1)))


def check_method(method: str) -> None:
    if method not in ("auto", "ghost", "materialize"):
        raise InputError(f"method must be 'auto', 'ghost' or 'materialize', got {method!r}")


class LayerKind:
    """Operations of one layer type on its captured rows.

    Raw rows are what :class:`~dvl_ooc.layers.LayerCapture` records: the layer input ``a``
    (``(n, ..., d_in)``, ``(n, C, H, W)`` or integer indices ``(n, ...)``) and the per-sample
    output gradient ``g`` (the gradient of the *sum* of per-sample losses w.r.t. the output).
    Row matrices are ``A = input_matrix(a)``, ``(n, L, d_in [+1])``, and
    ``G = output_grad_matrix(g)``, ``(n, L, d_out)``.
    """

    #: the module type this kind handles (subclasses included)
    module_type: ClassVar[type[nn.Module]]
    #: whether the layer has dense Kronecker factors ``E[a a^T]``, ``E[g g^T]`` (EK-FAC)
    kronecker: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return f"nn.{self.module_type.__name__}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------------ checks and shapes
    def check(self, module: nn.Module, name: str | None = None) -> None:
        """Raise :class:`UnsupportedModelError` for options per-sample gradients cannot handle
        (``name``: the module name, for the message)."""

    def _fail(self, name: str | None, what: str) -> UnsupportedModelError:
        where = f"layer {name!r}: " if name is not None else ""
        return UnsupportedModelError(where + what)

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "bias", None) is not None

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight as a matrix (Conv2d: ``d_in = C_in k_h k_w``)."""
        w = module.weight
        return w.shape[0], w[0].numel()

    def input_matrix(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """Input rows ``(n, L, d_in [+1])``, a trailing column of ones standing for the bias."""
        raise NotImplementedError

    def output_grad_matrix(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Output-gradient rows ``(n, L, d_out)`` matching :meth:`input_matrix`."""
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def rows(self, module: nn.Module, a: torch.Tensor,
             g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` row matrices of :meth:`dot_products` from raw rows."""
        return self.input_matrix(module, a), self.output_grad_matrix(module, g)

    def raw_dims(self, module: nn.Module, a: torch.Tensor,
                 g: torch.Tensor) -> tuple[int, int, int]:
        """``(L, d_in [+1 for the bias], d_out)`` from raw rows (without unfolding)."""
        return a[0].numel() // a.shape[-1], a.shape[-1] + int(self.has_bias(module)), g.shape[-1]

    def to_params(self, module: nn.Module, G: torch.Tensor) -> torch.Tensor:
        """Combined ``(..., d_out, d_in [+1])`` gradients -> flat ``(..., p)`` (weight, bias)."""
        lead = G.shape[:-2]
        if self.has_bias(module):
            w, b = G[..., :-1], G[..., -1]
            return torch.cat([w.reshape(*lead, -1), b.reshape(*lead, -1)], dim=-1)
        return G.reshape(*lead, -1)

    # ------------------------------------------------------------------ gradients
    def per_sample_grads(self, module: nn.Module, a: torch.Tensor,
                         g: torch.Tensor) -> torch.Tensor:
        """Per-sample ``(n, p_layer)`` gradients (weight, then bias) from raw rows."""
        raise NotImplementedError

    def param_grads(self, module: nn.Module, a: torch.Tensor,
                    g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradients ``{"weight", "bias"}`` of the summed loss, shaped like the parameters."""
        raise NotImplementedError

    def dot_with_param_vector(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                              W: dict[str, torch.Tensor]) -> torch.Tensor:
        """``<per-sample gradient of row i, W>`` for every row ``(n,)``: the directional
        derivative ``sum_l g_il . (W a_il)``; ``W = {"weight": ..., "bias": ...}``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ projected gradients
    def projection_dims(self, module: nn.Module, bias: bool | None = None) -> tuple[int, int]:
        """``(d_out, d_in [+1])``: the sides ``P_out`` and ``P_in`` of :meth:`project` act on
        (``bias``: count the ones column of the bias; default: whether the layer has one).
        For Linear/Conv2d the gradient's matrix form ``(d_out, d_in)``; for an embedding
        ``(embedding_dim, num_embeddings)`` (the table's gradient transposed)."""
        d_out, d_in = self.weight_dims(module)
        if bias is None:
            bias = self.has_bias(module)
        return d_out, d_in + int(bool(bias))

    def _projected_bias(self, module: nn.Module, P_in: torch.Tensor, name: str = "P_in") -> bool:
        """Whether ``P_in`` has the bias column (its width is ``d_in + 1``)."""
        d_in = self.projection_dims(module, bias=False)[1]
        width = P_in.shape[-1]
        if width == d_in:
            return False
        if width == d_in + 1 and self.has_bias(module):
            return True
        raise InputError(f"{name} has {width} columns; this {self.name} layer needs {d_in}"
                         + (f" (or {d_in + 1} with the bias)" if self.has_bias(module) else ""))

    def project(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
        """Projected per-sample gradients ``P_out (G_i^T A_i) P_in^T = sum_l (P_out g_il)
        (P_in a_il)^T``, ``(n, k_out, k_in)``, from raw rows without forming a per-sample
        gradient.

        ``P_in`` is ``(k_in, d_in)`` or ``(k_in, d_in + 1)``, the last column then standing for
        the bias (the bias gradient is projected with the weight gradient); ``P_out`` is
        ``(k_out, d_out)`` (:meth:`projection_dims`). Both must have the dtype of ``g``.
        Cost per sample: ``2 L (k_in d_in + k_out d_out + k_in k_out)`` FLOPs and
        ``L (k_in + k_out)`` elements of temporaries. This default forms the input matrix;
        kinds override it to avoid that (Conv2d: no unfolding)."""
        bias = self._projected_bias(module, P_in)
        A, G = self.rows(module, a, g)
        if self.has_bias(module) and not bias:
            A = A[..., :-1]
        return torch.bmm((G @ P_out.T).transpose(1, 2), A @ P_in.T)

    def from_params(self, module: nn.Module, V: torch.Tensor, bias: bool) -> torch.Tensor:
        """Flat ``(m, p)`` parameter vectors (weight, then the bias if ``bias``) -> ``(m, d_out,
        d_in [+1])`` matrices in the orientation of :meth:`project`."""
        d_out, d_in = self.projection_dims(module, bias=False)
        m = V.shape[0]
        W = V[:, : d_out * d_in].reshape(m, d_out, d_in)
        if bias:
            W = torch.cat([W, V[:, d_out * d_in :].reshape(m, d_out, 1)], dim=2)
        return W

    def project_vectors(self, module: nn.Module, V: torch.Tensor, P_in: torch.Tensor,
                        P_out: torch.Tensor) -> torch.Tensor:
        """The projection of :meth:`project` applied to ordinary parameter vectors: ``P_out M
        P_in^T`` for flat ``(m, p)`` vectors (weight, then bias when ``P_in`` has the bias
        column), ``(m, k_out, k_in)``. ``project(a, g)`` equals this applied to the explicit
        per-sample gradients."""
        bias = self._projected_bias(module, P_in)
        M = self.from_params(module, V, bias)
        return P_out @ M @ P_in.T

    # ------------------------------------------------------------------ products of row matrices
    def product_costs(self, module: nn.Module, n: int, Lt: int, m: int, Lv: int, d_in: int,
                      d_out: int, reduce: bool) -> tuple[float, float]:
        """FLOPs of ``(ghost, materialised)`` products of ``n`` train and ``m`` validation rows
        (``reduce``: only the row sums over the validation rows are needed)."""
        ghost = n * m * Lt * Lv * (d_in + d_out + 1.0)
        mat = (n * Lt + m * Lv) * d_in * d_out + (0 if reduce else n * m * d_in * d_out)
        return ghost, float(mat)

    def row_costs(self, module: nn.Module, A_t: torch.Tensor, G_t: torch.Tensor,
                  A_v: torch.Tensor, G_v: torch.Tensor, reduce: bool) -> tuple[float, float]:
        """:meth:`product_costs` from row matrices."""
        return self.product_costs(module, G_t.shape[0], G_t.shape[1], G_v.shape[0],
                                  G_v.shape[1], A_t.shape[-1], G_t.shape[-1], reduce)

    def input_products(self, A_t: torch.Tensor, A_v: torch.Tensor) -> torch.Tensor:
        """``a_il . a_jl'`` for all pairs, ``(c, L_t, m, L_v)``."""
        c, Lt = A_t.shape[:2]
        m, Lv = A_v.shape[:2]
        return (A_t.reshape(c * Lt, -1) @ A_v.reshape(m * Lv, -1).T).reshape(c, Lt, m, Lv)

    def ghost_products(self, module: nn.Module, A_t: torch.Tensor, G_t: torch.Tensor,
                       A_v: torch.Tensor, G_v: torch.Tensor,
                       max_elements: int = 2**24) -> torch.Tensor:
        """``(n, m)`` per-sample gradient dot products without forming any gradient, in chunks
        of train rows whose ``(chunk, L_t, m, L_v)`` temporaries stay below ``max_elements``."""
        n, Lt = G_t.shape[:2]
        m, Lv = G_v.shape[:2]
        out = torch.empty(n, m, dtype=G_t.dtype, device=G_t.device)
        step = _row_chunk(n, Lt * m * Lv, max_elements)
        Gv = G_v.reshape(m * Lv, -1)
        for s in range(0, n, step):
            g = G_t[s : s + step]
            c = len(g)
            GG = (g.reshape(c * Lt, -1) @ Gv.T).reshape(c, Lt, m, Lv)
            out[s : s + c] = (GG * self.input_products(A_t[s : s + step], A_v)).sum((1, 3))
        return out

    def product_rows(self, A_t: torch.Tensor, A_v: torch.Tensor) -> torch.Tensor | None:
        """What :meth:`materialized_grads` restricts to (embedding: the looked-up rows)."""
        return None

    def materialized_grads(self, module: nn.Module, A: torch.Tensor, G: torch.Tensor,
                           rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample gradients ``(n, d_out * d_in)`` from row matrices (combined layout)."""
        return torch.bmm(G.transpose(1, 2), A).reshape(len(G), -1)

    def summed_grad(self, module: nn.Module, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """``sum_i G_i^T A_i`` as a ``(d_out, d_in [+1])`` matrix (embedding: the table)."""
        return G.reshape(-1, G.shape[-1]).T @ A.reshape(-1, A.shape[-1])

    def reduce_with_vector(self, module: nn.Module, A: torch.Tensor, G: torch.Tensor,
                           W: torch.Tensor) -> torch.Tensor:
        """``<G_i^T A_i, W>`` for every row, ``W`` in the layout of :meth:`summed_grad`."""
        return ((A @ W.T) * G).sum((1, 2))

    def dot_products(self, module: nn.Module, A_t: torch.Tensor, G_t: torch.Tensor,
                     A_v: torch.Tensor, G_v: torch.Tensor, *, reduce: bool = False,
                     method: Method = "auto", max_elements: int = 2**24) -> torch.Tensor:
        """Train x validation per-sample gradient dot products ``(n, m)`` (``reduce``: their row
        sums ``(n,)``) from row matrices, by ghost or materialised products (``"auto"``: the
        cheaper by :meth:`product_costs`)."""
        check_method(method)
        if method == "auto":
            ghost, mat = self.row_costs(module, A_t, G_t, A_v, G_v, reduce)
            method = "ghost" if ghost <= mat else "materialize"
        if method == "ghost":
            M = self.ghost_products(module, A_t, G_t, A_v, G_v, max_elements)
            return M.sum(1) if reduce else M
        if reduce:
            return self.reduce_with_vector(module, A_t, G_t, self.summed_grad(module, A_v, G_v))
        rows = self.product_rows(A_t, A_v)
        Pv = self.materialized_grads(module, A_v, G_v, rows)
        out = torch.empty(len(G_t), len(G_v), dtype=G_t.dtype, device=G_t.device)
        step = _row_chunk(len(G_t), Pv.shape[1] + 1, max_elements)
        for s in range(0, len(G_t), step):
            Pt = self.materialized_grads(module, A_t[s : s + step], G_t[s : s + step], rows)
            out[s : s + len(Pt)] = Pt @ Pv.T
        return out

    def pairwise_products(self, module: nn.Module, a_t: torch.Tensor, g_t: torch.Tensor,
                          a_v: torch.Tensor, g_v: torch.Tensor, *, method: Method = "auto",
                          max_elements: int = 2**24) -> torch.Tensor:
        """:meth:`dot_products` from raw rows; materialised products use
        :meth:`per_sample_grads` (no unfolding), in chunks of train rows."""
        check_method(method)
        n, m = a_t.shape[0], a_v.shape[0]
        Lt, d_in, d_out = self.raw_dims(module, a_t, g_t)
        Lv = self.raw_dims(module, a_v, g_v)[0]
        if method == "auto":
            ghost, mat = self.product_costs(module, n, Lt, m, Lv, d_in, d_out, reduce=False)
            method = "ghost" if ghost <= mat else "materialize"
        if method == "ghost":
            return self.dot_products(module, *self.rows(module, a_t, g_t),
                                     *self.rows(module, a_v, g_v), method="ghost",
                                     max_elements=max_elements)
        Pv = self.per_sample_grads(module, a_v, g_v)
        out = torch.empty(n, m, dtype=g_t.dtype, device=g_t.device)
        step = _row_chunk(n, Lt * d_in + Pv.shape[1], max_elements)
        for s in range(0, n, step):
            out[s : s + step] = self.per_sample_grads(module, a_t[s : s + step],
                                                      g_t[s : s + step]) @ Pv.T
        return out

    # ------------------------------------------------------------------ Kronecker factors
    def factor_input_rows(self, module: nn.Module, a: torch.Tensor, *, weight: bool = True,
                          bias: bool | None = None) -> torch.Tensor:
        """EK-FAC input rows ``(n, L, d_a)``: the input matrix restricted to the trainable
        parts (``weight``: the ``d_in`` input columns; ``bias``, default whether the layer has
        one: the ones column)."""
        A = self.input_matrix(module, a)
        has_bias = self.has_bias(module)
        bias = has_bias if bias is None else bias
        if bias and not has_bias:
            raise InputError(f"{type(module).__name__} has no bias")
        if has_bias and not bias:
            A = A[..., :-1]  # frozen bias: no ones column
        if not weight:
            A = A[..., -1:]  # bias only
        return A

    def factor_output_rows(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """EK-FAC output-gradient rows ``(n, L, d_out)``."""
        return self.output_grad_matrix(module, g)


#: module type -> its kind (looked up through the module type's MRO by :func:`kind_of`)
LAYER_KINDS: dict[type[nn.Module], LayerKind] = {}


def register_kind(kind: type[LayerKind]) -> type[LayerKind]:
    """Class decorator: register one instance of ``kind`` for ``kind.module_type``."""
    LAYER_KINDS[kind.module_type] = kind()
    return kind


def supported_names() -> str:
    names = [f"nn.{t.__name__}" for t in LAYER_KINDS]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def kind_of(module: nn.Module, name: str | None = None) -> LayerKind:
    """The :class:`LayerKind` of ``module`` (subclasses of a registered type included); an
    :class:`UnsupportedModelError` naming the supported types otherwise."""
    for t in type(module).__mro__:
        kind = LAYER_KINDS.get(t)
        if kind is not None:
            return kind
    where = f"module {name!r} is a" if name is not None else "got a"
    raise UnsupportedModelError(
        f"{where} {type(module).__name__}; per-layer operations support {supported_names()} "
        "layers only"
    )
