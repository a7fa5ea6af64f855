r"""A vectorised utility: train many small torch models on different subsets at once.

For coalitions :math:`S_1..S_m` (rows of a boolean mask matrix) the parameters of ``m`` copies
of one small model are stacked, :math:`\Theta \in \mathbb{R}^{m \times p}`, all starting from
the same initial weights, and each copy is trained with the minibatch schedule of
:class:`~dvl_ooc.valuation.training.TrainingConfig` -- exactly the schedule of the
one-at-a-time path (:func:`~dvl_ooc.valuation.training.train_module`, used by
:class:`~dvl_ooc.valuation.TorchEstimator`): per epoch ``e`` model ``k`` visits its subset in the
order ``numpy_rng(seed, e).permutation(|S_k|)``, cut into minibatches of ``batch_size``, one
optimiser step per minibatch on the mean loss of that minibatch.

Algorithm of one pass (``m <= models_per_pass`` models): sort the models by subset size
(decreasing), so model ``k`` takes :math:`T_k = \lceil |S_k| / b \rceil` steps per epoch and at
step ``t`` of an epoch the active models are the first :math:`a_t = \#\{k: T_k > t\}`. Each
step gathers a ``(a_t, B_t)`` index tensor (``B_t`` the largest minibatch among them; shorter
minibatches are padded with weight 0), runs the active models on it as one network (for an
``nn.Sequential`` or a module whose ``forward`` only chains submodules: the grouped
channels-last layers of :mod:`~dvl_ooc.valuation.stacked`; otherwise
``torch.func.functional_call`` under ``torch.func.vmap`` over the stacked parameters -- batched
matrix products and grouped convolutions instead of ``a_t`` small ones), and backpropagates
:math:`\sum_k \frac{1}{b_{k,t}} \sum_i w_{ki}\, \ell(f_{\theta_k}(x_i), y_i)`. The summands
share no parameters, so model ``k``'s gradient is its own minibatch gradient; a hand-written
Adam (the update of ``torch.optim.Adam``, with per-model step counts for the bias corrections)
updates the active rows only. Finished models get no gradient and no optimiser step, so their
Adam state does not advance. Each model is then scored (accuracy) on the test set; an empty
coalition or one with fewer than ``min_classes`` distinct labels scores ``default`` without
training (as :class:`~dvl_ooc.valuation.ModelUtility` does for classifiers).

Result: for the same subset, the parameters equal those of
:func:`~dvl_ooc.valuation.training.train_module` up to floating-point rounding (tested at
float64), whatever the other models of the pass. Cost per pass: the arithmetic of training the
``m`` models one at a time, in ``epochs * max_k T_k`` large kernels instead of
``sum_k epochs * T_k`` small ones (measured in ``benchmarks/bench_valuation.py``). TMC walks
permutations in lockstep (:mod:`~dvl_ooc.valuation.tmc`), so the models of a pass have equal
subset sizes and no padding.

State: the pristine module (``model``, never called), initial parameters, test and training
tensors -- all plain tensors. The module that ``functional_call`` runs is a per-call copy on
the ``meta`` device, so no other thread and no pickle ever sees its parameters swapped for
batched tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..exceptions import InputError, NoTrainableParametersError
from .stacked import StackedSequential, compile_stacked
from .tasks import torch_threads
from .training import TrainingConfig, check_stackable, resolve_config
from .utility import as_xy

__all__ = ["TorchBatchUtility"]


class TorchBatchUtility:
    """Vectorised utility for small torch classifiers (logistic regression, MLPs, small CNNs).

    Args:
        model: the module; its current parameters are the common initialisation. Layers with
            batch statistics or randomness (BatchNorm, Dropout) are refused.
        test_data: ``(x_test, y_test)``; the score is the accuracy on it.
        config: a :class:`~dvl_ooc.valuation.TrainingConfig` (default ``TrainingConfig()``:
            10 epochs of Adam, lr 0.01, minibatches of 128), the same one
            :class:`~dvl_ooc.valuation.TorchEstimator` takes.
        epochs, lr, weight_decay, batch_size, seed: override single fields of ``config``.
        models_per_pass: how many coalitions are trained together (``batch_hint``).
        loss: per-sample loss ``loss(logits, y, reduction="none")`` (cross-entropy).
        default: the score of the empty coalition and of coalitions with fewer than
            ``min_classes`` distinct labels (not trained).
        dtype, device: where training runs.
        num_threads: torch intra-op threads while training (restored afterwards); ``None``
            leaves torch's setting. One thread per task is the default because valuation
            parallelises over workers: on a loaded 2-core machine two threads per small
            model made training 50x slower (spinning OpenMP threads).
        grouped_layers: run supported models (``nn.Sequential`` and plain chains of
            Conv2d / Linear / pooling / activation / Flatten / Softmax layers) as grouped
            channels-last layers (:mod:`~dvl_ooc.valuation.stacked`, same values as ``vmap``;
            2x faster on pyDVL's tutorial CNN); ``False``: always ``vmap``.
    """

    def __init__(self, model: nn.Module, test_data: Any, *, config: TrainingConfig | None = None,
                 epochs: int | None = None, lr: float | None = None,
                 weight_decay: float | None = None, batch_size: int | None = None,
                 seed: int | None = None, models_per_pass: int = 32,
                 loss: Any = F.cross_entropy, default: float = 0.0, min_classes: int = 2,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 num_threads: int | None = 1, grouped_layers: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"TorchBatchUtility needs a torch.nn.Module, not {type(model)}")
        self.config = resolve_config(config, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                     batch_size=batch_size, seed=seed)
        if int(models_per_pass) < 1:
            raise InputError("models_per_pass must be a positive integer")
        check_stackable(model)
        self.model = copy.deepcopy(model).to(dtype=dtype, device=device).eval()
        self.init_params = {k: v.detach().clone() for k, v in self.model.named_parameters()
                            if v.requires_grad}
        if not self.init_params:
            raise NoTrainableParametersError("the model has no trainable parameters")
        # frozen parameters and buffers are passed to every call unchanged
        self.constants = {k: v.detach().clone() for k, v in self.model.named_parameters()
                          if not v.requires_grad}
        self.constants.update({k: v.detach().clone() for k, v in self.model.named_buffers()})
        xt, yt = as_xy(test_data, what="test_data")
        self.x_test = torch.as_tensor(xt, dtype=dtype, device=device)
        self.y_test = torch.as_tensor(yt, device=device).long()
        self.models_per_pass = int(models_per_pass)
        self.loss, self.default, self.min_classes = loss, float(default), int(min_classes)
        self.dtype, self.device = dtype, torch.device(device)
        self.num_threads = num_threads
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self._y_np: np.ndarray | None = None
        self.grouped_layers = bool(grouped_layers)
        self._meta = self._make_meta()
        self._stacked = self._make_stacked()

    # -- training settings (read-only views of the config, for older code) ---------------
    @property
    def epochs(self) -> int:
        return self.config.epochs

    @property
    def lr(self) -> float:
        return self.config.lr

    @property
    def weight_decay(self) -> float:
        return self.config.weight_decay

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def batch_hint(self) -> int:
        return self.models_per_pass

    # -- state ------------------------------------------------------------------------------
    def _make_meta(self) -> nn.Module:
        return copy.deepcopy(self.model).to("meta")

    def _make_stacked(self) -> StackedSequential | None:
        return compile_stacked(self.model) if self.grouped_layers else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_meta", None)  # rebuilt from the pristine module on unpickling
        state.pop("_stacked", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._meta = self._make_meta()
        self._stacked = self._make_stacked()

    def with_data(self, x: Any, y: Any = None) -> TorchBatchUtility:
        new = copy.copy(self)
        xn, yn = as_xy(x, y, what="training data")
        new.x = torch.as_tensor(xn, dtype=self.dtype, device=self.device)
        new.y = torch.as_tensor(yn, device=self.device).long()
        new._y_np = new.y.cpu().numpy()
        return new

    @property
    def n_points(self) -> int:
        if self.x is None:
            raise InputError("no training data yet; call with_data(x, y) or pass data to fit")
        return len(self.x)

    # -- utility ----------------------------------------------------------------------------
    def __call__(self, subset: Any) -> float:
        mask = np.zeros(self.n_points, dtype=bool)
        mask[np.asarray(subset, dtype=np.int64)] = True
        return float(self.evaluate_many(mask[None])[0])

    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        """Scores of models trained on each row of the boolean ``masks`` (m, n_points)."""
        masks = self._check_masks(masks)
        out = np.full(len(masks), self.default, dtype=np.float64)
        sizes = masks.sum(1)
        ok = sizes > 0
        if self.min_classes > 1:
            ok &= np.array([len(np.unique(self._y_np[m])) >= self.min_classes for m in masks],
                           dtype=bool)
        rows = np.flatnonzero(ok)
        rows = rows[np.argsort(-sizes[rows], kind="stable")]  # similar sizes share a pass
        with torch_threads(self.num_threads):
            for s in range(0, len(rows), self.models_per_pass):
                r = rows[s : s + self.models_per_pass]
                params = self._train([np.flatnonzero(masks[i]) for i in r])
                out[r] = self._score(params)
        return out

    def train(self, masks: np.ndarray) -> dict[str, torch.Tensor]:
        """Stacked parameters ``(m, ...)`` of models trained on the (non-empty) rows of masks.

        All rows are trained in one pass (``models_per_pass`` does not apply).
        """
        masks = self._check_masks(masks)
        if not masks.any(1).all():
            raise InputError("every coalition trained together must be non-empty")
        with torch_threads(self.num_threads):
            return self._train([np.flatnonzero(m) for m in masks])

    def _check_masks(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n_points:
            raise InputError(f"masks must have shape (m, {self.n_points}), got {masks.shape}")
        return masks

    def _train(self, subsets: list[np.ndarray]) -> dict[str, torch.Tensor]:
        cfg, dev = self.config, self.device
        m = len(subsets)
        sizes = np.array([len(s) for s in subsets])
        rank = np.argsort(-sizes, kind="stable")  # training order: largest subsets first
        subs = [subsets[i] for i in rank]
        steps = np.array([cfg.steps_per_epoch(len(s)) for s in subs])  # non-increasing
        names = list(self.init_params)
        P = {k: v.unsqueeze(0).repeat(m, *([1] * v.ndim)) for k, v in self.init_params.items()}
        M = {k: torch.zeros_like(v) for k, v in P.items()}
        V = {k: torch.zeros_like(v) for k, v in P.items()} if cfg.optimizer == "adam" else None
        meta = copy.deepcopy(self._meta)  # private to this call (see the module docstring)
        meta.train()
        batched = self._forward(meta)
        bs, (b1, b2) = cfg.batch_size, cfg.betas
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                cache: dict[int, np.ndarray] = {}
                orders = [s[cache.setdefault(len(s), cfg.order(epoch, len(s)))] for s in subs]
                for t in range(int(steps[0])):
                    a = int((steps > t).sum())
                    chunks = [o[t * bs : (t + 1) * bs] for o in orders[:a]]
                    lens = np.array([len(c) for c in chunks])
                    width = int(lens.max())
                    idx = np.empty((a, width), dtype=np.int64)
                    w = np.zeros((a, width))
                    for k, c in enumerate(chunks):
                        idx[k, : len(c)], idx[k, len(c) :] = c, c[0]
                        w[k, : len(c)] = 1.0 / len(c)
                    it = torch.as_tensor(idx, device=dev)
                    leaves = [P[k][:a].detach().requires_grad_(True) for k in names]
                    logits = batched(dict(zip(names, leaves)), self.x[it])
                    per = self.loss(logits.reshape(a * width, -1), self.y[it].reshape(-1),
                                    reduction="none").view(a, width)
                    total = (per * torch.as_tensor(w, dtype=per.dtype, device=dev)).sum()
                    grads = torch.autograd.grad(total, leaves)
                    done = epoch * steps[:a] + t + 1  # each model's optimiser step count
                    with torch.no_grad():
                        self._step(P, M, V, names, grads, a, done, cfg, b1, b2)
        inv = np.empty(m, dtype=np.int64)
        inv[rank] = np.arange(m)
        back = torch.as_tensor(inv, device=dev)
        return {k: v[back] for k, v in P.items()}

    def _forward(self, meta: nn.Module, *, shared: bool = False
                 ) -> Callable[[dict, torch.Tensor], torch.Tensor]:
        """``(stacked params, x) -> (m, B, ...)`` with ``x`` of shape ``(m, B, ...)`` (one
        input per model) or, with ``shared``, ``(B, ...)`` (the same input for all models): the
        grouped layers of :mod:`~dvl_ooc.valuation.stacked` when the model compiles to them and
        takes this input layout, else ``vmap`` over ``functional_call`` of the per-call
        ``meta`` module."""
        consts = self.constants

        def f(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
            return functional_call(meta, (p, consts), (xb,))

        mapped = vmap(f, in_dims=(0, None) if shared else 0)
        stacked = self._stacked

        def fwd(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
            nonlocal stacked
            if stacked is not None:
                try:
                    m = len(next(iter(p.values())))
                    return stacked(p, xb.expand(m, *xb.shape) if shared else xb)
                except ValueError:  # a layout the grouped layers do not take: vmap from now on
                    stacked = None
            return mapped(p, xb)

        return fwd

    def _step(self, P: dict, M: dict, V: dict | None, names: list[str], grads: tuple,
              a: int, done: np.ndarray, cfg: TrainingConfig, b1: float, b2: float) -> None:
        """``torch.optim.Adam`` / SGD on the first ``a`` rows, per-row step counts ``done``."""
        wd, lr = cfg.weight_decay, cfg.lr
        if V is not None:
            # the scalars of torch.optim.Adam's single-tensor update, one per model
            step_size = [lr / (1 - b1 ** float(s)) for s in done]
            bc2_sqrt = [(1 - b2 ** float(s)) ** 0.5 for s in done]
            step_t = torch.tensor(step_size, dtype=self.dtype, device=self.device)
            bc2_t = torch.tensor(bc2_sqrt, dtype=self.dtype, device=self.device)
        for k, g in zip(names, grads):
            p = P[k][:a]
            if wd:
                g = g.add(p, alpha=wd)
            if V is None:
                p.add_(g, alpha=-lr)
                continue
            shape = (a,) + (1,) * (g.ndim - 1)
            m_, v_ = M[k][:a], V[k][:a]
            m_.lerp_(g, 1 - b1)
            v_.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v_.sqrt() / bc2_t.view(shape)).add_(cfg.eps)
            p.sub_(step_t.view(shape) * (m_ / denom))

    @torch.no_grad()
    def _score(self, params: dict[str, torch.Tensor]) -> np.ndarray:
        meta = copy.deepcopy(self._meta).eval()
        logits = self._forward(meta, shared=True)(params, self.x_test)
        pred = logits.argmax(-1)  # (m, n_test)
        return (pred == self.y_test).to(torch.float64).mean(1).cpu().numpy()
