"""In-Run Data Shapley on BatchNorm networks: values against an explicit per-sample loop with
the batch statistics frozen (float64), training unchanged, eval-mode BatchNorm, the sampled
validation gradient, refused modes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_grads
from torch import nn

from dvl_ooc.demo.resnet import resnet_small
from dvl_ooc.exceptions import InputError, StoreMismatchError, UnsupportedModelError
from dvl_ooc.inrun import InRunShapley

_BN = nn.modules.batchnorm._BatchNorm


class BNMLP(nn.Module):
    """Linear -> BatchNorm1d -> tanh -> Linear: BatchNorm on (n, C) inputs."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 7)
        self.bn = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x.flatten(1)))))


def _resnet(seed=0):
    """The project's BatchNorm ResNet, width 4 (float64, 16x16 inputs, 3 classes)."""
    torch.manual_seed(seed)
    m = resnet_small(n_classes=3, width=4).double()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for mod in m.modules():
            if isinstance(mod, _BN):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def _digits(digits, n, offset=0):
    return (torch.as_tensor(digits.x_train[offset : offset + n]).double(),
            torch.as_tensor(digits.y_train[offset : offset + n]).long())


# ---------------------------------------------------------------------- the reference


def _batch_statistics(model, x):
    """Per BatchNorm: the (mean, biased variance) of its input in a training-mode forward of
    ``x`` (on a copy: the model's running statistics are not touched)."""
    m = copy.deepcopy(model).train()
    stats = {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, _BN):
            def pre(mod, inp, name=name):
                dims = [0] + list(range(2, inp[0].ndim))
                stats[name] = (inp[0].mean(dims), inp[0].var(dims, unbiased=False))
            hooks.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return stats


def _frozen(model, stats):
    """A copy whose BatchNorms normalise with the given statistics (eval mode with the batch's
    mean/variance as running statistics): the frozen-statistics network, one sample at a
    time."""
    m = copy.deepcopy(model).eval()
    for name, mod in m.named_modules():
        if isinstance(mod, _BN):
            mod.track_running_stats = True
            mod.running_mean = stats[name][0].clone()
            mod.running_var = stats[name][1].clone()
    return m


def _explicit_run(make, x, y, xv, yv, per_val, *, epochs=2, b=6, mask=None, eval_bn=False):
    """Plain SGD, and beside it the In-Run values by explicit per-sample loops: sample i's
    gradient of the network with this batch's statistics frozen; the validation gradient of
    the model in eval mode at the pre-step weights (after the step's forward updated the
    running statistics, as in the tracker)."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    n = len(x)
    vals = torch.zeros(n, len(xv), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    steps = []
    for e in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, b):
            idx = perm[s : s + b]
            lr = 0.05 * (1 + e) / (1 + s)
            if eval_bn:
                gt = ref_grads(model.eval(), F.cross_entropy, x[idx], y[idx])
            else:
                gt = ref_grads(_frozen(model, _batch_statistics(model, x[idx])),
                               F.cross_entropy, x[idx], y[idx])
            model.train(not eval_bn)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            gv = ref_grads(model.eval(), F.cross_entropy, xv, yv)
            model.train(not eval_bn)
            if mask is not None:
                gt, gv = gt[:, mask], gv[:, mask]
            vals[idx] += lr / len(idx) * gt @ gv.T
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.step()
            steps.append((idx, lr))
    return (vals if per_val else vals.sum(1)), steps, model


def _replay(make, steps, x, y, xv, yv, eval_bn=False, **kw):
    model = make().train(not eval_bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), **kw)
    for idx, lr in steps:
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.zero_grad()
        tr.step(x[idx], y[idx], idx.numpy(), lr=lr)
        opt.step()
    return tr, model


def _columns(model, layers):
    """Mask of the flat (ref_grads) parameter vector belonging to ``layers``."""
    return torch.cat([torch.full((p.numel(),), n.rsplit(".", 1)[0] in layers)
                      for n, p in model.named_parameters() if p.requires_grad])


# ---------------------------------------------------------------------- values


@pytest.mark.parametrize("per_val", [False, True])
def test_resnet_values_equal_frozen_statistics_loop(per_val):
    """The BatchNorm ResNet in training mode: In-Run values (summed and per validation point)
    equal the explicit loop over per-sample gradients with the batch statistics frozen."""
    x, y = _images(12, 0)
    xv, yv = _images(4, 1)
    ref, steps, ref_model = _explicit_run(_resnet, x, y, xv, yv, per_val)
    tr, model = _replay(_resnet, steps, x, y, xv, yv, per_validation_point=per_val)
    assert rel_err(tr.values, ref) < 1e-10
    # training and the running statistics are those of plain training
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    # the convention matters: the true (coupled) batch gradient is not the sum of g_i
    assert np.abs(tr.values).max() > 1e-3


@pytest.mark.parametrize("layers", [["fc1"], ["bn", "fc2"], None])
def test_batchnorm1d_values_and_layer_subsets(layers, digits):
    """BatchNorm1d on (n, C): the whole network, the BatchNorm layer itself, and a Linear
    layer upstream of it (whose rows need the frozen-statistics backward)."""
    x, y = _digits(digits, 12)
    xv, yv = _digits(digits, 5, offset=300)

    def make():
        torch.manual_seed(4)
        m = BNMLP().double()
        nn.init.uniform_(m.bn.weight, 0.5, 1.5)
        nn.init.uniform_(m.bn.bias, -0.5, 0.5)
        return m

    mask = None if layers is None else _columns(make(), layers)
    ref, steps, _ = _explicit_run(make, x, y, xv, yv, False, mask=mask)
    tr, _ = _replay(make, steps, x, y, xv, yv, layers=layers)
    assert rel_err(tr.values, ref) < 1e-10


def test_batchnorm_without_running_statistics(digits):
    """A BatchNorm without running statistics normalises with batch statistics also in eval
    mode: the validation rows (one chunk) are then frozen at their own statistics too."""
    x, y = _digits(digits, 8)
    xv, yv = _digits(digits, 5, offset=300)
    torch.manual_seed(6)
    model = BNMLP().double()
    model.bn = nn.BatchNorm1d(7, track_running_stats=False).double()
    nn.init.uniform_(model.bn.weight, 0.5, 1.5)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=8)
    g = ref_grads(_frozen(model, _batch_statistics(model, x)), F.cross_entropy, x, y)
    v = ref_grads(_frozen(model, _batch_statistics(model, xv)), F.cross_entropy, xv, yv)
    tr.step(x, y, np.arange(8), lr=8.0)
    assert rel_err(tr.values, g @ v.sum(0)) < 1e-10
    per = InRunShapley(model, F.cross_entropy, xv, yv, n_train=8, per_validation_point=True)
    per.step(x, y, np.arange(8), lr=8.0)
    assert rel_err(per.values, g @ v.T) < 1e-10


def test_sum_of_frozen_gradients_is_not_the_batch_gradient():
    """Sanity of the reference: with batch statistics the per-sample gradients of the frozen
    network do not sum to the batch gradient (so the tests above can tell the conventions
    apart), while in eval mode they do."""
    model = _resnet()
    x, y = _images(6, 2)
    g = ref_grads(_frozen(model, _batch_statistics(model, x)), F.cross_entropy, x, y)
    model.train()
    full = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    full = torch.cat([t.reshape(-1) for t in full])
    assert rel_err(g.mean(0), full) > 0.05
    model.eval()
    full = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    full = torch.cat([t.reshape(-1) for t in full])
    assert rel_err(ref_grads(model, F.cross_entropy, x, y).mean(0), full) < 1e-12


# ---------------------------------------------------------------------- training unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_and_running_statistics_bit_identical(dtype):
    """After every tracked step ``.grad`` equals a plain ``loss.backward()`` bit for bit, and
    the weights and running statistics of an Adam run equal plain training's."""
    x, y = _images(24, 3)
    x = x.to(dtype)
    xv, yv = _images(5, 4)
    plain, tracked = _resnet(1).to(dtype).train(), _resnet(1).to(dtype).train()
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, tracked)]
    tr = InRunShapley(tracked, F.cross_entropy, xv.to(dtype), yv, n_train=len(x))
    for s in range(0, len(x), 8):
        sl = slice(s, s + 8)
        for o in opts:
            o.zero_grad()
        F.cross_entropy(plain(x[sl]), y[sl]).backward()
        tr.step(x[sl], y[sl], np.arange(s, s + 8), lr=1e-2)
        for (n, p), (_, q) in zip(plain.named_parameters(), tracked.named_parameters()):
            assert torch.equal(p.grad, q.grad), n
        for o in opts:
            o.step()
    for (n, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), n
    assert tracked.training and np.isfinite(tr.values).all() and np.abs(tr.values).sum() > 0


@pytest.mark.parametrize("kw", [{}, {"per_validation_point": True}])
def test_steps_free_their_activations(kw):
    """A step's activations die with the step: nothing of the graph survives it, even through
    reference cycles (an autograd context that held the capture kept every step's activations
    alive, beyond the reach of the garbage collector: 1.3 GB per epoch on the images recipe's
    ResNet). Checked with weak references to every BatchNorm output, and by the number of
    live tensors after more steps."""
    import gc
    import weakref

    x, y = _images(24, 5)
    xv, yv = _images(4, 6)
    model = _resnet(2).train()
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), **kw)
    refs: list[weakref.ref] = []
    handles = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
               for m in model.modules() if isinstance(m, _BN)]

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    tr.step(x[:8], y[:8], np.arange(8), lr=1e-2)
    assert len(refs) > 0 and tr._coupled()
    assert all(r() is None for r in refs), "a BatchNorm output outlived its step"
    for h in handles:
        h.remove()
    before = live_tensors()
    for s in range(0, len(x), 8):
        tr.step(x[s : s + 8], y[s : s + 8], np.arange(s, s + 8), lr=1e-2)
    assert live_tensors() == before


# ---------------------------------------------------------------------- eval-mode BatchNorm


@pytest.mark.parametrize("kw", [{}, {"per_validation_point": True}, {"combined": True},
                                {"combined": True, "per_validation_point": True}])
def test_eval_mode_batchnorm_is_elementwise(kw):
    """BatchNorm in eval mode while training (running statistics, e.g. frozen BatchNorm when
    fine-tuning): no coupling; per-sample gradients are the plain ones and the affine
    parameters are attributed like an elementwise layer (also in combined mode)."""
    x, y = _images(12, 5)
    xv, yv = _images(4, 6)

    def make():
        m = _resnet(2)
        m.train()
        with torch.no_grad():  # running statistics away from their (0, 1) initial values
            for s in range(0, 12, 4):
                m(x[s : s + 4] * 2 + 0.5)
        return m.eval()

    per_val = kw.get("per_validation_point", False)
    ref, steps, ref_model = _explicit_run(make, x, y, xv, yv, per_val, eval_bn=True)
    tr, model = _replay(make, steps, x, y, xv, yv, eval_bn=True, **kw)
    assert rel_err(tr.values, ref) < 1e-10
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), n


@pytest.mark.parametrize("kw", [{}, {"per_validation_point": True}])
def test_frozen_batchnorm_stays_frozen(kw):
    """A model in training mode whose BatchNorm layers the user froze (eval mode, as when
    fine-tuning) keeps them frozen across steps: the validation pass's switch to eval mode
    gives every module its own mode back, and training equals plain training bit for bit."""
    x, y = _images(16, 9)
    xv, yv = _images(4, 10)

    def make():
        m = _resnet(3).train()
        for mod in m.modules():
            if isinstance(mod, _BN):
                mod.eval()
        return m

    plain, tracked = make(), make()
    modes = [mod.training for mod in tracked.modules()]
    assert any(modes) and not all(modes)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, tracked)]
    tr = InRunShapley(tracked, F.cross_entropy, xv, yv, n_train=len(x), **kw)
    for s in range(0, len(x), 8):
        for o in opts:
            o.zero_grad()
        F.cross_entropy(plain(x[s : s + 8]), y[s : s + 8]).backward()
        tr.step(x[s : s + 8], y[s : s + 8], np.arange(s, s + 8), lr=0.1)
        for o in opts:
            o.step()
        assert [mod.training for mod in tracked.modules()] == modes
    for (n, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------- refused modes


def test_batch_statistics_refuse_combined_and_second_order():
    x, y = _images(6, 7)
    xv, yv = _images(3, 8)
    model = _resnet().train()
    for kw in ({"combined": True}, {"second_order": True}):
        with pytest.raises(UnsupportedModelError, match="eval mode"):
            InRunShapley(model, F.cross_entropy, xv, yv, n_train=6, **kw)
    # created in eval mode, stepped in training mode: refused before any work
    tr = InRunShapley(model.eval(), F.cross_entropy, xv, yv, n_train=6, combined=True)
    model.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="combined"):
        tr.step(x, y, np.arange(6), lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]), n
    assert tr.steps == 0 and not tr.values.any()


def test_batchnorm_layer_selection():
    xv, yv = _images(3, 8)
    model = _resnet()
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=6, layers=["layer1.0.bn1", "fc"])
    assert tr.layers == ["layer1.0.bn1", "fc"]
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        InRunShapley(nn.Sequential(nn.Flatten(), nn.Linear(768, 5), nn.LayerNorm(5)).double(),
                     F.cross_entropy, xv, yv, n_train=5)
    no_affine = nn.Sequential(nn.Flatten(), nn.Linear(768, 5), nn.BatchNorm1d(5, affine=False),
                              nn.Linear(5, 3)).double()
    with pytest.raises(InputError, match="no trainable parameters"):
        InRunShapley(no_affine, F.cross_entropy, xv, yv, n_train=5, layers=["2"])
    # a BatchNorm without affine parameters still couples the batch: handled, not attributed
    x, y = _images(6, 9)
    tr = InRunShapley(no_affine.train(), F.cross_entropy, xv, yv, n_train=6)
    tr.step(x, y, np.arange(6), lr=1.0)
    g = ref_grads(_frozen(no_affine, _batch_statistics(no_affine, x)), F.cross_entropy, x, y)
    v = ref_grads(no_affine.eval(), F.cross_entropy, xv, yv).sum(0)
    assert rel_err(tr.values, g @ v / 6) < 1e-10


# ---------------------------------------------------------------------- sampled validation


def test_val_sample_rows_stream():
    """Every validation row equally often, deterministic, continued by a resumed tracker."""
    model = _resnet()
    xv, yv = _images(7, 10)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=4, val_sample=3, seed=5)
    rows = np.concatenate([tr.val_rows(t) for t in range(14)])  # 42 = 6 passes over 7 rows
    assert np.array_equal(np.bincount(rows, minlength=7), np.full(7, 6))
    assert all(len(tr.val_rows(t)) == 3 for t in range(14))
    other = InRunShapley(model, F.cross_entropy, xv, yv, n_train=4, val_sample=3, seed=5)
    assert np.array_equal(np.concatenate([other.val_rows(t) for t in range(13, -1, -1)]),
                          np.concatenate([tr.val_rows(t) for t in range(13, -1, -1)]))
    seeded = InRunShapley(model, F.cross_entropy, xv, yv, n_train=4, val_sample=3, seed=6)
    assert not np.array_equal(seeded.val_rows(0), tr.val_rows(0))
    assert InRunShapley(model, F.cross_entropy, xv, yv, n_train=4, val_sample=7).val_sample \
        is None  # all rows: exact
    for kw in ({"per_validation_point": True}, {"combined": True}):
        with pytest.raises(InputError, match="val_sample"):
            InRunShapley(model.eval(), F.cross_entropy, xv, yv, n_train=4, val_sample=2, **kw)
    with pytest.raises(InputError, match="val_sample"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=4, val_sample=0)


def test_val_sample_values_and_resume(tmp_path):
    """With ``val_sample=k`` a step's values are ``(lr / b) <g_i, (n_val / k) sum_{j in S_t}
    g_j>`` over that step's rows ``S_t``; a run resumed from its store continues the stream."""
    x, y = _images(12, 11)
    xv, yv = _images(5, 12)
    _, steps, _ = _explicit_run(_resnet, x, y, xv, yv, True)
    tr, _ = _replay(_resnet, steps, x, y, xv, yv, val_sample=2, seed=3)
    # the reference: per-validation-point values, each step's columns weighted by its rows
    model = _resnet().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    ref = torch.zeros(len(x), dtype=torch.float64)
    for t, (idx, lr) in enumerate(steps):
        gt = ref_grads(_frozen(model, _batch_statistics(model, x[idx])), F.cross_entropy,
                       x[idx], y[idx])
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        rows = tr.val_rows(t)
        gv = ref_grads(model.eval(), F.cross_entropy, xv[rows], yv[rows])
        model.train()
        ref[idx] += lr / len(idx) * gt @ gv.sum(0) * (5 / 2)
        opt.step()
    assert rel_err(tr.values, ref) < 1e-10
    # interrupted after two steps and resumed from the store: the same values
    path = tmp_path / "s.zarr"
    first, second = steps[:2], steps[2:]
    model = _resnet().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    for part, mode in ((first, "w-"), (second, "a")):
        t = InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), val_sample=2, seed=3,
                         store=path, mode=mode, flush_every=1)
        for idx, lr in part:
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.zero_grad()
            t.step(x[idx], y[idx], idx.numpy(), lr=lr)
            opt.step()
        t.close()
    assert rel_err(t.values, ref) < 1e-10
    with pytest.raises(StoreMismatchError, match="val_sample"):
        InRunShapley(model, F.cross_entropy, xv, yv, n_train=len(x), val_sample=3, seed=3,
                     store=path, mode="a")


def test_in_place_after_batchnorm_is_refused():
    """ReLU(inplace=True) after a training-mode BatchNorm: refused before .grad, the running
    statistics or the store are touched; inplace=False works."""
    x, y = _images(6, 13)
    xv, yv = _images(3, 14)

    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()

    model = net(True)
    before = copy.deepcopy(model.state_dict())
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=6)
    with pytest.raises(UnsupportedModelError, match="in place.*inplace=False"):
        tr.step(x, y, np.arange(6), lr=1.0)
    assert all(p.grad is None for p in model.parameters()) and not tr.values.any()
    for n, v in model.state_dict().items():  # running statistics as before the step
        assert torch.equal(v, before[n]), n
    ok = net(False)
    tr = InRunShapley(ok, F.cross_entropy, xv, yv, n_train=6)
    tr.step(x, y, np.arange(6), lr=6.0)
    g = ref_grads(_frozen(ok, _batch_statistics(ok, x)), F.cross_entropy, x, y)
    v = ref_grads(ok.eval(), F.cross_entropy, xv, yv).sum(0)
    assert rel_err(tr.values, g @ v) < 1e-10
    # a Conv2d output changed in place (before a BatchNorm): its rows would be those of the
    # changed tensor; refused naming the layer
    conv_inplace = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    tr = InRunShapley(conv_inplace, F.cross_entropy, xv, yv, n_train=6)
    with pytest.raises(UnsupportedModelError, match="layer '0' is modified in place"):
        tr.step(x, y, np.arange(6), lr=1.0)
    assert all(p.grad is None for p in conv_inplace.parameters())
