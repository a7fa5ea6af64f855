r"""The library's one training loop: :func:`fit_network`, driven by a :class:`FitConfig`.

Every network the package trains goes through it, each trainer a config and a few hooks:

- :func:`dvl_ooc.demo.resnet.train_resnet` (the image recipe and its LDS retraining): AdamW,
  one-cycle schedule, the ``"dataloader"`` order with ``drop_last``, flips, In-Run Shapley as
  the ``backward`` hook, per-point losses at checkpoints as the epoch hook;
- :func:`dvl_ooc.valuation.training.train_module` (valuation utilities, LDS ground truth):
  Adam or SGD at a constant rate, the ``"seeded"`` order (the stacked trainer's), ``update_bn``;
- the digits demo (``dvl_ooc.demo.run``): Adam, cosine schedule, the ``"randperm"`` order,
  TracIn checkpoints (:class:`Checkpoints`).

One step: take the next minibatch ``(x, y, idx)`` of the epoch's order (``idx``: the samples'
positions in ``data``), move it to the model's device and dtype, flip it at random
(``flip``), ``zero_grad``, then ``loss(model(x), y).backward()`` -- or the ``backward(x, y,
idx, lr)`` hook instead, with ``lr`` the step's learning rate (In-Run Shapley plugs in here:
:meth:`dvl_ooc.inrun.InRunShapley.step`) -- then one optimiser step and one scheduler step.
After every epoch ``on_epoch_end(epoch, model, lr)`` (``epoch`` from 1, ``lr`` the mean
learning rate of its steps: TracIn's weight, see :class:`Checkpoints`); per-point loss
recording plugs in there too.

Data orders (all seeded by ``seed`` alone; three of them reproduce the streams of the trainers
the loop replaced, bit for bit):

- ``"seeded"``: epoch ``e`` (from 1) visits ``numpy_rng(seed, e - 1).permutation(n)``
  (:func:`dvl_ooc.seeding.numpy_rng`): every epoch's order is independent of the others, so the
  stacked trainer (:class:`~dvl_ooc.valuation.TorchBatchUtility`) reproduces it per model;
- ``"randperm"``: ``torch.randperm(n)`` per epoch from one ``torch.Generator().manual_seed(seed)``;
- ``"dataloader"``: a ``torch.utils.data.DataLoader`` with ``shuffle=True`` and
  ``generator=torch_generator(seed)`` (torch's sampler and its worker seeding);
- ``"none"``: index order.

Minibatches are cut from the order in steps of ``batch_size``, the last one smaller unless
``drop_last`` (which never drops the only batch: BatchNorm needs more than one sample). An
``(x, y)`` pair is indexed where it lives (a NumPy array on the CPU without a copy; pass tensors
on the device to keep everything there); a ``Dataset`` of ``(input, label)`` is read by a
DataLoader with ``num_workers`` processes.

Cost: ``epochs * steps_per_epoch(n)`` forward/backward passes of ``batch_size`` samples, plus
one no-grad pass over the data with ``update_bn``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .exceptions import InputError, NoTrainableParametersError
from .seeding import numpy_rng, torch_generator

__all__ = ["Checkpoints", "FitConfig", "checkpoint_epochs", "fit_network", "seeded_order",
           "update_batchnorm"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "one-cycle")
ORDERS = ("seeded", "randperm", "dataloader", "none")

#: ``backward(x, y, idx, lr)``: replaces ``loss(model(x), y).backward()`` at every step
BackwardHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], Any]
#: ``on_epoch_end(epoch, model, lr)``: after every epoch (from 1), ``lr`` its mean learning rate
EpochHook = Callable[[int, nn.Module, float], Any]


def seeded_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Positions ``0..n-1`` in the order of 0-based epoch ``epoch`` of the ``"seeded"`` order."""
    return numpy_rng(seed, epoch).permutation(n)


@dataclass(frozen=True)
class FitConfig:
    """How :func:`fit_network` trains (see the module docstring).

    Attributes:
        epochs: passes over the data (>= 1).
        lr: learning rate (the peak rate of ``"one-cycle"``, the initial one of ``"cosine"``).
        batch_size: minibatch size.
        weight_decay: Adam/SGD: L2 penalty added to the gradient; AdamW: decoupled decay.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (plain gradient descent).
        schedule: ``"constant"``; ``"cosine"``: ``CosineAnnealingLR`` from ``lr`` to 0 over all
            steps; ``"one-cycle"``: ``OneCycleLR`` with peak ``lr`` after a ``warmup`` fraction
            of the steps (from ``lr / 25`` to ``lr / 25e4``; with Adam/AdamW it also cycles
            ``beta1`` between 0.95 and 0.85, torch's default). Stepped once per minibatch.
        warmup: ``"one-cycle"``: the fraction of steps with a rising rate (``pct_start``).
        seed: seed of the data order and of the flips.
        order: ``"seeded"``, ``"randperm"``, ``"dataloader"`` or ``"none"`` (module docstring).
        drop_last: drop the last, smaller minibatch of every epoch (unless it is the only one).
        flip: flip each minibatch horizontally and vertically, each with probability 1/2, from
            the stream ``torch_generator(seed, 1)`` (two uniforms per step).
        betas, eps: Adam's and AdamW's constants.
        update_bn: after the last epoch, recompute the running statistics of every BatchNorm
            layer as the average over the data's minibatches in index order (one no-grad
            pass, :func:`update_batchnorm`).
        foreach: torch's ``foreach`` option of the optimiser (``None``: torch's default, the
            multi-tensor kernels on GPUs; on the CPU every choice gives the same numbers).
    """

    epochs: int = 10
    lr: float = 1e-2
    batch_size: int = 128
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup: float = 0.15
    seed: int = 0
    order: str = "seeded"
    drop_last: bool = False
    flip: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    update_bn: bool = False
    foreach: bool | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or (name != "seed" and v < 1):
                raise InputError(f"{name} must be a{' positive' if name != 'seed' else 'n'} "
                                 f"integer, got {v!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise InputError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr!r}, "
                             f"weight_decay={self.weight_decay!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("order", ORDERS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not 0 < self.warmup < 1:
            raise InputError(f"warmup must be in (0, 1), got {self.warmup!r}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not self.eps > 0:
            raise InputError(f"betas must be in [0, 1) and eps > 0, got {self.betas}, {self.eps}")
        for name, cast in (("epochs", int), ("batch_size", int), ("seed", int), ("lr", float),
                           ("weight_decay", float), ("warmup", float), ("eps", float),
                           ("drop_last", bool), ("flip", bool), ("update_bn", bool)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        object.__setattr__(self, "betas", (float(b1), float(b2)))
        if self.foreach is not None:
            object.__setattr__(self, "foreach", bool(self.foreach))

    def replace(self, **changes: Any) -> FitConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def steps_per_epoch(self, n: int) -> int:
        """Optimiser steps per epoch over ``n`` samples."""
        n = int(n)
        return n // self.batch_size if self.drop_last and n > self.batch_size else \
            -(-n // self.batch_size)


class Checkpoints:
    """An ``on_epoch_end`` hook that keeps ``(state_dict copy, mean learning rate)`` after the
    chosen epochs (all by default) in :attr:`saved` (or the list ``into``): the checkpoints of
    :class:`~dvl_ooc.influence.TracInCP` and their weights."""

    def __init__(self, epochs: Iterable[int] | None = None, into: list | None = None) -> None:
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.saved: list[tuple[dict[str, torch.Tensor], float]] = [] if into is None else into

    def __call__(self, epoch: int, model: nn.Module, lr: float) -> None:
        if self.epochs is None or epoch in self.epochs:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.saved.append((state, float(lr)))


def checkpoint_epochs(epochs: int, n: int = 5) -> set[int]:
    """Up to ``n`` evenly spaced epochs (from 1), the last one included."""
    if epochs < 1:
        return set()
    return {int(e) for e in np.unique(np.linspace(1, epochs, min(n, epochs)).round())}


class _Indexed:
    """A Dataset whose items are ``(*data[i], i)``."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return (*self.data[i], i)


def _is_dataset(data: Any) -> bool:
    from torch.utils.data import Dataset

    return isinstance(data, Dataset)


def _as_tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def make_loader(data: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False, indexed: bool = False,
                batch_sampler: Any = None) -> Any:
    """A DataLoader over a Dataset or an ``(x, y)`` pair of arrays/tensors; ``shuffle`` draws
    from ``torch_generator(seed)``, ``drop_last`` never drops the only batch, ``indexed`` adds
    the samples' positions in ``data`` to every batch (the order is the same), a
    ``batch_sampler`` replaces ``batch_size``/``shuffle``/``drop_last``."""
    from torch.utils.data import DataLoader, TensorDataset

    if not _is_dataset(data):
        x, y = data
        data = TensorDataset(torch.as_tensor(np.asarray(x)),
                             torch.as_tensor(np.asarray(y)).long(),
                             *([torch.arange(len(x))] if indexed else []))
    elif indexed:
        data = _Indexed(data)
    workers = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    if batch_sampler is not None:  # its own generator: the global torch stream stays untouched
        return DataLoader(data, batch_sampler=batch_sampler,
                          generator=torch_generator(seed, 2), **workers)
    g = torch_generator(seed) if shuffle else None
    drop_last = drop_last and len(data) > batch_size  # BatchNorm: no training batch of size 1
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g,
                      drop_last=drop_last, **workers)


class _Order:
    """The index order of every epoch (all orders but ``"dataloader"``)."""

    def __init__(self, cfg: FitConfig, n: int) -> None:
        self.cfg, self.n = cfg, n
        self.g = torch.Generator().manual_seed(cfg.seed) if cfg.order == "randperm" else None
        self.epoch = 1

    def __call__(self, epoch: int) -> torch.Tensor:
        if self.cfg.order == "seeded":
            return torch.as_tensor(seeded_order(self.cfg.seed, epoch - 1, self.n))
        if self.cfg.order == "randperm":
            return torch.randperm(self.n, generator=self.g)
        return torch.arange(self.n)

    def slices(self) -> list[slice]:
        """Every minibatch's slice of an epoch's order."""
        b = self.cfg.batch_size
        return [slice(s, s + b) for s in range(0, self.cfg.steps_per_epoch(self.n) * b, b)]

    def __iter__(self) -> Iterator[list[int]]:  # a DataLoader's batch sampler: epoch self.epoch
        order = self(self.epoch)
        for sl in self.slices():
            yield order[sl].tolist()

    def __len__(self) -> int:
        return self.cfg.steps_per_epoch(self.n)


def _epochs_of_batches(data: Any, cfg: FitConfig, num_workers: int
                       ) -> tuple[int, Callable[[int], Iterable[Any]]]:
    """``(steps per epoch, epoch -> its minibatches (x, y, idx))``."""
    if not _is_dataset(data) and not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputError(f"data must be an (x, y) pair or a torch Dataset, not "
                         f"{type(data).__name__}")
    if cfg.order == "dataloader":
        loader = make_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed,
                             num_workers=num_workers, drop_last=cfg.drop_last, indexed=True)
        return len(loader), lambda epoch: loader
    if _is_dataset(data):
        sampler = _Order(cfg, len(data))
        loader = make_loader(data, cfg.batch_size, seed=cfg.seed, num_workers=num_workers,
                             indexed=True, batch_sampler=sampler)

        def from_dataset(epoch: int) -> Iterable[Any]:
            sampler.epoch = epoch
            return loader

        return len(sampler), from_dataset
    x, y = (_as_tensor(a) for a in data)
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} rows but y has {len(y)}")
    y = y.to(x.device)
    order = _Order(cfg, len(x))

    def from_pair(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        perm = order(epoch)
        at = perm.to(x.device)
        for sl in order.slices():
            yield x[at[sl]], y[at[sl]], perm[sl]

    return len(order), from_pair


def _optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "foreach": cfg.foreach}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, **kw)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, betas=cfg.betas, eps=cfg.eps, **kw)


def _scheduler(opt: torch.optim.Optimizer, cfg: FitConfig, total: int) -> Any:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    if cfg.schedule == "one-cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup,
            cycle_momentum=cfg.optimizer != "sgd")
    return None


def fit_network(
    model: nn.Module,
    data: Any,
    config: FitConfig | None = None,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    backward: BackwardHook | None = None,
    on_epoch_end: EpochHook | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place on ``data`` with ``config`` (default ``FitConfig()``); returns it
    in eval mode (see the module docstring for the step, the orders and the hooks).

    Args:
        model: the network; its trainable parameters are optimised, and the first one's device
            and dtype are those of every minibatch.
        data: an ``(x, y)`` pair of arrays/tensors or a ``Dataset`` of ``(input, label)``.
        loss: ``loss(model(x), y)``, the scalar minibatch objective (labels as int64).
        backward: ``backward(x, y, idx, lr)`` replaces ``loss(model(x), y).backward()``: it must
            leave the gradient of the minibatch objective in ``.grad`` (e.g.
            :meth:`dvl_ooc.inrun.InRunShapley.step`); ``idx`` (CPU int64) are the samples'
            positions in ``data``, ``lr`` the step's learning rate. Batches, order and flips are
            those of plain training.
        on_epoch_end: ``on_epoch_end(epoch, model, lr)`` after every epoch (``epoch`` from 1,
            ``lr`` the mean learning rate of its steps); the model is handed over in training
            mode and put back into it afterwards, so the hook may switch it to eval mode but
            must not change its weights (:class:`Checkpoints`, per-point losses).
        num_workers: loader processes of a ``Dataset``.
        progress: show a progress bar over the steps.
    """
    from .runtime import progress as _progress

    cfg = FitConfig() if config is None else config
    if not isinstance(cfg, FitConfig):
        raise InputError(f"config must be a FitConfig, not {type(cfg).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NoTrainableParametersError(f"{type(model).__name__} has no trainable parameters")
    dtype, device = params[0].dtype, params[0].device
    steps, epoch_batches = _epochs_of_batches(data, cfg, num_workers)
    if steps < 1:
        raise InputError("no training data")
    opt = _optimizer(params, cfg)
    sched = _scheduler(opt, cfg, cfg.epochs * steps)
    flips = torch_generator(cfg.seed, 1) if cfg.flip else None
    model.train()
    with torch.enable_grad(), _progress(progress, total=cfg.epochs * steps, unit="batch",
                                        desc="train") as bar:
        for epoch in range(1, cfg.epochs + 1):
            rates = []
            for batch in epoch_batches(epoch):
                xb, yb = batch[0].to(device, dtype), batch[1].to(device).long()
                if flips is not None:
                    f = torch.rand(2, generator=flips)
                    if f[0] < 0.5:
                        xb = xb.flip(-1)
                    if f[1] < 0.5:
                        xb = xb.flip(-2)
                lr = opt.param_groups[0]["lr"]
                rates.append(lr)
                opt.zero_grad(set_to_none=True)
                if backward is None:
                    loss(model(xb), yb).backward()
                else:
                    backward(xb, yb, batch[2], lr)
                opt.step()
                if sched is not None:
                    sched.step()
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, float(np.mean(rates)))
                model.train()
    if cfg.update_bn:
        _update_bn_over(model, data, cfg.batch_size, num_workers, dtype, device)
    return model.eval()


def _update_bn_over(model: nn.Module, data: Any, batch_size: int, num_workers: int,
                    dtype: torch.dtype, device: torch.device) -> None:
    if _is_dataset(data):
        loader = make_loader(data, batch_size, num_workers=num_workers)
        _update_bn(model, (b[0].to(device, dtype) for b in loader))
    else:
        x = _as_tensor(data[0])
        _update_bn(model, (x[s : s + batch_size].to(device, dtype)
                           for s in range(0, len(x), batch_size)))


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in module.modules())


def _update_bn(module: nn.Module, batches: Iterable[torch.Tensor]) -> bool:
    if not _has_bn(module):
        return False
    from torch.optim.swa_utils import update_bn

    update_bn(batches, module)
    return True


def update_batchnorm(module: nn.Module, x: torch.Tensor, batch_size: int = 128) -> bool:
    """Recompute the running mean and variance of ``module``'s BatchNorm layers as the average
    over ``x`` (minibatches of ``batch_size``, no gradients; ``torch.optim.swa_utils.update_bn``).
    Returns whether the module has such layers; the module's training mode is restored."""
    return _update_bn(module, (x[s : s + batch_size] for s in range(0, len(x), batch_size)))
