"""The project's ResNet-18-style network and its training helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.resnet import (
    InputNorm,
    ResNet18,
    channel_stats,
    count_parameters,
    evaluate_accuracy,
    resnet_small,
    train_resnet,
)
from dvl_ooc.exceptions import InputError
from dvl_ooc.grads import ModelGradients


@pytest.mark.parametrize("stem,size", [("cifar", 32), ("cifar", 17), ("imagenet", 64)])
@pytest.mark.parametrize("n_classes,in_channels", [(2, 3), (5, 1)])
def test_forward_shapes(stem, size, n_classes, in_channels):
    model = resnet_small(n_classes, width=4, in_channels=in_channels, stem=stem).eval()
    out = model(torch.rand(3, in_channels, size, size))
    assert out.shape == (3, n_classes) and torch.isfinite(out).all()


def test_parameter_counts():
    assert count_parameters(ResNet18(2, 64)) == 11_169_858
    assert count_parameters(ResNet18(2, 64, stem="imagenet")) == 11_177_538  # torchvision's
    assert count_parameters(resnet_small()) == 175_882
    assert 0.7e6 < count_parameters(ResNet18(2, 16)) < 0.71e6
    assert 1.5e6 < count_parameters(ResNet18(2, 24)) < 1.6e6
    m = resnet_small(width=4)
    m.fc.weight.requires_grad_(False)
    assert count_parameters(m) == count_parameters(m, trainable_only=False) - m.fc.weight.numel()


def test_plain_module_names_and_batchnorm():
    model = resnet_small(width=4, stem="imagenet")
    names = dict(model.named_modules())
    for n in ["stem.conv", "stem.bn", "stem.pool", "layer1.0.conv1", "layer2.0.downsample.0",
              "layer2.0.downsample.1", "layer4.1.conv2", "layer4.1.bn2", "avgpool", "fc"]:
        assert n in names, n
    assert isinstance(names["layer2.0.downsample.0"], nn.Conv2d)
    assert isinstance(names["layer1.0.downsample"], nn.Identity)  # identity shortcut
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 1 + 4 * 2 * 2 + 3  # stem, two per block, three downsamples
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1 + 16 + 3


def test_seeded_init_and_eval_mode_determinism():
    a, b, c = (resnet_small(width=4, seed=s) for s in (0, 0, 1))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.fc.weight, c.fc.weight)
    model = a.eval()
    x = torch.rand(6, 3, 24, 24)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
        part = model(x[:2])
    assert torch.equal(y1, y2)
    torch.testing.assert_close(part, y1[:2])  # eval: a sample's output ignores the batch
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x)[:2], model(x[:2]))


def test_input_norm_is_buffers_only():
    model = resnet_small(width=4, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25])
    assert isinstance(model.norm, InputNorm)
    assert "norm.mean" in model.state_dict() and "norm.std" in model.state_dict()
    assert not any(n.startswith("norm") for n, _ in model.named_parameters())
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / \
        torch.tensor([0.2, 0.2, 0.25])[:, None, None]
    torch.testing.assert_close(model.norm(x), expected)
    with pytest.raises(InputError):
        InputNorm([0.5], [0.0])
    with pytest.raises(InputError):
        ResNet18(stem="vgg")


def test_channel_stats_skips_background():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 1.0, (10, 3, 6, 6)).astype(np.float32)
    x[:, :, :2] = 0.0  # background rows
    y = np.zeros(10, dtype=np.int64)
    mean, std = channel_stats((x, y), batch_size=3, background=0.0)
    fg = x[:, :, 2:].transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean, fg.mean(1), rtol=1e-5)
    np.testing.assert_allclose(std, fg.std(1), rtol=1e-4)
    mean_all, _ = channel_stats((x, y))
    np.testing.assert_allclose(mean_all, x.mean((0, 2, 3)), rtol=1e-5)


def test_train_resnet_learns_a_simple_rule():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (128, 3, 12, 12)).astype(np.float32)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).astype(np.int64)
    x[:, 0] += 0.3 * (2 * y[:, None, None] - 1)  # make the classes easy to separate
    model = resnet_small(width=4, seed=0)
    before = evaluate_accuracy(model, (x, y))
    seen = []  # the epoch hook: per-point losses at every epoch's end (a checkpoint)

    def losses(m):
        with torch.no_grad():
            return F.cross_entropy(m(torch.as_tensor(x)), torch.as_tensor(y),
                                   reduction="none").numpy()

    def hook(epoch, m):
        assert m is model and m.training  # handed over in training mode
        seen.append((epoch, losses(m.eval())))  # may switch to eval: put back by the loop

    train_resnet(model, (x, y), epochs=8, lr=1e-2, batch_size=32, flip_augment=True,
                 on_epoch_end=hook)
    assert not model.training
    assert evaluate_accuracy(model, (x, y)) >= max(0.9, before)
    assert [e for e, _ in seen] == list(range(1, 9))
    np.testing.assert_array_equal(seen[-1][1], losses(model))  # the last: the final weights
    assert seen[-1][1].mean() < seen[0][1].mean()


def test_per_sample_gradients_through_selected_layers():
    """The functional per-sample gradients run on the residual BatchNorm net in eval mode."""
    model = resnet_small(width=4, seed=0).eval()
    x, y = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 1])
    mg = ModelGradients(model, F.cross_entropy, layers=["layer4", "fc"], micro_batch_size=2)
    g = mg.per_sample_grads(x, y)
    p = sum(q.numel() for n, q in model.named_parameters() if n.startswith(("layer4", "fc")))
    assert g.shape == (3, p) and torch.isfinite(g).all()
    loss = F.cross_entropy(model(x[1:2]), y[1:2])
    ref = torch.autograd.grad(loss, model.fc.weight)[0].flatten()
    sizes = dict(model.named_parameters())
    start = sum(sizes[n].numel() for n in mg.param_names[:mg.param_names.index("fc.weight")])
    torch.testing.assert_close(g[1, start:start + ref.numel()], ref, rtol=1e-4, atol=1e-6)
