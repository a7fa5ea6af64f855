"""``nn.Conv2d`` (``groups=1``, zero padding): ``A_i`` are the unfolded input patches,
``L`` = output pixels. Per-sample gradients and directional derivatives avoid the ``im2col``
buffer where they can (a grouped-convolution weight-gradient kernel; a convolution with ``W``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerKind, register_kind

__all__ = ["Conv2dKind"]


@register_kind
class Conv2dKind(LayerKind):
    module_type = nn.Conv2d

    def check(self, module: nn.Module, name: str | None = None) -> None:
        if module.groups != 1:
            raise self._fail(name, f"Conv2d with groups={module.groups} is not supported "
                                   "(groups > 1; only groups=1)")
        self.padding(module, name)

    def padding(self, module: nn.Module, name: str | None = None) -> tuple[int, int]:
        """Explicit ``(pad_h, pad_w)`` of a zero-padded convolution (``"same"`` resolved)."""
        if module.padding_mode != "zeros":
            raise self._fail(name, f"Conv2d with padding_mode={module.padding_mode!r} is not "
                                   "supported; use 'zeros'")
        pad = module.padding
        if isinstance(pad, str):
            if pad == "valid":
                return (0, 0)
            k, d = module.kernel_size, module.dilation
            if any((d[i] * (k[i] - 1)) % 2 for i in range(2)):
                raise self._fail(name, "Conv2d with padding='same' and an even receptive "
                                       "field is not supported")
            return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        return tuple(pad)  # type: ignore[return-value]

    def input_matrix(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        self.check(module)
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation,
                        padding=self.padding(module), stride=module.stride)
        A = cols.transpose(1, 2)
        if self.has_bias(module):
            A = torch.cat([A, torch.ones_like(A[..., :1])], dim=-1)
        return A

    def output_grad_matrix(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g.flatten(2).transpose(1, 2)

    def raw_dims(self, module: nn.Module, a: torch.Tensor,
                 g: torch.Tensor) -> tuple[int, int, int]:
        kh, kw = module.kernel_size
        return (g.shape[2] * g.shape[3], module.in_channels * kh * kw + int(self.has_bias(module)),
                g.shape[1])

    def per_sample_grads(self, module: nn.Module, a: torch.Tensor,
                         g: torch.Tensor) -> torch.Tensor:
        """On CPU the weight-gradient kernel of a grouped convolution with one group per sample
        (no ``im2col`` buffer; 1.3-2.4x faster than ``unfold`` + ``bmm`` on the 32x32 CNN of
        ``benchmarks/bench_inrun.py``); elsewhere ``unfold`` + ``bmm``."""
        self.check(module)
        n = a.shape[0]
        pad = self.padding(module)
        G = g.flatten(2)  # (n, d_out, L)
        if a.device.type == "cpu":
            w = module.weight
            shape = w.new_zeros(()).expand(n * w.shape[0], *w.shape[1:])  # sizes only, no data
            Wg = torch.ops.aten.convolution_backward(
                g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), shape, None,
                module.stride, pad, module.dilation, False, [0, 0], n, [False, True, False])[1]
            parts = [Wg.reshape(n, -1)]
        else:
            U = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=pad,
                         stride=module.stride)  # (n, d_in k^2, L)
            parts = [torch.bmm(G, U.transpose(1, 2)).reshape(n, -1)]
        if module.bias is not None:
            parts.append(G.sum(2))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def param_grads(self, module: nn.Module, a: torch.Tensor,
                    g: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check(module)
        out = {"weight": torch.nn.grad.conv2d_weight(
            a, module.weight.shape, g, module.stride, self.padding(module), module.dilation,
            module.groups)}
        if module.bias is not None:
            out["bias"] = g.sum((0, 2, 3))
        return out

    def dot_with_param_vector(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                              W: dict[str, torch.Tensor]) -> torch.Tensor:
        """A convolution of the inputs with ``W`` (no ``im2col``)."""
        self.check(module)
        Ww, Wb = W["weight"], W.get("bias")
        z = F.conv2d(a, Ww, None, module.stride, self.padding(module), module.dilation,
                     module.groups)
        # in place: z is ours, and a second output-sized temporary costs page faults on CPU
        s = z.mul_(g).sum((1, 2, 3))
        if Wb is not None:
            s = s + g.sum((2, 3)) @ Wb
        return s

    def project(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor,
                P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
        """``(n, k_out, k_in)`` without unfolding: ``P_in a_l`` at every output pixel is a
        convolution of the input with ``P_in`` as ``k_in`` filters (its last column the bias),
        ``P_out g_l`` a product over the output channels, then one ``bmm`` over the pixels.
        Temporaries ``n L (k_in + k_out)``."""
        self.check(module)
        bias = self._projected_bias(module, P_in)
        k_in, d_in = P_in.shape[0], P_in.shape[1] - int(bias)
        filters = P_in[:, :d_in].reshape(k_in, module.in_channels, *module.kernel_size)
        Ap = F.conv2d(a, filters, P_in[:, d_in] if bias else None, module.stride,
                      self.padding(module), module.dilation)  # (n, k_in, H', W')
        Gp = P_out @ g.flatten(2)  # (n, k_out, L)
        return torch.bmm(Gp, Ap.flatten(2).transpose(1, 2))
