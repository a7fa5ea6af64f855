r"""Valuation results: per-point running moments and their parallel merge.

Every Monte-Carlo estimate here is a mean of per-sample terms. For each data point we keep the
running moments ``(count, mean, M2)`` with ``M2 = sum_j (x_j - mean)^2``. Two partial moment
sets over disjoint samples merge exactly (Chan, Golub & LeVeque 1979):

.. math::

    n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
    \bar x = \bar x_a + \delta\, n_b / n,\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\, n_a n_b / n .

This is the reduction used between Dask tasks, for ``ValuationResult.__add__`` and for
continuing a run from a saved result; it equals a one-pass (Welford) computation up to float64
rounding.

A result is of one of two kinds:

* ``"mean"`` (Shapley and exact methods): one moment set ``"marginal"``; the value is its mean,
  ``variances`` the sample variance ``M2 / (count - 1)`` of the per-sample terms and
  ``stderr = sqrt(variance / count)``.
* ``"msr"`` (Banzhaf, maximum sample reuse): two moment sets ``"in"`` / ``"out"`` of the utility
  of samples that contain / do not contain the point; value ``mean_in - mean_out``,
  ``stderr^2 = var_in / n_in + var_out / n_out``, ``counts = n_in + n_out`` and
  ``variances = counts * stderr^2`` (so that ``stderr = sqrt(variances / counts)`` holds for
  both kinds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import InputError, StoreNotFoundError

__all__ = ["Moments", "ValuationResult", "ValueItem"]

_KINDS = {"mean": ("marginal",), "msr": ("in", "out")}


@dataclass
class Moments:
    """Per-point running moments ``(count, mean, M2)`` (float64 arrays of equal length)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> Moments:
        return cls(np.zeros(n, np.int64), np.zeros(n), np.zeros(n))

    @classmethod
    def from_samples(cls, x: np.ndarray) -> Moments:
        """Moments of the columns of ``x`` (samples x points), computed in one pass (Welford)."""
        x = np.asarray(x, dtype=np.float64)
        m = cls.zeros(x.shape[1])
        for row in x:
            m.update(row)
        return m

    def __len__(self) -> int:
        return len(self.mean)

    def copy(self) -> Moments:
        return Moments(self.count.copy(), self.mean.copy(), self.m2.copy())

    def update(self, x: np.ndarray, where: np.ndarray | None = None) -> None:
        """Welford update with one sample ``x`` per point (only points in ``where`` if given)."""
        if where is None:
            self.count += 1
            d = x - self.mean
            self.mean += d / self.count
            self.m2 += d * (x - self.mean)
        else:
            w = np.asarray(where, bool)
            self.count += w
            d = np.where(w, x - self.mean, 0.0)
            self.mean += d / np.maximum(self.count, 1)
            self.m2 += d * (x - self.mean)

    def merge(self, other: Moments) -> Moments:
        """Chan et al. parallel merge of two moment sets over disjoint samples (new object)."""
        na, nb = self.count, other.count
        n = na + nb
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        mean = np.where(na == 0, other.mean, np.where(nb == 0, self.mean,
                                                      self.mean + delta * (nb / safe)))
        m2 = np.where(na == 0, other.m2, np.where(nb == 0, self.m2,
                                                  self.m2 + other.m2 + delta**2 * (na * nb / safe)))
        return Moments(n, mean, m2)

    def variance(self) -> np.ndarray:
        """Sample variance ``M2 / (count - 1)``; 0 where fewer than two samples."""
        return np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), 0.0)

    def take(self, pos: Any) -> Moments:
        return Moments(self.count[pos], self.mean[pos], self.m2[pos])


@dataclass(frozen=True)
class ValueItem:
    """The value of one data point."""

    index: int
    name: Any
    value: float
    variance: float
    stderr: float
    count: int


@dataclass(eq=False)
class ValuationResult:
    """Values of data points with their Monte-Carlo uncertainty.

    Arrays are aligned by *position*; ``indices`` maps positions to data indices. Indexing with
    ``[]`` is positional (after ``sort()`` position 0 is the lowest value); ``get(i)`` and
    ``select(idx)`` look points up by data index.
    """

    indices: np.ndarray
    moments: dict[str, Moments]
    kind: str = "mean"
    algorithm: str = ""
    names: np.ndarray | None = None
    n_samples: int = 0
    evaluations: int = 0
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InputError(f"unknown result kind {self.kind!r}; use one of {list(_KINDS)}")
        if set(self.moments) != set(_KINDS[self.kind]):
            raise InputError(f"a {self.kind!r} result needs moments {_KINDS[self.kind]}")
        self.indices = np.asarray(self.indices, dtype=np.int64)
        for m in self.moments.values():
            if len(m) != len(self.indices):
                raise InputError("moments and indices have different lengths")
        if self.names is not None:
            self.names = np.asarray(self.names)
            if len(self.names) != len(self.indices):
                raise InputError("names and indices have different lengths")

    # construction ------------------------------------------------------------------------
    @classmethod
    def zeros(cls, n: int | np.ndarray, *, kind: str = "mean", algorithm: str = "",
              names: Any = None) -> ValuationResult:
        """An empty result (all counts zero) over ``n`` points or the given data indices."""
        indices = np.arange(n) if np.isscalar(n) else np.asarray(n)
        moments = {k: Moments.zeros(len(indices)) for k in _KINDS[kind]}
        return cls(indices, moments, kind=kind, algorithm=algorithm, names=names)

    @classmethod
    def from_values(cls, values: Any, *, indices: Any = None, variances: Any = None,
                    counts: Any = None, algorithm: str = "", names: Any = None) -> ValuationResult:
        """A ``"mean"`` result from given values (e.g. exact or closed-form values)."""
        v = np.asarray(values, dtype=np.float64)
        c = np.ones(len(v), np.int64) if counts is None else np.asarray(counts, np.int64)
        var = np.zeros(len(v)) if variances is None else np.asarray(variances, np.float64)
        m2 = var * np.maximum(c - 1, 0)
        idx = np.arange(len(v)) if indices is None else indices
        return cls(idx, {"marginal": Moments(c, v.copy(), m2)}, algorithm=algorithm, names=names)

    # statistics ---------------------------------------------------------------------------
    @property
    def values(self) -> np.ndarray:
        if self.kind == "mean":
            return self.moments["marginal"].mean.copy()
        return self.moments["in"].mean - self.moments["out"].mean

    @property
    def counts(self) -> np.ndarray:
        if self.kind == "mean":
            return self.moments["marginal"].count.copy()
        return self.moments["in"].count + self.moments["out"].count

    @property
    def variances(self) -> np.ndarray:
        if self.kind == "mean":
            return self.moments["marginal"].variance()
        return self.stderr**2 * self.counts

    @property
    def stderr(self) -> np.ndarray:
        if self.kind == "mean":
            m = self.moments["marginal"]
            return np.sqrt(m.variance() / np.maximum(m.count, 1))
        s2 = sum(m.variance() / np.maximum(m.count, 1) for m in self.moments.values())
        return np.sqrt(s2)

    def confidence_interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Normal confidence interval ``values -/+ z * stderr`` with coverage ``level``."""
        if not 0 < level < 1:
            raise InputError(f"level must be in (0, 1), got {level}")
        from scipy.stats import norm

        z = norm.ppf(0.5 + level / 2)
        return self.values - z * self.stderr, self.values + z * self.stderr

    # container protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def _take(self, pos: Any) -> ValuationResult:
        pos = np.atleast_1d(np.arange(len(self))[pos])
        return ValuationResult(
            self.indices[pos], {k: m.take(pos) for k, m in self.moments.items()}, kind=self.kind,
            algorithm=self.algorithm, names=None if self.names is None else self.names[pos],
            n_samples=self.n_samples, evaluations=self.evaluations, seed=self.seed,
            extra=dict(self.extra))

    def __getitem__(self, key: Any) -> ValuationResult:
        """Positional selection (int, slice, integer or boolean array)."""
        return self._take(key)

    def sort(self, reverse: bool = False, key: str = "value") -> ValuationResult:
        """A copy sorted by ``key`` ("value", "stderr", "count" or "index"), ascending."""
        arr = {"value": self.values, "stderr": self.stderr, "count": self.counts,
               "index": self.indices}.get(key)
        if arr is None:
            raise InputError(f"cannot sort by {key!r}; use value, stderr, count or index")
        order = np.argsort(arr, kind="stable")
        return self._take(order[::-1] if reverse else order)

    def positions(self, data_indices: Any) -> np.ndarray:
        """Positions of the given data indices (``KeyError`` for unknown ones)."""
        lookup = {int(i): p for p, i in enumerate(self.indices)}
        try:
            return np.array([lookup[int(i)] for i in np.atleast_1d(data_indices)], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"data index {e.args[0]} is not in this result") from None

    def select(self, data_indices: Any) -> ValuationResult:
        """The sub-result of the given data indices, in that order."""
        return self._take(self.positions(data_indices))

    def get(self, data_index: int) -> ValueItem:
        """The value of one point, by data index."""
        p = int(self.positions(data_index)[0])
        return ValueItem(int(self.indices[p]), None if self.names is None else self.names[p],
                         float(self.values[p]), float(self.variances[p]), float(self.stderr[p]),
                         int(self.counts[p]))

    def copy(self) -> ValuationResult:
        return self._take(slice(None))

    # merging ------------------------------------------------------------------------------
    def __add__(self, other: ValuationResult) -> ValuationResult:
        """Merge two results over disjoint samples (count-weighted moments, union of indices)."""
        if isinstance(other, (int, float)) and other == 0:
            return self.copy()
        if not isinstance(other, ValuationResult):
            return NotImplemented
        if other.kind != self.kind:
            raise InputError(f"cannot merge a {self.kind!r} result with a {other.kind!r} result")
        if self.algorithm and other.algorithm and self.algorithm != other.algorithm:
            raise InputError(f"cannot merge {self.algorithm!r} and {other.algorithm!r} results")
        idx = np.concatenate([self.indices, other.indices[~np.isin(other.indices, self.indices)]])
        pos_of = {int(i): p for p, i in enumerate(idx)}
        pa = np.arange(len(self))
        pb = np.array([pos_of[int(i)] for i in other.indices], dtype=np.int64)
        merged = {}
        for k in self.moments:
            a, b = Moments.zeros(len(idx)), Moments.zeros(len(idx))
            for dst, src, pos in ((a, self.moments[k], pa), (b, other.moments[k], pb)):
                dst.count[pos], dst.mean[pos], dst.m2[pos] = src.count, src.mean, src.m2
            merged[k] = a.merge(b)
        names = None
        if self.names is not None and other.names is not None:
            extra_names = other.names[~np.isin(other.indices, self.indices)]
            names = np.concatenate([self.names, extra_names])
        return ValuationResult(
            idx, merged, kind=self.kind, algorithm=self.algorithm or other.algorithm, names=names,
            n_samples=self.n_samples + other.n_samples,
            evaluations=self.evaluations + other.evaluations,
            seed=self.seed if self.seed == other.seed else None)

    __radd__ = __add__

    # persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to a ``.npz`` file (arrays plus JSON metadata); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        arrays = {"indices": self.indices}
        for k, m in self.moments.items():
            arrays.update({f"{k}_count": m.count, f"{k}_mean": m.mean, f"{k}_m2": m.m2})
        if self.names is not None:
            arrays["names"] = self.names.astype(str)
        meta = {"kind": self.kind, "algorithm": self.algorithm, "n_samples": self.n_samples,
                "evaluations": self.evaluations, "seed": self.seed, "extra": self.extra,
                "format": "dvl_ooc.ValuationResult/1"}
        arrays["meta"] = np.array(json.dumps(meta, default=str))
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ValuationResult:
        path = Path(path)
        if not path.exists() and path.with_suffix(".npz").exists():
            path = path.with_suffix(".npz")
        if not path.exists():
            raise StoreNotFoundError(f"no saved ValuationResult at {path}")
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            moments = {k: Moments(f[f"{k}_count"], f[f"{k}_mean"], f[f"{k}_m2"])
                       for k in _KINDS[meta["kind"]]}
            names = f["names"] if "names" in f else None
            return cls(f["indices"], moments, kind=meta["kind"], algorithm=meta["algorithm"],
                       names=names, n_samples=meta["n_samples"],
                       evaluations=meta["evaluations"], seed=meta["seed"],
                       extra=meta.get("extra", {}))

    def __repr__(self) -> str:
        return (f"ValuationResult(algorithm={self.algorithm!r}, n={len(self)}, "
                f"n_samples={self.n_samples}, evaluations={self.evaluations})")
