"""Helpers shared by the low-rank influence models (Arnoldi, Nystroem).

A low-rank model keeps, per block ``b``, an orthonormal basis ``V_b`` (``p_b x k_b``) and
eigenvalues ``w_b`` of the curvature restricted to it. Everything here is data-free.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..exceptions import IndefiniteCurvatureWarning, InputError, RegularizationError
from ..grads import ParamBlock

__all__ = ["block_krylov_eigs", "block_rng", "check_dtype", "check_shifted", "resolve_ranks"]


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


def block_rng(seed: int, index: int) -> np.random.Generator:
    """An independent, reproducible random stream per (seed, block index)."""
    return np.random.default_rng([int(seed), int(index)])


def check_shifted(w: torch.Tensor, reg: float, block: str, method: str) -> None:
    """Raise if ``w + reg`` is (numerically) zero; warn if it is negative.

    A negative ``w + reg`` means ``H + lambda I`` is indefinite: its inverse exists, but the
    quadratic form ``<(H + lambda I)^{-1} g_t, g_r>`` no longer has the meaning of a damped
    Newton step. Both are fixed by ``hessian="gauss-newton"`` (positive semi-definite) or a
    larger ``regularization``.
    """
    if w.numel() == 0:
        return
    shifted = w + reg
    scale = max(1.0, float(w.abs().max()))
    if bool((shifted.abs() <= 1e-12 * scale).any()):
        raise RegularizationError(
            f"{method}: H + lambda I is singular in block {block!r} (an eigenvalue equals "
            f"-lambda = {-reg:.3g}); use hessian='gauss-newton' or a larger regularization"
        )
    neg = int((shifted < 0).sum())
    if neg:
        warnings.warn(
            f"{method}: {neg} eigenvalue(s) of block {block!r} are below -lambda (min "
            f"{float(w.min()):.3g}, lambda {reg:.3g}): H + lambda I is indefinite and those "
            "directions get negative weight; use hessian='gauss-newton' or a larger "
            "regularization",
            IndefiniteCurvatureWarning,
            stacklevel=4,
        )


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
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Top-``k`` eigenpairs of a symmetric operator by block Krylov (Lanczos) with full
    reorthogonalisation, Rayleigh-Ritz and thick restarts; everything in float64.

    ``matmat(Q)`` returns ``H Q`` for an orthonormal ``(p, b)`` block: one data pass per call,
    ``b`` products at once. The basis ``Q`` and its image ``H Q`` are kept (``2 p max_dim``
    floats), so Ritz pairs and their residuals ``||H u - theta u||`` are exact; the method stops
    when every wanted residual is ``<= tol * max |theta|``.

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
        if worst <= tol or Q.shape[1] >= p:
            return theta[:kk], U, passes, worst
        if passes >= max_passes:
            raise _NoConvergence(passes, worst, int((res <= tol).sum()))
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
