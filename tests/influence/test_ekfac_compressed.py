"""EK-FAC with compressed (rank-r) test factors, and ``layers="supported"`` on a BatchNorm ResNet.

References: the per-layer preconditioned test gradients are rebuilt in NumPy float64 from the
fitted eigenbases (``P = Q_S [(Q_S^T G Q_A) / (Lambda + lambda)] Q_A^T`` on matrices laid out
here from the parameter shapes), truncated by ``torch.linalg.svd`` and paired with per-sample
gradients from ``reference.ref_grads`` (autograd loops); none of it calls the code under test
beyond reading its fitted state. The uncompressed EK-FAC itself is tested in test_ekfac.py.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_grads

import dvl_ooc.influence.ekfac as ekfac_module
from dvl_ooc import EkfacInfluence, SequentialInfluenceCalculator
from dvl_ooc.demo.nets import DigitsCNN, train_classifier
from dvl_ooc.demo.resnet import ResNet18
from dvl_ooc.exceptions import InputError, UnsupportedModelError

F64 = torch.float64


class _Cnn:
    """The ~6k-parameter digits CNN (conv 8x10, conv 16x73, fc 64x65, fc 10x65), float64,
    EK-FAC fitted with lambda = 1e-3 x its top eigenvalue."""

    def __init__(self, d, n_train=120, n_test=16):
        torch.manual_seed(2)
        self.model = DigitsCNN().double()
        train_classifier(self.model, d.x_train[:n_train], d.y_train[:n_train], epochs=15,
                         seed=0)
        self.model.eval()
        self.x = torch.as_tensor(d.x_train[:n_train]).double()
        self.y = torch.as_tensor(d.y_train[:n_train]).long()
        self.xt = torch.as_tensor(d.x_test[:n_test]).double()
        self.yt = torch.as_tensor(d.y_test[:n_test]).long()
        self.ek = EkfacInfluence(self.model, F.cross_entropy, regularization=1.0)
        self.ek.fit((self.x, self.y))
        # the damping only enters preconditioning: set it from the fitted spectrum
        self.lam = 1e-3 * max(d["max_eigenvalue"] for d in self.ek.info["fit"])
        self.ek.regularization = {b.name: self.lam for b in self.ek.blocks}
        self.gt = ref_grads(self.model, F.cross_entropy, self.xt, self.yt)
        self.gr = ref_grads(self.model, F.cross_entropy, self.x, self.y)
        self.exact = self.ek.influences(self.xt, self.yt, self.x, self.y)


@pytest.fixture(scope="module")
def cnn(digits):
    return _Cnn(digits)


def _with_rank(ek: EkfacInfluence, rank: int | None) -> EkfacInfluence:
    m = copy.copy(ek)  # shares the fitted state; rank is not part of it
    m.rank = rank
    return m


# ---------------------------------------------------------------------- reference
def _layer_matrices(model, g):
    """Per layer (module with weight [and bias]), the gradient rows as (n, d_out, d_a) NumPy
    matrices: weight reshaped to (d_out, d_in), bias appended as the last column."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out, o = {}, 0
    for n, p in named:
        mod, kind = n.rsplit(".", 1)
        seg = g[:, o : o + p.numel()].numpy()
        o += p.numel()
        seg = seg.reshape(len(g), p.shape[0], -1)
        out[mod] = seg if kind == "weight" else np.concatenate([out[mod], seg], axis=2)
    return out


def ref_compressed_influences(ek, rank, g_test, g_train):
    """sum over layers of <truncated-SVD(P_t), G_r>, ranks chosen as documented: rank r where
    (d_out + d_a) r < d_out d_a, the exact P otherwise."""
    Gt, Gr = _layer_matrices(ek.model, g_test), _layer_matrices(ek.model, g_train)
    total = np.zeros((len(g_test), len(g_train)))
    for i, b in enumerate(ek.blocks):
        s = ek._state[i]
        QA, QS = s["A_eigenvectors"].numpy(), s["S_eigenvectors"].numpy()
        scale = 1.0 / (s["eigenvalues"].numpy() + ek.regularization[b.name])
        G = Gt[b.name]
        P = QS @ ((QS.T @ G @ QA) * scale) @ QA.T
        d_out, d_a = P.shape[1:]
        if rank is not None and (d_out + d_a) * rank < d_out * d_a:
            U, sv, Vh = torch.linalg.svd(torch.as_tensor(P), full_matrices=False)
            P = ((U[..., :rank] * sv[:, None, :rank]) @ Vh[:, :rank]).numpy()
        total += np.einsum("toa,soa->ts", P, Gr[b.name])
    return torch.as_tensor(total)


# ---------------------------------------------------------------------- values
@pytest.mark.parametrize("rank", [1, 4, 12])
def test_compressed_equals_truncated_svd_reference(cnn, rank):
    ek = _with_rank(cnn.ek, rank)
    expected = ref_compressed_influences(ek, rank, cnn.gt, cnn.gr)
    assert rel_err(ek.influences(cnn.xt, cnn.yt, cnn.x, cnn.y), expected) <= 1e-9
    T = ek.test_features(cnn.gt)
    assert rel_err(ek.tile(T, cnn.gr), expected) <= 1e-9
    # self-influence: the diagonal of the test set against itself, by paired and by the model
    diag = torch.diagonal(ref_compressed_influences(ek, rank, cnn.gt, cnn.gt))
    assert rel_err(ek.paired(T, cnn.gt), diag) <= 1e-9
    assert rel_err(ek.self_influence(cnn.xt, cnn.yt), diag) <= 1e-9
    # the expanded factors are the same low-rank matrices
    assert rel_err(ek.influence_factors(cnn.xt, cnn.yt) @ cnn.gr.T, expected) <= 1e-9


def test_error_decreases_with_rank_and_full_rank_is_exact(cnn):
    """Relative error of the compressed influences against uncompressed EK-FAC (lambda = 1e-3
    x top eigenvalue): large at r=1, decreasing, tiny once every layer is (nearly) full rank."""
    errs = []
    for r in (1, 2, 4, 8, 16, 32):
        got = _with_rank(cnn.ek, r).influences(cnn.xt, cnn.yt, cnn.x, cnn.y)
        errs.append(rel_err(got, cnn.exact))
    assert errs[0] > 0.1, errs
    assert all(b <= a * 1.05 + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= 1e-5, errs
    full = _with_rank(cnn.ek, 65)  # >= min(d_out, d_a) everywhere: exact P for every layer
    assert full.feature_dims() == (6058, 6058)
    assert torch.allclose(full.influences(cnn.xt, cnn.yt, cnn.x, cnn.y), cnn.exact,
                          rtol=1e-12, atol=1e-12 * float(cnn.exact.abs().max()))


def test_feature_dims_are_the_compressed_size(cnn, monkeypatch):
    shapes = [(ly.d_out, ly.d_a) for ly in cnn.ek._layers]
    assert shapes == [(8, 10), (16, 73), (64, 65), (10, 65)]
    p = sum(o * a for o, a in shapes)
    assert cnn.ek.feature_dims() == (p, p)
    for r in (1, 4, 6):
        ek = _with_rank(cnn.ek, r)
        # (d_out + d_a) r per layer where that is smaller than d_out d_a (conv1 at r=6 is not)
        k = sum((o + a) * r if (o + a) * r < o * a else o * a for o, a in shapes)
        assert ek.feature_dims() == (k, p)
        assert ek.test_features(cnn.gt[:3]).shape == (3, k)
    assert _with_rank(cnn.ek, 4).feature_dims()[0] == (18 + 89 + 129 + 75) * 4
    # test rows are decomposed in blocks (bounded memory): the same rows
    T = _with_rank(cnn.ek, 4).test_features(cnn.gt)
    monkeypatch.setattr(ekfac_module, "_TILE_BLOCK", 700)  # 1 row of fc1, 8 of conv1
    assert rel_err(_with_rank(cnn.ek, 4).test_features(cnn.gt), T) <= 1e-12
    with pytest.raises(InputError, match="compressed test features"):
        _with_rank(cnn.ek, 4).tile(cnn.gt[:2], cnn.gr[:3])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(InputError, match="rank"):
            EkfacInfluence(cnn.model, F.cross_entropy, rank=bad)


@pytest.mark.parametrize("d_out,d_a", [(3, 7), (7, 3)])
@pytest.mark.parametrize("n_s,r", [(1, 1), (1, 3), (5, 1), (5, 3)])
def test_low_rank_tile_orders_and_blocks(monkeypatch, d_out, d_a, n_s, r):
    """Both contraction orders and the expansion, in blocks of test rows, against einsum."""
    g = torch.Generator().manual_seed(0)
    U = torch.randn(9, d_out, r, dtype=F64, generator=g)
    V = torch.randn(9, d_a, r, dtype=F64, generator=g)
    G = torch.randn(n_s, d_out, d_a, dtype=F64, generator=g)
    expected = torch.einsum("tok,tak,soa->ts", U, V, G)
    for block in (1 << 23, 40, 1):
        monkeypatch.setattr(ekfac_module, "_TILE_BLOCK", block)
        out = torch.zeros(9, n_s, dtype=F64)
        ekfac_module._low_rank_tile(U, V, G, out)
        assert rel_err(out, expected) <= 1e-13, block


# ---------------------------------------------------------------------- calculator, state
def test_calculator_writes_the_compressed_matrix(cnn, tmp_path):
    ek = _with_rank(cnn.ek, 4)
    mem = ek.influences(cnn.xt, cnn.yt, cnn.x, cnn.y)
    assert rel_err(mem, cnn.exact) > 1e-3  # really compressed
    s = SequentialInfluenceCalculator(ek).to_zarr(
        tmp_path / "r4", cnn.xt.numpy(), cnn.yt.numpy(), cnn.x.numpy(), cnn.y.numpy(),
        test_chunk=7, train_chunk=64, self_influence=True, progress=False)
    assert s.is_complete
    assert rel_err(s.influences[:], mem) <= 1e-6  # float32 storage
    assert rel_err(s.self_influence[:], ek.self_influence(cnn.x, cnn.y)) <= 1e-6
    # the rank is part of the configuration and the fingerprint; not of the fitted state
    fps = {_with_rank(cnn.ek, r).fingerprint() for r in (None, 4, 8)}
    assert len(fps) == 3 and ek.config()["rank"] == 4
    fresh = EkfacInfluence(cnn.model, F.cross_entropy, regularization=cnn.lam, rank=4)
    fresh.load_state(cnn.ek.state())
    assert torch.equal(fresh.influences(cnn.xt, cnn.yt, cnn.x, cnn.y), mem)
    clone = pickle.loads(pickle.dumps(ek))
    assert clone.rank == 4 and torch.equal(clone.influences(cnn.xt, cnn.yt, cnn.x, cnn.y), mem)


# ---------------------------------------------------------------------- BatchNorm ResNet
@pytest.fixture(scope="module")
def resnet():
    net = ResNet18(n_classes=2, width=4, stem="cifar", seed=0).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 16, 16, generator=g, dtype=F64)
    y = torch.randint(0, 2, (16,), generator=g)
    return net, x, y


def test_supported_layers_on_a_batchnorm_resnet(resnet):
    net, x, y = resnet
    with pytest.raises(UnsupportedModelError,
                       match=r"'stem\.bn' \(BatchNorm2d.*layers='supported'.*21 Linear/Conv2d "
                             r"layers.*40 BatchNorm2d parameters \(600 values\)"):
        EkfacInfluence(net, F.cross_entropy)
    ek = EkfacInfluence(net, F.cross_entropy, layers="supported", regularization=1e-3,
                        micro_batch_size=8).fit((x, y))
    names = ek.config()["layers"]
    assert len(names) == 21 and names[0] == "stem.conv" and names[-1] == "fc"
    assert "layer2.0.downsample.0" in names
    ignored = ek.info["ignored_parameters"]
    assert len(ignored) == 40 and {d["module_type"] for d in ignored} == {"BatchNorm2d"}
    assert {"name": "stem.bn.weight", "module_type": "BatchNorm2d", "numel": 4} in ignored
    n_all = sum(p.numel() for p in net.parameters())
    assert ek.grads.num_params + sum(d["numel"] for d in ignored) == n_all
    got = ek.influences(x[:4], y[:4], x, y)
    assert bool(torch.isfinite(got).all())
    # the same as naming the layers by hand (same configuration and fingerprint) ...
    listed = EkfacInfluence(net, F.cross_entropy, layers=names, regularization=1e-3,
                            micro_batch_size=8).fit((x, y))
    assert torch.equal(listed.influences(x[:4], y[:4], x, y), got)
    assert listed.fingerprint() == ek.fingerprint()
    assert listed.info["ignored_parameters"] == ignored
    # ... and as freezing the BatchNorm parameters (constants)
    frozen = copy.deepcopy(net)
    for m in frozen.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.requires_grad_(False)
    ref = EkfacInfluence(frozen, F.cross_entropy, regularization=1e-3, micro_batch_size=8)
    ref.fit((x, y))
    assert ref.info["ignored_parameters"] == []
    assert rel_err(got, ref.influences(x[:4], y[:4], x, y)) <= 1e-12
    # compressed test factors on the ResNet: smaller features, the same matrix on the tile path
    ek.rank = 2
    k, p = ek.feature_dims()
    assert k < p / 4
    T = ek.test_features(ek.gradients(x[:4], y[:4]))
    low = ek.influences(x[:4], y[:4], x, y)
    assert T.shape == (4, k) and bool(torch.isfinite(low).all())
    assert rel_err(ek.tile(T, ek.gradients(x, y)), low) <= 1e-12
