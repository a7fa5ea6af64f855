"""EK-FAC influence: eigenvalue-corrected Kronecker-factored Gauss-Newton, per layer.

Per-sample gradients of ``nn.Linear`` / ``nn.Conv2d`` layers factorise. For one layer and
sample ``i``, with ``a_il`` the layer input at position ``l`` (a sequence position for
``Linear``, an unfolded patch for ``Conv2d``; a trailing 1 stands for the bias) and ``g_il``
the gradient of the per-sample loss w.r.t. the layer output at that position,

    G_i = sum_l g_il a_il^T                          (d_out x d_in[+1], "combined" gradient)

One block per layer (parameters of other layers are ignored: block-diagonal curvature).
``layers=`` restricts which ``Linear`` / ``Conv2d`` layers are factored (and attributed); the
other parameters, trainable or not, are then constants.

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

Cost per layer with ``d_a = d_in[+1]``, ``d_g = d_out``, ``L`` positions: factors
``O(n L (d_a^2 + k d_g^2))``, eigenvalue correction ``O(n k L d_g d_a)`` (``k`` pseudo-gradients
per sample), state ``d_a^2 + d_g^2 + d_a d_g`` floats, precondition ``O(d_g d_a (d_g + d_a))``
per gradient. The state never grows with the number of training samples. The ``k``
pseudo-gradients of a micro-batch are back-propagated together (one vectorised ``autograd.grad``
w.r.t. the layer outputs, ``is_grads_batched``), in chunks of ``vector_chunk`` vectors, so the
transient memory is about ``min(k, 64)`` times the micro-batch's layer outputs.

The base class's feature split is kept (test features = preconditioned gradients, train
features = raw gradients): rotating train gradients into the eigenbasis would cost as much as
preconditioning them and shrink nothing.

Accuracy: on one layer with ``fisher="ggn"`` the only approximation is the eigenbasis. Against
the exact layer-block GGN the influence correlations grow with the damping (digits MLP/CNN:
Pearson ~0.87 / Spearman ~0.55-0.65 at ``lambda = 1e-3 * top eigenvalue``, >= 0.95 at 0.1).

Fit: :meth:`~dvl_ooc.influence.base.InfluenceModel.fit` calls ``_fit_blocks``, overridden here
because the blocks share two joint passes over the data (factors, then the eigenvalue
correction). ``info["fit"]`` records per block the layer, ``d_a``, ``d_out`` and the range of
the corrected eigenvalues.

Limitations: only ``Linear`` and ``Conv2d`` (``groups=1``, zero padding) parameters may be
attributed; with ``layers=None`` any other trainable parameter (norm affine, bare
``nn.Parameter``) raises :class:`~dvl_ooc.exceptions.UnsupportedModelError`: freeze it with
``requires_grad_(False)`` or name the supported layers in ``layers=`` (the rest is then
ignored). A layer called more than once per forward pass (weight sharing) is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..data import DataLike, num_samples
from ..exceptions import (
    InputError,
    NonFiniteError,
    NoTrainableParametersError,
    RegularizationError,
    UnsupportedModelError,
)
from ..grads import LossFn, ParamBlock
from ..grads.functional import output_hessian_factors, select_parameters
from ..layers import LayerCapture, kind_of
from ..seeding import torch_generator
from .base import InfluenceModel

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


def _layers_of(
    model: nn.Module, layers: Sequence[str] | None = None
) -> tuple[list[_Layer], dict[str, list[str]]]:
    """The EK-FAC blocks of ``model`` (restricted to ``layers``) and the matching block mapping
    for ``ModelGradients``."""
    modules = dict(model.named_modules())
    if not any(p.requires_grad for p in model.parameters()):
        raise NoTrainableParametersError(
            f"{type(model).__name__} has no trainable parameters; unfreeze at least one "
            "nn.Linear or nn.Conv2d layer (requires_grad=True)"
        )
    owned: dict[str, list[str]] = {}
    for pname in select_parameters(model, layers):
        owned.setdefault(pname.rpartition(".")[0], []).append(pname.rpartition(".")[2])
    bad = []
    for mname, local in owned.items():
        mod = modules[mname]
        label = repr(mname) if mname else "the root module"
        try:
            kind = kind_of(mod)
        except UnsupportedModelError:
            kind = None
        if kind is None or not kind.kronecker or not set(local) <= {"weight", "bias"}:
            bad.append(f"{label} ({type(mod).__name__}: trainable {sorted(local)})")
            continue
        try:
            kind.check(mod)
        except UnsupportedModelError as e:
            bad.append(f"{label} ({e})")
    if bad:
        raise UnsupportedModelError(
            "EkfacInfluence supports trainable parameters only in nn.Linear and nn.Conv2d "
            "layers; unsupported: " + "; ".join(bad) + ". Freeze these parameters with "
            "requires_grad_(False), select the supported layers with layers=[...], or use "
            "another influence model (e.g. CgInfluence)."
        )
    layers, mapping = [], {}
    for mname, local in owned.items():
        mod = modules[mname]
        w = mod.weight
        order = [n for n in ("weight", "bias") if n in local]
        layers.append(
            _Layer(mname, "weight" in local, "bias" in local, w.shape[0], w[0].numel())
        )
        mapping[mname or "model"] = [f"{mname}.{n}" if mname else n for n in order]
    return layers, mapping


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
        fisher: ``"ggn"`` (exact GGN factorisation), ``"empirical"`` or ``"sampled"``.
        seed: seed of the label sampling of ``fisher="sampled"``.
        micro_batch_size: samples per micro-batch (bounds memory).
        projection: not supported (``None`` only); EK-FAC has its own structure, see
            :class:`~dvl_ooc.influence.base.InfluenceModel` for the projected methods.
    """

    supported_hessians = ("gauss-newton",)
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
        self._layers, mapping = _layers_of(model, layers)
        self.fisher: FisherMode = fisher
        self.seed = int(seed)
        super().__init__(model, loss, regularization=regularization, blocks=mapping,
                         hessian=hessian, layers=layers,  # type: ignore[arg-type]
                         micro_batch_size=micro_batch_size)

    def _extra_config(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "seed": self.seed}

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

    def _micro_batches(
        self, data: DataLike
    ) -> Iterator[tuple[int, dict[str, torch.Tensor], Iterator[dict[str, torch.Tensor]]]]:
        """Yield ``(m, {layer: a (m, L, d_a)}, pseudo-gradients)`` per micro-batch, where the
        last item lazily yields ``{layer: g (m, L, d_out)}`` once per pseudo-gradient."""
        names = [ly.module for ly in self._layers]
        named = dict(self.model.named_modules())
        mods = {n: named[n] for n in names}
        kinds = {n: kind_of(m, n) for n, m in mods.items()}
        chunk = self.grads.vector_chunk
        gen = torch_generator(self.seed) if self.fisher == "sampled" else None
        for xb, yb in self.grads.batches(data):
            with LayerCapture(self.model, names, keep_outputs=True,
                              output_grads=False) as rec, torch.enable_grad():
                out = self.model(xb)
            for n in names:
                if rec.calls[n] != 1:
                    why = ("is never called in forward (are its weights used directly, e.g. "
                           "inside nn.MultiheadAttention?)" if rec.calls[n] == 0 else
                           f"is called {rec.calls[n]} times per forward (weight sharing)")
                    raise UnsupportedModelError(
                        f"layer {n or type(mods[n]).__name__!r} {why}; EkfacInfluence cannot "
                        "factor it: freeze it with requires_grad_(False)"
                    )
            A = {ly.module: kinds[ly.module].factor_input_rows(
                     mods[ly.module], rec.inputs[ly.module], weight=ly.has_weight,
                     bias=ly.has_bias) for ly in self._layers}
            vs = self._output_vectors(out.detach(), yb, gen)
            layer_out = [rec.outputs[n] for n in names]

            def pseudo_grads(out=out, vs=vs, layer_out=layer_out):
                # one vectorised backward per chunk of vectors: d(v^T out) / d(layer outputs)
                for c in range(0, len(vs), chunk):
                    V = torch.stack(vs[c : c + chunk])
                    gs = torch.autograd.grad(out, layer_out, grad_outputs=V,
                                             retain_graph=c + chunk < len(vs),
                                             is_grads_batched=True, allow_unused=True)
                    missing = [n for n, g in zip(names, gs) if g is None]
                    if missing:
                        raise UnsupportedModelError(
                            f"layers {missing} do not influence the model output; freeze them "
                            "with requires_grad_(False)"
                        )
                    for j in range(len(V)):
                        yield {n: kinds[n].factor_output_rows(mods[n], g[j])
                               for n, g in zip(names, gs)}

            yield len(xb), A, pseudo_grads()

    # ------------------------------------------------------------------ fitting
    def _fit_blocks(self, data: DataLike) -> list[dict[str, torch.Tensor]]:
        """Two joint passes over ``data`` for all blocks: Kronecker factors and their
        eigenbases, then the eigenvalue correction ``Lambda``."""
        n = num_samples(data)
        dev = self.grads.device
        A = {ly.module: torch.zeros(ly.d_a, ly.d_a, dtype=_F64, device=dev)
             for ly in self._layers}
        S = {ly.module: torch.zeros(ly.d_out, ly.d_out, dtype=_F64, device=dev)
             for ly in self._layers}
        seen = 0
        for m, acts, pgrads in self._micro_batches(data):
            seen += m
            for name, a in acts.items():
                a2 = a.reshape(-1, a.shape[-1]).to(_F64)
                A[name] += a2.T @ a2
            for gs in pgrads:
                for name, g in gs.items():
                    g2 = g.reshape(-1, g.shape[-1]).to(_F64)
                    S[name] += g2.T @ g2
        if seen != n:
            raise InputError(f"the data source has {n} samples but yielded {seen}")
        eig = {}
        for name in A:
            for key, M in (("A", A[name]), ("S", S[name])):
                M /= n
                if not bool(torch.isfinite(M).all()):
                    raise NonFiniteError(
                        f"non-finite {key} factor for layer {name!r}; check inputs and loss"
                    )
            eig[name] = (torch.linalg.eigh(A[name]), torch.linalg.eigh(S[name]))
        lam = {ly.module: torch.zeros(ly.d_out, ly.d_a, dtype=_F64, device=dev)
               for ly in self._layers}
        seen2 = 0
        for m, acts, pgrads in self._micro_batches(data):
            seen2 += m
            a_rot = {k: a.to(_F64) @ eig[k][0].eigenvectors for k, a in acts.items()}
            for gs in pgrads:
                for name, g in gs.items():
                    g_rot = g.to(_F64) @ eig[name][1].eigenvectors
                    Gt = torch.einsum("mlo,mli->moi", g_rot, a_rot[name])
                    lam[name] += (Gt * Gt).sum(0)
        if seen2 != seen:
            raise InputError(
                f"the data source yielded {seen} samples in the first pass and {seen2} in the "
                "second; use a deterministic data source"
            )
        state = []
        for ly, block in zip(self._layers, self.blocks):
            L = lam[ly.module] / n
            if not bool(torch.isfinite(L).all()):
                raise NonFiniteError(f"non-finite eigenvalues for layer {block.name!r}")
            reg = self.regularization[block.name]
            floor = 1e-12 * max(1.0, float(L.max()))
            if float((L + reg).min()) <= floor:
                raise RegularizationError(
                    f"Lambda + lambda is singular for block {block.name!r} (min eigenvalue "
                    f"{float(L.min()):.3g}, lambda {reg:.3g}); pass a positive regularization, "
                    "e.g. 1e-3 times the largest eigenvalue"
                )
            (wa, QA), (ws, QS) = eig[ly.module]
            state.append({"A_eigenvectors": QA, "S_eigenvectors": QS, "eigenvalues": L,
                          "A_eigenvalues": wa, "S_eigenvalues": ws})
            self.info["fit"].append({"block": block.name, "layer": ly.module, "d_a": ly.d_a,
                                     "d_out": ly.d_out, "min_eigenvalue": float(L.min()),
                                     "max_eigenvalue": float(L.max()), "data_passes": 2})
        return state

    # ------------------------------------------------------------------ preconditioning
    def _apply_block(self, i: int, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``Q diag(scale) Q^T g`` for flat gradient rows ``g`` of block ``i`` (float64)."""
        s, ly = self._state[i], self._layers[i]  # type: ignore[index]
        QA, QS = s["A_eigenvectors"], s["S_eigenvectors"]
        G = ly.to_combined(g.to(device=QA.device, dtype=_F64))
        Gt = QS.T @ G @ QA
        return ly.to_flat(QS @ (Gt * scale) @ QA.T)

    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        lam = self._state[i]["eigenvalues"]  # type: ignore[index]
        return self._apply_block(i, g, 1.0 / (lam + reg))

    def curvature_matrix(self, block: int = 0) -> torch.Tensor:
        """The fitted EK-FAC curvature ``Q diag(Lambda) Q^T`` of one block, ``(p_b, p_b)``
        float64 in flat (weight, bias) order; for inspection of small layers."""
        self._check_fitted()
        p = self.blocks[block].numel
        eye = torch.eye(p, dtype=_F64, device=self.grads.device)
        M = self._apply_block(block, eye, self._state[block]["eigenvalues"])  # type: ignore[index]
        return 0.5 * (M + M.T)
