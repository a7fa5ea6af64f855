"""Nystroem-sketch influence: a randomised low-rank PSD approximation and Woodbury's inverse.

fit (per block, the stable algorithm of Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3):
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
matrix (``hessian="gauss-newton"``, the default here) is PSD for convex losses and is the natural
choice. With ``hessian="exact"`` and a non-convex model, negative curvature is clipped to 0 (the
shift ``nu`` is raised until the Cholesky factorisation exists) and an
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning` is emitted.

Cost: one data pass with k curvature-vector products per sample and block (cf. Lanczos: one
pass per product); ``O(p_b k^2)`` float64 linear algebra. State: ``p_b * k`` basis entries.
Precondition: two ``(n, p_b) x (p_b, k)`` products. ``lambda > 0`` is required (Woodbury term).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import DataLike
from ..exceptions import IndefiniteCurvatureWarning, NonFiniteError
from ..grads import HessianMode, LossFn, ParamBlock
from .base import InfluenceModel
from .sketch import block_rng, check_dtype, resolve_ranks

__all__ = ["NystroemSketchInfluence"]


class NystroemSketchInfluence(InfluenceModel):
    """Randomised Nystroem low-rank curvature with a Woodbury inverse.

    Args:
        model, loss, regularization, blocks, micro_batch_size: see
            :class:`~dvl_ooc.influence.base.InfluenceModel`; ``regularization`` must be > 0.
        rank: sketch size per block (an int, or ``block name -> int``); capped at ``p_b``.
        hessian: ``"gauss-newton"`` (default, PSD) or ``"exact"`` (see the module docstring).
        seed: seed of the Gaussian test matrix (per block).
        state_dtype: dtype of the stored basis (``torch.float64`` default).
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
        seed: int = 0,
        state_dtype: torch.dtype = torch.float64,
        micro_batch_size: int = 64,
    ) -> None:
        super().__init__(model, loss, regularization=regularization, blocks=blocks,
                         hessian=hessian, micro_batch_size=micro_batch_size)
        self.ranks = resolve_ranks(rank, self.blocks)
        self.seed = int(seed)
        self.state_dtype = check_dtype(state_dtype)
        #: per block: sketch rank, stability shift nu, whether negative curvature was clipped
        self.fit_info: list[dict[str, Any]] = []

    def _extra_config(self) -> dict[str, Any]:
        return {"rank": dict(self.ranks), "seed": self.seed}

    def fit(self, data: DataLike) -> NystroemSketchInfluence:
        self.fit_info = []
        super().fit(data)
        return self

    def _fit_block(self, block: ParamBlock, data: DataLike, reg: float) -> dict[str, torch.Tensor]:
        p = block.numel
        k = min(self.ranks[block.name], p)
        dtype, device = self.grads.dtype, self.grads.device
        f64 = torch.float64
        idx = [b.name for b in self.blocks].index(block.name)
        G = torch.from_numpy(block_rng(self.seed, idx).standard_normal((p, k)))
        Omega = torch.linalg.qr(G)[0].to(device=device, dtype=dtype)
        # one data pass for all k products; the float64 Omega is exactly the one multiplied
        Y = self.grads.hvp(Omega.T.contiguous(), data, block, self.hessian_mode).T.to(f64)
        Omega = Omega.to(f64)
        if not bool(torch.isfinite(Y).all()):
            raise NonFiniteError(
                f"non-finite curvature-vector products in block {block.name!r}; check the loss"
            )
        eps = torch.finfo(dtype).eps
        nu = math.sqrt(p) * eps * float(torch.linalg.matrix_norm(Y, ord=2))
        nu = max(nu, torch.finfo(f64).tiny)
        M = Omega.T @ Y
        M = 0.5 * (M + M.T)
        clipped = False
        L, info = torch.linalg.cholesky_ex(M + nu * (Omega.T @ Omega))
        if int(info) != 0:
            # indefinite sketch (exact Hessian of a non-convex model): shift it to PSD
            min_eig = float(torch.linalg.eigvalsh(M)[0])
            clipped = True
            nu = nu + max(0.0, -min_eig) * (1 + 1e-6) + nu
            L, info = torch.linalg.cholesky_ex(M + nu * (Omega.T @ Omega))
            if int(info) != 0:  # pragma: no cover - defensive
                raise NonFiniteError(f"Nystroem sketch of block {block.name!r} is degenerate")
            warnings.warn(
                f"{type(self).__name__}: the curvature of block {block.name!r} is indefinite "
                f"(min eigenvalue of the sketch {min_eig:.3g}); the Nystroem approximation "
                "clips negative curvature to 0. Use hessian='gauss-newton' (PSD) for a "
                "faithful approximation",
                IndefiniteCurvatureWarning,
                stacklevel=3,
            )
        Y_nu = Y + nu * Omega
        B = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # Y_nu L^{-T}
        U, S, _ = torch.linalg.svd(B, full_matrices=False)
        lam = torch.clamp(S * S - nu, min=0.0)
        self.fit_info.append({"block": block.name, "rank": k, "shift": nu,
                              "clipped_negative_curvature": clipped, "data_passes": 1})
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
