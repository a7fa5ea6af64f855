"""MaxTime is honoured within one task's duration, and the result stays exactly reproducible.

The driver watches the criterion's deadline as each task finishes (not only between rounds):
at the deadline it stops, cancels what is in flight and keeps the tasks completed in sample
order without a gap, so ``n_samples`` is well defined and a run stopped there by a sample
budget gives bit-identical values. (The same on 2 workers: ``test_dask.py``.)
"""

from __future__ import annotations

import time

import numpy as np
import valuation_stub_games as stubs

from dvl_ooc.valuation import (
    InteractionGame,
    MaxChecks,
    MaxTime,
    MinUpdates,
    TMCShapleyValuation,
)

W = np.array([0.5, -1.0, 2.0, 0.25, 1.5])
DELAY = 0.02  # s per coalition: a permutation of 5 points 0.1 s, a task of 2 permutations 0.2 s
TASK_S = 2 * 5 * DELAY


def test_maxtime_stops_within_one_task_mid_round_with_a_reproducible_prefix():
    g = stubs.SlowGame(W, delay=DELAY)
    v = TMCShapleyValuation(g, is_done=MaxTime(0.7), seed=4, batch_size=2,
                            samples_per_round=1000)  # one round would take 100 s
    t0 = time.perf_counter()
    res = v.fit().result
    elapsed = time.perf_counter() - t0
    assert elapsed <= 0.7 + TASK_S + 0.4, elapsed  # the old driver overran by a whole round
    assert 0 < res.n_samples < 1000 and res.n_samples % 2 == 0  # whole tasks, mid-round
    assert res.evaluations == 2 + 5 * res.n_samples
    # exactly the run that stops there by a sample budget (same seed, batch size, grouping)
    ref = TMCShapleyValuation(InteractionGame(W), is_done=MaxChecks(1), seed=4, batch_size=2,
                              samples_per_round=res.n_samples).fit().result
    assert np.array_equal(res.values, ref.values)
    assert np.array_equal(res.variances, ref.variances)
    # and it continues like any result
    more = TMCShapleyValuation(InteractionGame(W), is_done=MaxChecks(1), seed=4, batch_size=2,
                               samples_per_round=4).fit(result=res).result
    assert more.n_samples == res.n_samples + 4
    longer = TMCShapleyValuation(InteractionGame(W), is_done=MaxChecks(1), seed=4, batch_size=2,
                                 samples_per_round=res.n_samples + 4).fit().result
    np.testing.assert_allclose(more.values, longer.values, rtol=1e-12, atol=1e-14)


def test_a_deadline_before_the_first_task_still_returns_that_task():
    g = stubs.SlowGame(W, delay=DELAY)
    v = TMCShapleyValuation(g, is_done=MaxTime(0.01) | MinUpdates(10**6), seed=0,
                            batch_size=2, samples_per_round=100)
    t0 = time.perf_counter()
    res = v.fit().result
    assert time.perf_counter() - t0 <= 0.01 + 2 * DELAY + TASK_S + 0.4
    assert res.n_samples == 2 and res.counts.min() == 2


def test_a_time_budget_that_needs_another_criterion_too_waits_for_the_round():
    g = InteractionGame(W)
    # MaxTime & MaxChecks: time alone does not stop it; the round end decides
    v = TMCShapleyValuation(g, is_done=MaxTime(1e-3) & MaxChecks(2), seed=0, batch_size=2,
                            samples_per_round=6).fit()
    assert v.result.n_samples == 12
