"""In-Run Data Shapley: ghost dot products, exactness of training, values, second order, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import flat_params, mean_loss_fn, ref_grads
from torch import nn
from torch.autograd.functional import hessian

from dvl_ooc.exceptions import (
    InputError,
    LengthMismatchError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    UnsupportedModelError,
)
from dvl_ooc.inrun import InRunShapley, layer_dot_products

# ---------------------------------------------------------------------- models


class ConvPadStride(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=1, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv(x)))).flatten(1))


class SeqModel(nn.Module):
    """Embedding -> Linear on (n, T, d) -> mean over T -> Linear."""

    def __init__(self, vocab=12, d=5, h=6, k=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.proj = nn.Linear(d, h)
        self.out = nn.Linear(h, k)

    def forward(self, idx):
        return self.out(torch.tanh(self.proj(self.emb(idx))).mean(1))


class MixedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(4 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = torch.tanh(self.conv2(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))


def _data(kind, digits, n, offset=0):
    if kind == "seq":
        g = torch.Generator().manual_seed(offset + 7)
        x = torch.randint(0, 12, (n, 9), generator=g)
        y = torch.randint(0, 4, (n,), generator=g)
        return x, y
    x = torch.as_tensor(digits.x_train[offset : offset + n]).double()
    y = torch.as_tensor(digits.y_train[offset : offset + n]).long()
    return x, y


MODELS = {"linear": _mlp, "conv": ConvPadStride, "seq": SeqModel, "mixed": MixedCNN}


def _make(kind, seed=0):
    torch.manual_seed(seed)
    return MODELS[kind]().double()


# ---------------------------------------------------------------------- ghost dot products


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
def test_pairwise_dot_products_equal_naive(kind, method, digits):
    model = _make(kind)
    x, y = _data(kind, digits, 7)
    xv, yv = _data(kind, digits, 5, offset=100)
    ref = ref_grads(model, F.cross_entropy, x, y) @ ref_grads(model, F.cross_entropy, xv, yv).T
    b = len(x)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=20, per_validation_point=True,
                      solver=method, val_batch_size=3)  # two validation chunks
    idx = torch.arange(3, 3 + b)
    tr.step(x, y, idx, lr=float(b))  # lr / b == 1: values are the raw dot products
    got = tr.values[3 : 3 + b]
    assert rel_err(torch.as_tensor(got), ref) < 1e-8
    assert np.all(tr.values[:3] == 0) and np.all(tr.values[3 + b :] == 0)
    # summed validation loss: row sums
    tr2 = InRunShapley(model, F.cross_entropy, xv, yv, n_train=20, solver=method)
    tr2.step(x, y, idx, lr=float(b))
    assert rel_err(torch.as_tensor(tr2.values[3 : 3 + b]), ref.sum(1)) < 1e-8


def test_layer_dot_products_long_sequence_embedding_with_repeats():
    """Repeated indices inside and across samples; both methods agree with the scatter."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3, padding_idx=2).double()
    A_t = torch.randint(0, 6, (4, 11))
    A_v = torch.randint(0, 6, (3, 11))
    G_t, G_v = torch.randn(4, 11, 3, dtype=torch.float64), torch.randn(3, 11, 3,
                                                                       dtype=torch.float64)
    # padding positions carry no gradient (as embedding_output_grad_matrix makes them)
    G_t[A_t == 2] = 0
    G_v[A_v == 2] = 0

    def scatter(A, G):
        P = torch.zeros(len(A), 6, 3, dtype=torch.float64)
        for i in range(len(A)):
            for pos in range(A.shape[1]):
                P[i, A[i, pos]] += G[i, pos]
        return P.reshape(len(A), -1)

    ref = scatter(A_t, G_t) @ scatter(A_v, G_v).T
    for method in ("ghost", "materialize"):
        got = layer_dot_products(emb, A_t, G_t, A_v, G_v, method=method)
        assert rel_err(got, ref) < 1e-12
        red = layer_dot_products(emb, A_t, G_t, A_v, G_v, method=method, reduce=True)
        assert rel_err(red, ref.sum(1)) < 1e-12


def test_auto_method_follows_cost_model():
    from dvl_ooc.layers import kind_of

    lin = nn.Linear(256, 256)
    A = torch.zeros(8, 1, 257)
    G = torch.zeros(8, 1, 256)
    ghost, mat = kind_of(lin).row_costs(lin, A, G, A, G, reduce=False)
    assert ghost < mat  # L = 1: ghost avoids d_in * d_out
    A, G = torch.zeros(8, 400, 10), torch.zeros(8, 400, 8)  # conv with a large map
    conv = nn.Conv2d(1, 8, 3)
    ghost, mat = kind_of(conv).row_costs(conv, A, G, A, G, reduce=False)
    assert mat < ghost


# ---------------------------------------------------------------------- exact training


def _train(kind, digits, opt_name, tracker: bool, dtype=torch.float64, steps=4, b=8,
           **kw):
    model = _make(kind, seed=3).to(dtype)
    x, y = _data(kind, digits, steps * b)
    if x.is_floating_point():
        x = x.to(dtype)
    xv, yv = _data(kind, digits, 6, offset=200)
    if xv.is_floating_point():
        xv = xv.to(dtype)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), **kw) if tracker else None
    for s in range(steps):
        sl = slice(s * b, (s + 1) * b)
        opt.zero_grad()
        if tr is None:
            F.cross_entropy(model(x[sl]), y[sl]).backward()
        else:
            tr.step(x[sl], y[sl], torch.arange(len(x))[sl], lr=0.1)
        opt.step()
    return model, tr


@pytest.mark.parametrize(("kind", "opt_name", "dtype"), [
    ("mixed", "sgd", torch.float32), ("mixed", "adam", torch.float64),
    ("seq", "sgd", torch.float64), ("seq", "adam", torch.float32)])
def test_weights_bit_identical_with_tracker(kind, opt_name, dtype, digits):
    plain, _ = _train(kind, digits, opt_name, False, dtype)
    tracked, tr = _train(kind, digits, opt_name, True, dtype)
    for (n, p), (_, q) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(p, q), n
    assert np.abs(tr.values).sum() > 0


@pytest.mark.parametrize("kw", [{"second_order": True}, {"per_validation_point": True}])
def test_weights_bit_identical_other_modes(kw, digits):
    plain, _ = _train("mixed", digits, "adam", False)
    tracked, _ = _train("mixed", digits, "adam", True, **kw)
    for (n, p), (_, q) in zip(plain.named_parameters(), tracked.named_parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------------- in-run values


def _explicit_run(kind, digits, per_val, epochs=2, b=6, n=12):
    """Plain SGD with a hand-written value loop (float64 reference)."""
    model = _make(kind, seed=5)
    x, y = _data(kind, digits, n)
    xv, yv = _data(kind, digits, 4, offset=300)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vals = torch.zeros(n, len(xv), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    steps = []
    for e in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, b):
            idx = perm[s : s + b]
            lr = 0.05 * (1 + e) / (1 + s)
            gt = ref_grads(model, F.cross_entropy, x[idx], y[idx])
            gv = ref_grads(model, F.cross_entropy, xv, yv)
            vals[idx] += lr / len(idx) * gt @ gv.T
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            steps.append((idx, lr))
    return (vals if per_val else vals.sum(1)), steps, (x, y, xv, yv)


def _replay(tr, opt, steps, x, y):
    """Run the tracker over the batches and learning rates of :func:`_explicit_run`."""
    for idx, lr in steps:
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.zero_grad()
        tr.step(x[idx], y[idx], idx.numpy(), lr=lr)
        opt.step()


@pytest.mark.parametrize(("kind", "per_val", "on_disk"), [
    ("mixed", False, False), ("mixed", True, True), ("seq", False, True), ("seq", True, False)])
def test_values_equal_explicit_loop(kind, per_val, on_disk, digits, tmp_path):
    ref, steps, (x, y, xv, yv) = _explicit_run(kind, digits, per_val)
    model = _make(kind, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    store = tmp_path / "scores.zarr" if on_disk else None
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x),
                      per_validation_point=per_val, store=store, flush_every=3,
                      chunk_bytes=5 * 8 * (len(xv) if per_val else 1))  # 5 rows per chunk
    _replay(tr, opt, steps, x, y)
    assert rel_err(torch.as_tensor(tr.values), ref) < 1e-8
    if on_disk:
        tr.close()
        from dvl_ooc.inrun import ScoreStore

        assert rel_err(torch.as_tensor(ScoreStore.open(store)), ref) < 1e-8


def test_store_resume_and_mismatch(digits, tmp_path):
    model = _make("linear")
    x, y = _data("linear", digits, 10)
    xv, yv = _data("linear", digits, 3, offset=50)
    path = tmp_path / "s.zarr"
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, store=path)
    tr.step(x[:5], y[:5], np.arange(5), lr=0.1)
    tr.close()
    first = tr.values.copy()
    # resume: keep accumulating into the same store
    tr2 = InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, store=path, mode="a")
    assert tr2.steps == 1
    tr2.step(x[:5], y[:5], np.arange(5), lr=0.1)
    tr2.close()
    assert np.allclose(tr2.values[:5], 2 * first[:5], rtol=1e-12, atol=0)
    with pytest.raises(StoreMismatchError):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=11, store=path, mode="a")
    with pytest.raises(StoreMismatchError):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, store=path, mode="a",
                     second_order=True)
    # never silently replaced: the default mode refuses an existing store and leaves it intact
    with pytest.raises(StoreExistsError, match="mode='a'"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, store=path)
    from dvl_ooc.inrun import ScoreStore

    assert np.array_equal(ScoreStore.open(path), tr2.values)
    tr3 = InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, store=path, mode="w")
    assert tr3.steps == 0 and not tr3.values.any()  # replaced on request
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for mode in ("w-", "w", "a"):
        with pytest.raises(StoreError, match="not a Zarr store"):
            InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, store=other,
                         mode=mode)
    assert (other / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------- second order


def test_second_order_matches_explicit_hessian(digits):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.Tanh(), nn.Linear(3, 10)).double()
    x, y = _data("linear", digits, 6)
    xv, yv = _data("linear", digits, 5, offset=400)
    lr, b = 0.7, len(x)
    theta = flat_params(model)
    # explicit float64 quantities
    gt = ref_grads(model, F.cross_entropy, x, y)
    gval = ref_grads(model, F.cross_entropy, xv, yv).sum(0)
    H = hessian(mean_loss_fn(model, F.cross_entropy, xv, yv), theta, vectorize=True)
    H = H * len(xv)  # Hessian of the summed validation loss
    first = lr / b * gt @ gval
    second = -0.5 * (lr / b) ** 2 * gt @ (H @ gt.sum(0))
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=b, second_order=True,
                      val_batch_size=2)
    tr.step(x, y, np.arange(b), lr=lr)
    got = torch.as_tensor(tr.values)
    assert rel_err(got - first, second) < 1e-8
    assert second.abs().max() > 1e-3 * first.abs().max()  # the term is not negligible here
    # the values of a step sum to the change of the validation loss up to third order
    f = mean_loss_fn(model, F.cross_entropy, xv, yv)
    errs = []
    for eta in (0.1, 0.05):
        tr_e = InRunShapley(model, F.cross_entropy, xv, yv, n_train=b, second_order=True)
        model.zero_grad()
        tr_e.step(x, y, np.arange(b), lr=eta)
        with torch.no_grad():
            actual = (f(theta) - f(theta - eta * gt.mean(0))) * len(xv)
        err2 = abs(float(tr_e.values.sum()) - float(actual))
        err1 = abs(float((eta / b * gt @ gval).sum()) - float(actual))
        assert err2 < 0.2 * err1
        errs.append((err1, err2))
    # halving the step: first-order error / 4 (O(eta^2)), second-order error / 8 (O(eta^3))
    assert 3 < errs[0][0] / errs[1][0] < 5.5
    assert errs[0][1] / errs[1][1] > 6.5


# ---------------------------------------------------------------------- bad input


def test_bad_input(digits):
    xv, yv = _data("linear", digits, 3, offset=50)
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        InRunShapley(nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.LayerNorm(5)).double(),
                     F.cross_entropy, xv, yv, n_train=5)
    # (BatchNorm layers are supported: tests/inrun/test_inrun_batchnorm.py)
    # a frozen unsupported layer is fine
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.LayerNorm(5)).double()
    m[2].requires_grad_(False)
    InRunShapley(m, F.cross_entropy, xv, yv, n_train=5)

    model = _make("linear")
    x, y = _data("linear", digits, 4)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=10)
    with pytest.raises(LengthMismatchError, match="idx"):
        tr.step(x, y, np.arange(3), lr=0.1)
    with pytest.raises(InputError, match="indices"):
        tr.step(x, y, None, lr=0.1)
    with pytest.raises(InputError, match=r"\[0, 10\)"):
        tr.step(x, y, np.arange(8, 12), lr=0.1)
    with pytest.raises(InputError, match="shape"):
        InRunShapley(model, F.cross_entropy, xv[:, :, :4], yv, n_train=10).step(
            x, y, np.arange(4), lr=0.1)
    with pytest.raises(InputError, match="second_order"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, second_order=True,
                     per_validation_point=True)
    with pytest.raises(InputError, match="combined"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=10, combined=True,
                     second_order=True)
    with pytest.raises(InputError, match="shape"):
        InRunShapley(model, F.cross_entropy, xv[:, :, :4], yv, n_train=10, combined=True).step(
            x, y, np.arange(4), lr=0.1)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 10)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x.flatten(1)[:, :10])))

    sh = Shared().double()
    with pytest.raises(UnsupportedModelError, match="more than once"):
        InRunShapley(sh, F.cross_entropy, xv, yv, n_train=10).step(x, y, np.arange(4), lr=0.1)


def test_embedding_options_are_checked():
    """(Per-sample gradients of embeddings themselves: tests/layers.)"""
    with pytest.raises(UnsupportedModelError, match="max_norm"):
        InRunShapley(nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Flatten(),
                                   nn.Linear(6, 2)), F.cross_entropy,
                     torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                     n_train=4)


@pytest.mark.parametrize(("kind", "per_val", "method"), [
    ("mixed", False, "auto"), ("seq", False, "auto"), ("mixed", True, "ghost"),
    ("mixed", True, "materialize"), ("seq", True, "ghost"), ("seq", True, "materialize")])
def test_combined_batch_mode(kind, per_val, method, digits):
    """combined=True: one forward/backward over [train; val]; weights allclose (float64) to
    plain training, values (summed, or per validation point by ghost / materialised products of
    the rows of that one backward) equal to the explicit loop."""
    for opt_name in ("sgd", "adam"):
        plain, _ = _train(kind, digits, opt_name, False)
        tracked, tr = _train(kind, digits, opt_name, True, combined=True,
                             per_validation_point=per_val, solver=method)
        for (n, p), (_, q) in zip(plain.named_parameters(), tracked.named_parameters()):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-13), n
    ref, steps, (x, y, xv, yv) = _explicit_run(kind, digits, per_val)
    model = _make(kind, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), combined=True,
                      per_validation_point=per_val, solver=method)
    _replay(tr, opt, steps, x, y)
    assert rel_err(torch.as_tensor(tr.values), ref) < 1e-8


# ---------------------------------------------------------------------- layer subsets


class NormedCNN(nn.Module):
    """A trainable LayerNorm (unsupported for attribution) between supported layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.norm = nn.LayerNorm(48)
        self.fc1 = nn.Linear(48, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        h = self.norm(torch.tanh(self.conv(x)).flatten(1))
        return self.fc2(torch.tanh(self.fc1(h)))


def _columns(model, layers):
    """Mask of the flat (ref_grads) parameter vector belonging to ``layers``."""
    return torch.cat([torch.full((p.numel(),), n.rsplit(".", 1)[0] in layers)
                      for n, p in model.named_parameters() if p.requires_grad])


@pytest.mark.parametrize("kw", [{}, {"per_validation_point": True}, {"second_order": True}])
def test_layer_subset_values_and_exact_training(kw, digits):
    """layers=[...]: scores are the dot products of the chosen layers' gradient components;
    every trainable parameter (a LayerNorm included) still trains exactly as without it."""
    layers = ["conv", "fc2"]
    torch.manual_seed(4)
    model = NormedCNN().double()
    ref_model = NormedCNN().double()
    ref_model.load_state_dict(model.state_dict())
    x, y = _data("mixed", digits, 12)
    xv, yv = _data("mixed", digits, 4, offset=300)
    cols = _columns(model, layers)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), layers=layers,
                      val_batch_size=3, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.zeros(len(x), len(xv), dtype=torch.float64)
    ref2 = torch.zeros(len(x), dtype=torch.float64)
    for s in range(0, len(x), 4):
        idx = torch.arange(s, s + 4)
        lr, b = 0.1, len(idx)
        gt = ref_grads(ref_model, F.cross_entropy, x[idx], y[idx])[:, cols]
        gv = ref_grads(ref_model, F.cross_entropy, xv, yv)[:, cols]
        ref[idx] += lr / b * gt @ gv.T
        if kw.get("second_order"):
            theta = flat_params(ref_model)
            H = hessian(mean_loss_fn(ref_model, F.cross_entropy, xv, yv), theta,
                        vectorize=True)[cols][:, cols] * len(xv)
            ref2[idx] += -0.5 * (lr / b) ** 2 * gt @ (H @ gt.sum(0))
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x[idx]), y[idx]).backward()
        ref_opt.step()
        opt.zero_grad()
        tr.step(x[idx], y[idx], idx, lr=lr)
        opt.step()
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    got = torch.as_tensor(tr.values)
    want = ref if kw.get("per_validation_point") else ref.sum(1) + ref2
    assert rel_err(got, want) < 1e-8
    if kw.get("second_order"):
        assert ref2.abs().max() > 1e-4 * ref.sum(1).abs().max()


def test_layer_subset_bad_input(digits):
    xv, yv = _data("mixed", digits, 3, offset=50)
    model = NormedCNN().double()
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=5)  # all layers: norm included
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=5, layers=["fc1", "norm"])
    with pytest.raises(InputError, match="no module named 'fc3'"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=5, layers=["fc3"])
    with pytest.raises(InputError, match="non-empty"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=5, layers=[])
    with pytest.raises(InputError, match="combined"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=5, layers=["fc2"], combined=True)
    model.fc1.requires_grad_(False)
    with pytest.raises(InputError, match="no trainable"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=5, layers=["fc1"])


@pytest.mark.parametrize("conv_kw", [
    {"stride": 2, "padding": 1}, {"padding": "same", "dilation": 2, "bias": False},
    {"stride": (1, 2), "padding": (0, 2), "kernel_size": (2, 3)}])
def test_per_sample_layer_grads_and_chunking(conv_kw, digits):
    """Raw-row per-sample gradients (grouped-convolution kernel on CPU) equal autograd's, and
    the chunked materialised products equal the unchunked ones."""
    from dvl_ooc.inrun import pairwise_layer_products, per_sample_layer_grads
    from dvl_ooc.layers import LayerCapture

    torch.manual_seed(2)
    kw = {"kernel_size": 3, **conv_kw}
    conv = nn.Conv2d(1, 4, **kw).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(10)).double()
    x, y = _data("conv", digits, 6)
    model(x)  # materialise the lazy layer
    with LayerCapture(model) as cap:
        (F.cross_entropy(model(x), y) * len(x)).backward()
    nw = conv.weight.numel()
    ref = ref_grads(model, F.cross_entropy, x, y)
    p_conv = nw + (4 if conv.bias is not None else 0)
    got = per_sample_layer_grads(conv, cap.inputs["0"], cap.output_grads["0"])
    assert rel_err(got, ref[:, :p_conv]) < 1e-12
    a, g = cap.inputs["0"], cap.output_grads["0"]
    full = pairwise_layer_products(conv, a, g, a[:3], g[:3], method="materialize")
    small = pairwise_layer_products(conv, a, g, a[:3], g[:3], method="materialize",
                                    max_elements=1)  # one train row at a time
    assert rel_err(small, full) < 1e-14
    assert rel_err(full, ref[:, :p_conv] @ ref[:3, :p_conv].T) < 1e-12
    ghost = pairwise_layer_products(conv, a, g, a[:3], g[:3], method="ghost")
    assert rel_err(ghost, full) < 1e-12


def test_deferred_sync_and_non_finite(digits, tmp_path):
    """Scores are queued on the device and copied every ``sync_every`` steps: same values as
    copying every step; a NaN is reported with its step and that window is not stored."""
    from dvl_ooc.exceptions import NonFiniteError

    x, y = _data("mixed", digits, 24)
    xv, yv = _data("mixed", digits, 4, offset=300)
    runs = {}
    for sync in (1, 3):
        model = _make("mixed", seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), sync_every=sync,
                          store=tmp_path / f"s{sync}.zarr", flush_every=4)
        for s in range(0, 24, 4):
            opt.zero_grad()
            tr.step(x[s : s + 4], y[s : s + 4], np.arange(s, s + 4), lr=0.1)
            opt.step()
            if s == 8:
                mid = tr.values.copy()  # drains the queue mid-window
                assert mid[:12].all() and not mid[12:].any()
        runs[sync] = tr.values
    assert np.array_equal(runs[1], runs[3])

    model = _make("mixed", seed=1)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), sync_every=4)
    xb = x.clone()
    xb[9, 0, 0, 0] = float("nan")
    for k in range(2):
        tr.step(xb[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4], np.arange(4 * k, 4 * k + 4), lr=0.1)
    with pytest.raises(NonFiniteError, match="at step 2; the scores of steps 0..3"):
        for k in range(2, 4):
            tr.step(xb[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4], np.arange(4 * k, 4 * k + 4),
                    lr=0.1)
    assert not tr.values.any()  # the window with the NaN was not stored
    model = _make("mixed", seed=1)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x))  # CPU: every step
    tr.step(x[:4], y[:4], np.arange(4), lr=0.1)
    with pytest.raises(NonFiniteError, match="at step 1"):
        tr.step(xb[8:12], y[8:12], np.arange(8, 12), lr=0.1)
    assert tr.values[:4].all() and not tr.values[4:].any()


def test_indexed_dataset_loader_and_example(digits, tmp_path):
    """A shuffling DataLoader over IndexedDataset feeds the tracker the right indices (equal
    values to hand-made batches); the example script runs end to end and refuses to overwrite."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.data import DataLoader, TensorDataset

    from dvl_ooc import IndexedDataset

    x, y = _data("mixed", digits, 20)
    xv, yv = _data("mixed", digits, 4, offset=300)

    def loader():
        return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=6, shuffle=True,
                          generator=torch.Generator().manual_seed(3))

    def run(batches):
        tr = InRunShapley(_make("mixed", seed=2), F.cross_entropy, xv, yv, n_train=len(x))
        for idx, xb, yb in batches:
            tr.step(xb, yb, idx, lr=0.1)
        return tr.values

    order = [idx for idx, _, _ in loader()]
    assert not torch.equal(torch.cat(order), torch.arange(len(x)))  # shuffled
    by_hand = run([(idx, x[idx], y[idx]) for idx in order])
    via_loader = run(loader())
    # same samples, same batches (bitwise equality is not promised: collation vs indexing
    # may change memory alignment and with it the convolution kernel's rounding)
    assert rel_err(torch.as_tensor(via_loader), torch.as_tensor(by_hand)) < 1e-12
    assert by_hand.all()
    with pytest.raises(InputError, match=r"\(x, y\) items"):
        IndexedDataset([1, 2, 3])[0]

    script = Path(__file__).parents[2] / "examples" / "inrun_training.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path / "run"), "--epochs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 epochs" in done.stdout and "TracIn self-influence" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.parametrize("kw", [{}, {"second_order": True}, {"combined": True}])
def test_unused_layer_keeps_no_grad(kw, digits):
    """A layer off the loss path keeps ``.grad = None`` as with ``backward()`` (so weight decay
    leaves it alone exactly as in plain training) and gets no score."""

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.spare = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    x, y = _data("linear", digits, 16)
    xv, yv = _data("linear", digits, 4, offset=60)
    models = []
    for tracked in (False, True):
        torch.manual_seed(0)
        model = WithSpare().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=16, **kw) if tracked else None
        for s in range(0, 16, 4):
            opt.zero_grad()
            if tr is None:
                F.cross_entropy(model(x[s : s + 4]), y[s : s + 4]).backward()
            else:
                tr.step(x[s : s + 4], y[s : s + 4], np.arange(s, s + 4), lr=0.1)
            assert model.spare.weight.grad is None
            opt.step()
        models.append(model)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-13) if kw.get("combined") else \
            torch.equal(p, q), n


# ---------------------------------------------------------------------- deprecated names


def test_loss_fn_is_deprecated(digits):
    x, y = _data("linear", digits, 4)
    xv, yv = _data("linear", digits, 3, offset=50)
    new = InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4)
    new.step(x, y, np.arange(4), lr=0.1)
    with pytest.warns(DeprecationWarning, match="loss_fn= is deprecated, use loss="):
        old = InRunShapley(_make("linear"), loss_fn=F.cross_entropy, x_val=xv, y_val=yv,
                           n_train=4)
    old.step(x, y, np.arange(4), lr=0.1)
    assert np.array_equal(old.values, new.values) and old.loss is F.cross_entropy
    with pytest.warns(DeprecationWarning, match=r"use \.loss"):
        assert old.loss_fn is F.cross_entropy
    with pytest.raises(InputError, match="loss= only"):
        InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4,
                     loss_fn=F.cross_entropy)
    with pytest.raises(TypeError, match="unexpected keyword"):
        InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4, lossfn=None)


def test_store_mode_is_deprecated(digits, tmp_path):
    x, y = _data("linear", digits, 4)
    xv, yv = _data("linear", digits, 3, offset=50)
    path = tmp_path / "s.zarr"
    tr = InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4, store=path)
    tr.step(x, y, np.arange(4), lr=0.1)
    tr.close()
    with pytest.warns(DeprecationWarning, match="store_mode= is deprecated, use mode="):
        again = InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4, store=path,
                             store_mode="a")
    assert again.steps == 1  # resumed
    with pytest.raises(InputError, match="mode= only"):
        InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4, store=path,
                     store_mode="a", mode="w")


def test_method_is_deprecated_for_solver(digits):
    x, y = _data("linear", digits, 4)
    xv, yv = _data("linear", digits, 3, offset=50)
    new = InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4,
                       per_validation_point=True, solver="ghost")
    new.step(x, y, np.arange(4), lr=0.1)
    with pytest.warns(DeprecationWarning, match="method= is deprecated, use solver="):
        old = InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4,
                           per_validation_point=True, method="ghost")
    old.step(x, y, np.arange(4), lr=0.1)
    assert old.solver == "ghost" and np.array_equal(old.values, new.values)
    with pytest.raises(InputError, match="method must be"):
        InRunShapley(_make("linear"), F.cross_entropy, xv, yv, n_train=4, solver="nope")
