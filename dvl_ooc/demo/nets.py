"""Small reference networks for the 8x8 digits images and their training defaults."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsCNN", "DigitsMLP", "accuracy", "train_classifier"]


class DigitsCNN(nn.Module):
    """A ~6k-parameter CNN for (1, 8, 8) images: two conv blocks and two linear layers."""

    def __init__(self, n_classes: int = 10, width: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    """A small MLP on flattened 8x8 images."""

    def __init__(self, n_classes: int = 10, hidden: int = 16, in_features: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def train_classifier(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    epochs: int = 60,
    lr: float = 1e-2,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Module:
    """Train with Adam and cross-entropy on in-memory data; returns the model in eval mode.

    The loop of :func:`dvl_ooc.valuation.training.train_module` (seeded per-epoch shuffles,
    minibatches of ``batch_size``, L2 ``weight_decay``), with defaults for the demo networks.
    """
    from ..valuation.training import TrainingConfig, train_module

    cfg = TrainingConfig(epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, seed=seed)
    return train_module(model, x, y, cfg)


@torch.no_grad()
def accuracy(model: nn.Module, x: Any, y: Any) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``."""
    dtype = next(model.parameters()).dtype
    pred = model(torch.as_tensor(np.asarray(x)).to(dtype)).argmax(1)
    return float((pred == torch.as_tensor(np.asarray(y))).float().mean())
