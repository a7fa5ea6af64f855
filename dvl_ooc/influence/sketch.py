"""Curvature sketches shared by the influence models: the one owner of these mechanisms.

* :func:`nystroem_sketch`: the randomised Nystroem approximation ``H_b ~ U diag(s) U^T`` of a
  block's curvature, used by :class:`~dvl_ooc.influence.NystroemSketchInfluence` (as the model)
  and by :class:`~dvl_ooc.influence.CgInfluence` (as its ``preconditioner="nystroem"``).
* :func:`block_krylov_eigs`: top eigenpairs by block Lanczos (ArnoldiInfluence).
* rank / dtype validation and the shifted-spectrum check of the low-rank models (the checks
  themselves now live in :mod:`dvl_ooc.influence.diagnostics`, applied by
  :meth:`InfluenceModel.fit <dvl_ooc.influence.base.InfluenceModel.fit>` for every method).

A low-rank model keeps, per block ``b``, an orthonormal basis ``V_b`` (``p_b x k_b``) and
eigenvalues ``w_b`` of the curvature restricted to it. Random test matrices come from
:func:`dvl_ooc.seeding.numpy_rng` with the key ``(seed, block index)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data import DataLike
from ..exceptions import InputError, NonFiniteError
from ..grads import HessianMode, ModelGradients, ParamBlock

__all__ = ["block_krylov_eigs", "check_dtype", "nystroem_sketch", "resolve_ranks"]


def _as_rank(r: object, what: str) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise InputError(f"{what} must be an integer >= 1, got {r!r} ({type(r).__name__})")
    if int(r) < 1:
        raise InputError(f"{what} must be an integer >= 1, got {r}")
    return int(r)


def resolve_ranks(rank: int | Mapping[str, int], blocks: Sequence[ParamBlock]) -> dict[str, int]:
    """``rank`` (an int for every block, or ``block name -> int``) as a dict over the blocks."""
    names = [b.name for b in blocks]
    if isinstance(rank, Mapping):
        missing, extra = set(names) - set(rank), set(rank) - set(names)
        if missing or extra:
            raise InputError(
                f"rank mapping must have exactly the block names {names}; missing "
                f"{sorted(missing)}, unknown {sorted(extra)}"
            )
        return {k: _as_rank(rank[k], f"rank of block {k!r}") for k in names}
    r = _as_rank(rank, "rank")
    return {k: r for k in names}


def check_dtype(dtype: object) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"state_dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def _as_numpy_rng(rng: np.random.Generator | torch.Generator) -> np.random.Generator:
    if isinstance(rng, torch.Generator):  # the pre-0.x signature took a torch generator
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
    return rng


def nystroem_sketch(
    grads: ModelGradients,
    data: DataLike,
    block: ParamBlock,
    mode: HessianMode,
    rank: int,
    rng: np.random.Generator | torch.Generator,
    *,
    return_info: bool = False,
    probes: torch.Tensor | None = None,
) -> Any:
    """Rank-``rank`` Nystroem approximation ``U diag(s) U^T`` of a block's curvature.

    The stable algorithm of Tropp, Yurtsever, Udell & Cevher (2017, Alg. 3)::

        Omega = qr(Gaussian (p x k)),   Y = H Omega            (ONE data pass for all k vectors)
        nu    = sqrt(p) eps ||Y||_2,    Y_nu = Y + nu Omega     (round-off shift, eps of the model)
        C     = chol(Omega^T Y_nu),     B = Y_nu C^{-T},   B = U S V^T (thin SVD)
        s     = max(0, S^2 - nu)

    ``Omega`` is rounded to the model dtype before the product, so the float64 ``Omega`` used
    afterwards is exactly the one multiplied. If ``Omega^T Y_nu`` is not positive definite (the
    exact Hessian of a non-convex model is indefinite) the shift is raised past the smallest
    eigenvalue of the core (by 1 % and another ``nu``) and negative curvature is clipped to 0
    (recorded as ``clipped_negative_curvature``). The smallest eigenvalue of the core
    ``Omega^T H Omega`` (a Rayleigh-Ritz value, never below the smallest eigenvalue of ``H``)
    is returned as ``core_min_eigenvalue``: below ``-lambda`` it proves that ``H + lambda I``
    is indefinite (NystroemSketchInfluence's fit then applies the indefinite policy; for CG's
    preconditioner a PSD approximation is all that is needed).

    ``probes`` (``(r, p)`` vectors ``Z``, e.g. seeded Gaussians) are multiplied in the same
    data pass; ``H Z`` (float64) is then ``info["HZ"]`` (for
    :func:`~dvl_ooc.influence.diagnostics.low_rank_error`).

    Returns ``U (p, k)`` and ``s (k,)`` in float64 on the model's device (``k = min(rank, p)``),
    and with ``return_info`` also a dict (rank, shift, clipped_negative_curvature,
    core_min_eigenvalue, data_passes; HZ with ``probes``).
    """
    p = block.numel
    k = min(int(rank), p)
    dtype, device = grads.dtype, grads.device
    f64 = torch.float64
    gen = _as_numpy_rng(rng)
    G = torch.from_numpy(gen.standard_normal((p, k)))
    Omega = torch.linalg.qr(G)[0].to(device=device, dtype=dtype)
    HZ = None
    if probes is not None:
        Zd = probes.to(device=device, dtype=dtype)
        YZ = grads.hvp(torch.cat([Omega.T, Zd]).contiguous(), data, block, mode).to(f64)
        Y, HZ = YZ[:k].T, YZ[k:]
    else:
        Y = grads.hvp(Omega.T.contiguous(), data, block, mode).T.to(f64)
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
    OtO = Omega.T @ Omega
    clipped = False
    min_eig = float(torch.linalg.eigvalsh(M)[0])  # Omega orthonormal: >= lambda_min(H)
    L, fail = torch.linalg.cholesky_ex(M + nu * OtO)
    if int(fail) != 0:
        clipped = True
        nu = nu + max(0.0, -min_eig) * 1.01 + nu
        L, fail = torch.linalg.cholesky_ex(M + nu * OtO)
        if int(fail) != 0:  # pragma: no cover - defensive
            raise NonFiniteError(f"Nystroem sketch of block {block.name!r} is degenerate")
    Y_nu = Y + nu * Omega
    B = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # Y_nu L^{-T}
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    s = torch.clamp(S * S - nu, min=0.0)
    if not return_info:
        return U, s
    info: dict[str, Any] = {"rank": k, "shift": nu, "clipped_negative_curvature": clipped,
                            "core_min_eigenvalue": min_eig, "data_passes": 1}
    if HZ is not None:
        info["HZ"] = HZ
    return U, s, info


def _orth_against(W: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """``(I - Q Q^T) W``, classical Gram-Schmidt applied twice (numerically orthogonal)."""
    if Q is None or Q.shape[1] == 0:
        return W
    for _ in range(2):
        W = W - Q @ (Q.T @ W)
    return W


def _new_block(
    W: torch.Tensor, Q: torch.Tensor | None, b: int, scale: float, rng: np.random.Generator
) -> torch.Tensor:
    """Orthonormal ``(p, b)`` block spanning the dominant part of ``(I - Q Q^T) W``, completed
    with random directions orthogonal to ``Q`` where ``W`` is (numerically) rank deficient."""
    p = W.shape[0]
    if W.shape[1] == 0:
        U = W
    else:
        W = _orth_against(W, Q)
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        keep = int((S > 1e-10 * max(scale, 1e-300)).sum())
        U = U[:, : min(keep, b)]
    if U.shape[1] < b:
        R = torch.from_numpy(rng.standard_normal((p, b - U.shape[1]))).to(W)
        base = U if Q is None else torch.cat([Q, U], dim=1)
        R = _orth_against(R, base)
        U = torch.cat([U, torch.linalg.qr(R)[0]], dim=1)
    return _orth_against(U, Q)


def block_krylov_eigs(
    matmat,
    p: int,
    k: int,
    *,
    which: str,
    block_size: int,
    max_dim: int,
    tol: float,
    max_passes: int,
    rng: np.random.Generator,
    device: torch.device | str,
    atol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Top-``k`` eigenpairs of a symmetric operator by block Krylov (Lanczos) with full
    reorthogonalisation, Rayleigh-Ritz and thick restarts; everything in float64.

    ``matmat(Q)`` returns ``H Q`` for an orthonormal ``(p, b)`` block: one data pass per call,
    ``b`` products at once. The basis ``Q`` and its image ``H Q`` are kept (``2 p max_dim``
    floats), so Ritz pairs and their residuals ``||H u - theta u||`` are exact; the method stops
    when every wanted residual is ``<= max(tol * max |theta|, atol)``.

    Returns eigenvalues (sorted by ``which``), eigenvectors ``(p, k)``, the number of data
    passes, and the largest relative residual.
    """
    f64 = torch.float64
    b = max(1, min(block_size, p))
    max_dim = max(min(max_dim, p), min(k + b, p))
    key = (lambda t: t.abs()) if which == "LM" else (lambda t: t)
    Q = _new_block(torch.zeros(p, 0, dtype=f64, device=device), None, b, 1.0, rng)
    HQ = matmat(Q)
    passes, last = 1, slice(0, b)
    while True:
        T = Q.T @ HQ
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        order = torch.argsort(key(theta), descending=True)
        theta, S = theta[order], S[:, order]
        scale = max(float(theta.abs().max()), 1e-300)
        kk = min(k, len(theta))
        U, HU = Q @ S[:, :kk], HQ @ S[:, :kk]
        res = torch.linalg.vector_norm(HU - U * theta[:kk], dim=0) / scale
        worst = float(res.max())
        bound = max(tol, atol / scale)  # ||r|| <= max(tol * scale, atol), relative to scale
        if worst <= bound or Q.shape[1] >= p:
            return theta[:kk], U, passes, worst
        if passes >= max_passes:
            raise _NoConvergence(passes, worst, int((res <= bound).sum()))
        m = Q.shape[1]
        nb = min(b, p - m)
        if m + nb > max_dim:  # thick restart: keep the best Ritz pairs and their residuals
            keep = min(max(k, (max_dim - b + k) // 2), max_dim - b, len(theta))
            Sk = S[:, :keep]
            Y, HY = Q @ Sk, HQ @ Sk
            W = HY - Y * theta[:keep]
            Q, HQ = Y, HY
            nb = min(b, p - keep)
        else:
            W = HQ[:, last]
        Qn = _new_block(W, Q, nb, scale, rng)
        HQn = matmat(Qn)
        passes += 1
        last = slice(Q.shape[1], Q.shape[1] + nb)
        Q, HQ = torch.cat([Q, Qn], dim=1), torch.cat([HQ, HQn], dim=1)


class _NoConvergence(Exception):
    def __init__(self, passes: int, residual: float, converged: int) -> None:
        super().__init__(passes, residual, converged)
        self.passes, self.residual, self.converged = passes, residual, converged
