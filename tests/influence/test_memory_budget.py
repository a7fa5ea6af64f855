"""Fits whose working memory would not fit are refused before any data pass, with the size
and the ways out in the message."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dvl_ooc import ArnoldiInfluence, DirectInfluence, NystroemSketchInfluence
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
