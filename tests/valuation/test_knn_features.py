"""KNN-Shapley closed form, feature-level games and the vectorised torch utility."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.demo.nets import DigitsMLP
from dvl_ooc.exceptions import InputError
from dvl_ooc.valuation import (
    MaskingUtility,
    MaxChecks,
    RelativeTruncation,
    TMCShapleyValuation,
    TorchBatchUtility,
    exact_shapley,
    heatmap,
    knn_shapley,
    patch_groups,
)


class _KNNGame:
    """Reference K-NN utility by plain loops: mean over test points of matches among the
    K nearest (ties by index) members of S, divided by K."""

    def __init__(self, xtr, ytr, xte, yte, k):
        self.d = ((xte[:, None, :] - xtr[None, :, :]) ** 2).sum(-1)
        self.ytr, self.yte, self.k = ytr, yte, k

    @property
    def n_points(self):
        return len(self.ytr)

    def __call__(self, subset):
        subset = [int(i) for i in subset]
        if not subset:
            return 0.0
        total = 0.0
        for t in range(len(self.yte)):
            near = sorted(subset, key=lambda i: (self.d[t, i], i))[: self.k]
            total += sum(self.ytr[i] == self.yte[t] for i in near) / self.k
        return total / len(self.yte)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_shapley_equals_exact_enumeration_of_the_knn_utility(digits, k):
    xtr = digits.x_train[:9].reshape(9, -1).astype(np.float64)
    ytr = digits.y_train[:9] % 3  # 3 classes so labels agree often enough
    xte = digits.x_test[:6].reshape(6, -1).astype(np.float64)
    yte = digits.y_test[:6] % 3
    ref = exact_shapley(_KNNGame(xtr, ytr, xte, yte, k))
    got = knn_shapley(xtr, ytr, xte, yte, k=k, chunk_size=4)  # two test chunks, merged
    np.testing.assert_allclose(got.values, ref.values, atol=1e-12)
    assert np.all(got.counts == 6)
    with pytest.raises(InputError):
        knn_shapley(xtr, ytr, xte, yte, k=0)


def test_masking_utility_linear_model_has_closed_form_group_values(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    x = digits.x_test[0].astype(np.float64)  # (1, 8, 8)
    groups = patch_groups((8, 8), (2, 4))[None]  # 8 groups of 2x4 pixels
    base = 0.25
    u = MaskingUtility(model, x, groups=groups, baseline=base)
    res = exact_shapley(u)
    w = model[1].weight.detach().numpy()[u.target].reshape(1, 8, 8)
    contrib = w * (x - base)
    expected = np.array([contrib[groups == g].sum() for g in range(8)])
    np.testing.assert_allclose(res.values, expected, atol=1e-10)
    hm = heatmap(res, groups[0])
    assert hm.shape == (8, 8)
    np.testing.assert_allclose(hm[0, :4], expected[0])
    np.testing.assert_allclose(heatmap(res, groups[0], per_feature=True).sum(), expected.sum())
    # a non-linear model: efficiency, sum of values = f(x) - f(baseline)
    mlp = DigitsMLP(hidden=8).double()
    um = MaskingUtility(mlp, x, groups=groups, baseline=base, output="prob")
    rm = exact_shapley(um)
    assert rm.values.sum() == pytest.approx(um(np.arange(8)) - um([]), abs=1e-12)
    with pytest.raises(InputError):
        MaskingUtility(model, x, groups=groups * 2)


def _reference_train(model, x, y, epochs, lr, wd):
    net = copy.deepcopy(model)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y) + 0.5 * wd * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        opt.step()
    return dict(net.named_parameters())


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared machine
    yield
    torch.set_num_threads(old)


def test_vectorised_torch_utility_equals_training_each_model_alone(digits, one_thread):
    torch.manual_seed(1)
    model = DigitsMLP(hidden=6).double()
    x, y = digits.x_train[:40].astype(np.float64), digits.y_train[:40]
    xt, yt = digits.x_test[:50].astype(np.float64), digits.y_test[:50]
    kw = dict(epochs=15, lr=0.05, weight_decay=1e-2, dtype=torch.float64)
    u = TorchBatchUtility(model, (xt, yt), models_per_pass=4, **kw).with_data(x, y)
    rng = np.random.default_rng(0)
    masks = rng.random((6, 40)) < 0.4
    masks[2] = False  # an empty coalition
    masks[3, :] = False
    masks[3, 5] = True  # a single point
    stacked = u.train(masks[[0, 1, 3, 4]])
    for row, m in enumerate(masks[[0, 1, 3, 4]]):
        idx = np.flatnonzero(m)
        ref = _reference_train(model, torch.as_tensor(x[idx]), torch.as_tensor(y[idx]).long(),
                               15, 0.05, 1e-2)
        for name, p in ref.items():
            torch.testing.assert_close(stacked[name][row], p.detach(), rtol=1e-9, atol=1e-10)
    scores = u.evaluate_many(masks)
    assert scores[2] == u.default
    one = TorchBatchUtility(model, (xt, yt), models_per_pass=1, **kw).with_data(x, y)
    np.testing.assert_array_equal(one.evaluate_many(masks), scores)
    assert one(np.flatnonzero(masks[0])) == scores[0]
    # it plugs into TMC: prefixes are evaluated models_per_pass at a time
    v = TMCShapleyValuation(u, RelativeTruncation(0.01, 0.5), is_done=MaxChecks(1), seed=0,
                            samples_per_round=2, batch_size=1).fit(x[:12], y[:12])
    r = v.result
    assert r.n_samples == 2 and np.all(r.counts == 2)
    # values of a permutation sum to u(prefix where it was truncated) - u(empty)
    u12 = u.with_data(x[:12], y[:12])
    total, walks = u12(np.arange(12)), 0.0
    for k in range(2):
        perm = np.random.default_rng([0, k]).permutation(12)
        for j in range(1, 13):
            last = u12(perm[:j])
            if j >= 6 and abs(last - total) <= 0.01 * abs(total):
                break
        walks += last - u12([])
    assert r.values.sum() * 2 == pytest.approx(walks, abs=1e-12)
