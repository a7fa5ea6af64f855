"""A ResNet-18-style network defined in the project (torchvision's wheel does not load with the
CPU torch build used here), and a training loop over image Datasets.

Layout (``width=64`` is torchvision's ``resnet18``)::

    norm                         optional per-channel input normalisation (buffers only)
    stem.conv, stem.bn, stem.relu[, stem.pool]
    layer1 .. layer4             2 BasicBlocks each, widths w, 2w, 4w, 8w (strides 1, 2, 2, 2)
      layerK.B.conv1 / bn1 / conv2 / bn2 [/ downsample.0 (1x1 conv) / downsample.1 (BN)]
    avgpool                      adaptive average pooling to 1x1
    fc                           linear head

so layers are selected by plain names, e.g. ``layers=["layer4", "fc"]``. ``stem="cifar"`` is a
3x3 stride-1 conv (for inputs of ~32-64 px); ``stem="imagenet"`` a 7x7 stride-2 conv and a 3x3
stride-2 max-pool (4x less resolution, ~10x cheaper at 64x64).

Parameter counts at ``n_classes=2`` (cifar stem; imagenet stem adds ``(49 - 9) * 3 * width``):
width 64: 11,169,858; 32: 2,795,554; 24: 1,573,658; 16: 700,434; 8: 175,882. With the
imagenet stem and width 64 it is torchvision's ``resnet18(num_classes=2)``: 11,177,538.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import InputError
from ..seeding import torch_generator
from ..training import FitConfig, fit_network, make_loader

__all__ = ["RESNET_CONFIG", "BasicBlock", "InputNorm", "ResNet18", "channel_stats",
           "count_parameters", "evaluate_accuracy", "resnet_small", "train_resnet"]

#: :func:`train_resnet`'s schedule (its keywords fill in epochs, lr, batch size, weight decay,
#: seed and flips): AdamW, one-cycle with 15 % warm-up, torch's DataLoader shuffle, last
#: smaller batch dropped
RESNET_CONFIG = FitConfig(epochs=10, lr=2e-3, batch_size=64, weight_decay=5e-4,
                          optimizer="adamw", schedule="one-cycle", warmup=0.15,
                          order="dataloader", drop_last=True, flip=True)


class InputNorm(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean`` and ``std`` as buffers (no parameters,
    so they are saved in checkpoints and never enter influence computations)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m = torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(1, -1, 1, 1)
        s = torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(1, -1, 1, 1)
        if m.shape != s.shape or bool((s <= 0).any()):
            raise InputError("mean and std need one value per channel, std > 0")
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, ReLU after the first and after the residual sum; the shortcut
    is the identity or, when the shape changes, a 1x1 conv + BatchNorm (``downsample``)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNet18(nn.Module):
    """ResNet-18 layout with 4 stages of 2 :class:`BasicBlock` (see the module docstring).

    Args:
        n_classes: outputs of the linear head.
        width: channels of the stem and first stage (64 = the standard ResNet-18, ~11.2 M
            parameters; 16-24: 0.7-1.6 M).
        in_channels: image channels.
        stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7 stride-2 conv + max-pool).
        mean, std: optional per-channel input normalisation (an :class:`InputNorm` ``norm``).
        seed: initialise the weights from this seed (default: torch's global generator).
        zero_init_residual: zero each block's last BatchNorm weight (blocks start as identity).
    """

    def __init__(
        self,
        n_classes: int = 2,
        width: int = 64,
        in_channels: int = 3,
        stem: Literal["cifar", "imagenet"] = "cifar",
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise InputError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if width < 1 or n_classes < 1 or in_channels < 1:
            raise InputError("width, n_classes and in_channels must be positive")
        self.n_classes, self.width, self.stem_kind = n_classes, width, stem
        self.norm: nn.Module = nn.Identity()
        if mean is not None or std is not None:
            self.norm = InputNorm(mean if mean is not None else [0.0] * in_channels,
                                  std if std is not None else [1.0] * in_channels)
        k, s, p = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        parts: list[tuple[str, nn.Module]] = [
            ("conv", nn.Conv2d(in_channels, width, k, stride=s, padding=p, bias=False)),
            ("bn", nn.BatchNorm2d(width)), ("relu", nn.ReLU())]
        if stem == "imagenet":
            parts.append(("pool", nn.MaxPool2d(3, stride=2, padding=1)))
        self.stem = nn.Sequential(OrderedDict(parts))
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            blocks = nn.Sequential(BasicBlock(c, width * mult, stride),
                                   BasicBlock(width * mult, width * mult))
            self.add_module(f"layer{i + 1}", blocks)
            c = width * mult
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)
        self._init(seed, zero_init_residual)

    def _init(self, seed: int | None, zero_init_residual: bool) -> None:
        g = None if seed is None else torch_generator(seed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu",
                                        generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / float(np.sqrt(m.in_features))
                nn.init.uniform_(m.weight, -bound, bound, generator=g)
                nn.init.uniform_(m.bias, -bound, bound, generator=g)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.norm(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def extra_repr(self) -> str:
        return f"width={self.width}, stem={self.stem_kind!r}, n_classes={self.n_classes}"


def resnet_small(n_classes: int = 2, width: int = 8, **kwargs: Any) -> ResNet18:
    """A narrow :class:`ResNet18` for tests (``width=8``: 175,882 parameters at 2 classes)."""
    return ResNet18(n_classes=n_classes, width=width, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _loader(data: Any, batch_size: int, shuffle: bool, seed: int, num_workers: int) -> Any:
    """A DataLoader over a Dataset or an ``(x, y)`` pair (:func:`dvl_ooc.training.make_loader`)."""
    return make_loader(data, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers)


def train_resnet(
    model: nn.Module,
    data: Any,
    *,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    seed: int = 0,
    num_workers: int = 0,
    flip_augment: bool = True,
    progress: bool = False,
    on_epoch_end: Callable[[int, nn.Module], Any] | None = None,
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], Any] | None = None,
) -> nn.Module:
    """Train with AdamW, a one-cycle learning-rate schedule (peak ``lr`` after 15 % of the
    steps, then a cosine decay) and cross-entropy; returns the model in eval mode (BatchNorm
    uses its running statistics from then on). The loop is :func:`dvl_ooc.training.fit_network`
    with :data:`RESNET_CONFIG` and these settings.

    ``data`` is a ``Dataset`` of ``(image, label)`` (e.g. :class:`dvl_ooc.data.ImageFolder`
    or a ``Subset`` of it; files are decoded by ``num_workers`` loader processes) or an
    ``(x, y)`` pair. ``flip_augment`` flips each batch horizontally/vertically at random
    (seeded). The shuffling order and augmentations depend only on ``seed``.

    ``on_epoch_end(epoch, model)`` (optional; ``epoch`` counts from 1) is called after every
    epoch, e.g. to record per-point training losses at checkpoints; the model is handed over
    as it is (training mode) and put back into training mode afterwards, so the callback may
    switch it to eval mode but must not change its weights.

    ``backward(x, y, idx, lr)`` (optional) replaces ``F.cross_entropy(model(x), y).backward()``
    at every step, with ``idx`` the batch's positions in ``data`` and ``lr`` the step's learning
    rate: e.g. :meth:`dvl_ooc.inrun.InRunShapley.step`, to value every training sample while
    the network trains. Batches, their order and flips are those of plain training.
    """
    cfg = RESNET_CONFIG.replace(epochs=epochs, lr=lr, batch_size=batch_size,
                                weight_decay=weight_decay, seed=seed, flip=flip_augment)
    hook = None if on_epoch_end is None else (lambda epoch, net, _lr: on_epoch_end(epoch, net))
    return fit_network(model, data, cfg, backward=backward, on_epoch_end=hook,
                       num_workers=num_workers, progress=progress)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: Any, *, batch_size: int = 256,
                      num_workers: int = 0) -> float:
    """Accuracy of ``model`` (in eval mode) on a Dataset or an ``(x, y)`` pair."""
    model.eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    hit = n = 0
    for xb, yb in _loader(data, batch_size, False, 0, num_workers):
        pred = model(xb.to(device, dtype)).argmax(1).cpu()
        hit += int((pred == yb).sum())
        n += len(yb)
    return hit / max(n, 1)


def channel_stats(data: Any, *, batch_size: int = 256, num_workers: int = 0,
                  background: float | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the images of a Dataset (or ``(x, y)``),
    for :class:`ResNet18`'s ``mean``/``std``. With ``background`` set, pixels whose channels
    all equal it (e.g. ``0.0``: the black surround of segmented cells) are left out."""
    s = s2 = cnt = None
    for xb, _ in _loader(data, batch_size, False, 0, num_workers):
        x = xb.double().transpose(0, 1).flatten(1)  # (C, pixels)
        if background is not None:
            x = x[:, ~(x == background).all(0)]
        s = x.sum(1) if s is None else s + x.sum(1)
        s2 = (x * x).sum(1) if s2 is None else s2 + (x * x).sum(1)
        cnt = x.shape[1] if cnt is None else cnt + x.shape[1]
    if not cnt:
        raise InputError("no pixels to compute channel statistics from")
    mean = s / cnt
    std = (s2 / cnt - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
