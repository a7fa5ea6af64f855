"""Influence models on projected gradients (``projection=``): the ``k x k`` projected
Gauss-Newton matrix against ``P GGN P^T`` from independent float64 references, influences
against the explicit projected formula, every solver against projected Direct, convergence to
the unprojected answer as ``k`` grows (exact at full size), the calculator, pickling, clear
refusals, and a residual BatchNorm network."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_gauss_newton, ref_grads
from torch import nn

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SequentialInfluenceCalculator,
)
from dvl_ooc.exceptions import InputError
from dvl_ooc.grads import ProjectedGradients
from dvl_ooc.layers import GradientProjector

F64 = torch.float64
LOSS = F.cross_entropy
SMALL = {"k_in": 5, "k_out": 4, "dense_dim": 6, "seed": 3}


def explicit_P(proj: GradientProjector) -> torch.Tensor:
    """The ``(k, p)`` projection matrix, column by column from ``project_vectors``."""
    return proj.project_vectors(torch.eye(proj.num_params, dtype=F64)).T.to(F64)


def projected_influences(P, G, lam, g_test, g_train):
    """(P g_t)^T (P G P^T + lam I)^{-1} (P g_r), float64 dense solve."""
    A = P @ G @ P.T + lam * torch.eye(len(P), dtype=F64)
    return torch.linalg.solve(A, P @ g_test.T).T @ (g_train @ P.T).T


class Setup:
    """A problem, a projector, the explicit P, the reference GGN and the projected one."""

    def __init__(self, problem, n_fit: int, projection: dict) -> None:
        self.pb = problem
        self.x, self.y = problem.x_train[:n_fit], problem.y_train[:n_fit]
        self.xt, self.yt = problem.x_test[:8], problem.y_test[:8]
        self.projection = projection
        self.proj = GradientProjector(problem.model, dtype=F64, **projection)
        self.P = explicit_P(self.proj)
        self.G = ref_gauss_newton(problem.model, LOSS, self.x, self.y)
        self.PGP = self.P @ self.G @ self.P.T
        self.top = float(torch.linalg.eigvalsh(self.PGP)[-1])
        self.g_train = problem.g_train[:n_fit]
        self.g_test = ref_grads(problem.model, LOSS, self.xt, self.yt)

    def lam(self, rel: float = 1e-3) -> float:
        return rel * self.top

    def reference(self, lam: float) -> torch.Tensor:
        return projected_influences(self.P, self.G, lam, self.g_test, self.g_train)

    def influences(self, m) -> torch.Tensor:
        return m.influences(self.xt, self.yt, self.x, self.y)


@pytest.fixture(scope="module")
def mlp_setup(mlp_problem):
    return Setup(mlp_problem, 120, SMALL)


@pytest.fixture(scope="module")
def cnn_setup(cnn_problem):
    return Setup(cnn_problem, 80, SMALL)


def close(a, b, tol):
    return torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())), rel_err(a, b)


# ---------------------------------------------------------------------- curvature
@pytest.mark.parametrize("name", ["mlp_setup", "cnn_setup"])
def test_projected_gauss_newton_is_P_GGN_Pt(name, request):
    s = request.getfixturevalue(name)
    for blocks in ("model", "layer"):
        pg = ProjectedGradients(s.proj, LOSS, blocks, micro_batch_size=32)
        assert pg.num_params == s.proj.feature_dim == len(s.P)
        for block, sl in zip(pg.blocks, pg.block_slices):
            H = pg.hessian((s.x, s.y), block, "gauss-newton")
            want = s.PGP[sl, sl]
            assert H.dtype == F64 and H.shape == (block.numel, block.numel)
            assert rel_err(H, want) < 1e-10, (block.name, rel_err(H, want))
            V = torch.randn(3, block.numel, dtype=F64, generator=torch.Generator().manual_seed(0))
            assert rel_err(pg.hvp(V, (s.x, s.y), block), V @ H) < 1e-10
            assert rel_err(pg.hvp(V[0], (s.x, s.y), block), V[0] @ H) < 1e-10
            # GGN = sum J^T Ho J / n still holds for the factors
            n, acc = 0, torch.zeros_like(H)
            for J, Ho in pg.gauss_newton_factors((s.x, s.y), block):
                acc += torch.einsum("mci,mcd,mdj->ij", J, Ho, J)
                n += len(J)
            assert n == len(s.x) and rel_err(acc / n, want) < 1e-10
            # features are the projected gradients, a block's the matching columns
            f = pg.per_sample_grads(s.xt, s.yt, block)
            assert rel_err(f, (s.g_test @ s.P.T)[:, sl]) < 1e-10
    layout = s.proj.layout()
    pg = ProjectedGradients(s.proj, LOSS, "layer")
    assert [b.name for b in pg.blocks] == [b.name for b in layout]
    assert [b.shapes[0] for b in pg.blocks] == [tuple(b.shape) for b in layout]
    with torch.no_grad():
        assert abs(pg.mean_loss((s.x, s.y)) - float(LOSS(s.pb.model(s.x), s.y))) < 1e-12


# ---------------------------------------------------------------------- influences
def test_direct_equals_explicit_projected_formula(mlp_setup):
    s = mlp_setup
    lam = s.lam()
    m = DirectInfluence(s.pb.model, LOSS, regularization=lam, projection=s.projection).fit(
        (s.x, s.y))
    assert isinstance(m.grads, ProjectedGradients) and m.projector is not None
    assert m.grads.num_params == len(s.P)
    assert rel_err(m.hessian_matrix(), s.PGP) < 1e-10
    got, want = s.influences(m), s.reference(lam)
    ok, err = close(got, want, 1e-8)
    assert ok, err
    si = m.self_influence(s.xt, s.yt)
    assert rel_err(si, torch.diagonal(projected_influences(s.P, s.G, lam, s.g_test,
                                                          s.g_test))) < 1e-8
    # a GradientProjector object works the same, and layer blocks are block-diagonal
    m2 = DirectInfluence(s.pb.model, LOSS, regularization=lam, blocks="layer",
                         projection=s.proj).fit((s.x, s.y))
    Pb = torch.zeros_like(s.PGP)
    for sl in m2.grads.block_slices:
        Pb[sl, sl] = s.PGP[sl, sl]
    A = Pb + lam * torch.eye(len(Pb), dtype=F64)
    want_b = (s.g_test @ s.P.T) @ torch.linalg.solve(A, (s.g_train @ s.P.T).T)
    assert rel_err(s.influences(m2), want_b) < 1e-8


def test_layer_blocks_are_fitted_in_one_data_pass(mlp_setup):
    """Per-layer projected Gauss-Newton blocks come from one pass over the data (the
    projection computes every block's features at once; one pass per block recomputed them
    all each time), equal to the per-block matrices and the block-by-block fit."""
    s = mlp_setup
    lam = s.lam()
    m = DirectInfluence(s.pb.model, LOSS, regularization=lam, blocks="layer",
                        projection=s.projection)
    assert len(m.blocks) > 1 and m._fit_passes() == 1
    seen: list[int] = []
    batches = m.grads.batches

    def counted(data):
        for xb, yb in batches(data):
            seen.append(len(xb))
            yield xb, yb

    m.grads.batches = counted  # instrument the instance's data passes
    m.fit((s.x, s.y))
    assert sum(seen) == len(s.x)  # one pass, not one per block
    del m.grads.batches
    Hs = m.grads.hessians((s.x, s.y), m.blocks)
    for b, H in zip(m.blocks, Hs):
        assert rel_err(H, m.grads.hessian((s.x, s.y), b)) < 1e-12
        sl = m.grads.block_slices[m.blocks.index(b)]
        assert rel_err(H, s.PGP[sl, sl]) < 1e-10
    one_by_one = DirectInfluence(s.pb.model, LOSS, regularization=lam, blocks="layer",
                                 projection=s.projection)
    one_by_one._joint_fit = lambda: False  # the block-by-block path
    one_by_one.fit((s.x, s.y))
    assert rel_err(s.influences(m), s.influences(one_by_one)) < 1e-12


SOLVERS = {
    "cg": lambda mod, lam, proj: CgInfluence(mod, LOSS, regularization=lam, rtol=1e-10,
                                             projection=proj),
    "cg-jacobi": lambda mod, lam, proj: CgInfluence(mod, LOSS, regularization=lam, rtol=1e-10,
                                                    preconditioner="jacobi", projection=proj),
    "arnoldi": lambda mod, lam, proj: ArnoldiInfluence(mod, LOSS, regularization=lam,
                                                       rank=10_000, projection=proj),
    "nystroem": lambda mod, lam, proj: NystroemSketchInfluence(mod, LOSS, regularization=lam,
                                                               rank=10_000, projection=proj),
    "lissa": lambda mod, lam, proj: LissaInfluence(mod, LOSS, regularization=lam,
                                                   max_iter=3000, rtol=1e-9, projection=proj),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_agree_with_projected_direct(mlp_setup, name):
    s = mlp_setup
    lam = s.lam(1e-1 if name == "lissa" else 1e-3)  # LiSSA's steps grow like top / lambda
    ref = s.reference(lam)
    m = SOLVERS[name](s.pb.model, lam, s.projection).fit((s.x, s.y))
    tol = {"lissa": 1e-5, "cg": 1e-6, "cg-jacobi": 1e-6}.get(name, 1e-8)
    ok, err = close(s.influences(m), ref, tol)
    assert ok, (name, err)


# ---------------------------------------------------------------------- convergence to p
def _unprojected_and_lam(s):
    lam = 1e-3 * float(torch.linalg.eigvalsh(s.G)[-1])
    ref = DirectInfluence(s.pb.model, LOSS, regularization=lam).fit((s.x, s.y))
    return ref, lam


def test_full_size_projection_equals_unprojected(mlp_setup):
    """k_in, k_out at least the layer dimensions: every side is the identity, the features are
    the gradients rearranged, and influences are the unprojected Gauss-Newton ones."""
    s = mlp_setup
    ref, lam = _unprojected_and_lam(s)
    full = DirectInfluence(s.pb.model, LOSS, regularization=lam,
                           projection={"k_in": 1000, "k_out": 1000}).fit((s.x, s.y))
    assert full.grads.num_params == ref.grads.num_params
    want = s.influences(ref)
    ok, err = close(s.influences(full), want, 1e-8)
    assert ok, err


def relative_errors(s, ks=(2, 8, 32), seeds=(0, 1, 2)):
    """Mean relative Frobenius error of projected vs unprojected Direct influences per k."""
    ref, lam = _unprojected_and_lam(s)
    want = s.influences(ref)
    out = []
    for k in ks:
        errs = []
        for seed in seeds:
            m = DirectInfluence(s.pb.model, LOSS, regularization=lam,
                                projection={"k_in": k, "k_out": k, "seed": seed}).fit((s.x, s.y))
            errs.append(rel_err(s.influences(m), want))
        out.append(sum(errs) / len(errs))
    return out


def test_error_decreases_as_k_grows(mlp_setup):
    errs = relative_errors(mlp_setup)
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5, errs


# ---------------------------------------------------------------------- plumbing
def test_calculator_pickle_and_config(mlp_setup):
    s = mlp_setup
    lam = s.lam()
    m = DirectInfluence(s.pb.model, LOSS, regularization=lam, projection=s.projection).fit(
        (s.x, s.y))
    want = s.influences(m)
    lazy = SequentialInfluenceCalculator(m).influences(s.xt, s.yt, s.x, s.y, test_chunk=3,
                                                       train_chunk=50, dtype="float64")
    assert rel_err(torch.as_tensor(lazy.compute()), want) < 1e-12
    # pickle: data-free, no projection matrices, same influences
    assert m.projector._cache  # matrices were generated ...
    blob = pickle.dumps(m)
    clone = pickle.loads(blob)
    assert clone.projector._cache == {}  # ... but not pickled
    assert clone._fit_data is None
    assert rel_err(s.influences(clone), want) < 1e-12
    k = m.grads.num_params
    assert len(blob) < 100_000 + 8 * k * k * 3  # model + k x k eigenvectors, no data or P
    # the configuration (and so fingerprints and stores) depend on the projection
    cfg = m.config()
    assert cfg["projection"]["seed"] == SMALL["seed"] and cfg["hessian"] == "gauss-newton"
    other = DirectInfluence(s.pb.model, LOSS, regularization=lam,
                            projection={**SMALL, "seed": 4})
    plain = DirectInfluence(s.pb.model, LOSS, regularization=lam)
    assert other.config() != cfg and "projection" not in plain.config()
    assert other.fingerprint() != DirectInfluence(s.pb.model, LOSS, regularization=lam,
                                                  projection=SMALL).fingerprint()
    state = m.state()
    with pytest.raises(InputError, match="projection"):
        other.load_state(state)


def test_refusals(mlp_setup):
    s = mlp_setup
    model = s.pb.model
    with pytest.raises(InputError, match="hessian='gauss-newton'"):
        DirectInfluence(model, LOSS, hessian="exact", projection=SMALL)
    pg = ProjectedGradients(s.proj, LOSS)
    with pytest.raises(InputError, match="gauss-newton.*drop projection"):
        pg.hessian((s.x, s.y), pg.blocks[0], "exact")
    with pytest.raises(InputError, match="gauss-newton"):
        pg.hvp(torch.zeros(pg.num_params, dtype=F64), (s.x, s.y), pg.blocks[0], "exact")
    with pytest.raises(InputError, match="EkfacInfluence does not take projection"):
        EkfacInfluence(model, LOSS, projection=SMALL)
    with pytest.raises(InputError, match="unknown keys"):
        DirectInfluence(model, LOSS, projection={"k": 3})
    with pytest.raises(InputError, match="blocks must be 'model' or 'layer'"):
        DirectInfluence(model, LOSS, blocks={"a": ["fc1"]}, projection=SMALL)
    with pytest.raises(InputError, match="another model"):
        DirectInfluence(model, LOSS, projection=GradientProjector(nn.Linear(3, 2)))
    with pytest.raises(InputError, match="layers"):
        DirectInfluence(model, LOSS, layers=["fc2"], projection=s.proj)


def test_layer_selection_passes_to_the_projector(mlp_setup):
    s = mlp_setup
    lam = s.lam()
    m = DirectInfluence(s.pb.model, LOSS, regularization=lam, layers=["fc2"],
                        projection=SMALL).fit((s.x, s.y))
    assert m.projector.param_names == ["fc2.weight", "fc2.bias"]
    P = explicit_P(m.projector)
    cols = slice(s.pb.p - 130, s.pb.p)  # fc2: 10 x 12 + 10
    G = s.G[cols, cols]
    want = projected_influences(P, G, lam, s.g_test[:, cols], s.g_train[:, cols])
    ok, err = close(s.influences(m), want, 1e-8)
    assert ok, err


# ---------------------------------------------------------------------- residual + BatchNorm
class TinyResNet(nn.Module):
    """Stem, one residual block with BatchNorm (eval mode), adaptive pooling, a linear head."""

    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        r = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(h + self.bn2(self.conv2(r)))
        return self.fc(self.pool(h).flatten(1))


def test_residual_batchnorm_network():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyResNet().double()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.randn(40, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=g)
    xt, yt = x[:5], y[:5]
    projection = {"k_in": 6, "k_out": 3, "dense_dim": 8, "seed": 1}
    m = DirectInfluence(model, LOSS, regularization=1.0, projection=projection)
    layout = m.projector.layout()
    assert [b.name for b in layout] == ["stem", "conv1", "conv2", "fc", "<dense>"]
    assert layout[-1].params == ("bn0.weight", "bn0.bias", "bn1.weight", "bn1.bias",
                                 "bn2.weight", "bn2.bias")
    P = explicit_P(m.projector)
    G = ref_gauss_newton(model, LOSS, x, y)
    PGP = P @ G @ P.T
    lam = 1e-3 * float(torch.linalg.eigvalsh(PGP)[-1])
    m = DirectInfluence(model, LOSS, regularization=lam, projection=projection).fit((x, y))
    assert rel_err(m.hessian_matrix(), PGP) < 1e-10
    want = projected_influences(P, G, lam, ref_grads(model, LOSS, xt, yt),
                                ref_grads(model, LOSS, x, y))
    ok, err = close(m.influences(xt, yt, x, y), want, 1e-8)
    assert ok, err
    with pytest.raises(Exception, match="training mode"):
        model.train()
        try:
            m.influences(xt, yt, x, y)
        finally:
            model.eval()


def test_project_output_vectors_is_projected_vjp():
    """Features of J_i^T v_i against autograd vector-Jacobian products, on a network with
    BatchNorm (dense block from captured rows) and a LayerNorm (dense block by torch.func);
    one tensor, a list of tensors and a callable on the outputs give the same rows."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(3),
                          nn.Linear(3, 4)).double().eval()
    x = torch.randn(7, 1, 5, 5, generator=g, dtype=F64)
    V = torch.randn(2, 7, 4, generator=g, dtype=F64)
    proj = GradientProjector(model, k_in=4, k_out=2, dense_dim=5, dtype=F64,
                             micro_batch_size=3)
    P = explicit_P(proj)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.stack([torch.stack([
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(
            model(x[i : i + 1])[0] @ V[c, i], params)]) for i in range(7)])
        for c in range(2)]) @ P.T
    assert rel_err(proj.project_output_vectors(x, V[0]), want[0]) < 1e-10
    assert rel_err(proj.project_output_vectors(x, list(V)), want) < 1e-10
    y = torch.arange(7)
    seen = []

    def fn(out, yb):
        seen.append(yb.tolist())
        rows = yb  # the matching rows of y are the sample indices here
        return [V[0][rows], V[1][rows]]

    assert rel_err(proj.project_output_vectors(x, fn, y), want) < 1e-10
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]  # per micro-batch
