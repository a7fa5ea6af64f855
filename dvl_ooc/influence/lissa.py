"""LiSSA influence: a (stochastic) Neumann series for (H + lambda I)^{-1}.

With A = H + lambda I and a scale s larger than the top eigenvalue of A, the eigenvalues of
I - A/s lie in [0, 1) and

    A^{-1} g = (1/s) sum_{j>=0} (I - A/s)^j g.

precondition: the truncated series by the recursion (all gradients at once, one curvature product
              per iteration for all still-active columns)
                  x_0 = g,   x_{j+1} = g + (I - (H_B + lambda I)/s) x_j,   result x_J / s,
              where H_B is the curvature of the mean loss on a minibatch B of ``batch_size``
              fit samples drawn afresh (seeded) at every step, or of the full fit data when
              ``batch_size`` is None or >= n (the deterministic series). Each step with
              independent B is unbiased for the deterministic step, so the expected iterate is
              the deterministic one; the spread around it shrinks with the batch size.
              The error after j steps is about (1 - lambda_min(A)/s)^j: it needs about
              (s / lambda_min(A)) log(1/eps) steps, i.e. ~ condition number times log(1/eps).
              with J <= ``max_iter``. A column stops when the change of its result
              ||x_{j+1} - x_j|| / s <= max(rtol ||x_{j+1}|| / s, atol) (with atol = 0 the
              remaining relative error is then about rtol * s / lambda_min(A)).
              ``info["solve"]`` records per block the steps, the largest relative change of
              the last step and how many columns converged.
fit:          only the scale: when ``scale`` is None the top eigenvalue of H is estimated by
              block power iteration on curvature products over the fit data and
              s = scale_factor * (|top| + lambda). Because the series still converges for
              s > (top + lambda) / 2, a power-iteration underestimate is harmless. Random
              streams of block ``i`` (power iteration: key ``(seed, i)``, minibatches:
              ``(seed, i, 1)``) come from :mod:`dvl_ooc.seeding`.

Divergence: ||x_j|| <= (j + 1) ||g|| holds whenever ||I - A_B/s|| <= 1 for every step, so a
violation (or a non-finite iterate) proves that s is too small for some minibatch curvature, or
that A is indefinite; :class:`DivergenceError` is raised then.

Indefinite curvature and relative damping: with ``hessian="exact"`` (or a relative
``regularization``) the fit estimates each block's spectrum by a seeded Lanczos run (20 data
passes of 2 vectors, 4 for ``of="mean"``; :mod:`dvl_ooc.influence.diagnostics`) and applies
the indefinite policy of every method
(:class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning`, or
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with ``raise_on_indefinite=True``); the
same estimate resolves ``Relative(1e-3)`` (top Ritz value) or ``Relative(c, of="mean")``. The
scale is derived from the resolved lambda (``scale_factor * (|top| + lambda)``) after the
resolution, and again when ``regularization`` is assigned on a fitted model.

Regularisation: lambda > 0 is required. The mean loss of an over-parametrised model has a null
space (e.g. softmax logits are shift-invariant), along which the undamped series grows linearly
and never converges; negative exact-Hessian eigenvalues need lambda > -lambda_min(H).

Cost: up to ``max_iter`` curvature products per solve, each over the minibatch (or the full
data); state: two scalars per block. The fit data is needed again at precondition time and
never pickled.

Memory (estimated before allocating; :class:`~dvl_ooc.exceptions.MemoryBudgetError` naming the
size and the ways out when it exceeds :attr:`memory_budget`, default the memory available):
``precondition`` of ``n`` gradients needs the ``(n, p)`` results and, per chunk of ``c =
min(n, rhs_chunk)`` right-hand sides, the iterates ``X`` and the step's ``(c, p_b)``
temporaries plus the curvature product's: about ``p_b (2 n item + 2 c item + 64 min(c,
vector_chunk))`` bytes. Measured peak RSS over the input on ``Linear(1000, 100)`` (``p =
100,100``, two runs): 14.3-14.5 / 8.8-9.3 ``n p item`` in float32 at ``n = 64 / 128``, 7.8-8.0
in float64 at ``n = 64`` (estimate 20 / 12 / 12: 30-55 % above). Chunks restart the seeded
minibatch stream, so every column sees the same minibatches whatever ``rhs_chunk`` is. ``fit``
(the scale estimate) holds 4 vectors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from .._compat import renamed_arguments
from ..data import DataLike, as_tensor, iter_batches, num_samples
from ..exceptions import ConvergenceError, ConvergenceWarning, DivergenceError, InputError
from ..grads import HessianMode, LossFn, ModelGradients, ParamBlock
from ..seeding import torch_generator
from .base import InfluenceModel
from .cg import _check_solve_memory, _hvp_bytes
from .diagnostics import Spectrum

__all__ = ["LissaInfluence", "top_eigenvalue"]


def top_eigenvalue(
    grads: ModelGradients,
    data: DataLike,
    block: ParamBlock,
    mode: HessianMode,
    *,
    vectors: int = 4,
    iterations: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """Largest-magnitude eigenvalue of the block curvature, by block power (subspace) iteration
    with Rayleigh-Ritz; each iteration is one batched curvature product of ``vectors`` vectors."""
    q = min(vectors, block.numel)
    V = torch.randn(block.numel, q, generator=generator, dtype=torch.float64)
    V = torch.linalg.qr(V).Q
    prev = None
    top = 0.0
    for _ in range(iterations):
        W = grads.hvp(V.T.to(grads.dtype), data, block, mode).to(torch.float64).T
        T = V.T @ W
        T = 0.5 * (T + T.T)
        ev = torch.linalg.eigvalsh(T)
        top = float(ev.abs().max())
        if not math.isfinite(top):
            raise InputError("non-finite curvature while estimating the LiSSA scale")
        if prev is not None and abs(top - prev) <= tol * max(top, 1e-300):
            break
        prev = top
        if float(torch.linalg.norm(W)) == 0.0:
            break
        V = torch.linalg.qr(W).Q
    return top


def _minibatches(
    data: DataLike, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of random minibatches (reshuffled every epoch) drawn with ``generator``.

    (x, y) pairs and map-style datasets (also behind a DataLoader) are sampled at random indices;
    an iterable dataset is cycled in its own order.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = as_tensor(data[0]), as_tensor(data[1])
        n = len(x)

        def take(idx: torch.Tensor):
            return x[idx], y[idx]

    else:
        ds = data.dataset if isinstance(data, DataLoader) else data
        if isinstance(ds, IterableDataset) or not isinstance(ds, Dataset):
            while True:
                yield from iter_batches(data, batch_size)
        n = len(ds)  # type: ignore[arg-type]

        def take(idx: torch.Tensor):
            b = default_collate([ds[int(i)] for i in idx])
            return b[0], b[1]

    while True:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n - batch_size + 1, batch_size):
            yield take(perm[s : s + batch_size])


class LissaInfluence(InfluenceModel):
    """Influence by the LiSSA (stochastic Neumann series) approximation of (H + lambda I)^{-1}.

    Args:
        model, loss, regularization, blocks, layers, hessian, micro_batch_size, projection:
            see
            :class:`~dvl_ooc.influence.base.InfluenceModel` (``hessian="gauss-newton"`` by
            default); ``regularization`` must be > 0.
        max_iter: number of recursion steps (the iteration budget). Deprecated name:
            ``depth``.
        scale: s, larger than the top eigenvalue of H + lambda I (the series converges for
            s > (top + lambda)/2). None: estimated in ``fit`` as
            ``scale_factor * (|top eigenvalue| + lambda)``.
        scale_factor: safety factor of the estimated scale.
        batch_size: samples per stochastic curvature minibatch; None (or >= n): the full fit data
            at every step (deterministic).
        seed: seed of the minibatch sampling (the same seed gives the same result).
        rtol, atol: a column stops when the change of its result in one step is
            ``<= max(rtol * ||result||, atol)``; ``rtol=None`` and ``atol=0``: always run
            ``max_iter`` steps, without a convergence warning.
        raise_on_nonconvergence: raise :class:`ConvergenceError` instead of warning with
            :class:`ConvergenceWarning` when ``max_iter`` steps do not meet the tolerance.
        raise_on_indefinite: refuse (at fit) an ``H + lambda I`` that the Lanczos estimate
            shows indefinite instead of warning.
        rhs_chunk: iterate at most this many right-hand sides together (bounds the ``k x p``
            work matrices; every chunk costs its own data passes and sees the same seeded
            minibatches). ``None``: all at once. :meth:`precondition` estimates the work
            matrices first and refuses with :class:`~dvl_ooc.exceptions.MemoryBudgetError`
            (naming the ``rhs_chunk`` that fits) when they exceed :attr:`memory_budget`.

    After each :meth:`precondition`, ``info["solve"]`` holds per block the number of steps,
    the largest relative change of the last step and how many columns converged.
    """

    needs_data_to_precondition = True
    requires_positive_regularization = True
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
        max_iter: int = 1000,
        scale: float | None = None,
        scale_factor: float = 1.1,
        batch_size: int | None = None,
        seed: int = 0,
        rtol: float | None = 1e-6,
        atol: float = 0.0,
        raise_on_nonconvergence: bool = False,
        projection: Any = None,
        rhs_chunk: int | None = None,
        raise_on_indefinite: bool = False,
        **deprecated: Any,
    ) -> None:
        max_iter = renamed_arguments(LissaInfluence.__init__, deprecated, {"depth": "max_iter"},
                                     {"max_iter": max_iter}).get("max_iter", max_iter)
        super().__init__(model, loss, regularization=regularization, blocks=blocks,
                         hessian=hessian, layers=layers, micro_batch_size=micro_batch_size,
                         projection=projection, raise_on_indefinite=raise_on_indefinite)
        if max_iter < 1:
            raise InputError(f"max_iter must be >= 1, got {max_iter}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise InputError(f"scale must be a positive number or None, got {scale}")
        if not scale_factor >= 1.0:
            raise InputError(f"scale_factor must be >= 1, got {scale_factor}")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size must be >= 1 or None, got {batch_size}")
        if rtol is not None and not rtol > 0:
            raise InputError(f"rtol must be > 0 or None, got {rtol}")
        if not atol >= 0:
            raise InputError(f"atol must be >= 0, got {atol}")
        if rhs_chunk is not None and (isinstance(rhs_chunk, bool) or int(rhs_chunk) != rhs_chunk
                                      or rhs_chunk < 1):
            raise InputError(f"rhs_chunk must be a positive integer or None, got {rhs_chunk!r}")
        self.max_iter = int(max_iter)
        self.scale = None if scale is None else float(scale)
        self.scale_factor = float(scale_factor)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rtol = rtol
        self.atol = float(atol)
        self.raise_on_nonconvergence = bool(raise_on_nonconvergence)
        self.rhs_chunk = None if rhs_chunk is None else int(rhs_chunk)

    def _extra_config(self) -> dict[str, Any]:
        return {
            "max_iter": self.max_iter,
            "scale": self.scale,
            "scale_factor": self.scale_factor,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ memory
    def _fit_bytes(self, block: ParamBlock) -> int:
        """The scale estimate's power iteration: 4 float64 vectors, their products and QR
        (nothing when ``scale`` is given)."""
        if self.scale is not None:
            return 0
        p, q = block.numel, min(4, block.numel)
        return 5 * 8 * p * q + _hvp_bytes(self.grads, p, q)

    def _solve_bytes(self, block: ParamBlock, n_rows: int, rows: int) -> int:
        """Estimated peak of :meth:`precondition` on ``n_rows`` gradients for ``block``, with
        ``rows`` right-hand sides per chunk: the ``(n, p)`` and ``(n, p_b)`` results, the
        iterates and the step's temporaries (2 ``(rows, p_b)`` arrays net) and the curvature
        product's temporaries (module docstring; the measured peak is 23-35 % below this)."""
        p_b, item = block.numel, self.grads.dtype.itemsize
        return (item * n_rows * (self.grads.num_params + p_b) + 2 * item * p_b * rows
                + _hvp_bytes(self.grads, p_b, rows))

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """The truncated Neumann series applied to ``g``, after checking that the results and
        the work matrices fit the memory budget (:class:`~dvl_ooc.exceptions.MemoryBudgetError`
        otherwise, with the ``rhs_chunk`` that fits)."""
        self._check_fitted()
        if g.ndim == 2:
            _check_solve_memory(self, len(g), self.rhs_chunk, self._solve_bytes, "LiSSA")
        return super().precondition(g)

    # ------------------------------------------------------------------ fit
    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        """The top eigenvalue of block ``index`` (unless ``scale`` is given); the scale itself
        is set by :meth:`_after_regularization` once lambda is resolved."""
        if self.scale is not None:
            self.info["fit"].append({"block": block.name, "scale": self.scale,
                                     "top_eigenvalue": None})
            return {"scale": torch.tensor(self.scale, dtype=torch.float64)}
        top = top_eigenvalue(self.grads, data, block, self.hessian_mode,
                             generator=torch_generator(self.seed, index))
        self.info["fit"].append({"block": block.name, "scale": None, "top_eigenvalue": top})
        return {"scale": torch.tensor(math.nan, dtype=torch.float64),
                "top_eigenvalue": torch.tensor(top, dtype=torch.float64)}

    def _block_spectrum(self, index: int, block: ParamBlock, state: Mapping[str, Any],
                        data: DataLike) -> Spectrum | None:
        return self._spectrum_estimate_if_needed(index, block, data)

    def _after_regularization(self, index: int, block: ParamBlock, reg: float) -> None:
        """``scale = scale_factor * (|top| + lambda)`` with the resolved lambda."""
        st = self._state[index]  # type: ignore[index]
        if self.scale is not None or "top_eigenvalue" not in st:
            return
        s = self.scale_factor * (float(st["top_eigenvalue"]) + reg)
        st["scale"] = torch.tensor(s, dtype=torch.float64)
        for d in self.info["fit"]:
            if d.get("block") == block.name:
                d["scale"] = s

    # ------------------------------------------------------------------ precondition
    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        s = float(self._state[i]["scale"])  # type: ignore[index]
        G = g.to(self.grads.dtype)
        chunk = self.rhs_chunk or max(len(G), 1)
        out = torch.empty_like(G)
        infos = []
        for c in range(0, len(G), chunk):
            X, info = self._series(i, block, G[c : c + chunk], reg, s)
            out[c : c + chunk] = X
            infos.append(info)
        info = {
            "block": block.name,
            "iterations": max((d["iterations"] for d in infos), default=0),
            "max_relative_change": max((d["max_relative_change"] for d in infos), default=0.0),
            "converged": sum(d["converged"] for d in infos),
            "columns": len(G),
            "scale": s,
        }
        self.info["solve"].append(info)
        stops = self.rtol is not None or self.atol > 0
        if stops and info["converged"] < len(G):
            rtol = 0.0 if self.rtol is None else self.rtol
            msg = (
                f"LiSSA reached max_iter={self.max_iter} in block {block.name!r} with relative "
                f"change {info['max_relative_change']:.2e} > rtol={rtol:g} (atol="
                f"{self.atol:g}) for {len(G) - info['converged']} of {len(G)} gradients; raise "
                "max_iter or the regularization (steps needed ~ scale / (lambda_min(H) + "
                "lambda))"
            )
            if self.raise_on_nonconvergence:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return out

    def _series(self, i: int, block: ParamBlock, G: torch.Tensor, reg: float, s: float
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The series for one chunk of right-hand sides ``G``; the seeded minibatch stream
        starts afresh, so a column's result does not depend on the chunking."""
        data = self._fit_data
        n = num_samples(data)  # type: ignore[arg-type]
        stochastic = self.batch_size is not None and self.batch_size < n
        if stochastic:
            gen = torch_generator(self.seed, i, 1)
            stream = _minibatches(data, self.batch_size, gen)  # type: ignore[arg-type]

        X = G.clone()
        gnorm = torch.linalg.norm(G, dim=1)
        active = gnorm > 0
        change = torch.zeros(len(G), dtype=G.dtype, device=G.device)
        steps = 0
        stops = self.rtol is not None or self.atol > 0
        rtol = 0.0 if self.rtol is None else self.rtol
        for j in range(1, self.max_iter + 1):
            if not bool(active.any()):
                break
            idx = active.nonzero().flatten()
            Xa = X[idx]
            batch = next(stream) if stochastic else data
            HX = self.grads.hvp(Xa, batch, block, self.hessian_mode)
            new = G[idx] + Xa - (HX + reg * Xa) / s
            nrm = torch.linalg.norm(new, dim=1)
            bound = (j + 1) * gnorm[idx] * (1 + 1e-6) + 1e-30
            if not bool(torch.isfinite(nrm).all()) or bool((nrm > bound).any()):
                raise DivergenceError(
                    f"LiSSA diverged in block {block.name!r} after {j} steps (iterate norm "
                    f"{float(nrm.max()):.3g} exceeds the bound (j+1)||g||): the scale {s:.4g} is "
                    "below the top eigenvalue of the (minibatch) curvature + lambda, or "
                    "H + lambda I is indefinite. Pass a larger scale (or scale_factor), a larger "
                    "batch_size, hessian='gauss-newton' or a larger regularization"
                )
            step = torch.linalg.norm(new - Xa, dim=1)
            change[idx] = step / nrm.clamp_min(1e-300)
            X[idx] = new
            steps = j
            if stops:  # ||step|| / s <= max(rtol ||new|| / s, atol): the result's own units
                active[idx] = step > torch.clamp(rtol * nrm, min=self.atol * s)
        info = {
            "iterations": steps,
            "max_relative_change": float(change.max()) if len(G) else 0.0,
            "converged": int((~active).sum()),
        }
        return X.div_(s), info
