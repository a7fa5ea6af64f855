"""The worker side: a Job carries its method's batch function; run_batch only wraps it.

A new method is a batch function plus a subclass of MonteCarloValuation -- no dispatch to edit.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dvl_ooc.valuation import (
    CombinatorialShapleyValuation,
    InteractionGame,
    MaxChecks,
    Moments,
    MonteCarloValuation,
    MSRBanzhafValuation,
    MSRSampler,
    TMCShapleyValuation,
)
from dvl_ooc.valuation.combinatorial import cmc_batch
from dvl_ooc.valuation.msr import msr_batch
from dvl_ooc.valuation.tasks import Job, run_batch
from dvl_ooc.valuation.tmc import tmc_batch


@pytest.mark.parametrize("cls, fn", [(TMCShapleyValuation, tmc_batch),
                                     (MSRBanzhafValuation, msr_batch),
                                     (CombinatorialShapleyValuation, cmc_batch)])
def test_each_method_owns_its_batch_function_and_the_job_pickles_it_by_reference(cls, fn):
    g = InteractionGame(np.arange(4.0))
    v = cls(g, is_done=MaxChecks(1), seed=0)
    job = v._job(g, 4, 0)
    assert cls.batch is fn and job.batch is fn
    assert fn.__module__ == f"dvl_ooc.valuation.{fn.__module__.rsplit('.', 1)[1]}"
    back = pickle.loads(pickle.dumps(job))
    assert back.batch is fn  # by reference: a spawned worker imports the module
    part, evals = run_batch(back, 0, 3)
    ref, ref_evals = fn(job, 0, 3)
    assert evals == ref_evals > 0
    for k in part:
        assert np.array_equal(part[k].mean, ref[k].mean)
        assert np.array_equal(part[k].count, ref[k].count)


def test_setup_evaluations_are_counted_by_the_method():
    g = InteractionGame(np.ones(5))  # u(S) = |S|
    tmc = TMCShapleyValuation(g, is_done=MaxChecks(1), seed=0, samples_per_round=2).fit()
    assert tmc.result.evaluations == 2 * 5 + 2  # u(all), u(empty) on the driver
    msr = MSRBanzhafValuation(g, is_done=MaxChecks(1), seed=0, samples_per_round=8).fit()
    assert msr.result.evaluations == 8


def _count_batch(job: Job, start: int, stop: int) -> tuple[dict[str, Moments], int]:
    """A toy estimator: the mean of u(S) over the subsets S that contain each point."""
    acc = Moments.zeros(job.n)
    for k in range(start, stop):
        m = job.sampler.subset_mask(job.seed, k, job.n)
        acc.update(np.full(job.n, job.utility(np.flatnonzero(m))), where=m)
    return {"marginal": acc}, stop - start


class _InclusionMean(MonteCarloValuation):
    algorithm = "inclusion_mean"
    batch = staticmethod(_count_batch)
    sampler = MSRSampler()


def test_a_new_method_is_a_batch_function_and_a_subclass():
    g = InteractionGame(np.ones(6))  # u(S) = |S|: E[|S| | i in S] = 1 + 5/2
    res = _InclusionMean(g, is_done=MaxChecks(2), seed=3, batch_size=7,
                         samples_per_round=200).fit().result
    assert res.algorithm == "inclusion_mean" and res.evaluations == 400
    np.testing.assert_allclose(res.values, 3.5, atol=6 * res.stderr.max())
    assert res.stderr.max() < 0.15
    again = _InclusionMean(g, is_done=MaxChecks(2), seed=3, batch_size=50,
                           samples_per_round=200).fit().result
    np.testing.assert_allclose(again.values, res.values, rtol=1e-13)


def test_a_method_without_batch_function_says_so():
    class NoBatch(MonteCarloValuation):
        sampler = MSRSampler()

    with pytest.raises(NotImplementedError, match="NoBatch"):
        NoBatch(InteractionGame(np.ones(3)), is_done=MaxChecks(1), seed=0).fit()
