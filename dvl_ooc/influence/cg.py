"""Conjugate-gradient influence: solve (H_b + lambda I) X = G_b for all gradients at once.

fit:          nothing about H is stored, only an optional preconditioner M ~ H_b + lambda I:
              * ``"jacobi"``:   M = diag(H_b) + lambda, with diag(H_b) exact for Gauss-Newton
                (sum_i diag(J_i^T H_out,i J_i) / n from per-sample output Jacobians) or the
                Hutchinson estimate mean_k z_k * (H_b z_k) with Rademacher z_k (exact Hessian);
              * ``"nystroem"``: rank-r Nystroem sketch H_b ~ U diag(s) U^T from r curvature-vector
                products against an orthonormal Gaussian test matrix Omega,
                Y = H Omega,  H_nys = Y (Omega^T Y)^+ Y^T  (stabilised by a shift; the one
                :func:`~dvl_ooc.influence.sketch.nystroem_sketch`, negative curvature silently
                clipped), applied through the regularised Woodbury inverse
                M^-1 v = U diag((s_r + lambda) / (s + lambda)) U^T v + (v - U U^T v).
precondition: batched preconditioned CG, one column per gradient row. Every iteration is ONE
              vectorised curvature-vector product of the mean loss over the fit data for all
              still-active columns (a single data pass), with per-column step sizes
                  alpha = r^T z / p^T A p,   x += alpha p,   r -= alpha A p,
                  z = M^-1 r,  beta = r_new^T z_new / r^T z,  p = z + beta p.
              A column stops (and leaves the product) when ||r|| <= max(rtol ||g||, atol).
              ``solver="block"`` runs O'Leary's block CG instead: one shared Krylov space for all
              columns (fewer iterations when gradients are correlated), with the search block
              re-orthonormalised by QR and rank-deficient directions deflated.

Budget and diagnostics: at most ``max_iter`` iterations per solve; ``info["solve"]`` holds, per
block, the iterations, the largest relative residual and how many columns converged.

Cost: ``iterations`` data passes, each costing k curvature-vector products for k active columns
(about 2-4 forward/backward passes per vector); CG needs about sqrt(cond(A)) log(1/rtol)
iterations, fewer with a good preconditioner. State: the preconditioner only (p or p*r floats);
the fit data is needed again at precondition time and is never pickled (``attach_data``).

Memory (estimated before allocating; :class:`~dvl_ooc.exceptions.MemoryBudgetError` naming the
size and the ways out when it exceeds :attr:`memory_budget`, default the memory available):
``fit`` holds the preconditioner's work arrays (Nystroem: ``4 r p_b`` float64 plus the
curvature products of ``r`` vectors; Jacobi: the float64 diagonal plus one micro-batch of
output Jacobians, or the Hutchinson probes); ``precondition`` of ``n`` gradients needs the
``(n, p)`` result and, per right-hand-side chunk of ``c = min(n, rhs_chunk)`` rows,
``(c, p_b)`` work matrices: about ``p_b (2 n item + c (4 item) + 64 min(c, vector_chunk))``
bytes for batched CG (X, R, Z, P; the last term is the curvature product's temporaries), one
more ``c p_b item`` for block CG, plus ``r p_b item`` with a Nystroem preconditioner. Measured
peak RSS over the input on ``Linear(1000, 100)`` (``p = 100,100``, float32, ``n = 16 / 64 /
128``, two runs): 18.4-21.3 / 17.3-19.5 / 11.8-12.3 ``n p item`` (batched), 12.9-13.3 (block,
``n = 128``), 10.6-10.8 in float64 (``n = 64``); the estimate is 22 / 22 / 14, 15 and 14:
3-30 % above.

Which preconditioner pays off depends on the spectrum: on the digits models (cond ~ 1e3) the
Nystroem sketch of rank 48 cuts the iterations 1.5-2.5x; Jacobi does not help there (dead
pixels give near-zero diagonal entries that it over-amplifies); it is meant for badly scaled
parameters.

CG needs A = H_b + lambda I positive definite. The exact Hessian of a non-convex model is
indefinite. With ``hessian="exact"`` the fit estimates each block's spectrum by a seeded
Lanczos run (20 data passes of 2 vectors; 4 for ``Relative(..., of="mean")``,
:mod:`dvl_ooc.influence.diagnostics`) and applies the indefinite policy of every method: a Ritz
value below ``-lambda`` (never below the true smallest eigenvalue, so it proves indefiniteness)
gives an :class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning`, or
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with ``raise_on_indefinite=True``. A solve
that still meets a direction with p^T A p <= 0 raises :class:`NegativeCurvatureError` (CG
cannot continue). Use ``hessian="gauss-newton"`` (the default) or a larger ``regularization``.
The same estimate resolves relative damping (``Relative(1e-3)``: the top Ritz value;
``of="mean"``: the Hutchinson trace of the Lanczos start vectors); with the Gauss-Newton matrix
and absolute damping the fit runs no estimate, and :meth:`diagnostics` runs it over the
attached fit data on its first call. Random probes and sketches of block ``i`` use
``dvl_ooc.seeding`` streams keyed ``(seed, i)``; the diagnostics ``(seed, i, 2)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from .._compat import renamed_arguments
from ..data import DataLike
from ..exceptions import (
    ConvergenceError,
    ConvergenceWarning,
    InputError,
    MemoryBudgetError,
    NegativeCurvatureError,
    NonFiniteError,
)
from ..grads import HessianMode, LossFn, ModelGradients, ParamBlock, ProjectedGradients
from ..seeding import numpy_rng, torch_generator
from .base import InfluenceModel
from .base import validate_fit_data as validate_fit_data  # re-export (moved to base)
from .diagnostics import Spectrum
from .sketch import nystroem_sketch  # re-export: the one Nystroem sketch lives in sketch.py

__all__ = ["CgInfluence", "gauss_newton_diagonal", "hutchinson_diagonal", "nystroem_sketch"]


# ---------------------------------------------------------------------- helpers

def gauss_newton_diagonal(
    grads: ModelGradients, data: DataLike, block: ParamBlock
) -> torch.Tensor:
    """Exact diagonal of the Gauss-Newton matrix of the mean loss (float64, ``(p_block,)``)."""
    diag = torch.zeros(block.numel, dtype=torch.float64, device=grads.device)
    n = 0
    for J, Ho in grads.gauss_newton_factors(data, block):
        diag += torch.einsum("mcj,mcd,mdj->j", J, Ho, J)
        n += len(J)
    return diag / n


def hutchinson_diagonal(
    grads: ModelGradients,
    data: DataLike,
    block: ParamBlock,
    mode: HessianMode,
    samples: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Hutchinson estimate mean_k z_k * (H z_k) of diag(H), Rademacher z_k (float64)."""
    z = torch.randint(0, 2, (samples, block.numel), generator=generator).to(torch.float64)
    z = 2 * z - 1
    hz = grads.hvp(z.to(grads.dtype), data, block, mode).to(torch.float64)
    return (z * hz).mean(0)


def _finite_or_raise(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} has non-finite entries; check the inputs and the loss")


# ---------------------------------------------------------------------- memory of solves
#: bytes per vector entry of the temporaries of one batched curvature-vector product
#: (torch.func jvp/vjp buffers and the accumulator; measured 28-58 on Linear(1000, 100))
_HVP_BYTES = 64


def _hvp_bytes(grads: Any, p_b: int, vectors: int) -> int:
    """Temporaries of one curvature product of ``vectors`` vectors of length ``p_b``
    (:class:`ModelGradients` vectorises ``vector_chunk`` vectors at a time)."""
    if not isinstance(grads, ProjectedGradients):
        vectors = min(vectors, getattr(grads, "vector_chunk", vectors))
    return _HVP_BYTES * p_b * vectors


def _check_solve_memory(model: InfluenceModel, n_rows: int, chunk: int | None,
                        need: Callable[[ParamBlock, int, int], int], what: str) -> None:
    """Refuse, before allocating, a solve of ``n_rows`` right-hand sides whose estimated peak
    ``need(block, n_rows, rows per chunk)`` exceeds the memory budget
    (:attr:`InfluenceModel.memory_budget`, default the memory available now); the message
    names the size, the largest ``rhs_chunk`` that fits and the other ways out.

    (Shared by CG and LiSSA; a candidate for :mod:`dvl_ooc.influence.base`.)"""
    from ..runtime import available_memory, format_bytes

    if n_rows < 1:
        return
    c = min(chunk or n_rows, n_rows)
    needs = {b.name: need(b, n_rows, c) for b in model.blocks}
    name = max(needs, key=needs.__getitem__)
    budget = model.memory_budget if model.memory_budget is not None else available_memory()
    if needs[name] <= budget:
        return

    def worst(rows: int) -> int:
        return max(need(b, n_rows, rows) for b in model.blocks)

    lo, hi = 0, c  # largest chunk that fits: need grows with the chunk
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if worst(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    p_b = next(b.numel for b in model.blocks if b.name == name)
    if lo >= 1:
        chunk_way = f"rhs_chunk={lo} (about {format_bytes(worst(lo))}), "
    else:
        chunk_way = (f"(even rhs_chunk=1 would need {format_bytes(worst(1))}: the results "
                     "alone do not fit) ")
    raise MemoryBudgetError(
        f"{type(model).__name__}.precondition would need about {format_bytes(needs[name])} for "
        f"{n_rows} gradients of block {name!r} ({p_b} parameters): the results and the {what} "
        f"work matrices of {c} right-hand sides at once (rhs_chunk={chunk}), more than the "
        f"{format_bytes(budget)} available. Ways out: {chunk_way}projection=dict(k_in=16, "
        "k_out=16) (features of dimension k instead of p), layers=[...] (attribute through "
        "fewer layers), blocks='layer' (one solve per layer), or fewer gradients per call (a "
        "smaller test_chunk for the calculators)")


# ---------------------------------------------------------------------- model
class CgInfluence(InfluenceModel):
    """Influence by (preconditioned) conjugate gradients on curvature-vector products.

    Args:
        model, loss, regularization, blocks, layers, hessian, micro_batch_size, projection:
            see
            :class:`~dvl_ooc.influence.base.InfluenceModel` (``hessian="gauss-newton"`` by
            default). ``regularization >= 0``; 0 is fine when the curvature is positive
            definite.
        rtol, atol: a column stops when ``||residual|| <= max(rtol * ||g||, atol)``.
        max_iter: iteration budget per solve (per block and right-hand-side chunk).
            Deprecated name: ``maxiter``.
        solver: ``"batched"`` (independent CG per column, robust default) or ``"block"``
            (O'Leary block CG with QR re-orthonormalisation and deflation). Deprecated name:
            ``method``.
        preconditioner: ``None``, ``"jacobi"`` or ``"nystroem"``.
        rank: rank of the Nystroem sketch.
        diagonal: how the Jacobi diagonal is obtained: ``"auto"`` (exact for Gauss-Newton,
            Hutchinson for the exact Hessian), ``"gauss-newton"`` (exact Gauss-Newton diagonal,
            also as a proxy for the exact Hessian) or ``"hutchinson"``.
        hutchinson_samples: probe vectors of the Hutchinson estimate.
        rhs_chunk: solve at most this many right-hand sides together (bounds the ``k x p``
            work matrices; every chunk costs its own data passes). ``None``: all at once.
            :meth:`precondition` estimates the work matrices first and refuses with
            :class:`~dvl_ooc.exceptions.MemoryBudgetError` (naming the ``rhs_chunk`` that
            fits) when they exceed :attr:`memory_budget` (default: the memory available).
        seed: seed of the random sketches and probes (streams ``(seed, block index)``).
        raise_on_nonconvergence: raise :class:`ConvergenceError` instead of warning with
            :class:`ConvergenceWarning` when ``max_iter`` is reached.
        raise_on_indefinite: refuse (at fit) an ``H + lambda I`` that the Lanczos estimate
            shows indefinite instead of warning (module docstring).

    After each :meth:`precondition`, ``info["solve"]`` holds per block the number of
    iterations, the largest relative residual and how many columns converged.
    """

    needs_data_to_precondition = True
    validates_fit_data = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFn,
        *,
        regularization: float | Mapping[str, float] = 1e-3,
        blocks: str | Mapping[str, Sequence[str]] = "model",
        hessian: HessianMode = "gauss-newton",
        layers: Sequence[str] | None = None,
        micro_batch_size: int = 64,
        rtol: float = 1e-6,
        atol: float = 0.0,
        max_iter: int = 1000,
        solver: Literal["batched", "block"] = "batched",
        preconditioner: Literal["jacobi", "nystroem"] | None = None,
        rank: int = 32,
        diagonal: Literal["auto", "gauss-newton", "hutchinson"] = "auto",
        hutchinson_samples: int = 64,
        rhs_chunk: int | None = None,
        seed: int = 0,
        raise_on_nonconvergence: bool = False,
        projection: Any = None,
        raise_on_indefinite: bool = False,
        **deprecated: Any,
    ) -> None:
        old = renamed_arguments(CgInfluence.__init__, deprecated,
                                {"maxiter": "max_iter", "method": "solver"},
                                {"max_iter": max_iter, "solver": solver})
        max_iter, solver = old.get("max_iter", max_iter), old.get("solver", solver)
        super().__init__(model, loss, regularization=regularization, blocks=blocks,
                         hessian=hessian, layers=layers, micro_batch_size=micro_batch_size,
                         projection=projection, raise_on_indefinite=raise_on_indefinite)
        if not (rtol >= 0 and atol >= 0) or (rtol == 0 and atol == 0):
            raise InputError("need rtol >= 0 and atol >= 0, not both 0")
        if max_iter < 1:
            raise InputError(f"max_iter must be >= 1, got {max_iter}")
        if solver not in ("batched", "block"):
            raise InputError(f"solver must be 'batched' or 'block', got {solver!r}")
        if preconditioner not in (None, "jacobi", "nystroem"):
            raise InputError(
                f"preconditioner must be None, 'jacobi' or 'nystroem', got {preconditioner!r}"
            )
        if diagonal not in ("auto", "gauss-newton", "hutchinson"):
            raise InputError(
                f"diagonal must be 'auto', 'gauss-newton' or 'hutchinson', got {diagonal!r}"
            )
        if rank < 1 or hutchinson_samples < 1:
            raise InputError("rank and hutchinson_samples must be >= 1")
        if rhs_chunk is not None and rhs_chunk < 1:
            raise InputError(f"rhs_chunk must be >= 1 or None, got {rhs_chunk}")
        self.rtol, self.atol, self.max_iter = float(rtol), float(atol), int(max_iter)
        self.solver = solver
        self.preconditioner = preconditioner
        self.rank = int(rank)
        self.diagonal = diagonal
        self.hutchinson_samples = int(hutchinson_samples)
        self.rhs_chunk = rhs_chunk
        self.seed = int(seed)
        self.raise_on_nonconvergence = bool(raise_on_nonconvergence)

    def _extra_config(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "preconditioner": self.preconditioner,
            "rank": self.rank if self.preconditioner == "nystroem" else None,
            "diagonal": self.diagonal if self.preconditioner == "jacobi" else None,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ memory
    def _fit_bytes(self, block: ParamBlock) -> int:
        """Preconditioner work arrays: Nystroem ``4 r p_b`` float64 (as
        :class:`~dvl_ooc.influence.nystroem.NystroemSketchInfluence`) plus the curvature
        products of ``r`` vectors; Jacobi the float64 diagonal plus one micro-batch of output
        Jacobians (``m c p_b``, counted with ``c = 1``: a lower bound) or the Hutchinson probes
        and their products; nothing without a preconditioner."""
        p = block.numel
        if self.preconditioner == "nystroem":
            r = min(self.rank, p)
            return 4 * 8 * p * r + _hvp_bytes(self.grads, p, r)
        if self.preconditioner == "jacobi":
            kind = self.diagonal
            if kind == "auto":
                kind = "gauss-newton" if self.hessian_mode == "gauss-newton" else "hutchinson"
            if kind == "gauss-newton":
                item = self.grads.dtype.itemsize
                return 8 * p + (16 + item) * self.grads.micro_batch_size * p
            s = self.hutchinson_samples
            return 8 * p + 5 * 8 * s * p + _hvp_bytes(self.grads, p, s)
        return 0

    def _solve_bytes(self, block: ParamBlock, n_rows: int, rows: int) -> int:
        """Estimated peak of :meth:`precondition` on ``n_rows`` gradients for ``block``, with
        ``rows`` right-hand sides per chunk: the ``(n, p)`` and ``(n, p_b)`` results, the
        solver's ``(rows, p_b)`` work matrices (batched: 4, block: 5), the preconditioner's
        copy and the curvature product's temporaries (module docstring; the measured peak is
        3-23 % below this)."""
        p_b, item = block.numel, self.grads.dtype.itemsize
        arrays = 4 if self.solver == "batched" else 5
        pre = 0
        if self.preconditioner == "nystroem":
            pre = item * p_b * min(self.rank, p_b)
        elif self.preconditioner == "jacobi":
            pre = 2 * item * p_b
        return (item * n_rows * (self.grads.num_params + p_b) + arrays * item * p_b * rows
                + pre + _hvp_bytes(self.grads, p_b, rows))

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``(H + lambda I)^{-1} g`` by CG, after checking that the results and the work
        matrices fit the memory budget (:class:`~dvl_ooc.exceptions.MemoryBudgetError`
        otherwise, with the ``rhs_chunk`` that fits)."""
        self._check_fitted()
        if g.ndim == 2:
            _check_solve_memory(self, len(g), self.rhs_chunk, self._solve_bytes,
                                f"{self.solver} CG")
        return super().precondition(g)

    # ------------------------------------------------------------------ fit
    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        """The preconditioner of block ``index`` (nothing without one)."""
        self.info["fit"].append({"block": block.name, "preconditioner": self.preconditioner})
        if self.preconditioner == "jacobi":
            kind = self.diagonal
            if kind == "auto":
                kind = "gauss-newton" if self.hessian_mode == "gauss-newton" else "hutchinson"
            if kind == "gauss-newton":
                d = gauss_newton_diagonal(self.grads, data, block)
            else:
                d = hutchinson_diagonal(self.grads, data, block, self.hessian_mode,
                                        self.hutchinson_samples,
                                        torch_generator(self.seed, index))
            _finite_or_raise(d, "the curvature diagonal")
            return {"diagonal": d}
        if self.preconditioner == "nystroem":
            U, s = nystroem_sketch(self.grads, data, block, self.hessian_mode, self.rank,
                                   numpy_rng(self.seed, index))
            _finite_or_raise(s, "the Nystroem sketch")
            return {"nystroem_basis": U, "nystroem_eigenvalues": s}
        return {}

    def _block_spectrum(self, index: int, block: ParamBlock, state: Mapping[str, Any],
                        data: DataLike) -> Spectrum | None:
        return self._spectrum_estimate_if_needed(index, block, data)

    def _preconditioner_fn(self, i: int, reg: float):
        """``v (k, p) -> M^-1 v`` for block ``i``, or None."""
        s = self._state[i]  # type: ignore[index]
        if "diagonal" in s:
            d = s["diagonal"].clamp_min(0.0) + reg
            d = d.clamp_min(1e-12 * max(float(d.max()), 1e-300))
            inv = (1.0 / d)

            def jacobi(v: torch.Tensor) -> torch.Tensor:
                return v * inv.to(v.dtype)

            return jacobi
        if "nystroem_basis" in s:
            U, lam = s["nystroem_basis"], s["nystroem_eigenvalues"]
            top = float(lam.max()) + reg
            num = max(float(lam.min()) + reg, 1e-10 * max(top, 1e-300))
            factor = num / (lam + reg).clamp_min(num) - 1.0  # (r,)

            def nystroem(v: torch.Tensor) -> torch.Tensor:
                Ud = U.to(v.dtype)
                return v + ((v @ Ud) * factor.to(v.dtype)) @ Ud.T

            return nystroem
        return None

    # ------------------------------------------------------------------ precondition
    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        G = g.to(self.grads.dtype)
        data = self._fit_data

        def op(V: torch.Tensor) -> torch.Tensor:
            return self.grads.hvp(V, data, block, self.hessian_mode) + reg * V

        minv = self._preconditioner_fn(i, reg)
        solve = _batched_cg if self.solver == "batched" else _block_cg
        chunk = self.rhs_chunk or max(len(G), 1)
        out = torch.empty_like(G)
        infos = []
        for s in range(0, len(G), chunk):
            X, info = solve(op, G[s : s + chunk], minv, self.rtol, self.atol, self.max_iter)
            out[s : s + chunk] = X
            infos.append(info)
        info = {
            "block": block.name,
            "iterations": max((d["iterations"] for d in infos), default=0),
            "max_relative_residual": max((d["max_relative_residual"] for d in infos),
                                         default=0.0),
            "converged": sum(d["converged"] for d in infos),
            "columns": len(G),
        }
        self.info["solve"].append(info)
        if info["converged"] < len(G):
            msg = (
                f"CG did not converge for {len(G) - info['converged']} of {len(G)} gradients in "
                f"block {block.name!r} within max_iter={self.max_iter} (largest relative "
                f"residual {info['max_relative_residual']:.2e} > rtol={self.rtol:g}); raise "
                "max_iter, use a preconditioner or a larger regularization"
            )
            if self.raise_on_nonconvergence:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return out


def _negative_curvature(pap: torch.Tensor) -> NegativeCurvatureError:
    return NegativeCurvatureError(
        f"H + lambda I is not positive definite: CG found a direction with p^T A p = "
        f"{float(pap.min()):.3g} <= 0. The exact Hessian of a non-convex model is indefinite; "
        "use hessian='gauss-newton' or a regularization larger than minus its smallest eigenvalue"
    )


def _batched_cg(op, B: torch.Tensor, minv, rtol: float, atol: float, max_iter: int):
    """Independent (preconditioned) CG per row of ``B``; one ``op`` call per iteration."""
    k = len(B)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = minv(R) if minv is not None else R.clone()
    P = Z.clone()
    rz = (R * Z).sum(1)
    bnorm = torch.linalg.norm(B, dim=1)
    tol = torch.clamp(rtol * bnorm, min=atol)
    rnorm = bnorm.clone()
    active = rnorm > tol
    it = 0
    while bool(active.any()) and it < max_iter:
        idx = active.nonzero().flatten()
        Pa = P[idx]
        AP = op(Pa)
        pap = (Pa * AP).sum(1)
        if not bool(torch.isfinite(pap).all()):
            raise NonFiniteError("non-finite curvature-vector product in CG; check the model")
        if bool((pap <= 0).any()):
            raise _negative_curvature(pap)
        alpha = rz[idx] / pap
        X[idx] += alpha[:, None] * Pa
        Ra = R[idx] - alpha[:, None] * AP
        R[idx] = Ra
        rnorm[idx] = torch.linalg.norm(Ra, dim=1)
        Za = minv(Ra) if minv is not None else Ra
        rz_new = (Ra * Za).sum(1)
        beta = rz_new / rz[idx]
        P[idx] = Za + beta[:, None] * Pa
        rz[idx] = rz_new
        active[idx] = rnorm[idx] > tol[idx]
        it += 1
    rel = rnorm / bnorm.clamp_min(torch.finfo(B.dtype).tiny)
    info = {
        "iterations": it,
        "max_relative_residual": float(rel.max()) if k else 0.0,
        "converged": int((~active).sum()),
    }
    return X, info


def _block_cg(op, B: torch.Tensor, minv, rtol: float, atol: float, max_iter: int):
    """O'Leary block CG on the rows of ``B`` (all columns share one Krylov space).

    The search block is kept orthonormal in the A-inner product's Cholesky sense via a QR of
    the preconditioned residual block; directions whose QR diagonal falls below a relative
    threshold are deflated (dropped), which keeps the small ``s x s`` systems well conditioned.
    Converged columns stop contributing residual directions.
    """
    k = len(B)
    dtype = B.dtype
    X = torch.zeros_like(B)
    R = B.clone()
    bnorm = torch.linalg.norm(B, dim=1)
    tol = torch.clamp(rtol * bnorm, min=atol)
    rnorm = bnorm.clone()
    active = rnorm > tol
    P_prev: torch.Tensor | None = None
    AP_prev: torch.Tensor | None = None
    it = 0
    eps = torch.finfo(dtype).eps
    while bool(active.any()) and it < max_iter:
        Ra = R[active]
        Z = minv(Ra) if minv is not None else Ra
        # new directions: Z A-orthogonalised against the previous block (conjugacy)
        if P_prev is not None and len(P_prev):
            coef = torch.linalg.solve(P_prev @ AP_prev.T, AP_prev @ Z.T)  # type: ignore[union-attr]
            Z = Z - coef.T @ P_prev
        # orthonormalise and deflate (QR of the p x s block)
        Q, Rq = torch.linalg.qr(Z.T)
        diag = Rq.diagonal().abs()
        keep = diag > max(float(diag.max()), 1e-300) * math.sqrt(eps)
        if not bool(keep.any()):
            break
        P = Q[:, keep].T  # (s, p), orthonormal rows
        AP = op(P)
        PAP = P @ AP.T
        PAP = 0.5 * (PAP + PAP.T)
        evals = torch.linalg.eigvalsh(PAP)
        if not bool(torch.isfinite(evals).all()):
            raise NonFiniteError("non-finite curvature-vector product in CG; check the model")
        if float(evals[0]) <= 0:
            raise _negative_curvature(evals[:1])
        # step: X += alpha^T P with alpha = PAP^{-1} P R^T  (exact minimiser on span(P))
        alpha = torch.linalg.solve(PAP, P @ R.T)  # (s, k)
        X += alpha.T @ P
        R -= alpha.T @ AP
        rnorm = torch.linalg.norm(R, dim=1)
        active = rnorm > tol
        P_prev, AP_prev = P, AP
        it += 1
    rel = rnorm / bnorm.clamp_min(torch.finfo(dtype).tiny)
    info = {
        "iterations": it,
        "max_relative_residual": float(rel.max()) if k else 0.0,
        "converged": int((~active).sum()),
    }
    return X, info
