"""Layer products of the In-Run tracker: per-sample layer gradients, ghost and materialised
dot products, directional derivatives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import (
    InputError,
    NoTrainableParametersError,
    UnsupportedModelError,
)
from ..layers import (
    CAPTURABLE_LAYERS,
    embedding_output_grad_matrix,
    layer_input_matrix,
    layer_output_grad_matrix,
)
from ..layers.kinds import _conv_padding

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["auto", "ghost", "materialize"]

def supported_modules(
    model: nn.Module, layers: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The layers whose trainable parameters are attributed, checked for support.

    With ``layers=None`` every module holding trainable parameters, all of which must be
    ``Linear``/``Conv2d``/``Embedding`` layers (else :class:`UnsupportedModelError` naming the
    first parameter outside such a layer). With ``layers`` given, those named modules only
    (each a supported layer with trainable parameters); other trainable parameters still train
    but are left out of the scores.
    """
    named = dict(model.named_modules())
    if layers is None:
        names = []
        for name, mod in named.items():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(mod, CAPTURABLE_LAYERS):
                pname = f"{name}.{own[0][0]}" if name else own[0][0]
                raise UnsupportedModelError(
                    f"parameter {pname!r} belongs to a {type(mod).__name__}; in-run attribution "
                    "supports trainable parameters only in nn.Linear, nn.Conv2d and nn.Embedding "
                    "layers (freeze the others with requires_grad_(False), or pass layers=[...] "
                    "to attribute through some layers only)"
                )
            names.append(name)
    else:
        if isinstance(layers, str) or len(layers) == 0:
            raise InputError("layers must be a non-empty list of module names (or None)")
        names = list(dict.fromkeys(layers))
        for name in names:
            if name not in named:
                raise InputError(f"no module named {name!r} in the model")
            mod = named[name]
            if not isinstance(mod, CAPTURABLE_LAYERS):
                raise UnsupportedModelError(
                    f"module {name!r} is a {type(mod).__name__}; in-run attribution supports "
                    "nn.Linear, nn.Conv2d and nn.Embedding layers"
                )
            if not any(p.requires_grad for p in mod.parameters(recurse=False)):
                raise InputError(f"layer {name!r} has no trainable parameters")
    out: dict[str, nn.Module] = {}
    for name in names:
        mod = named[name]
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if len(own) != len(list(mod.parameters(recurse=False))):
            raise UnsupportedModelError(
                f"layer {name!r} has both trainable and frozen parameters; freeze or train "
                "the whole layer"
            )
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise UnsupportedModelError(f"Conv2d {name!r} has groups > 1 (not supported)")
            _conv_padding(mod)  # padding_mode checks
        if isinstance(mod, nn.Embedding):
            layer_input_matrix(mod, torch.zeros(1, 1, dtype=torch.long))  # option checks
        out[name] = mod
    if not out:
        raise NoTrainableParametersError("the model has no trainable parameters")
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):  # batch statistics in training
            raise UnsupportedModelError(
                f"{type(mod).__name__} couples the samples of a batch; per-sample gradients "
                "are not defined (use GroupNorm/LayerNorm without affine, or none)"
            )
    return out


# ---------------------------------------------------------------------- dot products
def _costs(module: nn.Module, A_t, G_t, A_v, G_v, reduce: bool) -> tuple[float, float]:
    """(ghost, materialise) cost of a layer from its row matrices."""
    d_in = 1 if isinstance(module, nn.Embedding) else A_t.shape[-1]
    return _cost_model(module, G_t.shape[0], G_t.shape[1], G_v.shape[0], G_v.shape[1], d_in,
                       G_t.shape[-1], reduce)


def _cost_model(module: nn.Module, n: int, Lt: int, m: int, Lv: int, d_in: int, d_out: int,
                reduce: bool) -> tuple[float, float]:
    """FLOPs of ghost vs materialised products (see the module docstring)."""
    if isinstance(module, nn.Embedding):
        ghost = n * m * Lt * Lv * (d_out + 1.0)
        u = min(module.num_embeddings, n * Lt + m * Lv)
        mat = (n * Lt + m * Lv) * d_out
        if not reduce:
            mat += (n * m + n + m) * u * d_out
        return ghost, float(mat)
    ghost = n * m * Lt * Lv * (d_in + d_out + 1.0)
    mat = (n * Lt + m * Lv) * d_in * d_out + (0 if reduce else n * m * d_in * d_out)
    return ghost, float(mat)


def _raw_dims(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[int, int, int]:
    """``(L, d_in [+1 for the bias], d_out)`` of a Linear/Conv2d layer from its raw rows."""
    bias = int(getattr(module, "bias", None) is not None)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return g.shape[2] * g.shape[3], module.in_channels * kh * kw + bias, g.shape[1]
    return a[0].numel() // a.shape[-1], a.shape[-1] + bias, g.shape[-1]


def per_sample_layer_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(n, d_out * d_in [+ d_out])`` gradients (weight, then bias) of a Linear or
    Conv2d layer from its raw input and output-gradient rows.

    Linear: one batched matrix product. Conv2d on CPU: the weight-gradient kernel of a grouped
    convolution with one group per sample (no ``im2col`` buffer; 1.3-2.4x faster than ``unfold``
    + ``bmm`` on the 32x32 CNN of the benchmark); elsewhere ``unfold`` + ``bmm``.
    """
    n = a.shape[0]
    if isinstance(module, nn.Conv2d):
        pad = _conv_padding(module)
        G = g.flatten(2)  # (n, d_out, L)
        if a.device.type == "cpu":
            w = module.weight
            shape = w.new_zeros(()).expand(n * w.shape[0], *w.shape[1:])  # sizes only, no data
            Wg = torch.ops.aten.convolution_backward(
                g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), shape, None,
                module.stride, pad, module.dilation, False, [0, 0], n, [False, True, False])[1]
            parts = [Wg.reshape(n, -1)]
        else:
            U = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=pad,
                         stride=module.stride)  # (n, d_in k^2, L)
            parts = [torch.bmm(G, U.transpose(1, 2)).reshape(n, -1)]
        if module.bias is not None:
            parts.append(G.sum(2))
    else:
        A = a.reshape(n, -1, a.shape[-1])
        G = g.reshape(n, -1, g.shape[-1])
        parts = [torch.bmm(G.transpose(1, 2), A).reshape(n, -1)]
        if module.bias is not None:
            parts.append(G.sum(1))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _row_chunk(n: int, per_row: int, max_elements: int) -> int:
    return max(1, min(n, max_elements // max(per_row, 1)))


def _ghost(module, A_t, G_t, A_v, G_v, max_elements: int) -> torch.Tensor:
    n, Lt = G_t.shape[:2]
    m, Lv = G_v.shape[:2]
    out = torch.empty(n, m, dtype=G_t.dtype, device=G_t.device)
    step = _row_chunk(n, Lt * m * Lv, max_elements)
    Gv = G_v.reshape(m * Lv, -1)
    emb = isinstance(module, nn.Embedding)
    if not emb:
        Av = A_v.reshape(m * Lv, -1)
    for s in range(0, n, step):
        g = G_t[s : s + step]
        c = len(g)
        GG = (g.reshape(c * Lt, -1) @ Gv.T).reshape(c, Lt, m, Lv)
        if emb:
            eq = A_t[s : s + step].reshape(c, Lt, 1, 1) == A_v.reshape(1, 1, m, Lv)
            out[s : s + c] = (GG * eq).sum((1, 3))
        else:
            AA = (A_t[s : s + step].reshape(c * Lt, -1) @ Av.T).reshape(c, Lt, m, Lv)
            out[s : s + c] = (GG * AA).sum((1, 3))
    return out


def _per_sample_matrix(module, A, G, rows=None) -> torch.Tensor:
    """Per-sample layer gradients ``(n, d_out * d_in)`` (embedding: restricted to ``rows``)."""
    if isinstance(module, nn.Embedding):
        n, L, d = G.shape
        U = len(rows)
        pos = torch.searchsorted(rows, A.reshape(-1)).reshape(n, L)
        out = torch.zeros(n * U, d, dtype=G.dtype, device=G.device)
        out.index_add_(0, (torch.arange(n, device=G.device)[:, None] * U + pos).reshape(-1),
                       G.reshape(-1, d))
        return out.reshape(n, U * d)
    return torch.bmm(G.transpose(1, 2), A).reshape(len(G), -1)


def reduce_with_vector(module: nn.Module, A_t, G_t, W: torch.Tensor) -> torch.Tensor:
    """``<G_i^T A_i, W>`` for every row ``i``, with ``W`` the layer's ``(d_out, d_in[+1])``
    parameter matrix (embedding: the ``(num_embeddings, d)`` table); cost ``n L d_in d_out``."""
    if isinstance(module, nn.Embedding):
        return (G_t * W[A_t]).sum((1, 2))
    return ((A_t @ W.T) * G_t).sum((1, 2))


def dot_with_param_vector(
    module: nn.Module, a: torch.Tensor, g: torch.Tensor, W: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``<per-sample gradient of row i, W>`` for every row, without unfolding.

    ``a`` is the layer input and ``g`` the per-sample output gradient (raw shapes), ``W`` a
    parameter-shaped vector ``{"weight": ..., "bias": ...}``. It is the directional derivative
    ``sum_l g_il . (W a_il)``: for ``Conv2d`` a convolution of the inputs with ``W`` (no
    ``im2col``), for ``Linear`` a matrix product, for ``Embedding`` a gather. Cost: one forward.
    """
    n = a.shape[0]
    Ww, Wb = W["weight"], W.get("bias")
    if isinstance(module, nn.Embedding):
        G = embedding_output_grad_matrix(module, a, g)
        return (G * Ww[a.reshape(n, -1)]).sum((1, 2))
    if isinstance(module, nn.Conv2d):
        z = F.conv2d(a, Ww, None, module.stride, _conv_padding(module), module.dilation,
                     module.groups)
        # in place: z is ours, and a second output-sized temporary costs page faults on CPU
        s = z.mul_(g).sum((1, 2, 3))
        if Wb is not None:
            s = s + g.sum((2, 3)) @ Wb
        return s
    A = a.reshape(n, -1, a.shape[-1])
    G = g.reshape(n, -1, g.shape[-1])
    s = ((A @ Ww.T) * G).sum((1, 2))
    if Wb is not None:
        s = s + G.sum(1) @ Wb
    return s


def _param_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed parameter gradients ``{"weight", "bias"}`` of a layer from its rows."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(module, nn.Embedding):
        G = embedding_output_grad_matrix(module, a, g)
        W = torch.zeros_like(module.weight)
        out["weight"] = W.index_add_(0, a.reshape(-1), G.reshape(-1, G.shape[-1]))
        return out
    if isinstance(module, nn.Conv2d):
        out["weight"] = torch.nn.grad.conv2d_weight(
            a, module.weight.shape, g, module.stride, _conv_padding(module), module.dilation,
            module.groups)
        if module.bias is not None:
            out["bias"] = g.sum((0, 2, 3))
        return out
    G = g.reshape(-1, g.shape[-1])
    out["weight"] = G.T @ a.reshape(-1, a.shape[-1])
    if module.bias is not None:
        out["bias"] = G.sum(0)
    return out


def _accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add ``g`` into ``p.grad`` as ``backward()`` does (set it when there is none)."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g


def _sum_of_val_grads(module, A_v, G_v) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        d = G_v.shape[-1]
        V = torch.zeros(module.num_embeddings, d, dtype=G_v.dtype, device=G_v.device)
        return V.index_add_(0, A_v.reshape(-1), G_v.reshape(-1, d))
    return G_v.reshape(-1, G_v.shape[-1]).T @ A_v.reshape(-1, A_v.shape[-1])


def layer_dot_products(
    module: nn.Module,
    A_t: torch.Tensor,
    G_t: torch.Tensor,
    A_v: torch.Tensor,
    G_v: torch.Tensor,
    *,
    reduce: bool = False,
    method: Method = "auto",
    max_elements: int = 2**24,
) -> torch.Tensor:
    """Train x validation per-sample gradient dot products of one layer.

    Args:
        module: the ``Linear``/``Conv2d``/``Embedding`` layer.
        A_t, G_t: train rows from :func:`~dvl_ooc.grads.layer_input_matrix` (embedding: the
            ``(n, L)`` indices) and the per-sample output gradients ``(n, L, d_out)``
            (embedding: padding positions zeroed).
        A_v, G_v: the same for the validation rows.
        reduce: return the row sums ``(n,)`` (summed validation loss) instead of ``(n, m)``.
        method: ``"ghost"``, ``"materialize"`` or ``"auto"`` (cheaper by the module's cost model).
        max_elements: bound on temporary ``(chunk, L, m, L)`` tensors.
    """
    if method not in ("auto", "ghost", "materialize"):
        raise InputError(f"method must be 'auto', 'ghost' or 'materialize', got {method!r}")
    if method == "auto":
        ghost, mat = _costs(module, A_t, G_t, A_v, G_v, reduce)
        method = "ghost" if ghost <= mat else "materialize"
    if method == "ghost":
        M = _ghost(module, A_t, G_t, A_v, G_v, max_elements)
        return M.sum(1) if reduce else M
    if reduce:
        return reduce_with_vector(module, A_t, G_t, _sum_of_val_grads(module, A_v, G_v))
    rows = None
    if isinstance(module, nn.Embedding):
        rows = torch.unique(torch.cat([A_t.reshape(-1), A_v.reshape(-1)]))
    Pv = _per_sample_matrix(module, A_v, G_v, rows)
    out = torch.empty(len(G_t), len(G_v), dtype=G_t.dtype, device=G_t.device)
    per_row = Pv.shape[1] + 1
    step = _row_chunk(len(G_t), per_row, max_elements)
    for s in range(0, len(G_t), step):
        Pt = _per_sample_matrix(module, A_t[s : s + step], G_t[s : s + step], rows)
        out[s : s + len(Pt)] = Pt @ Pv.T
    return out


def _row_matrices(module: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """``(A, G)`` row matrices of :func:`layer_dot_products` from raw layer rows."""
    A = layer_input_matrix(module, a)
    if isinstance(module, nn.Embedding):
        return A, embedding_output_grad_matrix(module, a, g)
    return A, layer_output_grad_matrix(module, g)


def pairwise_layer_products(
    module: nn.Module,
    a_t: torch.Tensor,
    g_t: torch.Tensor,
    a_v: torch.Tensor,
    g_v: torch.Tensor,
    *,
    method: Method = "auto",
    max_elements: int = 2**24,
) -> torch.Tensor:
    """Train x validation per-sample gradient dot products ``(n, m)`` of one layer from its raw
    rows (layer inputs and output gradients as captured), by the cheaper of ghost and
    materialised products (or ``method``). Materialised products of ``Linear``/``Conv2d``
    layers use :func:`per_sample_layer_grads`; train rows are processed in chunks so that
    temporaries stay below ``max_elements``."""
    if method not in ("auto", "ghost", "materialize"):
        raise InputError(f"method must be 'auto', 'ghost' or 'materialize', got {method!r}")
    if isinstance(module, nn.Embedding):
        return layer_dot_products(module, *_row_matrices(module, a_t, g_t),
                                  *_row_matrices(module, a_v, g_v), method=method,
                                  max_elements=max_elements)
    n, m = a_t.shape[0], a_v.shape[0]
    Lt, d_in, d_out = _raw_dims(module, a_t, g_t)
    Lv = _raw_dims(module, a_v, g_v)[0]
    if method == "auto":
        ghost, mat = _cost_model(module, n, Lt, m, Lv, d_in, d_out, reduce=False)
        method = "ghost" if ghost <= mat else "materialize"
    if method == "ghost":
        return layer_dot_products(module, *_row_matrices(module, a_t, g_t),
                                  *_row_matrices(module, a_v, g_v), method="ghost",
                                  max_elements=max_elements)
    Pv = per_sample_layer_grads(module, a_v, g_v)
    out = torch.empty(n, m, dtype=g_t.dtype, device=g_t.device)
    step = _row_chunk(n, Lt * d_in + Pv.shape[1], max_elements)
    for s in range(0, n, step):
        out[s : s + step] = per_sample_layer_grads(module, a_t[s : s + step],
                                                   g_t[s : s + step]) @ Pv.T
    return out


