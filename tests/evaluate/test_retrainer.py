"""TorchRetrainer: stacked and one-at-a-time paths equal an independent float64 training loop
(documented seeds, Adam, per-epoch shuffles) and its loss / margin targets."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.resnet import resnet_small
from dvl_ooc.evaluate import TorchRetrainer
from dvl_ooc.exceptions import InputError, LengthMismatchError, UnsupportedModelError
from dvl_ooc.seeding import derive_seed
from dvl_ooc.valuation import TrainingConfig

CFG = TrainingConfig(epochs=3, lr=0.05, batch_size=16, weight_decay=1e-3, seed=11)


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits.x_train[:40].astype(np.float64), digits.y_train[:40]
    return x, y, digits.x_test[:25].astype(np.float64), digits.y_test[:25]


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10))


def _independent(model, x, y, xt, yt, mask, seed, cfg):
    """The documented recipe written out: reset_parameters under torch.manual_seed of
    derive_seed(cfg.seed, seed, 1); numpy shuffles default_rng([derive_seed(cfg.seed, seed, 0),
    epoch]); torch.optim.Adam with L2; then per-sample cross-entropy and margin in NumPy."""
    net = copy.deepcopy(model)
    torch.manual_seed(derive_seed(cfg.seed, seed, 1))
    for mod in net.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    net = net.double().train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    idx = np.flatnonzero(mask)
    xs, ys = torch.as_tensor(x[idx]), torch.as_tensor(y[idx]).long()
    order_seed = derive_seed(cfg.seed, seed, 0)
    for e in range(cfg.epochs):
        order = np.random.default_rng([order_seed, e]).permutation(len(idx))
        for s in range(0, len(idx), cfg.batch_size):
            i = torch.as_tensor(order[s : s + cfg.batch_size])
            opt.zero_grad()
            F.cross_entropy(net(xs[i]), ys[i]).backward()
            opt.step()
    with torch.no_grad():
        z = net.eval()(torch.as_tensor(xt)).numpy()
    loss, margin = [], []
    for zi, yi in zip(z, yt):
        lse = np.log(np.exp(zi - zi.max()).sum()) + zi.max()
        loss.append(lse - zi[yi])
        others = np.delete(zi, yi)
        margin.append(zi[yi] - (np.log(np.exp(others - others.max()).sum()) + others.max()))
    return np.array(loss), np.array(margin)


def test_stacked_and_single_paths_equal_an_independent_loop(data, one_thread):
    x, y, xt, yt = data
    rng = np.random.default_rng(0)
    masks = rng.random((4, 40)) < np.array([0.9, 0.6, 0.4, 0.2])[:, None]
    model = _mlp()
    for target, seeds in (("loss", (0, 3)), ("margin", (3,))):
        kw = dict(config=CFG, target=target, dtype=torch.float64)
        stacked = TorchRetrainer(model, (x, y), (xt, yt), stacked="auto", **kw)
        single = TorchRetrainer(model, (x, y), (xt, yt), stacked=False, **kw)
        assert stacked.stacked and not single.stacked
        for seed in seeds:
            state = torch.get_rng_state()
            a, b = stacked(masks, seed), single(masks, seed)
            assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
            assert a.shape == (4, 25) and a.dtype == np.float64
            for r, m in enumerate(masks):
                loss, margin = _independent(model, x, y, xt, yt, m, seed, CFG)
                ref = loss if target == "loss" else margin
                np.testing.assert_allclose(b[r], ref, rtol=1e-9, atol=1e-11)
                np.testing.assert_allclose(a[r], ref, rtol=1e-7, atol=1e-9)
    # the model handed in is never modified
    for p, q in zip(model.parameters(), _mlp().parameters()):
        assert torch.equal(p, q)


def test_seeds_fix_initialisation_for_every_subset(data):
    x, y, xt, yt = data
    r = TorchRetrainer(_mlp(), (x, y), (xt, yt), config=CFG)
    a, cfg_a = r.seeded(1)
    b, cfg_b = r.seeded(1)
    c, cfg_c = r.seeded(2)
    for p, q, s in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, s)
    assert cfg_a == cfg_b and cfg_a.seed != cfg_c.seed
    keep = TorchRetrainer(_mlp(), (x, y), (xt, yt), config=CFG, reinit=False)
    for p, q in zip(keep.seeded(5)[0].parameters(), _mlp().parameters()):
        assert torch.equal(p, q)
    own = TorchRetrainer(_mlp(), (x, y), (xt, yt), config=CFG,
                         reinit=lambda m, s: [nn.init.normal_(p, generator=torch.Generator()
                                                              .manual_seed(s))
                                              for p in m.parameters()])
    w1, w2 = own.seeded(1)[0], own.seeded(1)[0]
    assert all(torch.equal(p, q) for p, q in zip(w1.parameters(), w2.parameters()))
    # one subset trained twice, alone or in a block: the same targets
    masks = np.random.default_rng(1).random((3, 40)) < 0.5
    np.testing.assert_allclose(r(masks, 4)[1], r(masks[1:2], 4)[0], rtol=1e-5, atol=1e-6)


def test_pickled_retrainer_gives_the_same_bytes(data, one_thread):
    x, y, xt, yt = data
    r = TorchRetrainer(_mlp(), (x.astype(np.float32), y), (xt.astype(np.float32), yt),
                       config=CFG)
    masks = np.random.default_rng(2).random((3, 40)) < 0.5
    back = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(back(masks, 1), r(masks, 1))
    assert back.fingerprint() == r.fingerprint()
    other = TorchRetrainer(_mlp(), (x.astype(np.float32), y), (xt.astype(np.float32), yt),
                           config=CFG.replace(epochs=4))
    assert other.fingerprint() != r.fingerprint()


def test_batchnorm_networks_train_one_at_a_time(data, one_thread):
    x, y, xt, yt = data
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                       nn.Linear(8, 10))
    r = TorchRetrainer(bn, (x, y), (xt, yt), config=CFG, dtype=torch.float64)
    assert not r.stacked
    masks = np.random.default_rng(3).random((2, 40)) < 0.6
    out = r(masks, 0)
    assert out.shape == (2, 25) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, r(masks, 0))  # deterministic
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        TorchRetrainer(bn, (x, y), (xt, yt), stacked=True)
    assert not TorchRetrainer(resnet_small(n_classes=10, in_channels=1), (x, y), (xt, yt)
                              ).stacked


def test_bad_masks_and_arguments(data):
    x, y, xt, yt = data
    r = TorchRetrainer(_mlp(), (x, y), (xt, yt), config=CFG)
    masks = np.ones((2, 40), bool)
    masks[1] = False
    with pytest.raises(InputError, match=r"row\(s\) \[1\]"):
        r(masks, 0)
    with pytest.raises(LengthMismatchError, match="40"):
        r(np.ones((2, 39), bool), 0)
    with pytest.raises(InputError, match="boolean"):
        r(np.ones((2, 40)), 0)
    with pytest.raises(InputError, match="target"):
        TorchRetrainer(_mlp(), (x, y), (xt, yt), target="accuracy")
    with pytest.raises(InputError, match="stacked"):
        TorchRetrainer(_mlp(), (x, y), (xt, yt), stacked="yes")
    with pytest.raises(LengthMismatchError, match="shape"):
        TorchRetrainer(_mlp(), (x, y), (xt[:, :, :4], yt))
