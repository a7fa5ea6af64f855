r"""Run ``m`` copies of one ``nn.Sequential`` with stacked parameters as one grouped network.

:class:`~dvl_ooc.valuation.TorchBatchUtility` trains ``m`` models at once. ``torch.func.vmap``
over ``functional_call`` does this for any module, but its batching rule for a convolution with
batched input *and* batched weight runs a grouped convolution on a freshly permuted NCHW copy,
which oneDNN executes slowly for the few channels of small CNNs. For a plain ``nn.Sequential``
of common layers this module builds the stacked network directly:

* a convolution activation of ``m`` models is one tensor ``(B, m*C, H, W)`` kept in
  ``channels_last`` memory, and ``Conv2d`` runs as one convolution with ``groups = m * groups``
  and weights ``(m*O, C/groups, kh, kw)`` (oneDNN's channels-last grouped kernels: about 2.4x
  faster than vmap's NCHW form for the 8->4 channel CNN of pyDVL's tutorial on one core);
* a feature activation is ``(m, B, F)`` and ``Linear`` is one ``baddbmm``;
* pooling and element-wise activations are applied unchanged (they act per channel or per
  element, so the model axis folded into channels or rows is invisible to them);
* ``Flatten`` moves from the first layout to the second with one copy, in the order
  ``torch.flatten`` uses for each model (``C, H, W``).

Input ``(m, B, *sample_shape)``; output ``(m, B, *out_shape)``, the layout ``vmap`` returns, so
the two paths are interchangeable (equality tested at float64). Anything else -- other layer
types, frozen parameters or buffers, ``Softmax`` over a non-feature axis, non-zero padding
modes, inputs that are neither 2-D features nor 4-D images -- makes :func:`compile_stacked`
return ``None`` and the caller keeps ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StackedSequential", "compile_stacked"]

#: parameter-free modules that act element-wise (any layout)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                nn.Softplus, nn.Hardtanh, nn.Mish, nn.Identity)
#: parameter-free modules that act per channel on (N, C, H, W)
_POOL2D = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class _Op:
    kind: str  # "conv" | "linear" | "map" | "pool" | "flatten" | "softmax"
    module: nn.Module
    prefix: str  # parameter name prefix ("" at top level, else "name.")


def _leaves(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]] | None:
    out: list[tuple[str, nn.Module]] = []
    for name, mod in seq.named_children():
        if isinstance(mod, nn.Sequential):
            sub = _leaves(mod, f"{prefix}{name}.")
            if sub is None:
                return None
            out += sub
        else:
            out.append((f"{prefix}{name}.", mod))
    return out


def _traced_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf modules of ``model`` if its ``forward`` is a plain chain of submodule calls
    (``torch.fx`` trace: one input, each node calls a submodule on the previous node)."""
    try:
        import torch.fx as fx

        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any untraceable forward: not a chain
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    prev, out = nodes[0], []
    for node in nodes[1:-1]:
        if node.op != "call_module" or node.args != (prev,) or node.kwargs:
            return None
        out.append((f"{node.target}.", model.get_submodule(node.target)))
        prev = node
    if nodes[-1].args != (prev,):
        return None
    return out


def compile_stacked(model: nn.Module) -> StackedSequential | None:
    """A :class:`StackedSequential` for ``model``, or ``None`` if it is not supported.

    ``model`` is an ``nn.Sequential`` (nested ones included) or a module whose ``forward`` only
    chains submodules (``return self.layers(x)``; checked with a ``torch.fx`` trace).
    """
    if any(not p.requires_grad for p in model.parameters()) or any(True for _ in model.buffers()):
        return None
    leaves = _leaves(model, "") if isinstance(model, nn.Sequential) else _traced_chain(model)
    if leaves is None:
        return None
    ops: list[_Op] = []
    for prefix, mod in leaves:
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                return None
            ops.append(_Op("conv", mod, prefix))
        elif isinstance(mod, nn.Linear):
            ops.append(_Op("linear", mod, prefix))
        elif isinstance(mod, nn.Dropout) and mod.p == 0:
            continue
        elif isinstance(mod, _ELEMENTWISE):
            ops.append(_Op("map", mod, prefix))
        elif isinstance(mod, _POOL2D):
            ops.append(_Op("pool", mod, prefix))
        elif isinstance(mod, nn.Flatten):
            if mod.start_dim != 1 or mod.end_dim != -1:
                return None
            ops.append(_Op("flatten", mod, prefix))
        elif isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            if mod.dim not in (1, -1):
                return None
            ops.append(_Op("softmax", mod, prefix))
        else:
            return None
    if not any(op.kind in ("conv", "linear") for op in ops):
        return None
    return StackedSequential(tuple(ops))


class StackedSequential:
    """``m`` copies of a compiled ``nn.Sequential`` (see the module docstring).

    Call with ``(params, x)``: ``params`` maps the model's parameter names to stacked tensors
    ``(m, ...)``; ``x`` is ``(m, B, ...)``. Returns ``(m, B, ...)``. Raises ``ValueError`` for
    an input layout the compiled layers do not accept (the caller falls back to ``vmap``).
    """

    def __init__(self, ops: tuple[_Op, ...]) -> None:
        self.ops = ops

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        m, b = x.shape[0], x.shape[1]
        if x.ndim == 5:  # (m, B, C, H, W) -> grouped (B, m*C, H, W), channels-last
            h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
            h = h.contiguous(memory_format=torch.channels_last)
            grouped = True
        elif x.ndim == 3:
            h, grouped = x, False
        else:
            raise ValueError(f"stacked layers take (m, B, F) or (m, B, C, H, W), got {x.shape}")
        for op in self.ops:
            h, grouped = self._apply(op, params, h, grouped, m)
        if grouped:  # a network ending in convolutions: back to (m, B, C, H, W)
            h = h.reshape(b, m, -1, *h.shape[2:]).transpose(0, 1)
        return h

    @staticmethod
    def _apply(op: _Op, params: dict[str, torch.Tensor], h: torch.Tensor, grouped: bool,
               m: int) -> tuple[torch.Tensor, bool]:
        mod, p = op.module, op.prefix
        if op.kind == "conv":
            if not grouped:
                raise ValueError("Conv2d after a feature layer")
            w = params[p + "weight"]
            bias = params.get(p + "bias")
            out = F.conv2d(h, w.reshape(-1, *w.shape[2:]),
                           None if bias is None else bias.reshape(-1), stride=mod.stride,
                           padding=mod.padding, dilation=mod.dilation, groups=m * mod.groups)
            return out, True
        if op.kind == "linear":
            if grouped:
                raise ValueError("Linear on an image activation (add Flatten)")
            w = params[p + "weight"]
            bias = params.get(p + "bias")
            if bias is None:
                return torch.bmm(h, w.transpose(1, 2)), False
            return torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2)), False
        if op.kind == "flatten":
            if not grouped:
                return h, False
            b = h.shape[0]
            return h.reshape(b, m, -1, *h.shape[2:]).transpose(0, 1).reshape(m, b, -1), False
        if op.kind == "softmax":
            if grouped:
                raise ValueError("Softmax over an image activation")
            fn: Callable = F.softmax if isinstance(mod, nn.Softmax) else F.log_softmax
            return fn(h, dim=-1), False
        if op.kind == "pool" and not grouped:
            raise ValueError("2-D pooling on a feature activation")
        return mod(h), grouped
