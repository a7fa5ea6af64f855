"""Single-layer problems for the tests of the per-layer registry, with an independent float64
reference: per-sample gradients by a Python loop of ``torch.autograd.grad`` calls.

(A helper module, not ``conftest.py``: a second ``conftest`` module would shadow
``tests/conftest.py`` for ``from conftest import rel_err``.)"""

from __future__ import annotations

import torch
from torch import nn

from dvl_ooc.layers import LayerCapture


class LayerProblem:
    """``layer`` applied to ``x`` with the per-sample loss ``l_i = sum(tanh(layer(x)_i) * C)``
    (``C`` a fixed random readout): captured raw rows and reference per-sample gradients."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
        self.layer = layer
        self.x = x
        with torch.no_grad():
            shape = layer(x[:1]).shape[1:]
        g = torch.Generator().manual_seed(seed)
        self.C = torch.randn(shape, generator=g, dtype=torch.float64)
        with LayerCapture(layer, [""], include_embeddings=True) as cap:
            self.losses(x).sum().backward()
        layer.zero_grad()
        self.a, self.g = cap.inputs[""], cap.output_grads[""]
        self.ref = self.reference(x)

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.layer(x)) * self.C).flatten(1).sum(1)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.layer.parameters()]  # (weight, bias) order
        rows = []
        for i in range(len(x)):
            li = self.losses(x[i : i + 1])[0]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, params)]))
        return torch.stack(rows)


def _conv(**kw):
    kw = {"kernel_size": 3, **kw}
    return nn.Conv2d(2, 3, **kw)


#: name -> (layer factory, input factory)
LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), lambda g: torch.randn(6, 5, generator=g)),
    "linear-seq-nobias": (lambda: nn.Linear(5, 4, bias=False),
                          lambda g: torch.randn(6, 3, 5, generator=g)),
    "linear-4d": (lambda: nn.Linear(3, 2), lambda g: torch.randn(5, 2, 3, 3, generator=g)),
    "conv-stride-pad": (lambda: _conv(stride=2, padding=1),
                        lambda g: torch.randn(5, 2, 7, 6, generator=g)),
    "conv-dilation-same-nobias": (lambda: _conv(padding="same", dilation=2, bias=False),
                                  lambda g: torch.randn(5, 2, 7, 7, generator=g)),
    "conv-rect": (lambda: _conv(kernel_size=(2, 3), stride=(1, 2), padding=(0, 2)),
                  lambda g: torch.randn(5, 2, 6, 7, generator=g)),
    "conv-rect-dilated-valid": (lambda: _conv(kernel_size=(3, 2), dilation=(1, 2),
                                              stride=(2, 1), padding="valid"),
                                lambda g: torch.randn(5, 2, 8, 6, generator=g)),
    "embedding-padding": (lambda: nn.Embedding(7, 3, padding_idx=2),
                          lambda g: torch.randint(0, 7, (6, 5), generator=g)),
    "embedding": (lambda: nn.Embedding(4, 3), lambda g: torch.randint(0, 4, (6, 2, 3),
                                                                       generator=g)),
}


def make_problem(name: str, seed: int = 0) -> LayerProblem:
    make_layer, make_x = LAYERS[name]
    torch.manual_seed(seed)
    layer = make_layer().double()
    x = make_x(torch.Generator().manual_seed(seed + 1))
    if x.is_floating_point():
        x = x.double()
    elif isinstance(layer, nn.Embedding) and layer.padding_idx is not None:
        x[0, :2] = layer.padding_idx  # some padding positions (no gradient)
    return LayerProblem(layer, x, seed)

