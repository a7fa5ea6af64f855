"""DirectInfluence and the common InfluenceModel interface against float64 references."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import block_diagonal, ref_gauss_newton, ref_influences
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dvl_ooc import DirectInfluence
from dvl_ooc.exceptions import (
    InputError,
    LengthMismatchError,
    NonFiniteError,
    NotFittedError,
    NoTrainableParametersError,
    RegularizationError,
)


@pytest.mark.parametrize("rel", [1e-3, 1e-2])
def test_direct_exact_matches_reference(problem, rel):
    lam = problem.small_reg(rel)
    inf = DirectInfluence(problem.model, problem.loss, hessian="exact", regularization=lam,
                          micro_batch_size=23)
    inf.fit((problem.x_train, problem.y_train))
    got = inf.influences(problem.x_test, problem.y_test, problem.x_train, problem.y_train)
    ref = ref_influences(problem.H, lam, problem.g_test, problem.g_train)
    assert got.shape == (len(problem.x_test), len(problem.x_train))
    assert rel_err(got, ref) < 1e-6
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))


def test_direct_gauss_newton_matches_reference(mlp_problem):
    P = mlp_problem
    G = ref_gauss_newton(P.model, P.loss, P.x_train, P.y_train)
    lam = 1e-3 * float(torch.linalg.eigvalsh(G)[-1])
    inf = DirectInfluence(P.model, P.loss, regularization=lam, hessian="gauss-newton")
    got = inf.fit((P.x_train, P.y_train)).influences(P.x_test, P.y_test, P.x_train, P.y_train)
    assert rel_err(got, ref_influences(G, lam, P.g_test, P.g_train)) < 1e-6


def test_sign_convention_helpful_is_positive(linear_problem):
    """A gradient step that up-weights a training point with positive influence on a test point
    lowers that test point's loss (first order)."""
    P = linear_problem
    lam = P.small_reg()
    inf = DirectInfluence(P.model, P.loss, hessian="exact",
                          regularization=lam).fit((P.x_train, P.y_train))
    I = inf.influences(P.x_test[:1], P.y_test[:1], P.x_train, P.y_train)[0]
    r = int(I.argmax())
    # Newton step of the up-weighted objective: theta - eps (H+lam)^-1 g_r
    eps = 1e-4
    A = P.H + lam * torch.eye(P.p, dtype=torch.float64)
    step = -eps * torch.linalg.solve(A, P.g_train[r])
    predicted_change = float(P.g_test[0] @ step)
    assert I[r] > 0 and predicted_change < 0
    assert predicted_change == pytest.approx(-eps * float(I[r]), rel=1e-9)


def test_influence_factors_self_influence_and_symmetric_call(mlp_problem):
    P = mlp_problem
    lam = P.small_reg()
    inf = DirectInfluence(P.model, P.loss, hessian="exact",
                          regularization=lam).fit((P.x_train, P.y_train))
    A = P.H + lam * torch.eye(P.p, dtype=torch.float64)
    f = inf.influence_factors(P.x_test, P.y_test)
    assert rel_err(f, torch.linalg.solve(A, P.g_test.T).T) < 1e-8
    si = inf.self_influence(P.x_test, P.y_test)
    ref = ref_influences(P.H, lam, P.g_test, P.g_test)
    assert rel_err(si, torch.diagonal(ref)) < 1e-8
    assert rel_err(inf.influences(P.x_test, P.y_test), ref) < 1e-8
    assert rel_err(inf.influences_from_factors(f, P.x_train, P.y_train),
                   ref_influences(P.H, lam, P.g_test, P.g_train)) < 1e-8


def test_layer_blocks_with_more_test_points_than_block_params(mlp_problem):
    """The fc2 bias block has 10 parameters, far fewer than the test points."""
    P = mlp_problem
    blocks = {"fc1": ["fc1"], "fc2w": ["fc2.weight"], "fc2b": ["fc2.bias"]}
    regs = {"fc1": P.small_reg(), "fc2w": 2 * P.small_reg(), "fc2b": 5 * P.small_reg()}
    inf = DirectInfluence(P.model, P.loss, hessian="exact", regularization=regs, blocks=blocks)
    inf.fit((P.x_train, P.y_train))
    x_te = torch.cat([P.x_test, P.x_train[:20]])
    y_te = torch.cat([P.y_test, P.y_train[:20]])
    got = inf.influences(x_te, y_te, P.x_train, P.y_train)
    sizes = [b.numel for b in inf.blocks]
    assert sizes[2] == 10 < len(x_te)
    Hb = block_diagonal(P.H, sizes)
    lam_vec = torch.cat([torch.full((s,), regs[b.name], dtype=torch.float64)
                         for s, b in zip(sizes, inf.blocks)])
    g_te = torch.cat([P.g_test, P.g_train[:20]])
    ref = torch.linalg.solve(Hb + torch.diag(lam_vec), g_te.T).T @ P.g_train.T
    assert rel_err(got, ref) < 1e-8


def test_dataloader_with_unequal_last_batch_equals_pair(cnn_problem):
    P = cnn_problem
    lam = P.small_reg()
    a = DirectInfluence(P.model, P.loss, hessian="exact",
                        regularization=lam).fit((P.x_train, P.y_train))
    loader = DataLoader(TensorDataset(P.x_train, P.y_train), batch_size=256 - 59)
    b = DirectInfluence(P.model, P.loss, hessian="exact", regularization=lam,
                        micro_batch_size=9).fit(loader)
    c = DirectInfluence(P.model, P.loss, hessian="exact", regularization=lam).fit(
        TensorDataset(P.x_train, P.y_train))
    ia = a.influences(P.x_test, P.y_test, P.x_train, P.y_train)
    for other in (b, c):
        assert rel_err(other.influences(P.x_test, P.y_test, P.x_train, P.y_train), ia) < 1e-12


def test_fitted_state_is_data_free_and_roundtrips(mlp_problem, tmp_path):
    P = mlp_problem
    lam = P.small_reg()
    small = DirectInfluence(P.model, P.loss, hessian="exact", regularization=lam)
    small.fit((P.x_train[:50], P.y_train[:50]))
    big = DirectInfluence(P.model, P.loss, hessian="exact",
                          regularization=lam).fit((P.x_train, P.y_train))
    assert abs(len(pickle.dumps(small)) - len(pickle.dumps(big))) < 1024
    clone = pickle.loads(pickle.dumps(big))
    ref = big.influences(P.x_test, P.y_test, P.x_train, P.y_train)
    assert torch.equal(clone.influences(P.x_test, P.y_test, P.x_train, P.y_train), ref)
    big.save(tmp_path / "m.pt")
    fresh = DirectInfluence(P.model, P.loss, hessian="exact", regularization=lam)
    fresh.load(tmp_path / "m.pt")
    assert torch.equal(fresh.influences(P.x_test, P.y_test, P.x_train, P.y_train), ref)
    assert fresh.fingerprint() == big.fingerprint() != small.fingerprint()
    other = DirectInfluence(P.model, P.loss, hessian="exact", regularization=2 * lam)
    with pytest.raises(InputError, match="regularization"):
        other.load(tmp_path / "m.pt")


def test_float32_model_gives_float32_close_to_reference(linear_problem):
    P = linear_problem
    lam = P.small_reg(1e-2)
    m32 = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    m32.load_state_dict({k: v.float() for k, v in P.model.state_dict().items()})
    inf = DirectInfluence(m32, F.cross_entropy, hessian="exact", regularization=lam).fit(
        (P.x_train.float(), P.y_train))
    got = inf.influences(P.x_test.float(), P.y_test, P.x_train.float(), P.y_train)
    assert got.dtype == torch.float32
    assert rel_err(got, ref_influences(P.H, lam, P.g_test, P.g_train)) < 1e-3


def test_bad_input(mlp_problem):
    P = mlp_problem
    with pytest.raises(RegularizationError, match=">= 0"):
        DirectInfluence(P.model, P.loss, hessian="exact", regularization=-1.0)
    with pytest.raises(RegularizationError, match="not finite"):
        DirectInfluence(P.model, P.loss, hessian="exact", regularization=float("nan"))
    with pytest.raises(RegularizationError, match="block names"):
        DirectInfluence(P.model, P.loss, hessian="exact", regularization={"fc1": 1.0},
                        blocks="layer")
    with pytest.raises(InputError, match="hessian"):
        DirectInfluence(P.model, P.loss, hessian="fisher")
    inf = DirectInfluence(P.model, P.loss, hessian="exact", regularization=1e-2)
    with pytest.raises(NotFittedError, match="fit"):
        inf.influences(P.x_test, P.y_test)
    with pytest.raises(LengthMismatchError):
        inf.fit((P.x_train, P.y_train[:-1]))
    x = P.x_train.clone()
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        inf.fit((x, P.y_train))
    inf.fit((P.x_train, P.y_train))
    with pytest.raises(LengthMismatchError):
        inf.influences(P.x_test, P.y_test[:-1], P.x_train, P.y_train)
    with pytest.raises(InputError, match="both x and y"):
        inf.influences(P.x_test, P.y_test, P.x_train)
    with pytest.raises(InputError, match="shape"):
        inf.influences_from_factors(torch.zeros(3, 5, dtype=torch.float64), P.x_train, P.y_train)
    with pytest.raises(NoTrainableParametersError):
        DirectInfluence(nn.Linear(2, 2).requires_grad_(False), F.mse_loss, hessian="exact")


def test_singular_system_is_reported():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    x = torch.randn(3, 4, dtype=torch.float64)  # 3 samples, 5 parameters: H is singular
    y = torch.randn(3, 1, dtype=torch.float64)
    with pytest.raises(InputError, match="singular"):
        DirectInfluence(model, F.mse_loss, hessian="exact", regularization=0.0).fit((x, y))
