"""Every influence model on a residual BatchNorm network, against exact float64 references.

The network is the project's :class:`~dvl_ooc.demo.resnet.ResNet18` (width 2, CIFAR stem, 16x16
RGB inputs, eval mode, BatchNorm with non-trivial running statistics and affine parameters),
in float64. Attribution goes through a small layer selection so that the reference can be dense:
a 3x3 stride-2 convolution early in the network (its gradient flows back through two residual
stages and eight BatchNorms), the 1x1 downsampling shortcut of the last stage with its
BatchNorm, the last block's final BatchNorm and the linear head (``p = 298``; EK-FAC, which
factors only ``Linear``/``Conv2d``, gets the three conv/linear layers, ``p = 234``). The
reference is the explicit Gauss-Newton matrix from ``tests/reference.py`` (plain autograd, one
sample at a time) with a damping of ``1e-2`` times its top eigenvalue (condition number ~100).

Exact methods (Direct, CG) and full-rank Arnoldi/Nystroem must match it to round-off; LiSSA
must converge to it; EK-FAC must have the exact GGN diagonal in its Kronecker eigenbasis and
precondition with exactly that curvature; TracInCP must match its checkpoint sum; projected
variants must match the explicit projected formula and converge to the unprojected answer as
``k`` grows (exact at full size). After every computation the model is still in eval mode and
its parameters and BatchNorm buffers are bit-for-bit unchanged.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_gauss_newton, ref_grads, ref_influences
from torch import nn

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    TracInCP,
)
from dvl_ooc.demo.resnet import ResNet18
from dvl_ooc.exceptions import ConvergenceWarning, UnsupportedModelError

F64 = torch.float64
LOSS = F.cross_entropy
N_TRAIN, N_TEST, SIDE = 24, 6, 16
#: conv 3x3/2 (72) + shortcut conv 1x1/2 (128) and its BN (32) + last BN (32) + head (34)
SEL = ["layer2.0.conv1", "layer4.0.downsample", "layer4.1.bn2", "fc"]
EKFAC_SEL = ["layer2.0.conv1", "layer4.0.downsample.0", "fc"]
REL = 1e-2  # damping relative to the top Gauss-Newton eigenvalue


def _selected(name: str, layers: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in layers)


class Net:
    """The network, data, reference quantities on ``SEL`` and a snapshot of the model."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        model = ResNet18(n_classes=2, width=2, stem="cifar", seed=0).double()
        with torch.no_grad():  # BatchNorm that is not the identity: eval uses these
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.3, 0.3, generator=g)
        self.model = model.eval()
        x = torch.randn(N_TRAIN + N_TEST, 3, SIDE, SIDE, generator=g, dtype=F64)
        y = torch.randint(0, 2, (N_TRAIN + N_TEST,), generator=g)
        self.x, self.y = x[:N_TRAIN], y[:N_TRAIN]
        self.xt, self.yt = x[N_TRAIN:], y[N_TRAIN:]
        self.train = (self.x, self.y)
        # reference: only the selected parameters are free
        ref = self.frozen_copy(model, SEL)
        self.names = [n for n, p in ref.named_parameters() if p.requires_grad]
        self.sizes = {n: p.numel() for n, p in ref.named_parameters() if p.requires_grad}
        self.G = ref_gauss_newton(ref, LOSS, self.x, self.y)
        self.g_train = ref_grads(ref, LOSS, self.x, self.y)
        self.g_test = ref_grads(ref, LOSS, self.xt, self.yt)
        self.top = float(torch.linalg.eigvalsh(self.G)[-1])
        self.snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @staticmethod
    def frozen_copy(model: nn.Module, layers: list[str]) -> nn.Module:
        ref = copy.deepcopy(model)
        for n, p in ref.named_parameters():
            p.requires_grad_(_selected(n, layers))
        return ref

    def lam(self, rel: float = REL) -> float:
        return rel * self.top

    def reference(self, lam: float) -> torch.Tensor:
        return ref_influences(self.G, lam, self.g_test, self.g_train)

    def columns(self, layers: list[str]) -> torch.Tensor:
        """Indices of the reference's columns that belong to ``layers``."""
        idx, o = [], 0
        for n in self.names:
            if _selected(n, layers):
                idx += range(o, o + self.sizes[n])
            o += self.sizes[n]
        return torch.tensor(idx)

    def influences(self, m) -> torch.Tensor:
        return m.influences(self.xt, self.yt, self.x, self.y)

    def untouched(self) -> None:
        """Eval mode everywhere; parameters and BatchNorm running statistics (and counters)
        bit-for-bit as before; no parameter ``.grad`` left behind."""
        assert not any(m.training for m in self.model.modules())
        now = self.model.state_dict()
        changed = [k for k, v in self.snapshot.items() if not torch.equal(now[k], v)]
        assert not changed, changed
        assert all(p.grad is None for p in self.model.parameters())


@pytest.fixture(scope="module")
def net():
    return Net()


def close(got, want, tol):
    return torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())), \
        rel_err(got, want)


# ---------------------------------------------------------------------- exact and converged
SOLVERS = {  # name -> (factory, tolerance against the dense reference)
    "direct": (lambda net, lam, **kw: DirectInfluence(net.model, LOSS, regularization=lam,
                                                      layers=SEL, **kw), 1e-9),
    "cg": (lambda net, lam, **kw: CgInfluence(net.model, LOSS, regularization=lam, layers=SEL,
                                              rtol=1e-11, **kw), 1e-7),
    "arnoldi": (lambda net, lam, **kw: ArnoldiInfluence(net.model, LOSS, regularization=lam,
                                                        layers=SEL, rank=10_000, **kw), 1e-9),
    "nystroem": (lambda net, lam, **kw: NystroemSketchInfluence(
        net.model, LOSS, regularization=lam, layers=SEL, rank=10_000, **kw), 1e-8),
}


def test_selection_and_reference(net):
    """The selection is what the reference frees: 298 parameters, BatchNorm ones included
    for the methods that take any parameter; Direct's top eigenvalue is the reference's."""
    assert sum(net.sizes.values()) == len(net.G) == 298
    assert "layer4.1.bn2.weight" in net.names and "layer4.0.downsample.1.bias" in net.names
    m = SOLVERS["direct"][0](net, net.lam()).fit(net.train)
    assert m.grads.num_params == 298
    assert m.info["fit"][0]["max_eigenvalue"] == pytest.approx(net.top, rel=1e-10)
    assert rel_err(m.hessian_matrix(), net.G) < 1e-10
    net.untouched()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_exact_and_full_rank_methods_match_the_reference(net, name):
    factory, tol = SOLVERS[name]
    lam = net.lam()
    m = factory(net, lam).fit(net.train)
    ok, err = close(net.influences(m), net.reference(lam), tol)
    assert ok, (name, err)
    net.untouched()


def test_lissa_converges_to_the_reference(net):
    """LiSSA contracts the error at least by ``q = 1 - lambda / scale`` per step (``scale ~ 1.1
    (top + lambda)``, estimated by LiSSA): at ``lambda = 0.5 top``, ``q ~ 0.7``; 4 -> 16 steps
    shrink the error by more than 20x, each below ``q^steps``, to 1e-4 of the reference."""
    lam = net.lam(0.5)
    want = net.reference(lam)
    errs, bounds = [], []
    for steps in (4, 16):
        m = LissaInfluence(net.model, LOSS, regularization=lam, layers=SEL, max_iter=steps,
                           rtol=None).fit(net.train)
        scale = m.info["fit"][0]["scale"]
        assert scale == pytest.approx(1.1 * (net.top + lam), rel=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            errs.append(rel_err(net.influences(m), want))
        bounds.append((1 - lam / scale) ** steps)
    assert all(e < b for e, b in zip(errs, bounds)), (errs, bounds)
    assert errs[1] < errs[0] / 20 and errs[1] < 1e-4, errs
    net.untouched()


# ---------------------------------------------------------------------- EK-FAC
def _kron_basis(ek, i):
    """Kronecker eigenbasis ``Q_S (x) Q_A`` of fitted block ``i`` in flat (weight, bias)
    order, and its corrected eigenvalues and K-FAC eigenvalues in the same order."""
    s, b = ek._state[i], ek.blocks[i]
    QA, QS = s["A_eigenvectors"], s["S_eigenvectors"]
    d_out, d_a = QS.shape[0], QA.shape[0]
    d_in = d_a - int(b.names[-1].endswith("bias"))
    perm = torch.tensor([o * d_in + j if j < d_in else d_out * d_in + o
                         for o in range(d_out) for j in range(d_a)])
    Q = torch.empty(d_out * d_a, d_out * d_a, dtype=F64)
    Q[perm] = torch.kron(QS, QA)
    kfac = torch.outer(s["S_eigenvalues"], s["A_eigenvalues"]).reshape(-1)
    return Q, s["eigenvalues"].reshape(-1), kfac


def test_ekfac_on_conv_and_linear_layers(net):
    """EK-FAC refuses the BatchNorm parameters; on the Conv2d/Linear layers its eigenvalues
    are the exact GGN diagonal in its Kronecker eigenbasis, it is at least as close to the
    exact layer block as K-FAC, and its influences are the explicit block-diagonal formula
    with the reference gradients."""
    with pytest.raises(UnsupportedModelError, match="layer4.1.bn2"):
        EkfacInfluence(net.model, LOSS, layers=SEL)
    with pytest.raises(UnsupportedModelError, match="BatchNorm2d"):
        EkfacInfluence(net.model, LOSS)
    lam = net.lam()
    ek = EkfacInfluence(net.model, LOSS, regularization=lam, layers=EKFAC_SEL).fit(net.train)
    assert [b.name for b in ek.blocks] == EKFAC_SEL
    cols = net.columns(EKFAC_SEL)
    assert len(cols) == 234
    G = net.G[cols][:, cols]
    C = torch.zeros_like(G)
    o = 0
    for i, b in enumerate(ek.blocks):
        sl = slice(o, o + b.numel)
        o += b.numel
        Q, Lam, kfac = _kron_basis(ek, i)
        assert rel_err(Q.T @ Q, torch.eye(len(Q), dtype=F64)) < 1e-10
        assert rel_err(torch.diagonal(Q.T @ G[sl, sl] @ Q), Lam) < 1e-8, b.name
        C[sl, sl] = ek.curvature_matrix(i)
        assert rel_err(C[sl, sl], (Q * Lam) @ Q.T) < 1e-10
        assert rel_err(C[sl, sl], G[sl, sl]) <= rel_err((Q * kfac) @ Q.T, G[sl, sl]) + 1e-12
    want = ref_influences(C, lam, net.g_test[:, cols], net.g_train[:, cols])
    ok, err = close(net.influences(ek), want, 1e-8)
    assert ok, err
    net.untouched()


# ---------------------------------------------------------------------- TracInCP
def test_tracin_matches_checkpoint_sum(net):
    g = torch.Generator().manual_seed(5)
    second = copy.deepcopy(net.model)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    checkpoints = [net.model.state_dict(), second.state_dict()]
    lrs = [0.5, 0.25]
    want = torch.zeros(N_TEST, N_TRAIN, dtype=F64)
    for state, lr in zip(checkpoints, lrs):
        ref = copy.deepcopy(net.model)
        ref.load_state_dict(state)
        ref = Net.frozen_copy(ref, SEL)
        want += lr * ref_grads(ref, LOSS, net.xt, net.yt) @ ref_grads(ref, LOSS, net.x,
                                                                      net.y).T
    m = TracInCP(net.model, LOSS, checkpoints, lrs, layers=SEL)
    ok, err = close(net.influences(m), want, 1e-10)
    assert ok, err
    full = TracInCP(net.model, LOSS, checkpoints, lrs, layers=SEL,
                    projection={"k_in": 1000, "k_out": 1000, "dense_dim": 1000})
    ok, err = close(net.influences(full), want, 1e-10)
    assert ok, ("full-size projection", err)
    net.untouched()


# ---------------------------------------------------------------------- projected variants
PROJ = {"k_in": 4, "k_out": 3, "dense_dim": 16, "seed": 1}


def test_projected_methods_match_the_explicit_projected_formula(net):
    """Every projectable method with ``projection=`` against ``(P g_t)^T (P G P^T + lambda
    I)^-1 (P g_r)`` with ``P`` the projector's explicit matrix and ``G`` the reference."""
    lam = net.lam()
    direct = SOLVERS["direct"][0](net, lam, projection=PROJ)
    proj = direct.projector
    assert proj.param_names == net.names
    P = proj.project_vectors(torch.eye(proj.num_params, dtype=F64)).T.to(F64)
    k = len(P)
    # (k_out, k_in) per layer, capped at (d_out, d_in [+1]): conv 3x4, shortcut 3x4, head
    # 2x4, and the 32 BatchNorm parameters through a dense 16-row projection
    assert k == direct.grads.num_params == 12 + 12 + 8 + 16
    A = P @ net.G @ P.T + lam * torch.eye(k, dtype=F64)
    want = torch.linalg.solve(A, P @ net.g_test.T).T @ (net.g_train @ P.T).T
    for name, (factory, tol) in SOLVERS.items():
        m = factory(net, lam, projection=PROJ).fit(net.train)
        ok, err = close(net.influences(m), want, tol)
        assert ok, (name, err)
    PGP = P @ net.G @ P.T
    lissa_lam = 0.5 * float(torch.linalg.eigvalsh(PGP)[-1])  # q ~ 0.7: 40 steps ~ 1e-6
    A = PGP + lissa_lam * torch.eye(k, dtype=F64)
    want = torch.linalg.solve(A, P @ net.g_test.T).T @ (net.g_train @ P.T).T
    m = LissaInfluence(net.model, LOSS, regularization=lissa_lam, layers=SEL, max_iter=40,
                       rtol=None, projection=PROJ).fit(net.train)
    ok, err = close(net.influences(m), want, 1e-4)
    assert ok, ("lissa", err)
    net.untouched()


def test_projection_converges_to_the_unprojected_answer(net):
    """Projected Direct against the unprojected reference: the mean error over 3 seeds falls
    as ``k_in = k_out = K`` (and ``dense_dim = 4 K``) grows (measured: 0.65, 0.52, 0.28 at
    K = 1, 4, 16, i.e. k = 7, 56, 288 of p = 298; at this small damping the error of the
    Kronecker projection falls slowly), and full size is exact."""
    lam = net.lam()
    want = net.reference(lam)
    errs = []
    for K in (1, 4, 16):
        e = [rel_err(net.influences(SOLVERS["direct"][0](
            net, lam, projection={"k_in": K, "k_out": K, "dense_dim": 4 * K, "seed": s},
        ).fit(net.train)), want) for s in range(3)]
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[0], errs
    full = SOLVERS["direct"][0](net, lam, projection={"k_in": 1000, "k_out": 1000,
                                                      "dense_dim": 1000}).fit(net.train)
    assert full.grads.num_params == 298
    ok, err = close(net.influences(full), want, 1e-8)
    assert ok, err
    net.untouched()


# ---------------------------------------------------------------------- train mode
def test_train_mode_is_refused_before_any_pass():
    from dvl_ooc.exceptions import InputError

    model = ResNet18(n_classes=2, width=2, seed=0).double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=F64), torch.tensor([0, 1, 0, 1])
    m = DirectInfluence(model, LOSS, regularization=1.0, layers=["fc"]).fit((x, y))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        with pytest.raises(InputError, match="training mode"):
            m.influences(x, y, x, y)
    finally:
        model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
