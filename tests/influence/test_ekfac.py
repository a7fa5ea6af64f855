"""EkfacInfluence against explicit float64 references.

The one-layer references below rebuild EK-FAC from scratch with plain autograd loops (patches cut
by slicing, not ``unfold``; output Hessians from ``torch.autograd.functional.hessian``; the
Kronecker eigenbasis with ``torch.kron``), so they share no code with ``dvl_ooc``.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import block_diagonal, ref_gauss_newton, ref_grads, ref_influences
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.autograd.functional import hessian
from torch.utils.data import DataLoader, TensorDataset

from dvl_ooc import EkfacInfluence, ModelGradients
from dvl_ooc.demo.nets import DigitsCNN, DigitsMLP, train_classifier
from dvl_ooc.exceptions import (
    InputError,
    NotFittedError,
    NoTrainableParametersError,
    RegularizationError,
    UnsupportedModelError,
)

F64 = torch.float64


# ---------------------------------------------------------------------- problems
class Small:
    """A trained float64 classifier on digits subsets (no exact Hessian: cheap to build)."""

    def __init__(self, model, d, n_train, n_test, epochs=30, seed=0):
        torch.manual_seed(seed)
        self.model = model.double()
        train_classifier(self.model, d.x_train[:n_train], d.y_train[:n_train], epochs=epochs,
                         seed=seed)
        self.model.eval()
        self.loss = F.cross_entropy
        self.x = torch.as_tensor(d.x_train[:n_train]).double()
        self.y = torch.as_tensor(d.y_train[:n_train]).long()
        self.xt = torch.as_tensor(d.x_test[:n_test]).double()
        self.yt = torch.as_tensor(d.y_test[:n_test]).long()


@pytest.fixture(scope="module")
def lin(digits):
    torch.manual_seed(0)
    return Small(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits, 100, 15)


@pytest.fixture(scope="module")
def conv(digits):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(64, 10))
    model[3].requires_grad_(False)  # fixed random head: the conv is the only trainable layer
    return Small(model, digits, 60, 10)


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(1)
    return Small(DigitsMLP(hidden=12), digits, 250, 30, epochs=40)


@pytest.fixture(scope="module")
def cnn(digits):
    torch.manual_seed(2)
    return Small(DigitsCNN(width=3, hidden=12), digits, 200, 30, epochs=40)


# ---------------------------------------------------------------------- explicit reference
def _patches(layer, inp):
    """Rows a_l of one sample's layer input (sequence of 1 for Linear, sliced conv patches)."""
    if isinstance(layer, nn.Linear):
        return inp.reshape(1, -1)
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    xp = F.pad(inp, (pw, pw, ph, ph))
    ho = (inp.shape[1] + 2 * ph - kh) // sh + 1
    wo = (inp.shape[2] + 2 * pw - kw) // sw + 1
    return torch.stack([xp[:, r * sh : r * sh + kh, c * sw : c * sw + kw].reshape(-1)
                        for r in range(ho) for c in range(wo)])


def ekfac_reference(model, idx, loss, x, y, fisher):
    """Explicit EK-FAC of the single trainable layer ``model[idx]``.

    Returns ``Q`` (columns: Kronecker eigenvectors in flat (weight, bias) order), ``Lam``
    (matching corrected eigenvalues) and the per-sample pseudo-gradients.
    """
    layer = model[idx]
    pre, post = model[:idx], model[idx + 1 :]
    has_b = layer.bias is not None and layer.bias.requires_grad
    params = [layer.weight] + ([layer.bias] if has_b else [])
    d_out, d_in = layer.weight.shape[0], layer.weight[0].numel()
    d_a = d_in + int(has_b)
    A = torch.zeros(d_a, d_a, dtype=F64)
    S = torch.zeros(d_out, d_out, dtype=F64)
    pseudo = []
    for i in range(len(x)):
        inp = pre(x[i : i + 1]).detach()
        a = _patches(layer, inp[0])
        if has_b:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=F64)], 1)
        A += a.T @ a
        h = layer(inp)
        out = post(h)[0]
        if fisher == "ggn":
            Ho = hessian(lambda o, i=i: loss(o[None], y[i : i + 1]), out.detach())
            w, U = torch.linalg.eigh(Ho)
            vs = list((U * w.clamp_min(0).sqrt()).T)
        else:  # empirical
            o = out.detach().requires_grad_(True)
            vs = [torch.autograd.grad(loss(o[None], y[i : i + 1]), o)[0]]
        for v in vs:
            (gh,) = torch.autograd.grad(out, h, v, retain_graph=True)
            g = gh[0].reshape(d_out, -1).T  # (positions, d_out), same order as the patches
            S += g.T @ g
            gp = torch.autograd.grad(out, params, v, retain_graph=True)
            pseudo.append(torch.cat([t.reshape(-1) for t in gp]))
    QA = torch.linalg.eigh(A / len(x)).eigenvectors
    QS = torch.linalg.eigh(S / len(x)).eigenvectors
    Qc = torch.kron(QS, QA)  # rows: combined index o * d_a + j (row-major vec of d_out x d_a)
    perm = torch.tensor([o * d_in + j if j < d_in else d_out * d_in + o
                         for o in range(d_out) for j in range(d_a)])
    Q = torch.empty_like(Qc)
    Q[perm] = Qc
    P = torch.stack(pseudo)
    Lam = ((P @ Q) ** 2).sum(0) / len(x)
    return Q, Lam


def kron_influences(Q, Lam, lam, g_test, g_train):
    return ((g_test @ Q) / (Lam + lam)) @ (g_train @ Q).T


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("fisher,bias", [("ggn", True), ("empirical", True), ("ggn", False)])
def test_one_layer_linear_equals_explicit_kronecker_reference(lin, fisher, bias):
    model = lin.model
    model[1].bias.requires_grad_(bias)
    try:
        Q, Lam = ekfac_reference(model, 1, lin.loss, lin.x, lin.y, fisher)
        lam = 1e-3 * float(Lam.max())
        gt = ref_grads(model, lin.loss, lin.xt, lin.yt)
        gr = ref_grads(model, lin.loss, lin.x, lin.y)
        expected = kron_influences(Q, Lam, lam, gt, gr)
        ek = EkfacInfluence(model, lin.loss, regularization=lam, fisher=fisher,
                            micro_batch_size=30).fit((lin.x, lin.y))
        assert rel_err(ek.influences(lin.xt, lin.yt, lin.x, lin.y), expected) <= 1e-8
        assert rel_err(ek.curvature_matrix(0), (Q * Lam) @ Q.T) <= 1e-8
        assert rel_err(ek.self_influence(lin.xt, lin.yt), torch.diagonal(
            kron_influences(Q, Lam, lam, gt, gt))) <= 1e-8
        if fisher == "ggn":
            # Lambda is the exact Gauss-Newton matrix's diagonal in the Kronecker eigenbasis
            H = ref_gauss_newton(model, lin.loss, lin.x, lin.y)
            assert rel_err(torch.diagonal(Q.T @ H @ Q), Lam) <= 1e-8
    finally:
        model[1].bias.requires_grad_(True)


def test_one_layer_conv_equals_explicit_kronecker_reference(conv):
    model = conv.model
    Q, Lam = ekfac_reference(model, 0, conv.loss, conv.x, conv.y, "ggn")
    lam = 1e-3 * float(Lam.max())
    gt = ref_grads(model, conv.loss, conv.xt, conv.yt)
    gr = ref_grads(model, conv.loss, conv.x, conv.y)
    expected = kron_influences(Q, Lam, lam, gt, gr)
    ek = EkfacInfluence(model, conv.loss, regularization=lam, micro_batch_size=25)
    ek.fit((conv.x, conv.y))
    assert [b.name for b in ek.blocks] == ["0"]
    assert rel_err(ek.influences(conv.xt, conv.yt, conv.x, conv.y), expected) <= 1e-8
    assert rel_err(ek.curvature_matrix(0), (Q * Lam) @ Q.T) <= 1e-8
    H = ref_gauss_newton(model, conv.loss, conv.x, conv.y)
    assert rel_err(torch.diagonal(Q.T @ H @ Q), Lam) <= 1e-8


def _kron_basis(ek, i):
    """Kronecker eigenbasis of fitted block i in flat (weight, bias) order, built with kron."""
    s, b = ek._state[i], ek.blocks[i]
    QA, QS = s["A_eigenvectors"], s["S_eigenvectors"]
    d_out, d_a = QS.shape[0], QA.shape[0]
    has_b = b.names[-1].endswith("bias")
    d_in = d_a - int(has_b)
    perm = torch.tensor([o * d_in + j if j < d_in else d_out * d_in + o
                         for o in range(d_out) for j in range(d_a)])
    Q = torch.empty(d_out * d_a, d_out * d_a, dtype=F64)
    Q[perm] = torch.kron(QS, QA)
    # the matching eigenvalues, and the K-FAC eigenvalues of A (x) S in the same order
    lam = s["eigenvalues"].reshape(-1)
    kfac = torch.outer(s["S_eigenvalues"], s["A_eigenvalues"]).reshape(-1)
    return Q, lam, kfac


@pytest.fixture(scope="module")
def ggn(request):
    """Exact mean-loss Gauss-Newton matrices of the MLP and CNN (vectorised; checked against
    ``ref_gauss_newton`` in test_grads)."""
    cache = {}

    def get(pr):
        if id(pr) not in cache:
            mg = ModelGradients(pr.model, pr.loss)
            cache[id(pr)] = mg.hessian((pr.x, pr.y), mg.blocks[0], "gauss-newton")
        return cache[id(pr)]

    return get


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_multilayer_eigenvalues_are_exact_ggn_diagonal(name, request, ggn):
    """Every layer: Lambda == diag(Q^T H_GGN,layer Q), and EK-FAC is at least as close to the
    exact GGN block as K-FAC (it is the best curvature diagonal in Q)."""
    pr = request.getfixturevalue(name)
    H = ggn(pr)
    ek = EkfacInfluence(pr.model, pr.loss, regularization=1e-3).fit((pr.x, pr.y))
    assert len(ek.blocks) == (2 if name == "mlp" else 4)
    o = 0
    for i, b in enumerate(ek.blocks):
        Hb = H[o : o + b.numel, o : o + b.numel]
        o += b.numel
        Q, lam, kfac = _kron_basis(ek, i)
        assert rel_err(torch.diagonal(Q.T @ Hb @ Q), lam) <= 1e-8, b.name
        err_ek = rel_err(ek.curvature_matrix(i), Hb)
        err_kfac = rel_err((Q * kfac) @ Q.T, Hb)
        assert err_ek <= err_kfac + 1e-12, (b.name, err_ek, err_kfac)


# ---------------------------------------------------------------------- approximation quality
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_correlates_with_direct_gauss_newton(name, request, ggn):
    """EK-FAC vs the exact layer-block GGN (what it approximates) at lambda = 0.1 * top
    eigenvalue; at 1e-3 * top the correlations are lower (see the report in the module)."""
    pr = request.getfixturevalue(name)
    H = ggn(pr)
    lam = 0.1 * float(torch.linalg.eigvalsh(H)[-1])
    ek = EkfacInfluence(pr.model, pr.loss, regularization=lam)
    gt, gr = ek.gradients(pr.xt, pr.yt), ek.gradients(pr.x, pr.y)
    ref_layer = ref_influences(block_diagonal(H, [b.numel for b in ek.blocks]), lam, gt, gr)
    ref_full = ref_influences(H, lam, gt, gr)
    for fisher in ("ggn", "empirical", "sampled"):
        ek = EkfacInfluence(pr.model, pr.loss, regularization=lam, fisher=fisher)
        got = ek.fit((pr.x, pr.y)).influences(pr.xt, pr.yt, pr.x, pr.y).flatten()
        assert bool(torch.isfinite(got).all())
        p, s = pearsonr(got, ref_layer.flatten())[0], spearmanr(got, ref_layer.flatten())[0]
        if fisher == "ggn":
            assert p >= 0.9 and s >= 0.9, (p, s)
            assert pearsonr(got, ref_full.flatten())[0] >= 0.85
        else:  # a noisier Fisher estimate, still clearly the same ranking
            assert p >= 0.8, (fisher, p)


def test_sampled_fisher_is_seeded(mlp):
    x, y = mlp.x[:80], mlp.y[:80]
    a = EkfacInfluence(mlp.model, mlp.loss, fisher="sampled", seed=3).fit((x, y))
    b = EkfacInfluence(mlp.model, mlp.loss, fisher="sampled", seed=3).fit((x, y))
    c = EkfacInfluence(mlp.model, mlp.loss, fisher="sampled", seed=4).fit((x, y))
    la, lb, lc = (m._state[1]["eigenvalues"] for m in (a, b, c))
    assert torch.equal(la, lb)
    assert rel_err(lc, la) > 1e-6


# ---------------------------------------------------------------------- batching invariance
def test_unequal_batches_and_micro_batch_size_invariance(cnn):
    x, y = cnn.x[:101], cnn.y[:101]
    ref = EkfacInfluence(cnn.model, cnn.loss, regularization=1e-2, micro_batch_size=64)
    ref.fit((x, y))
    expected = ref.influences(cnn.xt[:10], cnn.yt[:10], x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=37)  # 37 + 37 + 27
    for data, mbs in (((x, y), 16), (loader, 64), (TensorDataset(x, y), 33)):
        ek = EkfacInfluence(cnn.model, cnn.loss, regularization=1e-2, micro_batch_size=mbs)
        ek.fit(data)
        assert ek.n_fit == 101
        for i in range(len(ek.blocks)):
            assert rel_err(ek.curvature_matrix(i), ref.curvature_matrix(i)) <= 1e-10
        assert rel_err(ek.influences(cnn.xt[:10], cnn.yt[:10], x, y), expected) <= 1e-10


# ---------------------------------------------------------------------- state
def test_pickled_size_independent_of_n_train_and_save_load(mlp, tmp_path):
    small = EkfacInfluence(mlp.model, mlp.loss, regularization=1e-2).fit((mlp.x[:60], mlp.y[:60]))
    big = EkfacInfluence(mlp.model, mlp.loss, regularization=1e-2).fit((mlp.x, mlp.y))
    assert abs(len(pickle.dumps(small)) - len(pickle.dumps(big))) < 64
    expected = big.influences(mlp.xt, mlp.yt, mlp.x[:40], mlp.y[:40])
    clone = pickle.loads(pickle.dumps(big))
    assert torch.equal(clone.influences(mlp.xt, mlp.yt, mlp.x[:40], mlp.y[:40]), expected)
    path = tmp_path / "ekfac.pt"
    big.save(str(path))
    fresh = EkfacInfluence(mlp.model, mlp.loss, regularization=1e-2).load(str(path))
    assert fresh.n_fit == len(mlp.x)
    assert torch.equal(fresh.influences(mlp.xt, mlp.yt, mlp.x[:40], mlp.y[:40]), expected)
    assert fresh.fingerprint() == big.fingerprint()
    other = EkfacInfluence(mlp.model, mlp.loss, regularization=1e-2, fisher="empirical")
    with pytest.raises(InputError, match="fisher"):
        other.load(str(path))


# ---------------------------------------------------------------------- bad input
class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.inp = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(self.inp(x.flatten(1)))))


def test_unsupported_layers_raise_with_module_name(lin):
    ln = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))
    with pytest.raises(UnsupportedModelError, match=r"'2' \(LayerNorm.*requires_grad_\(False\)"):
        EkfacInfluence(ln, F.cross_entropy)
    ln[2].requires_grad_(False)  # frozen: fine
    x, y = lin.x[:20].float(), lin.y[:20]
    ek = EkfacInfluence(ln, F.cross_entropy, regularization=1e-2).fit((x, y))
    assert bool(torch.isfinite(ek.influences(x[:3], y[:3], x, y)).all())
    with pytest.raises(UnsupportedModelError, match="root module.*scale"):
        EkfacInfluence(_Scaled(), F.cross_entropy)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match="groups=2"):
        EkfacInfluence(grouped, F.cross_entropy)
    with pytest.raises(UnsupportedModelError, match="weight sharing"):
        EkfacInfluence(_Shared(), F.cross_entropy).fit((x, y))
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).requires_grad_(False)
    with pytest.raises(NoTrainableParametersError):
        EkfacInfluence(frozen, F.cross_entropy)


def test_layers_restricts_the_factored_layers(lin):
    """``layers=`` factors only the named Linear/Conv2d layers: other trainable parameters
    (here a LayerNorm and the first Linear) are constants, not refused; the result equals
    EK-FAC on a copy where they are frozen."""
    import copy

    torch.manual_seed(0)
    ln = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16),
                       nn.Linear(16, 10)).double().eval()
    x, y = lin.x[:30], lin.y[:30]
    ek = EkfacInfluence(ln, F.cross_entropy, regularization=1e-2, layers=["3"]).fit((x, y))
    assert [b.names for b in ek.blocks] == [("3.weight", "3.bias")]
    assert ek.config()["layers"] == ["3"] and [d["layer"] for d in ek.info["fit"]] == ["3"]
    # what is left out is reported: the first Linear and the LayerNorm, constants
    assert [(d["name"], d["module_type"], d["numel"]) for d in ek.info["ignored_parameters"]] \
        == [("1.weight", "Linear", 1024), ("1.bias", "Linear", 16), ("2.weight", "LayerNorm", 16),
            ("2.bias", "LayerNorm", 16)]
    frozen = copy.deepcopy(ln)
    frozen[1].requires_grad_(False)
    frozen[2].requires_grad_(False)
    ref = EkfacInfluence(frozen, F.cross_entropy, regularization=1e-2).fit((x, y))
    got = ek.influences(x[:5], y[:5], x, y)
    assert torch.equal(got, ref.influences(x[:5], y[:5], x, y))
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        EkfacInfluence(ln, F.cross_entropy, layers=["2", "3"])
    # layers="supported": both Linear layers, the LayerNorm a reported constant
    sup = EkfacInfluence(ln, F.cross_entropy, layers="supported")
    assert sup.config()["layers"] == ["1", "3"]
    assert [d["name"] for d in sup.info["ignored_parameters"]] == ["2.weight", "2.bias"]
    with pytest.raises(UnsupportedModelError, match=r"layers='supported'.*2 Linear/Conv2d "
                                                    r"layers.*2 LayerNorm parameters \(32 values"):
        EkfacInfluence(ln, F.cross_entropy)
    with pytest.raises(InputError, match="'9'"):
        EkfacInfluence(ln, F.cross_entropy, layers=["9"])


def test_bad_arguments(lin):
    m, loss = lin.model, lin.loss
    with pytest.raises(RegularizationError):
        EkfacInfluence(m, loss, regularization=-1e-3)
    with pytest.raises(RegularizationError, match="singular"):  # CE has a null direction
        EkfacInfluence(m, loss, regularization=0.0).fit((lin.x, lin.y))
    with pytest.raises(NotFittedError):
        EkfacInfluence(m, loss).influences(lin.xt, lin.yt)
    with pytest.raises(InputError, match="blocks"):
        EkfacInfluence(m, loss, blocks="model")
    with pytest.raises(InputError, match="fisher"):
        EkfacInfluence(m, loss, fisher="true")
    with pytest.raises(InputError, match="hessian"):
        EkfacInfluence(m, loss, hessian="exact")
    reg = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    data = (lin.x[:10], torch.randn(10, 2, dtype=F64))
    with pytest.raises(InputError, match="classification"):
        EkfacInfluence(reg, F.mse_loss, fisher="sampled").fit(data)
    # regression with the GGN Fisher works (MSE output Hessian = 2/k I)
    ek = EkfacInfluence(reg, F.mse_loss, regularization=1e-3).fit(data)
    assert bool(torch.isfinite(ek.self_influence(*data)).all())


def test_float32_confident_classifier_fits_with_ggn(linear_problem):
    """Confident softmax outputs make diag(p) - pp^T a difference of O(1) terms: in float32 its
    round-off produced spurious negative eigenvalues and a false 'not convex' error."""
    P = linear_problem
    m64 = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    m64.load_state_dict({k: 30 * v for k, v in P.model.state_dict().items()})
    m32 = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x, y = P.x_train[:120], P.y_train[:120]
    with torch.no_grad():
        conf = torch.softmax(m64(x), 1).amax(1)
        assert float((conf > 1 - 1e-4).double().mean()) > 0.5  # mostly very confident
    lam = 1e-3
    ref = EkfacInfluence(m64, F.cross_entropy, regularization=lam).fit((x, y))
    got = EkfacInfluence(m32, F.cross_entropy, regularization=lam).fit((x.float(), y))
    # compared on the least confident points: the gradients of the confident ones are ~1e-12,
    # their influences below float32's resolution (whatever the fit)
    with torch.no_grad():
        te = F.cross_entropy(m64(P.x_test), P.y_test, reduction="none").argsort()[-10:]
        tr = F.cross_entropy(m64(P.x_train), P.y_train, reduction="none").argsort()[-40:]
    a = got.influences(P.x_test[te].float(), P.y_test[te], P.x_train[tr].float(), P.y_train[tr])
    b = ref.influences(P.x_test[te], P.y_test[te], P.x_train[tr], P.y_train[tr])
    assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b)) < 1e-4
