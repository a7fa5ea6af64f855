"""TracInCP: checkpoint-based training-data influence (identity curvature over checkpoints).

With checkpoints ``w_1 .. w_K`` saved during training and their learning rates ``eta_k``::

    influences[t, r] = sum_k eta_k < grad l(w_k, z_t), grad l(w_k, z_r) >
    self_influence[r] = sum_k eta_k || grad l(w_k, z_r) ||^2

(positive: training on ``r`` lowered the loss of ``t``; mislabelled points have large
self-influence). Gradients can be restricted to some parameters or modules (``layers``) and
compressed in one of two ways.

**Per-layer Kronecker projection** (``projection=``, as on every influence model; a
:class:`~dvl_ooc.layers.GradientProjector` or a dict of its arguments ``k_in``, ``k_out``,
``dense_dim``, ``seed``, ``dtype``): the features of checkpoint ``k`` are ``P g(w_k)`` with
``P`` the projector's block-diagonal matrix (``P_out (x) P_in`` per ``Linear``/``Conv2d``/
``Embedding`` layer, a dense Gaussian for BatchNorm and other parameters), computed from the
layer inputs and output gradients without ever forming the ``p``-dimensional per-sample
gradient (memory ``O(k)`` per sample, :mod:`dvl_ooc.layers.projection`). ``P`` is ONE matrix
for all checkpoints (one projector, one seed), so ``sum_k eta_k <P g_t(w_k), P g_r(w_k)>`` is
an unbiased estimate of the TracIn score; it depends only on the seed and the layout, so every
worker and run gets the same features. Cost per checkpoint: one forward and one backward pass
plus the projector's small products (no ``torch.func`` per-sample gradients).
Accuracy against unprojected TracIn (relative Frobenius error of the 7 x 11 test x train
matrix, 3 checkpoints of the float64 digits CNN of ``tests/influence/test_tracin.py``,
``p = 512``, ``k_in = k_out = K``; mean of seeds 0-4)::

    K:        2      4      8      16     32     64 (full size: k = p)
    k:       12     44    152     248    376    512
    error:  1.24   0.57   0.31   0.15   0.12   4e-16

On the BatchNorm ResNet-18 layout (width 4, 16x16 inputs, ``p = 44,358``, 2 checkpoints):
0.56 at ``K = 4`` (``k = 360``), 0.09 at ``K = 16`` (``k = 3360``), round-off at full size.

**Dense projection of the full gradient** (``projection_dim=d``; needs each ``p``-dimensional
per-sample gradient first), ``P_k`` of shape ``(p, d)`` per checkpoint, of ``projection_kind``:

* ``"gaussian"``: entries ``N(0, 1/d)``; ``"rademacher"``: ``+-1/sqrt(d)``. Then
  ``E[P_k P_k^T] = I``: inner products are preserved in expectation (Johnson-Lindenstrauss),
  with relative error ``O(1/sqrt(d))``.
* ``"orthogonal"``: ``sqrt(p/d)`` times ``d`` orthonormal columns (QR of a Gaussian); with
  ``d >= p`` it is a ``p x p`` orthogonal matrix and inner products are preserved exactly.

It fits the :class:`~dvl_ooc.influence.base.InfluenceModel` interface generically:
:meth:`TracInCP.gradients` returns the features
``[sqrt(eta_1) P_1^T g(w_1), ..., sqrt(eta_K) P_K^T g(w_K)]`` of shape ``(n, K p)``,
``(n, K d)`` or ``(n, K k)`` (``projection=``: ``P_k^T = P``, the projector's matrix, for every
``k``), ``precondition`` is the identity and ``fit`` needs no data, so
``influences = gradients(test) @ gradients(train).T`` everywhere (calculators included).
The ``projection_dim`` matrices are generated on the CPU from the streams ``(seed, k, 0,
first row)`` (one per block of rows) and ``(seed, k, 1, 0)`` (orthogonal) of
:mod:`dvl_ooc.seeding`, so every worker, call and run gets the same ones; they are cached when
``p d`` is small.
Cost: ``K`` per-sample gradient passes plus ``K n p d`` for projections.
State: the checkpoints (state dicts or file paths), the learning rates and the projection's
configuration; projection matrices are never pickled (regenerated from the seed).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..data import DataLike
from ..exceptions import InputError
from ..grads import MODEL_LOCK, LossFn, ProjectedGradients
from ..layers.projection import GradientProjector
from ..seeding import torch_generator
from .base import InfluenceModel, _projector, check_projector

__all__ = ["TracInCP"]

ProjectionKind = Literal["gaussian", "rademacher", "orthogonal"]
_KINDS = ("gaussian", "rademacher", "orthogonal")
Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike


class TracInCP(InfluenceModel):
    """TracIn over saved checkpoints.

    Args:
        model: a network with the architecture of the checkpoints (it is copied; the caller's
            model is never modified).
        loss: mean-reduced loss ``loss(outputs, targets)``.
        checkpoints: state dicts, or paths of files holding a state dict (``torch.save``;
            a dict with a ``"state_dict"`` or ``"model_state_dict"`` entry also works).
        learning_rates: ``eta_k``, one number for all checkpoints or one per checkpoint.
        layers: attribute through these modules only: a list of module names (parameter names
            also work), default every trainable parameter.
        projection: ``None``, or the per-layer Kronecker projection of every influence model:
            a :class:`~dvl_ooc.layers.GradientProjector` built on ``model`` (rebuilt with the
            same arguments on the internal copy) or a dict of its arguments ``k_in``,
            ``k_out``, ``dense_dim``, ``seed``, ``dtype`` (default the model's); ``layers``
            and ``micro_batch_size`` are passed to it. Excludes ``projection_dim``. (A string
            ``"gaussian"``/``"rademacher"``/``"orthogonal"`` here is the deprecated spelling of
            ``projection_kind``.)
        projection_dim: project each checkpoint's full gradient densely to this many
            dimensions.
        projection_kind: ``"gaussian"`` (default), ``"rademacher"`` or ``"orthogonal"``: the
            matrices of ``projection_dim``.
        seed: seed of the ``projection_dim`` matrices (a non-negative integer).
        micro_batch_size: samples per vectorised per-sample-gradient micro-batch.
        projection_cache_elements: cache projection matrices up to this many entries per
            checkpoint (otherwise regenerate them block by block on every call).
    """

    supported_hessians = ("exact",)
    #: the Gaussian/Rademacher matrices are generated in row blocks of this size, each from
    #: its own seed, so they do not depend on caching or on the device
    projection_block_rows: int = 1024

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        checkpoints: Sequence[Checkpoint],
        learning_rates: float | Sequence[float] = 1.0,
        *,
        layers: Sequence[str] | None = None,
        projection: GradientProjector | Mapping[str, Any] | str | None = None,
        projection_dim: int | None = None,
        projection_kind: ProjectionKind | None = None,
        seed: int = 0,
        micro_batch_size: int = 64,
        projection_cache_elements: int = 2**24,
    ) -> None:
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or len(checkpoints) == 0:
            raise InputError("checkpoints must be a non-empty list of state dicts or file paths")
        K = len(checkpoints)
        if isinstance(learning_rates, (int, float)):
            lrs = [float(learning_rates)] * K
        else:
            lrs = [float(v) for v in learning_rates]
            if len(lrs) != K:
                raise InputError(f"{K} checkpoints but {len(lrs)} learning rates")
        if any(not math.isfinite(v) or v < 0 for v in lrs):
            raise InputError(f"learning rates must be finite and >= 0, got {lrs}")
        if isinstance(projection, str):  # the old meaning of projection= (one release)
            if projection not in _KINDS:
                raise InputError(
                    f"projection_kind must be 'gaussian', 'rademacher' or 'orthogonal', got "
                    f"{projection!r} (projection= takes a GradientProjector or a dict of its "
                    "arguments)")
            if projection_kind not in (None, projection):
                raise InputError(f"projection={projection!r} and projection_kind="
                                 f"{projection_kind!r} disagree; pass projection_kind only")
            warnings.warn(
                f"TracInCP(projection={projection!r}) is deprecated: pass projection_kind="
                f"{projection!r} (projection= now takes a GradientProjector or a dict of its "
                "arguments, as for every influence model)", DeprecationWarning, stacklevel=2)
            projection_kind, projection = projection, None
        if projection_kind is not None and projection_kind not in _KINDS:
            raise InputError(f"projection_kind must be 'gaussian', 'rademacher' or "
                             f"'orthogonal', got {projection_kind!r}")
        if projection is not None and (projection_dim is not None
                                       or projection_kind is not None):
            raise InputError(
                "projection= (per-layer Kronecker projection, never forms the p-dimensional "
                "gradient) and projection_dim=/projection_kind= (dense projection of the full "
                "gradient) are mutually exclusive; pass one of them")
        if int(seed) != seed or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if projection_dim is not None and int(projection_dim) < 1:
            raise InputError(f"projection_dim must be >= 1, got {projection_dim}")
        if isinstance(layers, str):
            layers = [layers]
        blocks: Any = "model" if layers is None else {"tracin": list(layers)}
        original, model = model, copy.deepcopy(model)
        super().__init__(model, loss, regularization=0.0, blocks=blocks, hessian="exact",
                         micro_batch_size=micro_batch_size)
        if projection is not None:  # features P g: one projector (one P) for every checkpoint
            projector = _copy_projector(projection, original, model, layers, micro_batch_size)
            self.grads = ProjectedGradients(projector, loss, "model",
                                            micro_batch_size=micro_batch_size)
            self.layers = self.grads.layers
            self.regularization = self._resolve_regularization(0.0)
        self.checkpoints: list[Checkpoint] = [
            os.fspath(c) if isinstance(c, (str, os.PathLike)) else
            {k: v.detach().clone() for k, v in c.items()} for c in checkpoints
        ]
        self.learning_rates = lrs
        self.layers = None if layers is None else list(layers)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.projection_kind: ProjectionKind = projection_kind or "gaussian"
        self.seed = int(seed)
        self.projection_cache_elements = int(projection_cache_elements)
        self._proj_cache: dict[int, torch.Tensor] = {}
        for k in range(K):  # fail early on missing files or mismatched architectures
            self._load(k)
        self.fit()

    # ------------------------------------------------------------------ configuration
    @property
    def feature_dim(self) -> int:
        """Columns of :meth:`gradients`: ``K * p``, ``K * d`` (``K * min(d, p)`` when
        orthogonal) or ``K * k`` (``projection=``)."""
        return len(self.checkpoints) * self._dim_per_checkpoint

    def _gradient_width(self) -> int:
        return self.feature_dim

    def feature_dims(self) -> tuple[int, int]:
        """``(K d, K d)``: test and train features are both :meth:`gradients` rows."""
        return self.feature_dim, self.feature_dim

    @property
    def _dim_per_checkpoint(self) -> int:
        p = self.grads.num_params  # k with projection=
        if self.projection_dim is None:
            return p
        if self.projection_kind == "orthogonal":
            return min(self.projection_dim, p)
        return self.projection_dim

    def _extra_config(self) -> dict[str, Any]:
        return {
            "learning_rates": list(self.learning_rates),
            "checkpoints": [c if isinstance(c, str) else f"<state_dict {i}>"
                            for i, c in enumerate(self.checkpoints)],
            "projection_dim": self.projection_dim,
            "projection_kind": self.projection_kind,
            "seed": self.seed,
        }

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d["_proj_cache"] = {}  # regenerated deterministically where needed
        return d

    # ------------------------------------------------------------------ checkpoints
    def _state_dict(self, k: int) -> Mapping[str, torch.Tensor]:
        c = self.checkpoints[k]
        if isinstance(c, str):
            if not os.path.exists(c):
                raise InputError(f"checkpoint file {c!r} does not exist")
            blob = torch.load(c, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model_state_dict"):
                if isinstance(blob, Mapping) and key in blob and isinstance(blob[key], Mapping):
                    blob = blob[key]
            return blob
        return c

    def _load(self, k: int) -> None:
        try:
            self.model.load_state_dict(self._state_dict(k))
        except RuntimeError as e:
            raise InputError(
                f"checkpoint {k} does not match the model architecture: {e}"
            ) from e

    # ------------------------------------------------------------------ projection
    def _projection_block(self, k: int, start: int, rows: int, d: int) -> torch.Tensor:
        g = torch_generator(self.seed, k, 0, start)
        if self.projection_kind == "gaussian":
            return torch.randn(rows, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        sign = torch.randint(0, 2, (rows, d), generator=g, dtype=torch.int8) * 2 - 1
        return sign.to(torch.float64) / math.sqrt(d)

    def _orthogonal(self, k: int) -> torch.Tensor:
        p, d = self.grads.num_params, self._dim_per_checkpoint
        g = torch_generator(self.seed, k, 1, 0)
        Q, R = torch.linalg.qr(torch.randn(p, d, generator=g, dtype=torch.float64))
        Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed columns
        return Q * math.sqrt(p / d)

    def _project(self, k: int, g: torch.Tensor) -> torch.Tensor:
        if self.projection_dim is None:
            return g
        p, d = g.shape[1], self._dim_per_checkpoint
        if k in self._proj_cache:
            P = self._proj_cache[k]
            return g @ P.to(device=g.device, dtype=g.dtype)
        step = self.projection_block_rows
        if self.projection_kind == "orthogonal":
            P = self._orthogonal(k)
        elif p * d <= self.projection_cache_elements:
            P = torch.cat([self._projection_block(k, s, min(step, p - s), d)
                           for s in range(0, p, step)])
        else:  # regenerate block by block: memory projection_block_rows * d
            out = torch.zeros(len(g), d, dtype=g.dtype, device=g.device)
            for s in range(0, p, step):
                blk = self._projection_block(k, s, min(step, p - s), d)
                out += g[:, s : s + len(blk)] @ blk.to(device=g.device, dtype=g.dtype)
            return out
        if p * d <= self.projection_cache_elements:
            self._proj_cache[k] = P
        return g @ P.to(device=g.device, dtype=g.dtype)

    # ------------------------------------------------------------------ influence model
    def fit(self, data: DataLike | None = None, *, progress: bool = False) -> TracInCP:
        """Nothing to estimate (identity curvature); accepts and ignores ``data`` (and
        ``progress``: there is no data pass to show)."""
        self._state = []
        self.n_fit = 0
        return self

    def diagnostics(self, data: DataLike | None = None, **_: Any) -> dict[str, Any]:
        """TracIn has no curvature (identity preconditioner): the report says so, in the
        format of :meth:`InfluenceModel.diagnostics` (no blocks, never indefinite)."""
        self._check_fitted()
        self.info["curvature"] = {"method": type(self).__name__, "hessian": "identity",
                                  "indefinite": False, "advice": None, "blocks": [],
                                  "note": "no curvature: identity preconditioner over "
                                          f"{len(self.checkpoints)} checkpoint(s)"}
        return dict(self.info["curvature"])

    def gradients(self, x: Any, y: Any) -> torch.Tensor:
        """``[sqrt(eta_k) P_k^T grad l(w_k, z)]_k`` concatenated over checkpoints, ``(n, K d)``
        (with ``projection=``: the projector's features of each checkpoint)."""
        parts = []
        for k, eta in enumerate(self.learning_rates):
            # the checkpoint is loaded into the shared model: hold the model lock from the load
            # to the end of the gradient pass, or concurrent tiles (threads) mix checkpoints
            with MODEL_LOCK:
                self._load(k)
                g = self.grads.per_sample_grads(x, y)
            parts.append(math.sqrt(eta) * self._project(k, g))
        return torch.cat(parts, dim=1)

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """Identity (TracIn has no curvature); checks the feature shape."""
        self._check_fitted()
        if g.ndim != 2 or g.shape[1] != self.feature_dim:
            raise InputError(
                f"expected TracIn features of shape (n, {self.feature_dim}), got {tuple(g.shape)}"
            )
        return g

    def fingerprint(self) -> str:
        """Hash of the configuration and of every checkpoint's tensors."""
        h = hashlib.sha256()
        h.update(repr(sorted(self.config().items())).encode())
        for k in range(len(self.checkpoints)):
            for n, t in sorted(self._state_dict(k).items()):
                h.update(n.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def __repr__(self) -> str:
        proj = "" if self.projection_dim is None else \
            f", {self.projection_kind}({self.projection_dim})"
        if self.projector is not None:
            proj = f", {self.projector!r}"
        return (f"TracInCP(checkpoints={len(self.checkpoints)}, params={self.grads.num_params}"
                f"{proj})")


def _copy_projector(projection: GradientProjector | Mapping[str, Any], original: nn.Module,
                    model: nn.Module, layers: Sequence[str] | None, micro_batch_size: int
                    ) -> GradientProjector:
    """The projector of ``projection=`` on TracIn's copy ``model`` of the caller's
    ``original``: a given projector is rebuilt there with the same arguments (its matrices
    depend only on the seed, the sizes and the module layout, so they are the same)."""
    if not isinstance(projection, GradientProjector):
        return _projector(model, projection, layers, micro_batch_size)
    check_projector(projection, original, layers)
    return GradientProjector(
        model, layers=projection.layers, k_in=projection.k_in, k_out=projection.k_out,
        dense_dim=projection.dense_dim, seed=projection.seed, dtype=projection.dtype,
        loss=projection.loss, micro_batch_size=projection.micro_batch_size)
