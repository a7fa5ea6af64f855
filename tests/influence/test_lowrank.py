"""ArnoldiInfluence and NystroemSketchInfluence against exact float64 references.

Full-rank runs use the shared linear / MLP / CNN problems; rank sweeps and block tests use a
tiny MLP of this module (p = 310) so that the file stays fast.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import block_diagonal, ref_gauss_newton, ref_grads, ref_hessian, ref_influences
from torch.utils.data import DataLoader, TensorDataset

from dvl_ooc import ArnoldiInfluence, DirectInfluence, NystroemSketchInfluence
from dvl_ooc.demo.nets import DigitsMLP, train_classifier
from dvl_ooc.exceptions import (
    IndefiniteCurvatureWarning,
    InputError,
    NotFittedError,
    RegularizationError,
)

MB = 512  # one micro-batch per data pass: these problems are tiny


class Tiny:
    """A 64-4-10 MLP (310 parameters) on 100 digits, with exact H, Gauss-Newton G, gradients."""

    def __init__(self, digits):
        torch.manual_seed(3)
        self.model = DigitsMLP(hidden=4).double()
        train_classifier(self.model, digits.x_train[:100], digits.y_train[:100], epochs=40)
        self.model.eval()
        self.loss = F.cross_entropy
        self.x_train = torch.as_tensor(digits.x_train[:100]).double()
        self.y_train = torch.as_tensor(digits.y_train[:100]).long()
        self.x_test = torch.as_tensor(digits.x_test[:30]).double()
        self.y_test = torch.as_tensor(digits.y_test[:30]).long()
        self.H = ref_hessian(self.model, self.loss, self.x_train, self.y_train)
        self.G = ref_gauss_newton(self.model, self.loss, self.x_train, self.y_train)
        self.g_train = ref_grads(self.model, self.loss, self.x_train, self.y_train)
        self.g_test = ref_grads(self.model, self.loss, self.x_test, self.y_test)
        self.eig_H = torch.linalg.eigvalsh(self.H)
        self.eig_G = torch.linalg.eigvalsh(self.G)
        self.p = self.H.shape[0]

    @property
    def train(self):
        return (self.x_train, self.y_train)

    def lam_H(self, rel=1e-3):
        return max(rel * float(self.eig_H[-1]), -float(self.eig_H[0]) + rel * float(self.eig_H[-1]))

    def lam_G(self, rel=1e-3):
        return rel * float(self.eig_G[-1])

    def influences(self, inf):
        return inf.influences(self.x_test, self.y_test, self.x_train, self.y_train)


@pytest.fixture(scope="module")
def tiny(digits):
    return Tiny(digits)


def truncated_inverse(H, lam, k, which="LM", complement=False):
    """V_k diag(1/(w+lam)) V_k^T (+ (I - V_k V_k^T)/lam) from a float64 eigh of H."""
    w, V = torch.linalg.eigh(H)
    order = torch.argsort(w.abs() if which == "LM" else w, descending=True)[:k]
    w, V = w[order], V[:, order]
    A = (V / (w + lam)) @ V.T
    if complement:
        A = A + (torch.eye(len(H), dtype=H.dtype) - V @ V.T) / lam
    return A


# ---------------------------------------------------------------------- full rank
def test_arnoldi_full_rank_matches_reference(problem):
    """Rank >= p is the dense eigendecomposition (equal to Direct)."""
    x, y, H, g_tr = problem.x_train, problem.y_train, problem.H, problem.g_train
    w = torch.linalg.eigvalsh(H)
    lam = problem.small_reg()
    inf = ArnoldiInfluence(problem.model, problem.loss, hessian="exact", rank=problem.p,
                           regularization=lam,
                           micro_batch_size=MB).fit((x, y))
    assert inf.info["fit"][0]["method"] == "dense"
    got = inf.influences(problem.x_test, problem.y_test, x, y)
    assert rel_err(got, ref_influences(H, lam, problem.g_test, g_tr)) <= 1e-5
    # all eigenvalues, ordered by magnitude, equal the reference spectrum
    ref_w = w[torch.argsort(w.abs(), descending=True)]
    assert torch.allclose(inf.eigenvalues[0], ref_w, rtol=0, atol=1e-10 * float(w.abs().max()))


def test_nystroem_full_rank_matches_reference(problem):
    """Gauss-Newton on the first 60 training points (the linear model's GN matrix is its
    Hessian, so its reference is the exact Hessian)."""
    x, y = problem.x_train[:60], problem.y_train[:60]
    if problem.name == "linear":
        G = ref_hessian(problem.model, problem.loss, x, y)
    else:
        G = ref_gauss_newton(problem.model, problem.loss, x, y)
    lam = 1e-3 * float(torch.linalg.eigvalsh(G)[-1])
    inf = NystroemSketchInfluence(problem.model, problem.loss, rank=10 * problem.p,
                                  regularization=lam, hessian="gauss-newton",
                                  micro_batch_size=MB).fit((x, y))
    assert inf.eigenvectors[0].shape == (problem.p, problem.p)  # rank capped at p
    got = inf.influences(problem.x_test, problem.y_test, x, y)
    ref = ref_influences(G, lam, problem.g_test, problem.g_train[:60])
    assert rel_err(got, ref) <= 1e-5
    if problem.name == "mlp":  # and equals Direct with the same curvature
        direct = DirectInfluence(problem.model, problem.loss, regularization=lam,
                                 hessian="gauss-newton", micro_batch_size=MB).fit((x, y))
        assert rel_err(got, direct.influences(problem.x_test, problem.y_test, x, y)) <= 1e-5


# ---------------------------------------------------------------------- convergence in rank
def _with_complement(inf, complement):
    """The same fitted eigenpairs under the other ``complement`` setting (the fit does not
    depend on it), so that a rank sweep needs one fit per rank."""
    twin = ArnoldiInfluence(inf.model, inf.loss, rank=inf.ranks, blocks={
        b.name: list(b.names) for b in inf.blocks}, regularization=inf.regularization,
        hessian=inf.hessian_mode, complement=complement, micro_batch_size=MB)
    twin._state, twin.n_fit = inf._state, inf.n_fit
    return twin


def test_arnoldi_converges_with_rank(tiny):
    lam = tiny.lam_H()
    ref = ref_influences(tiny.H, lam, tiny.g_test, tiny.g_train)
    errs = {False: [], True: []}
    for k in (5, 20, 80, tiny.p):
        fitted = ArnoldiInfluence(tiny.model, tiny.loss, hessian="exact", rank=k,
                                  regularization=lam,
                                  micro_batch_size=MB).fit(tiny.train)
        for comp in (False, True):
            inf = _with_complement(fitted, comp)
            got = tiny.influences(inf)
            errs[comp].append(rel_err(got, ref))
            if k < tiny.p:
                assert fitted.info["fit"][0]["method"] == "block-lanczos"
                # the low-rank operator is exactly the truncated eigendecomposition
                trunc = tiny.g_test @ truncated_inverse(tiny.H, lam, k, complement=comp)
                assert rel_err(got, trunc @ tiny.g_train.T) < 1e-6
    for comp, e in errs.items():
        assert all(b <= a * (1 + 1e-3) for a, b in zip(e, e[1:])), (comp, e)
        assert e[0] > 0.1 and e[-1] < 1e-8, (comp, e)


def test_nystroem_converges_with_rank(tiny):
    lam = tiny.lam_G()
    ref = ref_influences(tiny.G, lam, tiny.g_test, tiny.g_train)
    errs = []
    for k in (5, 20, 80, 160, tiny.p):
        inf = NystroemSketchInfluence(tiny.model, tiny.loss, rank=k, regularization=lam,
                                      micro_batch_size=MB, seed=1).fit(tiny.train)
        assert inf.info["fit"][0]["data_passes"] == 1
        lam_hat = inf.eigenvalues[0]
        assert bool((lam_hat >= 0).all()) and lam_hat.shape == (k,)
        errs.append(rel_err(tiny.influences(inf), ref))
    assert all(b <= a * (1 + 1e-3) for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-8, errs


def test_nystroem_eigenvalues_bounded_by_curvature(tiny):
    """Nystroem never overestimates: U^T G U - diag(Lambda) is PSD, and Lambda_i <= eig_i(G)."""
    inf = NystroemSketchInfluence(tiny.model, tiny.loss, rank=40, regularization=1e-3,
                                  micro_batch_size=MB).fit(tiny.train)
    lam_hat, U = inf.eigenvalues[0], inf.eigenvectors[0]
    top = tiny.eig_G.flip(0)[:40]
    assert bool((lam_hat <= top * (1 + 1e-9) + 1e-12).all())
    assert torch.allclose(U.T @ U, torch.eye(40, dtype=torch.float64), atol=1e-12)
    assert float(torch.linalg.eigvalsh(U.T @ tiny.G @ U - torch.diag(lam_hat))[0]) > -1e-10


# ---------------------------------------------------------------------- eigenpairs
@pytest.mark.parametrize(("solver", "which"), [("block", "LM"), ("block", "LA"),
                                               ("arpack", "LM")])
def test_arnoldi_eigenvalues_match_eigvalsh(tiny, which, solver):
    k = 8
    inf = ArnoldiInfluence(tiny.model, tiny.loss, hessian="exact", rank=k,
                           regularization=tiny.lam_H(),
                           which=which, solver=solver, micro_batch_size=MB).fit(tiny.train)
    assert inf.info["fit"][0]["method"] == ("block-lanczos" if solver == "block" else "arpack")
    w_ref = tiny.eig_H
    w_ref = w_ref[torch.argsort(w_ref.abs() if which == "LM" else w_ref, descending=True)][:k]
    w, V = inf.eigenvalues[0], inf.eigenvectors[0]
    assert float(((w - w_ref).abs() / w_ref.abs()).max()) <= 1e-8
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-10)
    resid = torch.linalg.matrix_norm(tiny.H @ V - V * w) / float(w_ref.abs().max())
    assert float(resid) < 1e-8


def test_arnoldi_eigenvalues_mlp_problem(mlp_problem):
    """Top eigenvalues of the shared MLP problem's exact Hessian (p = 910)."""
    P = mlp_problem
    inf = ArnoldiInfluence(P.model, P.loss, hessian="exact", rank=10, regularization=P.small_reg(),
                           micro_batch_size=MB).fit((P.x_train, P.y_train))
    w_ref = torch.linalg.eigvalsh(P.H)
    w_ref = w_ref[torch.argsort(w_ref.abs(), descending=True)][:10]
    assert float(((inf.eigenvalues[0] - w_ref).abs() / w_ref.abs()).max()) <= 1e-8
    assert inf.info["fit"][0]["data_passes"] < 60


# ---------------------------------------------------------------------- tiling features
def test_features_reproduce_influences(tiny):
    fitted = ArnoldiInfluence(tiny.model, tiny.loss, hessian="exact", rank=6, blocks="layer",
                              regularization=tiny.lam_H(), micro_batch_size=MB).fit(tiny.train)
    g_te = fitted.gradients(tiny.x_test, tiny.y_test)
    g_tr = fitted.gradients(tiny.x_train, tiny.y_train)
    for complement in (False, True):
        inf = _with_complement(fitted, complement)
        T, R = inf.test_features(g_te), inf.train_features(g_tr)
        if not complement:  # k-dimensional: 6 per block
            assert T.shape == (len(g_te), 6 * len(inf.blocks)) and R.shape[1] == T.shape[1]
        else:
            assert T.shape[1] == tiny.p
        I = tiny.influences(inf)
        assert rel_err(T @ R.T, I) < 1e-12
        self_inf = (T * inf.train_features(g_te)).sum(1)
        assert rel_err(inf.self_influence(tiny.x_test, tiny.y_test), self_inf) < 1e-12


# ---------------------------------------------------------------------- blocks
def _block_reference(H, inf, regs, ranks, g_te, g_tr, complement=False):
    sizes = [b.numel for b in inf.blocks]
    Hb = block_diagonal(H, sizes)
    A = torch.zeros_like(H)
    o = 0
    for b, s in zip(inf.blocks, sizes):
        sl = slice(o, o + s)
        A[sl, sl] = truncated_inverse(Hb[sl, sl], regs[b.name], min(ranks[b.name], s),
                                      complement=complement)
        o += s
    return g_te @ A @ g_tr.T


def test_arnoldi_layer_blocks_dict_regularization(tiny):
    """fc2.bias (10 params) has fewer parameters than test points (40); fc1 is low rank."""
    blocks = {"fc1": ["fc1"], "fc2w": ["fc2.weight"], "fc2b": ["fc2.bias"]}
    regs = {"fc1": tiny.lam_H(), "fc2w": 2 * tiny.lam_H(), "fc2b": 5 * tiny.lam_H()}
    ranks = {"fc1": 30, "fc2w": 1000, "fc2b": 1000}
    x_te = torch.cat([tiny.x_test, tiny.x_train[:10]])
    y_te = torch.cat([tiny.y_test, tiny.y_train[:10]])
    g_te = torch.cat([tiny.g_test, tiny.g_train[:10]])
    for comp in (False, True):
        inf = ArnoldiInfluence(tiny.model, tiny.loss, hessian="exact", rank=ranks, blocks=blocks,
                               regularization=regs, complement=comp, micro_batch_size=MB)
        inf.fit(tiny.train)
        assert [b.numel for b in inf.blocks] == [260, 40, 10] and 10 < len(x_te)
        assert [i["method"] for i in inf.info["fit"]] == ["block-lanczos", "dense", "dense"]
        got = inf.influences(x_te, y_te, tiny.x_train, tiny.y_train)
        ref = _block_reference(tiny.H, inf, regs, ranks, g_te, tiny.g_train, complement=comp)
        assert rel_err(got, ref) < 1e-6
    # full rank in every block = the block-diagonal exact reference
    full = ArnoldiInfluence(tiny.model, tiny.loss, hessian="exact", rank=1000, blocks=blocks,
                            regularization=regs,
                            micro_batch_size=MB).fit(tiny.train)
    sizes = [b.numel for b in full.blocks]
    lam_vec = torch.cat([torch.full((s,), regs[b.name], dtype=torch.float64)
                         for s, b in zip(sizes, full.blocks)])
    ref = torch.linalg.solve(block_diagonal(tiny.H, sizes) + torch.diag(lam_vec), g_te.T).T
    got = full.influences(x_te, y_te, tiny.x_train, tiny.y_train)
    assert rel_err(got, ref @ tiny.g_train.T) < 1e-6


def test_nystroem_layer_blocks_dict_regularization(tiny):
    blocks = {"fc1": ["fc1"], "fc2w": ["fc2.weight"], "fc2b": ["fc2.bias"]}
    regs = {"fc1": tiny.lam_G(), "fc2w": 2 * tiny.lam_G(), "fc2b": 5 * tiny.lam_G()}
    x_te = torch.cat([tiny.x_test, tiny.x_train[:10]])
    y_te = torch.cat([tiny.y_test, tiny.y_train[:10]])
    g_te = torch.cat([tiny.g_test, tiny.g_train[:10]])
    inf = NystroemSketchInfluence(tiny.model, tiny.loss, rank=1000, blocks=blocks,
                                  regularization=regs, micro_batch_size=MB).fit(tiny.train)
    sizes = [b.numel for b in inf.blocks]
    lam_vec = torch.cat([torch.full((s,), regs[b.name], dtype=torch.float64)
                         for s, b in zip(sizes, inf.blocks)])
    ref = torch.linalg.solve(block_diagonal(tiny.G, sizes) + torch.diag(lam_vec), g_te.T).T
    got = inf.influences(x_te, y_te, tiny.x_train, tiny.y_train)
    assert rel_err(got, ref @ tiny.g_train.T) < 1e-6


# ---------------------------------------------------------------------- data sources
def test_dataloader_with_unequal_last_batch_equals_pair(tiny):
    loader = DataLoader(TensorDataset(tiny.x_train, tiny.y_train), batch_size=37)  # 37 + 37 + 26
    for cls, kw in ((ArnoldiInfluence, {"regularization": tiny.lam_H(), "hessian": "exact"}),
                    (NystroemSketchInfluence, {"regularization": tiny.lam_G()})):
        a = cls(tiny.model, tiny.loss, rank=8, micro_batch_size=MB, **kw).fit(tiny.train)
        b = cls(tiny.model, tiny.loss, rank=8, micro_batch_size=40, **kw).fit(loader)
        assert rel_err(tiny.influences(b), tiny.influences(a)) < 1e-8


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemSketchInfluence])
def test_state_is_data_free_and_roundtrips(tiny, cls, tmp_path):
    kw = {"rank": 8, "regularization": 1e-2, "hessian": "gauss-newton", "micro_batch_size": MB}
    small = cls(tiny.model, tiny.loss, **kw).fit((tiny.x_train[:30], tiny.y_train[:30]))
    big = cls(tiny.model, tiny.loss, **kw).fit(tiny.train)
    assert abs(len(pickle.dumps(small)) - len(pickle.dumps(big))) < 512
    ref = tiny.influences(big)
    assert torch.equal(tiny.influences(pickle.loads(pickle.dumps(big))), ref)
    big.save(tmp_path / "m.pt")
    fresh = cls(tiny.model, tiny.loss, **kw).load(tmp_path / "m.pt")
    assert torch.equal(tiny.influences(fresh), ref)
    assert fresh.fingerprint() == big.fingerprint() != small.fingerprint()
    with pytest.raises(InputError, match="rank"):
        cls(tiny.model, tiny.loss, **{**kw, "rank": 9}).load(tmp_path / "m.pt")


def test_float32_model(tiny):
    m32 = DigitsMLP(hidden=4)
    m32.load_state_dict({k: v.float() for k, v in tiny.model.state_dict().items()})
    data = (tiny.x_train.float(), tiny.y_train)
    for cls, lam, C, mode in ((ArnoldiInfluence, tiny.lam_H(1e-2), tiny.H, "exact"),
                              (NystroemSketchInfluence, tiny.lam_G(1e-2), tiny.G, "gauss-newton")):
        inf = cls(m32, F.cross_entropy, rank=tiny.p, regularization=lam, hessian=mode,
                  micro_batch_size=MB)
        got = inf.fit(data).influences(tiny.x_test.float(), tiny.y_test, *data)
        assert got.dtype == torch.float32
        assert rel_err(got, ref_influences(C, lam, tiny.g_test, tiny.g_train)) < 1e-3


# ---------------------------------------------------------------------- indefinite curvature
def test_indefinite_exact_hessian_warns(tiny):
    assert float(tiny.eig_H[0]) < -1e-4  # the tiny MLP's Hessian is indefinite
    lam = 1e-6 * float(tiny.eig_H[-1])
    with pytest.warns(IndefiniteCurvatureWarning, match="gauss-newton"):
        ArnoldiInfluence(tiny.model, tiny.loss, hessian="exact", rank=tiny.p, regularization=lam,
                         micro_batch_size=MB).fit(tiny.train)
    with pytest.warns(IndefiniteCurvatureWarning, match="gauss-newton"):
        inf = NystroemSketchInfluence(tiny.model, tiny.loss, rank=tiny.p, regularization=lam,
                                      hessian="exact", micro_batch_size=MB).fit(tiny.train)
    assert bool((inf.eigenvalues[0] >= 0).all())  # negative curvature clipped
    # no warning for the PSD Gauss-Newton matrix with the same tiny lambda
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteCurvatureWarning)
        ArnoldiInfluence(tiny.model, tiny.loss, rank=tiny.p, regularization=lam,
                         hessian="gauss-newton", micro_batch_size=MB).fit(tiny.train)


def test_singular_curvature_without_regularization_raises(tiny):
    """Shifting all logits equally leaves the loss unchanged: H has an exact null space."""
    inf = ArnoldiInfluence(tiny.model, tiny.loss, rank=tiny.p, regularization=0.0,
                           hessian="gauss-newton", micro_batch_size=MB)
    with pytest.raises(RegularizationError, match="singular"):
        inf.fit(tiny.train)


# ---------------------------------------------------------------------- bad input
def test_bad_input(tiny):
    m, loss = tiny.model, tiny.loss
    for lam in (0.0, -1.0):
        with pytest.raises(RegularizationError, match="> 0"):
            NystroemSketchInfluence(m, loss, regularization=lam)
    with pytest.raises(RegularizationError, match="complement"):
        ArnoldiInfluence(m, loss, hessian="exact", regularization=0.0, complement=True)
    for cls in (ArnoldiInfluence, NystroemSketchInfluence):
        for bad in (0, -3, 2.5, "4", True, None):
            with pytest.raises(InputError, match="rank"):
                cls(m, loss, rank=bad)
        with pytest.raises(InputError, match="rank mapping"):
            cls(m, loss, rank={"fc1": 3}, blocks="layer")
        with pytest.raises(InputError, match="rank of block"):
            cls(m, loss, rank={"fc1": 3, "fc2": 0}, blocks="layer")
        unfitted = cls(m, loss, rank=3)
        with pytest.raises(NotFittedError, match="fit"):
            unfitted.influences(tiny.x_test, tiny.y_test)
        with pytest.raises(NotFittedError, match="fit"):
            unfitted.test_features(tiny.g_test)
        with pytest.raises(NotFittedError, match="fit"):
            unfitted.train_features(tiny.g_test)
    with pytest.raises(InputError, match="which"):
        ArnoldiInfluence(m, loss, hessian="exact", which="SM")
    with pytest.raises(InputError, match="solver"):
        ArnoldiInfluence(m, loss, hessian="exact", solver="lobpcg")
    fitted = ArnoldiInfluence(m, loss, hessian="exact", rank=3, micro_batch_size=MB).fit(tiny.train)
    with pytest.raises(InputError, match="shape"):
        fitted.test_features(tiny.g_test[:, :10])
