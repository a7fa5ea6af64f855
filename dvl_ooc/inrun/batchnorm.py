"""BatchNorm layers in In-Run Data Shapley: the frozen-statistics convention.

A BatchNorm layer computes, per channel ``c``, ``y = gamma_c xhat + beta_c`` with
``xhat = (x - mu_c) / sigma_c`` and ``sigma_c = sqrt(var_c + eps)``. In training mode (and
without running statistics) ``mu``, ``var`` are the statistics of the current batch, so every
sample's output depends on every other sample of the batch and "the gradient of sample i" is
not defined until one says what happens to the statistics.

Convention (stop-gradient through the batch statistics). The per-sample gradient of sample
``i`` is the gradient of its own loss term with the normalisation held at the values the
batch gave it::

    g_i = grad_w l_i(w; mu_B, var_B)        (mu_B, var_B constants)

so each BatchNorm acts on sample ``i`` as the elementwise affine map above, with

* input gradient ``dl_i/dx = gamma_c / sigma_c * dl_i/dy`` (no terms through ``mu``, ``var``);
* per-sample affine gradients, per channel, summed over the positions ``l``::

      dl_i/dgamma_c = sum_l dl_i/dy_ilc * xhat_ilc,      dl_i/dbeta_c = sum_l dl_i/dy_ilc

  whose products with a vector or with another sample's are those of any elementwise layer
  (:class:`BatchNormKind`). Upstream ``Linear``/``Conv2d`` layers keep their ghost products,
  with output gradients from a backward pass in which BatchNorm's input gradient is the one
  above.

Why this one. (1) It is what "sample i's own term" means when the step is seen as the network
evaluated on this batch: the normalisation is part of how the batch was processed, as a
dropout mask is. (2) It keeps the values per-sample and first order: the statistics' part of
the batch gradient, ``grad L_B - (1/b) sum_i g_i``, is a per-channel projection
(``-(gamma / sigma) (mean(dy) + xhat mean(dy xhat))`` at each BatchNorm's input) that belongs to
no single sample; attributing it would need a Shapley game over the statistics themselves.
(3) It costs one extra backward to the layer outputs (no weight gradients, about a third of a
training step), never a per-sample backward. The price: a batch's values no longer sum
exactly to the first-order decrease of the validation loss over the step; they sum to that of
the step ``-(eta / b) sum_i g_i``, which differs from the real step by the statistics' part.

Eval-mode BatchNorm (running statistics: e.g. BatchNorm frozen while fine-tuning) couples
nothing: it is the same elementwise affine map with ``mu``, ``var`` the running statistics,
its backward is already per-sample, and no extra backward is run. The validation loss of the
tracker is evaluated in eval mode, so its BatchNorms use the running statistics (a BatchNorm
without running statistics normalises each validation chunk with the chunk's own statistics,
frozen in the same way).

How the extra backward is run without touching training (:class:`BatchNormCapture`). The
forward is the user's, once. The output ``y`` of every BatchNorm call that uses batch
statistics is passed through an identity autograd function (the values are ``y`` itself, a
view) whose backward, while :attr:`BatchNormCapture.frozen` is set, sends the output gradient
straight to the BatchNorm input as ``gamma / sigma_B * dy`` (``sigma_B`` as the BatchNorm
kernel saved it) and nothing to the BatchNorm node, which is then skipped; otherwise it passes
``dy`` on to the BatchNorm node unchanged. The tracker runs that frozen backward first
(``torch.autograd.grad`` to the captured layer outputs, ``retain_graph=True``), clears the
flag and runs the user's ``loss.backward()`` on the same graph: ``.grad`` and the running
statistics are bit-identical to plain training. The output of such a BatchNorm is a view made
by a custom autograd function, which autograd forbids to modify in place: a model with
``ReLU(inplace=True)`` right after a BatchNorm in training mode is refused (use
``inplace=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..exceptions import UnsupportedModelError

__all__ = ["BatchNormCapture", "BatchNormInput", "BatchNormKind", "is_batchnorm",
           "uses_batch_statistics"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``...)."""
    return isinstance(module, _BatchNorm)


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm layer normalises with the batch's statistics in its next call
    (training mode, or no running statistics), as ``torch.nn.BatchNorm*`` decides."""
    return bool(module.training or module.running_mean is None or module.running_var is None)


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(C,)`` -> ``(1, C, 1, ...)`` broadcasting against an ``ndim``-d input."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass(frozen=True)
class BatchNormInput:
    """The rows of a BatchNorm layer: its input ``x`` ``(n, C, ...)`` and the ``(C,)``
    statistics it was normalised with, standing for ``xhat = (x - mean) * invstd`` without
    forming it (``x`` is the tensor autograd keeps anyway). Indexing selects samples."""

    x: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor

    def __getitem__(self, rows: Any) -> BatchNormInput:
        return BatchNormInput(self.x[rows], self.mean, self.invstd)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def xhat(self) -> torch.Tensor:
        """The normalised input ``(x - mean) * invstd``."""
        nd = self.x.ndim
        return (self.x - _channel_view(self.mean, nd)) * _channel_view(self.invstd, nd)


def _sums(a: BatchNormInput, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(sum_l g xhat, sum_l g)``, each ``(n, C)``:
    ``sum_l g xhat = invstd * sum_l g (x - mean)`` (a batched product, no ``xhat``)."""
    n, c = g.shape[:2]
    g3 = g.reshape(n, c, -1)
    centred = a.x.reshape(n, c, -1) - a.mean.to(g.dtype).reshape(1, c, 1)
    return torch.einsum("ncl,ncl->nc", g3, centred) * a.invstd.to(g.dtype), g3.sum(-1)


class BatchNormKind:
    """Per-sample operations of an affine BatchNorm layer on its raw rows.

    Rows: ``a`` a :class:`BatchNormInput` (the input and the statistics the layer used) and
    ``g`` the output gradient ``(n, C, ...)``. The per-sample gradient of sample ``i``
    is ``(sum_l g_il xhat_il, sum_l g_il)`` per channel, flat in (weight, bias) order; products
    cost ``O(n C L)`` to form them plus a ``(n, 2C) x (2C, m)`` matrix product. Same method
    names and signatures as :class:`~dvl_ooc.layers.LayerKind` for what the tracker uses.
    """

    name = "nn.BatchNorm"

    def __repr__(self) -> str:
        return "BatchNormKind()"

    def check(self, module: nn.Module, name: str | None = None) -> None:
        if module.weight is None or module.bias is None:  # pragma: no cover - no parameters
            where = f"layer {name!r}: " if name else ""
            raise UnsupportedModelError(where + "a BatchNorm without affine parameters has "
                                        "nothing to attribute")

    def per_sample_grads(self, module: nn.Module, a: torch.Tensor,
                         g: torch.Tensor) -> torch.Tensor:
        """``(n, 2C)`` per-sample gradients (weight, then bias)."""
        gw, gb = _sums(a, g)
        return torch.cat([gw, gb], dim=1)

    def param_grads(self, module: nn.Module, a: torch.Tensor,
                    g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradients of the summed loss ``{"weight", "bias"}`` (sums of the per-sample ones)."""
        gw, gb = _sums(a, g)
        return {"weight": gw.sum(0), "bias": gb.sum(0)}

    def dot_with_param_vector(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                              W: dict[str, torch.Tensor]) -> torch.Tensor:
        """``<per-sample gradient of row i, W>``, ``(n,)``."""
        gw, gb = _sums(a, g)
        return gw @ W["weight"].to(gw.dtype) + gb @ W["bias"].to(gb.dtype)

    def pairwise_products(self, module: nn.Module, a_t: torch.Tensor, g_t: torch.Tensor,
                          a_v: torch.Tensor, g_v: torch.Tensor, *, method: str = "auto",
                          max_elements: int = 2**24) -> torch.Tensor:
        """``(n, m)`` per-sample gradient dot products (``method`` is irrelevant here: the
        per-sample gradients have ``2C`` entries, they are always formed)."""
        return self.per_sample_grads(module, a_t, g_t) @ self.per_sample_grads(
            module, a_v, g_v).T


#: the one instance the tracker uses
BATCHNORM_KIND = BatchNormKind()


#: autograd nodes known to save ``(mean, 1 / sqrt(var + eps))`` as ``result1``, ``result2``
_SAVES_MEAN_INVSTD = frozenset({"NativeBatchNormBackward0"})


def _statistics(module: nn.Module, x: torch.Tensor,
                node: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, invstd)`` ``(C,)`` the layer normalised ``x`` with: with batch statistics the
    ones its autograd node saved (``node``; recomputed from ``x`` where a backend saves none
    or another layout), else the running statistics."""
    c = x.shape[1]
    if node is None and not uses_batch_statistics(module):
        rv = module.running_var.detach()
        return module.running_mean.detach(), torch.rsqrt(rv + module.eps)
    if type(node).__name__ in _SAVES_MEAN_INVSTD:
        saved = (getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None))
        if all(isinstance(t, torch.Tensor) and t.shape == (c,) for t in saved):
            return saved[0].detach(), saved[1].detach()
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.ndim)), unbiased=False)
    return mean, torch.rsqrt(var + module.eps)


class _Switch:
    """The frozen/coupled switch of one step's backward passes. The autograd context of
    :class:`_FrozenStatistics` holds this, never the capture: the capture keeps the layer
    outputs, whose graph holds the context, and a reference cycle through autograd nodes is
    one Python's garbage collector cannot see (every step's activations would leak)."""

    __slots__ = ("frozen",)

    def __init__(self) -> None:
        self.frozen = True


class _FrozenStatistics(torch.autograd.Function):
    """The identity on a BatchNorm output ``y`` whose backward sends the output gradient
    ``dy`` either on to ``y`` (the BatchNorm node: the true, coupled gradient, while
    ``switch.frozen`` is false) or straight to the BatchNorm input ``x`` as ``scale * dy``,
    ``scale = gamma / sigma_B`` (statistics frozen; the BatchNorm node then receives no
    gradient and computes nothing)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                switch: _Switch) -> torch.Tensor:
        ctx.scale, ctx.switch = scale, switch
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        if ctx.switch.frozen:
            dx = dy * ctx.scale.to(dy.dtype) if ctx.needs_input_grad[0] else None
            return dx, None, None, None
        return None, dy, None, None


class BatchNormCapture:
    """Hooks on every BatchNorm layer of a model for one In-Run step (a context manager).

    For the attributed BatchNorm layers ``names``: :attr:`inputs` holds their rows
    (:class:`BatchNormInput`: the detached input and its statistics),
    :attr:`outputs` the layer outputs (``keep_outputs``), :attr:`output_grads` their gradients
    from tensor hooks (``output_grads``), :attr:`calls` the forward calls. The output of
    *every* BatchNorm call that uses batch statistics goes through an identity autograd
    function whose backward, while :attr:`frozen` is true, sends the output gradient straight
    to the layer's input as ``gamma / sigma_B * dy`` (the frozen-statistics gradient; the
    BatchNorm node is skipped), and otherwise on to the BatchNorm node unchanged (see the
    module docstring). :attr:`coupled` tells whether any call used batch statistics.
    """

    def __init__(self, model: nn.Module, names: list[str], *, keep_outputs: bool = False,
                 output_grads: bool = True) -> None:
        self.all = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
        self.names = list(names)
        self.modules = {n: self.all[n] for n in self.names}
        self.keep_outputs = bool(keep_outputs)
        self.record_output_grads = bool(output_grads)
        self._switch = _Switch()
        self.coupled = False
        self.inputs: dict[str, BatchNormInput] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(self.names, 0)
        self._handles: list[Any] = []

    @property
    def frozen(self) -> bool:
        """Whether backward passes through this step's graph freeze the batch statistics."""
        return self._switch.frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._switch.frozen = bool(value)

    def __enter__(self) -> BatchNormCapture:
        attributed = set(self.names)
        for name, mod in self.all.items():
            self._handles.append(mod.register_forward_hook(
                self._forward_hook(name, name in attributed)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str, attributed: bool):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
            batch = uses_batch_statistics(module)
            if not batch and not attributed:
                return None  # an elementwise map: nothing to record or change
            x = inputs[0].detach()
            node = output.grad_fn
            if batch and node is not None and "BatchNorm" not in type(node).__name__:
                raise UnsupportedModelError(
                    f"BatchNorm layer {name!r} returned an output whose autograd node is "
                    f"{type(node).__name__}, not a batch-norm node; In-Run Shapley needs the "
                    "plain torch.nn.BatchNorm forward (or the layer in eval mode)")
            mean, invstd = _statistics(module, x, node if batch else None)
            if batch and node is not None:
                self.coupled = True
                scale = invstd if module.weight is None else invstd * module.weight.detach()
                output = _FrozenStatistics.apply(inputs[0], output,
                                                 _channel_view(scale, x.ndim), self._switch)
            if attributed:
                self.calls[name] += 1
                self.inputs[name] = BatchNormInput(x, mean, invstd)
                if self.keep_outputs:
                    self.outputs[name] = output
                if self.record_output_grads and output.requires_grad:

                    def save(g: torch.Tensor) -> None:
                        self.output_grads[name] = g.detach()

                    output.register_hook(save)
            return output

        return hook
