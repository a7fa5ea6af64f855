"""In-Run Data Shapley: attribute a training run to its training samples while it runs.

Notation. Step ``t`` sees a batch ``B`` of ``b`` samples and the user's **mean**-reduced loss
``L_B(w) = (1/b) sum_{i in B} l_i(w)``, with ``l_i(w) = loss(model(x_i[None]), y_i[None])``.
A plain SGD step is ``w_{t+1} = w_t - (eta/b) sum_i g_i`` with ``g_i = grad l_i(w_t)``.
The validation loss is the **sum** ``L_val(w) = sum_j l_j(w)`` over the validation set (or each
``l_j`` separately with ``per_validation_point=True``), evaluated with the model in ``eval()``
mode at the current weights ``w_t``.

First order. The utility of a subset ``S`` of the batch is the decrease of the validation loss
``U(S) = L_val(w_t) - L_val(w_t - (eta/b) sum_{i in S} g_i)``. To first order ``U`` is additive,
so the Shapley value of ``i`` is its own term::

    phi_i += (eta / b) * < g_i, grad L_val(w_t) >

Positive values: the sample's share of the step lowered the validation loss (helpful). The
values of a batch sum to the first-order decrease of ``L_val`` over that step. For other
optimizers (Adam, momentum) this is the usual SGD-direction proxy with the current ``lr``.

Second order (``second_order=True``, summed validation loss only). The next Taylor term of
``U(S)`` is ``-1/2 (eta/b)^2 sum_{i,j in S} g_i^T H_val g_j`` (``H_val`` the Hessian of
``L_val`` at ``w_t``), a pairwise game whose Shapley value gives ``i`` its diagonal term and half
of each symmetric pair::

    phi_i += -1/2 (eta/b)^2 < g_i, H_val sum_{j in B} g_j > = -(eta^2 / (2 b)) < g_i, H_val gbar >

with ``gbar`` the mean batch gradient: one Hessian-vector product of ``L_val`` per step.

Ghost dot products. For ``Linear`` (inputs ``(n, d)`` or sequences ``(n, T, d)``), ``Conv2d``
(unfolded patches) and ``Embedding`` layers, the per-sample weight gradient is
``G_i^T A_i`` with ``A_i`` the ``(L, d_in [+1 for bias])`` layer inputs and ``G_i`` the
``(L, d_out)`` output gradients of sample ``i``. For a train row ``i`` and validation row ``j``::

    <G_i^T A_i, G_j^T A_j> = sum_{l,l'} (a_il . a_jl') (g_il . g_jl')          (ghost)
    embedding:               sum_{l,l'} [idx_il == idx_jl'] (g_il . g_jl')

Cost model per layer (``n`` train rows, ``m`` validation rows, ``L`` positions):

* ghost:        ``n m L_t L_v (d_in + d_out + 1)`` (embedding: ``d_in = 1``), no ``d_in d_out``;
* materialise:  ``(n L_t + m L_v) d_in d_out`` to form per-sample gradients (summed over the
  validation rows when the validation loss is summed) plus ``n m d_in d_out`` for the products
  (per validation point only); embeddings use the ``U`` distinct rows looked up in the step.

``solver="auto"`` takes the cheaper one per layer (ghost for short sequences and small maps,
materialise for long sequences / large spatial maps). These products, their cost models and the
directional derivatives below are implemented once per layer type, by the layer's kind in the
per-layer registry (:mod:`dvl_ooc.layers`).

Summed validation loss. Then only ``<g_i, V>`` with ``V = grad L_val`` is needed: ``V`` is the
parameter gradient of one validation backward, and ``<g_i, V> = sum_l g_il . (V a_il)`` is a
directional derivative computed layer by layer from the captured train rows (a matrix product
for ``Linear``, a convolution of the inputs with ``V`` for ``Conv2d`` -- no ``im2col`` --, a
gather for ``Embedding``): the cost of one extra forward, cheaper than ghost products whenever
``m L^2 (d_in + d_out) > d_in d_out``, i.e. almost always.

Cost per step, and its floor. Exact first-order values need, besides plain training, the
validation gradient ``V`` at the current weights (a forward/backward of the ``m`` validation
rows: about ``m / b`` of a training step when compute-bound) and the ``b`` directional
derivatives (one forward of the attributed layers, about a third of a step). For a
compute-bound CNN the tracker therefore costs ``~1 + m/b + 1/3`` training steps; on one CPU
thread ``benchmarks/bench_inrun.py`` measures the 32x32 CNN (``m/b = 16/64``) at 1.8-1.9x plain
training against ~1.3x for plain training plus ``V`` alone, and the 6k-parameter digits CNN,
whose steps are dominated by per-operation overhead, at ~2.3x (plain plus ``V`` alone: ~1.6x).
Two ways to pay less: a larger batch per validation set, or ``layers=[...]`` (attribute through
some layers only, e.g. the classifier head; the validation backward and the products then stop
at those layers: ~1.2x on the 32x32 CNN).

Exactness of training. ``step`` runs the user's forward and ``loss.backward()`` on the training
batch exactly as plain training does (hooks only read activations and gradients), so the
parameters' ``.grad`` and hence the trained weights are **bit-identical** to training without
the tracker. The validation set goes through a second forward/backward (``torch.autograd.grad``,
never touching ``.grad``) in ``eval()`` mode: the same FLOPs as one backward over a combined
train + validation batch, but it cannot perturb batch statistics, dropout masks or ``.grad``.

BatchNorm (details and the reasons: :mod:`dvl_ooc.inrun.batchnorm`). A BatchNorm layer in
training mode couples the samples of a batch through its statistics ``mu_B``, ``var_B``. The
per-sample gradient is then defined with the statistics held fixed (stop-gradient)::

    g_i = grad_w l_i(w; mu_B, var_B),   BatchNorm acting on sample i as
    y = gamma (x - mu_B) / sqrt(var_B + eps) + beta   with mu_B, var_B constants

so its input gradient is ``gamma / sigma_B * dl_i/dy`` and its affine parameters get the
per-sample gradients ``(sum_l dl_i/dy_l xhat_l, sum_l dl_i/dy_l)`` per channel (an elementwise
layer's products). ``step`` runs the user's forward once, a backward to the attributed layer
outputs with the statistics frozen (an identity autograd function after each such BatchNorm
routes the output gradient around it, only in that pass; data gradients only, no weight
gradients), then the user's ``loss.backward()`` on the same graph: ``.grad`` and the running
statistics stay bit-identical to plain training. On the images recipe's ResNet18 (CPU, one
thread) the tracker then costs 1.8-1.9x plain training with 4 validation rows per step of 64
(``benchmarks/bench_inrun.py --resnet``, 1,600-4,000 images, 3 epochs): the frozen backward
costs about a fifth of a plain step, the validation gradient of 4 rows and the per-sample
products together about half. Nothing of a step outlives it: the autograd context of that
identity function holds a flag, not the capture (a capture -> outputs -> graph -> context
cycle runs through autograd nodes, which the garbage collector cannot see). The
values are checked against an explicit per-sample loop over the network with the batch's
statistics frozen (``tests/inrun/test_inrun_batchnorm.py``). A batch's values then sum to
the first-order validation-loss decrease of the step ``-(eta/b) sum_i g_i``, which differs from
the real step by the statistics' share of the batch gradient (which belongs to no single
sample). BatchNorm in eval mode (running statistics) couples nothing: the same elementwise
map with the running statistics and no extra pass. ``combined`` and ``second_order`` are
refused while a BatchNorm uses batch statistics, and so is ``ReLU(inplace=True)`` (or any
in-place change) right after such a BatchNorm; layer outputs modified in place later in the
forward are refused wherever the rows are taken by differentiation (BatchNorm in training
mode, ``combined``, ``per_validation_point``).

Sampled validation gradient (``val_sample=k``, summed validation loss). ``V`` needs a forward
and backward of all ``m`` validation rows at every step: ``m / b`` training steps, prohibitive
when the validation set is a large test set. With ``val_sample=k`` step ``t`` uses the rows
``S_t`` at positions ``[t k, (t + 1) k)`` of an endless stream of seeded permutations of the
rows (each row equally often; a resumed store continues the stream) and::

    V_t = (m / k) sum_{j in S_t} grad l_j(w_t),     E[V_t] = grad L_val(w_t)

so every step's values are unbiased estimates of the exact ones and their sampling noise
averages out over the steps (exact when ``k >= m``), at ``k / b`` of a step.

``combined=True`` (first order) instead runs ONE forward over the concatenated
``[train; validation]`` rows (in the model's current mode) and one backward to the captured
layer outputs only; the train-only parameter gradient (``G_t^T A_t``, the convolution
weight-gradient kernel, an index-add for embeddings) is rebuilt from the captured rows and
written to ``.grad``, and the scores come from the same backward: ``V`` rebuilt from the
validation rows (summed loss) or ghost / materialised products between train and validation
rows (``per_validation_point=True``). The weights then agree with plain training to rounding
(float64: ~1e-15 relative, tested at 1e-12), not bit for bit, because the GEMMs see a different
batch size and summation order. It saves kernel launches, not FLOPs: on CPU it measured no
faster than the default (slower on the 32x32 CNN, whose larger activations fall out of cache);
it is meant for launch-bound accelerators.

Storage. Scores are keyed by training-sample index and accumulated in float64, in memory
(NumPy) or in a Zarr v3 array on disk (``store=path``) chunked along the training axis; on disk,
updates are buffered per chunk and added to the array every ``flush_every`` steps or when the
buffer exceeds ``max_buffer_bytes``, so memory is bounded by the buffer, not by ``n_train``.
A step's scores stay on the model's device until they are copied to the host, every
``sync_every`` steps (1 on CPU; ``flush_every`` on accelerators, which thus never wait for the
host mid-run); NaN/inf in losses or scores are detected at that copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._compat import deprecated_alias, renamed_arguments
from ..data import as_tensor, check_xy
from ..exceptions import (
    InputError,
    LengthMismatchError,
    NonFiniteError,
    UnsupportedModelError,
)
from ..grads import LossFn
from ..layers import LayerCapture, LayerKind, kind_of, supported_modules
from ..layers.base import Method, check_method
from ..seeding import numpy_rng
from .batchnorm import (
    BATCHNORM_KIND,
    BatchNormCapture,
    BatchNormKind,
    is_batchnorm,
    uses_batch_statistics,
)
from .store import ScoreStore

__all__ = ["InRunShapley"]


class _Capture:
    """The hooks of one pass: :class:`~dvl_ooc.layers.LayerCapture` on the attributed
    Linear/Conv2d/Embedding layers and :class:`~dvl_ooc.inrun.batchnorm.BatchNormCapture` on
    every BatchNorm (rows of the attributed ones, frozen-statistics backward of all)."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], *,
                 keep_outputs: bool) -> None:
        names = [n for n, m in modules.items() if not is_batchnorm(m)]
        self.layers = LayerCapture(model, names, include_embeddings=True,
                                   keep_outputs=keep_outputs, output_grads=not keep_outputs)
        self.bn = BatchNormCapture(model, [n for n in modules if n not in names],
                                   keep_outputs=keep_outputs, output_grads=not keep_outputs)
        self.modules = modules if keep_outputs else {}
        self.versions: dict[str, int] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Capture:
        self.layers.__enter__()
        self.bn.__enter__()
        for name, mod in self.modules.items():  # (after the capture hooks: fresh outputs)
            self._handles.append(mod.register_forward_hook(self._version_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.bn.__exit__(*exc)
        self.layers.__exit__(*exc)

    def _version_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.versions[name] = output._version

        return hook

    def check_outputs(self) -> None:
        """Refuse layer outputs modified in place after the layer (their gradient would be
        that of the modified tensor)."""
        for name, out in self.outputs.items():
            if out._version != self.versions.get(name, out._version):
                raise UnsupportedModelError(
                    f"the output of layer {name!r} is modified in place later in the forward "
                    "(e.g. ReLU(inplace=True)); In-Run Shapley needs the layer outputs "
                    "unchanged: use inplace=False there")

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return {**self.layers.inputs, **self.bn.inputs}

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        return {**self.layers.outputs, **self.bn.outputs}

    @property
    def output_grads(self) -> dict[str, torch.Tensor]:
        return {**self.layers.output_grads, **self.bn.output_grads}

    @property
    def calls(self) -> dict[str, int]:
        return {**self.layers.calls, **self.bn.calls}


def _accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add ``g`` into ``p.grad`` as ``backward()`` does (set it when there is none)."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g


class InRunShapley:
    """Accumulate first- (and optionally second-) order In-Run Data Shapley values.

    The user keeps their own loop, loader and optimizer; :meth:`step` replaces the
    ``loss(model(x), y).backward()`` pair::

        tracker = InRunShapley(model, loss, x_val, y_val, n_train=len(ds))
        for idx, xb, yb in loader:
            optimizer.zero_grad()
            loss = tracker.step(xb, yb, idx, lr=scheduler.get_last_lr()[0])
            optimizer.step()
        tracker.values   # (n_train,) or (n_train, n_val); positive = lowered validation loss

    Args:
        model: the network being trained; the attributed layers must be
            ``Linear``/``Conv2d``/``Embedding``/BatchNorm layers, each called once per forward
            (BatchNorm in training mode: per-sample gradients with the batch statistics
            frozen, see the module docstring).
        loss: the training loss ``loss(outputs, targets)``, **mean**-reduced over the batch.
        x_val, y_val: validation set (kept on the model's device).
        n_train: number of training samples; sample indices passed to :meth:`step` are in
            ``[0, n_train)``.
        layers: names of the layers to attribute through (``None``: every trainable
            parameter, which must then all live in supported layers). With a subset, scores
            use the gradient components of those layers only (e.g. the classifier head), the
            other layers train as usual, and the per-step cost drops to the validation
            forward plus the backward and products of the chosen layers.
        per_validation_point: keep one score per (train, validation) pair instead of the sum.
        second_order: add the second-order term (summed validation loss only).
        combined: one forward/backward over ``[train; validation]`` (see the module docstring;
            first order only; the validation rows run in the model's current mode, all at once;
            ``.grad`` allclose instead of bit-identical).
        store: ``None`` (in memory) or where the Zarr v3 array lives: a local directory, an
            fsspec URL (``s3://bucket/scores.zarr``) or a Zarr store object.
        storage_options: fsspec options for a ``store`` URL (``endpoint_url``, ``key``...).
        mode: ``"w-"`` (new store; an existing one raises :class:`StoreExistsError`),
            ``"w"`` (replace an existing score store) or ``"a"`` (resume accumulating).
        flush_every: steps between flushes of the on-disk store.
        sync_every: steps between copies of the scores from the device to the host store,
            where they are also checked for NaN/inf (:class:`NonFiniteError` names the step;
            that window's scores are not stored). Default 1 on CPU (no cost there) and
            ``flush_every`` on accelerators, which then never wait for the host mid-run.
        val_batch_size: validation rows per forward/backward (bounds memory).
        val_sample: summed validation loss only: estimate ``V = grad L_val`` at each step from
            this many validation rows, scaled by ``n_val / val_sample`` (see "Sampled
            validation gradient" in the module docstring; ``None`` or ``>= n_val``: every row
            at every step, exact).
        seed: the seed of ``val_sample``'s order of validation rows.
        solver: ``"auto"``, ``"ghost"`` or ``"materialize"`` (see the module docstring; was
            ``method=``).
        max_buffer_bytes, chunk_bytes: on-disk store buffering and chunk size, see
            :class:`ScoreStore`.

    Deprecated keyword names: ``loss_fn=`` (use ``loss=``; the attribute ``loss_fn`` likewise)
    and ``store_mode=`` (use ``mode=``).
    """

    loss_fn = deprecated_alias("loss", owner="InRunShapley")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn | None = None,
        x_val: Any = None,
        y_val: Any = None,
        *,
        n_train: int,
        layers: Sequence[str] | None = None,
        per_validation_point: bool = False,
        second_order: bool = False,
        combined: bool = False,
        store: str | os.PathLike | Any | None = None,
        mode: Literal["w-", "w", "a"] = "w-",
        flush_every: int = 50,
        sync_every: int | None = None,
        val_batch_size: int = 256,
        solver: Method = "auto",
        max_buffer_bytes: int = 256 * 2**20,
        chunk_bytes: int = 8 * 2**20,
        storage_options: dict[str, Any] | None = None,
        val_sample: int | None = None,
        seed: int = 0,
        **deprecated: Any,
    ) -> None:
        old = renamed_arguments(InRunShapley.__init__, deprecated,
                                {"loss_fn": "loss", "store_mode": "mode", "method": "solver"},
                                {"loss": loss, "mode": mode, "solver": solver})
        loss = old.get("loss", loss)
        mode, solver = old.get("mode", mode), old.get("solver", solver)
        if x_val is None or y_val is None:
            raise TypeError("InRunShapley() needs the validation set: x_val and y_val")
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise InputError("loss must be a callable loss(outputs, targets)")
        if combined and second_order:
            raise InputError("combined=True supports first-order values only")
        if second_order and per_validation_point:
            raise InputError(
                "second_order=True is implemented for the summed validation loss only; "
                "use per_validation_point=False"
            )
        check_method(solver)
        if int(n_train) < 1 or flush_every < 1 or val_batch_size < 1 or (
                sync_every is not None and sync_every < 1):
            raise InputError("n_train, flush_every, sync_every and val_batch_size must be >= 1")
        self.model = model
        self.loss = loss
        self.modules = supported_modules(model, layers, batchnorm=True)
        self.kinds: dict[str, LayerKind | BatchNormKind] = {
            n: BATCHNORM_KIND if is_batchnorm(m) else kind_of(m)
            for n, m in self.modules.items()}
        #: every BatchNorm of the model (attributed or not): their batch coupling is handled
        self.batchnorms = [m for m in model.modules() if is_batchnorm(m)]
        self.combined = bool(combined)
        self.second_order = bool(second_order)
        self._check_batchnorm_mode()
        self.layers = None if layers is None else list(self.modules)
        # every trainable parameter (the training step) and the attributed ones (the scores)
        self.train_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [p for m in self.modules.values() for p in m.parameters(recurse=False)]
        if combined and len(self.params) != len(self.train_params):
            raise InputError(
                "combined=True rebuilds every parameter gradient from the attributed layers; "
                "it needs all trainable parameters in them (use layers=None)"
            )
        p0 = self.params[0]
        self.x_val = as_tensor(x_val, dtype=p0.dtype, device=p0.device)
        self.y_val = as_tensor(y_val, device=p0.device)
        if self.y_val.is_floating_point():
            self.y_val = self.y_val.to(p0.dtype)
        check_xy(self.x_val, self.y_val, what="validation set")
        self.sync_every = int(sync_every if sync_every is not None
                              else 1 if p0.device.type == "cpu" else flush_every)
        self.n_train = int(n_train)
        self.n_val = len(self.x_val)
        self.per_validation_point = bool(per_validation_point)
        self.solver: Method = solver
        self.val_batch_size = int(val_batch_size)
        self.flush_every = int(flush_every)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._pending: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self._pending_elements = 0
        self.steps = 0
        if val_sample is not None:
            if isinstance(val_sample, bool) or int(val_sample) < 1:
                raise InputError(f"val_sample must be a positive integer, got {val_sample!r}")
            if self.per_validation_point or self.combined:
                raise InputError("val_sample= estimates the summed validation gradient; it "
                                 "does not combine with per_validation_point=True or "
                                 "combined=True")
        #: validation rows per step (``None``: all of them, exact)
        self.val_sample = (None if val_sample is None or int(val_sample) >= self.n_val
                           else int(val_sample))
        self.seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}
        attributes = {"method": "InRunShapley", "n_train": self.n_train,
                      "n_val": self.n_val, "per_validation_point": self.per_validation_point,
                      "second_order": self.second_order, "layers": self.layers}
        if self.val_sample is not None:  # (absent otherwise: earlier stores still resume)
            attributes.update(val_sample=self.val_sample, seed=self.seed)
        self.store = ScoreStore(
            self.n_train, self.n_val if self.per_validation_point else None, store,
            mode=mode, max_buffer_bytes=max_buffer_bytes, chunk_bytes=chunk_bytes,
            storage_options=storage_options, attributes=attributes,
        )
        if self.store.array is not None:
            self.steps = int(self.store.array.attrs.get("steps", 0))

    # ------------------------------------------------------------------ internals
    def _coupled(self) -> bool:
        """Whether a BatchNorm of the model will normalise with batch statistics."""
        return any(uses_batch_statistics(m) for m in self.batchnorms)

    def _check_batchnorm_mode(self) -> None:
        """Refuse the modes that do not combine with batch statistics (checked at creation,
        for the model's mode then, and before every step)."""
        if not self._coupled():
            return
        if self.combined:
            raise UnsupportedModelError(
                "combined=True runs the validation rows through the training forward, which "
                "would change the batch statistics of the model's BatchNorm layers (and so "
                "training); use the default combined=False, or put the BatchNorm layers in "
                "eval mode")
        if self.second_order:
            raise UnsupportedModelError(
                "second_order=True is not defined for BatchNorm layers using batch "
                "statistics (training mode); use first-order values, or put the BatchNorm "
                "layers in eval mode")

    def _capture(self, keep_outputs: bool = False) -> _Capture:
        """Hooks on the attributed layers: inputs always; output gradients by tensor hooks
        (training backward), or the outputs themselves (to differentiate w.r.t. them); on
        every BatchNorm the frozen-statistics backward (:mod:`dvl_ooc.inrun.batchnorm`)."""
        return _Capture(self.model, self.modules, keep_outputs=keep_outputs)

    @staticmethod
    def _check_calls(cap: _Capture) -> None:
        twice = [n for n, c in cap.calls.items() if c > 1]
        if twice:
            raise UnsupportedModelError(
                f"layer(s) {twice} are called more than once per forward (weight sharing); "
                "per-sample layer gradients are not defined for them"
            )

    def _raw(self, cap: _Capture) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (input, output grad)}`` of the captured layers, raw shapes (BatchNorm:
        ``(xhat, output grad)``)."""
        # a layer missing from the output grads is not on the loss path: its gradient is zero
        grads = cap.output_grads
        inputs = cap.inputs
        return {n: (inputs[n], grads[n]) for n in self.modules if n in grads}

    def _rows_of(self, cap: _Capture, value: torch.Tensor, retain_graph: bool = False
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Raw rows of ``value`` (computed under ``cap`` with ``keep_outputs=True``): a backward
        to the captured layer outputs only (no parameter gradients), BatchNorm statistics
        frozen."""
        cap.check_outputs()
        outs, inputs = cap.outputs, cap.inputs
        names = [n for n in self.modules if n in outs and outs[n].requires_grad]
        if not names or not value.requires_grad:
            return {}
        gs = torch.autograd.grad(value, [outs[n] for n in names], allow_unused=True,
                                 retain_graph=retain_graph)
        # a layer whose output is unused has no gradient (as in plain training)
        return {n: (inputs[n], g.detach()) for n, g in zip(names, gs) if g is not None}

    def _layer_rows(self, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]):
        """Raw ``{name: (input, output grad)}`` rows of ``objective(model(x))``: one forward and
        a backward to the captured layer outputs only (no parameter gradients)."""
        with self._capture(keep_outputs=True) as cap:
            lv = objective(self.model(x))
            rows = self._rows_of(cap, lv)
        return cap, rows

    def _check_batch(self, x: Any, y: Any, idx: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                                  np.ndarray]:
        p0 = self.params[0]
        xt = as_tensor(x, device=p0.device)
        yt = as_tensor(y, device=p0.device)
        # lengths only: plain training does not scan the batch for NaNs (the loss check does)
        if xt.ndim == 0 or yt.ndim == 0 or len(xt) != len(yt) or len(xt) == 0:
            raise LengthMismatchError(
                f"training batch: x has shape {tuple(xt.shape)} and y {tuple(yt.shape)}; pass "
                "a non-empty batch with one label per sample"
            )
        if tuple(xt.shape[1:]) != tuple(self.x_val.shape[1:]):
            raise InputError(
                f"training inputs have per-sample shape {tuple(xt.shape[1:])} but the "
                f"validation set has {tuple(self.x_val.shape[1:])}; they must match"
            )
        if xt.dtype != self.x_val.dtype:
            raise InputError(
                f"training inputs are {xt.dtype} but the validation set is {self.x_val.dtype}"
            )
        if idx is None:
            raise InputError("step() needs the training-sample indices of the batch (idx)")
        ia = np.asarray(idx.detach().cpu() if isinstance(idx, torch.Tensor) else idx)
        if ia.ndim != 1 or ia.dtype.kind not in "iu":
            raise InputError(f"idx must be a 1-d integer array, got {ia.dtype} of shape {ia.shape}")
        if len(ia) != len(xt):
            raise LengthMismatchError(
                f"the batch has {len(xt)} samples but idx has {len(ia)} indices; pass the "
                "dataset index of every sample in the batch"
            )
        if ia.min() < 0 or ia.max() >= self.n_train:
            raise InputError(f"idx must lie in [0, {self.n_train}), got [{ia.min()}, {ia.max()}]")
        return xt, yt, ia.astype(np.int64)

    # ------------------------------------------------------------------ public
    def step(self, x: Any, y: Any, idx: Any, lr: float) -> torch.Tensor:
        """Forward and backward of the training batch (``.grad`` set exactly as
        ``loss(model(x), y).backward()`` would), plus the batch's In-Run Shapley values.

        Returns the (detached) mean training loss of the batch.
        """
        lr = float(lr)
        if not math.isfinite(lr):
            raise InputError(f"lr must be finite, got {lr}")
        x, y, ia = self._check_batch(x, y, idx)
        b = len(x)
        self._check_batchnorm_mode()
        if self.combined:
            return self._combined_step(x, y, ia, lr)
        if self._coupled():
            return self._frozen_statistics_step(x, y, ia, lr)
        with self._capture() as cap:
            loss = self.loss(self.model(x), y)
            self._check_calls(cap)
            if self.second_order:
                g = torch.autograd.grad(loss, self.train_params, allow_unused=True)
                for p, gp in zip(self.train_params, g):
                    if gp is not None:  # off the loss path: .grad untouched, as by backward()
                        _accumulate_grad(p, gp)
                got = {id(p): gp for p, gp in zip(self.train_params, g)}
                gbar = [torch.zeros_like(p) if got[id(p)] is None else got[id(p)].detach()
                        for p in self.params]
            else:
                loss.backward()
        # output grads of the MEAN loss are g_i / b: the scores scale by lr once at the end
        scores = self._scores(self._raw(cap), b, lr, gbar if self.second_order else None)
        return self._record(ia, scores, loss)

    def _frozen_statistics_step(self, x, y, ia: np.ndarray, lr: float) -> torch.Tensor:
        """A step with BatchNorm layers using batch statistics: the user's forward, a backward
        to the attributed layer outputs with the statistics frozen (the per-sample rows, see
        :mod:`dvl_ooc.inrun.batchnorm`), then the user's ``loss.backward()`` on the same graph
        (``.grad`` bit-identical to plain training). A model refused after its forward (weight
        sharing, outputs modified in place) gets its running statistics back."""
        buffers = [b for m in self.batchnorms for b in m.buffers()]
        before = [b.clone() for b in buffers]
        with self._capture(keep_outputs=True) as cap:
            try:
                loss = self.loss(self.model(x), y)
                self._check_calls(cap)
                rows = self._rows_of(cap, loss, retain_graph=True)
            except (UnsupportedModelError, RuntimeError) as e:
                with torch.no_grad():
                    for b, v in zip(buffers, before):
                        b.copy_(v)
                if isinstance(e, RuntimeError) and "_FrozenStatistics" in str(e):
                    raise UnsupportedModelError(
                        "the output of a BatchNorm layer in training mode is modified in "
                        "place (e.g. by ReLU(inplace=True) after it); In-Run Shapley passes "
                        "those outputs through an autograd function, whose outputs may not be "
                        "modified in place: use inplace=False there") from e
                raise
            cap.bn.frozen = False
            loss.backward()
        return self._record(ia, self._scores(rows, len(x), lr, None), loss)

    def _combined_step(self, x, y, ia: np.ndarray, lr: float) -> torch.Tensor:
        """One forward over ``[train; validation]`` and one backward to the layer outputs only;
        the train-only parameter gradient and ``V = grad L_val`` are rebuilt from the captured
        rows with the same kernels autograd uses (``.grad`` allclose, not bit-identical)."""
        b = len(x)
        losses: list[torch.Tensor] = []

        def total(out: torch.Tensor) -> torch.Tensor:
            losses.append(self.loss(out[:b], y))
            return losses[0] + self.loss(out[b:], self.y_val) * self.n_val

        cap, rows = self._layer_rows(torch.cat([x, self.x_val]), total)
        self._check_calls(cap)
        loss = losses[0]
        pv = self.per_validation_point
        scores = torch.zeros((b, self.n_val) if pv else b, dtype=loss.dtype, device=loss.device)
        for name, (a, g) in rows.items():
            mod, kind = self.modules[name], self.kinds[name]
            train_grad = kind.param_grads(mod, a[:b], g[:b])
            for pn, p in mod.named_parameters(recurse=False):
                _accumulate_grad(p, train_grad[pn])
            if pv:  # ghost / materialised products of the rows of the same backward
                scores += kind.pairwise_products(mod, a[:b], g[:b], a[b:], g[b:],
                                                 method=self.solver)
            else:
                V = kind.param_grads(mod, a[b:], g[b:])
                scores += kind.dot_with_param_vector(mod, a[:b], g[:b], V)
        return self._record(ia, scores * lr, loss)

    def _scores(self, train: dict, b: int, lr: float, gbar) -> torch.Tensor:
        # the validation loss is taken in eval mode; afterwards every module gets its own mode
        # back (model.train() would also switch on layers the user froze, e.g. BatchNorm)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            if self.per_validation_point:
                out = self._pairwise_scores(train, b)
            else:
                out = self._summed_scores(train, b, lr, gbar)
        finally:
            for m, mode in modes:
                m.training = mode
        return out * lr  # (lr / b) * <b * G_mean, ...>: captured train grads are of the mean loss

    def _val_chunks(self):
        """``(offset, x, y, weight)`` chunks of the validation set: all rows (weight 1), or
        with ``val_sample`` this step's sample of rows, weighted ``n_val / val_sample``."""
        if self.val_sample is None:
            for s in range(0, self.n_val, self.val_batch_size):
                e = s + self.val_batch_size
                yield s, self.x_val[s:e], self.y_val[s:e], 1.0
            return
        rows = torch.as_tensor(self.val_rows(self.steps), device=self.x_val.device)
        w = self.n_val / self.val_sample
        for s in range(0, len(rows), self.val_batch_size):
            r = rows[s : s + self.val_batch_size]
            yield None, self.x_val[r], self.y_val[r], w

    def val_rows(self, step: int) -> np.ndarray:
        """The validation rows of step ``step`` (0-based) with ``val_sample``: positions
        ``[step k, (step + 1) k)`` of an endless stream of seeded permutations of the rows
        (permutation ``r`` from ``(seed, r)``), so every row is used equally often, a resumed
        run continues the stream, and each row's expected count per step is
        ``k / n_val`` (a row may appear twice where two permutations meet)."""
        if self.val_sample is None:
            return np.arange(self.n_val)
        k, m = self.val_sample, self.n_val
        out, p, end = [], step * k, (step + 1) * k
        while p < end:
            r, j = divmod(p, m)
            if r not in self._perms:
                if len(self._perms) > 2:
                    self._perms.pop(min(self._perms))
                self._perms[r] = numpy_rng(self.seed, 29, r).permutation(m)
            take = min(end - p, m - j)
            out.append(self._perms[r][j : j + take])
            p += take
        return np.concatenate(out)

    def _summed_scores(self, train: dict, b: int, lr: float, gbar) -> torch.Tensor:
        """``<g_i, V>`` with ``V = grad L_val`` (plus the second-order vector), layer by layer
        as the directional derivative ``sum_l g_il . (V a_il)`` (one forward's cost)."""
        V: list[torch.Tensor] | None = None
        coupled = self._coupled()  # BatchNorm without running statistics: frozen, from rows
        for _, xv, yv, w in self._val_chunks():
            if coupled:
                gv = self._grads_from_rows(xv, yv, len(xv) * w)
                V = gv if V is None else [t + h for t, h in zip(V, gv)]
                continue
            lv = self.loss(self.model(xv), yv) * (len(xv) * w)
            gv = torch.autograd.grad(lv, self.params, allow_unused=True, materialize_grads=True,
                                     create_graph=gbar is not None)
            if gbar is not None:
                # second order: V -= (lr / 2) H_val gbar, so that (lr / b) <g_i, V> has the
                # term -(lr^2 / (2 b)) <g_i, H_val gbar>
                dot = sum((a * c).sum() for a, c in zip(gv, gbar))
                hv = torch.autograd.grad(dot, self.params, allow_unused=True,
                                         materialize_grads=True)
                gv = [a.detach() - 0.5 * lr * h for a, h in zip(gv, hv)]
            V = list(gv) if V is None else [t + h for t, h in zip(V, gv)]
        assert V is not None
        pidx = {id(p): k for k, p in enumerate(self.params)}
        out = torch.zeros(b, dtype=V[0].dtype, device=V[0].device)
        for name, (a, g) in train.items():
            mod = self.modules[name]
            tensors = {pn: V[pidx[id(p)]] for pn, p in mod.named_parameters(recurse=False)}
            out += self.kinds[name].dot_with_param_vector(mod, a, g, tensors)
        return out

    def _grads_from_rows(self, x: torch.Tensor, y: torch.Tensor,
                         weight: float) -> list[torch.Tensor]:
        """The gradient of ``weight * loss(model(x), y)`` w.r.t. :attr:`params`, rebuilt layer
        by layer from the rows of a frozen-statistics backward (for BatchNorm layers that
        normalise with batch statistics in eval mode: their node is skipped in that backward,
        so autograd would give their affine parameters no gradient)."""
        _, rows = self._layer_rows(x, lambda o: self.loss(o, y) * weight)
        grads = {id(p): torch.zeros_like(p) for p in self.params}
        for name, (a, g) in rows.items():
            mod = self.modules[name]
            pg = self.kinds[name].param_grads(mod, a, g)
            for pn, p in mod.named_parameters(recurse=False):
                grads[id(p)] += pg[pn]
        return [grads[id(p)] for p in self.params]

    def _pairwise_scores(self, train: dict, b: int) -> torch.Tensor:
        """``(b, n_val)`` per-sample gradient dot products by ghost / materialised products."""
        p0 = self.params[0]
        out = torch.zeros(b, self.n_val, dtype=p0.dtype, device=p0.device)
        for s, xv, yv, _ in self._val_chunks():
            _, val = self._layer_rows(xv, lambda o, yv=yv: self.loss(o, yv) * len(yv))
            for name, (a_t, g_t) in train.items():
                if name in val:
                    out[:, s : s + len(xv)] += self.kinds[name].pairwise_products(
                        self.modules[name], a_t, g_t, *val[name], method=self.solver)
        return out

    def _record(self, ia: np.ndarray, scores: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Queue a step's scores (on the device) and move them to the store every
        ``sync_every`` steps, so that an accelerator is not synchronised at every step."""
        loss = loss.detach()
        self._pending.append((ia, scores.detach(), loss))
        self._pending_elements += scores.numel()
        self.steps += 1
        flush = self.steps % self.flush_every == 0
        if flush or len(self._pending) >= self.sync_every or (
                self._pending_elements > self.max_buffer_bytes // 8):
            self._drain()
        if flush:
            self.store.flush(steps=self.steps)
        return loss

    def _drain(self) -> None:
        """Copy the queued scores to the host, check them, add them to the store."""
        if not self._pending:
            return
        pending, self._pending, self._pending_elements = self._pending, [], 0
        first = self.steps - len(pending)
        losses = torch.stack([p[2] for p in pending]).cpu().numpy()
        scores = torch.cat([p[1] for p in pending]).to("cpu", torch.float64).numpy()
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            raise NonFiniteError(
                f"non-finite training loss {losses[bad[0]]} at step {first + int(bad[0])}; the "
                f"scores of steps {first}..{self.steps - 1} were not stored"
            )
        if not np.isfinite(scores).all():
            raise NonFiniteError(
                f"non-finite in-run scores in steps {first}..{self.steps - 1}; they were not "
                "stored"
            )
        self.store.add(np.concatenate([p[0] for p in pending]), scores)

    @property
    def values(self) -> np.ndarray:
        """Accumulated scores, ``(n_train,)`` or ``(n_train, n_val)`` float64 (flushes first)."""
        self._drain()
        return self.store.to_numpy()

    def flush(self) -> None:
        """Write queued and buffered scores to the store (on disk: into the Zarr array)."""
        self._drain()
        self.store.flush(steps=self.steps)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> InRunShapley:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except NonFiniteError:
            if exc_type is None:  # else: do not mask the exception that is propagating
                raise

    def __repr__(self) -> str:
        where = "memory" if self.store.path is None else self.store.path
        return (f"InRunShapley(n_train={self.n_train}, n_val={self.n_val}, "
                f"per_validation_point={self.per_validation_point}, "
                f"second_order={self.second_order}, layers={self.layers}, steps={self.steps}, "
                f"store={where})")
