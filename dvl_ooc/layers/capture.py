"""Forward/backward hooks that record layer inputs and output gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._compat import renamed_arguments
from ..exceptions import InputError, UnsupportedModelError
from .base import LayerKind, kind_of
from .kinds import CAPTURABLE_LAYERS, SUPPORTED_LAYERS

__all__ = ["LayerCapture"]


def _names(types: tuple[type[nn.Module], ...]) -> str:
    return " and ".join(f"nn.{t.__name__}" for t in types)


class LayerCapture:
    """Record input activations and output gradients of ``Linear``/``Conv2d`` layers (and
    ``Embedding`` layers on request).

    Use as a context manager around a forward and backward pass of plain autograd::

        with LayerCapture(model) as cap:
            total = loss(model(x), y) * len(x)   # sum of per-sample losses
            total.backward()
        A = cap.input_matrix("fc"); G = cap.output_grad_matrix("fc")

    Args:
        model: the network.
        layers: module names to capture; default every supported module with trainable
            parameters. Unsupported names raise :class:`UnsupportedModelError`.
        include_embeddings: also accept ``nn.Embedding`` layers.
        keep_outputs: also keep the (non-detached) layer outputs in :attr:`outputs`.
        output_grads: record output gradients with tensor hooks on the layer outputs
            (``False``: forward hooks only, e.g. to differentiate w.r.t. :attr:`outputs`
            yourself with ``keep_outputs=True``).

    :attr:`calls` counts the forward calls of each module (a count above one means weight
    sharing, for which per-sample layer gradients are not defined). :attr:`modules` maps the
    captured names to their modules. The operations on captured rows are those of the layer's
    kind (:func:`~dvl_ooc.layers.kind_of`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | None = None,
        *,
        include_embeddings: bool = False,
        keep_outputs: bool = False,
        output_grads: bool = True,
        **deprecated: Any,
    ) -> None:
        layers = renamed_arguments(LayerCapture.__init__, deprecated, {"modules": "layers"},
                                   {"layers": layers}).get("layers", layers)
        named = dict(model.named_modules())
        types = CAPTURABLE_LAYERS if include_embeddings else SUPPORTED_LAYERS
        if layers is None:
            names = [
                n for n, m in named.items()
                if isinstance(m, types)
                and any(p.requires_grad for p in m.parameters(recurse=False))
            ]
        else:
            names = list(layers)
            for n in names:
                if n not in named:
                    raise InputError(f"no module named {n!r} in the model")
                if not isinstance(named[n], types):
                    extra = tuple(t for t in CAPTURABLE_LAYERS if t not in SUPPORTED_LAYERS)
                    raise UnsupportedModelError(
                        f"module {n!r} is a {type(named[n]).__name__}; LayerCapture records "
                        f"{_names(SUPPORTED_LAYERS)} layers, and {_names(extra)} layers with "
                        "include_embeddings=True"
                    )
        self.modules: dict[str, nn.Module] = {n: named[n] for n in names}
        self.kinds: dict[str, LayerKind] = {n: kind_of(m, n) for n, m in self.modules.items()}
        self.keep_outputs = bool(keep_outputs)
        self.record_output_grads = bool(output_grads)
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.inputs[name] = inputs[0].detach()
            if self.keep_outputs:
                self.outputs[name] = output
            if self.record_output_grads and output.requires_grad:

                def save(g):
                    self.output_grads[name] = g.detach()

                output.register_hook(save)

        return hook

    def input_matrix(self, name: str) -> torch.Tensor:
        """Input rows ``(n, L, d_in [+1])`` of layer ``name`` (embedding: ``(n, L)`` indices)."""
        return self.kinds[name].input_matrix(self.modules[name], self.inputs[name])

    def output_grad_matrix(self, name: str) -> torch.Tensor:
        """Output-gradient rows ``(n, L, d_out)`` of layer ``name``."""
        return self.kinds[name].output_grad_matrix(self.modules[name], self.output_grads[name])

    def per_sample_grads(self, name: str) -> torch.Tensor:
        """Per-sample gradients of the captured layer, ``(n, p_layer)`` in (weight, bias) order.

        Valid when the backward pass was run on the *sum* of per-sample losses.
        """
        return self.kinds[name].per_sample_grads(self.modules[name], self.inputs[name],
                                                 self.output_grads[name])
