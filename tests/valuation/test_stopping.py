"""Stopping criteria: when each fires, composition with | and &, boundedness."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dvl_ooc.exceptions import InputError
from dvl_ooc.valuation import (
    AbsoluteStandardError,
    HistoryDeviation,
    InteractionGame,
    MaxChecks,
    MaxEvaluations,
    MaxTime,
    MaxUpdates,
    MinUpdates,
    RankCorrelation,
    TMCShapleyValuation,
    ValuationResult,
)


def _res(values, counts, variances=None):
    return ValuationResult.from_values(values, counts=counts, variances=variances)


def test_update_and_evaluation_budgets():
    r = _res([0.0, 1.0, 2.0], counts=[3, 5, 9])
    assert MaxUpdates(9)(r) and not MaxUpdates(10)(r)
    assert MinUpdates(3)(r) and not MinUpdates(4)(r)
    assert MaxEvaluations(100)(r, 100) and not MaxEvaluations(100)(r, 99)
    c = MaxChecks(3)
    assert [c(r), c(r), c(r)] == [False, False, True]
    c.reset()
    assert not c(r)
    t = MaxTime(0.05)
    assert not t(r)
    time.sleep(0.06)
    assert t(r)
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError):
            MaxUpdates(bad)


def test_absolute_standard_error():
    # stderr = sqrt(var / count): [0.5, 0.1, 0.05]
    r = _res([0.0, 0.0, 0.0], counts=[4, 4, 4], variances=[1.0, 0.04, 0.01])
    assert not AbsoluteStandardError(0.2)(r)
    assert AbsoluteStandardError(0.2, fraction=0.6)(r)
    assert AbsoluteStandardError(0.6)(r)
    assert not AbsoluteStandardError(0.6, burn_in=5)(r)


def test_rank_correlation_and_history_deviation_need_stable_estimates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    rc = RankCorrelation(rtol=0.01, burn_in=1)
    assert not rc(_res(base, [5] * 50))  # first check: nothing to compare
    assert not rc(_res(rng.normal(size=50), [5] * 50))  # unrelated ranking
    assert not rc(_res(base, [5] * 50))
    assert rc(_res(base + 1e-9 * rng.normal(size=50), [5] * 50))
    hd = HistoryDeviation(n_steps=2, rtol=0.01)
    seq = [base, base * 1.5, base * 1.001, base * 1.002, base * 1.003]
    fired = [hd(_res(v, [5] * 50)) for v in seq]
    assert fired == [False, False, False, False, True]


def test_composition_truth_tables_and_boundedness():
    r = _res([0.0, 1.0], counts=[2, 4])
    yes, no = MaxUpdates(4), MaxUpdates(5)
    assert (yes | no)(r) and (no | yes)(r) and not (no | MinUpdates(3))(r)
    assert not (yes & no)(r) and (yes & MinUpdates(2))(r)
    assert (AbsoluteStandardError(0.1) | MaxUpdates(3)).bounded
    assert not (AbsoluteStandardError(0.1) & MaxUpdates(3)).bounded
    assert not RankCorrelation().bounded
    # both sides of | see every check (history criteria need it)
    c1, c2 = MaxChecks(2), MaxChecks(2)
    combo = c1 | c2
    assert not combo(r) and combo(r)
    with pytest.raises(InputError):
        _ = MaxUpdates(1) | 3


def test_valuation_refuses_a_criterion_that_may_never_fire():
    g = InteractionGame([1.0, 2.0])
    with pytest.raises(InputError, match="may never fire"):
        TMCShapleyValuation(g, is_done=AbsoluteStandardError(1e-6), seed=0)
    with pytest.raises(InputError, match="may never fire"):
        TMCShapleyValuation(g, is_done=RankCorrelation() & MaxUpdates(10), seed=0)
    with pytest.raises(InputError, match="StoppingCriterion"):
        TMCShapleyValuation(g, is_done=100, seed=0)
    # with a budget it runs and stops on the budget
    g = InteractionGame([1.0, 2.0], noise=0.5)  # noisy: the stderr never reaches 1e-12
    v = TMCShapleyValuation(g, is_done=AbsoluteStandardError(1e-12) | MaxUpdates(16), seed=0,
                            samples_per_round=8).fit()
    assert v.result.counts.max() == 16


def test_deadlines_of_time_budgets_and_their_compositions():
    t = MaxTime(5.0)
    t.reset()
    now = time.monotonic()
    assert now < t.deadline() <= now + 5.0
    u = MaxTime(9.0)
    u.reset()
    assert MaxUpdates(3).deadline() is None and (MaxUpdates(3) | MinUpdates(2)).deadline() is None
    assert (t | MaxUpdates(3)).deadline() == t.deadline()  # either fires: the time alone stops
    assert (t | u).deadline() == t.deadline()
    assert (t & MaxUpdates(3)).deadline() is None  # both needed: time alone does not stop
    assert (t & u).deadline() == u.deadline()
