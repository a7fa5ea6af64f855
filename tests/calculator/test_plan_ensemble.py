"""The calculators' memory plan for an Ensemble (issue 22): the plan's bytes against a hand
computation, and the ensemble-specific parts against what the ensemble actually allocates
(counted by a dispatch mode that tracks live tensor storages).

An ensemble's train features are ``g`` itself when every member's are (no bytes); its
gradients and features are copied member by member into one array (one member's rows in
flight); its tile is a running sum next to one member's tile (two tiles with ``M >= 2``).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dvl_ooc import ArnoldiInfluence, DirectInfluence, Ensemble, SequentialInfluenceCalculator

F64 = torch.float64
N_TEST, N_TRAIN, D = 10, 40, 6  # samples; elements of one input
IT, ST = 8, 4  # float64 model and inputs, float32 store
P_M = 6 * 8 + 8 + 8 * 3 + 3  # parameters of one 6-8-3 network: 83
TC, RC, MB = 4, 15, 16  # test chunk, train chunk, every member's micro-batch


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the mode and still alive (views of
    storages that existed before do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        old = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0]
               if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in self.seen or key in old or not s.nbytes():
                continue
            self.seen.add(key)
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key, s.nbytes())
        return out


def peak_bytes(fn) -> int:
    with LiveBytes() as mode:
        fn()
    return mode.peak


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.Tanh(),
                                     fc2=nn.Linear(8, 3))).double().eval()


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, D, generator=g, dtype=F64)
    y = torch.randint(0, 3, (N_TRAIN,), generator=g)
    xt = torch.randn(N_TEST, D, generator=g, dtype=F64)
    yt = torch.randint(0, 3, (N_TEST,), generator=g)
    a, b = _net(0), _net(1)

    def direct(net):
        return DirectInfluence(net, F.cross_entropy, regularization=0.1, micro_batch_size=MB)

    arnoldi = ArnoldiInfluence(b, F.cross_entropy, regularization=0.1, rank=4,
                               micro_batch_size=MB)
    ens = {"direct+direct": Ensemble([direct(a), direct(b)], weights=[1, 3]),
           "direct+arnoldi": Ensemble([direct(a), arnoldi]),
           "one member": Ensemble([direct(a)])}
    return {"data": (xt, yt, x, y), "ens": {k: e.fit((x, y)) for k, e in ens.items()}}


# case -> by hand: p, k (test = train), train features aliased, f (widest member row in
# flight), extra tiles, micro-batch of the ensemble (max_m mb_m p_m // p)
CASES = {
    "direct+direct": (2 * P_M, 2 * P_M, True, P_M, 1, MB * P_M // (2 * P_M)),
    "direct+arnoldi": (2 * P_M, P_M + 4, False, P_M, 1, MB * P_M // (2 * P_M)),
    "one member": (P_M, P_M, True, P_M, 0, MB),
}


def _by_hand(case: str, tc: int, rc: int, rows: int) -> dict[str, int]:
    """The memory table of dvl_ooc.calculator.plan for ``case`` (float64 tensor inputs)."""
    p, k, aliased, f, extra, mb = CASES[case]
    return {
        "test_chunk_features": tc * k * IT,
        "test_gradients": tc * p * IT,
        "test_transients": 2 * min(mb, tc) * p * IT + tc * D * (IT + IT) + tc * f * IT,
        "group_features": rows * k * IT,
        "train_gradients": rc * p * IT,
        "train_features": 0 if aliased else rc * k * IT,
        "self_influence": 0,
        "tile_column": rows * rc * ST + (1 + extra) * tc * rc * IT,
        "train_transients": 2 * min(mb, rc) * p * IT + rc * D * (IT + IT) + rc * f * IT,
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_bytes_equal_hand_computed(setup, case):
    ens = setup["ens"][case]
    xt, yt, x, y = setup["data"]
    calc = SequentialInfluenceCalculator(ens, memory_budget=1 << 30)
    plan = calc.plan(xt, yt, x, y, test_chunk=TC, train_chunk=RC)
    p, k = CASES[case][:2]
    assert (plan.method, plan.p, plan.k_test, plan.k_train) == ("Ensemble", p, k, k)
    assert plan.groups == 1 and plan.group_rows == N_TEST
    assert plan.bytes == _by_hand(case, TC, RC, N_TEST)
    got = calc.influences(xt, yt, x, y, test_chunk=TC, train_chunk=RC, dtype="float64")
    ref = ens.influences(xt, yt, x, y)
    np.testing.assert_allclose(got.compute(), ref.numpy(), rtol=1e-10,
                               atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_covers_what_the_ensemble_allocates(setup, case, monkeypatch):
    """Counted allocations of the column task's steps: the gradients (members' passes
    replaced by copies of their results: one member's rows in flight), the train features
    (none when aliased) and a tile (the running sum and one member's tile; all test against
    all train points, so that it outweighs the one zero row of ``feature_dims``)."""
    ens = setup["ens"][case]
    xt, yt, x, y = setup["data"]
    plan = SequentialInfluenceCalculator(ens, memory_budget=1 << 30).plan(
        xt, yt, x, y, test_chunk=TC, train_chunk=RC)
    b = plan.bytes
    p, k, aliased, f, extra, _ = CASES[case]
    T = ens.test_features(ens.gradients(xt, yt))
    R = ens.train_features(ens.gradients(x, y))
    got = peak_bytes(lambda: ens.tile(T, R))
    assert got == (1 + extra) * N_TEST * N_TRAIN * IT
    xr, yr = x[:RC], y[:RC]
    for m in ens.members:
        g_m = m.gradients(xr, yr)
        monkeypatch.setattr(m, "gradients", lambda x, y, g_m=g_m: g_m.clone())
    got = peak_bytes(lambda: ens.gradients(xr, yr))
    assert got == RC * (p + P_M) * IT  # the ensemble's array and one member's gradients
    assert got <= b["train_gradients"] + RC * f * IT
    g = ens.gradients(xr, yr)
    got = peak_bytes(lambda: ens.train_features(g))
    if aliased:
        assert got == 0
    else:  # the ensemble's array and Arnoldi's rows before their copy
        assert RC * k * IT < got <= b["train_features"] + RC * f * IT
