"""Stacked minibatch training equals one-at-a-time training; TMC stops at the truncation point.

References: an independent float64 loop (torch.optim.Adam over one nn.Module, shuffles drawn
from ``np.random.default_rng([seed, epoch])`` as documented) and the one-at-a-time path
(``ModelUtility(TorchEstimator(...))``) for the models and scores; a one-at-a-time walk for TMC.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.exceptions import InputError, UnsupportedModelError
from dvl_ooc.valuation import (
    DeviationTruncation,
    InteractionGame,
    MaxChecks,
    ModelUtility,
    RelativeTruncation,
    TMCShapleyValuation,
    TorchBatchUtility,
    TorchEstimator,
    TrainingConfig,
)
from dvl_ooc.valuation.training import train_module


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _independent_train(model, x, y, epochs, lr, bs, wd, seed):
    """The documented schedule, written out: per-epoch numpy shuffles, Adam, mean CE loss."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y).long()
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(len(x))
        for s in range(0, len(x), bs):
            i = torch.as_tensor(order[s : s + bs])
            opt.zero_grad()
            F.cross_entropy(net(x[i]), y[i]).backward()
            opt.step()
    return net.eval()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 9, 10)).double()


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_stacked_minibatch_models_equal_one_at_a_time_models(digits, one_thread, make):
    model = make()
    x, y = digits.x_train[:70].astype(np.float64), digits.y_train[:70]
    xt, yt = digits.x_test[:80].astype(np.float64), digits.y_test[:80]
    # 3 epochs, batches of 16 (does not divide the subset sizes), L2 weight decay
    cfg = TrainingConfig(epochs=3, lr=0.02, batch_size=16, weight_decay=1e-2, seed=5)
    u = TorchBatchUtility(model, (xt, yt), config=cfg, dtype=torch.float64,
                          models_per_pass=4).with_data(x, y)
    rng = np.random.default_rng(0)
    masks = rng.random((5, 70)) < np.array([0.95, 0.6, 0.35, 0.2, 0.1])[:, None]
    sizes = masks.sum(1)
    assert len(set(sizes)) == 5 and all(s % 16 for s in sizes)  # 1..5 steps per epoch
    stacked = u.train(masks)  # all five trained together
    one = ModelUtility(TorchEstimator(model, config=cfg), test_data=(xt, yt)).with_data(x, y)
    for r, m in enumerate(masks):
        idx = np.flatnonzero(m)
        ref = _independent_train(model, x[idx], y[idx], 3, 0.02, 16, 1e-2, 5)
        shared = train_module(copy.deepcopy(model), x[idx], y[idx], cfg)
        for (name, p), q in zip(ref.named_parameters(), shared.parameters()):
            torch.testing.assert_close(stacked[name][r], p.detach(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-9, atol=1e-12)
        assert not torch.allclose(stacked[name][r], dict(model.named_parameters())[name])
    scores = u.evaluate_many(masks)
    np.testing.assert_array_equal(scores, [one(np.flatnonzero(m)) for m in masks])
    # grouping does not matter: one model per pass gives the same scores and parameters
    single = TorchBatchUtility(model, (xt, yt), config=cfg, dtype=torch.float64,
                               models_per_pass=1).with_data(x, y)
    np.testing.assert_array_equal(single.evaluate_many(masks), scores)
    alone = single.train(masks[3:4])
    for k, v in alone.items():
        torch.testing.assert_close(v[0], stacked[k][3], rtol=1e-10, atol=1e-12)


def test_sgd_full_batch_and_unshuffled_schedules_match_too(digits, one_thread):
    model = _mlp()
    x, y = digits.x_train[:30].astype(np.float64), digits.y_train[:30]
    masks = np.zeros((2, 30), bool)
    masks[0, :25], masks[1, 5:12] = True, True
    for cfg in (TrainingConfig(epochs=4, lr=0.3, optimizer="sgd", batch_size=8,
                               weight_decay=1e-3),
                TrainingConfig(epochs=4, batch_size=64, shuffle=False)):
        u = TorchBatchUtility(model, (x, y), config=cfg, dtype=torch.float64).with_data(x, y)
        stacked = u.train(masks)
        for r, m in enumerate(masks):
            idx = np.flatnonzero(m)
            ref = dict(train_module(copy.deepcopy(model), x[idx], y[idx], cfg).named_parameters())
            for k, v in stacked.items():
                torch.testing.assert_close(v[r], ref[k].detach(), rtol=1e-6, atol=1e-9)


def test_one_configuration_with_shared_defaults_and_old_keywords():
    net = nn.Linear(64, 10)
    x = np.zeros((4, 64), np.float32)
    y = np.arange(4)
    u = TorchBatchUtility(net, (x, y))
    assert u.config == TorchEstimator(net).training_config == TrainingConfig()
    assert TrainingConfig() == TrainingConfig(epochs=10, lr=1e-2, batch_size=128,
                                              weight_decay=0.0, optimizer="adam", seed=0)
    old = TorchBatchUtility(net, (x, y), epochs=40, lr=0.1, weight_decay=1e-3)
    assert (old.epochs, old.lr, old.weight_decay, old.batch_size) == (40, 0.1, 1e-3, 128)
    est = TorchEstimator(net, config=TrainingConfig(epochs=3), lr=0.5)
    assert est.training_config == TrainingConfig(epochs=3, lr=0.5)
    for bad in (dict(epochs=0), dict(batch_size=0), dict(optimizer="lbfgs"), dict(lr=-1.0)):
        with pytest.raises(InputError):
            TrainingConfig(**bad)
    with pytest.raises(InputError, match="TrainingConfig"):
        TorchBatchUtility(net, (x, y), config={"epochs": 3})
    with pytest.raises(UnsupportedModelError, match="Dropout"):
        TorchBatchUtility(nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 10)), (x, y))


class _Probe(nn.Module):
    """Runs a callback in the middle of every forward pass (inside vmap)."""

    callback = None

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 36, 10)

    def forward(self, x):
        if _Probe.callback is not None:
            _Probe.callback()
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_pickling_mid_training_never_sees_batched_tensors(digits, one_thread):
    """The reported hang: a worker pickled the utility while functional_call had swapped the
    module's parameters for BatchedTensors (``Cannot access storage of BatchedTensorImpl``).
    Here the utility is pickled from inside its own vmapped forward passes; the module that
    functional_call swaps is a private per-call copy, never part of the pickled state."""
    torch.manual_seed(4)
    model = _Probe().double()
    x, y = digits.x_train[:30].astype(np.float64), digits.y_train[:30]
    cfg = TrainingConfig(epochs=2, batch_size=8)
    u = TorchBatchUtility(model, (x, y), config=cfg, dtype=torch.float64).with_data(x, y)
    masks = np.random.default_rng(1).random((3, 30)) < 0.6
    ref = u.evaluate_many(masks)
    blobs = []
    _Probe.callback = lambda: blobs.append(pickle.dumps(u))
    try:
        again = u.evaluate_many(masks)
    finally:
        _Probe.callback = None
    assert len(blobs) >= 2 * 3  # pickled during every training step and the scoring pass
    np.testing.assert_array_equal(again, ref)
    back = pickle.loads(blobs[len(blobs) // 2])
    assert "_meta" not in back.__getstate__()
    for k, v in back.init_params.items():
        assert type(v) is torch.Tensor and torch.equal(v, u.init_params[k])
    np.testing.assert_array_equal(back.evaluate_many(masks), ref)


class _Recording:
    """A vectorised utility that records every coalition it is asked for."""

    def __init__(self, game, hint):
        self.game, self.batch_hint, self.seen = game, hint, []

    @property
    def n_points(self):
        return self.game.n_points

    def evaluate_many(self, masks):
        self.seen.extend(np.asarray(masks, bool).copy())
        return self.game.evaluate_many(masks)

    def __call__(self, subset):
        return self.game(subset)


class _OneAtATime:
    def __init__(self, game):
        self.game = game

    @property
    def n_points(self):
        return self.game.n_points

    def __call__(self, subset):
        return self.game(subset)


def _reference_walks(game, trunc, seed, n_perm):
    """One-at-a-time TMC walks: (values, evaluated prefixes as (k, j))."""
    n = game.n_points
    total, empty = game(np.arange(n)), game([])
    sums, prefixes = np.zeros(n), []
    for k in range(n_perm):
        perm = np.random.default_rng([seed, k]).permutation(n)
        pol = copy.deepcopy(trunc)
        pol.reset(total, n)
        prev, last = empty, empty
        marg = np.zeros(n)
        for j in range(1, n + 1):
            last = game(perm[:j])
            prefixes.append((k, j))
            marg[perm[j - 1]] = last - prev
            prev = last
            if pol(j, last):
                break
        sums += marg
    return sums / n_perm, prefixes


@pytest.mark.parametrize("trunc", [RelativeTruncation(0.05, 0.2), DeviationTruncation(1.0, 0.3)])
def test_tmc_lockstep_stops_each_permutation_at_its_truncation_point(trunc):
    rng = np.random.default_rng(0)
    game = InteractionGame(rng.normal(size=12) + 1.0, rng.normal(size=(12, 12)) * 0.2,
                           noise=0.2)
    ref, prefixes = _reference_walks(game, trunc, seed=3, n_perm=24)
    assert len(prefixes) < 24 * 12  # truncation fired
    rec = _Recording(game, hint=16)
    v = TMCShapleyValuation(rec, trunc, is_done=MaxChecks(1), seed=3, samples_per_round=24)
    assert v.batch_size == 8  # permutations per task: batch_hint, at most 8 (short tasks)
    res = v.fit().result
    np.testing.assert_allclose(res.values, ref, rtol=1e-12, atol=1e-14)
    assert res.evaluations == len(prefixes) + 2  # + u(all), u(empty) on the driver
    # exactly the prefixes the one-at-a-time walk evaluated, nothing past a truncation point
    walked = {(k, j): np.isin(np.arange(12), np.random.default_rng([3, k]).permutation(12)[:j])
              for k, j in prefixes}
    assert {m.tobytes() for m in rec.seen} == {m.tobytes() for m in walked.values()}
    assert len(rec.seen) == len(prefixes)  # u(all), u(empty) go through __call__
    for bs in (1, 5):  # how many permutations walk together does not matter
        other = TMCShapleyValuation(_OneAtATime(game), trunc, is_done=MaxChecks(1), seed=3,
                                    batch_size=bs, samples_per_round=24).fit().result
        np.testing.assert_allclose(other.values, res.values, rtol=1e-12, atol=1e-14)
        assert other.evaluations == res.evaluations


def test_tmc_with_stacked_models_equals_tmc_with_one_model_at_a_time(digits, one_thread):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    idx = np.concatenate([np.flatnonzero(digits.y_train == c)[:3] for c in (0, 1, 2)])
    x, y = digits.x_train[idx].astype(np.float64), digits.y_train[idx]
    xt, yt = digits.x_test[:60].astype(np.float64), digits.y_test[:60]
    cfg = TrainingConfig(epochs=3, batch_size=4, lr=0.05)
    kw = dict(is_done=MaxChecks(1), seed=0, samples_per_round=6)
    trunc = RelativeTruncation(0.05, 0.3)
    stacked = TorchBatchUtility(model, (xt, yt), config=cfg, dtype=torch.float64)
    a = TMCShapleyValuation(stacked, trunc, **kw).fit(x, y).result
    one = ModelUtility(TorchEstimator(model, config=cfg), test_data=(xt, yt))
    b = TMCShapleyValuation(one, trunc, batch_size=2, **kw).fit(x, y).result
    np.testing.assert_allclose(a.values, b.values, rtol=1e-12, atol=1e-12)
    assert a.evaluations == b.evaluations < 6 * 9 + 2 and np.any(a.values != 0)


def test_bad_masks_are_refused(digits):
    u = TorchBatchUtility(nn.Linear(64, 10), (digits.x_test[:5].reshape(5, -1),
                                                digits.y_test[:5]))
    u = u.with_data(digits.x_train[:6].reshape(6, -1), digits.y_train[:6])
    with pytest.raises(InputError, match="shape"):
        u.evaluate_many(np.ones((2, 5), bool))
    with pytest.raises(InputError, match="non-empty"):
        u.train(np.zeros((1, 6), bool))
