"""Per-layer projected gradients (LoGra): every kind's ``project`` against the projection of
explicit per-sample gradients, :class:`GradientProjector` against an autograd loop (float64),
convergence of inner products as ``k`` grows, determinism across instances, pickles and
processes, micro-batching, layer selection and clear errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_grads
from torch import nn

from dvl_ooc.exceptions import InputError, UnsupportedModelError
from dvl_ooc.grads import ModelGradients
from dvl_ooc.layers import GradientProjector, kind_of

if "layer_problems" not in sys.modules:  # the single-layer problems of tests/layers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
from layer_problems import LAYERS, make_problem  # noqa: E402

LOSS = F.cross_entropy


# ---------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, d_in=6, h=8, c=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h)
        self.fc2 = nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    """Stride, padding, dilation, a rectangular kernel, a conv without bias, "same" padding."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                               bias=False)
        self.conv2 = nn.Conv2d(4, 3, 3, padding="same")
        self.head = nn.Linear(3 * 4 * 8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.flatten(1))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.seq = nn.Linear(4, 5)  # on (n, T, 4) sequences
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.seq(self.emb(idx))).mean(1))


class ResNetBlock(nn.Module):
    """A residual block with BatchNorm (eval) and a LayerNorm before the head: the BN
    parameters go through the dense projection from captured rows, the LayerNorm's through
    torch.func."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        r = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(h + self.bn2(self.conv2(r)))
        return self.fc(self.norm(h.mean((2, 3))))


def _init(model, seed=0):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.double().eval()


def make(name, n=7, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    if name == "mlp":
        model, x = MLP(), torch.randn(n, 6, generator=g)
    elif name == "cnn":
        model, x = CNN(), torch.randn(n, 2, 7, 8, generator=g)
    elif name == "embedding":
        model, x = EmbeddingNet(), torch.randint(0, 10, (n, 5), generator=g)
        x[0, :2] = 0  # padding positions
    elif name == "resnet":
        model, x = ResNetBlock(), torch.randn(n, 3, 6, 6, generator=g)
    else:
        raise KeyError(name)
    model = _init(model, seed)
    if x.is_floating_point():
        x = x.double()
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


MODELS = ["mlp", "cnn", "embedding", "resnet"]


def projector(model, **kw):
    kw = {"k_in": 3, "k_out": 2, "dense_dim": 5, "dtype": torch.float64, "loss": LOSS, **kw}
    return GradientProjector(model, **kw)


# ---------------------------------------------------------------------- the kinds
#: every single-layer problem, and those with a bias once more with the bias left out
_KIND_CASES = [(n, True) for n in LAYERS] + [
    (n, False) for n in LAYERS if getattr(LAYERS[n][0](), "bias", None) is not None]


@pytest.mark.parametrize(("name", "bias"), _KIND_CASES)
def test_kind_project_equals_projected_per_sample_grads(name, bias):
    p = make_problem(name)
    mod, kind = p.layer, kind_of(p.layer)
    has_bias = kind.has_bias(mod)
    d_out, d_in = kind.projection_dims(mod, bias=bias and has_bias)
    g = torch.Generator().manual_seed(3)
    P_in = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    P_out = torch.randn(2, d_out, generator=g, dtype=torch.float64)
    got = kind.project(mod, p.a, p.g, P_in, P_out)
    ref = p.ref
    if has_bias and not bias:
        ref = ref[:, : ref.shape[1] - d_out]  # the weight columns only
    want = kind.project_vectors(mod, ref, P_in, P_out)
    assert got.shape == (len(p.x), 2, 4)
    assert rel_err(got, want) < 1e-12


def test_kind_project_vectors_is_the_matrix_sandwich():
    """Independent of the kinds' layouts: Linear ``P_out [W | b] P_in^T``, embedding
    ``P_out dW^T P_in^T``."""
    lin = nn.Linear(5, 4).double()
    V = torch.randn(3, 24, dtype=torch.float64)
    P_in, P_out = torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    M = torch.cat([V[:, :20].reshape(3, 4, 5), V[:, 20:, None]], 2)
    assert rel_err(kind_of(lin).project_vectors(lin, V, P_in, P_out), P_out @ M @ P_in.T) < 1e-14
    emb = nn.Embedding(6, 3).double()
    V = torch.randn(2, 18, dtype=torch.float64)
    P_in, P_out = torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    want = P_out @ V.reshape(2, 6, 3).transpose(1, 2) @ P_in.T
    assert rel_err(kind_of(emb).project_vectors(emb, V, P_in, P_out), want) < 1e-14
    with pytest.raises(InputError, match="columns"):
        kind_of(lin).project_vectors(lin, V, torch.randn(2, 7, dtype=torch.float64), P_out)


# ---------------------------------------------------------------------- the projector
@pytest.mark.parametrize("name", MODELS)
def test_features_equal_projected_explicit_gradients(name):
    model, x, y = make(name)
    proj = projector(model)
    feats = proj.project(x, y)
    ref = ref_grads(model, LOSS, x, y)
    assert feats.shape == (len(x), proj.feature_dim)
    assert rel_err(feats, proj.project_vectors(ref)) < 1e-10
    # the flat per-sample gradients of ModelGradients are in the projector's order
    flat = ModelGradients(model, LOSS).per_sample_grads(x, y)
    assert rel_err(feats, proj.project_vectors(flat)) < 1e-10


def test_layout_and_config():
    model, x, y = make("resnet")
    proj = projector(model)
    layout = proj.layout()
    assert [b.name for b in layout] == ["stem", "conv1", "conv2", "fc", "<dense>"]
    assert layout[0].dims == (4, 3 * 9 + 1) and layout[0].shape == (2, 3) and layout[0].bias
    assert layout[1].dims == (4, 4 * 9) and not layout[1].bias
    dense = layout[-1]
    assert dense.params == ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "norm.weight",
                            "norm.bias")
    assert dense.dims == (24,) and dense.shape == (5,)
    assert layout[0].start == 0 and all(a.stop == b.start for a, b in zip(layout, layout[1:]))
    assert proj.feature_dim == layout[-1].stop == 4 * 6 + 5
    cfg = proj.config()
    assert pickle.loads(pickle.dumps(cfg)) == cfg and cfg["seed"] == 0
    assert "GradientProjector" in repr(proj)
    assert proj.matrix_bytes() > 0
    base = proj.bytes_per_sample()
    with_positions = proj.bytes_per_sample(x[:1])
    assert with_positions > base >= proj.feature_dim * 8


def test_capped_sides_are_exact():
    """k at least every dimension: each side is the identity, the features are the exact
    per-sample gradients rearranged, so their inner products are exact."""
    model, x, y = make("mlp")
    proj = projector(model, k_in=100, k_out=100)
    ref = ref_grads(model, LOSS, x, y)
    feats = proj.project(x, y)
    assert proj.feature_dim == ref.shape[1]
    assert rel_err(feats @ feats.T, ref @ ref.T) < 1e-12


@pytest.mark.parametrize("name", ["wide-mlp", "wide-cnn"])
def test_inner_products_converge_as_k_grows(name):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    if name == "wide-mlp":
        model = nn.Sequential(nn.Linear(90, 80), nn.Tanh(), nn.Linear(80, 70))
        x = torch.randn(8, 90, generator=g)
    else:
        model = nn.Sequential(nn.Conv2d(8, 80, 3, padding=1), nn.Tanh(),
                              nn.Conv2d(80, 3, 1), nn.Flatten(), nn.Linear(3 * 25, 70))
        x = torch.randn(8, 8, 5, 5, generator=g)
    model = model.double().eval()
    x = x.double()
    y = torch.randint(0, 70, (8,), generator=g)
    ref = ref_grads(model, LOSS, x, y)
    gram = ref @ ref.T
    errs = []
    for k in (4, 16, 64):
        e = []
        for seed in range(3):
            f = projector(model, k_in=k, k_out=k, seed=seed).project(x, y)
            e.append(rel_err(f @ f.T, gram))
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.25, errs  # 0.18 (MLP), 0.12 (CNN); ~k^-1/2


def test_layer_selection():
    """A layer's matrices do not depend on the other selected layers: the features of a
    selection are the full features' columns of those layers."""
    model, x, y = make("resnet")
    full = projector(model)
    sub = projector(model, layers=["conv2", "fc", "bn2"])
    blocks = {b.name: b for b in full.layout()}
    f_full, f_sub = full.project(x, y), sub.project(x, y)
    assert [b.name for b in sub.layout()] == ["conv2", "fc", "<dense>"]
    for b in sub.layout()[:-1]:
        assert torch.equal(f_sub[:, b.slice], f_full[:, blocks[b.name].slice])
    ref = ref_grads(model, LOSS, x, y)
    names = [n for n, p in model.named_parameters()]
    cols = torch.cat([torch.full((p.numel(),), n in sub.param_names)
                      for n, p in model.named_parameters()])
    assert sub.param_names == [n for n in names if n.startswith(("conv2.", "fc.", "bn2."))]
    assert rel_err(f_sub, sub.project_vectors(ref[:, cols])) < 1e-10
    # a weight without its bias: no bias column, the bias left out
    w_only = projector(model, layers=["fc.weight"])
    assert w_only.layout()[0].dims == (3, 4) and w_only.other_names == []
    # a bias without its weight goes to the dense block
    b_only = projector(model, layers=["fc.bias"])
    assert b_only.layout()[0].kind == "dense" and not b_only.layout()[0].bias
    ref_b = ref[:, -3:]
    assert rel_err(b_only.project(x, y), b_only.project_vectors(ref_b)) < 1e-10


def test_micro_batching_does_not_change_features():
    model, x, y = make("resnet", n=9)
    a = projector(model, micro_batch_size=64).project(x, y)
    b = projector(model, micro_batch_size=2).project(x, y)
    assert rel_err(a, b) < 1e-13


def test_features_under_no_grad_equal_features_with_grad():
    """Callers often compute influences under torch.no_grad(); projection needs autograd."""
    import torch

    model, x, y = make("resnet", n=5)
    p = projector(model)
    a = p.project(x, y)
    with torch.no_grad():
        b = p.project(x, y)
    assert rel_err(a, b) < 1e-13


def test_float32_features_and_model():
    model, x, y = make("cnn")
    model = model.float()
    proj = GradientProjector(model, k_in=3, k_out=2, dense_dim=5, loss=LOSS)
    f = proj.project(x.float(), y)
    assert f.dtype == torch.float32
    f64 = projector(model.double()).project(x, y)
    assert rel_err(f.double(), f64) < 1e-4


# ---------------------------------------------------------------------- determinism
_CHILD = textwrap.dedent("""
    import pickle, sys, torch
    proj, x, y = pickle.load(open(sys.argv[1], "rb"))
    assert proj._cache == {}
    torch.manual_seed(12345)  # the global stream must not matter
    torch.save(proj.project(x, y), sys.argv[2])
""")


def test_determinism_across_instances_pickles_and_processes(tmp_path):
    # standard modules only, so that a fresh interpreter unpickles it without this file
    model = _init(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4),
                                nn.Linear(4, 3)))
    _, x, y = make("resnet")
    proj = projector(model, seed=7)
    a = proj.project(x, y)
    torch.manual_seed(999)
    assert torch.equal(projector(model, seed=7).project(x, y), a)
    assert proj._cache  # matrices were generated ...
    blob = pickle.dumps(proj)
    clone = pickle.loads(blob)
    assert clone._cache == {}  # ... but are not pickled
    assert torch.equal(clone.project(x, y), a)
    # a fresh interpreter (as a spawned worker)
    src, dst = tmp_path / "in.pkl", tmp_path / "out.pt"
    src.write_bytes(pickle.dumps((proj, x, y)))
    subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], check=True,
                   cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert torch.equal(torch.load(dst), a)
    assert not torch.allclose(projector(model, seed=8).project(x, y), a)


def test_pickle_carries_no_matrices():
    model = nn.Sequential(nn.Linear(200, 300), nn.Tanh(), nn.Linear(300, 5)).double().eval()
    proj = projector(model, k_in=16, k_out=16)
    x, y = torch.randn(2, 200, dtype=torch.float64), torch.tensor([0, 1])
    before = len(pickle.dumps(proj))
    proj.project(x, y)
    assert len(pickle.dumps(proj)) == before
    assert proj.matrix_bytes() >= 16 * 201 * 8


# ---------------------------------------------------------------------- errors
def test_batchnorm_in_train_mode_refused():
    model, x, y = make("resnet")
    proj = projector(model)
    model.train()
    with pytest.raises(UnsupportedModelError, match="training mode.*model.eval"):
        proj.project(x, y)
    model.eval()
    model.bn1.track_running_stats = False
    model.bn1.running_mean = model.bn1.running_var = None
    with pytest.raises(UnsupportedModelError, match="track_running_stats"):
        proj.project(x, y)


def test_unknown_layer_and_bad_arguments():
    model, x, y = make("mlp")
    with pytest.raises(InputError, match="nope"):
        GradientProjector(model, layers=["nope"])
    with pytest.raises(InputError, match="k_in"):
        GradientProjector(model, k_in=0)
    with pytest.raises(InputError, match="seed"):
        GradientProjector(model, seed=-1)
    proj = GradientProjector(model, dtype=torch.float64)
    with pytest.raises(InputError, match="loss"):
        proj.project(x, y)
    with pytest.raises(InputError, match="missing"):
        proj.project_vectors({"fc1.weight": torch.zeros(8, 6)})
    with pytest.raises(InputError, match="expected"):
        proj.project_vectors(torch.zeros(2, 5))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))))


def test_weight_sharing_refused():
    model = Shared().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(UnsupportedModelError, match="'fc' was called 2 times.*weight sharing"):
        projector(model).project(x, y)
    # leaving it out works (the head's gradient is exact per sample)
    proj = projector(model, layers=["head"])
    ref = ref_grads(model, LOSS, x, y)[:, -15:]
    assert rel_err(proj.project(x, y), proj.project_vectors(ref)) < 1e-10


def test_unsupported_options_go_to_the_dense_block():
    """A grouped convolution has no kind support: its parameters are projected densely from
    torch.func per-sample gradients."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(),
                          nn.Linear(4 * 9, 3)).double().eval()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    proj = projector(model, dense_dim=7)
    assert [b.name for b in proj.layout()] == ["2", "<dense>"]
    assert proj.layout()[-1].params == ("0.weight", "0.bias")
    ref = ref_grads(model, LOSS, x, y)
    assert rel_err(proj.project(x, y), proj.project_vectors(ref)) < 1e-10
