"""LayerCapture: per-sample layer gradients of whole models, layer selection, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_grads
from torch import nn

from dvl_ooc.exceptions import InputError, UnsupportedModelError
from dvl_ooc.layers import LayerCapture


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1, dilation=1)
        self.conv2 = nn.Conv2d(3, 2, 2, stride=1, padding="valid", bias=False)
        self.fc = nn.Linear(2 * 3 * 3, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv(x)))).flatten(1))


class _SeqModel(nn.Module):
    """Embedding -> Linear on (n, T, d) -> mean over T -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 5, padding_idx=0)
        self.proj = nn.Linear(5, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, idx):
        return self.out(torch.tanh(self.proj(self.emb(idx))).mean(1))


def _digits(digits, n):
    return torch.as_tensor(digits.x_train[:n]).double(), torch.as_tensor(digits.y_train[:n])


def test_layer_capture_gives_per_sample_layer_gradients(digits):
    torch.manual_seed(0)
    model = _ConvNet().double()
    x, y = _digits(digits, 9)
    ref = ref_grads(model, F.cross_entropy, x, y)
    with LayerCapture(model) as cap:
        (F.cross_entropy(model(x), y) * len(x)).backward()
    got = torch.cat([cap.per_sample_grads(n) for n in ["conv", "conv2", "fc"]], dim=1)
    assert rel_err(got, ref) < 1e-12
    assert cap.input_matrix("conv").shape == (9, 16, 10)  # 4x4 positions, 3*3 patch + bias
    assert cap.output_grad_matrix("conv2").shape == (9, 9, 2)
    assert cap.calls == {"conv": 1, "conv2": 1, "fc": 1}
    # hooks are removed on exit
    assert not cap._handles
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_capture_selects_layers(digits):
    torch.manual_seed(0)
    model = _ConvNet().double()
    x, y = _digits(digits, 5)
    ref = ref_grads(model, F.cross_entropy, x, y)
    with LayerCapture(model, layers=["fc"]) as cap:
        (F.cross_entropy(model(x), y) * len(x)).backward()
    assert list(cap.inputs) == ["fc"] and list(cap.output_grads) == ["fc"]
    assert rel_err(cap.per_sample_grads("fc"), ref[:, -(18 * 10 + 10):]) < 1e-12


def test_layer_capture_embedding_per_sample_grads():
    """Embedding layers with include_embeddings=True (scatter of output-gradient rows)."""
    torch.manual_seed(0)
    model = _SeqModel().double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 12, (5, 9), generator=g), torch.randint(0, 4, (5,), generator=g)
    x[0, :3] = 0  # padding positions get no gradient
    ref = ref_grads(model, F.cross_entropy, x, y)
    with LayerCapture(model, include_embeddings=True) as cap:
        (F.cross_entropy(model(x), y) * len(x)).backward()
    got = torch.cat([cap.per_sample_grads(n) for n in ["emb", "proj", "out"]], dim=1)
    assert rel_err(got, ref) < 1e-12
    assert torch.equal(cap.input_matrix("emb"), x)
    with pytest.raises(UnsupportedModelError, match="include_embeddings"):
        LayerCapture(model, ["emb"])


def test_layer_capture_rejects_unsupported_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        LayerCapture(model, ["1"])
    with pytest.raises(InputError, match="no module named"):
        LayerCapture(model, ["fc9"])
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2))
    with pytest.raises(UnsupportedModelError, match="groups"), LayerCapture(conv) as cap:
        conv(torch.randn(1, 2, 5, 5))
        cap.input_matrix("0")


def test_output_grads_false_records_forward_only(digits):
    """output_grads=False: no tensor hooks on the outputs; differentiating the kept outputs
    gives the output gradients the hooks would have recorded."""
    torch.manual_seed(0)
    model = _ConvNet().double()
    x, y = _digits(digits, 6)
    with LayerCapture(model, keep_outputs=True) as hooked:
        total = F.cross_entropy(model(x), y) * len(x)
        assert all(o._backward_hooks for o in hooked.outputs.values())
        total.backward()
    with LayerCapture(model, keep_outputs=True, output_grads=False) as cap:
        total = F.cross_entropy(model(x), y) * len(x)
    assert cap.calls == {"conv": 1, "conv2": 1, "fc": 1}
    assert all(not o._backward_hooks for o in cap.outputs.values())
    names = list(cap.outputs)
    gs = torch.autograd.grad(total, [cap.outputs[n] for n in names])
    assert not cap.output_grads  # nothing recorded by the backward
    for n, g in zip(names, gs):
        assert torch.equal(g, hooked.output_grads[n])
        assert torch.equal(cap.inputs[n], hooked.inputs[n])


def test_modules_keyword_is_deprecated(digits):
    model = _ConvNet().double()
    x, y = _digits(digits, 3)
    with pytest.warns(DeprecationWarning, match="modules= is deprecated, use layers="):
        cap = LayerCapture(model, modules=["fc"])
    with cap:
        (F.cross_entropy(model(x), y) * len(x)).backward()
    assert list(cap.modules) == ["fc"] and cap.per_sample_grads("fc").shape == (3, 190)
    with pytest.raises(InputError, match="layers= only"):
        LayerCapture(model, ["fc"], modules=["fc"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        LayerCapture(model, module=["fc"])
