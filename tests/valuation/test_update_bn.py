"""TrainingConfig(update_bn=True): BatchNorm running statistics recomputed after training."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dvl_ooc.valuation.training import TrainingConfig, train_module, update_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


def _data(n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)) * 3 + 1
    return x, (x[:, 0] > 1).astype(np.int64) + (x[:, 1] > 1)


def test_update_bn_gives_the_statistics_of_the_trained_layer_over_the_data():
    x, y = _data()
    cfg = TrainingConfig(epochs=5, lr=0.05, batch_size=len(x), update_bn=True)
    net = train_module(_net(), x, y, cfg)
    assert not net.training
    with torch.no_grad():
        h = net[0](torch.as_tensor(x)).numpy()  # the BatchNorm layer's input
    bn = net[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), h.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), h.var(0, ddof=1), rtol=1e-12)


def test_without_update_bn_the_running_statistics_lag_and_weights_are_the_same():
    x, y = _data()
    cfg = TrainingConfig(epochs=5, lr=0.05, batch_size=len(x))
    plain = train_module(_net(), x, y, cfg)
    updated = train_module(_net(), x, y, cfg.replace(update_bn=True))
    for (name, a), b in zip(plain.named_parameters(), updated.parameters()):
        assert torch.equal(a, b), name  # only buffers change
    with torch.no_grad():
        h = plain[0](torch.as_tensor(x)).numpy()
    assert not np.allclose(plain[1].running_mean.numpy(), h.mean(0), atol=1e-3)


def test_update_batchnorm_is_a_no_op_without_batchnorm_layers():
    net = nn.Sequential(nn.Linear(5, 3))
    assert update_batchnorm(net, torch.zeros(4, 5)) is False
