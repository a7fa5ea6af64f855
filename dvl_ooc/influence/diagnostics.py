"""Curvature diagnostics, the indefinite-curvature policy and damping relative to the spectrum.

Every influence model describes, after ``fit``, the curvature ``H_b`` of each block and the
regularised matrix ``H_b + lambda I`` it inverts, in one plain-data format
(:meth:`InfluenceModel.diagnostics() <dvl_ooc.influence.base.InfluenceModel.diagnostics>`, also
``info["curvature"]``; JSON-able)::

    {"method", "hessian", "indefinite", "advice", "blocks": [
        {"block", "size", "source", "regularization", "regularization_rule",
         "top_eigenvalue", "top_kind", "min_eigenvalue", "min_kind",
         "mean_eigenvalue", "mean_kind", "eigenvalues_known",
         "negative_count", "negative_share", "negative_mass", "negative_kind",
         "below_minus_lambda", "indefinite", "condition_number", "condition_kind",
         "effective_rank", "effective_rank_kind", "approximation_error"}, ...]}

What each method knows (``source``):

* ``"eigendecomposition"`` (Direct, Arnoldi's dense path): every eigenvalue ``w``, so all
  fields are exact: ``negative_*`` count ``w < -tol`` (``tol = 1e3 eps max|w|``, ``eps`` of the
  model dtype), ``negative_mass = sum |w_-| / sum |w|``, condition number
  ``(w_max + lambda) / (w_min + lambda)``, effective rank ``sum w / (w + lambda)``.
* ``"lanczos top-k"`` (Arnoldi) and ``"nystroem sketch"`` (Nystroem): the ``k`` fitted
  eigenvalues. A positive semi-definite curvature (Gauss-Newton) has the certified lower bound
  ``min >= 0``; Arnoldi with ``which="LM"`` certifies ``min >= min(w_known, -|w_k|)`` (every
  unresolved eigenvalue is smaller in magnitude than the k-th); the minimum eigenvalue of the
  Nystroem core ``Omega^T H Omega`` is an *estimate* that is never below the true minimum, so a
  negative one proves negative curvature. ``approximation_error`` compares the curvature with
  its low-rank model on ``probes`` seeded Gaussian vectors ``z``:
  ``||H z - V diag(w) V^T z|| / ||H z||`` (mean and max), and the trace is estimated with
  the deflated Hutchinson estimator ``sum w + mean_z z^T (H - V diag(w) V^T) z``. Nystroem
  multiplies the probes in its single sketch pass (no extra pass); Arnoldi spends one pass.
* ``"ek-fac"``: the ``d_out d_a`` corrected eigenvalues ``Lambda`` of the EK-FAC model (exact for
  that model, positive semi-definite by construction); ``mean(Lambda)`` is the exact trace of
  the layer's Gauss-Newton block over ``p`` with ``fisher="ggn"``. ``approximation_error``
  against the layer's Gauss-Newton block is computed by ``diagnostics(data)`` (one pass per
  layer), not by ``fit``.
* ``"lanczos estimate"`` (CG, LiSSA: no stored spectrum): ``probes`` independent seeded Lanczos
  runs of ``steps`` curvature products each (full reorthogonalisation, float64; ``steps`` data
  passes of ``probes`` vectors) give Ritz values ``theta`` and weights ``tau^2`` (stochastic
  Lanczos quadrature): the top estimate is ``max theta`` (never above the true top), the
  minimum estimate ``min theta`` (never below the true minimum: a value below ``-lambda``
  proves that ``H + lambda I`` is indefinite), ``tr f(H) ~ p mean_runs sum tau^2 f(theta)`` for
  the mean, the negative share/mass and the effective rank. Memory: ``probes (steps + 1) p_b``
  float64. Run by ``fit`` when ``hessian="exact"`` (for the indefinite check: 2 runs of 20
  steps) or when the regularization is relative (4 runs for ``of="mean"``), otherwise by the
  first ``diagnostics()`` call (4 runs, over the attached fit data). Measured on the digits CNN
  of the tests (p = 628, 200 samples, exact Hessian): 20 steps find the smallest eigenvalue
  -0.17180 (true -0.17186) and the top 16.891 (exact) with 1 to 4 runs; the mean from 4 runs
  is 0.106 (true 0.092), from 1 run 0.162; 0.8 s (2 runs) to 1.3 s (4 runs) on one core.
* ``"identity"`` (TracIn): no curvature.

``*_kind`` says how far to trust a number: ``"exact"``, ``"lower bound"`` / ``"upper bound"``
(certified) or ``"estimate"``. Unknown values are ``None``.

**Indefinite policy** (one rule for every method): when ``H_b + lambda I`` is known to be
indefinite (an eigenvalue, Ritz value or sketch-core eigenvalue below ``-lambda``), ``fit``
emits an :class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning` naming the block, the smallest
eigenvalue found and the ways out (``hessian="gauss-newton"``, positive semi-definite, or a
regularization above ``|lambda_min|``), or raises
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with the same message when the model was
built with ``raise_on_indefinite=True``. ``H + lambda I`` numerically singular is always a
:class:`~dvl_ooc.exceptions.RegularizationError`. (CG still raises
:class:`~dvl_ooc.exceptions.NegativeCurvatureError` if a solve meets negative curvature that
the estimate missed; LiSSA :class:`~dvl_ooc.exceptions.DivergenceError`.)

**Relative damping**: ``regularization=Relative(1e-3)`` (``lambda = 1e-3 x`` the top eigenvalue of
each block) or ``Relative(0.1, of="mean")`` (``0.1 x trace / p``, kronfluence's EK-FAC
heuristic); the strings ``"1e-3*top"`` / ``"0.1*mean"`` are the same thing, and a mapping may
mix them with floats per block. ``fit`` resolves the value per block from the fitted spectrum
(the estimates above for methods without one), records it in ``info["fit"]`` (``regularization``,
``regularization_rule``) and in :meth:`config` (``regularization``: the resolved floats, so
store fingerprints record the actual ``lambda``; ``regularization_rule``: the rule), and the
pickled model carries the resolved values to every worker.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..exceptions import (
    IndefiniteCurvatureError,
    IndefiniteCurvatureWarning,
    InputError,
    RegularizationError,
)

__all__ = [
    "PROBES",
    "STEPS",
    "Relative",
    "Spectrum",
    "lanczos_spectrum",
    "low_rank_error",
    "operator_error",
    "summarize",
]

#: probe vectors of the error, trace and Lanczos estimates
PROBES = 4
#: Lanczos steps (data passes) of the estimates of methods without a stored spectrum
STEPS = 20
#: Lanczos runs of the estimate ``fit`` makes for the indefinite check (the extremes need
#: steps more than runs; ``Relative(..., of="mean")`` uses ``PROBES`` runs for its trace)
FIT_PROBES = 2
#: the seeding key of the diagnostic probes of block i: ``(seed, i, DIAGNOSTICS_KEY)``
DIAGNOSTICS_KEY = 2

_F64 = torch.float64


# ---------------------------------------------------------------------- relative damping
@dataclass(frozen=True)
class Relative:
    """Damping relative to the spectrum of each curvature block, resolved by ``fit``.

    ``Relative(1e-3)``: ``lambda_b = 1e-3 * top eigenvalue of block b``;
    ``Relative(0.1, of="mean")``: ``lambda_b = 0.1 * trace(H_b) / p_b`` (the mean eigenvalue).
    ``str(Relative(1e-3))`` is ``"0.001*top"``, and ``regularization="0.001*top"`` means the
    same (:meth:`parse`).
    """

    fraction: float
    of: Literal["top", "mean"] = "top"

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) \
                or f <= 0:
            raise RegularizationError(f"Relative: fraction must be a finite number > 0, got {f!r}")
        if self.of not in ("top", "mean"):
            raise RegularizationError(f"Relative: of must be 'top' or 'mean', got {self.of!r}")
        object.__setattr__(self, "fraction", float(f))

    def __str__(self) -> str:
        return f"{self.fraction:g}*{self.of}"

    _PATTERN = re.compile(r"^\s*([0-9.eE+-]+)\s*\*\s*(top|mean)\s*$")

    @classmethod
    def parse(cls, text: str) -> Relative:
        """``"1e-3*top"`` or ``"0.1*mean"`` -> :class:`Relative`."""
        m = cls._PATTERN.match(text)
        if m is None:
            raise RegularizationError(
                f"regularization {text!r}: expected a number, or a relative form like "
                "'1e-3*top' (fraction of the top eigenvalue) or '0.1*mean' (of the mean "
                "eigenvalue)")
        try:
            fraction = float(m.group(1))
        except ValueError as e:
            raise RegularizationError(f"regularization {text!r}: bad fraction") from e
        return cls(fraction, m.group(2))  # type: ignore[arg-type]

    def resolve(self, spectrum: Spectrum | None, block: str, method: str) -> float:
        """The absolute ``lambda`` of one block from its fitted spectrum."""
        if spectrum is None:
            raise RegularizationError(
                f"{method}: block {block!r} has no spectrum to resolve regularization="
                f"'{self}'; pass an absolute value")
        value = spectrum.top if self.of == "top" else spectrum.mean
        if value is None or not math.isfinite(value) or value <= 0:
            raise RegularizationError(
                f"{method}: regularization='{self}' resolves to {self.fraction:g} x {value} "
                f"(the {self.of} eigenvalue of block {block!r}), not a positive number; pass "
                "an absolute regularization")
        return self.fraction * value


def as_damping(value: Any) -> float | Relative:
    """One block's regularization: a float, a :class:`Relative` or its string form."""
    if isinstance(value, Relative):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return Relative.parse(value)
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise RegularizationError(
            f"regularization must be a number, a Relative or a string like '1e-3*top', "
            f"got {value!r}") from e


# ---------------------------------------------------------------------- spectra
@dataclass
class Spectrum:
    """What a fitted model knows about one block's curvature (float64 CPU tensors).

    Attributes:
        source: ``"eigendecomposition"``, ``"lanczos top-k"``, ``"nystroem sketch"``,
            ``"ek-fac"``, ``"lanczos estimate"``.
        size: ``p_b``.
        eigenvalues: the known eigenvalues (all ``p_b`` when ``complete``), or None.
        complete: ``eigenvalues`` is the whole spectrum of the curvature the method inverts.
        psd: the curvature is positive semi-definite by construction (Gauss-Newton).
        eps: machine epsilon of the model dtype (noise level of the eigenvalues).
        min_bound: a certified lower bound of the smallest eigenvalue (None: none known).
        min_estimate: an estimate of the smallest eigenvalue that is never below it (None).
        top_is_exact: ``max(eigenvalues)`` is the top eigenvalue (not a lower estimate).
        ritz, weights: ``(probes, m)`` Lanczos Ritz values and quadrature weights.
        trace: estimate of ``trace(H_b)`` when the eigenvalues do not give it.
        error: approximation error on probe vectors (plain data) or None.
        extra: method-specific plain data copied into the summary.
        inverted: the eigenvalues the method actually inverts, when only some of
            ``eigenvalues`` (for the singularity check; None: ``eigenvalues``).
    """

    source: str
    size: int
    eigenvalues: torch.Tensor | None = None
    complete: bool = False
    psd: bool = False
    eps: float = float(torch.finfo(_F64).eps)
    min_bound: float | None = None
    min_estimate: float | None = None
    top_is_exact: bool = True
    ritz: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    trace: float | None = None
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    inverted: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("eigenvalues", "inverted"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach().to("cpu", _F64).reshape(-1))

    @property
    def _known(self) -> torch.Tensor | None:
        w = self.eigenvalues
        return w if w is not None and w.numel() else None

    @property
    def top(self) -> float | None:
        """Top eigenvalue (exact, or an estimate)."""
        if self._known is not None:
            return float(self._known.max())
        if self.ritz is not None:
            return float(self.ritz.max())
        return None

    @property
    def mean(self) -> float | None:
        """Mean eigenvalue ``trace / p`` (exact when complete, else an estimate)."""
        if self.complete and self._known is not None:
            return float(self._known.sum()) / self.size
        if self.trace is not None:
            return self.trace / self.size
        if self.ritz is not None:
            return float((self.weights * self.ritz).sum(1).mean())
        return None

    @property
    def noise(self) -> float:
        scale = 0.0
        if self._known is not None:
            scale = float(self._known.abs().max())
        elif self.ritz is not None:
            scale = float(self.ritz.abs().max())
        return 1e3 * self.eps * scale


def _slq(spec: Spectrum, f: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``trace f(H) / p`` by stochastic Lanczos quadrature (mean over the runs)."""
    return float((spec.weights * f(spec.ritz)).sum(1).mean())


def summarize(spec: Spectrum | None, block: str, size: int, reg: float,
              rule: str | None = None) -> dict[str, Any]:
    """The plain-data description of one block (module docstring) at regularization ``reg``."""
    out: dict[str, Any] = {
        "block": block, "size": size, "source": None if spec is None else spec.source,
        "regularization": reg, "regularization_rule": rule,
        "top_eigenvalue": None, "top_kind": None, "min_eigenvalue": None, "min_kind": None,
        "mean_eigenvalue": None, "mean_kind": None, "eigenvalues_known": 0,
        "negative_count": None, "negative_share": None, "negative_mass": None,
        "negative_kind": None, "below_minus_lambda": None, "indefinite": None,
        "condition_number": None, "condition_kind": None, "effective_rank": None,
        "effective_rank_kind": None, "approximation_error": None,
    }
    if spec is None:
        return out
    out.update(spec.extra)
    out["approximation_error"] = spec.error
    noise = spec.noise
    w = spec._known
    if spec.ritz is not None:  # Lanczos estimates (no stored spectrum)
        th = spec.ritz
        out.update(top_eigenvalue=float(th.max()), top_kind="estimate",
                   min_eigenvalue=float(th.min()), min_kind="estimate",
                   mean_eigenvalue=spec.mean, mean_kind="estimate",
                   negative_share=_slq(spec, lambda t: (t < -noise).to(_F64)),
                   negative_kind="estimate")
        out["negative_count"] = int(round(out["negative_share"] * size))
        absmass = _slq(spec, lambda t: t.abs())
        out["negative_mass"] = (_slq(spec, lambda t: (-t).clamp_min(0)) / absmass
                                if absmass > 0 else 0.0)
        if spec.psd:
            out.update(min_eigenvalue=max(0.0, out["min_eigenvalue"]), negative_count=0,
                       negative_share=0.0, negative_mass=0.0, negative_kind="exact")
        below = float(th.min()) < -reg - noise
        out["below_minus_lambda"] = None
        out["indefinite"] = True if below else (False if spec.psd and reg > 0 else None)
        mn = out["min_eigenvalue"]
        if not below and mn + reg > 0:
            out["condition_number"] = (out["top_eigenvalue"] + reg) / (mn + reg)
            out["condition_kind"] = "estimate"
            if bool((th + reg > 0).all()):
                out["effective_rank"] = size * _slq(spec, lambda t: t / (t + reg))
                out["effective_rank_kind"] = "estimate"
        return out
    if w is None:  # nothing fitted about the spectrum (e.g. CG before its estimate)
        if spec.psd:
            out.update(min_eigenvalue=0.0, min_kind="lower bound", negative_count=0,
                       negative_share=0.0, negative_mass=0.0, negative_kind="exact",
                       indefinite=False if reg > 0 else None)
        return out
    k = w.numel()
    out["eigenvalues_known"] = k
    out["top_eigenvalue"] = float(w.max())
    out["top_kind"] = "exact" if spec.complete or spec.top_is_exact else "estimate"
    mean = spec.mean
    out["mean_eigenvalue"] = mean
    out["mean_kind"] = None if mean is None else "exact" if spec.complete else "estimate"
    neg = w < -noise
    below = int((w < -reg - noise).sum()) if reg >= 0 else k
    if spec.complete:
        mn, mn_kind = float(w.min()), "exact"
        absmass = float(w.abs().sum())
        out.update(negative_count=int(neg.sum()), negative_share=float(neg.sum()) / size,
                   negative_mass=float(w[neg].abs().sum()) / absmass if absmass > 0 else 0.0,
                   negative_kind="exact", below_minus_lambda=below)
        out["indefinite"] = below > 0
    else:
        known_min = float(w.min())
        if spec.psd:
            mn, mn_kind = 0.0, "lower bound"
        elif spec.min_bound is not None:
            mn, mn_kind = min(spec.min_bound, known_min), "lower bound"
        elif spec.min_estimate is not None:
            mn, mn_kind = min(spec.min_estimate, known_min), "estimate"
        else:
            mn, mn_kind = known_min, "estimate"
        if spec.psd:
            out.update(negative_count=0, negative_share=0.0, negative_mass=0.0,
                       negative_kind="exact")
        else:
            out.update(negative_count=int(neg.sum()), negative_kind="among known")
        certified_below = below > 0 or (spec.min_estimate is not None
                                        and spec.min_estimate < -reg - noise)
        if certified_below:
            out["indefinite"] = True
        elif (spec.psd and reg > 0) or (mn_kind == "lower bound" and mn + reg > noise):
            out["indefinite"] = False
        out["below_minus_lambda"] = below if spec.psd or mn_kind == "lower bound" else None
        if out["below_minus_lambda"] is None and below:
            out["below_minus_lambda"] = below  # at least these
    out["min_eigenvalue"], out["min_kind"] = mn, mn_kind
    if not out["indefinite"] and mn + reg > 0:
        out["condition_number"] = (out["top_eigenvalue"] + reg) / (mn + reg)
        out["condition_kind"] = {"exact": "exact", "lower bound": "upper bound",
                                 "estimate": "estimate"}[mn_kind]
        if bool((w + reg > 0).all()):
            terms = torch.where(w.abs() <= noise, torch.zeros_like(w), w / (w + reg))
            out["effective_rank"] = float(terms.sum())
            out["effective_rank_kind"] = "exact" if spec.complete else (
                "lower bound" if spec.psd else "estimate")
    return out


def advice(summary: dict[str, Any], method: str, hessian: str) -> str:
    """What is wrong with an indefinite block and what to do, in one message."""
    mn, reg, kind = summary["min_eigenvalue"], summary["regularization"], summary["min_kind"]
    count = summary.get("below_minus_lambda")
    what = (f"{count} eigenvalue(s) below -lambda" if count
            else "an eigenvalue below -lambda")
    found = "smallest eigenvalue" if kind == "exact" else "smallest eigenvalue found"
    if kind == "estimate":
        found += " (an estimate; the true one is at least as negative)"
    need = abs(mn) if mn is not None else float("nan")
    ways = ("use hessian='gauss-newton' (positive semi-definite), or a regularization above "
            f"|lambda_min| = {need:.3g} (e.g. regularization={1.5 * need:.3g} for this block)"
            if hessian == "exact" else
            f"pass a regularization above {need:.3g}")
    return (f"{method}: H + lambda I is indefinite in block {summary['block']!r}: {what} "
            f"({found} {mn:.4g}, lambda {reg:.3g}; source: {summary['source']}). Influences "
            "then weight those directions by 1/(w + lambda) < 0 or by huge factors near "
            f"-lambda: signs and magnitudes are not meaningful. Ways out: {ways}; "
            "see model.diagnostics()")


def enforce(summary: dict[str, Any], method: str, hessian: str, raise_on_indefinite: bool,
            stacklevel: int = 4) -> None:
    """The indefinite policy for one block: warn, or raise with ``raise_on_indefinite``."""
    if summary["indefinite"] is not True:
        return
    msg = advice(summary, method, hessian)
    if raise_on_indefinite:
        raise IndefiniteCurvatureError(msg)
    warnings.warn(msg, IndefiniteCurvatureWarning, stacklevel=stacklevel)


def check_singular(w: torch.Tensor | None, reg: float, block: str, method: str) -> None:
    """Raise :class:`RegularizationError` when ``w + lambda`` is numerically 0."""
    if w is None or w.numel() == 0:
        return
    shifted = w + reg
    scale = max(1.0, float(w.abs().max()))
    if bool((shifted.abs() <= 1e-12 * scale).any()):
        raise RegularizationError(
            f"{method}: H + lambda I is singular in block {block!r} (min |eigenvalue + lambda| "
            f"= {float(shifted.abs().min()):.3g}, lambda {reg:.3g}); use a larger "
            "regularization (e.g. Relative(1e-3): 1e-3 x the top eigenvalue) or "
            "hessian='gauss-newton'")


# ---------------------------------------------------------------------- estimators
def probe_vectors(p: int, probes: int, rng: np.random.Generator,
                  device: torch.device | str) -> torch.Tensor:
    """``(probes, p)`` standard Gaussian probe vectors (float64) from ``rng``."""
    return torch.from_numpy(rng.standard_normal((probes, p))).to(device=device, dtype=_F64)


def operator_error(Z: torch.Tensor, HZ: torch.Tensor, approx: torch.Tensor,
                   definition: str) -> dict[str, Any]:
    """Relative residuals ``||H z - A z|| / ||H z||`` of an approximation ``A`` on probes
    ``Z`` (rows), as plain data (mean and max)."""
    HZ = HZ.to(_F64)
    den = torch.linalg.vector_norm(HZ, dim=1)
    res = torch.linalg.vector_norm(HZ - approx.to(HZ), dim=1) / den.clamp_min(1e-300)
    return {"probes": int(len(Z)), "relative_residual_mean": float(res.mean()),
            "relative_residual_max": float(res.max()), "definition": definition}


def low_rank_error(Z: torch.Tensor, HZ: torch.Tensor, V: torch.Tensor, w: torch.Tensor
                   ) -> tuple[dict[str, Any], float]:
    """Error of the low-rank model ``V diag(w) V^T`` of ``H`` on probes ``Z`` (rows) with
    products ``HZ``: the relative residuals (plain data) and the deflated Hutchinson trace
    estimate ``sum w + mean_z z^T (H - V diag(w) V^T) z``."""
    Z, HZ = Z.to(_F64), HZ.to(_F64)
    Vd, wd = V.to(device=Z.device, dtype=_F64), w.to(device=Z.device, dtype=_F64)
    approx = ((Z @ Vd) * wd) @ Vd.T
    trace = float(wd.sum()) + float(((HZ - approx) * Z).sum(1).mean())
    err = operator_error(Z, HZ, approx,
                         "||H z - V diag(w) V^T z|| / ||H z|| on seeded Gaussian z")
    return err, trace


def lanczos_spectrum(matvec: Callable[[torch.Tensor], torch.Tensor], p: int, *,
                     steps: int = STEPS, probes: int = PROBES,
                     rng: np.random.Generator, device: torch.device | str
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``probes`` independent Lanczos runs of up to ``steps`` steps on a symmetric operator
    (full reorthogonalisation, float64), advanced together: one ``matvec`` call of
    ``(probes, p)`` rows per step (one data pass).

    Returns Ritz values and quadrature weights ``(probes, m)`` (weights ``tau^2``: the squared
    first components of the Ritz vectors; a broken-down run pads with weight 0) and the number
    of ``matvec`` calls.
    """
    m = max(1, min(int(steps), p))
    r = max(1, int(probes))
    q = probe_vectors(p, r, rng, device)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    Q = torch.zeros(m, r, p, dtype=_F64, device=device)
    alpha = torch.zeros(r, m, dtype=_F64)
    beta = torch.zeros(r, m, dtype=_F64)
    length = torch.full((r,), m, dtype=torch.long)
    live = torch.ones(r, dtype=torch.bool)
    prev = torch.zeros_like(q)
    b_prev = torch.zeros(r, dtype=_F64, device=device)
    calls = 0
    for j in range(m):
        Q[j] = q
        w = matvec(q).to(_F64)
        calls += 1
        if not bool(torch.isfinite(w).all()):
            raise InputError("non-finite curvature-vector product in the Lanczos estimate; "
                             "check the loss and the model")
        a = (w * q).sum(1)
        w = w - a[:, None] * q - b_prev[:, None] * prev
        for _ in range(2):  # full reorthogonalisation, twice
            c = torch.einsum("jrp,rp->jr", Q[: j + 1], w)
            w = w - torch.einsum("jr,jrp->rp", c, Q[: j + 1])
        b = torch.linalg.vector_norm(w, dim=1)
        alpha[:, j] = a.cpu()
        beta[:, j] = b.cpu()
        scale = a.abs().clamp_min(b.abs()).clamp_min(1e-300)
        stop = live.to(device) & (b <= 1e-10 * scale)
        for i in stop.nonzero().flatten().tolist():
            length[i] = j + 1
        live &= ~stop.cpu()
        prev = q
        b_prev = torch.where(live.to(device), b, torch.zeros_like(b))
        q = torch.where(live.to(device)[:, None], w / b.clamp_min(1e-300)[:, None],
                        torch.zeros_like(w))
        if not bool(live.any()):
            break
    ritz = torch.zeros(r, m, dtype=_F64)
    weights = torch.zeros(r, m, dtype=_F64)
    for i in range(r):
        n = int(length[i])
        T = torch.diag(alpha[i, :n]) + torch.diag(beta[i, : n - 1], 1) \
            + torch.diag(beta[i, : n - 1], -1)
        th, S = torch.linalg.eigh(T)
        ritz[i, :n], weights[i, :n] = th, S[0] ** 2
        if n < m:  # pad with a harmless node of zero weight
            ritz[i, n:] = th[-1]
    return ritz, weights, calls
