"""The per-layer registry: every kind's per-sample gradients, products and directional
derivatives against an autograd loop (float64), Kronecker-factor rows, unsupported layers."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from layer_problems import LAYERS, make_problem
from torch import nn

from dvl_ooc.exceptions import InputError, UnsupportedModelError
from dvl_ooc.layers import (
    CAPTURABLE_LAYERS,
    LAYER_KINDS,
    SUPPORTED_LAYERS,
    Conv2dKind,
    EmbeddingKind,
    LinearKind,
    combined_to_params,
    dot_with_param_vector,
    embedding_output_grad_matrix,
    kind_of,
    layer_dot_products,
    layer_input_matrix,
    layer_output_grad_matrix,
    layer_param_grads,
    pairwise_layer_products,
    per_sample_layer_grads,
)


@pytest.fixture(params=list(LAYERS))
def problem(request):
    return make_problem(request.param)


def test_registry_and_lookup():
    assert {t: type(k) for t, k in LAYER_KINDS.items()} == {
        nn.Linear: LinearKind, nn.Conv2d: Conv2dKind, nn.Embedding: EmbeddingKind}
    assert SUPPORTED_LAYERS == (nn.Linear, nn.Conv2d)  # dense Kronecker factors
    assert CAPTURABLE_LAYERS == (nn.Linear, nn.Conv2d, nn.Embedding)

    class MyLinear(nn.Linear):
        pass

    assert isinstance(kind_of(MyLinear(2, 2)), LinearKind)  # subclasses: through the MRO
    assert isinstance(kind_of(nn.LazyLinear(3)), LinearKind)
    with pytest.raises(UnsupportedModelError,
                       match=r"'norm' is a LayerNorm; .*nn.Linear, nn.Conv2d and nn.Embedding"):
        kind_of(nn.LayerNorm(3), "norm")
    for f in (layer_input_matrix, layer_output_grad_matrix):
        with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
            f(nn.BatchNorm1d(3), torch.zeros(2, 3))


def test_per_sample_grads_equal_autograd_loop(problem):
    P = problem
    kind = kind_of(P.layer)
    got = kind.per_sample_grads(P.layer, P.a, P.g)
    assert got.shape == P.ref.shape
    assert rel_err(got, P.ref) < 1e-12
    assert torch.equal(per_sample_layer_grads(P.layer, P.a, P.g), got)
    # through the row matrices: combined G_i^T A_i mapped to the flat (weight, bias) order
    A, G = kind.rows(P.layer, P.a, P.g)
    if isinstance(P.layer, nn.Embedding):
        combined = kind.materialized_grads(P.layer, A, G, torch.arange(P.layer.num_embeddings))
        assert rel_err(combined, P.ref) < 1e-12
    else:
        assert torch.equal(A, layer_input_matrix(P.layer, P.a))
        assert torch.equal(G, layer_output_grad_matrix(P.layer, P.g))
        combined = torch.einsum("nlo,nli->noi", G, A)
        assert rel_err(combined_to_params(P.layer, combined), P.ref) < 1e-12
        assert A.shape[-1] == kind.raw_dims(P.layer, P.a, P.g)[1]
    # summed gradients, shaped like the parameters
    summed = layer_param_grads(P.layer, P.a, P.g)
    flat = torch.cat([summed[n].reshape(-1) for n, _ in P.layer.named_parameters()])
    assert rel_err(flat, P.ref.sum(0)) < 1e-12


def test_directional_derivative(problem):
    P = problem
    torch.manual_seed(3)
    W = {n: torch.randn_like(p) for n, p in P.layer.named_parameters()}
    w = torch.cat([W[n].reshape(-1) for n, _ in P.layer.named_parameters()])
    got = dot_with_param_vector(P.layer, P.a, P.g, W)
    assert rel_err(got, P.ref @ w) < 1e-12


@pytest.mark.parametrize("method", ["ghost", "materialize", "auto"])
def test_products_equal_explicit_products(problem, method):
    P = problem
    n = len(P.x)
    t, v = slice(0, n - 2), slice(n - 3, n)  # overlapping train / validation rows
    ref = P.ref[t] @ P.ref[v].T
    kind = kind_of(P.layer)
    got = pairwise_layer_products(P.layer, P.a[t], P.g[t], P.a[v], P.g[v], method=method)
    assert rel_err(got, ref) < 1e-12
    A, G = kind.rows(P.layer, P.a, P.g)
    for reduce in (False, True):
        got = layer_dot_products(P.layer, A[t], G[t], A[v], G[v], reduce=reduce, method=method)
        assert rel_err(got, ref.sum(1) if reduce else ref) < 1e-12
    # chunked (one train row at a time) equals unchunked
    chunked = pairwise_layer_products(P.layer, P.a[t], P.g[t], P.a[v], P.g[v], method=method,
                                      max_elements=1)
    assert rel_err(chunked, ref) < 1e-12


def test_embedding_padding_positions_get_no_gradient():
    P = make_problem("embedding-padding")
    pad = P.layer.padding_idx
    assert (P.x == pad).any()
    assert P.g.abs().sum() > 0
    G = embedding_output_grad_matrix(P.layer, P.x, P.g)
    assert torch.all(G[P.x.reshape(len(P.x), -1) == pad] == 0)
    got = per_sample_layer_grads(P.layer, P.x, P.g).reshape(len(P.x), 7, 3)
    assert torch.all(got[:, pad] == 0)


@pytest.mark.parametrize("name", ["linear", "conv-stride-pad", "conv-dilation-same-nobias"])
def test_kronecker_factor_rows(name):
    P = make_problem(name)
    kind = kind_of(P.layer)
    A = kind.input_matrix(P.layer, P.a)
    has_bias = P.layer.bias is not None
    full = kind.factor_input_rows(P.layer, P.a)
    assert torch.equal(full, A)
    if has_bias:
        assert torch.all(full[..., -1] == 1)
        assert torch.equal(kind.factor_input_rows(P.layer, P.a, bias=False), A[..., :-1])
        assert torch.equal(kind.factor_input_rows(P.layer, P.a, weight=False), A[..., -1:])
    else:
        with pytest.raises(InputError, match="no bias"):
            kind.factor_input_rows(P.layer, P.a, bias=True)
    G = kind.factor_output_rows(P.layer, P.g)
    d_out, d_in = kind.weight_dims(P.layer)
    assert G.shape[-1] == d_out and A.shape[-1] == d_in + int(has_bias)
    # sum of the outer products over positions: the per-sample gradient
    assert rel_err(combined_to_params(P.layer, torch.einsum("nlo,nli->noi", G, A)),
                   P.ref) < 1e-12
    emb = make_problem("embedding")
    with pytest.raises(UnsupportedModelError, match="Kronecker"):
        kind_of(emb.layer).factor_input_rows(emb.layer, emb.a)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("layer", "match"), [
    (nn.Conv2d(2, 2, 3, groups=2), "groups=2"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv2d(2, 2, 2, padding="same"), "even receptive field"),
    (nn.Embedding(5, 2, max_norm=1.0), "max_norm"),
    (nn.Embedding(5, 2, scale_grad_by_freq=True), "scale_grad_by_freq"),
])
def test_unsupported_layer_options(layer, match):
    kind = kind_of(layer)
    with pytest.raises(UnsupportedModelError, match=f"layer 'x': .*{match}"):
        kind.check(layer, "x")
    x = torch.zeros(2, 3, dtype=torch.long) if isinstance(layer, nn.Embedding) else \
        torch.zeros(2, 2, 5, 5)
    with pytest.raises(UnsupportedModelError, match=match):
        layer_input_matrix(layer, x)
    with pytest.raises(UnsupportedModelError, match=match):
        per_sample_layer_grads(layer, x, layer(x).detach())
