"""The grouped layers of ``dvl_ooc.valuation.stacked`` equal ``vmap`` over ``functional_call``.

Reference: ``torch.func.vmap`` of the module itself over the same stacked parameters (float64),
for outputs and for parameter gradients; and ``TorchBatchUtility(grouped_layers=False)`` (the
vmap path) for whole trainings and scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from dvl_ooc.valuation import TorchBatchUtility, TrainingConfig
from dvl_ooc.valuation.stacked import compile_stacked


def _tutorial_cnn():  # pyDVL's tutorial SimpleCNN (no activations, softmax output), nested
    return nn.Sequential(nn.Sequential(
        nn.Conv2d(1, 8, 5, padding="same"), nn.Conv2d(8, 4, (3, 3), padding="same"),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1)))


def _strided_cnn():  # stride, dilation, groups, no bias, average pools, log-softmax
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(6, 4, 2, dilation=2, groups=2), nn.Tanh(), nn.AvgPool2d(1),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(16, 7), nn.GELU(),
        nn.Dropout(0.0), nn.Linear(7, 5), nn.LogSoftmax(-1))


def _even_same():  # asymmetric "same" padding
    return nn.Sequential(nn.Conv2d(1, 3, 4, padding="same"), nn.Conv2d(3, 2, 1),
                         nn.Flatten(), nn.Linear(2 * 36, 4))


def _mlp():
    return nn.Sequential(nn.Linear(9, 6), nn.Sigmoid(), nn.Linear(6, 3, bias=False))


def _conv_only():  # ends in an image activation: output (m, B, C, H, W)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))


CASES = [(_tutorial_cnn, (1, 8, 8)), (lambda: _Chain(), (1, 8, 8)), (_strided_cnn, (2, 9, 9)),
         (_even_same, (1, 6, 6)), (_mlp, (9,)), (_conv_only, (3, 7, 7))]
IDS = ["tutorial", "chain", "strided", "even-same", "mlp", "conv"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("make", "shape"), CASES, ids=IDS)
def test_grouped_layers_equal_vmap_in_values_and_gradients(make, shape):
    torch.manual_seed(0)
    model = make().double()
    stacked = compile_stacked(model)
    assert stacked is not None
    m, b = 3, 5
    params = {k: torch.randn(m, *v.shape, dtype=torch.float64, requires_grad=True)
              for k, v in model.named_parameters()}
    x = torch.randn(m, b, *shape, dtype=torch.float64)

    def f(p, xb):
        return functional_call(model, p, (xb,))

    ref = vmap(f)(params, x)
    out = stacked(params, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(ref.shape, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * w).sum(), list(params.values()))
    g_out = torch.autograd.grad((out * w).sum(), list(params.values()))
    for a, r in zip(g_out, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


class _Residual(nn.Module):  # not a chain of submodule calls
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + x


class _Chain(nn.Module):  # pyDVL's SimpleCNN style: forward only calls self.layers
    def __init__(self):
        super().__init__()
        self.layers = _tutorial_cnn()
        self.head = nn.Identity()

    def forward(self, x):
        return self.head(self.layers(x))


def _frozen():
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)
    return net


@pytest.mark.parametrize("make", [
    _Residual,  # forward is not a chain of submodule calls
    _frozen,  # a frozen parameter
    lambda: nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=0)),  # softmax over the batch
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
    lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)),  # a layer it does not know
    lambda: nn.Sequential(nn.Flatten(0), nn.Linear(4, 3)),
    lambda: nn.Sequential(nn.ReLU()),  # nothing to train
], ids=["residual", "frozen", "softmax0", "reflect", "layernorm", "flatten0", "no-params"])
def test_unsupported_models_are_left_to_vmap(make):
    assert compile_stacked(make()) is None


def test_layouts_the_grouped_layers_do_not_take_raise_value_error():
    net = nn.Sequential(nn.Linear(4, 3))
    st = compile_stacked(net)
    p = {k: v.detach().unsqueeze(0) for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match="stacked layers take"):
        st(p, torch.zeros(1, 2, 3, 4))  # (m, B, 3, 4): neither features nor images
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    pc = {k: v.detach().unsqueeze(0) for k, v in conv.named_parameters()}
    with pytest.raises(ValueError, match="Conv2d after a feature layer"):
        compile_stacked(conv)(pc, torch.zeros(1, 2, 9))


def test_utility_trains_and_scores_the_same_with_and_without_grouped_layers(digits):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(64, 10))
    x, y = digits.x_train[:60].astype(np.float64), digits.y_train[:60]
    test = (digits.x_test[:50].astype(np.float64), digits.y_test[:50])
    cfg = TrainingConfig(epochs=2, lr=0.05, batch_size=16, seed=1)
    kw = dict(config=cfg, dtype=torch.float64, models_per_pass=3)
    fast = TorchBatchUtility(model, test, **kw).with_data(x, y)
    slow = TorchBatchUtility(model, test, grouped_layers=False, **kw).with_data(x, y)
    assert fast._stacked is not None and slow._stacked is None
    masks = np.random.default_rng(0).random((4, 60)) < np.array([0.9, 0.5, 0.3, 0.7])[:, None]
    pf, ps = fast.train(masks), slow.train(masks)
    for k in pf:
        torch.testing.assert_close(pf[k], ps[k], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(fast.evaluate_many(masks), slow.evaluate_many(masks))


def test_a_layout_error_falls_back_to_vmap():
    # (m, B, 2, 4) rows: Linear takes them (vmap), the grouped layers do not (ValueError)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    u = TorchBatchUtility(net, (x, torch.zeros(6)), dtype=torch.float64)
    assert u._stacked is not None
    params = {k: torch.randn(3, *v.shape, dtype=torch.float64)
              for k, v in net.named_parameters()}
    xb = torch.randn(3, 5, 2, 4, dtype=torch.float64)
    out = u._forward(u._meta)(params, xb)
    ref = vmap(lambda p, xx: functional_call(net, p, (xx,)))(params, xb)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

