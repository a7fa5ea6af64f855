"""TorchEstimator is a scikit-learn estimator: scorers by name, clone, tags, errors."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone, is_classifier
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from dvl_ooc.exceptions import NotFittedError
from dvl_ooc.valuation import ModelUtility, TorchEstimator, TrainingConfig
from dvl_ooc.valuation.training import train_module


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits.x_train[:60].astype(np.float64), digits.y_train[:60]
    return x, y, digits.x_test[:90].astype(np.float64), digits.y_test[:90]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()


CFG = TrainingConfig(epochs=4, batch_size=16, lr=0.05)


def _shifted_accuracy(est, xs, ys):  # a user scorer (module level: it travels by pickle)
    return float(np.mean(est.predict(xs) == ys)) - 1.0


@pytest.mark.parametrize("scorer", ["accuracy", "f1_macro", "callable"])
def test_model_utility_scores_a_torch_estimator_with_sklearn_scorers(data, scorer):
    x, y, xt, yt = data
    subset = np.arange(0, 60, 2)
    ref = train_module(_net(), x[subset], y[subset], CFG)  # the same training, by hand
    with torch.no_grad():
        pred = ref(torch.as_tensor(xt)).argmax(1).numpy()
    if scorer == "callable":
        expected, scorer = float(np.mean(pred == yt)) - 1.0, _shifted_accuracy
    elif scorer == "accuracy":
        expected = accuracy_score(yt, pred)
    else:
        expected = f1_score(yt, pred, average="macro")
    net = _net()
    u = ModelUtility(TorchEstimator(net, config=CFG), scorer, test_data=(xt, yt))
    value = u.with_data(x, y)(subset)
    assert value == pytest.approx(expected, rel=1e-12)
    assert 0.2 < float(np.mean(pred == yt)) < 1.0  # a trained, imperfect model
    assert u.min_classes == 2  # recognised as a classifier
    back = pickle.loads(pickle.dumps(u.with_data(x, y)))  # the scorer is rebuilt by name
    assert back(subset) == pytest.approx(expected, rel=1e-12)


def test_estimator_protocol_clone_params_tags_and_errors(data):
    x, y, xt, yt = data
    net = _net()
    est = TorchEstimator(net, epochs=2, lr=0.1)
    assert is_classifier(est) and est.__sklearn_tags__().estimator_type == "classifier"
    params = est.get_params()
    assert params["epochs"] == 2 and params["module"] is net and params["config"] is None
    twin = clone(est)
    assert twin.get_params()["epochs"] == 2 and twin.module is not net
    assert twin.training_config == TrainingConfig(epochs=2, lr=0.1)
    with pytest.raises(NotFittedError):
        twin.predict(xt)
    init = copy.deepcopy(net.state_dict())
    twin.set_params(batch_size=8).fit(x[:20], y[:20])
    assert all(torch.equal(v, init[k]) for k, v in net.state_dict().items())  # not trained
    proba = twin.predict_proba(xt)
    assert proba.shape == (len(xt), 10) and np.allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(twin.classes_, np.arange(10))
    np.testing.assert_array_equal(proba.argmax(1), twin.predict(xt))
    assert twin.score(xt, yt) == accuracy_score(yt, twin.predict(xt))
    # fitting twice from the same initial weights gives the same model
    again = clone(twin).fit(x[:20], y[:20])
    np.testing.assert_array_equal(again.predict_proba(xt), proba)
