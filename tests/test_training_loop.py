"""The library's one training loop (dvl_ooc.training.fit_network): schedules, data orders,
hooks, optimisers, BatchNorm statistics and config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dvl_ooc.exceptions import InputError, NoTrainableParametersError
from dvl_ooc.training import Checkpoints, FitConfig, checkpoint_epochs, fit_network, seeded_order
from dvl_ooc.valuation.training import TrainingConfig, train_module


def _data(n: int = 23, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _net(d: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, 3).double()


class _Pairs(Dataset):
    """A Dataset of ``(x[i], y[i])``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def _record(model: nn.Module, data, cfg: FitConfig, **kw) -> tuple[list, list]:
    """Train, recording every step's ``(x, y, idx, lr)`` and every epoch's ``(epoch, lr)``."""
    steps: list = []
    epochs: list = []

    def backward(x, y, idx, lr):
        assert all(p.grad is None for p in model.parameters())  # zero_grad before each step
        steps.append((x.clone(), y.clone(), idx.clone(), lr))
        F.cross_entropy(model(x), y).backward()

    fit_network(model, data, cfg, backward=backward,
                on_epoch_end=lambda e, m, lr: epochs.append((e, lr)), **kw)
    return steps, epochs


def _one_cycle(t: int, total: int, lr: float, pct: float = 0.15) -> float:
    """torch's OneCycleLR rate at step ``t`` (cosine annealing, div 25, final div 1e4)."""
    lo, end1 = lr / 25, pct * total - 1
    if t <= end1:
        a, b, s = lo, lr, t / end1
    else:
        a, b, s = lr, lo / 1e4, (t - end1) / (total - 1 - end1)
    return b + (a - b) / 2 * (math.cos(math.pi * s) + 1)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "one-cycle"])
def test_step_learning_rates_follow_the_schedule_and_epochs_get_their_mean(schedule):
    x, y = _data(30)
    cfg = FitConfig(epochs=3, lr=0.1, batch_size=7, schedule=schedule, optimizer="adamw")
    steps, epochs = _record(_net(), (x, y), cfg)
    total = 3 * 5
    assert len(steps) == total
    lrs = np.array([s[3] for s in steps])
    if schedule == "constant":
        want = np.full(total, 0.1)
    elif schedule == "cosine":
        want = 0.05 * (1 + np.cos(np.pi * np.arange(total) / total))
    else:
        want = np.array([_one_cycle(t, total, 0.1) for t in range(total)])
        assert want[0] == pytest.approx(0.1 / 25) and want[-1] == pytest.approx(0.1 / 25e4)
        assert want.max() > 0.099
    np.testing.assert_allclose(lrs, want, rtol=1e-10, atol=1e-15)
    assert [e for e, _ in epochs] == [1, 2, 3]
    np.testing.assert_allclose([lr for _, lr in epochs], lrs.reshape(3, 5).mean(1), rtol=1e-15)


def test_sgd_with_one_cycle_stays_plain_gradient_descent():
    """torch's OneCycleLR would cycle SGD's momentum too: not here (cycle_momentum off)."""
    x, y = _data(20)
    net = _net()
    prev = []

    def backward(xb, yb, idx, lr):
        if prev:
            w, g, rate = prev.pop()
            torch.testing.assert_close(net.weight.detach(), w - rate * g, rtol=0, atol=1e-15)
        F.cross_entropy(net(xb), yb).backward()
        prev.append((net.weight.detach().clone(), net.weight.grad.clone(), lr))

    fit_network(net, (x, y), FitConfig(epochs=2, batch_size=5, lr=0.5, optimizer="sgd",
                                       schedule="one-cycle"), backward=backward)


def test_batches_partition_every_epoch_in_the_seeded_order():
    x, y = _data(23)
    cfg = FitConfig(epochs=3, batch_size=5, seed=4)
    steps, _ = _record(_net(), (x, y), cfg)
    assert [len(s[2]) for s in steps] == [5, 5, 5, 5, 3] * 3
    for e in range(3):
        idx = torch.cat([s[2] for s in steps[5 * e : 5 * e + 5]])
        np.testing.assert_array_equal(idx.numpy(), seeded_order(4, e, 23))
    for xb, yb, idx, _ in steps:  # each batch is the data at its positions
        assert idx.device.type == "cpu" and idx.dtype == torch.int64
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])


@pytest.mark.parametrize("order", ["seeded", "randperm", "dataloader", "none"])
def test_orders_are_reproducible_and_seed_dependent(order):
    x, y = _data(40)
    cfg = FitConfig(epochs=2, batch_size=8, order=order, seed=3)

    def order_of(c):
        return torch.cat([s[2] for s in _record(_net(), (x, y), c)[0]]).numpy()

    a = order_of(cfg)
    np.testing.assert_array_equal(a, order_of(cfg))
    if order == "none":
        np.testing.assert_array_equal(a, np.tile(np.arange(40), 2))
    else:
        assert not np.array_equal(a, order_of(cfg.replace(seed=4)))
        assert not np.array_equal(a[:40], a[40:])  # a new order every epoch
    if order == "randperm":
        g = torch.Generator().manual_seed(3)
        want = torch.cat([torch.randperm(40, generator=g) for _ in range(2)]).numpy()
        np.testing.assert_array_equal(a, want)


@pytest.mark.parametrize("order", ["seeded", "randperm", "dataloader", "none"])
def test_a_dataset_gives_the_batches_and_weights_of_the_pair(order):
    x, y = _data(30)
    cfg = FitConfig(epochs=2, batch_size=8, order=order, seed=1, drop_last=True)
    a_net, b_net = _net(), _net()
    a, _ = _record(a_net, (x, y), cfg)
    b, _ = _record(b_net, _Pairs(x, y), cfg)
    assert len(a) == len(b) == 2 * 3  # the last batch of 6 is dropped
    for (xa, ya, ia, la), (xb, yb, ib, lb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
        assert la == lb
    for p, q in zip(a_net.parameters(), b_net.parameters()):
        assert torch.equal(p, q)


def test_loader_processes_read_a_dataset_in_the_same_order():
    x, y = _data(30)
    cfg = FitConfig(epochs=3, batch_size=8, order="seeded", seed=2)
    a, _ = _record(_net(), _Pairs(x, y), cfg)
    b, _ = _record(_net(), _Pairs(x, y), cfg, num_workers=1)  # persistent worker process
    assert all(torch.equal(s[2], t[2]) and torch.equal(s[0], t[0]) for s, t in zip(a, b))


def test_drop_last_keeps_an_only_batch():
    x, y = _data(6)
    steps, _ = _record(_net(), (x, y), FitConfig(epochs=2, batch_size=8, drop_last=True))
    assert [len(s[2]) for s in steps] == [6, 6]
    assert FitConfig(batch_size=8, drop_last=True).steps_per_epoch(6) == 1
    assert FitConfig(batch_size=8, drop_last=True).steps_per_epoch(17) == 2
    assert FitConfig(batch_size=8).steps_per_epoch(17) == 3


def test_backward_replacement_trains_exactly_as_plain_training():
    x, y = _data(37)
    for cfg in (FitConfig(epochs=2, batch_size=6, schedule="one-cycle", optimizer="adamw",
                          weight_decay=0.1),
                FitConfig(epochs=2, batch_size=10, order="dataloader", drop_last=True)):
        plain, hooked = _net(), _net()
        seen = []  # plain training's minibatches, by a forward hook
        plain.register_forward_hook(lambda m, inp, out, s=seen: s.append(inp[0].clone()))
        fit_network(plain, (x, y), cfg)
        steps, _ = _record(hooked, (x, y), cfg)
        assert len(seen) == len(steps)
        assert all(torch.equal(a, s[0]) for a, s in zip(seen, steps))
        for p, q in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(p, q)  # same .grad at every step: same weights


def test_backward_hook_sees_the_grad_of_the_minibatch_loss():
    x, y = _data(12)
    net = _net()
    grads = []

    def backward(xb, yb, idx, lr):
        F.cross_entropy(net(xb), yb).backward()
        want = torch.autograd.grad(F.cross_entropy(net(xb), yb), list(net.parameters()))
        grads.append(all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), want)))

    fit_network(net, (x, y), FitConfig(epochs=2, batch_size=5), backward=backward)
    assert grads == [True] * 6


def test_flips_are_seeded_and_applied_to_whole_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 3, 3, generator=g, dtype=torch.float64)
    y = torch.arange(20) % 2

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(9, 2)).double()

    cfg = FitConfig(epochs=3, batch_size=4, flip=True, seed=2)
    a, _ = _record(net(), (x, y), cfg)
    b, _ = _record(net(), (x, y), cfg)
    kinds = set()
    for (xa, _, idx, _), (xb, _, _, _) in zip(a, b):
        assert torch.equal(xa, xb)
        src = x[idx]
        found = [k for k, f in enumerate((src, src.flip(-1), src.flip(-2), src.flip(-1, -2)))
                 if torch.equal(xa, f)]
        assert found
        kinds.add(found[0])
    assert len(kinds) > 1  # some batches flipped, others not


def test_epoch_hook_gets_the_model_in_training_mode_and_may_switch_it():
    x, y = _data()
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    modes = []

    def hook(epoch, m, lr):
        modes.append((epoch, m is net, m.training))
        m.eval()

    out = fit_network(net, (x, y), FitConfig(epochs=3, batch_size=8), on_epoch_end=hook)
    assert out is net and not net.training
    assert modes == [(1, True, True), (2, True, True), (3, True, True)]


def test_checkpoints_keep_copies_and_mean_rates_at_the_chosen_epochs():
    x, y = _data(30)
    net = _net()
    rates = []
    ck = Checkpoints(checkpoint_epochs(4, 2))
    assert ck.epochs == {1, 4}

    def both(e, m, lr):
        rates.append(lr)
        ck(e, m, lr)

    fit_network(net, (x, y), FitConfig(epochs=4, batch_size=8, schedule="cosine"),
                on_epoch_end=both)
    assert [lr for _, lr in ck.saved] == [rates[0], rates[3]]
    assert rates == sorted(rates, reverse=True)
    first, last = ck.saved[0][0], ck.saved[1][0]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in last.items())
    assert not torch.equal(first["weight"], last["weight"])  # a copy, not the live tensor
    assert checkpoint_epochs(20) == {1, 6, 10, 15, 20} and checkpoint_epochs(0) == set()
    assert checkpoint_epochs(3) == {1, 2, 3}


def test_one_step_of_each_optimiser_by_hand():
    x, y = _data(16)
    lr, wd = 0.01, 0.1
    net0 = _net()
    w0 = net0.weight.detach().clone()
    g = torch.autograd.grad(F.cross_entropy(net0(x), y), net0.weight)[0]
    cfg = FitConfig(epochs=1, batch_size=16, lr=lr, weight_decay=wd)
    g2 = g + wd * w0

    def adam_step(u):  # Adam's first step: bias-corrected m / (sqrt(v) + eps) = u / (|u| + eps)
        return u / (u.abs() + 1e-8)

    want = {"sgd": w0 - lr * g2,  # L2 added to the gradient
            "adam": w0 - lr * adam_step(g2),
            "adamw": w0 * (1 - lr * wd) - lr * adam_step(g)}  # decoupled decay
    for opt, w in want.items():
        net = fit_network(_net(), (x, y), cfg.replace(optimizer=opt))
        torch.testing.assert_close(net.weight.detach(), w, rtol=0, atol=1e-12)


def test_update_bn_gives_the_minibatch_average_for_pairs_and_datasets():
    x, y = _data(40)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()

    cfg = FitConfig(epochs=2, batch_size=8, update_bn=True)
    a, b = fit_network(net(), (x, y), cfg), fit_network(net(), _Pairs(x, y), cfg)
    with torch.no_grad():
        h = a[0](x)
    torch.testing.assert_close(a[1].running_mean, h.mean(0), rtol=1e-12, atol=1e-12)
    var = h.reshape(5, 8, 6).var(1).mean(0)  # the average of the 5 minibatches' variances
    torch.testing.assert_close(a[1].running_var, var, rtol=1e-12, atol=1e-12)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(u, v), k


def test_train_module_is_the_loop_with_the_training_config():
    x, y = _data(33)
    tc = TrainingConfig(epochs=3, lr=0.05, batch_size=10, weight_decay=0.01, seed=7)
    fc = tc.fit_config()
    assert (fc.order, fc.schedule, fc.foreach) == ("seeded", "constant", False)
    assert tc.replace(shuffle=False).fit_config().order == "none"
    a = train_module(_net(), x, y, tc)
    b = fit_network(_net(), (x, y), fc,
                    loss=lambda o, t: F.cross_entropy(o, t, reduction="none").mean())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [
    {"optimizer": "rmsprop"}, {"schedule": "step"}, {"order": "random"}, {"epochs": 0},
    {"epochs": 1.5}, {"epochs": True}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")},
    {"weight_decay": -1.0}, {"warmup": 1.0}, {"betas": (1.0, 0.9)}, {"eps": 0.0},
])
def test_bad_configs_are_input_errors(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        FitConfig(**bad)


def test_bad_calls_are_input_errors():
    x, y = _data()
    with pytest.raises(InputError, match="FitConfig"):
        fit_network(_net(), (x, y), TrainingConfig())
    with pytest.raises(InputError, match="pair"):
        fit_network(_net(), x)
    with pytest.raises(InputError, match="rows"):
        fit_network(_net(), (x, y[:-1]))
    with pytest.raises(InputError, match="no training data"):
        fit_network(_net(), (x[:0], y[:0]))
    frozen = _net().requires_grad_(False)
    with pytest.raises(NoTrainableParametersError):
        fit_network(frozen, (x, y))
