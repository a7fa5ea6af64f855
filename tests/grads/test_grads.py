"""Per-sample gradients, curvature products, blocks and layer capture vs float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import block_diagonal, ref_gauss_newton, ref_grads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dvl_ooc.exceptions import (
    InputError,
    LengthMismatchError,
    NonFiniteError,
    NoTrainableParametersError,
)
from dvl_ooc.grads import ModelGradients, resolve_blocks


def test_per_sample_grads_match_loop(problem):
    mg = ModelGradients(problem.model, problem.loss, micro_batch_size=7)
    g = mg.per_sample_grads(problem.x_train[:40], problem.y_train[:40])
    assert g.shape == (40, problem.p)
    assert g.dtype == torch.float64
    assert rel_err(g, problem.g_train[:40]) < 1e-12


def test_hvp_matches_exact_hessian(problem):
    data = (problem.x_train, problem.y_train)
    blocks = resolve_blocks(problem.model, "model")
    mg = ModelGradients(problem.model, problem.loss, micro_batch_size=33, vector_chunk=3)
    V = torch.randn(5, problem.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = mg.hvp(V, data, blocks[0], "exact")
    assert rel_err(hv, V @ problem.H) < 1e-10
    # a single vector keeps its shape
    assert rel_err(mg.hvp(V[0], data, blocks[0], "exact"), problem.H @ V[0]) < 1e-10


def test_gauss_newton_products_and_matrix(mlp_problem):
    P = mlp_problem
    data = (P.x_train[:60], P.y_train[:60])
    G = ref_gauss_newton(P.model, P.loss, *data)
    mg = ModelGradients(P.model, P.loss, micro_batch_size=16)
    block = mg.blocks[0]
    assert rel_err(mg.hessian(data, block, "gauss-newton"), G) < 1e-12
    V = torch.randn(4, P.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(mg.hvp(V, data, block, "gauss-newton"), V @ G) < 1e-10
    # the GGN of cross-entropy is positive semi-definite, the exact Hessian need not be
    assert float(torch.linalg.eigvalsh(G)[0]) > -1e-12


def test_hessian_is_mean_over_samples_whatever_the_batches(cnn_problem):
    """Unequal last batches: every point weighted equally (pyDVL weighted batches equally)."""
    P = cnn_problem
    mg = ModelGradients(P.model, P.loss, micro_batch_size=64)
    loader = DataLoader(TensorDataset(P.x_train, P.y_train), batch_size=47)  # 200 = 4*47 + 12
    H = mg.hessian(loader, mg.blocks[0], "exact")
    assert rel_err(H, P.H) < 1e-12


def test_layer_blocks_and_mapping(mlp_problem):
    P = mlp_problem
    layer = resolve_blocks(P.model, "layer")
    assert [b.name for b in layer] == ["fc1", "fc2"]
    assert [b.names for b in layer] == [("fc1.weight", "fc1.bias"), ("fc2.weight", "fc2.bias")]
    custom = resolve_blocks(P.model, {"w": ["fc1.weight"], "rest": ["fc1.bias", "fc2"]})
    assert custom[1].names == ("fc1.bias", "fc2.weight", "fc2.bias")
    # block Hessians are the diagonal blocks of the full Hessian
    mg = ModelGradients(P.model, P.loss, "layer")
    sizes = [b.numel for b in mg.blocks]
    ref = block_diagonal(P.H, sizes)
    o = 0
    for b in mg.blocks:
        Hb = mg.hessian((P.x_train, P.y_train), b, "exact")
        assert rel_err(Hb, ref[o : o + b.numel, o : o + b.numel]) < 1e-12
        o += b.numel


def test_frozen_parameters_are_excluded(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    model[1].weight.requires_grad_(False)
    mg = ModelGradients(model, F.cross_entropy)
    assert mg.param_names == ["1.bias", "3.weight", "3.bias"]
    x = torch.as_tensor(digits.x_train[:5]).double()
    y = torch.as_tensor(digits.y_train[:5])
    assert rel_err(mg.per_sample_grads(x, y), ref_grads(model, F.cross_entropy, x, y)) < 1e-12
    with pytest.raises(InputError, match="frozen"):
        resolve_blocks(model, {"a": ["1.weight"]})


def test_layers_select_parameters_and_blocks_group_them(mlp_problem):
    """``layers=`` attributes only the named parameters (the others are constants, like frozen
    ones); ``blocks=`` then groups just those."""
    import copy

    P = mlp_problem
    x, y = P.x_train[:20], P.y_train[:20]
    mg = ModelGradients(P.model, P.loss, "layer", layers=["fc2", "fc1.bias"])
    assert mg.layers == ["fc2", "fc1.bias"]
    assert [b.names for b in mg.blocks] == [("fc1.bias",), ("fc2.weight", "fc2.bias")]
    frozen = copy.deepcopy(P.model)
    frozen.fc1.weight.requires_grad_(False)  # the independent reference: only those free
    assert rel_err(mg.per_sample_grads(x, y), ref_grads(frozen, P.loss, x, y)) < 1e-12
    G = ref_gauss_newton(frozen, P.loss, x, y)
    one = ModelGradients(P.model, P.loss, layers=["fc2", "fc1.bias"])
    assert rel_err(one.hessian((x, y), one.blocks[0], "gauss-newton"), G) < 1e-10
    assert resolve_blocks(P.model, {"out": ["fc2"]}, layers=["fc2"])[0].names == (
        "fc2.weight", "fc2.bias")
    with pytest.raises(InputError, match="not selected by layers"):
        resolve_blocks(P.model, {"a": ["fc1"]}, layers=["fc2"])
    with pytest.raises(InputError, match="not a parameter or module name"):
        resolve_blocks(P.model, "model", layers=["fc3"])
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    model[0].requires_grad_(False)
    with pytest.raises(InputError, match="frozen parameter"):
        resolve_blocks(model, "model", layers=["0.weight"])
    with pytest.raises(InputError, match="module without trainable parameters"):
        resolve_blocks(model, "model", layers=["0"])


def test_block_errors(mlp_problem):
    m = mlp_problem.model
    with pytest.raises(InputError, match="not a parameter"):
        resolve_blocks(m, {"a": ["nope"]})
    with pytest.raises(InputError, match="more than one block"):
        resolve_blocks(m, {"a": ["fc1"], "b": ["fc1.weight"]})
    with pytest.raises(InputError):
        resolve_blocks(m, "per-neuron")
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(NoTrainableParametersError, match="no trainable parameters"):
        ModelGradients(frozen, F.mse_loss)


def test_input_validation(mlp_problem):
    P = mlp_problem
    mg = ModelGradients(P.model, P.loss)
    with pytest.raises(LengthMismatchError, match="5 samples but y has 4"):
        mg.per_sample_grads(P.x_train[:5], P.y_train[:4])
    x = P.x_train[:5].clone()
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf in 1 sample"):
        mg.per_sample_grads(x, P.y_train[:5])
    with pytest.raises(InputError, match="no samples"):
        mg.per_sample_grads(P.x_train[:0], P.y_train[:0])


def test_non_finite_loss_is_reported(mlp_problem):
    P = mlp_problem
    mg = ModelGradients(P.model, lambda o, y: (o.exp() ** 400).mean() + 0 * y.sum())
    with pytest.raises(NonFiniteError, match="non-finite loss gradient"):
        mg.per_sample_grads(P.x_train[:4] * 1e3, P.y_train[:4])


def test_concurrent_threads_on_one_model_give_correct_gradients(mlp_problem):
    """functional_call swaps module parameters in place: without the model lock, threads
    sharing a model corrupt each other's results (seen through dask's threaded scheduler)."""
    from concurrent.futures import ThreadPoolExecutor

    P = mlp_problem
    mg = ModelGradients(P.model, P.loss, micro_batch_size=5)
    block = mg.blocks[0]
    V = torch.randn(3, P.p, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def work(i):
        sl = slice(10 * i, 10 * i + 10)
        return i, mg.per_sample_grads(P.x_train[sl], P.y_train[sl]), mg.hvp(
            V, (P.x_train, P.y_train), block)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(work, range(8)))
    for i, g, hv in results:
        assert rel_err(g, P.g_train[10 * i : 10 * i + 10]) < 1e-12
        assert rel_err(hv, V @ P.H) < 1e-10
    assert all(isinstance(p, nn.Parameter) for p in P.model.parameters())


@pytest.mark.parametrize("mode", ["exact", "gauss-newton"])
def test_mse_loss_curvature_uses_autograd_fallback(mode):
    """torch.func has no forward-AD rule through F.mse_loss's backward (torch 2.13): the
    products fall back to double-backward autograd and must still be exact."""
    from reference import ref_hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randn(9, 2, dtype=torch.float64)
    ref = (ref_hessian if mode == "exact" else ref_gauss_newton)(model, F.mse_loss, x, y)
    mg = ModelGradients(model, F.mse_loss, micro_batch_size=4)
    V = torch.randn(3, mg.num_params, dtype=torch.float64)
    assert rel_err(mg.hvp(V, (x, y), mg.blocks[0], mode), V @ ref) < 1e-12
    assert rel_err(mg.hessian((x, y), mg.blocks[0], mode), ref) < 1e-12
