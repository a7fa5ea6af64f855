r"""Feature-level games: explain one prediction by the Shapley values of input pixel groups.

The players are groups of input features (pixels or patches). A coalition ``S`` keeps the
features of its groups and replaces the others by a baseline:

.. math:: u(S) = f\big(b + m_S \odot (x - b)\big)_c,

with :math:`m_S` the 0/1 feature mask of the groups in ``S`` and ``c`` the explained class
(logit or probability). The same estimators (exact enumeration, TMC-Shapley, MSR-Banzhaf) then
give a value per group; :func:`heatmap` spreads them back onto the image. For a linear model
explained on its logit, the Shapley value of a group is exactly
:math:`\sum_{j \in g} w_{cj} (x_j - b_j)`.

Masked inputs of one call are pushed through the model as one batch (vectorised utility).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import InputError
from .result import ValuationResult

__all__ = ["MaskingUtility", "heatmap", "patch_groups"]


def patch_groups(shape: tuple[int, int], patch: int | tuple[int, int]) -> np.ndarray:
    """Group ids (an int array of ``shape``) of non-overlapping ``patch``-sized image tiles."""
    ph, pw = (patch, patch) if np.isscalar(patch) else patch
    h, w = shape
    if ph < 1 or pw < 1:
        raise InputError("patch sizes must be positive")
    rows, cols = np.arange(h) // ph, np.arange(w) // pw
    return rows[:, None] * ((w + pw - 1) // pw) + cols[None, :]


class MaskingUtility:
    """Utility of feature-group coalitions for one input ``x`` of ``model``.

    Args:
        model: a torch module mapping a batch of inputs to class scores.
        x: one input without batch axis, e.g. ``(1, 8, 8)``.
        groups: integer group id per feature, broadcastable to ``x.shape`` (default: every
            feature its own group); ids must be ``0..G-1``.
        target: the explained class (default: the model's prediction for ``x``).
        baseline: value(s) that absent features take (scalar or array like ``x``).
        output: ``"logit"`` or ``"prob"``.
    """

    def __init__(self, model: nn.Module, x: Any, *, groups: Any = None, target: int | None = None,
                 baseline: Any = 0.0, output: str = "logit", batch_size: int = 256) -> None:
        if output not in ("logit", "prob"):
            raise InputError("output must be 'logit' or 'prob'")
        self.model = model.eval()
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        self.x = torch.as_tensor(np.asarray(x), dtype=dtype)
        self.baseline = torch.broadcast_to(torch.as_tensor(np.asarray(baseline), dtype=dtype),
                                           self.x.shape)
        g = np.arange(self.x.numel()).reshape(self.x.shape) if groups is None else \
            np.broadcast_to(np.asarray(groups), self.x.shape)
        uniq = np.unique(g)
        if not np.array_equal(uniq, np.arange(len(uniq))):
            raise InputError("group ids must be the integers 0..G-1")
        self.groups = torch.as_tensor(np.array(g, dtype=np.int64), dtype=torch.long)
        self.n_groups = len(uniq)
        self.output, self.batch_hint = output, int(batch_size)
        if target is None:
            with torch.no_grad():
                target = int(model(self.x[None]).argmax(-1)[0])
        self.target = int(target)

    @property
    def n_points(self) -> int:
        return self.n_groups

    @torch.no_grad()
    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        m = torch.as_tensor(np.asarray(masks, dtype=bool))
        if m.ndim != 2 or m.shape[1] != self.n_groups:
            raise InputError(f"masks must have shape (m, {self.n_groups})")
        out = []
        for s in range(0, len(m), self.batch_hint):
            keep = m[s : s + self.batch_hint][:, self.groups].to(self.x.dtype)  # (b, *x.shape)
            xb = self.baseline + keep * (self.x - self.baseline)
            z = self.model(xb)
            if self.output == "prob":
                z = z.softmax(-1)
            out.append(z[:, self.target].double())
        return torch.cat(out).numpy()

    def __call__(self, subset: Any) -> float:
        mask = np.zeros(self.n_groups, dtype=bool)
        mask[np.asarray(subset, dtype=np.int64)] = True
        return float(self.evaluate_many(mask[None])[0])


def heatmap(result: ValuationResult, groups: Any, *, per_feature: bool = False) -> np.ndarray:
    """Spread group values onto the feature grid (``per_feature``: divide by group size)."""
    g = np.asarray(groups)
    vals = np.zeros(int(g.max()) + 1)
    vals[result.indices] = result.values
    out = vals[g]
    if per_feature:
        out = out / np.bincount(g.ravel())[g]
    return out
