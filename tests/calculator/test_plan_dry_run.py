"""Dry-run plans (issue 23 §4): :func:`dry_run_plan` from shapes alone (no data, no cluster, no
fit where the widths do not depend on it), checked against hand-computed numbers and against
the plan of a fitted model on real data of the same shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc import (
    ArnoldiInfluence,
    DirectInfluence,
    EkfacInfluence,
    SequentialInfluenceCalculator,
)
from dvl_ooc.calculator.plan import dry_run_plan
from dvl_ooc.exceptions import NotFittedError

N_TEST, N_TRAIN, SHAPE = 50, 300, (1, 8, 8)
BUDGET = 1 << 30


def _net() -> nn.Module:
    torch.manual_seed(0)
    # conv: d_out 2, d_a 1*3*3 + 1 = 10; linear: d_out 5, d_a 2*6*6 + 1 = 73
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 5))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_ekfac_dry_run_by_hand() -> None:
    """Widths, groups, tiles, gradient computations and stored bytes of an unfitted EK-FAC
    model, computed here from the layer shapes."""
    m = EkfacInfluence(_net(), F.cross_entropy, rank=2)
    assert not m.is_fitted
    # rank 2: the conv's factors (2 + 10) * 2 = 24 >= 2 * 10 stay dense (20 floats); the
    # linear layer's (5 + 73) * 2 = 156 < 5 * 73 are stored
    k_test, p = 20 + 156, 2 * 10 + 5 * 73
    tc, rc = 10, 64
    # the features of two test chunks fit the bound, three do not: groups of 2, 2, 1 chunks
    bound = 2 * tc * k_test * 4 + 1
    plan = dry_run_plan(m, N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET, test_chunk=tc,
                        train_chunk=rc, self_influence=True, max_test_feature_bytes=bound)
    assert (plan.method, plan.p, plan.k_test, plan.k_train) == ("EkfacInfluence", p, k_test, p)
    assert plan.test_groups == [[0, 1], [2, 3], [4]] and plan.groups == 3
    assert plan.group_rows == 2 * tc
    assert plan.tiles == math.ceil(N_TEST / tc) * math.ceil(N_TRAIN / rc) == 25
    assert plan.gradient_computations == N_TEST + 3 * N_TRAIN == 950
    assert plan.preconditioning_solves == N_TEST + N_TRAIN
    # tiles: the dense conv block's product, plus the linear layer's product and the expansion
    # of each test row's rank-2 factors (5 x 73 x 2) once per train chunk (cheaper here than
    # contracting first: 365 (2 + n_s) < 2 n_s (365 + 5) for every chunk size n_s)
    chunks = math.ceil(N_TRAIN / rc)
    assert plan.tile_multiply_adds == (N_TEST * N_TRAIN * 20
                                       + 5 * 73 * (N_TEST * N_TRAIN + 2 * N_TEST * chunks))
    assert plan.store_bytes == (N_TEST * N_TRAIN + N_TRAIN) * 4 == 61_200
    assert "store 59.8 KiB uncompressed" in plan.summary()
    # float64 influences, no self-influence
    plan64 = dry_run_plan(m, N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET, dtype="float64")
    assert plan64.store_bytes == N_TEST * N_TRAIN * 8


@pytest.mark.parametrize("kind", ["ekfac", "proj"])
def test_dry_run_equals_the_fitted_plan(kind: str) -> None:
    """An unfitted model's dry run is the plan a fitted one gets from real data."""
    def make() -> EkfacInfluence | DirectInfluence:
        if kind == "ekfac":
            return EkfacInfluence(_net(), F.cross_entropy, rank=2, micro_batch_size=16)
        return DirectInfluence(_net(), F.cross_entropy, micro_batch_size=16,
                               projection=dict(k_in=2, k_out=2, seed=1))

    fitted = make().fit(_data(32, 1))
    xt, yt = _data(N_TEST, 2)
    x, y = _data(N_TRAIN, 3)
    # a default test chunk shrunk to the bound, test groups, an explicit train chunk
    bound, kw = 22_528, dict(train_chunk=128, self_influence=True)
    calc = SequentialInfluenceCalculator(fitted, memory_budget=BUDGET,
                                         max_test_feature_bytes=bound)
    want = calc.plan(xt, yt, x, y, **kw)
    got = dry_run_plan(make(), N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET,
                       max_test_feature_bytes=bound, **kw)
    assert got.as_dict() == want.as_dict() and got.test_groups == want.test_groups
    if kind == "ekfac":  # shrunk and grouped as intended
        assert got.test_chunk_source == "shrunk" and got.groups > 1
    if kind == "proj":
        assert got.p == got.k_test == got.k_train == fitted.projector.feature_dim
    # the fitted model plans the same without data
    assert dry_run_plan(fitted, N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET,
                        max_test_feature_bytes=bound, **kw).as_dict() == want.as_dict()


def test_imagenet_shapes_are_never_materialised() -> None:
    """1.28 M x 3 x 224 x 224 float16 inputs (386 GB) are planned from their shape; default
    chunks; input bytes as the calculator would read them."""
    m = EkfacInfluence(_net(), F.cross_entropy)
    n_te, n_tr, shape = 50_000, 1_281_167, (3, 224, 224)
    plan = dry_run_plan(m, n_te, n_tr, shape, sample_dtype="float16", memory_budget=8 << 30)
    assert (plan.test_chunk, plan.train_chunk) == (1024, 4096)
    assert plan.tiles == math.ceil(n_te / 1024) * math.ceil(n_tr / 4096) == 49 * 313
    assert plan.gradient_computations == n_te + n_tr
    assert plan.store_bytes == n_te * n_tr * 4
    d = int(np.prod(shape))
    assert plan.bytes["train_transients"] == 2 * 64 * plan.p * 4 + 4096 * d * (2 + 4)


def test_refused_when_the_width_comes_from_the_fit() -> None:
    m = ArnoldiInfluence(_net(), F.cross_entropy, rank=4)
    with pytest.raises(NotFittedError, match="comes from its fit"):
        dry_run_plan(m, N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET)


def test_unfitted_ensemble_with_fit_width_members_is_refused() -> None:
    """An unfitted Ensemble plans from its members' widths: gradient width for Direct/CG
    members, but a member whose width comes from its fit (Arnoldi) is refused, as it is alone
    (it used to be planned at the gradient width, 8x too wide here)."""
    from dvl_ooc import CgInfluence
    from dvl_ooc.influence import Ensemble

    ens = Ensemble([DirectInfluence(_net(), F.cross_entropy),
                    ArnoldiInfluence(_net(), F.cross_entropy, rank=4)])
    with pytest.raises(NotFittedError, match="comes from its fit"):
        dry_run_plan(ens, N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET)
    ok = Ensemble([DirectInfluence(_net(), F.cross_entropy), CgInfluence(_net(), F.cross_entropy)])
    plan = dry_run_plan(ok, N_TEST, N_TRAIN, SHAPE, memory_budget=BUDGET)
    p = 2 * 10 + 5 * 73  # the two layers' parameters (weights and biases)
    assert (plan.k_test, plan.k_train) == (2 * p, 2 * p)


def test_ensemble_tile_cost_is_the_members_sum() -> None:
    """An ensemble's planned tile multiply-adds are its members' (each at its own widths)."""
    from dvl_ooc.influence import Ensemble

    ek, di = EkfacInfluence(_net(), F.cross_entropy, rank=2), DirectInfluence(_net(),
                                                                              F.cross_entropy)
    kw = dict(memory_budget=BUDGET, test_chunk=10, train_chunk=64)
    plans = [dry_run_plan(x, N_TEST, N_TRAIN, SHAPE, **kw) for x in (ek, di, Ensemble([ek, di]))]
    assert plans[2].tile_multiply_adds == plans[0].tile_multiply_adds + plans[1].tile_multiply_adds
    assert plans[0].tile_multiply_adds > N_TEST * N_TRAIN * plans[0].p > 0
