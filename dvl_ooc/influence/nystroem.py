"""Nystroem-sketch influence: a randomised low-rank PSD approximation and Woodbury's inverse.

fit (per block, :func:`~dvl_ooc.influence.sketch.nystroem_sketch`: the stable algorithm of
Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3, shared with CG's Nystroem preconditioner):
    Omega = qr(Gaussian (p_b x k)),    Y = H_b Omega           (ONE data pass for all k vectors)
    nu    = sqrt(p_b) eps ||Y||_2,     Y_nu = Y + nu Omega     (shift for numerical stability)
    C     = chol(Omega^T Y_nu),        B = Y_nu C^{-T}    (B B^T = Y_nu (Omega^T Y_nu)^-1 Y_nu^T)
    B     = U S (thin SVD),            Lambda = max(0, S^2 - nu)
    H_b  ~= U diag(Lambda) U^T                                 (the Nystroem approximation)
precondition (Woodbury):
    (U Lambda U^T + lambda I)^{-1} g = U diag(1/(Lambda + lambda)) U^T g + (1/lambda)(g - U U^T g)

At ``k = p_b`` (Omega square and orthogonal) the approximation is exact up to rounding, so the
result equals Direct with the same curvature. ``eps`` is the machine epsilon of the model dtype.

Positive semi-definiteness: the Nystroem approximation assumes ``H_b >= 0``. The Gauss-Newton
matrix (``hessian="gauss-newton"``, the default of every method) is PSD for convex losses and
is the natural choice. With ``hessian="exact"`` and a non-convex model, negative curvature is
clipped to 0 (the shift ``nu`` is raised past the smallest eigenvalue of the core;
``info["fit"]`` records ``clipped_negative_curvature``). The smallest eigenvalue of the core
``Omega^T H Omega`` is never below that of ``H``: when it is below ``-lambda``, ``H + lambda I``
is certainly indefinite and the fit applies the indefinite policy of every method
(:class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning`, or
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with ``raise_on_indefinite=True``).

Diagnostics at no extra data pass: ``probes`` (4) seeded Gaussian vectors ``z`` (stream
``(seed, block index, 2)``) are multiplied in the sketch pass, giving the approximation error
``||H z - U diag(Lambda) U^T z|| / ||H z||`` and a deflated Hutchinson estimate of
``trace(H_b)`` (the ``"mean"`` of ``Relative(..., of="mean")``); the top of ``Lambda`` is the
``"top"``. See :mod:`dvl_ooc.influence.diagnostics`.

Cost: one data pass with k curvature-vector products per sample and block (cf. Lanczos: one
pass per product); ``O(p_b k^2)`` float64 linear algebra. State: ``p_b * k`` basis entries.
Precondition: two ``(n, p_b) x (p_b, k)`` products. ``lambda > 0`` is required (Woodbury term).
``info["fit"]`` records per block the rank, the shift ``nu``, whether negative curvature was
clipped, and the data passes (1). The test matrix of block ``i`` comes from
``dvl_ooc.seeding.numpy_rng(seed, i)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import DataLike
from ..grads import HessianMode, LossFn, ParamBlock
from ..seeding import numpy_rng
from .base import InfluenceModel
from .diagnostics import PROBES, Spectrum, low_rank_error, probe_vectors
from .sketch import check_dtype, nystroem_sketch, resolve_ranks

__all__ = ["NystroemSketchInfluence"]


class NystroemSketchInfluence(InfluenceModel):
    """Randomised Nystroem low-rank curvature with a Woodbury inverse.

    Args:
        model, loss, regularization, blocks, layers, micro_batch_size, projection: see
            :class:`~dvl_ooc.influence.base.InfluenceModel`; ``regularization`` must be > 0.
        rank: sketch size per block (an int, or ``block name -> int``); capped at ``p_b``.
        hessian: ``"gauss-newton"`` (default, PSD) or ``"exact"`` (see the module docstring).
        seed: seed of the Gaussian test matrices (stream ``(seed, block index)``).
        state_dtype: dtype of the stored basis (``torch.float64`` default).
        raise_on_indefinite: refuse an indefinite ``H + lambda I`` instead of warning.
    """

    requires_positive_regularization = True
    _state_keys = ("eigenvalues", "eigenvectors")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        *,
        rank: int | Mapping[str, int] = 10,
        regularization: float | Mapping[str, float] = 1e-3,
        blocks: str | Mapping[str, Sequence[str]] = "model",
        hessian: HessianMode = "gauss-newton",
        layers: Sequence[str] | None = None,
        seed: int = 0,
        state_dtype: torch.dtype = torch.float64,
        micro_batch_size: int = 64,
        projection: Any = None,
        raise_on_indefinite: bool = False,
    ) -> None:
        super().__init__(model, loss, regularization=regularization, blocks=blocks,
                         hessian=hessian, layers=layers, micro_batch_size=micro_batch_size,
                         projection=projection, raise_on_indefinite=raise_on_indefinite)
        self.ranks = resolve_ranks(rank, self.blocks)
        self.seed = int(seed)
        self.state_dtype = check_dtype(state_dtype)

    def _extra_config(self) -> dict[str, Any]:
        return {"rank": dict(self.ranks), "seed": self.seed}

    def _fit_bytes(self, block: ParamBlock) -> int:
        """The float64 test matrix, its image, the shifted image and the SVD factor
        (``p_b x k`` each)."""
        p = block.numel
        return 4 * 8 * p * min(self.ranks[block.name], p)

    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        # the diagnostic probes (their own stream: Omega is unchanged) ride in the sketch pass
        Z = probe_vectors(block.numel, PROBES, self._diagnostics_rng(index), self.grads.device)
        Z = Z.to(self.grads.dtype).to(torch.float64)  # exactly the vectors multiplied
        U, lam, info = nystroem_sketch(
            self.grads, data, block, self.hessian_mode, self.ranks[block.name],
            numpy_rng(self.seed, index), return_info=True, probes=Z,
        )
        err, trace = low_rank_error(Z, info.pop("HZ"), U, lam)
        self.info["fit"].append({"block": block.name, **info})
        self._pending_spectra[index] = Spectrum(
            "nystroem sketch", block.numel, eigenvalues=lam,
            complete=info["rank"] == block.numel and not info["clipped_negative_curvature"],
            psd=self.hessian_mode == "gauss-newton",
            eps=float(torch.finfo(self.grads.dtype).eps),
            min_estimate=info["core_min_eigenvalue"], top_is_exact=False, trace=trace,
            error=err, extra={"clipped_negative_curvature": info["clipped_negative_curvature"]})
        return {"eigenvalues": lam, "eigenvectors": U.to(self.state_dtype).contiguous()}

    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        s = self._state[i]  # type: ignore[index]
        U, lam = s["eigenvectors"], s["eigenvalues"]
        gd = g.to(U.dtype)
        c = gd @ U
        return (c / (lam + reg).to(U.dtype)) @ U.T + (gd - c @ U.T) / reg

    @property
    def eigenvalues(self) -> list[torch.Tensor]:
        """Nystroem eigenvalue estimates per block (float64, descending, >= 0)."""
        self._check_fitted()
        return [s["eigenvalues"] for s in self._state]  # type: ignore[union-attr]

    @property
    def eigenvectors(self) -> list[torch.Tensor]:
        """Orthonormal Nystroem basis per block, ``(p_b, k_b)``."""
        self._check_fitted()
        return [s["eigenvectors"] for s in self._state]  # type: ignore[union-attr]
