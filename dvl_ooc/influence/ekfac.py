"""EK-FAC influence: eigenvalue-corrected Kronecker-factored Gauss-Newton, per layer.

Per-sample gradients of ``nn.Linear`` / ``nn.Conv2d`` layers factorise. For one layer and
sample ``i``, with ``a_il`` the layer input at position ``l`` (a sequence position for
``Linear``, an unfolded patch for ``Conv2d``; a trailing 1 stands for the bias) and ``g_il``
the gradient of the per-sample loss w.r.t. the layer output at that position,

    G_i = sum_l g_il a_il^T                          (d_out x d_in[+1], "combined" gradient)

One block per layer (parameters of other layers are ignored: block-diagonal curvature).
``layers=`` restricts which ``Linear`` / ``Conv2d`` layers are factored (and attributed); the
other parameters, trainable or not, are then constants. ``layers="supported"`` selects every
``Linear`` / ``Conv2d`` layer EK-FAC can factor (for a ResNet: every convolution and the head)
and makes every other trainable parameter (BatchNorm affine parameters, bare ``nn.Parameter``,
grouped convolutions) a constant. Whatever the selection, the constants are reported in
``info["ignored_parameters"]`` (name, module type, size), never silently mixed in; with
``layers=None`` such parameters raise :class:`~dvl_ooc.exceptions.UnsupportedModelError`, whose
message counts them and names ``layers='supported'``.

K-FAC approximates the layer's curvature block ``E_i[vec G_i vec G_i^T]`` by ``A (x) S`` with

    A = E[a a^T],    S = E[g g^T]                     (float64, over samples and positions)
    A = Q_A diag(.) Q_A^T,  S = Q_S diag(.) Q_S^T     (float64 ``eigh``)

EK-FAC (George et al., 2018) keeps the Kronecker eigenbasis ``Q = Q_A (x) Q_S`` but refits the
eigenvalues to the diagonal of the curvature in that basis (a second pass over the data):

    Lambda_jk = (1/n) sum_i sum_c ((Q_S^T G_ic Q_A)_jk)^2

and preconditions with ``Q diag(1 / (Lambda + lambda)) Q^T``:

    G  ->  Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T       (elementwise division)

The scale split between ``A`` and ``S`` is irrelevant: only their eigenvectors are used.

Output gradients ("pseudo-gradients" ``g_ic``, ``c`` indexing several per sample) come from a
Fisher/Gauss-Newton factorisation chosen by ``fisher``:

* ``"ggn"`` (default, exact): per sample, the output Hessian ``d^2 l_i / d o^2 = L_i L_i^T``
  (``torch.func.hessian`` + float64 ``eigh``, negligible eigenvalues dropped) and each column of
  ``L_i`` is back-propagated through the network. Then ``sum_c vec G_ic vec G_ic^T`` is exactly
  the sample's Gauss-Newton block, so ``Lambda`` is the exact diagonal of the mean-loss GGN in
  the Kronecker eigenbasis (``Lambda = diag(Q^T H_GGN Q)``). Cost: up to ``C`` backward passes
  per micro-batch for ``C`` outputs, plus an ``O(C^3)`` eigendecomposition per sample.
* ``"empirical"``: the gradient of the loss at the true labels (one backward pass).
* ``"sampled"``: labels drawn from the model's predictive distribution ``softmax(outputs)``
  (classification with integer labels and a cross-entropy-type loss only; seeded through
  ``dvl_ooc.seeding.torch_generator(seed)``; both passes draw the same labels when the data
  source yields the same order).

The loss is mean-reduced, so the backward pass runs on ``m * loss`` over a micro-batch of ``m``:
captured output gradients are then per-sample. Everything runs in micro-batches of
``micro_batch_size`` samples (memory bounded by the micro-batch) with two passes over the data.
The factor products ``a^T a``, ``g^T g`` of a micro-batch and the rotated gradients of the
second pass are computed in the model's dtype (float32 for a float32 model, as kronfluence's
defaults) and accumulated in float64; the eigendecompositions are float64. In the second pass
each layer's ``Q_S^T G Q_A`` comes from the rotated factor rows (``L (d_a^2 + d_out^2 + d_out
d_a)`` per sample: deep layers with few positions ``L``) or from the formed gradient (``L d_out
d_a + d_out^2 d_a + d_out d_a^2``: early convolutions), whichever is cheaper.

Per-sample gradients (:meth:`EkfacInfluence.gradients`, used by the calculators too) come from
the same hooks: one forward and one backward pass (w.r.t. the layer outputs) per micro-batch and
``sum_l g_l a_l^T`` per layer, no ``torch.func`` per-sample pass.

Cost per layer with ``d_a = d_in[+1]``, ``d_g = d_out``, ``L`` positions: factors
``O(n L (d_a^2 + k d_g^2))``, eigenvalue correction ``O(n k L d_g d_a)`` (``k`` pseudo-gradients
per sample), state ``d_a^2 + d_g^2 + d_a d_g`` floats, precondition ``O(d_g d_a (d_g + d_a))``
per gradient. The state never grows with the number of training samples. The ``k``
pseudo-gradients of a micro-batch are back-propagated together (one vectorised ``autograd.grad``
w.r.t. the layer outputs, ``is_grads_batched``), in chunks of ``vector_chunk`` vectors, so the
transient memory is about ``min(k, 64)`` times the micro-batch's layer outputs.

The calculators use the base class's feature split (test features = preconditioned gradients,
train features = raw gradients): from a flat gradient, rotating train rows into the eigenbasis
would cost as much as preconditioning them and shrink nothing.

The in-memory paths (:meth:`~dvl_ooc.influence.base.InfluenceModel.influences`,
``self_influence``) stream the training data in bounded batches and, without ``rank``, work
from the captured factor rows instead, layer by layer in the cheapest exact form
(:meth:`EkfacInfluence._stream_dims`): the original basis; the eigenbasis (``Q_S^T G Q_A``
from the rotated factor rows); or, for layers with few positions (``L (d_out + d_a) < d_out
d_a``), the test gradient's exact rank-``L`` factors in the eigenbasis against scaled train
rows. On ``ResNet18(width=16)`` (64 px, 0.7 M parameters) that stores ~100 k floats per test
point instead of 0.7 M and never rotates a test row back; the results equal the calculators'
to round-off. Self-influences are ``sum (Q_S^T G Q_A)^2 / (Lambda + lambda)``.

Compressed test factors (``rank=r``, the query compression of kronfluence): a test point's
preconditioned gradient of one layer, ``P = Q_S [(Q_S^T G Q_A) / (Lambda + lambda)] Q_A^T``
(``d_out x d_a``), is replaced by its truncated SVD ``P_r = U_r diag(s_r) V_r^T`` (float64
``torch.linalg.svd``), stored as the row ``[(U_r diag(s_r)).ravel(), V_r.ravel()]``:
``(d_out + d_a) r`` floats instead of ``d_out d_a``. A layer where that is not smaller
(``(d_out + d_a) r >= d_out d_a``, in particular ``r >= min(d_out, d_a)``) keeps its exact ``P``
(flat), so a large ``r`` is exact. Test feature rows are the layers' segments concatenated
(``feature_dims() = (sum_l width_l, p)``); train features stay the raw gradients. A tile is
``sum_l <U_r S_r V_r^T, G_l>`` computed layer by layer: per layer the train chunk's gradients
``G_l (n_r, d_out, d_a)`` are read once and the test factors are expanded in blocks of test rows
(``n_t d_out d_a (r + n_r)`` flops, at most ``2^23`` intermediate elements), or, when that is
dearer (``r = 1`` or ``n_r = 1``), contracted (``G V`` then ``U``: ``n_t n_r r d_out d_a``);
the ``p x n_t`` expanded block is never built. The SVD costs ``O(d_out d_a min(d_out, d_a))``
per test point and layer, the same order as preconditioning; test rows are preconditioned and
decomposed in blocks of at most ``2^23`` elements of ``P`` per layer (bounded transient memory
whatever the test chunk). ``paired`` (self-influence)
contracts ``G V`` row by row. ``influences``, ``self_influence`` and ``influence_factors`` use
the same compressed factors (``influence_factors`` returns their ``(n, p)`` expansion), so the
in-memory matrix equals the calculator's. ``rank`` is part of :meth:`config` (store
fingerprints) but not of the fitted state: one fit serves every rank.

Measured (float64, relative Frobenius error of the influence matrix against uncompressed
EK-FAC, bytes per test point in float32): digits CNN (``DigitsCNN()``, layers 8x10, 16x73,
64x65, 10x65, p = 6,058; 500 train, 50 test, lambda = 1e-3 x top eigenvalue): r = 1: 1.2 kB,
err 0.50; r = 4: 5.0 kB, 0.30; r = 8: 9.7 kB, 0.12; r = 16: 15.8 kB, 1.5e-5; r = 32 (only the
64x65 layer compressed): 24.1 kB, 7.8e-8; uncompressed 24.2 kB. At lambda = 0.1 x top: 0.63,
0.17, 0.036, 3e-9 at r = 1, 4, 8, 16. The convolution's ``P`` (16 x 73) has a flat spectrum;
the dense layer's is nearly low rank. ``ResNet18(width=8)`` (174,682 factored parameters, 3x32x32
random inputs and weights, 32 fit / 8 test points, lambda = 1e-3 x top): r = 1: 18 kB, err 0.33;
r = 4: 73 kB, 0.029; r = 16: 270 kB, 0.006; uncompressed 699 kB. Test features cost ~2.5x the
preconditioning (the SVDs); low-rank tiles ~2x a dense tile on that network (the expansion).

Accuracy: on one layer with ``fisher="ggn"`` the only approximation is the eigenbasis. Against
the exact layer-block GGN the influence correlations grow with the damping (digits MLP/CNN:
Pearson ~0.87 / Spearman ~0.55-0.65 at ``lambda = 1e-3 * top eigenvalue``, >= 0.95 at 0.1).

Fit: :meth:`~dvl_ooc.influence.base.InfluenceModel.fit` calls ``_fit_blocks``, overridden here
because the blocks share two joint passes over the data (factors, then the eigenvalue
correction). ``info["fit"]`` records per block the layer, ``d_a``, ``d_out`` and the range of
the corrected eigenvalues.

State: per layer ``Q_A`` (``d_a^2``), ``Q_S`` (``d_out^2``), ``Lambda`` (``d_out d_a``) and the
two Kronecker spectra, float64; independent of the number of training samples and of ``rank``.

Diagnostics and damping: ``Lambda`` is the whole spectrum of the EK-FAC curvature (positive
semi-definite by construction, so ``Lambda + lambda > 0`` for ``lambda > 0``; a zero
``Lambda + lambda`` is a :class:`~dvl_ooc.exceptions.RegularizationError`), and with
``fisher="ggn"`` ``mean(Lambda)`` is exactly ``trace / p`` of the layer's Gauss-Newton block.
``regularization=Relative(0.1, of="mean")`` is kronfluence's heuristic (``0.1 x`` the mean
eigenvalue, per layer); ``Relative(1e-3)`` takes ``1e-3 x max(Lambda)``. :meth:`diagnostics`
with data adds the error of the EK-FAC model against the layer's Gauss-Newton block on
``probes`` seeded vectors (one pass per layer).

Limitations: only ``Linear`` and ``Conv2d`` (``groups=1``, zero padding) parameters may be
attributed; with ``layers=None`` any other trainable parameter (norm affine, bare
``nn.Parameter``) raises :class:`~dvl_ooc.exceptions.UnsupportedModelError`: freeze it with
``requires_grad_(False)``, name the supported layers in ``layers=`` or pass
``layers="supported"`` (the rest is then constant and reported). A layer called more than once
per forward pass (weight sharing) is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..data import DataLike, num_samples
from ..exceptions import (
    InputError,
    NonFiniteError,
    NoTrainableParametersError,
    UnsupportedModelError,
)
from ..grads import MODEL_LOCK, LossFn, ParamBlock
from ..grads.functional import output_hessian_factors, select_parameters
from ..layers import LayerCapture, kind_of
from ..seeding import torch_generator
from .base import InfluenceModel, _num_rows
from .diagnostics import Spectrum, operator_error, probe_vectors

__all__ = ["EkfacInfluence"]

FisherMode = Literal["ggn", "empirical", "sampled"]
_F64 = torch.float64


@dataclass(frozen=True)
class _Layer:
    """Static description of one EK-FAC block (derived from the model, not fitted state)."""

    module: str  # module name ("" for the root module)
    has_weight: bool
    has_bias: bool
    d_out: int
    d_in: int  # weight columns: in_features, or in_channels * kh * kw

    @property
    def d_a(self) -> int:
        return (self.d_in if self.has_weight else 0) + int(self.has_bias)

    def to_combined(self, g: torch.Tensor) -> torch.Tensor:
        """Flat ``(n, p)`` gradients in (weight, bias) order -> combined ``(n, d_out, d_a)``."""
        n, parts, o = g.shape[0], [], 0
        if self.has_weight:
            parts.append(g[:, : self.d_out * self.d_in].reshape(n, self.d_out, self.d_in))
            o = self.d_out * self.d_in
        if self.has_bias:
            parts.append(g[:, o : o + self.d_out].reshape(n, self.d_out, 1))
        return torch.cat(parts, dim=-1)

    def to_flat(self, G: torch.Tensor) -> torch.Tensor:
        """Combined ``(n, d_out, d_a)`` -> flat ``(n, p)`` in (weight, bias) order."""
        n, parts = G.shape[0], []
        if self.has_weight:
            parts.append(G[..., : self.d_in].reshape(n, -1))
        if self.has_bias:
            parts.append(G[..., -1])
        return torch.cat(parts, dim=-1)


def _module_problem(mod: nn.Module, local: Sequence[str]) -> str | None:
    """Why EK-FAC cannot factor the trainable parameters ``local`` of ``mod`` (None: it can)."""
    try:
        kind = kind_of(mod)
    except UnsupportedModelError:
        kind = None
    if kind is None or not kind.kronecker or not set(local) <= {"weight", "bias"}:
        return f"{type(mod).__name__}: trainable {sorted(local)}"
    try:
        kind.check(mod)
    except UnsupportedModelError as e:
        return str(e)
    return None


def _owned(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Parameter names grouped by owning module: ``{module name: [local names]}``."""
    owned: dict[str, list[str]] = {}
    for pname in names:
        owned.setdefault(pname.rpartition(".")[0], []).append(pname.rpartition(".")[2])
    return owned


def _supported_modules(model: nn.Module) -> list[str]:
    """``layers="supported"``: the modules whose trainable parameters EK-FAC can factor."""
    modules = dict(model.named_modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return [m for m, local in _owned(model, trainable).items()
            if _module_problem(modules[m], local) is None]


def _ignored_parameters(model: nn.Module, selected: Sequence[str]) -> list[dict[str, Any]]:
    """The trainable parameters not in ``selected`` (constants): name, module type, numel."""
    modules = dict(model.named_modules())
    chosen = set(selected)
    return [{"name": n, "module_type": type(modules[n.rpartition(".")[0]]).__name__,
             "numel": int(p.numel())}
            for n, p in model.named_parameters() if p.requires_grad and n not in chosen]


def _ignored_summary(ignored: Sequence[dict[str, Any]]) -> str:
    """``"40 BatchNorm2d parameters (1,920 values)"``."""
    by_type: dict[str, int] = {}
    for d in ignored:
        by_type[d["module_type"]] = by_type.get(d["module_type"], 0) + 1
    kinds = " and ".join(f"{v} {k}" for k, v in by_type.items())
    return f"{kinds} parameters ({sum(d['numel'] for d in ignored):,} values)"


def _layers_of(
    model: nn.Module, layers: Sequence[str] | None = None
) -> tuple[list[_Layer], dict[str, list[str]]]:
    """The EK-FAC blocks of ``model`` (restricted to ``layers``, an explicit selection) and the
    matching block mapping for ``ModelGradients``."""
    modules = dict(model.named_modules())
    if not any(p.requires_grad for p in model.parameters()):
        raise NoTrainableParametersError(
            f"{type(model).__name__} has no trainable parameters; unfreeze at least one "
            "nn.Linear or nn.Conv2d layer (requires_grad=True)"
        )
    owned = _owned(model, list(select_parameters(model, layers)))
    bad = []
    for mname, local in owned.items():
        why = _module_problem(modules[mname], local)
        if why is not None:
            label = repr(mname) if mname else "the root module"
            bad.append(f"{label} ({why})")
    if bad:
        keep = _supported_modules(model)
        ignored = _ignored_parameters(model, select_parameters(model, keep)) if keep else []
        shown = "; ".join(bad[:6]) + (f"; and {len(bad) - 6} more" if len(bad) > 6 else "")
        hint = (f"; or pass layers='supported' to factor the {len(keep)} Linear/Conv2d layers "
                f"and treat the {_ignored_summary(ignored)} as constants" if keep and ignored
                else "")
        raise UnsupportedModelError(
            "EkfacInfluence supports trainable parameters only in nn.Linear and nn.Conv2d "
            "layers; unsupported: " + shown + ". Freeze these parameters with "
            "requires_grad_(False), select the supported layers with layers=[...]" + hint +
            ", or use another influence model (e.g. CgInfluence)."
        )
    layers_out, mapping = [], {}
    for mname, local in owned.items():
        mod = modules[mname]
        w = mod.weight
        order = [n for n in ("weight", "bias") if n in local]
        layers_out.append(
            _Layer(mname, "weight" in local, "bias" in local, w.shape[0], w[0].numel())
        )
        mapping[mname or "model"] = [f"{mname}.{n}" if mname else n for n in order]
    return layers_out, mapping


def _check_finite_rows(g: torch.Tensor, offset: int) -> None:
    """Raise :class:`NonFiniteError` for rows of ``g`` with NaN or inf (one read of ``g``
    without temporaries: ``aminmax`` propagates NaN)."""
    lo, hi = torch.aminmax(g)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = (~torch.isfinite(g)).any(1).nonzero().flatten() + offset
        raise NonFiniteError(
            f"non-finite loss gradient for sample(s) {bad[:10].tolist()}; check the inputs, "
            "labels and loss (e.g. log of 0)")


#: convolutions with fewer output pixels than this form per-sample gradients by ``unfold`` +
#: ``bmm`` instead of the grouped-convolution kernel (``per_sample_grads``): measured on the
#: ResNet18(width=16) of ``benchmarks/bench_ekfac_memory.py`` (64 samples, one thread) the
#: kernel is 3x faster at 256-1024 pixels, 1.5x at 64, and 3-10x slower at 4-16
_KERNEL_MIN_POSITIONS = 32

#: elements of one low-rank tile intermediate (bounds the transient memory of :meth:`tile`)
_TILE_BLOCK = 1 << 23


def _tile_orders(n_s: int, d_out: int, d_a: int, r: int) -> tuple[int, int]:
    """Multiply-adds per test row of :func:`_low_rank_tile`'s two orders on ``n_s`` train
    rows: ``(expand, contract)``."""
    return d_out * d_a * (r + n_s), n_s * r * (d_out * d_a + min(d_out, d_a))


def _low_rank_tile(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t, s] += <U_t V_t^T, G_s>`` for ``U (n_t, d_out, r)``, ``V (n_t, d_a, r)`` and
    train gradients ``G (n_s, d_out, d_a)``, in blocks of test rows of at most
    ``_TILE_BLOCK`` intermediate elements, by the cheaper of two orders:

    * expand: ``P_t = U_t V_t^T`` (a block of test rows), then one matmul with ``G``:
      ``n_t d_out d_a (r + n_s)`` flops;
    * contract: ``G V`` (or ``G^T U``) over the smaller side, then the other factor:
      ``n_t n_s r d_out d_a`` flops (cheaper only when ``r == 1`` or ``n_s == 1``).
    """
    n_t, d_out, r = U.shape
    n_s, _, d_a = G.shape
    expand, contract = _tile_orders(n_s, d_out, d_a, r)
    if expand <= contract:
        b = max(1, _TILE_BLOCK // (d_out * d_a))
        Gf = G.reshape(n_s, d_out * d_a)
        for i in range(0, n_t, b):
            P = torch.bmm(U[i : i + b], V[i : i + b].transpose(1, 2)).reshape(-1, d_out * d_a)
            out[i : i + b].addmm_(P, Gf.T)
        return
    if d_out <= d_a:  # contract the d_a side first: Y[s, o, t, k] = sum_a G[s, o, a] V[t, a, k]
        left, first, second, d = G.reshape(n_s * d_out, d_a), V, U, d_out
    else:  # Y[s, a, t, k] = sum_o G[s, o, a] U[t, o, k]
        left, first, second, d = G.transpose(1, 2).reshape(n_s * d_a, d_out), U, V, d_a
    b = max(1, _TILE_BLOCK // (n_s * d * r))
    for i in range(0, n_t, b):
        f = first[i : i + b]
        Y = (left @ f.permute(1, 0, 2).reshape(f.shape[1], -1)).reshape(n_s, d, len(f), r)
        out[i : i + b] += torch.einsum("sdtk,tdk->ts", Y, second[i : i + b])


class EkfacInfluence(InfluenceModel):
    """EK-FAC influence for networks whose trainable layers are ``nn.Linear`` / ``nn.Conv2d``.

    Args:
        model: trained network; it is put into ``eval()`` mode.
        loss: mean-reduced loss ``loss(outputs, targets)``.
        regularization: ``lambda`` (float or mapping block name -> float; block names are the
            layer module names). Must keep ``Lambda + lambda > 0``.
        blocks: only ``"layer"`` (one block per layer) is meaningful for EK-FAC.
        hessian: only ``"gauss-newton"`` (the default of every method): EK-FAC approximates
            the Gauss-Newton/Fisher matrix.
        layers: module (or parameter) names of the ``Linear`` / ``Conv2d`` layers to factor
            and attribute; the other parameters are ignored (constants). ``None``: every
            trainable parameter, which must then all belong to supported layers.
            ``"supported"``: every ``Linear`` / ``Conv2d`` layer EK-FAC can factor (e.g. all
            convolutions and the head of a ResNet); every other trainable parameter (BatchNorm
            affine parameters, bare ``nn.Parameter``, grouped convolutions) is a constant.
            The selection is resolved to the explicit list of module names (``config()
            ["layers"]``; the same fingerprint as passing that list).
        fisher: ``"ggn"`` (exact GGN factorisation), ``"empirical"`` or ``"sampled"``.
        seed: seed of the label sampling of ``fisher="sampled"``.
        micro_batch_size: samples per micro-batch (bounds memory).
        projection: not supported (``None`` only); EK-FAC has its own structure, see
            :class:`~dvl_ooc.influence.base.InfluenceModel` for the projected methods.
        rank: ``None`` (default): test features are the preconditioned gradients (``p``
            floats). An int ``r >= 1``: each layer's preconditioned test gradient ``P``
            (``d_out x d_a``) is stored as its rank-``r`` truncated SVD, ``(d_out + d_a) r``
            floats instead of ``d_out d_a``, for the layers where that is smaller (the others
            keep the exact ``P``); see "Compressed test factors" in the module docstring. Part
            of :meth:`config` (stores and fingerprints), not of the fitted state: a state
            fitted with one rank loads into a model with another, and ``rank`` may be changed
            on a fitted model.
        raise_on_indefinite: refuse a non-positive ``Lambda + lambda`` instead of warning
            (cannot happen with ``lambda >= 0``: ``Lambda`` is a sum of squares).

    Attributes:
        info: as in :class:`~dvl_ooc.influence.base.InfluenceModel`, plus
            ``info["ignored_parameters"]``: the trainable parameters that are constants
            (not selected by ``layers``), one ``{"name", "module_type", "numel"}`` per tensor.
    """

    supported_hessians = ("gauss-newton",)
    _rank: int | None = None  # (objects pickled before ``rank`` existed load uncompressed)
    _state_keys = ("A_eigenvectors", "S_eigenvectors", "eigenvalues", "A_eigenvalues",
                   "S_eigenvalues")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        *,
        regularization: float | dict[str, float] = 1e-3,
        blocks: str = "layer",
        hessian: str = "gauss-newton",
        layers: Sequence[str] | None = None,
        fisher: FisherMode = "ggn",
        seed: int = 0,
        micro_batch_size: int = 64,
        projection: Any = None,
        rank: int | None = None,
        raise_on_indefinite: bool = False,
    ) -> None:
        if projection is not None:
            raise InputError(
                "EkfacInfluence does not take projection=: it has its own per-layer Kronecker "
                "structure (factors of d_in^2 + d_out^2 floats per layer, never a p x p "
                "matrix); restrict it with layers=[...], or use projection= with "
                "DirectInfluence, CgInfluence, LissaInfluence, ArnoldiInfluence or "
                "NystroemSketchInfluence"
            )
        if blocks != "layer":
            raise InputError(
                f"EkfacInfluence always uses one block per Linear/Conv2d layer; pass "
                f"blocks='layer' (got {blocks!r})"
            )
        if fisher not in ("ggn", "empirical", "sampled"):
            raise InputError(f"fisher must be 'ggn', 'empirical' or 'sampled', got {fisher!r}")
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.rank = rank
        if isinstance(layers, str) and layers == "supported":
            layers = _supported_modules(model)
            if not layers:
                raise UnsupportedModelError(
                    f"layers='supported': {type(model).__name__} has no trainable nn.Linear or "
                    "nn.Conv2d layer that EK-FAC can factor; use another influence model"
                )
        self._layers, mapping = _layers_of(model, layers)
        self.fisher: FisherMode = fisher
        self.seed = int(seed)
        super().__init__(model, loss, regularization=regularization, blocks=mapping,
                         hessian=hessian, layers=layers,  # type: ignore[arg-type]
                         micro_batch_size=micro_batch_size,
                         raise_on_indefinite=raise_on_indefinite)
        self.info["ignored_parameters"] = _ignored_parameters(
            model, [n for b in self.blocks for n in b.names])

    @property
    def rank(self) -> int | None:
        """Rank of the compressed test factors (``None``: uncompressed)."""
        return self._rank

    @rank.setter
    def rank(self, rank: int | None) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or rank < 1):
            raise InputError(f"rank must be None or an int >= 1, got {rank!r}")
        self._rank = rank

    def _extra_config(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "seed": self.seed, "rank": self.rank}

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d.pop("_modules_cache", None)  # module lookups, rebuilt on use
        return d

    def load_state(self, state: Mapping[str, Any]) -> EkfacInfluence:
        """As :meth:`InfluenceModel.load_state`; ``rank`` may differ (it is not fitted)."""
        state = {**state, "config": {**state["config"], "rank": self.rank}}
        return super().load_state(state)  # type: ignore[return-value]

    # ------------------------------------------------------------------ data passes
    def _output_vectors(
        self, out: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None
    ) -> list[torch.Tensor]:
        """Vectors ``v`` (shaped like ``out``) whose back-propagation gives pseudo-gradients."""
        m = out.shape[0]
        if self.fisher == "ggn":
            return output_hessian_factors(out, y, self.loss, fix="use fisher='empirical'")
        if self.fisher == "sampled":
            if out.ndim != 2 or y.is_floating_point():
                raise InputError(
                    "fisher='sampled' needs classification: outputs (n, classes) of logits and "
                    "integer labels with a cross-entropy loss; use fisher='ggn' otherwise"
                )
            probs = torch.softmax(out.detach().to(_F64), dim=1).cpu()
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(y.device, y.dtype)
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (v,) = torch.autograd.grad(self.loss(o, y) * m, o)
        return [v]

    def _capture(self, xb: torch.Tensor) -> tuple[torch.Tensor, LayerCapture]:
        """Forward pass of one micro-batch recording the factored layers' inputs and (graph-
        attached) outputs; every layer must run exactly once."""
        names = [ly.module for ly in self._layers]
        with LayerCapture(self.model, names, keep_outputs=True,
                          output_grads=False) as rec, torch.enable_grad():
            out = self.model(xb)
        for n in names:
            if rec.calls[n] != 1:
                why = ("is never called in forward (are its weights used directly, e.g. "
                       "inside nn.MultiheadAttention?)" if rec.calls[n] == 0 else
                       f"is called {rec.calls[n]} times per forward (weight sharing)")
                raise UnsupportedModelError(
                    f"layer {n or type(rec.modules[n]).__name__!r} {why}; EkfacInfluence "
                    "cannot factor it: freeze it with requires_grad_(False)"
                )
        return out, rec

    def _layer_rows(self, x: Any, y: Any
                    ) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Per micro-batch of ``(x, y)``: ``(start, [(a, g) per layer])`` with ``a`` the raw
        layer input and ``g`` the gradient of the sample's own loss w.r.t. the layer output
        (one backward pass of ``m * loss`` w.r.t. the layer outputs only; samples are
        independent in eval mode). The model lock is held for each forward/backward pass
        (hooks on a shared model), not while the caller works on the rows."""
        names = [ly.module for ly in self._layers]
        start = 0
        for xb, yb in self.grads.batches((x, y)):
            with MODEL_LOCK:
                out, rec = self._capture(xb)
                outs = [rec.outputs[n] for n in names]
                with torch.enable_grad():
                    total = self.loss(out, yb) * len(xb)
                gs = torch.autograd.grad(total, outs, allow_unused=True)
            rows = [(rec.inputs[n], torch.zeros_like(o) if g is None else g.detach())
                    for n, o, g in zip(names, outs, gs)]
            del out, rec, outs, total, gs
            yield start, rows
            start += len(xb)

    def _layer_flat(self, i: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients ``(m, p_l)`` of layer ``i`` in flat (weight, bias) order from
        its raw rows (:meth:`~dvl_ooc.layers.LayerKind.per_sample_grads`: on CPU a
        grouped-convolution weight-gradient kernel, no ``im2col`` buffer)."""
        ly, mod, kind = self._layers[i], *self._module_kind(i)
        if not ly.has_weight:  # bias only
            return kind.output_grad_matrix(mod, g).sum(1)
        if isinstance(mod, nn.Conv2d) and self._positions(i, a, g) < _KERNEL_MIN_POSITIONS:
            A, Gr = self._kron_rows(i, a, g)  # few output pixels: unfold + bmm is faster
            return ly.to_flat(torch.bmm(Gr.transpose(1, 2), A))  # type: ignore[union-attr]
        G = kind.per_sample_grads(mod, a, g)
        if kind.has_bias(mod) and not ly.has_bias:  # frozen bias: weight part only
            G = G[:, : ly.d_out * ly.d_in]
        return G

    def _module_kind(self, i: int) -> tuple[nn.Module, Any]:
        """Layer ``i``'s module and its :class:`~dvl_ooc.layers.LayerKind` (looked up in the
        current model; cached per model object)."""
        cache = self.__dict__.get("_modules_cache")
        if cache is None or cache[0] is not self.model:
            named = dict(self.model.named_modules())
            mods = [named[ly.module] for ly in self._layers]
            cache = (self.model, [(m, kind_of(m, ly.module))
                                  for m, ly in zip(mods, self._layers)])
            self._modules_cache = cache
        return cache[1][i]

    def gradients(self, x: Any, y: Any) -> torch.Tensor:
        """Per-sample loss gradients ``(n, p)`` of the factored layers, blocks concatenated
        (flat (weight, bias) order), from the layers' inputs and output gradients of one
        forward and one backward pass per micro-batch (``sum_l g_l a_l^T``; no
        ``torch.func`` per-sample pass: ~5x faster on a ResNet). Equal to
        ``grads.per_sample_grads`` up to round-off."""
        p, dev = self.grads.num_params, self.grads.device
        out: torch.Tensor | None = None
        for s, rows in self._layer_rows(x, y):
            m = len(rows[0][0])
            if out is None:
                n = _num_rows(x, y, "data")
                out = torch.empty(n, p, dtype=rows[0][1].dtype, device=dev)
            for i, (sl, (a, g)) in enumerate(zip(self.grads.block_slices, rows)):
                out[s : s + m, sl] = self._layer_flat(i, a, g)
            _check_finite_rows(out[s : s + m], s)
        assert out is not None
        return out

    def _micro_batches(
        self, data: DataLike
    ) -> Iterator[tuple[int, list[torch.Tensor], Iterator[list[torch.Tensor]]]]:
        """Yield ``(m, [raw input a per layer], pseudo-gradients)`` per micro-batch, where the
        last item lazily yields ``[raw output gradient g per layer]`` once per
        pseudo-gradient (one backward pass per vector; chunks of ``vector_chunk`` vectors are
        back-propagated together, ``is_grads_batched``, when there are several)."""
        names = [ly.module for ly in self._layers]
        chunk = self.grads.vector_chunk
        gen = torch_generator(self.seed) if self.fisher == "sampled" else None
        for xb, yb in self.grads.batches(data):
            out, rec = self._capture(xb)
            acts = [rec.inputs[n] for n in names]
            vs = self._output_vectors(out.detach(), yb, gen)
            layer_out = [rec.outputs[n] for n in names]

            def pseudo_grads(out=out, vs=vs, layer_out=layer_out):
                # d(v^T out) / d(layer outputs), several vectors per vectorised backward
                for c in range(0, len(vs), chunk):
                    V = torch.stack(vs[c : c + chunk])
                    last = c + chunk >= len(vs)
                    if len(V) == 1:  # a plain backward pass (no vmap machinery)
                        gs = [None if g is None else g[None] for g in torch.autograd.grad(
                            out, layer_out, grad_outputs=V[0], retain_graph=not last,
                            allow_unused=True)]
                    else:
                        gs = torch.autograd.grad(out, layer_out, grad_outputs=V,
                                                 retain_graph=not last,
                                                 is_grads_batched=True, allow_unused=True)
                    missing = [n for n, g in zip(names, gs) if g is None]
                    if missing:
                        raise UnsupportedModelError(
                            f"layers {missing} do not influence the model output; freeze them "
                            "with requires_grad_(False)"
                        )
                    for j in range(len(V)):
                        yield [g[j].detach() for g in gs]

            yield len(xb), acts, pseudo_grads()

    def _kron_rows(self, i: int, a: torch.Tensor | None, g: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """EK-FAC input rows ``(m, L, d_a)`` (from ``a``) and output rows ``(m, L, d_out)``
        (from ``g``) of layer ``i``; ``None`` for an argument that is ``None``."""
        ly, (mod, kind) = self._layers[i], self._module_kind(i)
        A = None if a is None else kind.factor_input_rows(mod, a, weight=ly.has_weight,
                                                          bias=ly.has_bias)
        return A, None if g is None else kind.factor_output_rows(mod, g)

    def _rotation_costs(self, i: int, L: int) -> tuple[int, int, int]:
        """Multiply-adds per sample of layer ``i`` with ``L`` positions: forming the gradient
        ``G = sum_l g_l a_l^T`` (``L d_out d_a``), rotating a formed ``G`` (``Q_S^T G Q_A``:
        ``d_out^2 d_a + d_out d_a^2``) and rotating the factor rows instead
        (``L (d_a^2 + d_out^2 + d_out d_a)``)."""
        do, da = self._layers[i].d_out, self._layers[i].d_a
        return L * do * da, do * do * da + do * da * da, L * (da * da + do * do + do * da)

    def _positions(self, i: int, a: torch.Tensor, g: torch.Tensor) -> int:
        mod, kind = self._module_kind(i)
        return int(kind.raw_dims(mod, a, g)[0])

    # ------------------------------------------------------------------ fitting
    def _fit_passes(self) -> int:
        return 2

    def _fit_blocks(self, data: DataLike) -> list[dict[str, torch.Tensor]]:
        """Two joint passes over ``data`` for all blocks: Kronecker factors and their
        eigenbases, then the eigenvalue correction ``Lambda``.

        Per micro-batch the factor products ``a^T a``, ``g^T g`` are computed in the model's
        dtype and accumulated in float64 (a float32 model's products are float32, as
        kronfluence's defaults); the eigendecompositions are float64. In the second pass each
        layer's ``Q_S^T G Q_A`` is computed from the factor rows or from the formed gradient,
        whichever is cheaper for its number of positions ``L`` (:meth:`_rotation_costs`:
        the factor rows for deep convolutions and dense layers, the formed gradient for
        early convolutions with many output pixels); the squares are summed in float64."""
        n = num_samples(data)
        dev = self.grads.device
        cdt = torch.promote_types(self.grads.dtype, torch.float32)
        A = [torch.zeros(ly.d_a, ly.d_a, dtype=_F64, device=dev) for ly in self._layers]
        S = [torch.zeros(ly.d_out, ly.d_out, dtype=_F64, device=dev) for ly in self._layers]
        seen = 0
        self._fit_stage("pass 1/2: Kronecker factors")
        for m, acts, pgrads in self._micro_batches(data):
            seen += m
            for i, a in enumerate(acts):
                a2 = self._kron_rows(i, a, None)[0]
                a2 = a2.reshape(-1, a2.shape[-1]).to(cdt)  # type: ignore[union-attr]
                A[i] += (a2.T @ a2).to(_F64)
            for gs in pgrads:
                for i, g in enumerate(gs):
                    g2 = self._kron_rows(i, None, g)[1]
                    g2 = g2.reshape(-1, g2.shape[-1]).to(cdt)  # type: ignore[union-attr]
                    S[i] += (g2.T @ g2).to(_F64)
        if seen != n:
            raise InputError(f"the data source has {n} samples but yielded {seen}")
        eig = []
        self._fit_stage("eigendecompositions")
        for ly, Ai, Si in zip(self._layers, A, S):
            for key, M in (("A", Ai), ("S", Si)):
                M /= n
                if not bool(torch.isfinite(M).all()):
                    raise NonFiniteError(
                        f"non-finite {key} factor for layer {ly.module!r}; check inputs and loss"
                    )
            eig.append((torch.linalg.eigh(Ai), torch.linalg.eigh(Si)))
        del A, S
        Q = [(ea.eigenvectors.to(cdt), es.eigenvectors.to(cdt)) for ea, es in eig]
        lam = [torch.zeros(ly.d_out, ly.d_a, dtype=_F64, device=dev) for ly in self._layers]
        factor: list[bool] | None = None
        seen2 = 0
        self._fit_stage("pass 2/2: eigenvalue correction")
        for m, acts, pgrads in self._micro_batches(data):
            seen2 += m
            a_rot: list[torch.Tensor | None] = [None] * len(acts)
            for gs in pgrads:
                if factor is None:  # per layer: rotate factor rows or formed gradients
                    factor = []
                    for i, (a, g) in enumerate(zip(acts, gs)):
                        form, dense, fac = self._rotation_costs(i, self._positions(i, a, g))
                        factor.append(fac <= form + dense)
                for i, (a, g) in enumerate(zip(acts, gs)):
                    QA, QS = Q[i]
                    if factor[i]:
                        if a_rot[i] is None:  # shared by the pseudo-gradients
                            a_rot[i] = self._kron_rows(i, a, None)[0].to(cdt) @ QA
                        g_rot = self._kron_rows(i, None, g)[1].to(cdt) @ QS
                        Gt = g_rot.transpose(1, 2) @ a_rot[i]
                    else:
                        Gc = self._layers[i].to_combined(self._layer_flat(i, a, g).to(cdt))
                        Gt = QS.T @ Gc @ QA
                    lam[i] += (Gt * Gt).sum(0).to(_F64)
        if seen2 != seen:
            raise InputError(
                f"the data source yielded {seen} samples in the first pass and {seen2} in the "
                "second; use a deterministic data source"
            )
        state = []
        eps = float(torch.finfo(self.grads.dtype).eps)
        for i, (ly, block) in enumerate(zip(self._layers, self.blocks)):
            L = lam[i] / n
            if not bool(torch.isfinite(L).all()):
                raise NonFiniteError(f"non-finite eigenvalues for layer {block.name!r}")
            # Lambda + lambda singular / not positive: checked by InfluenceModel.fit
            self._pending_spectra[i] = Spectrum("ek-fac", block.numel, eigenvalues=L,
                                                complete=True, psd=True, eps=eps)
            (wa, QA), (ws, QS) = eig[i]
            state.append({"A_eigenvectors": QA, "S_eigenvectors": QS, "eigenvalues": L,
                          "A_eigenvalues": wa, "S_eigenvalues": ws})
            self.info["fit"].append({"block": block.name, "layer": ly.module, "d_a": ly.d_a,
                                     "d_out": ly.d_out, "min_eigenvalue": float(L.min()),
                                     "max_eigenvalue": float(L.max()), "data_passes": 2})
        return state

    def _estimate_spectrum(self, index: int, block: ParamBlock, spectrum: Spectrum | None,
                           data: DataLike, probes: int, steps: int) -> Spectrum | None:
        """:meth:`diagnostics` with data: the error of the EK-FAC curvature against the
        layer's Gauss-Newton block on ``probes`` seeded Gaussian vectors (one data pass)."""
        if spectrum is None or spectrum.error is not None:
            return spectrum
        Z = probe_vectors(block.numel, probes, self._diagnostics_rng(index), self.grads.device)
        Z = Z.to(self.grads.dtype).to(_F64)
        HZ = self.grads.hvp(Z.to(self.grads.dtype), data, block, "gauss-newton").to(_F64)
        lam = self._state[index]["eigenvalues"]  # type: ignore[index]
        spectrum.error = operator_error(Z, HZ, self._apply_block(index, Z, lam).to(_F64),
                                        "||H z - H_ekfac z|| / ||H z|| on seeded Gaussian z "
                                        "(H: the layer's Gauss-Newton block)")
        return spectrum

    # ------------------------------------------------------------------ preconditioning
    def _apply_combined(self, i: int, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``Q diag(scale) Q^T g`` for flat gradient rows ``g`` of block ``i``, as combined
        ``(n, d_out, d_a)`` float64 matrices."""
        s, ly = self._state[i], self._layers[i]  # type: ignore[index]
        QA, QS = s["A_eigenvectors"], s["S_eigenvectors"]
        G = ly.to_combined(g.to(device=QA.device, dtype=_F64))
        Gt = QS.T @ G @ QA
        return QS @ (Gt * scale) @ QA.T

    def _apply_block(self, i: int, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``Q diag(scale) Q^T g`` for flat gradient rows ``g`` of block ``i`` (float64)."""
        return self._layers[i].to_flat(self._apply_combined(i, g, scale))

    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        lam = self._state[i]["eigenvalues"]  # type: ignore[index]
        return self._apply_block(i, g, 1.0 / (lam + reg))

    # ------------------------------------------------------------------ compressed test factors
    def _layer_ranks(self) -> list[int | None]:
        """Per layer, the stored rank of its test factor; ``None``: the exact dense ``P``
        (``rank=None``, or a rank-``r`` factorisation would not be smaller than ``P``)."""
        r = self.rank
        return [r if r is not None and (ly.d_out + ly.d_a) * r < ly.d_out * ly.d_a else None
                for ly in self._layers]

    def _test_widths(self) -> list[int]:
        """Per layer, the width of its segment of a test feature row."""
        return [ly.d_out * ly.d_a if r is None else (ly.d_out + ly.d_a) * r
                for ly, r in zip(self._layers, self._layer_ranks())]

    def _segments(self, T: torch.Tensor) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        """Per layer, the flat dense ``P`` rows ``(n, p_l)`` or the low-rank factors
        ``(U S (n, d_out, r), V (n, d_a, r))`` of compressed test feature rows ``T``."""
        widths = self._test_widths()
        if T.ndim != 2 or T.shape[1] != sum(widths):
            raise InputError(f"expected compressed test features of shape (n, {sum(widths)}) "
                             f"(rank={self.rank}), got {tuple(T.shape)}")
        n, o = T.shape[0], 0
        for ly, r, w in zip(self._layers, self._layer_ranks(), widths):
            seg = T[:, o : o + w]
            o += w
            if r is None:
                yield seg
            else:
                k = ly.d_out * r
                yield (seg[:, :k].reshape(n, ly.d_out, r), seg[:, k:].reshape(n, ly.d_a, r))

    def _check_train(self, R: torch.Tensor) -> None:
        p = self.grads.num_params
        if R.ndim != 2 or R.shape[1] != p:
            raise InputError(f"expected gradient rows of shape (n, {p}), got {tuple(R.shape)}")

    def test_features(self, g: torch.Tensor) -> torch.Tensor:
        """Preconditioned test gradients ``(n, p)``; with ``rank=r`` their compressed rows:
        per layer ``[(U_r diag(s_r)).ravel(), V_r.ravel()]`` of the truncated SVD
        ``P ~ U_r diag(s_r) V_r^T`` (or the flat exact ``P`` where that is not larger),
        concatenated over layers: ``feature_dims()[0]`` floats per row."""
        if self.rank is None:
            return super().test_features(g)
        self._check_fitted()
        self._check_train(g)
        widths = self._test_widths()
        out = torch.empty(g.shape[0], sum(widths), dtype=g.dtype, device=g.device)
        o = 0
        for i, (ly, block, sl, r, w) in enumerate(zip(self._layers, self.blocks,
                                                      self.grads.block_slices,
                                                      self._layer_ranks(), widths)):
            scale = 1.0 / (self._state[i]["eigenvalues"]  # type: ignore[index]
                           + self.regularization[block.name])
            # blocks of test rows: the float64 P and its SVD stay within ~_TILE_BLOCK elements
            b = max(1, _TILE_BLOCK // (ly.d_out * ly.d_a))
            for j in range(0, g.shape[0], b):
                P = self._apply_combined(i, g[j : j + b, sl], scale)
                if r is None:
                    out[j : j + b, o : o + w] = ly.to_flat(P)
                    continue
                U, sv, Vh = torch.linalg.svd(P, full_matrices=False)
                m = len(P)
                out[j : j + b, o : o + w] = torch.cat(
                    [(U[..., :r] * sv[:, None, :r]).reshape(m, -1),
                     Vh[:, :r].transpose(1, 2).reshape(m, -1)], 1)
            o += w
        return out

    def expand_test_features(self, T: torch.Tensor) -> torch.Tensor:
        """The ``(n, p)`` preconditioned gradients that compressed test feature rows stand
        for (``U_r diag(s_r) V_r^T`` per layer, flat (weight, bias) order). For inspection
        and :meth:`influence_factors`; tiles never build it."""
        if self.rank is None:
            return T
        parts = []
        for ly, seg in zip(self._layers, self._segments(T)):
            if isinstance(seg, tuple):
                U, V = seg
                seg = ly.to_flat(torch.bmm(U, V.transpose(1, 2)))
            parts.append(seg)
        return torch.cat(parts, 1)

    def feature_dims(self) -> tuple[int, int]:
        """``(k_test, p)``: with ``rank=r``, ``k_test = sum_l (d_out + d_a) r`` over the
        compressed layers plus ``d_out d_a`` over the others; ``(p, p)`` without ``rank``."""
        p = self.grads.num_params
        return sum(self._test_widths()), p

    def tile_multiply_adds(self, n_test: int, n_train: int, k_train: int | None = None) -> int:
        """Multiply-adds of one :meth:`tile`: with ``rank``, per compressed layer the cheaper
        of :func:`_low_rank_tile`'s orders (mostly the expansion of each test row's factors,
        ``d_out d_a r``, on top of the product ``n_train d_out d_a``), per dense layer
        ``n_test n_train d_out d_a``."""
        if self.rank is None:
            return super().tile_multiply_adds(n_test, n_train, k_train)
        n_t, n_s, total = int(n_test), int(n_train), 0
        for ly, r in zip(self._layers, self._layer_ranks()):
            total += (n_t * n_s * ly.d_out * ly.d_a if r is None
                      else n_t * min(_tile_orders(n_s, ly.d_out, ly.d_a, r)))
        return total

    def tile(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Influences ``(n_test, n_train)`` of (compressed) test features on raw train
        gradients, summed layer by layer (see the module docstring for the cost)."""
        if self.rank is None:
            return super().tile(test_features, train_features)
        R = train_features
        self._check_train(R)
        T = test_features.to(device=R.device, dtype=R.dtype)
        out = torch.zeros(T.shape[0], R.shape[0], dtype=R.dtype, device=R.device)
        for ly, sl, seg in zip(self._layers, self.grads.block_slices, self._segments(T)):
            if isinstance(seg, tuple):
                _low_rank_tile(*seg, ly.to_combined(R[:, sl]), out)
            else:
                out.addmm_(seg, R[:, sl].T)
        return out

    def paired(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Row-wise influences ``(n,)`` of matching rows: ``sum_l <U_l S_l V_l^T, G_l>`` with
        ``G_l V_l`` first (``n d_out d_a r`` flops, ``n d_out r`` extra memory per layer)."""
        if self.rank is None:
            return super().paired(test_features, train_features)
        R = train_features
        self._check_train(R)
        T = test_features.to(device=R.device, dtype=R.dtype)
        if T.shape[0] != R.shape[0]:
            raise InputError(f"paired: {T.shape[0]} test rows but {R.shape[0]} train rows")
        out = torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)
        for ly, sl, seg in zip(self._layers, self.grads.block_slices, self._segments(T)):
            if isinstance(seg, tuple):
                U, V = seg
                out += (torch.bmm(ly.to_combined(R[:, sl]), V) * U).sum((1, 2))
            else:
                out += (seg * R[:, sl]).sum(1)
        return out

    def _factor_rows(self, g: torch.Tensor) -> torch.Tensor:
        """:meth:`influence_factors` rows: ``(H + lambda I)^{-1} g``; with ``rank=r`` the
        expansion of its rank-``r`` compression (so that :meth:`influences` equals the
        calculator's tiles); the compact rows are :meth:`test_features`."""
        if self.rank is None:
            return self.precondition(g)
        return self.expand_test_features(self.test_features(g))

    # ------------------------------------------------------------------ in-memory streaming
    def _scale(self, i: int) -> torch.Tensor:
        """``1 / (Lambda + lambda)`` of block ``i``, ``(d_out, d_a)`` float64."""
        lam = self._state[i]["eigenvalues"]  # type: ignore[index]
        return 1.0 / (lam + self.regularization[self.blocks[i].name])

    def _rotated_factors(self, i: int, a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s factor rows in the Kronecker eigenbasis: ``(Q_S^T g_l)`` as
        ``(m, L, d_out)`` and ``(Q_A^T a_l)`` as ``(m, L, d_a)``, in ``dtype``."""
        st = self._state[i]  # type: ignore[index]
        A, Gm = self._kron_rows(i, a, g)
        QA, QS = st["A_eigenvectors"].to(dtype), st["S_eigenvectors"].to(dtype)
        return Gm.to(dtype) @ QS, A.to(dtype) @ QA  # type: ignore[union-attr]

    def _rotated(self, i: int, a: torch.Tensor, g: torch.Tensor, factor: bool,
                 dtype: torch.dtype = _F64) -> torch.Tensor:
        """``Q_S^T G Q_A`` per sample, ``(m, d_out, d_a)`` in ``dtype``, for layer ``i``'s raw
        rows: from the factor rows (``factor``: ``sum_l (Q_S^T g_l)(Q_A^T a_l)^T``, cost
        ``L (d_a^2 + d_out^2 + d_out d_a)`` per sample) or from the formed gradient
        (``L d_out d_a + d_out^2 d_a + d_out d_a^2``)."""
        if factor:
            gr, ar = self._rotated_factors(i, a, g, dtype)
            return gr.transpose(1, 2) @ ar
        st, ly = self._state[i], self._layers[i]  # type: ignore[index]
        QA, QS = st["A_eigenvectors"].to(dtype), st["S_eigenvectors"].to(dtype)
        return QS.T @ ly.to_combined(self._layer_flat(i, a, g).to(dtype)) @ QA

    def _stream_dims(self, x_test: Any, y_test: Any, n_test: int, n_train: int
                     ) -> tuple[int, int]:
        """Plan of the uncompressed in-memory paths (``rank=None``; with ``rank`` the
        calculators' features are used). One probe test sample gives each layer's number of
        positions ``L``; each layer's segment of the streamed rows is then one of

        * ``"orig"`` (original basis): test rows ``P = Q_S [(Q_S^T G Q_A) / (Lambda +
          lambda)] Q_A^T`` (``d_out d_a`` floats), train rows the gradients ``G``;
        * ``"eig"`` (eigenbasis): test rows ``(Q_S^T G Q_A) / (Lambda + lambda)``, train
          rows ``Q_S^T G Q_A`` (``d_out d_a`` floats each);
        * ``"low"`` (exact factors, when ``L (d_out + d_a) < d_out d_a``: deep convolutions
          with few output pixels, dense layers): test rows the factor rows in the eigenbasis,
          ``[Q_S^T g_l]_l`` and ``[Q_A^T a_l]_l`` (``L (d_out + d_a)`` floats: the test
          gradient ``sum_l g_l a_l^T`` has rank ``L``), train rows ``(Q_S^T G Q_A) /
          (Lambda + lambda)``; a tile expands the test side block by block
          (:func:`_low_rank_tile`, ``L / n_batch`` of the layer's tile product extra).

        ``"low"`` wherever it is smaller; between ``"orig"`` and ``"eig"`` the one with fewer
        multiply-adds for ``n_test`` and ``n_train`` rows (rotating factor rows into the
        eigenbasis costs ``L (d_a^2 + d_out^2 + d_out d_a)`` per sample, rotating a test
        row back ``d_out^2 d_a + d_out d_a^2``). The inner products are the same (``Q`` is
        orthogonal): influences agree with the calculators' to round-off. Rotations run in
        the model's dtype (float64 for float64 models), the stored rows too."""
        self._stream_plan: list[tuple[str, bool, int]] | None = None
        if self.rank is not None:
            return super()._stream_dims(x_test, y_test, n_test, n_train)
        _, rows = next(self._layer_rows(x_test[:1], y_test[:1]))
        plan = []
        for i, (ly, (a, g)) in enumerate(zip(self._layers, rows)):
            L = self._positions(i, a, g)
            form, dense, fac = self._rotation_costs(i, L)
            rot = min(fac, form + dense)
            do, da = ly.d_out, ly.d_a
            if L * (do + da) < do * da:
                mode = "low"
            elif (n_test + n_train) * rot <= n_train * form + n_test * (form + 2 * dense):
                mode = "eig"
            else:
                mode = "orig"
            plan.append((mode, fac <= form + dense, L))
        self._stream_plan = plan
        # a training row is held one layer segment at a time (and its rotated copy)
        return sum(self._stream_widths()), 2 * max(b.numel for b in self.blocks)

    def _stream_widths(self) -> list[int]:
        """Per layer, the width of its segment of a streamed test row."""
        assert self._stream_plan is not None
        return [L * (ly.d_out + ly.d_a) if mode == "low" else ly.d_out * ly.d_a
                for ly, (mode, _, L) in zip(self._layers, self._stream_plan)]

    def _stream_test(self, x: Any, y: Any) -> torch.Tensor:
        """Test rows of ``(x, y)`` in the plan's per-layer forms (:meth:`_stream_dims`), in
        the model's dtype, ``(n, sum widths)``."""
        if self.rank is not None:
            return super()._stream_test(x, y)
        plan = self._stream_plan
        assert plan is not None
        dt = self.grads.dtype
        cdt = torch.promote_types(dt, torch.float32)
        widths = self._stream_widths()
        out: torch.Tensor | None = None
        for s, rows in self._layer_rows(x, y):
            m = len(rows[0][1])
            if out is None:
                out = torch.empty(_num_rows(x, y, "data"), sum(widths), dtype=dt,
                                  device=self.grads.device)
            o = 0
            for i, ((a, g), (mode, factor, L), w) in enumerate(zip(rows, plan, widths)):
                dst = out[s : s + m, o : o + w]
                o += w
                if mode == "orig":
                    dst.copy_(self._apply_block(i, self._layer_flat(i, a, g), self._scale(i)))
                elif mode == "low":
                    gr, ar = self._rotated_factors(i, a, g, cdt)
                    if gr.shape[1] != L:
                        raise InputError(
                            f"layer {self._layers[i].module!r}: test samples with {gr.shape[1]} "
                            f"positions, the first had {L}; pass test inputs of one shape")
                    k = L * self._layers[i].d_out
                    dst[:, :k] = gr.transpose(1, 2).reshape(m, k)  # U: (d_out, L)
                    dst[:, k:] = ar.transpose(1, 2).reshape(m, -1)  # V: (d_a, L)
                else:
                    Gt = self._rotated(i, a, g, factor, cdt)
                    dst.copy_((Gt * self._scale(i).to(cdt)).reshape(m, -1))
            _check_finite_rows(out[s : s + m], s)
        assert out is not None
        return out

    def _stream_tiles(self, test_rows: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        """Influences of the streamed test rows on one batch of training data, layer by
        layer and micro-batch by micro-batch: each layer's train segment (``G``, ``Q_S^T G
        Q_A`` or its scaled form, per the plan) is computed, multiplied into the tile and
        dropped, so a batch never holds a ``p``-wide row (:func:`_low_rank_tile` for
        ``"low"`` layers)."""
        if self.rank is not None:
            return super()._stream_tiles(test_rows, x, y)
        plan = self._stream_plan
        assert plan is not None
        T = test_rows
        dt = self.grads.dtype
        cdt = torch.promote_types(dt, torch.float32)
        widths = self._stream_widths()
        out = torch.empty(len(T), _num_rows(x, y, "data"), dtype=dt, device=self.grads.device)
        for s, rows in self._layer_rows(x, y):
            m = len(rows[0][1])
            acc = torch.zeros(len(T), m, dtype=dt, device=out.device)
            o = 0
            for i, ((a, g), (mode, factor, L), w) in enumerate(zip(rows, plan, widths)):
                ly, seg = self._layers[i], T[:, o : o + w]
                o += w
                if mode == "orig":
                    acc.addmm_(seg, self._layer_flat(i, a, g).T)
                    continue
                Gt = self._rotated(i, a, g, factor, cdt)
                if mode == "eig":
                    acc.addmm_(seg, Gt.reshape(m, -1).to(dt).T)
                    continue
                Gt *= self._scale(i).to(cdt)
                k = L * ly.d_out
                _low_rank_tile(seg[:, :k].reshape(len(T), ly.d_out, L),
                               seg[:, k:].reshape(len(T), ly.d_a, L), Gt.to(dt), acc)
            if not bool(torch.isfinite(acc).all()):  # a non-finite gradient poisons its column
                bad = (~torch.isfinite(acc)).any(0).nonzero().flatten() + s
                raise NonFiniteError(
                    f"non-finite loss gradient for sample(s) {bad[:10].tolist()}; check the "
                    "inputs, labels and loss (e.g. log of 0)")
            out[:, s : s + m] = acc
        return out

    def _stream_self(self, x: Any, y: Any) -> torch.Tensor:
        """Self-influences of one batch: ``sum_l sum ((Q_S^T G_l Q_A)^2 / (Lambda_l +
        lambda))`` (uncompressed), or :meth:`paired` of the compressed test factors."""
        if self.rank is not None:
            return super()._stream_self(x, y)
        plan = self._stream_plan
        assert plan is not None
        cdt = torch.promote_types(self.grads.dtype, torch.float32)
        parts = []
        for _, rows in self._layer_rows(x, y):
            acc = torch.zeros(len(rows[0][1]), dtype=_F64, device=self.grads.device)
            for i, ((a, g), (_, factor, _)) in enumerate(zip(rows, plan)):
                Gt = self._rotated(i, a, g, factor, cdt)
                acc += (Gt * Gt * self._scale(i).to(cdt)).sum((1, 2), dtype=_F64)
            if not bool(torch.isfinite(acc).all()):
                _check_finite_rows(acc[:, None], 0)
            parts.append(acc)
        return torch.cat(parts).to(self.grads.dtype)

    def curvature_matrix(self, block: int = 0) -> torch.Tensor:
        """The fitted EK-FAC curvature ``Q diag(Lambda) Q^T`` of one block, ``(p_b, p_b)``
        float64 in flat (weight, bias) order; for inspection of small layers."""
        self._check_fitted()
        p = self.blocks[block].numel
        eye = torch.eye(p, dtype=_F64, device=self.grads.device)
        M = self._apply_block(block, eye, self._state[block]["eigenvalues"])  # type: ignore[index]
        return 0.5 * (M + M.T)
