"""Direct influence: the explicit curvature matrix, eigendecomposed once.

fit:          H_b = (1/n) sum_i J_i^T (d^2 l_i / d out^2) J_i   (Gauss-Newton, the default)
              or H_b = (1/n) sum_i d^2 l_i / d theta_b^2       (``hessian="exact"``)
              H_b = V diag(w) V^T                              (float64 ``eigh``)
precondition: (H_b + lambda I)^{-1} g = V diag(1 / (w + lambda)) V^T g

Cost: building H needs ``p_b`` Hessian-vector products per sample (exact) or one output
Jacobian per sample (Gauss-Newton); the state is ``p_b^2`` floats per block. Every later
``precondition`` is two matrix products, never a new solve. ``info["fit"]`` records the
extreme eigenvalues of every block.

Diagnostics and indefinite curvature: the whole spectrum is known, so :meth:`diagnostics` is
exact (negative share and mass, condition number, effective rank). With
``hessian="exact"`` on a non-convex model, ``H + lambda I`` is often indefinite; ``fit`` then
warns (:class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning`, or raises
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with ``raise_on_indefinite=True``),
naming ``|lambda_min|``: the directions below ``-lambda`` would otherwise get weights
``1/(w + lambda) < 0`` and the near-singular ones huge weights (issue 13: 98 of 1,257 negative
self-influences on a digits CNN). ``regularization=Relative(1e-3)`` resolves to ``1e-3 x`` the
top eigenvalue of each block.
"""

from __future__ import annotations

import torch

from ..data import DataLike
from ..grads import ParamBlock
from .base import InfluenceModel
from .diagnostics import Spectrum

__all__ = ["DirectInfluence"]


class DirectInfluence(InfluenceModel):
    """Exact influence from the explicit (block) curvature matrix; for models up to ~10^4
    parameters per block. Arguments: ``regularization``, ``blocks``, ``layers``, ``hessian``
    (``"gauss-newton"`` default, or ``"exact"``), ``micro_batch_size``, ``projection``; see
    :class:`~dvl_ooc.influence.base.InfluenceModel`; ``raise_on_indefinite``: refuse an
    indefinite ``H + lambda I`` instead of warning.

    With ``projection=`` (e.g. ``{"k_in": 16, "k_out": 16, "dense_dim": 64}``) the matrix is
    the ``k x k`` projected Gauss-Newton matrix ``P GGN P^T`` instead of ``p x p``: fit costs
    one forward and ``c`` backward passes per sample (``c`` output-Hessian factors, e.g. the
    number of classes minus one) plus ``n c k^2`` FLOPs for the matrix and ``O(k^3)`` for its
    eigendecomposition; the state is ``k^2`` floats and features are ``k`` floats per sample.
    At full projection sizes it equals the unprojected Gauss-Newton method."""

    _state_keys = ("eigenvalues", "eigenvectors")

    def _joint_fit(self) -> bool:
        """Whether all blocks' matrices come from one data pass (projected Gauss-Newton with
        several blocks: the projection computes every block's features at once)."""
        return (len(self.blocks) > 1 and self.hessian_mode == "gauss-newton"
                and hasattr(self.grads, "hessians"))

    def _fit_passes(self) -> int:
        """One pass over the data per block (the curvature accumulation), or one for all
        blocks (:meth:`_joint_fit`)."""
        return 1 if self._joint_fit() else len(self.blocks)

    def _fit_blocks(self, data: DataLike) -> list[dict[str, torch.Tensor]]:
        """Block by block, or all blocks' matrices from one data pass (:meth:`_joint_fit`;
        their sum of ``8 k_b^2`` bytes is held at once), then one ``eigh`` per block."""
        if not self._joint_fit():
            return super()._fit_blocks(data)
        Hs = self.grads.hessians(data, self.blocks, self.hessian_mode)  # type: ignore[union-attr]
        out = []
        for i, block in enumerate(self.blocks):
            out.append(self._decompose(i, block, Hs[i]))
            Hs[i] = None  # type: ignore[call-overload]
        return out

    def _fit_bytes(self, block: ParamBlock) -> int:
        """The float64 ``p_b x p_b`` matrix, its eigenvectors and ``eigh``'s workspace."""
        return 3 * 8 * block.numel**2

    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        return self._decompose(index, block, self.grads.hessian(data, block, self.hessian_mode))

    def _decompose(self, index: int, block: ParamBlock, H: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
        """Eigendecomposition of block ``index``'s curvature matrix ``H``, with its spectrum
        and fit record."""
        w, V = torch.linalg.eigh(H)
        self.info["fit"].append({"block": block.name, "size": block.numel,
                                 "min_eigenvalue": float(w[0]), "max_eigenvalue": float(w[-1])})
        # singular / indefinite H + lambda I: checked by InfluenceModel.fit from the spectrum
        self._pending_spectra[index] = Spectrum(
            "eigendecomposition", block.numel, eigenvalues=w, complete=True,
            psd=self.hessian_mode == "gauss-newton",
            eps=float(torch.finfo(self.grads.dtype).eps))
        return {"eigenvalues": w, "eigenvectors": V}

    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        s = self._state[i]  # type: ignore[index]
        V, w = s["eigenvectors"], s["eigenvalues"]
        coeff = (g.to(V.dtype) @ V) / (w + reg)
        return coeff @ V.T

    def hessian_matrix(self, block: int = 0) -> torch.Tensor:
        """The fitted curvature matrix of one block (float64), reassembled."""
        self._check_fitted()
        s = self._state[block]  # type: ignore[index]
        V, w = s["eigenvectors"], s["eigenvalues"]
        return (V * w) @ V.T
