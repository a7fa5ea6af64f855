"""TracInCP: checkpoint-based training-data influence (identity curvature over checkpoints).

With checkpoints ``w_1 .. w_K`` saved during training and their learning rates ``eta_k``::

    influences[t, r] = sum_k eta_k < grad l(w_k, z_t), grad l(w_k, z_r) >
    self_influence[r] = sum_k eta_k || grad l(w_k, z_r) ||^2

(positive: training on ``r`` lowered the loss of ``t``; mislabelled points have large
self-influence). Gradients can be restricted to some parameters or modules (``layers``) and
randomly projected to ``d`` dimensions per checkpoint, ``P_k`` of shape ``(p, d)``:

* ``"gaussian"``: entries ``N(0, 1/d)``; ``"rademacher"``: ``+-1/sqrt(d)``. Then
  ``E[P_k P_k^T] = I``: inner products are preserved in expectation (Johnson-Lindenstrauss),
  with relative error ``O(1/sqrt(d))``.
* ``"orthogonal"``: ``sqrt(p/d)`` times ``d`` orthonormal columns (QR of a Gaussian); with
  ``d >= p`` it is a ``p x p`` orthogonal matrix and inner products are preserved exactly.

It fits the :class:`~dvl_ooc.influence.base.InfluenceModel` interface generically:
:meth:`TracInCP.gradients` returns the features
``[sqrt(eta_1) P_1^T g(w_1), ..., sqrt(eta_K) P_K^T g(w_K)]`` of shape ``(n, K p)`` or
``(n, K d)``, ``precondition`` is the identity and ``fit`` needs no data, so
``influences = gradients(test) @ gradients(train).T`` everywhere (calculators included).
Projection matrices are generated on the CPU from the streams ``(seed, k, 0, first row)`` (one
per block of rows) and ``(seed, k, 1, 0)`` (orthogonal) of :mod:`dvl_ooc.seeding`, so every
worker, call and run gets the same ones; they are cached when ``p d`` is small.
Cost: ``K`` per-sample gradient passes plus ``K n p d`` for projections.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..data import DataLike
from ..exceptions import InputError
from ..grads import MODEL_LOCK, LossFn
from ..seeding import torch_generator
from .base import InfluenceModel

__all__ = ["TracInCP"]

Projection = Literal["gaussian", "rademacher", "orthogonal"]
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
        projection_dim: project each checkpoint's gradient to this many dimensions.
        projection: ``"gaussian"``, ``"rademacher"`` or ``"orthogonal"``.
        seed: seed of the projection matrices (a non-negative integer).
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
        projection_dim: int | None = None,
        projection: Projection = "gaussian",
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
        if projection not in ("gaussian", "rademacher", "orthogonal"):
            raise InputError(
                f"projection must be 'gaussian', 'rademacher' or 'orthogonal', got {projection!r}"
            )
        if int(seed) != seed or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if projection_dim is not None and int(projection_dim) < 1:
            raise InputError(f"projection_dim must be >= 1, got {projection_dim}")
        if isinstance(layers, str):
            layers = [layers]
        blocks: Any = "model" if layers is None else {"tracin": list(layers)}
        model = copy.deepcopy(model)
        super().__init__(model, loss, regularization=0.0, blocks=blocks, hessian="exact",
                         micro_batch_size=micro_batch_size)
        self.checkpoints: list[Checkpoint] = [
            os.fspath(c) if isinstance(c, (str, os.PathLike)) else
            {k: v.detach().clone() for k, v in c.items()} for c in checkpoints
        ]
        self.learning_rates = lrs
        self.layers = None if layers is None else list(layers)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.projection = projection
        self.seed = int(seed)
        self.projection_cache_elements = int(projection_cache_elements)
        self._proj_cache: dict[int, torch.Tensor] = {}
        for k in range(K):  # fail early on missing files or mismatched architectures
            self._load(k)
        self.fit()

    # ------------------------------------------------------------------ configuration
    @property
    def feature_dim(self) -> int:
        """Columns of :meth:`gradients`: ``K * p`` or ``K * min(d, p)`` (orthogonal, d >= p)."""
        return len(self.checkpoints) * self._dim_per_checkpoint

    @property
    def _dim_per_checkpoint(self) -> int:
        p = self.grads.num_params
        if self.projection_dim is None:
            return p
        if self.projection == "orthogonal":
            return min(self.projection_dim, p)
        return self.projection_dim

    def _extra_config(self) -> dict[str, Any]:
        return {
            "learning_rates": list(self.learning_rates),
            "checkpoints": [c if isinstance(c, str) else f"<state_dict {i}>"
                            for i, c in enumerate(self.checkpoints)],
            "projection_dim": self.projection_dim,
            "projection": self.projection,
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
        if self.projection == "gaussian":
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
        if self.projection == "orthogonal":
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
    def fit(self, data: DataLike | None = None) -> TracInCP:
        """Nothing to estimate (identity curvature); accepts and ignores ``data``."""
        self._state = []
        self.n_fit = 0
        return self

    def gradients(self, x: Any, y: Any) -> torch.Tensor:
        """``[sqrt(eta_k) P_k^T grad l(w_k, z)]_k`` concatenated over checkpoints, ``(n, K d)``."""
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
        proj = "" if self.projection_dim is None else f", {self.projection}({self.projection_dim})"
        return (f"TracInCP(checkpoints={len(self.checkpoints)}, params={self.grads.num_params}"
                f"{proj})")
