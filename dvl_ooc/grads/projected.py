"""Gradients and Gauss-Newton curvature in the projected ``k``-dimensional feature space.

:class:`ProjectedGradients` has the interface of :class:`~dvl_ooc.grads.ModelGradients`
(what every influence model uses through ``self.grads``), but a "gradient" is the
``k``-dimensional feature ``P g_i`` of a :class:`~dvl_ooc.layers.GradientProjector`
(per-layer Kronecker projections, a dense projection for the other parameters) and the
curvature is the **projected Gauss-Newton matrix**

    P GGN P^T = (1/n) sum_i P J_i^T H_out,i J_i P^T = (1/n) sum_i sum_c f_ic f_ic^T,
    f_ic = P J_i^T l_ic,    H_out,i = L_i L_i^T = sum_c l_ic l_ic^T

(``J_i`` the output Jacobian of sample ``i``, ``H_out,i`` the Hessian of its loss w.r.t. the
outputs, factored by :func:`~dvl_ooc.grads.functional.output_hessian_factors`). The features
``f_ic`` of the "pseudo-gradients" ``J_i^T l_ic`` come from one forward pass and ``c``
backward passes seeded by ``l_ic`` (:meth:`GradientProjector.project_output_vectors
<dvl_ooc.layers.GradientProjector.project_output_vectors>`); neither ``J_i`` nor a
``p``-dimensional vector is ever formed. With every projection side at full size (``k_in``,
``k_out``, ``dense_dim`` at least the dimensions, so each matrix is the identity) the features
are the exact gradients rearranged, and influences equal the unprojected Gauss-Newton ones.

Only ``mode="gauss-newton"`` exists: the exact Hessian's second-order term ``sum_o (d l / d
o) d^2 o / d theta^2`` has no per-sample factorisation through the projection. The projected
matrix is therefore positive semi-definite by construction (for losses convex in the outputs):
the influence models' curvature diagnostics report the lower bound 0 where they do not know
the whole spectrum, and their indefinite-curvature policy
(:mod:`dvl_ooc.influence.diagnostics`) can only fire on rounding, never on the model.

Cost (``n`` samples, ``k`` features, ``c`` output-Hessian factors per sample, ``c <=`` number
of outputs, ``c - 1`` for softmax cross-entropy):

* features (:meth:`~ProjectedGradients.per_sample_grads`): one forward and one backward pass
  per sample plus the projector's small products; ``k`` floats per sample.
* explicit curvature (:meth:`~ProjectedGradients.hessian`): one forward and ``c`` backward
  passes per sample, ``O(c^3)`` for the output-Hessian factors, and ``n c k^2`` FLOPs for the
  ``k x k`` float64 matrix (``8 k^2`` bytes; a ``(m c, k)`` temporary per micro-batch).
* curvature products (:meth:`~ProjectedGradients.hvp`) of ``r`` vectors: the same passes
  plus ``4 n c k r`` FLOPs, one pass over the data for all ``r``.

Accuracy against the unprojected Gauss-Newton Direct influences (float64 digits problems of
``tests/conftest.py``; mean over seeds 0-2 of the relative Frobenius error of the test x train
matrix, Pearson r in brackets; ``k_in = k_out = K``; ``lambda`` relative to the top GGN
eigenvalue; ``tests/influence/test_projected.py``)::

    MLP 64-12-10 (p = 910)   K:      2            8            16           32 (k=514)
      lambda 1e-3 * top        0.94 (0.39)  0.61 (0.83)  0.32 (0.95)  0.24 (0.97)
      lambda 1e-1 * top        0.90 (0.48)  0.62 (0.81)  0.25 (0.97)  0.18 (0.99)
    CNN width 3 (p = 628)    K:      2            8            16           32 (k=p)
      lambda 1e-3 * top        1.12 (0.11)  0.85 (0.57)  0.39 (0.92)  exact
      lambda 1e-1 * top        0.94 (0.71)  0.43 (0.90)  0.15 (0.99)  exact

At full size (every side capped, the identity) the influences equal the unprojected ones to
round-off; the error falls steadily with ``K`` in between.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import DataLike
from ..exceptions import InputError, NonFiniteError
from .functional import (
    MODEL_LOCK,
    BatchSource,
    HessianMode,
    LossFn,
    ParamBlock,
    output_hessian_factors,
)

__all__ = ["ProjectedGradients"]


#: rows per update of the explicit projected Gauss-Newton matrix (see ``hessian``)
_GRAM_ROWS = 1024


def _check_mode(mode: str) -> None:
    if mode == "exact":
        raise InputError(
            "projected gradients have no exact Hessian (its second-order term does not "
            "factor through the projection); use hessian='gauss-newton' (the default), or "
            "drop projection= for the exact Hessian in parameter space"
        )
    if mode != "gauss-newton":
        raise InputError(f"hessian must be 'gauss-newton' with a projection, got {mode!r}")


class ProjectedGradients(BatchSource):
    """Per-sample features and projected Gauss-Newton curvature of a model's loss, in the
    ``k``-dimensional space of a :class:`~dvl_ooc.layers.GradientProjector` (see the module
    docstring for the algorithm and costs). Drop-in for :class:`~dvl_ooc.grads.ModelGradients`
    in the influence models.

    Args:
        projector: the projection (its model, parameter selection, sizes and seed); the
            features are in its ``dtype``.
        loss: mean-reduced loss ``loss(outputs, targets)``.
        blocks: ``"model"`` (one block of all ``k`` features) or ``"layer"`` (one block per
            entry of :meth:`~dvl_ooc.layers.GradientProjector.layout`: each projected layer,
            then the dense block). A :class:`~dvl_ooc.grads.ParamBlock` here describes
            feature slices: ``names`` are layout entries (module names, ``"<dense>"``),
            ``shapes`` their ``(k_out, k_in)`` or ``(dense_dim,)``.
        micro_batch_size: samples per micro-batch of :meth:`batches` (the curvature passes).
        vector_chunk: kept for interface compatibility (curvature products here take any
            number of vectors at once).
    """

    def __init__(
        self,
        projector: Any,
        loss: LossFn,
        blocks: str | Mapping[str, Sequence[str]] = "model",
        *,
        micro_batch_size: int = 64,
        vector_chunk: int = 64,
    ) -> None:
        from ..layers.projection import GradientProjector

        if not isinstance(projector, GradientProjector):
            raise InputError(
                f"projector must be a GradientProjector, got {type(projector).__name__}")
        if not callable(loss):
            raise InputError("loss must be a callable loss(outputs, targets)")
        if micro_batch_size < 1 or vector_chunk < 1:
            raise InputError("micro_batch_size and vector_chunk must be >= 1")
        self.projector = projector
        self.loss = loss
        self.micro_batch_size = int(micro_batch_size)
        self.vector_chunk = int(vector_chunk)
        layout = projector.layout()

        def label(b: Any) -> str:
            return b.name or "<root>"

        if blocks == "model":
            self.blocks = [ParamBlock("model", tuple(label(b) for b in layout),
                                      tuple(tuple(b.shape) for b in layout))]
            self.block_slices = [slice(0, projector.feature_dim)]
        elif blocks == "layer":
            self.blocks = [ParamBlock(label(b), (label(b),), (tuple(b.shape),))
                           for b in layout]
            self.block_slices = [b.slice for b in layout]
        else:
            raise InputError(
                f"with projection=, blocks must be 'model' or 'layer' (one block per projected "
                f"layer and one for the dense part), got {blocks!r}")
        self.num_params = projector.feature_dim

    # ------------------------------------------------------------------ description
    @property
    def model(self) -> nn.Module:
        return self.projector.model

    @property
    def layers(self) -> list[str] | None:
        return self.projector.layers

    @property
    def param_names(self) -> list[str]:
        """The attributed (projected) parameters, in the projector's order."""
        return list(self.projector.param_names)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the features (the projector's)."""
        return self.projector.dtype

    @property
    def device(self) -> torch.device:
        with MODEL_LOCK:
            return self.projector._device()

    def _model_dtype(self) -> torch.dtype:
        with MODEL_LOCK:
            return self.projector._model_dtype()

    def __repr__(self) -> str:
        return f"ProjectedGradients(k={self.num_params}, blocks={len(self.blocks)}, " \
               f"{self.projector!r})"

    # ------------------------------------------------------------------ data
    def _input_dtype(self) -> torch.dtype:
        return self._model_dtype()

    # ------------------------------------------------------------------ features
    def _block_index(self, block: ParamBlock) -> int:
        for i, b in enumerate(self.blocks):
            if b == block:
                return i
        raise InputError(f"unknown block {block.name!r}; blocks are "
                         f"{[b.name for b in self.blocks]}")

    def per_sample_grads(self, x: Any, y: Any, block: ParamBlock | None = None
                         ) -> torch.Tensor:
        """Projected per-sample loss gradients ``P g_i``, shape ``(n, k)`` (or the block's
        ``(n, k_b)`` columns), in :attr:`dtype`."""
        x, y = self._prepare(x, y)
        f = self.projector.project(x, y, self.loss)
        if block is None:
            return f
        return f[:, self.block_slices[self._block_index(block)]].contiguous()

    def _factor_features(self, data: DataLike, block: ParamBlock
                         ) -> Iterator[torch.Tensor]:
        """Per micro-batch, the float64 projected pseudo-gradients ``f_ic`` of the block,
        ``(m, c, k_b)``: ``sum_c f_ic f_ic^T = (P J_i^T H_out,i J_i P^T)_b``."""
        sl = self.block_slices[self._block_index(block)]
        for F in self._all_factor_features(data):
            yield F[:, :, sl]

    def _all_factor_features(self, data: DataLike) -> Iterator[torch.Tensor]:
        """Per micro-batch, the float64 projected pseudo-gradients of all blocks,
        ``(m, c, k)``."""
        loss = self.loss

        def factors(out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
            return output_hessian_factors(
                out, y, loss, fix="projected curvature needs a loss convex in the outputs "
                "(cross-entropy, squared error)")

        for xb, yb in self.batches(data):
            F = self.projector.project_output_vectors(xb, factors, yb)  # (c, m, k)
            yield F.transpose(0, 1).to(torch.float64)

    # ------------------------------------------------------------------ curvature
    def gauss_newton_factors(self, data: DataLike, block: ParamBlock
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per micro-batch, float64 ``J (m, c, k_b)`` (the projected pseudo-gradients) and
        identity ``H_out (m, c, c)``, so that ``P GGN P^T = sum_i J_i^T H_out,i J_i / n`` as
        for :meth:`ModelGradients.gauss_newton_factors
        <dvl_ooc.grads.ModelGradients.gauss_newton_factors>`."""
        for F in self._factor_features(data, block):
            m, c = F.shape[:2]
            eye = torch.eye(c, dtype=torch.float64, device=F.device).expand(m, c, c)
            yield F, eye

    def hessian(self, data: DataLike, block: ParamBlock,
                mode: HessianMode = "gauss-newton") -> torch.Tensor:
        """The explicit ``(k_b, k_b)`` projected Gauss-Newton matrix of the mean loss, float64:
        ``(1/n) sum_i sum_c f_ic f_ic^T`` (one forward and ``c`` backward passes per sample,
        ``n c k_b^2`` FLOPs)."""
        return self.hessians(data, [block], mode)[0]

    def hessians(self, data: DataLike, blocks: Sequence[ParamBlock],
                 mode: HessianMode = "gauss-newton") -> list[torch.Tensor]:
        """:meth:`hessian` of several blocks from one data pass (the projection computes every
        block's features anyway): ``[(k_b, k_b)]`` float64, equal to one call per block."""
        _check_mode(mode)
        sls = [self.block_slices[self._block_index(b)] for b in blocks]
        Hs = [torch.zeros(b.numel, b.numel, dtype=torch.float64, device=self.device)
              for b in blocks]
        # rows are gathered into blocks of >= _GRAM_ROWS before each update: one rank-m update
        # reads and writes all k^2 entries, so tiny updates (a micro-batch) are memory-bound
        rows: list[list[torch.Tensor]] = [[] for _ in blocks]
        n = held = 0

        def flush() -> None:
            for H, r in zip(Hs, rows):
                B = torch.cat(r)
                H.addmm_(B.T, B)
                r.clear()

        for F in self._all_factor_features(data):
            for r, sl, b in zip(rows, sls, blocks):
                r.append(F[:, :, sl].reshape(-1, b.numel))
            held += F.shape[0] * F.shape[1]
            n += F.shape[0]
            if held >= _GRAM_ROWS:
                flush()
                held = 0
        if held:
            flush()
        if n == 0:
            raise InputError("no samples in the fit data")
        out = []
        for H in Hs:
            H = 0.5 * (H + H.T) / n
            if not bool(torch.isfinite(H).all()):
                raise NonFiniteError("the curvature matrix has non-finite entries; check the "
                                     "loss")
            out.append(H)
        return out

    def hvp(self, v: torch.Tensor, data: DataLike, block: ParamBlock,
            mode: HessianMode = "gauss-newton") -> torch.Tensor:
        """Products ``(P GGN P^T)_b v`` of the mean loss over ``data``, one data pass for all
        vectors. ``v``: ``(r, k_b)`` or ``(k_b,)``; the result has the same shape, in
        :attr:`dtype` (accumulated in float64)."""
        _check_mode(mode)
        single = v.ndim == 1
        V = v.reshape(-1, block.numel).to(device=self.device, dtype=torch.float64)
        acc = torch.zeros_like(V)
        n = 0
        for F in self._factor_features(data, block):
            Fm = F.reshape(-1, block.numel)
            acc += (V @ Fm.T) @ Fm
            n += F.shape[0]
        if n == 0:
            raise InputError("no samples in the data")
        acc = (acc / n).to(self.dtype)
        return acc[0] if single else acc
