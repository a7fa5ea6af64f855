"""Arnoldi (Lanczos) influence: the top-k eigenpairs of each block's curvature.

fit:          H_b V_b = V_b diag(w_b),  V_b (p_b x k) orthonormal, the k eigenpairs of largest
              magnitude (``which="LM"``) or largest value (``which="LA"``), from curvature-matrix
              products ``Q -> H_b Q`` of the mean loss, in float64, by
              * ``solver="block"`` (default): block Lanczos with full reorthogonalisation,
                Rayleigh-Ritz and thick restarts; each data pass multiplies a whole block of
                ``block_size`` vectors (one ``hvp`` call), and stops when every wanted residual
                ``||H u - w u|| <= max(rtol * max|w|, atol)``;
              * ``solver="arpack"``: implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``),
                one data pass per single product (its criterion is relative: ``tol=rtol``).
              If ``k >= p_b`` (or the Krylov space would span the block anyway) the explicit
              ``H_b`` is eigendecomposed instead (``eigh``, float64): full rank equals Direct.
precondition: (H_b + lambda I)^{-1} g  ~=  V diag(1 / (w + lambda)) V^T g
              complement=True adds  (1/lambda) (I - V V^T) g   (the rest of the spectrum is
              treated as eigenvalue 0).
features:     test  (g V) / (w + lambda),  train  g V   (k-dimensional, concatenated over
              blocks), so  influences = test_features @ train_features.T  (complement=False).

Which variant?  ``complement=False`` keeps only the k dominant directions: the features are
k-dimensional (tiles cost k instead of p per pair), but the many small-curvature directions
(weight ``1/(w + lambda)``, the largest weights of all) are dropped, so influence values are
biased low unless k is close to the numerical rank. ``complement=True`` gives those directions
the weight ``1/lambda``: exact when the unresolved eigenvalues are << lambda, a large
overestimate while they are not (small k, small lambda), and it needs ``lambda > 0`` and full
p-dimensional test features (the default base-class tiling). Measured relative errors against
the exact influences at lambda = 1e-3 * top eigenvalue (digits, k = 10 / 50): linear model
(p = 650) 0.99 / 0.86 without and 14.6 / 4.1 with the complement; MLP (p = 910) 0.96 / 0.77
without and 2.2 / 0.51 with it. Both converge to the exact result as k grows.

Cost: a data pass computes one curvature-vector product per sample and vector. The block solver
needs few passes (typically 5-30) of ``block_size`` vectors each, and holds the basis and its
image (``2 p_b krylov_dimension`` float64 entries); ARPACK needs ``krylov_dimension + restarts *
(krylov_dimension - k)`` passes of ONE vector each. Measured on the 650-parameter linear digits
model: 15 block passes (300 products) vs 34 ARPACK passes for k = 10, 18 (1080 products) vs 128
for k = 50; where per-pass overheads dominate (small models, data read from disk) the block
solver wins. ``info["fit"]`` records passes and products per block. State: ``p_b * k``
eigenvector entries per block. Precondition: two ``(n, p_b) x (p_b, k)`` products.

Negative eigenvalues: with ``hessian="exact"`` (indefinite for non-convex models) an eigenvalue
below ``-lambda`` makes ``H + lambda I`` indefinite. The fit then applies the indefinite policy
of every method: an :class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning`, or
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with ``raise_on_indefinite=True``
(:class:`~dvl_ooc.exceptions.RegularizationError` when ``w + lambda`` is numerically 0); use
``hessian="gauss-newton"`` or a larger ``regularization``. With ``which="LM"`` every unresolved
eigenvalue is smaller in magnitude than the k-th kept one, which certifies the lower bound
``lambda_min >= min(w_min, -|w_k|)`` reported by :meth:`diagnostics`.

Diagnostics: after the Lanczos fit, ONE more data pass multiplies ``probes`` (4) seeded
Gaussian vectors (stream ``(seed, block index, 2)``) for the approximation error
``||H z - V diag(w) V^T z|| / ||H z||`` and a deflated Hutchinson estimate of ``trace(H_b)``
(``Relative(..., of="mean")``); the dense path knows the whole spectrum and computes both
without data (:mod:`dvl_ooc.influence.diagnostics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh
from torch import nn

from .._compat import renamed_arguments
from ..data import DataLike
from ..exceptions import ConvergenceError, InputError, RegularizationError
from ..grads import HessianMode, LossFn, ParamBlock
from ..seeding import numpy_rng
from .base import InfluenceModel
from .diagnostics import PROBES, Relative, Spectrum, low_rank_error, probe_vectors
from .sketch import (
    _NoConvergence,
    block_krylov_eigs,
    check_dtype,
    resolve_ranks,
)

__all__ = ["ArnoldiInfluence"]


class ArnoldiInfluence(InfluenceModel):
    """Low-rank influence from the top eigenpairs of the (block) curvature.

    Args:
        model, loss, regularization, blocks, layers, hessian, micro_batch_size, projection:
            see
            :class:`~dvl_ooc.influence.base.InfluenceModel` (``hessian="gauss-newton"`` by
            default).
        rank: eigenpairs kept per block (an int, or ``block name -> int``); ``rank >= p_b``
            means the exact dense eigendecomposition of that block.
        solver: ``"block"`` (block Lanczos, default) or ``"arpack"`` (``eigsh``).
        block_size: vectors per data pass of the block solver; default ``rank + 10``.
        krylov_dimension: largest basis before a restart; default ``2 block_size + rank``
            (block) or ``max(2 rank + 1, 20)`` (ARPACK ``ncv``).
        rtol: relative residual tolerance (``||H u - w u|| <= rtol * max|w|``); default 1e-10
            for float64 models, 1e-6 for float32 ones (curvature products are only as accurate
            as the model's dtype). Deprecated name: ``tol``.
        atol: absolute residual tolerance, used together with ``rtol``: a Ritz pair has
            converged when ``||H u - w u|| <= max(rtol * max|w|, atol)`` (block solver; ARPACK's
            criterion is relative only and ignores it). Default 0.
        which: ``"LM"`` largest magnitude (default) or ``"LA"`` largest algebraic value.
        max_iter: data-pass limit of the block solver (default 200) or ARPACK restart limit
            (default ``10 * p_b``).
        complement: add ``(1/lambda) (I - V V^T)`` (see the module docstring); needs
            ``lambda > 0`` and disables the k-dimensional features.
        seed: seed of the Lanczos start vectors (stream ``(seed, block index)``).
        state_dtype: dtype of the stored eigenvectors (``torch.float64`` default; float32
            halves the state for large blocks). Eigenvalues are always float64.
        raise_on_indefinite: refuse an indefinite ``H + lambda I`` instead of warning.
    """

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
        solver: str = "block",
        block_size: int | None = None,
        krylov_dimension: int | None = None,
        rtol: float | None = None,
        atol: float = 0.0,
        which: str = "LM",
        max_iter: int | None = None,
        complement: bool = False,
        seed: int = 0,
        state_dtype: torch.dtype = torch.float64,
        micro_batch_size: int = 64,
        projection: Any = None,
        raise_on_indefinite: bool = False,
        **deprecated: Any,
    ) -> None:
        rtol = renamed_arguments(ArnoldiInfluence.__init__, deprecated, {"tol": "rtol"},
                                 {"rtol": rtol}).get("rtol", rtol)
        super().__init__(model, loss, regularization=regularization, blocks=blocks,
                         hessian=hessian, layers=layers, micro_batch_size=micro_batch_size,
                         projection=projection, raise_on_indefinite=raise_on_indefinite)
        self.ranks = resolve_ranks(rank, self.blocks)
        if solver not in ("block", "arpack"):
            raise InputError(f"solver must be 'block' or 'arpack', got {solver!r}")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        ):
            raise InputError(f"block_size must be an int >= 1, got {block_size!r}")
        if which not in ("LM", "LA"):
            raise InputError(f"which must be 'LM' or 'LA', got {which!r}")
        if krylov_dimension is not None and (
            isinstance(krylov_dimension, bool) or not isinstance(krylov_dimension, int)
            or krylov_dimension < 2
        ):
            raise InputError(f"krylov_dimension must be an int >= 2, got {krylov_dimension!r}")
        if rtol is not None and not (rtol >= 0):
            raise InputError(f"rtol must be >= 0, got {rtol!r}")
        if not (atol >= 0):
            raise InputError(f"atol must be >= 0, got {atol!r}")
        if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
            raise InputError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if complement:
            zero = [k for k, v in self.regularization.items()
                    if not isinstance(v, Relative) and v <= 0]
            if zero:
                raise RegularizationError(
                    f"complement=True weights the unresolved spectrum by 1/lambda and needs "
                    f"regularization > 0 (blocks {zero}); pass a positive value or use "
                    "complement=False"
                )
        self.which = which
        self.solver = solver
        self.block_size = block_size
        self.krylov_dimension = krylov_dimension
        self.rtol = rtol
        self.atol = float(atol)
        self.max_iter = max_iter
        self.complement = bool(complement)
        self.seed = int(seed)
        self.state_dtype = check_dtype(state_dtype)

    def _extra_config(self) -> dict[str, Any]:
        return {"rank": dict(self.ranks), "which": self.which, "complement": self.complement,
                "solver": self.solver, "block_size": self.block_size,
                "krylov_dimension": self.krylov_dimension, "rtol": self.rtol,
                "atol": self.atol, "max_iter": self.max_iter, "seed": self.seed}

    # ------------------------------------------------------------------ fit
    def _krylov_dims(self, block: ParamBlock) -> tuple[int, int, int]:
        """``(rank, vectors per data pass, largest Krylov basis)`` of a block."""
        p = block.numel
        k = min(self.ranks[block.name], p)
        if self.solver == "block":
            bs = min(self.block_size or k + 10, p)
            return k, bs, max(self.krylov_dimension or 2 * bs + k, k + bs)
        return k, 1, max(self.krylov_dimension or max(2 * k + 1, 20), k + 1)

    def _fit_bytes(self, block: ParamBlock) -> int:
        """Dense path: as Direct; Lanczos: the float64 basis, its image and a restart copy."""
        p = block.numel
        k, _, ncv = self._krylov_dims(block)
        if k >= p or ncv >= p:
            return 3 * 8 * p * p
        return 3 * 8 * p * ncv

    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        """Eigenpairs of block ``index``; per block ``info["fit"]`` gets method ("dense",
        "block-lanczos" or "arpack"), rank, data passes and curvature products."""
        p = block.numel
        k, bs, ncv = self._krylov_dims(block)
        psd = self.hessian_mode == "gauss-newton"
        eps = float(torch.finfo(self.grads.dtype).eps)
        Z = probe_vectors(p, PROBES, self._diagnostics_rng(index), self.grads.device)
        if k >= p or ncv >= p:
            H = self.grads.hessian(data, block, self.hessian_mode)
            w_all, V_all = torch.linalg.eigh(H)
            order = torch.argsort(w_all.abs() if self.which == "LM" else w_all,
                                  descending=True)[:k]
            w, V = w_all[order], V_all[:, order]
            self.info["fit"].append({"block": block.name, "method": "dense", "rank": k,
                                     "data_passes": None, "products": None})
            err = None
            if k < p:  # the error of the truncation, from the known spectrum (no data)
                HZ = ((Z.to(V_all) @ V_all) * w_all) @ V_all.T
                err, _ = low_rank_error(Z, HZ, V, w)
            self._pending_spectra[index] = Spectrum(
                "eigendecomposition", p, eigenvalues=w_all, complete=True, psd=psd, eps=eps,
                error=err, extra={"rank": k}, inverted=w)
        else:
            if self.solver == "block":
                w, V, info = self._block_lanczos(index, block, data, k, bs, ncv)
                self.info["fit"].append({"block": block.name, "method": "block-lanczos",
                                         "rank": k, **info})
            else:
                w, V, passes = self._lanczos(index, block, data, k, ncv)
                self.info["fit"].append({"block": block.name, "method": "arpack", "rank": k,
                                         "data_passes": passes, "products": passes})
            Zd = Z.to(self.grads.dtype)
            HZ = self.grads.hvp(Zd, data, block, self.hessian_mode).to(torch.float64)
            err, trace = low_rank_error(Zd.to(torch.float64), HZ, V, w)
            self.info["fit"][-1]["diagnostic_passes"] = 1
            kth = float(w.abs().min())
            lm = self.which == "LM"
            self._pending_spectra[index] = Spectrum(
                "lanczos top-k", p, eigenvalues=w, psd=psd, eps=eps,
                min_bound=min(float(w.min()), -kth) if lm else None,
                top_is_exact=(not lm) or float(w.max()) >= kth, trace=trace, error=err,
                extra={"rank": k})
        # singular / indefinite H + lambda I: checked by InfluenceModel.fit from the spectrum
        return {"eigenvalues": w.to(torch.float64),
                "eigenvectors": V.to(self.state_dtype).contiguous()}

    def _default_tol(self) -> float:
        if self.rtol is not None:
            return self.rtol
        return 1e-10 if self.grads.dtype == torch.float64 else 1e-6

    def _block_lanczos(
        self, index: int, block: ParamBlock, data: DataLike, k: int, bs: int, max_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        dtype, device = self.grads.dtype, self.grads.device
        products = 0

        def matmat(Q: torch.Tensor) -> torch.Tensor:
            nonlocal products
            products += Q.shape[1]
            hv = self.grads.hvp(Q.T.to(dtype).contiguous(), data, block, self.hessian_mode)
            out = hv.T.to(torch.float64)
            if not bool(torch.isfinite(out).all()):
                raise ConvergenceError(
                    f"non-finite curvature-vector product in block {block.name!r}; check the "
                    "loss and the model"
                )
            return out

        try:
            w, V, passes, res = block_krylov_eigs(
                matmat, block.numel, k, which=self.which, block_size=bs, max_dim=max_dim,
                tol=self._default_tol(), atol=self.atol, max_passes=self.max_iter or 200,
                rng=numpy_rng(self.seed, index), device=device,
            )
        except _NoConvergence as e:
            raise ConvergenceError(
                f"block Lanczos found {e.converged} of {k} eigenpairs of block {block.name!r} "
                f"in {e.passes} data passes (largest relative residual {e.residual:.2e}); "
                "increase max_iter, block_size or krylov_dimension, or loosen rtol/atol"
            ) from e
        return w, V, {"data_passes": passes, "products": products, "residual": res}

    def _lanczos(
        self, index: int, block: ParamBlock, data: DataLike, k: int, ncv: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        p = block.numel
        dtype, device = self.grads.dtype, self.grads.device
        passes = 0

        def matmat(X: np.ndarray) -> np.ndarray:
            nonlocal passes
            passes += 1
            v = torch.from_numpy(np.ascontiguousarray(X.T)).to(device=device, dtype=dtype)
            hv = self.grads.hvp(v, data, block, self.hessian_mode)
            out = hv.to(torch.float64).cpu().numpy().T
            if not np.isfinite(out).all():
                raise ConvergenceError(
                    f"non-finite curvature-vector product in block {block.name!r}; check the "
                    "loss and the model"
                )
            return out

        op = LinearOperator(
            (p, p), dtype=np.float64,
            matvec=lambda x: matmat(np.asarray(x).reshape(p, 1))[:, 0],
            matmat=matmat,
        )
        v0 = numpy_rng(self.seed, index).standard_normal(p)
        tol = self._default_tol()
        try:
            w, V = eigsh(op, k=k, which=self.which, v0=v0, ncv=ncv, tol=tol,
                         maxiter=self.max_iter or 10 * p)
        except ArpackNoConvergence as e:
            raise ConvergenceError(
                f"Lanczos did not find {k} eigenpairs of block {block.name!r} "
                f"({len(e.eigenvalues)} converged) within max_iter; increase "
                "krylov_dimension or max_iter, or loosen rtol"
            ) from e
        except ArpackError as e:  # pragma: no cover - ARPACK internal failure
            raise ConvergenceError(f"ARPACK failed on block {block.name!r}: {e}") from e
        wt, Vt = torch.from_numpy(w), torch.from_numpy(V)
        order = torch.argsort(wt.abs() if self.which == "LM" else wt, descending=True)
        return wt[order], Vt[:, order].to(device), passes

    # ------------------------------------------------------------------ apply
    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        s = self._state[i]  # type: ignore[index]
        V, w = s["eigenvectors"], s["eigenvalues"]
        gd = g.to(V.dtype)
        c = gd @ V
        out = (c / (w + reg).to(V.dtype)) @ V.T
        if self.complement:
            out = out + (gd - c @ V.T) / reg
        return out

    def _check_grads(self, g: torch.Tensor) -> None:
        self._check_fitted()
        if g.ndim != 2 or g.shape[1] != self.grads.num_params:
            raise InputError(
                f"expected gradients of shape (n, {self.grads.num_params}), got {tuple(g.shape)}"
            )

    def _features(self, g: torch.Tensor, scaled: bool) -> torch.Tensor:
        self._check_grads(g)
        parts = []
        for s, block, sl in zip(self._state, self.blocks, self.grads.block_slices):  # type: ignore[arg-type]
            V, w = s["eigenvectors"], s["eigenvalues"]
            c = g[:, sl].to(V.dtype) @ V
            if scaled:
                c = c / (w + self.regularization[block.name]).to(V.dtype)
            parts.append(c)
        return torch.cat(parts, dim=1).to(g.dtype)

    def test_features(self, g: torch.Tensor) -> torch.Tensor:
        """``(g_b V_b) / (w_b + lambda_b)`` concatenated over blocks, shape ``(n, sum k_b)``
        (with ``complement=True``: the full preconditioned gradient)."""
        if self.complement:
            return super().test_features(g)
        return self._features(g, scaled=True)

    def train_features(self, g: torch.Tensor) -> torch.Tensor:
        """``g_b V_b`` concatenated over blocks (with ``complement=True``: ``g`` itself)."""
        if self.complement:
            return super().train_features(g)
        return self._features(g, scaled=False)

    # ------------------------------------------------------------------ inspection
    @property
    def eigenvalues(self) -> list[torch.Tensor]:
        """Fitted eigenvalues per block (float64, sorted by ``which``)."""
        self._check_fitted()
        return [s["eigenvalues"] for s in self._state]  # type: ignore[union-attr]

    @property
    def eigenvectors(self) -> list[torch.Tensor]:
        """Fitted orthonormal eigenvectors per block, ``(p_b, k_b)``."""
        self._check_fitted()
        return [s["eigenvectors"] for s in self._state]  # type: ignore[union-attr]
