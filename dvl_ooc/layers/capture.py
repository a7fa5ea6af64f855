"""Forward/backward hooks that record layer inputs and output gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..exceptions import InputError, UnsupportedModelError
from .kinds import (
    CAPTURABLE_LAYERS,
    SUPPORTED_LAYERS,
    combined_to_params,
    embedding_per_sample_grads,
    layer_input_matrix,
    layer_output_grad_matrix,
)

__all__ = ["LayerCapture"]


class LayerCapture:
    """Record input activations and output gradients of ``Linear``/``Conv2d`` layers.

    Use as a context manager around a forward and backward pass of plain autograd::

        with LayerCapture(model) as cap:
            loss = loss_fn(model(x), y) * len(x)   # sum of per-sample losses
            loss.backward()
        A = cap.inputs["fc"]; G = cap.output_grads["fc"]

    Args:
        model: the network.
        modules: module names to capture; default every supported module with trainable
            parameters. Unsupported names raise :class:`UnsupportedModelError`.
        include_embeddings: also accept ``nn.Embedding`` layers.
        keep_outputs: also keep the (non-detached) layer outputs in :attr:`outputs`.

    :attr:`calls` counts the forward calls of each module (a count above one means weight
    sharing, for which per-sample layer gradients are not defined).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | None = None,
        *,
        include_embeddings: bool = False,
        keep_outputs: bool = False,
    ) -> None:
        named = dict(model.named_modules())
        kinds = CAPTURABLE_LAYERS if include_embeddings else SUPPORTED_LAYERS
        if modules is None:
            names = [
                n for n, m in named.items()
                if isinstance(m, kinds)
                and any(p.requires_grad for p in m.parameters(recurse=False))
            ]
        else:
            names = list(modules)
            for n in names:
                if n not in named:
                    raise InputError(f"no module named {n!r} in the model")
                if not isinstance(named[n], kinds):
                    extra = (
                        "" if include_embeddings
                        else " (nn.Embedding with include_embeddings=True)"
                    )
                    raise UnsupportedModelError(
                        f"module {n!r} is a {type(named[n]).__name__}; only nn.Linear and "
                        f"nn.Conv2d layers can be captured{extra}"
                    )
        self.modules = {n: named[n] for n in names}
        self.keep_outputs = keep_outputs
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
            if output.requires_grad:

                def save(g):
                    self.output_grads[name] = g.detach()

                output.register_hook(save)

        return hook

    def input_matrix(self, name: str) -> torch.Tensor:
        return layer_input_matrix(self.modules[name], self.inputs[name])

    def output_grad_matrix(self, name: str) -> torch.Tensor:
        return layer_output_grad_matrix(self.modules[name], self.output_grads[name])

    def per_sample_grads(self, name: str) -> torch.Tensor:
        """Per-sample gradients of the captured layer, ``(n, p_layer)`` in (weight, bias) order.

        Valid when the backward pass was run on the *sum* of per-sample losses.
        """
        if isinstance(self.modules[name], nn.Embedding):
            return embedding_per_sample_grads(
                self.modules[name], self.inputs[name], self.output_grads[name]
            )
        A, G = self.input_matrix(name), self.output_grad_matrix(name)
        return combined_to_params(self.modules[name], torch.einsum("nlo,nli->noi", G, A))
