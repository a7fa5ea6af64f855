"""The calculators' plan and memory bounds (issue 11): the plan's numbers against hand-computed
ones and against counted work, default chunks shrunk to fit the bounds (same values, same
chunking on resume), explicit chunks that do not fit refused before anything is computed.
In process (SequentialInfluenceCalculator shares the plan with the Dask calculator, whose own
default budget and group-by-group runs are tested in test_calculator.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc import DirectInfluence, SequentialInfluenceCalculator
from dvl_ooc.calculator import InfluencePlan
from dvl_ooc.exceptions import InputError, MemoryBudgetError
from dvl_ooc.runtime import format_bytes

N_TEST, N_TRAIN, D = 20, 60, 64  # samples; elements of one 1x8x8 input
IT, ST = 8, 4  # float64 model, float32 store


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 6 * 6, 5)).double()
    x = torch.randn(N_TRAIN, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (N_TRAIN,))
    xt = torch.randn(N_TEST, 1, 8, 8, dtype=torch.float64)
    yt = torch.randint(0, 5, (N_TEST,))
    full = DirectInfluence(net, F.cross_entropy, regularization=1e-2).fit((x, y))
    proj = DirectInfluence(net, F.cross_entropy, regularization=1e-2, micro_batch_size=16,
                           projection=dict(k_in=2, k_out=2, seed=1)).fit((x, y))
    return {"data": (xt, yt, x, y), "full": full, "proj": proj,
            "ref": {k: m.influences(xt, yt, x, y).numpy() for k, m in
                    (("full", full), ("proj", proj))}}


def _count(monkeypatch, m) -> dict[str, int]:
    """Count the gradient rows and preconditioned rows ``m`` computes."""
    n = {"gradients": 0, "preconditioned": 0}
    grads, test_features = m.gradients, m.test_features

    def g(x, y):
        out = grads(x, y)
        n["gradients"] += len(out)
        return out

    def t(gr):
        n["preconditioned"] += len(gr)
        return test_features(gr)

    monkeypatch.setattr(m, "gradients", g)
    monkeypatch.setattr(m, "test_features", t)
    return n


def _by_hand(p, k, tc, rc, rows, mb):
    """The per-task memory table of dvl_ooc.calculator.plan, for Direct (train features are
    the gradients: no extra bytes) on float64 numpy inputs."""
    return {
        "test_chunk_features": tc * k * IT,
        "test_gradients": tc * p * IT,
        "test_transients": 2 * min(mb, tc) * p * IT + tc * D * (IT + IT),
        "group_features": rows * k * IT,
        "train_gradients": rc * p * IT,
        "train_features": 0,
        "self_influence": 0,
        "tile_column": rows * rc * ST + tc * rc * IT,
        "train_transients": 2 * min(mb, rc) * p * IT + rc * D * (IT + IT),
    }


# ---------------------------------------------------------------------- plan numbers
@pytest.mark.parametrize("kind", ["full", "proj"])
def test_plan_numbers_equal_hand_computed_and_counted_work(setup, kind, tmp_path, monkeypatch):
    m = setup[kind]
    xt, yt, x, y = setup["data"]
    n_params = sum(q.numel() for q in m.model.parameters())
    p = m.grads.num_params
    if kind == "proj":  # the projected gradients are k-dimensional, never p-dimensional
        assert p == m.projector.feature_dim < n_params
    else:
        assert p == n_params == 575
    mb = m.grads.micro_batch_size
    # two test chunks of 7 rows per group: groups [0, 1], [2]
    calc = SequentialInfluenceCalculator(m, max_test_feature_bytes=2 * 7 * p * IT,
                                         memory_budget=1 << 30)
    plan = calc.plan(xt, yt, x, y, test_chunk=7, train_chunk=25)
    assert isinstance(plan, InfluencePlan)
    assert (plan.n_test, plan.n_train, plan.p, plan.k_test, plan.k_train) == (
        N_TEST, N_TRAIN, p, p, p)
    assert plan.projected is (kind == "proj")
    assert (plan.test_chunk, plan.train_chunk) == (7, 25)
    assert plan.test_chunk_source == plan.train_chunk_source == "explicit"
    assert plan.test_groups == [[0, 1], [2]] and plan.groups == 2 and plan.group_rows == 14
    assert plan.tiles == 3 * 3 and (plan.itemsize, plan.store_itemsize) == (IT, ST)
    assert plan.gradient_computations == N_TEST + 2 * N_TRAIN
    assert plan.preconditioning_solves == N_TEST
    assert plan.tile_multiply_adds == N_TEST * N_TRAIN * p
    want = _by_hand(p, p, 7, 25, 14, mb)
    assert plan.bytes == want
    test_keys = ("test_chunk_features", "test_gradients", "test_transients")
    assert plan.test_task_bytes == sum(want[k] for k in test_keys)
    assert plan.column_task_bytes == sum(v for k, v in want.items() if k not in test_keys)
    assert plan.task_bytes == max(plan.test_task_bytes, plan.column_task_bytes)
    assert plan.memory_budget == 1 << 30 and plan.feature_bound == 2 * 7 * p * IT
    assert len(plan.notes) == 1 and "streamed in 2 groups" in plan.notes[0]
    assert f"p={p}" in plan.summary() and plan.notes[0] in plan.summary()
    # the run does what the plan says: counted gradient rows and solves, values
    n = _count(monkeypatch, m)
    s = calc.to_zarr(tmp_path / "s", xt, yt, x, y, test_chunk=7, train_chunk=25,
                     progress=False)
    assert n == {"gradients": plan.gradient_computations,
                 "preconditioned": plan.preconditioning_solves}
    assert calc.info["plan"] == plan.as_dict()
    np.testing.assert_allclose(s.influences[:], setup["ref"][kind], rtol=1e-5,
                               atol=1e-6 * np.abs(setup["ref"][kind]).max())
    # self-influence: one more solve per train point, its features in the column task
    p2 = calc.plan(xt, yt, x, y, test_chunk=7, train_chunk=25, self_influence=True)
    assert p2.preconditioning_solves == N_TEST + N_TRAIN
    assert p2.bytes["self_influence"] == 25 * p * IT


def test_plan_counts_train_features_when_they_are_not_the_gradients(setup):
    """k_train != k_test (e.g. EK-FAC with compressed test factors): the train features are
    extra memory and the tile cost uses k_train; values through the model's tile()."""

    class WideTrain(DirectInfluence):
        def train_features(self, g):
            return torch.cat([g, torch.zeros_like(g[:, :3])], 1)

        def feature_dims(self):
            return self.grads.num_params, self.grads.num_params + 3

        def tile(self, T, R):
            return T @ R[:, :-3].T

    xt, yt, x, y = setup["data"]
    full = setup["full"]
    m = WideTrain(full.model, F.cross_entropy, regularization=1e-2).fit((x, y))
    p = m.grads.num_params
    calc = SequentialInfluenceCalculator(m, memory_budget=1 << 30)
    plan = calc.plan(xt, yt, x, y, test_chunk=5, train_chunk=30)
    assert (plan.k_test, plan.k_train) == (p, p + 3)
    assert plan.bytes["train_features"] == 30 * (p + 3) * IT
    assert plan.tile_multiply_adds == N_TEST * N_TRAIN * (p + 3)
    A = calc.influences(xt, yt, x, y, test_chunk=5, train_chunk=30, dtype="float64")
    np.testing.assert_allclose(A.compute(), setup["ref"]["full"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- test chunk bound
def test_default_test_chunk_is_shrunk_to_the_feature_bound(setup, tmp_path, monkeypatch):
    m = setup["full"]
    xt, yt, x, y = setup["data"]
    p = m.grads.num_params
    bound = 3 * p * IT  # the features of 3 test points; one default chunk (20) needs 20
    calc = SequentialInfluenceCalculator(m, max_test_feature_bytes=bound,
                                         memory_budget=1 << 30)
    n = _count(monkeypatch, m)
    s = calc.to_zarr(tmp_path / "s", xt, yt, x, y, progress=False)
    plan = calc.info["plan"]
    # halved 20 -> 10 -> 5 -> 2; groups of one chunk (2 chunks would be 4 rows > 3)
    assert s.chunks == (2, N_TRAIN) and plan["test_chunk_source"] == "shrunk"
    assert plan["groups"] == 10 and plan["bytes"]["group_features"] <= bound
    assert any("test_chunk shrunk from 20 to 2" in note for note in plan["notes"])
    assert n["gradients"] == plan["gradient_computations"] == N_TEST + 10 * N_TRAIN
    ref = setup["ref"]["full"]
    np.testing.assert_allclose(s.influences[:], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # deterministic: a fresh calculator chooses the same chunks; a resume keeps the store's
    again = SequentialInfluenceCalculator(m, max_test_feature_bytes=bound,
                                          memory_budget=1 << 30)
    assert again.plan(xt, yt, x, y).test_chunk == 2
    n["gradients"] = 0
    again.to_zarr(tmp_path / "s", xt, yt, x, y, progress=False)
    assert again.info["plan"]["test_chunk_source"] == "store"
    assert again.info["columns"] == [] and n["gradients"] == 0
    # the lazy array: same choice, same values
    A = again.influences(xt, yt, x, y, dtype="float64")
    assert A.chunks[0][0] == 2
    np.testing.assert_allclose(A.compute(), ref, rtol=1e-10, atol=1e-12)


def test_explicit_test_chunk_over_the_bound_is_refused(setup, tmp_path, monkeypatch):
    m = setup["full"]
    xt, yt, x, y = setup["data"]
    p = m.grads.num_params
    calc = SequentialInfluenceCalculator(m, max_test_feature_bytes=3 * p * IT,
                                         memory_budget=1 << 30)
    n = _count(monkeypatch, m)
    with pytest.raises(MemoryBudgetError) as e:
        calc.to_zarr(tmp_path / "s", xt, yt, x, y, test_chunk=20, progress=False)
    msg = str(e.value)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, InputError)
    for part in ("test_chunk=20", format_bytes(20 * p * IT), f"20 x {p} x 8 B",
                 "max_test_feature_bytes", "at most 3 fits", "projection=dict(",
                 "layers=[", "rank="):
        assert part in msg, (part, msg)
    assert n["gradients"] == 0 and not (tmp_path / "s").exists()
    # a store made with a larger bound cannot be resumed under this one (named, mode='w')
    SequentialInfluenceCalculator(m, memory_budget=1 << 30).to_zarr(
        tmp_path / "old", xt, yt, x, y, test_chunk=20, progress=False)
    with pytest.raises(MemoryBudgetError, match="store being resumed.*mode='w'"):
        calc.to_zarr(tmp_path / "old", xt, yt, x, y, progress=False)
    s = calc.to_zarr(tmp_path / "old", xt, yt, x, y, mode="w", progress=False)
    assert s.chunks == (2, N_TRAIN)
    # a test point whose features alone exceed the bound: refused even with default chunks
    tiny = SequentialInfluenceCalculator(m, max_test_feature_bytes=p * IT - 1)
    with pytest.raises(MemoryBudgetError, match="not even 1 test point"):
        tiny.plan(xt, yt, x, y)
    with pytest.raises(InputError, match="memory_budget"):
        SequentialInfluenceCalculator(m, memory_budget=0)


# ---------------------------------------------------------------------- train chunk budget
def test_train_chunk_over_the_budget_refused_before_any_gradient(setup, tmp_path,
                                                                 monkeypatch):
    m = setup["full"]
    xt, yt, x, y = setup["data"]
    p, mb = m.grads.num_params, m.grads.micro_batch_size

    def column(rc):  # the column task by hand (test chunk 20: one group of 20 rows)
        b = _by_hand(p, p, N_TEST, rc, N_TEST, mb)
        return sum(b[k] for k in ("group_features", "train_gradients", "tile_column",
                                  "train_transients"))

    budget = (column(30) + column(31)) // 2  # 30 train points fit, 31 do not
    assert column(N_TRAIN) > budget
    calc = SequentialInfluenceCalculator(m, memory_budget=budget)
    n = _count(monkeypatch, m)
    with pytest.raises(MemoryBudgetError) as e:
        calc.to_zarr(tmp_path / "s", xt, yt, x, y, train_chunk=N_TRAIN, progress=False)
    msg = str(e.value)
    for part in (f"train_chunk={N_TRAIN}", format_bytes(column(N_TRAIN)),
                 f"gradients {N_TRAIN} x {p} x 8 B", f"memory_budget={format_bytes(budget)}",
                 "at most 30 fits", "projection=dict(", "layers=["):
        assert part in msg, (part, msg)
    assert n == {"gradients": 0, "preconditioned": 0} and not (tmp_path / "s").exists()
    # default: 60 -> 30, within the budget, same values
    s = calc.to_zarr(tmp_path / "s", xt, yt, x, y, progress=False)
    plan = calc.info["plan"]
    assert s.chunks == (N_TEST, 30) and plan["train_chunk_source"] == "shrunk"
    assert plan["column_task_bytes"] == column(30) <= budget
    assert any("train_chunk shrunk from 60 to 30" in note for note in plan["notes"])
    ref = setup["ref"]["full"]
    np.testing.assert_allclose(s.influences[:], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # a projected model is told to project more
    proj = SequentialInfluenceCalculator(setup["proj"], memory_budget=1000)
    with pytest.raises(MemoryBudgetError, match="smaller projection k_in/k_out"):
        proj.plan(xt, yt, x, y, train_chunk=N_TRAIN)


def test_default_budget_is_half_the_available_memory(setup, monkeypatch):
    import dvl_ooc.calculator.plan as plan_mod

    monkeypatch.setattr(plan_mod, "available_memory", lambda: 1_500_000)
    xt, yt, x, y = setup["data"]
    plan = SequentialInfluenceCalculator(setup["full"]).plan(xt, yt, x, y)
    assert plan.memory_budget == 750_000 and plan.feature_bound == 375_000
    # a column of 60 train points needs ~1.0 MB (gradients and their micro-batch): halved once
    assert plan.train_chunk == 30 and plan.task_bytes <= plan.memory_budget
    assert "train_chunk shrunk from 60 to 30" in plan.notes[0]
    assert "default: 0.5 of the memory available" in plan.notes[0]


def test_plan_of_an_iterative_model_without_its_fit_data(setup):
    """An unpickled CG model (no fit data; the calculator has it) is planned with features of
    the gradient width and its solver's work matrices in the test task."""
    import pickle

    from dvl_ooc import CgInfluence

    xt, yt, x, y = setup["data"]
    cg = CgInfluence(setup["full"].model, F.cross_entropy, regularization=1e-1).fit((x, y))
    m = pickle.loads(pickle.dumps(cg))
    p = m.grads.num_params
    plan = SequentialInfluenceCalculator(m, fit_data=(x, y)).plan(xt, yt, x, y, test_chunk=10)
    assert (plan.k_test, plan.k_train) == (p, p)
    work = 0
    if hasattr(m, "_solve_bytes"):  # CG's estimate of its solve (results + work matrices)
        work = max(m._solve_bytes(b, 10, 10) for b in m.blocks) - 10 * p * IT
        assert work > 0
    assert plan.bytes["test_transients"] == 2 * 10 * p * IT + 10 * D * (IT + IT) + work
