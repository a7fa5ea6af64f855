"""Games for the execution-layer tests (no-hang, MaxTime): slow, failing and unpicklable ones.

Dask workers are spawned and cannot import test modules, so the tests pickle this module by
value (``cloudpickle.register_pickle_by_value``)."""

from __future__ import annotations

import threading
import time

import numpy as np

from dvl_ooc.exceptions import UtilityError
from dvl_ooc.valuation import InteractionGame


class SlowGame(InteractionGame):
    """:class:`InteractionGame` that sleeps ``delay`` seconds per coalition."""

    def __init__(self, weights, delay: float) -> None:
        super().__init__(weights)
        self.delay = float(delay)

    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        time.sleep(self.delay * len(masks))
        return super().evaluate_many(masks)


class FailingGame(InteractionGame):
    """Evaluates ``u(all)`` and ``u(empty)`` (the driver's part) and fails on any other
    coalition, i.e. in every task on a worker."""

    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        sizes = np.asarray(masks, bool).sum(1)
        if ((sizes > 0) & (sizes < self.n_points)).any():
            raise UtilityError("boom: this utility fails on proper subsets")
        return super().evaluate_many(masks)


class LockedGame(InteractionGame):
    """Holds a lock: pickle (and cloudpickle) refuse it."""

    def __init__(self, weights) -> None:
        super().__init__(weights)
        self.lock = threading.Lock()


class Unshippable:
    """Stands for a module caught mid-``vmap``: its pickling raises."""

    def __reduce__(self):
        raise NotImplementedError("Cannot access storage of BatchedTensorImpl")


class MidCallGame(InteractionGame):
    def __init__(self, weights) -> None:
        super().__init__(weights)
        self.state = {"params": Unshippable()}


class LoggedSlowGame(SlowGame):
    """:class:`SlowGame` that appends the time of each ``evaluate_many`` call to ``path``."""

    def __init__(self, weights, delay: float, path: str) -> None:
        super().__init__(weights, delay)
        self.path = str(path)

    def evaluate_many(self, masks: np.ndarray) -> np.ndarray:
        with open(self.path, "a") as f:
            f.write(f"{time.time()}\n")
        return super().evaluate_many(masks)
