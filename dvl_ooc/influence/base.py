"""Common interface of influence models.

An influence model estimates, once, the curvature ``H`` of the **mean** training loss (``fit``)
and afterwards applies ``(H + lambda I)^{-1}`` to gradients (``precondition``). Influences are

    influences(...)[t, r] = < (H + lambda I)^{-1} grad l(z_t), grad l(z_r) >

Positive values mean that up-weighting training point ``r`` lowers the loss of test point ``t``
(``r`` is helpful). With a block structure (``blocks="layer"`` or a mapping) ``H`` is replaced
by its block diagonal and the inner product is the sum over blocks.

Arguments shared by every method (keyword-only): ``regularization``, ``blocks`` (how the
attributed parameters are *grouped* into curvature blocks), ``layers`` (which module or parameter
names are *attributed*; the other parameters are constants, like frozen ones), ``hessian``
(``"gauss-newton"``, the default of every method, or ``"exact"``) and ``micro_batch_size``.
Iterative methods also take ``max_iter``, ``rtol`` and ``atol``, and ``solver`` for the
algorithm variant; seeded ones ``seed`` (streams derived through :mod:`dvl_ooc.seeding`).

A new method is a subclass with no ``fit`` override. :meth:`InfluenceModel.fit` validates the
data (one pass over it when the class sets ``validates_fit_data``), resets ``info["fit"]`` and
calls ``_fit_blocks(data)``, which by default loops over the blocks calling
``_fit_block(index, block, data, reg)`` (estimate and return the block's curvature state; a
method whose blocks share data passes, like EK-FAC, overrides ``_fit_blocks`` instead).
``_precondition_block(index, block, g, reg)`` applies the regularised inverse to a
``(n, p_block)`` matrix; ``_state_keys`` names the fitted tensors so that the state can be saved
and shipped.

Diagnostics: ``info["fit"]`` (one plain-data dict per block, reset by every ``fit``, with the
resolved ``regularization`` of the block), ``info["solve"]`` (one dict per block from the last
``precondition``, for iterative solvers) and ``info["curvature"]`` (= :meth:`diagnostics`: top
and smallest eigenvalue or a bound, negative share, condition number of ``H + lambda I``,
effective rank, approximation error; :mod:`dvl_ooc.influence.diagnostics` for the format).

After ``_fit_blocks``, :meth:`InfluenceModel.fit` asks each block for what the method knows
about its spectrum (``_block_spectrum``: eigenvalues, bounds or a Lanczos estimate, a
:class:`~dvl_ooc.influence.diagnostics.Spectrum`), resolves relative damping
(``regularization=Relative(1e-3)`` or ``"1e-3*top"``, ``Relative(0.1, of="mean")``) per block
from it, refuses a numerically singular ``H + lambda I`` (:class:`RegularizationError`) and
applies the one indefinite policy: an :class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning`
when ``H + lambda I`` is known to be indefinite, or
:class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` with ``raise_on_indefinite=True``.
Only then is the fitted state committed; ``_after_regularization`` lets a method derive
lambda-dependent state (LiSSA's scale). Setting ``model.regularization`` on a fitted model
re-resolves, re-checks and re-derives without a new fit (the curvature does not depend on
lambda).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..data import DataLike, num_samples
from ..exceptions import (
    InputError,
    LengthMismatchError,
    MemoryBudgetError,
    NonFiniteError,
    NotFittedError,
    RegularizationError,
)
from ..grads import HessianMode, LossFn, ModelGradients, ParamBlock, ProjectedGradients
from ..layers.projection import GradientProjector
from ..seeding import numpy_rng
from .diagnostics import (
    DIAGNOSTICS_KEY,
    FIT_PROBES,
    PROBES,
    STEPS,
    Relative,
    Spectrum,
    advice,
    as_damping,
    check_singular,
    enforce,
    lanczos_spectrum,
    summarize,
)

__all__ = ["InfluenceModel", "Relative", "validate_fit_data"]

Damping = float | str | Relative

#: the keys ``projection=`` accepts as a mapping (the :class:`GradientProjector` arguments)
_PROJECTION_KEYS = ("k_in", "k_out", "dense_dim", "seed", "dtype")


def check_projector(projection: GradientProjector, model: nn.Module,
                    layers: Sequence[str] | None) -> None:
    """A given projector must be built on ``model``, with the same ``layers`` if given."""
    if projection.model is not model:
        raise InputError("projection: the GradientProjector was built for another model; "
                         "build it on this model, or pass a dict of its arguments")
    if layers is not None:
        want = [layers] if isinstance(layers, str) else list(layers)
        if want != projection.layers:
            raise InputError(
                f"layers={want} differs from the projector's layers={projection.layers}; "
                "pass layers= to the GradientProjector only (or a dict as projection=)")


def _projector(model: nn.Module, projection: GradientProjector | Mapping[str, Any],
               layers: Sequence[str] | None, micro_batch_size: int) -> GradientProjector:
    """The :class:`GradientProjector` of ``projection=`` (a projector, or its arguments)."""
    if isinstance(projection, GradientProjector):
        check_projector(projection, model, layers)
        return projection
    if not isinstance(projection, Mapping):
        raise InputError("projection must be None, a GradientProjector or a dict of its "
                         f"arguments {_PROJECTION_KEYS}, got {type(projection).__name__}")
    unknown = sorted(set(projection) - set(_PROJECTION_KEYS))
    if unknown:
        raise InputError(f"projection: unknown keys {unknown}; allowed {list(_PROJECTION_KEYS)}")
    kw = dict(projection)
    if "dtype" not in kw:  # features in the model's dtype
        kw["dtype"] = next((p.dtype for p in model.parameters()), torch.float32)
    return GradientProjector(model, layers=layers, micro_batch_size=micro_batch_size, **kw)


def validate_fit_data(grads: ModelGradients | ProjectedGradients, data: DataLike) -> None:
    """One pass over ``data``: shapes, finiteness of inputs and of the mean loss."""
    loss = grads.mean_loss(data)
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"the mean training loss is {loss}; check the labels and the loss (e.g. log of 0)"
        )


def _num_rows(x: Any, y: Any, what: str) -> int:
    """The common number of samples of ``x`` and ``y`` (checked before any batch is read)."""
    try:
        nx, ny = len(x), len(y)
    except TypeError:
        raise InputError(f"{what}: x and y need a leading sample axis (got "
                         f"{type(x).__name__} and {type(y).__name__})") from None
    if nx != ny:
        raise LengthMismatchError(
            f"{what}: x has {nx} samples but y has {ny}; pass one label per sample")
    if nx == 0:
        raise InputError(f"{what}: no samples (empty x and y)")
    return nx


class InfluenceModel:
    """Base class of all influence models.

    Args:
        model: trained network; it is put into ``eval()`` mode.
        loss: mean-reduced loss ``loss(outputs, targets)``.
        regularization: ``lambda`` added to the curvature: a float; or relative to each
            block's spectrum, resolved by :meth:`fit` and recorded (``info["fit"]``,
            :meth:`config`): ``Relative(1e-3)`` (``1e-3 x`` the top eigenvalue; the string
            ``"1e-3*top"`` is the same) or ``Relative(0.1, of="mean")`` (``0.1 x trace/p``,
            ``"0.1*mean"``); or a mapping ``block name -> any of these``.
        blocks: how the attributed parameters are grouped into curvature blocks:
            ``"model"``, ``"layer"`` or a mapping ``block name -> parameter/module names``.
        hessian: ``"gauss-newton"`` (default for every method; positive semi-definite for
            convex losses) or ``"exact"`` (where the method supports it).
        layers: module or parameter names whose trainable parameters are attributed; the
            others are treated as constants (like frozen ones). ``None``: all of them.
        micro_batch_size: samples per vectorised gradient micro-batch (bounds memory).
        projection: ``None`` (features are the ``p``-dimensional gradients), a
            :class:`~dvl_ooc.layers.GradientProjector` built on ``model``, or a dict of its
            arguments ``k_in``, ``k_out``, ``dense_dim``, ``seed`` (and ``dtype``; default the
            model's), to which ``layers=`` and ``micro_batch_size`` are passed. Features are
            then the ``k``-dimensional projected gradients ``P g`` and the curvature is the
            projected Gauss-Newton matrix ``P GGN P^T`` (``k x k``; only
            ``hessian="gauss-newton"``), so influences are ``(P g_t)^T (P GGN P^T +
            lambda I)^{-1} (P g_r)``: memory and solves scale with ``k``, not ``p``
            (:class:`~dvl_ooc.grads.ProjectedGradients` for the costs). ``blocks`` is then
            ``"model"`` or ``"layer"`` (one block per projected layer, plus the dense block).
            The projector pickles without its matrices (regenerated from the seed).
        raise_on_indefinite: when ``H + lambda I`` is known to be indefinite after ``fit``
            (eigenvalues below ``-lambda``), raise
            :class:`~dvl_ooc.exceptions.IndefiniteCurvatureError` instead of warning with
            :class:`~dvl_ooc.exceptions.IndefiniteCurvatureWarning` (the default).

    Attributes:
        info: diagnostics as plain data: ``info["fit"]`` (list of per-block dicts, reset by
            :meth:`fit`) and ``info["solve"]`` (per-block dicts of the last
            :meth:`precondition`; empty for direct methods) and ``info["curvature"]``
            (:meth:`diagnostics` as of the last ``fit`` or ``diagnostics`` call).
    """

    #: methods that cannot work with lambda == 0 set this to True
    requires_positive_regularization: ClassVar[bool] = False
    #: curvature modes a method supports
    supported_hessians: ClassVar[tuple[str, ...]] = ("exact", "gauss-newton")
    #: names of tensor attributes holding the fitted, data-free state of each block
    _state_keys: ClassVar[tuple[str, ...]] = ()
    #: methods that need the fit data again when preconditioning (CG, LiSSA) set this to True;
    #: the data is never pickled or saved: re-attach it with :meth:`attach_data`
    needs_data_to_precondition: ClassVar[bool] = False
    #: methods that never look at the whole fit data during ``fit`` (e.g. CG, LiSSA) set this
    #: to True so that ``fit`` checks it (shapes, finite inputs and mean loss) in one pass
    validates_fit_data: ClassVar[bool] = False
    #: bytes a fit may use, and the in-memory paths (:meth:`influences`,
    #: :meth:`self_influence`, ...) plan their batches with; ``None``: the memory available
    #: when the call starts
    memory_budget: int | None = None
    #: target bytes of one streamed batch of rows of the in-memory paths when their
    #: ``batch_size`` is None (bounded by a quarter of the budget too); see :meth:`influences`
    stream_batch_bytes: int = 256 << 20
    #: bound on the test features the in-memory :meth:`influences` holds at once (with half
    #: the budget); more are processed in groups, each with its own pass over the training
    #: data (the calculators' ``max_test_feature_bytes`` default)
    stream_test_bytes: int = 1 << 30

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        *,
        regularization: Damping | Mapping[str, Damping] = 1e-3,
        blocks: str | Mapping[str, Sequence[str]] = "model",
        hessian: HessianMode = "gauss-newton",
        layers: Sequence[str] | None = None,
        micro_batch_size: int = 64,
        projection: GradientProjector | Mapping[str, Any] | None = None,
        raise_on_indefinite: bool = False,
    ) -> None:
        if hessian not in self.supported_hessians:
            raise InputError(
                f"{type(self).__name__} supports hessian in {self.supported_hessians}, "
                f"not {hessian!r}"
            )
        model.eval()
        self.grads: ModelGradients | ProjectedGradients
        if projection is None:
            self.grads = ModelGradients(model, loss, blocks, layers=layers,
                                        micro_batch_size=micro_batch_size)
        else:
            if hessian != "gauss-newton":
                raise InputError(
                    f"{type(self).__name__}(projection=...) works with the projected "
                    f"Gauss-Newton matrix only, not hessian={hessian!r}: pass "
                    "hessian='gauss-newton' (the default), or drop projection= for the exact "
                    "Hessian in parameter space"
                )
            projector = _projector(model, projection, layers, micro_batch_size)
            self.grads = ProjectedGradients(projector, loss, blocks,
                                            micro_batch_size=micro_batch_size)
        self.layers: list[str] | None = self.grads.layers
        self.hessian_mode: HessianMode = hessian
        self.info: dict[str, Any] = {"fit": [], "solve": [], "curvature": None}
        self.raise_on_indefinite = bool(raise_on_indefinite)
        self._state: list[dict[str, torch.Tensor]] | None = None
        self._spectra: list[Spectrum | None] | None = None
        self.regularization = regularization  # type: ignore[assignment]
        self._fit_data: DataLike | None = None
        self.n_fit: int | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def model(self) -> nn.Module:
        return self.grads.model

    @property
    def loss(self) -> LossFn:
        return self.grads.loss

    @property
    def blocks(self) -> list[ParamBlock]:
        return self.grads.blocks

    @property
    def is_fitted(self) -> bool:
        return self._state is not None

    @property
    def fit_info(self) -> list[dict[str, Any]]:
        """Deprecated: use ``info["fit"]``."""
        warnings.warn(f"{type(self).__name__}.fit_info is deprecated, use .info['fit']",
                      DeprecationWarning, stacklevel=2)
        return self.info["fit"]

    @property
    def last_info(self) -> list[dict[str, Any]]:
        """Deprecated: use ``info["solve"]``."""
        warnings.warn(f"{type(self).__name__}.last_info is deprecated, use .info['solve']",
                      DeprecationWarning, stacklevel=2)
        return self.info["solve"]

    # ------------------------------------------------------------------ regularization
    @property
    def regularization(self) -> dict[str, float | Relative]:
        """``lambda`` per block: floats (resolved after :meth:`fit` for relative damping; a
        block whose relative damping is not resolved yet holds its :class:`Relative`).

        Assigning a float, a :class:`Relative` (or its string) or a mapping validates it; on a
        fitted model it is resolved from the fitted spectrum at once and checked (singular,
        indefinite policy) without a new fit."""
        return self._regularization

    @regularization.setter
    def regularization(self, value: Damping | Mapping[str, Damping]) -> None:
        spec = self._resolve_regularization(value)
        if self._state is not None and self._spectra is None and any(
                isinstance(v, Relative) for v in spec.values()):
            raise RegularizationError(
                f"{type(self).__name__}: this fitted model carries no spectrum (fitted or saved "
                "before relative damping existed); refit it to use a relative regularization")
        if self._state is None or self._spectra is None:
            self._damping = spec
            self._regularization = dict(spec)
            return
        regs = self._resolve_damping(spec, self._spectra)
        summaries = self._check_curvature(self._spectra, regs, spec)
        self._damping, self._regularization = spec, regs  # type: ignore[assignment]
        self._commit_regularization(summaries)

    def _resolve_regularization(self, reg: Damping | Mapping[str, Damping]
                                ) -> dict[str, float | Relative]:
        """Validate ``regularization`` (a value or a mapping over the block names) into a
        dict ``block name -> float or Relative`` (floats for absolute values, unchanged)."""
        names = [b.name for b in self.blocks]
        if isinstance(reg, Mapping):
            missing = set(names) - set(reg)
            extra = set(reg) - set(names)
            if missing or extra:
                raise RegularizationError(
                    f"regularization mapping must have exactly the block names {names}; "
                    f"missing {sorted(missing)}, unknown {sorted(extra)}"
                )
            out = {k: as_damping(reg[k]) for k in names}
        else:
            value = as_damping(reg)
            out = {k: value for k in names}
        for k, v in out.items():
            if isinstance(v, Relative):
                continue
            if not (v == v) or v in (float("inf"), float("-inf")):
                raise RegularizationError(f"regularization for block {k!r} is not finite: {v}")
            if v < 0 or (v == 0 and self.requires_positive_regularization):
                need = "> 0" if self.requires_positive_regularization else ">= 0"
                raise RegularizationError(
                    f"{type(self).__name__} needs regularization {need} (block {k!r} has {v}); "
                    "pass a small positive value, e.g. Relative(1e-3) (1e-3 times the top "
                    "eigenvalue of each block)"
                )
        return out

    @property
    def regularization_rule(self) -> dict[str, str | None] | None:
        """The relative damping per block (``"0.001*top"``; ``None`` for absolute blocks), or
        ``None`` when every block is absolute."""
        damping = getattr(self, "_damping", {})
        if not any(isinstance(v, Relative) for v in damping.values()):
            return None
        return {k: str(v) if isinstance(v, Relative) else None for k, v in damping.items()}

    def _fit_reg(self, name: str) -> float:
        """The ``reg`` argument of ``_fit_block``: the absolute value, or NaN for a block whose
        relative damping is resolved only after the fit (methods must not use it then)."""
        v = self._damping[name]
        return math.nan if isinstance(v, Relative) else float(v)

    def _resolve_damping(self, spec: Mapping[str, float | Relative],
                         spectra: Sequence[Spectrum | None]) -> dict[str, float]:
        out = {}
        for block, sp in zip(self.blocks, spectra):
            v = spec[block.name]
            out[block.name] = (v.resolve(sp, block.name, type(self).__name__)
                               if isinstance(v, Relative) else float(v))
        self._resolve_regularization(out)  # requires_positive_regularization, finiteness
        return out

    def _check_curvature(self, spectra: Sequence[Spectrum | None], regs: Mapping[str, float],
                         spec: Mapping[str, float | Relative]) -> list[dict[str, Any]]:
        """Per block: refuse a singular ``H + lambda I``, summarise, apply the indefinite
        policy (warn, or raise with ``raise_on_indefinite``); returns the summaries."""
        method = type(self).__name__
        summaries = []
        for block, sp in zip(self.blocks, spectra):
            reg = regs[block.name]
            if sp is not None:
                check_singular(sp.eigenvalues if sp.inverted is None else sp.inverted, reg,
                               block.name, method)
            rule = spec[block.name]
            summaries.append(summarize(sp, block.name, block.numel, reg,
                                       str(rule) if isinstance(rule, Relative) else None))
        for sm in summaries:
            enforce(sm, method, self.hessian_mode, self.raise_on_indefinite, stacklevel=4)
        return summaries

    def _commit_regularization(self, summaries: list[dict[str, Any]]) -> None:
        """Record the resolved values (``info["fit"]``, ``info["curvature"]``) and let the
        method derive its lambda-dependent state."""
        rule = self.regularization_rule or {}
        for d in self.info["fit"]:
            name = d.get("block") if isinstance(d, dict) else None
            if name in self._regularization:
                d["regularization"] = self._regularization[name]
                if rule.get(name):
                    d["regularization_rule"] = rule[name]
        for i, block in enumerate(self.blocks):
            self._after_regularization(i, block, self._regularization[block.name])
        self.info["curvature"] = self._curvature_report(summaries)

    def _curvature_report(self, summaries: list[dict[str, Any]]) -> dict[str, Any]:
        flags = [s["indefinite"] for s in summaries]
        bad = [s for s in summaries if s["indefinite"] is True]
        return {
            "method": type(self).__name__,
            "hessian": self.hessian_mode,
            "indefinite": True if bad else (False if flags and all(f is False for f in flags)
                                            else None),
            "advice": advice(bad[0], type(self).__name__, self.hessian_mode) if bad else None,
            "blocks": summaries,
        }

    def _after_regularization(self, index: int, block: ParamBlock, reg: float) -> None:
        """Hook: derive lambda-dependent fitted state of block ``index`` (default: none)."""

    @property
    def projector(self) -> GradientProjector | None:
        """The gradient projection of ``projection=`` (``None``: features are gradients)."""
        return getattr(self.grads, "projector", None)

    def config(self) -> dict[str, Any]:
        """Plain-data description of the method and its parameters (for stores and
        fingerprints); with ``projection=`` it includes the projector's configuration. With
        relative damping, ``regularization`` holds the resolved floats after :meth:`fit` (the
        rule before) and ``regularization_rule`` the rule."""
        cfg = {
            "method": type(self).__name__,
            "hessian": self.hessian_mode,
            "regularization": {k: str(v) if isinstance(v, Relative) else v
                               for k, v in self.regularization.items()},
            "blocks": {b.name: list(b.names) for b in self.blocks},
            "layers": None if self.layers is None else list(self.layers),
            **self._extra_config(),
        }
        rule = self.regularization_rule
        if rule is not None:  # absolute configurations (and fingerprints) stay as they were
            cfg["regularization_rule"] = rule
        if self.projector is not None:
            cfg["projection"] = self.projector.config()
        return cfg

    def _extra_config(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ fitting
    def _fit_passes(self) -> int | None:
        """Data passes of :meth:`fit` (after the validation pass), for the progress bar's
        total; ``None`` when the method does not know in advance (iterative estimates)."""
        return None

    def fit(self, data: DataLike, *, progress: bool = False) -> InfluenceModel:
        """Estimate the curvature on ``data`` ((x, y), Dataset or DataLoader); returns self.

        ``progress=True`` shows a ``tqdm`` bar (stderr, :func:`dvl_ooc.runtime.progress`)
        counting the samples of every data pass of the fit (validation, curvature
        accumulation, EK-FAC's covariance and eigenvalue passes, Lanczos / power /
        sketch passes, Lanczos estimates for relative damping), in micro-batches; its total
        is ``passes x n`` when the method knows its passes (Direct, EK-FAC), else open.
        Off by default (library calls are silent); the results do not depend on it.

        Subclasses do not override this: they implement ``_fit_block`` (or ``_fit_blocks``).
        """
        from ..runtime import progress as _progress

        n = num_samples(data)
        self._check_fit_memory()
        passes = self._fit_passes()
        if passes is not None:
            passes += int(self.validates_fit_data)
        with _progress(bool(progress), total=None if passes is None else passes * n,
                       unit="sample", desc=f"{type(self).__name__}.fit") as bar, \
                self.grads.counting(bar if progress else None):
            return self._fit(data, n)

    def _fit_stage(self, text: str) -> None:
        """Name the current stage of the fit on its progress bar (when one is shown)."""
        bar = getattr(self.grads, "_bar", None)
        if bar is not None and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(text, refresh=False)

    def _fit(self, data: DataLike, n: int) -> InfluenceModel:
        if self.validates_fit_data:
            validate_fit_data(self.grads, data)
        self.info["fit"] = []
        self.info["curvature"] = None
        self._pending_spectra: dict[int, Spectrum] = {}
        try:
            state = self._fit_blocks(data)
            spectra = [self._block_spectrum(i, block, state[i], data)
                       for i, block in enumerate(self.blocks)]
        finally:
            del self._pending_spectra
        regs = self._resolve_damping(self._damping, spectra)
        summaries = self._check_curvature(spectra, regs, self._damping)
        self.n_fit = n
        self._state = state
        self._spectra = spectra
        self._regularization = regs  # type: ignore[assignment]
        self._fit_data = data if self.needs_data_to_precondition else None
        self._commit_regularization(summaries)
        return self

    # ------------------------------------------------------------------ diagnostics
    def _block_spectrum(self, index: int, block: ParamBlock, state: Mapping[str, Any],
                        data: DataLike) -> Spectrum | None:
        """Hook: what the fit learned about the spectrum of block ``index``. Default: the
        :class:`Spectrum` a ``_fit_block`` left in ``self._pending_spectra[index]``, else
        nothing known (positive semi-definite by construction for the Gauss-Newton matrix)."""
        pending = getattr(self, "_pending_spectra", {}).get(index)
        return pending if pending is not None else self._unknown_spectrum(block)

    def _estimate_spectrum(self, index: int, block: ParamBlock, spectrum: Spectrum | None,
                           data: DataLike, probes: int, steps: int) -> Spectrum | None:
        """Hook of :meth:`diagnostics`: complete ``spectrum`` with data passes (default: a
        Lanczos estimate where nothing is known)."""
        if spectrum is not None and (spectrum.eigenvalues is not None
                                     or spectrum.ritz is not None):
            return spectrum
        return self._lanczos_spectrum(index, block, data, probes=probes, steps=steps)

    def _spectrum_estimate_if_needed(self, index: int, block: ParamBlock, data: DataLike
                                     ) -> Spectrum:
        """For methods without a stored spectrum (CG, LiSSA): the Lanczos estimate when the
        fit needs it (``hessian="exact"``: the indefinite check; relative damping: its
        resolution), else nothing known (estimated later by :meth:`diagnostics`)."""
        rule = self._damping[block.name]
        if self.hessian_mode == "exact" or isinstance(rule, Relative):
            mean = isinstance(rule, Relative) and rule.of == "mean"
            spec = self._lanczos_spectrum(index, block, data,
                                          probes=PROBES if mean else FIT_PROBES)
            for d in self.info["fit"]:
                if d.get("block") == block.name:
                    d["diagnostic_passes"] = spec.extra["lanczos_steps"]
            return spec
        return self._unknown_spectrum(block)

    def _unknown_spectrum(self, block: ParamBlock) -> Spectrum:
        return Spectrum("none", block.numel, psd=self.hessian_mode == "gauss-newton",
                        eps=float(torch.finfo(self.grads.dtype).eps))

    def _diagnostics_rng(self, index: int):
        return numpy_rng(int(getattr(self, "seed", 0)), index, DIAGNOSTICS_KEY)

    def _lanczos_spectrum(self, index: int, block: ParamBlock, data: DataLike, *,
                          probes: int = PROBES, steps: int = STEPS) -> Spectrum:
        """Seeded Lanczos estimate of a block's spectrum from curvature products over
        ``data`` (``steps`` data passes of ``probes`` vectors;
        :func:`~dvl_ooc.influence.diagnostics.lanczos_spectrum`)."""
        dtype = self.grads.dtype

        def matvec(Q: torch.Tensor) -> torch.Tensor:
            return self.grads.hvp(Q.to(dtype), data, block, self.hessian_mode)

        ritz, weights, calls = lanczos_spectrum(
            matvec, block.numel, steps=steps, probes=probes,
            rng=self._diagnostics_rng(index), device=self.grads.device)
        return Spectrum("lanczos estimate", block.numel, ritz=ritz, weights=weights,
                        psd=self.hessian_mode == "gauss-newton",
                        eps=float(torch.finfo(dtype).eps),
                        extra={"lanczos_steps": calls, "probes": int(ritz.shape[0])})

    def diagnostics(self, data: DataLike | None = None, *, estimate: bool = True,
                    probes: int = PROBES, steps: int = STEPS) -> dict[str, Any]:
        """Curvature diagnostics per block as plain data (JSON-able; the format and what
        every method knows: :mod:`dvl_ooc.influence.diagnostics`): top eigenvalue, smallest
        eigenvalue or a certified bound, negative share and mass, whether ``H + lambda I`` is
        indefinite, its condition number, the effective rank ``sum w / (w + lambda)``, and
        the approximation error of low-rank models.

        What ``fit`` measured costs nothing. With ``estimate`` (default) and data (``data``,
        or the fit data a CG / LiSSA model keeps attached), what needs data passes is added
        and kept: a seeded Lanczos estimate (``steps`` passes of ``probes`` vectors) for
        blocks without a spectrum, EK-FAC's error against the Gauss-Newton block."""
        if self._state is None:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; call .fit(train_data) first")
        spectra = list(self._spectra) if self._spectra is not None else [
            None for _ in self.blocks]
        src = data if data is not None else self._fit_data
        if estimate and src is not None:
            for i, block in enumerate(self.blocks):
                spectra[i] = self._estimate_spectrum(i, block, spectra[i], src, probes, steps)
            self._spectra = spectra
        rule = self.regularization_rule or {}
        summaries = [summarize(sp, b.name, b.numel, float(self._regularization[b.name]),
                               rule.get(b.name)) for b, sp in zip(self.blocks, spectra)]
        self.info["curvature"] = self._curvature_report(summaries)
        import copy

        return copy.deepcopy(self.info["curvature"])

    def _fit_bytes(self, block: ParamBlock) -> int:
        """Estimated peak working memory (bytes) of fitting one block; 0 when it is small by
        construction. Methods with ``p_b^2`` or ``p_b k`` work arrays override it."""
        return 0

    def _check_fit_memory(self) -> None:
        """Refuse, before any data pass, a fit whose estimated working memory exceeds the
        memory available (:attr:`memory_budget` bytes when set)."""
        from ..runtime import available_memory, format_bytes

        need = {b.name: self._fit_bytes(b) for b in self.blocks}
        name = max(need, key=need.get)
        if need[name] == 0:
            return
        budget = self.memory_budget if self.memory_budget is not None else available_memory()
        if need[name] > budget:
            p = next(b.numel for b in self.blocks if b.name == name)
            raise MemoryBudgetError(
                f"{type(self).__name__}.fit would need about {format_bytes(need[name])} for "
                f"block {name!r} ({p} parameters), more than the {format_bytes(budget)} "
                "available. Ways out: projection=dict(k_in=16, k_out=16) (features of "
                "dimension k instead of p), layers=[...] (attribute through fewer layers), "
                "blocks='layer' (one curvature block per layer), or a low-rank method "
                "(ArnoldiInfluence, NystroemSketchInfluence, EkfacInfluence) with a smaller rank"
            )

    def _fit_blocks(self, data: DataLike) -> list[dict[str, torch.Tensor]]:
        """The fitted state of every block (default: ``_fit_block`` block by block)."""
        return [self._fit_block(i, block, data, self._fit_reg(block.name))
                for i, block in enumerate(self.blocks)]

    def attach_data(self, data: DataLike) -> InfluenceModel:
        """Re-attach the fit data to a loaded or unpickled model that needs it to precondition."""
        n = num_samples(data)
        if self.n_fit is not None and n != self.n_fit:
            raise InputError(f"the model was fitted on {self.n_fit} samples, got {n}")
        self._fit_data = data
        return self

    def __getstate__(self) -> dict[str, Any]:
        # the training data never travels with the model (pickled size independent of n_train)
        d = self.__dict__.copy()
        d["_fit_data"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        if "regularization" in d:  # pickled before regularization became a property
            d["_regularization"] = d.pop("regularization")
        d.setdefault("_damping", dict(d["_regularization"]))
        d.setdefault("_spectra", None)
        d.setdefault("raise_on_indefinite", False)
        self.__dict__.update(d)

    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        """Estimate the curvature state of block ``index``; record diagnostics in
        ``self.info["fit"]``. ``reg`` is the block's absolute regularization, or NaN when it
        is relative (resolved from the spectrum after the fit): do not use it then."""
        raise NotImplementedError

    def _precondition_block(
        self, i: int, block: ParamBlock, g: torch.Tensor, reg: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if self._state is None:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; call .fit(train_data) first"
            )
        if self.needs_data_to_precondition and self._fit_data is None:
            raise NotFittedError(
                f"{type(self).__name__} needs its fit data to precondition, and it was not "
                "pickled or saved with the model; call .attach_data(train_data)"
            )

    # ------------------------------------------------------------------ influence
    def gradients(self, x: Any, y: Any) -> torch.Tensor:
        """Per-sample loss gradients ``(n, p)``, blocks concatenated; with ``projection=``
        the projected features ``(n, k)`` (everything downstream works on them)."""
        return self.grads.per_sample_grads(x, y)

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """Apply ``(H + lambda I)^{-1}`` (block-wise) to gradient rows ``g`` of shape ``(n, p)``."""
        self._check_fitted()
        if g.ndim != 2 or g.shape[1] != self.grads.num_params:
            raise InputError(
                f"expected gradients of shape (n, {self.grads.num_params}), got {tuple(g.shape)}"
            )
        out = torch.empty_like(g)
        self.info["solve"] = []
        for i, (block, sl) in enumerate(zip(self.blocks, self.grads.block_slices)):
            out[:, sl] = self._precondition_block(
                i, block, g[:, sl], self.regularization[block.name]
            ).to(g.dtype)
        return out

    # Feature-space split used by the calculators: influences = test_features @ train_features.T.
    # Low-rank methods override both to work in their k-dimensional space (k << p).
    def test_features(self, g: torch.Tensor) -> torch.Tensor:
        """Map test gradients ``(n, p)`` to the space where tiles are matrix products."""
        return self.precondition(g)

    def train_features(self, g: torch.Tensor) -> torch.Tensor:
        """Map train gradients ``(n, p)`` to the same space as :meth:`test_features`."""
        self._check_fitted()
        return g

    def feature_dims(self) -> tuple[int, int]:
        """``(k_test, k_train)``: widths of :meth:`test_features` and :meth:`train_features`
        rows (equal unless a method stores test features in a compressed form), from one zero
        gradient pushed through :meth:`train_features` (cheap)."""
        p = self.grads.num_params
        z = torch.zeros(1, p, dtype=self.grads.dtype, device=self.grads.device)
        with torch.no_grad():
            k = int(self.train_features(z).shape[1])
        return k, k

    def tile_multiply_adds(self, n_test: int, n_train: int, k_train: int | None = None) -> int:
        """Multiply-adds of one :meth:`tile` on ``n_test`` x ``n_train`` feature rows (for
        plans): ``n_test n_train k_train`` for ``T @ R.T``, with ``k_train`` the train feature
        width (default: :meth:`feature_dims`). Methods with structured features override it
        together with :meth:`tile`."""
        k = self.feature_dims()[1] if k_train is None else k_train
        return int(n_test) * int(n_train) * int(k)

    def tile(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Influences ``(n_test, n_train)`` from feature rows: ``T @ R.T`` (methods with
        structured features override it together with :meth:`paired`)."""
        return test_features.to(train_features.dtype) @ train_features.T

    def paired(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Row-wise influences ``(n,)`` of matching rows: the diagonal of :meth:`tile`."""
        return (test_features.to(train_features.dtype) * train_features).sum(1)

    # ------------------------------------------------------------------ streaming
    def _gradient_width(self) -> int:
        """Columns of :meth:`gradients` rows (the parameters, or the projected features)."""
        return self.grads.num_params

    def _stream_budget(self) -> int:
        """Bytes the in-memory paths may plan with: :attr:`memory_budget`, else the memory
        available now (:func:`dvl_ooc.runtime.available_memory`)."""
        from ..runtime import available_memory

        return int(self.memory_budget) if self.memory_budget is not None else available_memory()

    def _stream_dims(self, x_test: Any, y_test: Any, n_test: int, n_train: int
                     ) -> tuple[int, int]:
        """Start of a streamed call: ``(k_test, w_train)``, the width of the test rows
        :meth:`_stream_test` returns (held for a whole group) and the floats a training row
        holds while its batch is processed (default: :meth:`feature_dims` and ``p + k_train``:
        gradients and train features). A method may plan its streamed representation here
        (it sees the test inputs and both sizes)."""
        k_test, k_train = self.feature_dims()
        return k_test, self.grads.num_params + k_train

    def _stream_rows(self, n: int, per_row: int, batch_size: int | None) -> int:
        """Rows per streamed batch: ``batch_size`` when given, else as many as keep
        ``per_row`` bytes per row (what the batch holds: gradients, features, its tile)
        within ``min(stream_batch_bytes, budget / 4)``, rounded down to a multiple of
        ``micro_batch_size`` when larger (at least 1 row). The transients of one gradient
        micro-batch come on top (bounded by ``micro_batch_size``)."""
        if batch_size is not None:
            return min(batch_size, n)
        mb = max(1, int(getattr(self.grads, "micro_batch_size", 64)))
        target = min(int(self.stream_batch_bytes), self._stream_budget() // 4)
        rows = max(1, target // max(per_row, 1))
        if rows > mb:
            rows -= rows % mb
        return int(min(rows, n))

    def _stream_test(self, x: Any, y: Any) -> torch.Tensor:
        """Test feature rows of ``(x, y)`` for :meth:`influences` (default:
        ``test_features(gradients(x, y))``)."""
        return self.test_features(self.gradients(x, y))

    def _stream_tiles(self, test_rows: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        """Influences ``(n_test_rows, n)`` of :meth:`_stream_test` rows on one batch of
        training data (default: :meth:`tile` of its :meth:`train_features` of its
        :meth:`gradients`)."""
        return self.tile(test_rows, self.train_features(self.gradients(x, y)))

    def _stream_self(self, x: Any, y: Any) -> torch.Tensor:
        """Self-influences of one batch (default: :meth:`paired` of the test and train
        features of its gradients)."""
        g = self.gradients(x, y)
        return self.paired(self.test_features(g), self.train_features(g))

    def _stream_test_group(self, x: Any, y: Any, lo: int, hi: int, rows: int
                           ) -> torch.Tensor:
        """Test feature rows ``lo:hi`` computed ``rows`` at a time into one array. Methods
        that solve iteratively (``needs_data_to_precondition``: CG, LiSSA) precondition the
        whole group in one call (one set of data passes, their own ``rhs_chunk`` and memory
        check); their gradients are still computed ``rows`` at a time."""
        if self.needs_data_to_precondition:
            return self.test_features(self._gradient_rows(x, y, lo, hi, rows))
        return self._rows_of(self._stream_test, x, y, lo, hi, rows)

    def _factor_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The rows :meth:`influence_factors` returns for gradients ``g`` (default:
        :meth:`precondition`)."""
        return self.precondition(g)

    def _gradient_rows(self, x: Any, y: Any, lo: int, hi: int, rows: int) -> torch.Tensor:
        """Gradients of rows ``lo:hi`` computed ``rows`` at a time into one array."""
        return self._rows_of(self.gradients, x, y, lo, hi, rows)

    @staticmethod
    def _rows_of(fn: Any, x: Any, y: Any, lo: int, hi: int, rows: int) -> torch.Tensor:
        """``fn(x[s:e], y[s:e])`` of rows ``lo:hi``, ``rows`` at a time, into one array."""
        out: torch.Tensor | None = None
        for s in range(lo, hi, rows):
            e = min(s + rows, hi)
            b = fn(x[s:e], y[s:e])
            if out is None:
                out = torch.empty(hi - lo, b.shape[1], dtype=b.dtype, device=b.device)
            out[s - lo : e - lo] = b
        assert out is not None
        return out

    def _stream_batch(self, batch_size: int | None) -> int | None:
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        return batch_size

    # ------------------------------------------------------------------ influence
    def influence_factors(self, x: Any, y: Any, *, batch_size: int | None = None
                          ) -> torch.Tensor:
        """``(H + lambda I)^{-1} grad l(z)`` per sample, shape ``(n, p)``: the result is
        ``n x p`` floats (inherent); gradients are computed and preconditioned ``batch_size``
        rows at a time (default: from the memory budget, see :meth:`influences`; methods
        that solve iteratively precondition all rows in one call)."""
        self._check_fitted()
        batch_size = self._stream_batch(batch_size)
        n = _num_rows(x, y, "influence_factors")
        if self.needs_data_to_precondition:
            rows = self._stream_rows(n, 2 * self.grads.num_params
                                     * self.grads.dtype.itemsize, batch_size)
            return self._factor_rows(self._gradient_rows(x, y, 0, n, rows))
        rows = self._stream_rows(n, 3 * self.grads.num_params * self.grads.dtype.itemsize,
                                 batch_size)
        out: torch.Tensor | None = None
        for s in range(0, n, rows):
            f = self._factor_rows(self.gradients(x[s : s + rows], y[s : s + rows]))
            if out is None:
                out = torch.empty(n, f.shape[1], dtype=f.dtype, device=f.device)
            out[s : s + len(f)] = f
        assert out is not None
        return out

    def influences_from_factors(self, factors: torch.Tensor, x: Any, y: Any, *,
                                batch_size: int | None = None) -> torch.Tensor:
        """``factors @ grads(x, y).T``: influences of precomputed test factors on ``(x, y)``;
        the training gradients are computed ``batch_size`` rows at a time (default: from the
        memory budget, see :meth:`influences`), never all at once."""
        self._check_fitted()
        batch_size = self._stream_batch(batch_size)
        p = self._gradient_width()
        if factors.ndim != 2 or factors.shape[1] != p:
            raise InputError(
                f"factors must have shape (n_test, {p}), got {tuple(factors.shape)}"
            )
        n = _num_rows(x, y, "influences_from_factors")
        it = self.grads.dtype.itemsize
        rows = self._stream_rows(n, it * (p + len(factors)), batch_size)
        out: torch.Tensor | None = None
        for s in range(0, n, rows):
            g = self.gradients(x[s : s + rows], y[s : s + rows])
            if out is None:
                out = torch.empty(len(factors), n, dtype=g.dtype, device=g.device)
            torch.matmul(factors.to(g.dtype), g.T, out=out[:, s : s + len(g)])
        assert out is not None
        return out

    def influences(
        self, x_test: Any, y_test: Any, x: Any | None = None, y: Any | None = None, *,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Influence matrix ``(n_test, n_train)``; with ``x=y=None`` the test set against itself.

        Streamed: the test features (:meth:`test_features` of the test gradients) are
        computed once and held, ``n_test x k_test`` floats (for methods whose features are
        ``p``-dimensional, like Direct, CG and LiSSA, that is ``n_test x p``: inherent
        without compression; use ``projection=``, a low-rank method or EK-FAC, whose exact
        per-layer forms store less, see
        :meth:`~dvl_ooc.influence.ekfac.EkfacInfluence._stream_dims`); then the training set
        is read ``batch_size`` rows at a time: gradients -> :meth:`train_features` ->
        :meth:`tile` into the preallocated result. Peak memory is therefore the test
        features, one batch (``batch_size x (p + k_train + n_test)`` floats) and the result
        (``n_test x n_train``); it does not grow with the number of training points
        otherwise. Test rows are also computed ``batch_size`` at a time.

        ``batch_size=None`` (default) chooses the rows of a batch so that one batch stays
        within ``min(stream_batch_bytes, budget / 4)`` (``stream_batch_bytes`` = 256 MiB by
        default; ``budget`` = :attr:`memory_budget`, else the memory available now), a
        multiple of ``micro_batch_size`` when larger. When the test features would exceed
        ``min(stream_test_bytes, budget / 2)`` (1 GiB by default), the test set is processed
        in groups that fit and the training gradients are recomputed once per group
        (``info["stream"]`` records the plan: ``batch_size``, ``test_groups``,
        ``train_batches``, ``budget``). Results do not depend on the batching beyond
        round-off (iterative solvers: a group is one solve).

        Cost: gradients of ``n_test + G n_train`` samples (``G`` test groups, usually 1),
        ``n_test`` test features (for iterative methods: solves), ``G n_train`` train
        features and ``n_test n_train k_train`` multiply-adds for the tiles.
        """
        if (x is None) != (y is None):
            raise InputError("pass both x and y, or neither")
        if x is None:
            x, y = x_test, y_test
        self._check_fitted()
        batch_size = self._stream_batch(batch_size)
        n_t = _num_rows(x_test, y_test, "test data")
        n_r = _num_rows(x, y, "training data")
        k_t, w_r = self._stream_dims(x_test, y_test, n_t, n_r)
        p, it = self.grads.num_params, self.grads.dtype.itemsize
        budget = self._stream_budget()
        extra = p if self.needs_data_to_precondition else 0  # the group's gradients
        bound = min(int(self.stream_test_bytes), budget // 2)
        group = int(max(1, min(n_t, bound // max(1, it * (k_t + extra)))))
        rows = self._stream_rows(n_r, it * (w_r + group), batch_size)
        test_rows = self._stream_rows(n_t, it * (p + k_t), batch_size)
        groups = [(lo, min(lo + group, n_t)) for lo in range(0, n_t, group)]
        out: torch.Tensor | None = None
        batches = 0
        for lo, hi in groups:
            T = self._stream_test_group(x_test, y_test, lo, hi, test_rows)
            for s in range(0, n_r, rows):
                tile = self._stream_tiles(T, x[s : s + rows], y[s : s + rows])
                if out is None:
                    out = torch.empty(n_t, n_r, dtype=tile.dtype, device=tile.device)
                out[lo:hi, s : s + tile.shape[1]] = tile
                batches += 1
            del T
        self.info["stream"] = {"call": "influences", "n_test": n_t, "n_train": n_r,
                               "batch_size": rows, "test_batch_size": test_rows,
                               "test_groups": len(groups), "test_group_rows": group,
                               "train_batches": batches, "budget": budget,
                               "test_feature_bound": bound}
        assert out is not None
        return out

    def self_influence(self, x: Any, y: Any, *, batch_size: int | None = None
                       ) -> torch.Tensor:
        """``< (H + lambda I)^{-1} g_i, g_i >`` for each sample, shape ``(n,)``: computed
        ``batch_size`` rows at a time with :meth:`paired` (default: from the memory budget as
        in :meth:`influences`); memory does not grow with ``n`` beyond the result. Methods
        that solve iteratively (CG, LiSSA) solve each batch separately: a larger
        ``batch_size`` means fewer data passes."""
        self._check_fitted()
        batch_size = self._stream_batch(batch_size)
        n = _num_rows(x, y, "self_influence")
        k_t, w_r = self._stream_dims(x, y, n, n)
        p, it = self.grads.num_params, self.grads.dtype.itemsize
        extra = 4 * p if self.needs_data_to_precondition else 0  # solver work rows
        rows = self._stream_rows(n, it * (k_t + w_r + extra), batch_size)
        out: torch.Tensor | None = None
        for s in range(0, n, rows):
            v = self._stream_self(x[s : s + rows], y[s : s + rows])
            if out is None:
                out = torch.empty(n, dtype=v.dtype, device=v.device)
            out[s : s + len(v)] = v
        self.info["stream"] = {"call": "self_influence", "n": n, "batch_size": rows,
                               "batches": -(-n // rows)}
        assert out is not None
        return out

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Data-free fitted state: configuration and curvature tensors (no model weights),
        and what the fit measured about the spectra (for :meth:`diagnostics`)."""
        self._check_fitted()
        spectra = None if self._spectra is None else [
            None if sp is None else dataclasses.asdict(sp) for sp in self._spectra]
        return {"config": self.config(), "n_fit": self.n_fit, "blocks": self._state,
                "spectra": spectra}

    def load_state(self, state: Mapping[str, Any]) -> InfluenceModel:
        """Restore a state produced by :meth:`state` (the configuration must match; a model
        built with relative damping takes the resolved values of the state when the rule is
        the same)."""
        mine, theirs = self.config(), state["config"]
        relative = self.regularization_rule is not None
        if relative and mine.get("regularization_rule") == theirs.get("regularization_rule"):
            mine = {**mine, "regularization": theirs.get("regularization")}
        if mine != theirs:
            diff = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
            raise InputError(f"state was fitted with a different configuration: {sorted(diff)}")
        self._state = [dict(s) for s in state["blocks"]]
        self.n_fit = state["n_fit"]
        if relative:
            self._regularization = {k: float(v)  # type: ignore[assignment]
                                    for k, v in theirs["regularization"].items()}
        spectra = state.get("spectra")
        self._spectra = None if spectra is None else [
            None if sp is None else Spectrum(**sp) for sp in spectra]
        rule = self.regularization_rule or {}
        summaries = [summarize(sp, b.name, b.numel, float(self._regularization[b.name]),
                               rule.get(b.name))
                     for b, sp in zip(self.blocks, self._spectra or [None] * len(self.blocks))]
        self.info["curvature"] = self._curvature_report(summaries)
        return self

    def save(self, path: str) -> None:
        """Save the fitted state and the model weights to ``path`` (``torch.save``)."""
        torch.save({"state": self.state(), "model": self.model.state_dict()}, path)

    def load(self, path: str) -> InfluenceModel:
        """Load a file written by :meth:`save` into this (same-configured) instance."""
        blob = torch.load(path, map_location=self.grads.device, weights_only=False)
        self.model.load_state_dict(blob["model"])
        return self.load_state(blob["state"])

    def fingerprint(self) -> str:
        """Hash of the method configuration, model weights and fitted state (with the number
        of fit samples: methods whose state does not hold the curvature, like CG without a
        preconditioner, still change their fingerprint when refitted on other data sizes)."""
        h = hashlib.sha256()
        h.update(repr(sorted(self.config().items())).encode())
        for n, t in sorted(self.model.state_dict().items()):
            h.update(n.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        if self._state is not None:
            h.update(f"n_fit={self.n_fit}".encode())
            buf = io.BytesIO()
            torch.save(self._state, buf)
            h.update(buf.getvalue())
        return h.hexdigest()[:32]

    def to(self, device: str | torch.device) -> InfluenceModel:
        """Move the model and the fitted state to ``device``."""
        self.model.to(device)
        if self._state is not None:
            self._state = [
                {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for s in self._state
            ]
        return self

    def __repr__(self) -> str:
        fitted = f"fitted on {self.n_fit}" if self.is_fitted else "not fitted"
        return (
            f"{type(self).__name__}(params={self.grads.num_params}, blocks={len(self.blocks)}, "
            f"hessian={self.hessian_mode!r}, {fitted})"
        )
