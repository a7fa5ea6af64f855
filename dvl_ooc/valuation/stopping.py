"""Stopping criteria for Monte-Carlo valuation, composable with ``|`` (either) and ``&`` (both).

A criterion is called between rounds as ``criterion(result, evaluations)`` with the current
:class:`~dvl_ooc.valuation.result.ValuationResult` and the total number of utility evaluations so
far, and returns ``True`` to stop. Stateful criteria (time, history, rank correlation) are reset
at the start of every ``fit``. A time budget also has a :meth:`~StoppingCriterion.deadline`
that the driver watches while tasks run (``a | b``: the earlier one; ``a & b``: the later one,
if both have one).

A criterion is *bounded* when it is guaranteed to fire after finitely many rounds (a budget of
updates, evaluations, checks or time). Convergence tests (standard error, rank correlation,
history deviation) may never fire on a noisy utility, so a valuation refuses to run with an
unbounded criterion unless it is combined with a bounded one: ``AbsoluteStandardError(0.01) |
MaxUpdates(1000)``.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..exceptions import InputError
from .result import ValuationResult

__all__ = [
    "AbsoluteStandardError",
    "HistoryDeviation",
    "MaxChecks",
    "MaxEvaluations",
    "MaxTime",
    "MaxUpdates",
    "MinUpdates",
    "RankCorrelation",
    "StoppingCriterion",
]


class StoppingCriterion:
    """Base class: subclasses implement ``_check`` (and ``reset`` if stateful)."""

    bounded: bool = False

    def __call__(self, result: ValuationResult, evaluations: int = 0) -> bool:
        return bool(self._check(result, evaluations))

    def _check(self, result: ValuationResult, evaluations: int) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state from a previous run."""

    def deadline(self) -> float | None:
        """The ``time.monotonic()`` at which this criterion fires whatever the result
        (``None``: none). The driver checks it as each task finishes, not only between
        rounds, so a time budget is kept to within one task's duration."""
        return None

    def __or__(self, other: StoppingCriterion) -> StoppingCriterion:
        return _Or(self, _check_criterion(other))

    def __and__(self, other: StoppingCriterion) -> StoppingCriterion:
        return _And(self, _check_criterion(other))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _check_criterion(c: object) -> StoppingCriterion:
    if not isinstance(c, StoppingCriterion):
        raise InputError(f"cannot combine a stopping criterion with {type(c).__name__}")
    return c


class _Or(StoppingCriterion):
    def __init__(self, a: StoppingCriterion, b: StoppingCriterion) -> None:
        self.a, self.b = a, b
        self.bounded = a.bounded or b.bounded

    def _check(self, result, evaluations):  # both sides see every check (history criteria)
        ra, rb = self.a(result, evaluations), self.b(result, evaluations)
        return ra or rb

    def reset(self) -> None:
        self.a.reset()
        self.b.reset()

    def deadline(self) -> float | None:
        times = [t for t in (self.a.deadline(), self.b.deadline()) if t is not None]
        return min(times) if times else None

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


class _And(_Or):
    def __init__(self, a: StoppingCriterion, b: StoppingCriterion) -> None:
        super().__init__(a, b)
        self.bounded = a.bounded and b.bounded

    def _check(self, result, evaluations):
        ra, rb = self.a(result, evaluations), self.b(result, evaluations)
        return ra and rb

    def deadline(self) -> float | None:
        ta, tb = self.a.deadline(), self.b.deadline()
        return None if ta is None or tb is None else max(ta, tb)

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


def _positive_int(name: str, v: int) -> int:
    if int(v) != v or v < 1:
        raise InputError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class MaxUpdates(StoppingCriterion):
    """Stop once some point has been updated ``n`` times."""

    bounded = True

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n)

    def _check(self, result, evaluations):
        return len(result) > 0 and int(result.counts.max()) >= self.n


class MinUpdates(StoppingCriterion):
    """Stop once every point has been updated at least ``n`` times."""

    bounded = True

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n)

    def _check(self, result, evaluations):
        return len(result) > 0 and int(result.counts.min()) >= self.n


class MaxEvaluations(StoppingCriterion):
    """Stop after ``n`` utility evaluations (model trainings) in total."""

    bounded = True

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n)

    def _check(self, result, evaluations):
        return evaluations >= self.n


class MaxChecks(StoppingCriterion):
    """Stop at the ``n``-th check, i.e. after ``n`` rounds of this ``fit``."""

    bounded = True

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n)
        self._checks = 0

    def _check(self, result, evaluations):
        self._checks += 1
        return self._checks >= self.n

    def reset(self) -> None:
        self._checks = 0


class MaxTime(StoppingCriterion):
    """Stop after ``seconds`` of wall-clock time since ``fit`` started.

    Honoured within one task's duration: the driver stops as soon as the time is up (or, if no
    task has finished yet in this ``fit``, when the first one does), cancels the tasks in
    flight and keeps the samples of the tasks completed in sample order without a gap, so the
    result (``n_samples``, values) is exactly that of a run stopped at that sample.
    """

    bounded = True

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise InputError(f"seconds must be positive, got {seconds!r}")
        self.seconds = float(seconds)
        self._start = time.monotonic()

    def _check(self, result, evaluations):
        return time.monotonic() - self._start >= self.seconds

    def reset(self) -> None:
        self._start = time.monotonic()

    def deadline(self) -> float | None:
        return self._start + self.seconds


class AbsoluteStandardError(StoppingCriterion):
    """Stop when a ``fraction`` of points has ``stderr <= threshold`` after ``burn_in`` updates."""

    def __init__(self, threshold: float, fraction: float = 1.0, burn_in: int = 4) -> None:
        if not threshold > 0 or not 0 < fraction <= 1:
            raise InputError("threshold must be > 0 and fraction in (0, 1]")
        self.threshold, self.fraction, self.burn_in = float(threshold), float(fraction), burn_in

    def _check(self, result, evaluations):
        ok = (result.stderr <= self.threshold) & (result.counts >= self.burn_in)
        return len(result) > 0 and ok.mean() >= self.fraction


class RankCorrelation(StoppingCriterion):
    """Stop when the Spearman correlation of successive estimates exceeds ``1 - rtol``.

    Checks start once every point has ``burn_in`` updates.
    """

    def __init__(self, rtol: float = 1e-3, burn_in: int = 10) -> None:
        if not 0 < rtol < 1:
            raise InputError(f"rtol must be in (0, 1), got {rtol}")
        self.rtol, self.burn_in = float(rtol), int(burn_in)
        self._prev: np.ndarray | None = None
        self.last_correlation = float("nan")

    def _check(self, result, evaluations):
        from scipy.stats import spearmanr

        if len(result) < 2 or result.counts.min() < self.burn_in:
            return False
        v = result.values
        prev, self._prev = self._prev, v
        if prev is None or len(prev) != len(v):
            return False
        if np.ptp(v) == 0 or np.ptp(prev) == 0:
            return bool(np.array_equal(v, prev))
        self.last_correlation = float(spearmanr(prev, v).statistic)
        return self.last_correlation >= 1 - self.rtol

    def reset(self) -> None:
        self._prev = None
        self.last_correlation = float("nan")


class HistoryDeviation(StoppingCriterion):
    r"""Stop when the estimates moved little over the last ``n_steps`` checks.

    Fires when ``max_{t < n_steps} sum_i |v_i - v_i^{(-t)}| / sum_i |v_i| < rtol`` where
    ``v^{(-t)}`` is the estimate ``t`` checks ago (needs ``n_steps`` past checks).
    """

    def __init__(self, n_steps: int = 10, rtol: float = 0.05) -> None:
        self.n_steps = _positive_int("n_steps", n_steps)
        if not rtol > 0:
            raise InputError(f"rtol must be positive, got {rtol}")
        self.rtol = float(rtol)
        self._history: deque[np.ndarray] = deque(maxlen=self.n_steps)

    def _check(self, result, evaluations):
        v = result.values
        full = len(self._history) == self.n_steps
        denom = np.abs(v).sum()
        dev = max((np.abs(v - h).sum() for h in self._history), default=np.inf)
        self._history.append(v)
        return full and denom > 0 and dev / denom < self.rtol

    def reset(self) -> None:
        self._history.clear()
