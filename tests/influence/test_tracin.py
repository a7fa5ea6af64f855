"""TracInCP against explicit loops over checkpoints and pairs; dense and per-layer
projections; errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_grads
from torch import nn

from dvl_ooc.exceptions import InputError
from dvl_ooc.influence.tracin import TracInCP


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv1(x)).flatten(1))))


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """SGD on 60 digits saving 3 checkpoints (two in memory, one on disk)."""
    torch.manual_seed(0)
    model = SmallCNN().double()
    x = torch.as_tensor(digits.x_train[:60]).double()
    y = torch.as_tensor(digits.y_train[:60]).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ckpts, lrs = [], []
    path = tmp_path_factory.mktemp("ckpt") / "c2.pt"
    for epoch in range(6):
        for s in range(0, 60, 20):
            opt.zero_grad()
            F.cross_entropy(model(x[s : s + 20]), y[s : s + 20]).backward()
            opt.step()
        if epoch % 2 == 1:
            sd = {k: v.clone() for k, v in model.state_dict().items()}
            lrs.append(0.3 / (epoch + 1))
            if len(ckpts) == 2:
                torch.save({"state_dict": sd}, path)
                ckpts.append(path)
            else:
                ckpts.append(sd)
    xt = torch.as_tensor(digits.x_test[:7]).double()
    yt = torch.as_tensor(digits.y_test[:7]).long()
    return model, ckpts, lrs, x[:11], y[:11], xt, yt


def _ref_grads_at(model, ckpt, x, y, names=None):
    m = SmallCNN().double()
    sd = ckpt if isinstance(ckpt, dict) else torch.load(ckpt)["state_dict"]
    m.load_state_dict(sd)
    if names is not None:
        for n, p in m.named_parameters():
            p.requires_grad_(any(n == k or n.startswith(k + ".") for k in names))
    return ref_grads(m, F.cross_entropy, x, y)


def _explicit(ckpts, lrs, xt, yt, x, y, names=None):
    out = torch.zeros(len(xt), len(x), dtype=torch.float64)
    for ck, eta in zip(ckpts, lrs):
        gt = _ref_grads_at(None, ck, xt, yt, names)
        gr = _ref_grads_at(None, ck, x, y, names)
        for t in range(len(xt)):
            for r in range(len(x)):
                out[t, r] += eta * torch.dot(gt[t], gr[r])
    return out


def test_tracin_equals_explicit_loop(run):
    model, ckpts, lrs, x, y, xt, yt = run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = TracInCP(model, F.cross_entropy, ckpts, lrs)
    ref = _explicit(ckpts, lrs, xt, yt, x, y)
    assert rel_err(tr.influences(xt, yt, x, y), ref) < 1e-10
    ref_self = _explicit(ckpts, lrs, x, y, x, y).diagonal()
    assert rel_err(tr.self_influence(x, y), ref_self) < 1e-10
    assert rel_err(tr.influences(x, y), _explicit(ckpts, lrs, x, y, x, y)) < 1e-10
    # the calculator's feature split gives the same matrix
    feats = tr.test_features(tr.gradients(xt, yt)) @ tr.train_features(tr.gradients(x, y)).T
    assert rel_err(feats, ref) < 1e-10
    # the caller's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # fit takes no data and keeps none
    assert tr.fit(None) is tr and tr._fit_data is None


def test_tracin_layer_restriction(run):
    model, ckpts, lrs, x, y, xt, yt = run
    tr = TracInCP(model, F.cross_entropy, ckpts, 0.5, layers=["fc2", "conv1.bias"])
    assert tr.grads.num_params == 8 * 10 + 10 + 3
    ref = _explicit(ckpts, [0.5] * 3, xt, yt, x, y, names=["fc2", "conv1.bias"])
    assert rel_err(tr.influences(xt, yt, x, y), ref) < 1e-10


def test_orthogonal_projection_with_full_dimension_is_exact(run):
    model, ckpts, lrs, x, y, xt, yt = run
    exact = TracInCP(model, F.cross_entropy, ckpts, lrs).influences(xt, yt, x, y)
    p = TracInCP(model, F.cross_entropy, ckpts[:1], 1.0).grads.num_params
    tr = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_kind="orthogonal",
                  projection_dim=p + 5)
    assert tr.feature_dim == 3 * p
    assert rel_err(tr.influences(xt, yt, x, y), exact) < 1e-10


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthogonal"])
def test_random_projection_preserves_inner_products(run, kind):
    model, ckpts, lrs, x, y, xt, yt = run
    exact = TracInCP(model, F.cross_entropy, ckpts, lrs)
    g_t, g_r = exact.gradients(xt, yt), exact.gradients(x, y)
    ref = g_t @ g_r.T
    scale = g_t.norm(dim=1)[:, None] * g_r.norm(dim=1)[None, :]
    errs = []
    for d in (16, 256):
        tr = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_kind=kind,
                      projection_dim=d, seed=3)
        assert tr.gradients(x, y).shape == (len(x), 3 * d)
        errs.append(float(((tr.influences(xt, yt, x, y) - ref).abs() / scale).mean()))
    # JL: relative error ~ 1/sqrt(d)
    assert errs[1] < 0.12
    assert errs[1] < errs[0]


def test_projection_is_deterministic_and_blockwise_consistent(run):
    model, ckpts, lrs, x, y, xt, yt = run
    a = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=32, seed=1)
    # tiny cache: regenerated block by block, must give the same matrix
    b = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=32, seed=1,
                 projection_cache_elements=32 * 7)
    b.projection_block_rows = 100  # several seeded row blocks; a caches, b streams them
    a.projection_block_rows = 100
    c = pickle.loads(pickle.dumps(a))
    ga = a.gradients(x, y)
    assert rel_err(b.gradients(x, y), ga) < 1e-12
    assert torch.equal(c.gradients(x, y), ga)
    other = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=32, seed=2)
    assert not torch.allclose(other.gradients(x, y), ga)


def test_fingerprint_covers_checkpoints(run):
    model, ckpts, lrs, *_ = run
    f1 = TracInCP(model, F.cross_entropy, ckpts, lrs).fingerprint()
    assert TracInCP(model, F.cross_entropy, ckpts, lrs).fingerprint() == f1
    changed = [dict(ckpts[0]), ckpts[1], ckpts[2]]
    changed[0]["fc2.bias"] = changed[0]["fc2.bias"] + 1e-9
    assert TracInCP(model, F.cross_entropy, changed, lrs).fingerprint() != f1
    assert TracInCP(model, F.cross_entropy, ckpts, [1.0, 1.0, 1.0]).fingerprint() != f1


def test_tracin_bad_input(run, tmp_path):
    model, ckpts, lrs, x, y, xt, yt = run
    with pytest.raises(InputError, match="non-empty"):
        TracInCP(model, F.cross_entropy, [], 1.0)
    with pytest.raises(InputError, match="learning rates"):
        TracInCP(model, F.cross_entropy, ckpts, [1.0, 2.0])
    with pytest.raises(InputError, match="does not exist"):
        TracInCP(model, F.cross_entropy, [tmp_path / "nope.pt"], 1.0)
    with pytest.raises(InputError, match="architecture"):
        TracInCP(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double(), F.cross_entropy,
                 ckpts, 1.0)
    with pytest.raises(InputError, match="projection"):
        TracInCP(model, F.cross_entropy, ckpts, 1.0, projection_kind="sparse", projection_dim=4)
    with pytest.raises(InputError, match="projection_kind"):
        TracInCP(model, F.cross_entropy, ckpts, 1.0, projection="sparse", projection_dim=4)
    with pytest.raises(InputError, match="not a parameter"):
        TracInCP(model, F.cross_entropy, ckpts, 1.0, layers=["fc9"])
    tr = TracInCP(model, F.cross_entropy, ckpts, 1.0, projection_dim=4)
    with pytest.raises(InputError, match="features"):
        tr.precondition(torch.zeros(2, 5, dtype=torch.float64))


def test_tracin_through_the_calculator(run, tmp_path):
    """The tiling calculator uses gradients / test_features / train_features unchanged."""
    from dvl_ooc.calculator import SequentialInfluenceCalculator

    model, ckpts, lrs, x, y, xt, yt = run
    tr = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=64)
    store = SequentialInfluenceCalculator(tr).to_zarr(
        tmp_path / "tracin.zarr", xt.numpy(), yt.numpy(), x.numpy(), y.numpy(), test_chunk=3,
        train_chunk=4, progress=False, dtype="float64", self_influence=True)
    got = torch.as_tensor(np.asarray(store.influences[...]))
    assert rel_err(got, tr.influences(xt, yt, x, y)) < 1e-10
    si = torch.as_tensor(np.asarray(store.self_influence[...]))
    assert rel_err(si, tr.self_influence(x, y)) < 1e-10


def test_projection_streams_come_from_the_seeding_helper(run):
    """Each row block of a projection is the stream ``(seed, k, 0, first row)`` of
    :mod:`dvl_ooc.seeding` (identical on every worker, process and run); orthogonal
    projections use ``(seed, k, 1, 0)``."""
    import math

    from dvl_ooc.seeding import torch_generator

    model, ckpts, lrs, x, y, xt, yt = run
    tr = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=8, seed=11)
    tr.projection_block_rows = 50
    p = tr.grads.num_params
    g = torch.eye(p, dtype=torch.float64)
    want = torch.cat([torch.randn(min(50, p - s), 8, generator=torch_generator(11, 2, 0, s),
                                  dtype=torch.float64) for s in range(0, p, 50)]) / math.sqrt(8)
    assert torch.equal(tr._project(2, g), want)
    orth = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_kind="orthogonal",
                    projection_dim=8, seed=11)
    Q, R = torch.linalg.qr(torch.randn(p, 8, generator=torch_generator(11, 0, 1, 0),
                                       dtype=torch.float64))
    assert torch.equal(orth._project(0, g), Q * torch.sign(torch.diagonal(R)) * math.sqrt(p / 8))
    with pytest.raises(InputError, match="seed"):
        TracInCP(model, F.cross_entropy, ckpts, lrs, projection_dim=8, seed=-1)


# ---------------------------------------------------------------------- projection= (per layer)
def _per_layer(K, seed=0, dense_dim=8):
    return dict(k_in=K, k_out=K, dense_dim=dense_dim, seed=seed)


def test_layer_projection_converges_to_unprojected_tracin(run):
    """Relative error of the test x train matrix falls with k (mean over seeds 0-2) and is
    round-off at full size (every side capped: the features are the gradients rearranged)."""
    model, ckpts, lrs, x, y, xt, yt = run
    ref = _explicit(ckpts, lrs, xt, yt, x, y)
    errs = {}
    for K in (4, 16, 64):  # SmallCNN: d_in <= 49, d_out <= 10, so K = 64 is full size
        e = [rel_err(TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(K, s))
                     .influences(xt, yt, x, y), ref) for s in range(3)]
        errs[K] = sum(e) / len(e)
    assert errs[64] < 1e-12
    assert errs[4] > errs[16] > errs[64]
    assert 0.2 < errs[4] < 1.2 and errs[16] < 0.3  # measured: 0.57, 0.15 (seeds 0-4)
    # self-influence of the same features, and the calculator's feature split
    tr = TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(64))
    assert rel_err(tr.self_influence(x, y), _explicit(ckpts, lrs, x, y, x, y).diagonal()) < 1e-12
    assert tr.feature_dims() == (3 * 512, 3 * 512) == (tr.feature_dim, tr.feature_dim)


def test_layer_projection_is_one_matrix_for_every_checkpoint(run):
    """Checkpoint k's features are sqrt(eta_k) P g(w_k) with the SAME P (the projector's
    matrices, applied to explicit per-sample gradients), so inner products add up over
    checkpoints."""
    from dvl_ooc.layers.projection import GradientProjector

    model, ckpts, lrs, x, y, xt, yt = run
    tr = TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(4, seed=5))
    k = tr.grads.num_params
    assert k == 3 * 4 + 4 * 4 + 4 * 4 and tr.feature_dim == 3 * k
    feats = tr.gradients(x, y)
    proj = GradientProjector(model, k_in=4, k_out=4, dense_dim=8, seed=5,
                             dtype=torch.float64)
    for j, (ck, eta) in enumerate(zip(ckpts, lrs)):
        want = eta**0.5 * proj.project_vectors(_ref_grads_at(None, ck, x, y))
        assert rel_err(feats[:, j * k : (j + 1) * k], want) < 1e-12


def test_layer_projection_determinism_config_and_errors(run, tmp_path):
    model, ckpts, lrs, x, y, xt, yt = run
    a = TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(4, seed=1))
    b = TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(4, seed=1))
    c = TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(4, seed=2))
    fa = a.gradients(x, y)
    assert torch.equal(b.gradients(x, y), fa)
    assert torch.equal(pickle.loads(pickle.dumps(a)).gradients(x, y), fa)  # shipped to a worker
    assert not torch.allclose(c.gradients(x, y), fa)
    # config and fingerprint carry the projector's configuration
    cfg = a.config()
    assert cfg["projection"]["k_in"] == 4 and cfg["projection"]["seed"] == 1
    assert cfg["projection_dim"] is None and cfg["layers"] is None
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.fingerprint() != TracInCP(model, F.cross_entropy, ckpts, lrs).fingerprint()
    # a GradientProjector built on the caller's model: rebuilt on TracIn's copy, same features
    from dvl_ooc.layers.projection import GradientProjector

    proj = GradientProjector(model, k_in=4, k_out=4, dense_dim=8, seed=1, dtype=torch.float64)
    p = TracInCP(model, F.cross_entropy, ckpts, lrs, projection=proj)
    assert p.projector is not proj and p.projector.model is p.model
    assert torch.equal(p.gradients(x, y), fa) and p.fingerprint() == a.fingerprint()
    # layer selection goes to the projector
    sel = TracInCP(model, F.cross_entropy, ckpts, lrs, layers=["fc2"], projection=_per_layer(4))
    assert sel.layers == ["fc2"] and sel.grads.num_params == 4 * 4
    # the calculator: feature_dims and tiles of projected features
    from dvl_ooc.calculator import SequentialInfluenceCalculator

    store = SequentialInfluenceCalculator(a).to_zarr(
        tmp_path / "p.zarr", xt.numpy(), yt.numpy(), x.numpy(), y.numpy(), test_chunk=3,
        train_chunk=4, progress=False, dtype="float64")
    assert rel_err(np.asarray(store.influences[...]), a.influences(xt, yt, x, y)) < 1e-12
    # refusals
    with pytest.raises(InputError, match="mutually exclusive"):
        TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(4), projection_dim=8)
    with pytest.raises(InputError, match="mutually exclusive"):
        TracInCP(model, F.cross_entropy, ckpts, lrs, projection=_per_layer(4),
                 projection_kind="orthogonal")
    with pytest.raises(InputError, match="another model"):
        TracInCP(model, F.cross_entropy, ckpts, lrs,
                 projection=GradientProjector(SmallCNN().double(), k_in=4))
    with pytest.raises(InputError, match="differs"):
        TracInCP(model, F.cross_entropy, ckpts, lrs, projection=proj, layers=["fc2"])
    with pytest.raises(InputError, match="unknown keys"):
        TracInCP(model, F.cross_entropy, ckpts, lrs, projection=dict(k=4))


def test_projection_string_is_the_deprecated_projection_kind(run):
    model, ckpts, lrs, x, y, xt, yt = run
    with pytest.warns(DeprecationWarning, match="projection_kind='rademacher'"):
        old = TracInCP(model, F.cross_entropy, ckpts, lrs, projection="rademacher",
                       projection_dim=8)
    new = TracInCP(model, F.cross_entropy, ckpts, lrs, projection_kind="rademacher",
                   projection_dim=8)
    assert old.config() == new.config() and torch.equal(old.gradients(x, y), new.gradients(x, y))


def test_layer_projection_on_a_batchnorm_resnet():
    """ResNet-18 layout (BatchNorm in eval mode, residual blocks): at full size the projected
    TracIn equals an explicit autograd loop; at k = 3360 (of p = 44,358) it is close; the
    BatchNorm parameters go through the dense block and their running statistics come from
    each checkpoint."""
    from reference import ref_grads

    from dvl_ooc.demo.resnet import ResNet18

    g = torch.Generator().manual_seed(0)
    model = ResNet18(n_classes=2, width=4, stem="cifar", seed=0).double().eval()
    c0 = {k: v.clone() for k, v in model.state_dict().items()}
    c1 = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype)
          if v.is_floating_point() else v.clone() for k, v in c0.items()}
    for k in c1:
        if k.endswith("running_var"):
            c1[k] = c0[k].abs() + 0.5
    x = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    ref = torch.zeros(2, 4, dtype=torch.float64)
    for ck, eta in zip((c0, c1), (0.1, 0.05)):
        m = ResNet18(n_classes=2, width=4, stem="cifar").double().eval()
        m.load_state_dict(ck)
        gr = ref_grads(m, F.cross_entropy, x, y)
        ref += eta * gr[:2] @ gr[2:].T
    full = TracInCP(model, F.cross_entropy, [c0, c1], [0.1, 0.05],
                    projection=dict(k_in=10**4, k_out=10**4, dense_dim=10**4))
    assert full.grads.num_params == 44_358 and "<dense>" in full.config()["blocks"]["model"]
    assert rel_err(full.influences(x[:2], y[:2], x[2:], y[2:]), ref) < 1e-10
    small = TracInCP(model, F.cross_entropy, [c0, c1], [0.1, 0.05],
                     projection=dict(k_in=16, k_out=16, dense_dim=32, seed=1))
    assert small.grads.num_params == 3360
    assert rel_err(small.influences(x[:2], y[:2], x[2:], y[2:]), ref) < 0.3  # measured 0.09
