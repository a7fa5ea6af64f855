"""Fits whose working memory would not fit are refused before any data pass, with the size
and the ways out in the message."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from dvl_ooc.exceptions import InputError, MemoryBudgetError


class _Watched(Dataset):
    """Four samples; records whether anything was read."""

    def __init__(self, d: int) -> None:
        self.read = False
        self.d = d

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        self.read = True
        return torch.zeros(self.d), torch.tensor(i % 2)


def test_direct_on_200k_parameters_is_refused_before_reading_data():
    model = nn.Linear(2000, 100)  # p = 200,100: H alone would be 320 GB in float64
    data = _Watched(2000)
    inf = DirectInfluence(model, F.cross_entropy, regularization=1e-3)
    with pytest.raises(MemoryBudgetError, match=r"block 'model' \(200100 parameters\)") as e:
        inf.fit(data)
    assert "projection=" in str(e.value) and "layers=" in str(e.value)
    assert "GiB" in str(e.value) or "TiB" in str(e.value)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, InputError)
    assert not data.read and not inf.is_fitted
    # the way out the message names: the same model in a projected space fits
    small = DirectInfluence(model, F.cross_entropy, regularization=1e-3,
                            projection=dict(k_in=8, k_out=4, dense_dim=4))
    small.fit(data)
    assert small.is_fitted and data.read


def test_budget_is_per_block_and_per_method(mlp_problem):
    P = mlp_problem
    data = (P.x_train[:16], P.y_train[:16])
    p = sum(q.numel() for q in P.model.parameters())
    d = DirectInfluence(P.model, P.loss, regularization=1e-2)
    d.memory_budget = 3 * 8 * p * p - 1
    with pytest.raises(MemoryBudgetError, match="DirectInfluence.fit would need"):
        d.fit(data)
    d.memory_budget = 3 * 8 * p * p
    assert d.fit(data).is_fitted
    layered = DirectInfluence(P.model, P.loss, regularization=1e-2, blocks="layer")
    layered.memory_budget = 3 * 8 * p * p - 1  # each layer's block is smaller than p
    assert layered.fit(data).is_fitted
    a = ArnoldiInfluence(P.model, P.loss, regularization=1e-2, rank=4, hessian="gauss-newton")
    a.memory_budget = 3 * 8 * p * a._krylov_dims(a.blocks[0])[2] - 1
    with pytest.raises(MemoryBudgetError, match="ArnoldiInfluence"):
        a.fit(data)
    n = NystroemSketchInfluence(P.model, P.loss, regularization=1e-2, rank=4)
    n.memory_budget = 4 * 8 * p * 4 - 1
    with pytest.raises(MemoryBudgetError, match="NystroemSketchInfluence"):
        n.fit(data)
    n.memory_budget = 4 * 8 * p * 4
    assert n.fit(data).is_fitted


# ---------------------------------------------------------------------- CG and LiSSA solves
def _count_hvp(inf):
    """Wrap ``inf.grads.hvp`` to count curvature products (a refusal must come first)."""
    calls = []
    hvp = inf.grads.hvp

    def counted(*a, **k):
        calls.append(1)
        return hvp(*a, **k)

    inf.grads.hvp = counted
    return calls


def _suggested_chunk(message: str) -> int:
    m = re.search(r"rhs_chunk=(\d+) \(about ", message)
    assert m, message
    return int(m.group(1))


def test_cg_preconditioner_fit_is_refused_before_reading_data():
    model = nn.Linear(2000, 100)  # p = 200,100: a rank-64 sketch is 4 x 100 MiB
    data = _Watched(2000)
    inf = CgInfluence(model, F.cross_entropy, preconditioner="nystroem", rank=64)
    inf.memory_budget = 2**28
    with pytest.raises(MemoryBudgetError, match=r"CgInfluence.fit would need .* MiB") as e:
        inf.fit(data)
    assert "projection=" in str(e.value) and not data.read and not inf.is_fitted
    assert inf._fit_bytes(inf.blocks[0]) >= 4 * 8 * 200_100 * 64
    jacobi = CgInfluence(model, F.cross_entropy, preconditioner="jacobi")
    assert jacobi._fit_bytes(jacobi.blocks[0]) >= 8 * 200_100 * 64  # a micro-batch of J
    assert CgInfluence(model, F.cross_entropy)._fit_bytes(inf.blocks[0]) == 0


@pytest.mark.parametrize("solver", ["batched", "block"])
def test_cg_solve_is_refused_with_the_rhs_chunk_that_fits(mlp_problem, solver):
    P = mlp_problem
    data = (P.x_train[:32], P.y_train[:32])
    inf = CgInfluence(P.model, P.loss, regularization=1e-1, solver=solver, rtol=1e-10,
                      preconditioner="nystroem", rank=4).fit(data)
    g = inf.gradients(P.x_test[:12], P.y_test[:12])
    ref = inf.precondition(g)  # default budget: the memory available
    need = inf._solve_bytes(inf.blocks[0], 12, 12)
    p = inf.grads.num_params
    assert need > 12 * p * 8 * (2 + 4)  # results and (at least) 4 work matrices
    inf.memory_budget = need - 1
    calls = _count_hvp(inf)
    with pytest.raises(MemoryBudgetError, match=rf"CgInfluence.precondition would need .* "
                       rf"for 12 gradients of block 'model' \({p} parameters\)") as e:
        inf.precondition(g)
    msg = str(e.value)
    assert re.search(r"about \d+\.\d [KM]iB", msg) and f"{solver} CG" in msg
    assert "projection=" in msg and "layers=" in msg
    assert not calls  # refused before any curvature product
    chunk = _suggested_chunk(msg)
    assert 1 <= chunk < 12 and inf._solve_bytes(inf.blocks[0], 12, chunk) <= need - 1
    assert inf._solve_bytes(inf.blocks[0], 12, chunk + 1) > need - 1  # the largest that fits
    inf.rhs_chunk = chunk  # the way out the message names, same budget
    got = inf.precondition(g)
    assert calls and torch.allclose(got, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))
    inf.memory_budget = 12 * p * 8  # not even the results fit
    with pytest.raises(MemoryBudgetError, match="even rhs_chunk=1 would need"):
        inf.precondition(g)
    inf.memory_budget = None
    assert inf.precondition(g).shape == g.shape


@pytest.mark.parametrize("batch_size", [None, 8])
def test_lissa_solve_is_refused_and_rhs_chunk_gives_the_same_result(mlp_problem, batch_size):
    P = mlp_problem
    data = (P.x_train[:32], P.y_train[:32])
    inf = LissaInfluence(P.model, P.loss, regularization=0.5, max_iter=30, rtol=None,
                         batch_size=batch_size, seed=3).fit(data)
    g = inf.gradients(P.x_test[:10], P.y_test[:10])
    ref = inf.precondition(g)
    need = inf._solve_bytes(inf.blocks[0], 10, 10)
    inf.memory_budget = need - 1
    calls = _count_hvp(inf)
    with pytest.raises(MemoryBudgetError, match=r"LissaInfluence.precondition would need") as e:
        inf.precondition(g)
    assert not calls and re.search(r"about \d+\.\d [KM]iB", str(e.value))
    assert "projection=" in str(e.value)
    inf.rhs_chunk = _suggested_chunk(str(e.value))
    assert 1 <= inf.rhs_chunk < 10
    got = inf.precondition(g)  # every chunk sees the same seeded minibatches
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    assert inf.info["solve"][0]["columns"] == 10 and inf.info["solve"][0]["iterations"] == 30
    with pytest.raises(InputError, match="rhs_chunk"):
        LissaInfluence(P.model, P.loss, rhs_chunk=0)
