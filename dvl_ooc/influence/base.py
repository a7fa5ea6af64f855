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

Diagnostics: ``info["fit"]`` (one plain-data dict per block, reset by every ``fit``) and
``info["solve"]`` (one dict per block from the last ``precondition``, for iterative solvers).
"""

from __future__ import annotations

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
    MemoryBudgetError,
    NonFiniteError,
    NotFittedError,
    RegularizationError,
)
from ..grads import HessianMode, LossFn, ModelGradients, ParamBlock, ProjectedGradients
from ..layers.projection import GradientProjector

__all__ = ["InfluenceModel", "validate_fit_data"]

#: the keys ``projection=`` accepts as a mapping (the :class:`GradientProjector` arguments)
_PROJECTION_KEYS = ("k_in", "k_out", "dense_dim", "seed", "dtype")


def _projector(model: nn.Module, projection: GradientProjector | Mapping[str, Any],
               layers: Sequence[str] | None, micro_batch_size: int) -> GradientProjector:
    """The :class:`GradientProjector` of ``projection=`` (a projector, or its arguments)."""
    if isinstance(projection, GradientProjector):
        if projection.model is not model:
            raise InputError("projection: the GradientProjector was built for another model; "
                             "build it on this model, or pass a dict of its arguments")
        if layers is not None:
            want = [layers] if isinstance(layers, str) else list(layers)
            if want != projection.layers:
                raise InputError(
                    f"layers={want} differs from the projector's layers={projection.layers}; "
                    "pass layers= to the GradientProjector only (or a dict as projection=)")
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


class InfluenceModel:
    """Base class of all influence models.

    Args:
        model: trained network; it is put into ``eval()`` mode.
        loss: mean-reduced loss ``loss(outputs, targets)``.
        regularization: ``lambda`` added to the curvature; a float, or a mapping
            ``block name -> float`` when using several blocks.
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

    Attributes:
        info: diagnostics as plain data: ``info["fit"]`` (list of per-block dicts, reset by
            :meth:`fit`) and ``info["solve"]`` (per-block dicts of the last
            :meth:`precondition`; empty for direct methods).
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
    #: bytes a fit may use; ``None``: the memory available when ``fit`` starts
    memory_budget: int | None = None

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        *,
        regularization: float | Mapping[str, float] = 1e-3,
        blocks: str | Mapping[str, Sequence[str]] = "model",
        hessian: HessianMode = "gauss-newton",
        layers: Sequence[str] | None = None,
        micro_batch_size: int = 64,
        projection: GradientProjector | Mapping[str, Any] | None = None,
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
        self.info: dict[str, list[dict[str, Any]]] = {"fit": [], "solve": []}
        self.regularization = self._resolve_regularization(regularization)
        self._state: list[dict[str, torch.Tensor]] | None = None
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

    def _resolve_regularization(self, reg: float | Mapping[str, float]) -> dict[str, float]:
        names = [b.name for b in self.blocks]
        if isinstance(reg, Mapping):
            missing = set(names) - set(reg)
            extra = set(reg) - set(names)
            if missing or extra:
                raise RegularizationError(
                    f"regularization mapping must have exactly the block names {names}; "
                    f"missing {sorted(missing)}, unknown {sorted(extra)}"
                )
            out = {k: float(reg[k]) for k in names}
        else:
            try:
                out = {k: float(reg) for k in names}
            except (TypeError, ValueError) as e:
                raise RegularizationError(f"regularization must be a number, got {reg!r}") from e
        for k, v in out.items():
            if not (v == v) or v in (float("inf"), float("-inf")):
                raise RegularizationError(f"regularization for block {k!r} is not finite: {v}")
            if v < 0 or (v == 0 and self.requires_positive_regularization):
                need = "> 0" if self.requires_positive_regularization else ">= 0"
                raise RegularizationError(
                    f"{type(self).__name__} needs regularization {need} (block {k!r} has {v}); "
                    "pass a small positive value, e.g. 1e-3 times the top Hessian eigenvalue"
                )
        return out

    @property
    def projector(self) -> GradientProjector | None:
        """The gradient projection of ``projection=`` (``None``: features are gradients)."""
        return getattr(self.grads, "projector", None)

    def config(self) -> dict[str, Any]:
        """Plain-data description of the method and its parameters (for stores and
        fingerprints); with ``projection=`` it includes the projector's configuration."""
        cfg = {
            "method": type(self).__name__,
            "hessian": self.hessian_mode,
            "regularization": dict(self.regularization),
            "blocks": {b.name: list(b.names) for b in self.blocks},
            "layers": None if self.layers is None else list(self.layers),
            **self._extra_config(),
        }
        if self.projector is not None:
            cfg["projection"] = self.projector.config()
        return cfg

    def _extra_config(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ fitting
    def fit(self, data: DataLike) -> InfluenceModel:
        """Estimate the curvature on ``data`` ((x, y), Dataset or DataLoader); returns self.

        Subclasses do not override this: they implement ``_fit_block`` (or ``_fit_blocks``).
        """
        n = num_samples(data)
        self._check_fit_memory()
        if self.validates_fit_data:
            validate_fit_data(self.grads, data)
        self.info["fit"] = []
        state = self._fit_blocks(data)
        self.n_fit = n
        self._state = state
        self._fit_data = data if self.needs_data_to_precondition else None
        return self

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
        return [self._fit_block(i, block, data, self.regularization[block.name])
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

    def _fit_block(
        self, index: int, block: ParamBlock, data: DataLike, reg: float
    ) -> dict[str, torch.Tensor]:
        """Estimate the curvature state of block ``index``; record diagnostics in
        ``self.info["fit"]``."""
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

    def tile(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Influences ``(n_test, n_train)`` from feature rows: ``T @ R.T`` (methods with
        structured features override it together with :meth:`paired`)."""
        return test_features.to(train_features.dtype) @ train_features.T

    def paired(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """Row-wise influences ``(n,)`` of matching rows: the diagonal of :meth:`tile`."""
        return (test_features.to(train_features.dtype) * train_features).sum(1)

    def influence_factors(self, x: Any, y: Any) -> torch.Tensor:
        """``(H + lambda I)^{-1} grad l(z)`` per sample, shape ``(n, p)``."""
        self._check_fitted()
        return self.precondition(self.gradients(x, y))

    def influences_from_factors(self, factors: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        """``factors @ grads(x, y).T``: influences of precomputed test factors on ``(x, y)``."""
        self._check_fitted()
        g = self.gradients(x, y)
        if factors.ndim != 2 or factors.shape[1] != g.shape[1]:
            raise InputError(
                f"factors must have shape (n_test, {g.shape[1]}), got {tuple(factors.shape)}"
            )
        return factors.to(g.dtype) @ g.T

    def influences(
        self, x_test: Any, y_test: Any, x: Any | None = None, y: Any | None = None
    ) -> torch.Tensor:
        """Influence matrix ``(n_test, n_train)``; with ``x=y=None`` the test set against itself."""
        if (x is None) != (y is None):
            raise InputError("pass both x and y, or neither")
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors(self.influence_factors(x_test, y_test), x, y)

    def self_influence(self, x: Any, y: Any) -> torch.Tensor:
        """``< (H + lambda I)^{-1} g_i, g_i >`` for each sample, shape ``(n,)``."""
        self._check_fitted()
        g = self.gradients(x, y)
        return (self.precondition(g) * g).sum(1)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Data-free fitted state: configuration and curvature tensors (no model weights)."""
        self._check_fitted()
        return {"config": self.config(), "n_fit": self.n_fit, "blocks": self._state}

    def load_state(self, state: Mapping[str, Any]) -> InfluenceModel:
        """Restore a state produced by :meth:`state` (the configuration must match)."""
        mine, theirs = self.config(), state["config"]
        if mine != theirs:
            diff = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
            raise InputError(f"state was fitted with a different configuration: {sorted(diff)}")
        self._state = [dict(s) for s in state["blocks"]]
        self.n_fit = state["n_fit"]
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
