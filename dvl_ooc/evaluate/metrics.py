r"""Counterfactual quality metrics of attribution scores: LDS, its noise ceiling, leave-one-out.

Conventions. ``scores`` is ``tau`` of shape ``(n_test, n_train)`` with the package's sign
(``tau[i, k] > 0``: training point ``k`` helps test point ``i``, i.e. lowers its loss), given in
memory (NumPy / torch) or as an influence store (:class:`~dvl_ooc.store.InfluenceStore`, a local
path, an fsspec URL or a Zarr store object; the masks' columns are the store's train columns in
stored order). ``masks`` ``(J, n_train)`` bool: row ``j`` is the training subset ``S_j``.
``targets`` ``(J, n_test)`` or ``(J, S, n_test)`` (``S`` training seeds per subset): each test
point's loss (``kind="loss"``) or margin (``kind="margin"``, higher is better) of the models
trained on ``S_j``; the mean over seeds is the observed target ``y[j, i]``.

**Linear datamodeling score** (TRAK, Park et al. 2023; dattri's benchmarks)::

    pred[j, i] = sum_{k in S_j} tau[i, k]                  (= scores @ masks.T, transposed)
    LDS_i      = spearman_j( pred[:, i], -y[:, i] )          (kind="loss"; +y for "margin")
    LDS        = mean_i LDS_i   over the test points whose correlation is defined

A test point whose ``pred`` or ``y`` column is constant over ``j`` has no rank correlation
(NaN); it is left out of the mean and counted (``n_valid``). Spearman's rho is Pearson's
correlation of the ranks (ties get their average rank, as ``scipy.stats.spearmanr``).

**Interval** of the mean over test points (``ci=``): ``"bootstrap"`` (default) is the
percentile bootstrap: ``n_boot`` resamples of the valid test points with replacement, drawn
from :func:`dvl_ooc.seeding.numpy_rng` ``(ci_seed)`` (fixed: the same interval every time),
the 2.5 % and 97.5 % quantiles of the resampled means; ``"t"`` is Student's interval
``mean +- t_{0.975, n-1} * sd / sqrt(n)``. Either treats the test points as independent draws,
the subsets as fixed.

**Noise ceiling** (:func:`noise_ceiling`, reported beside every LDS when ``S >= 2``): training
is random, so even the expected target ``E[y]`` (a perfect predictor) correlates imperfectly
with the observed seed mean. Split the ``S`` seeds into halves ``A`` (``a = S // 2`` seeds) and
``B`` (``b = S - a``); per test point, ``r`` = Spearman over ``j`` between the two half means,
averaged over the splits (every split when there are at most ``n_splits``, else ``n_splits``
seeded random ones). Under the parallel-measurement model (every seed = the same signal plus
independent noise of equal variance) the half means have reliabilities ``R_k = k p / (1 + (k-1)
p)`` with ``p`` the single-seed reliability and ``r = sqrt(R_a R_b)``; solving for ``p``::

    (a b - r^2 (a-1)(b-1)) p^2 - r^2 (a+b-2) p - r^2 = 0       (the positive root)
    R_S = S p / (1 + (S-1) p)                                  (Spearman-Brown, S seeds)
    ceiling_i = sqrt(R_S)

For equal halves this is the classical Spearman-Brown ``R_S = 2 r / (1 + r)``. ``r <= 0``
gives ``R_S = 0``. Applying the (Pearson) Spearman-Brown formula to rank correlations is the
usual approximation; on Gaussian noise it is within ~0.01 of the exact Spearman ceiling.

**Leave-one-out** (:func:`loo_correlation`): ``delta[r, i]`` = loss of test point ``i`` when
training without point ``removed[r]`` minus its loss with every point. Removing a helpful point
(``tau > 0``) should raise the loss, so per test point the correlation over the ``m`` removed
points of ``tau[i, removed]`` with ``delta[:, i]`` (Spearman or Pearson) is positive for a good
attribution. :func:`loo_masks` builds the masks of such a ground-truth job (row 0: all points,
row ``1 + r``: all but ``removed[r]``) and :func:`loo_deltas` turns its targets into ``delta``.

Costs: ``pred`` is one pass over the scores, ``O(n_test n_train J)`` flops; a store is read in
tall strips (all test rows x one stored-chunk-wide column band, as the queries read it), so
memory is ``O(n_test (band + J))`` per strip in flight, never ``n_test x n_train``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..exceptions import InputError, LengthMismatchError, NonFiniteError
from ..seeding import numpy_rng

__all__ = ["CeilingResult", "LdsResult", "lds", "loo_correlation", "loo_deltas", "loo_masks",
           "noise_ceiling"]

_KINDS = ("loss", "margin")
_CI = ("bootstrap", "t")
_METHODS = ("spearman", "pearson")
#: column band of in-memory scores (float64 copies of at most n_test x band at a time)
_MEMORY_BAND = 4096


@dataclass(frozen=True, eq=False)
class CeilingResult:
    """Split-half noise ceiling of observed targets (see the module docstring).

    Attributes:
        mean: mean of ``per_test`` over the test points where it is defined.
        per_test: ``(n_test,)`` ceiling ``sqrt(R_S)`` per test point (NaN where a half-mean
            column is constant in every split).
        split_half: ``(n_test,)`` mean split-half rank correlation ``r``.
        reliability: ``(n_test,)`` ``R_S``, the reliability of the ``S``-seed mean.
        n_seeds: ``S``.
        n_splits: number of half splits averaged.
        n_valid: test points where the ceiling is defined.
    """

    mean: float
    per_test: np.ndarray
    split_half: np.ndarray
    reliability: np.ndarray
    n_seeds: int
    n_splits: int
    n_valid: int

    def __str__(self) -> str:
        return (f"noise ceiling {self.mean:.3f} ({self.n_seeds} seeds, {self.n_splits} splits, "
                f"{self.n_valid}/{len(self.per_test)} test points)")


@dataclass(frozen=True, eq=False)
class LdsResult:
    """A per-test-point correlation averaged over test points: the LDS of :func:`lds`, or the
    leave-one-out correlation of :func:`loo_correlation`.

    Attributes:
        mean: mean of ``per_test`` over the valid test points (NaN when none is valid).
        per_test: ``(n_test,)`` correlation per test point (NaN where undefined).
        ci: 95 % interval of ``mean`` (``ci_method``; NaNs with fewer than 2 valid points).
        ceiling: mean noise ceiling when the targets have >= 2 seeds, else None.
        n_subsets: ``J`` (LDS) or the number of removed points ``m`` (leave-one-out).
        n_seeds: seeds per subset in the targets (1 for 2-D targets).
        n_valid: test points whose correlation is defined (non-constant columns).
        ci_method: ``"bootstrap"`` (percentile, fixed seed) or ``"t"`` (Student).
        correlation: ``"spearman"`` or ``"pearson"``.
        ceiling_per_test: the per-test ceilings (None without seeds).
    """

    mean: float
    per_test: np.ndarray
    ci: tuple[float, float]
    ceiling: float | None
    n_subsets: int
    n_seeds: int
    n_valid: int
    ci_method: str = "bootstrap"
    correlation: str = "spearman"
    ceiling_per_test: np.ndarray | None = None

    def __str__(self) -> str:
        lo, hi = self.ci
        c = "" if self.ceiling is None else f", noise ceiling {self.ceiling:.3f}"
        return (f"{self.mean:.4f} [{lo:.4f}, {hi:.4f}] ({self.correlation}{c}; "
                f"{self.n_valid}/{len(self.per_test)} test points, {self.n_subsets} subsets x "
                f"{self.n_seeds} seeds)")


# ------------------------------------------------------------------------------ validation
def _to_numpy(a: Any, what: str) -> np.ndarray:
    mod = type(a).__module__
    if mod.startswith("torch"):
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
        raise InputError(f"{what} must be an array, got {type(a).__name__}") from e


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise InputError(f"kind must be 'loss' (lower is better: negated) or 'margin' (higher "
                         f"is better), got {kind!r}")


def _check_masks(masks: Any, *, min_rows: int = 3) -> np.ndarray:
    m = _to_numpy(masks, "masks")
    if m.dtype != np.bool_:
        raise InputError(f"masks must be a boolean array (J, n_train), got dtype {m.dtype}; "
                         "use masks.astype(bool) if it holds 0/1")
    if m.ndim != 2:
        raise InputError(f"masks must have shape (J, n_train), got {m.shape}")
    if len(m) < min_rows:
        raise InputError(f"a rank correlation over subsets needs at least {min_rows} subsets, "
                         f"got {len(m)}")
    empty = np.flatnonzero(~m.any(1))
    if len(empty):
        raise InputError(f"subset(s) {empty[:5].tolist()} of masks contain no training point; "
                         "every subset needs at least one")
    return m


def _check_targets(targets: Any, what: str = "targets") -> np.ndarray:
    """``(J, S, n_test)`` float64 (2-D input gets ``S = 1``)."""
    t = _to_numpy(targets, what)
    if t.dtype.kind not in "fiu":
        raise InputError(f"{what} must be numeric, got dtype {t.dtype}")
    t = t.astype(np.float64, copy=False)
    if t.ndim == 2:
        t = t[:, None, :]
    if t.ndim != 3:
        raise InputError(f"{what} must have shape (J, n_test) or (J, S, n_test), got {t.shape}")
    bad = ~np.isfinite(t)
    if bad.any():
        j, s, i = (int(v[0]) for v in np.nonzero(bad))
        raise NonFiniteError(
            f"{what} hold {int(bad.sum())} NaN/infinite values (first at subset {j}, seed {s}, "
            f"test point {i}): an unfinished ground-truth store (rerun it to resume) or a "
            "diverged training (lower the learning rate)")
    return t


def _check_ci(ci: str, n_boot: int) -> None:
    if ci not in _CI:
        raise InputError(f"ci must be 'bootstrap' or 't', got {ci!r}")
    if ci == "bootstrap" and int(n_boot) < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_boot}")


# ------------------------------------------------------------------------------ statistics
def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (ties: average rank), as ``scipy.stats.rankdata``."""
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def _colwise_corr(a: np.ndarray, b: np.ndarray, method: str = "spearman") -> np.ndarray:
    """Correlation of each column of ``a`` with the same column of ``b`` (both ``(J, n)``);
    NaN where either column is constant."""
    if method == "spearman":
        a, b = _ranks(a), _ranks(b)
    # a column is constant when its centred norm is at rounding level of its values
    tol_a = 1e-12 * np.sqrt(len(a)) * np.abs(a).max(0, initial=0.0)
    tol_b = 1e-12 * np.sqrt(len(b)) * np.abs(b).max(0, initial=0.0)
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    ok = (na > tol_a) & (nb > tol_b)
    out = np.full(a.shape[1], np.nan)
    out[ok] = (a[:, ok] * b[:, ok]).sum(0) / (na[ok] * nb[ok])
    return np.clip(out, -1.0, 1.0)


def _interval(values: np.ndarray, ci: str, n_boot: int, ci_seed: int) -> tuple[float, float]:
    """95 % interval of the mean of ``values`` (finite entries; see the module docstring)."""
    v = values[np.isfinite(values)]
    n = len(v)
    if n < 2:
        return (math.nan, math.nan)
    if ci == "t":
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
        return (float(v.mean()) - half, float(v.mean()) + half)
    rng = numpy_rng(ci_seed)
    means = np.empty(int(n_boot))
    step = max(1, (1 << 20) // n)  # resamples per batch: ~1M indices (16 MB) at a time
    for s in range(0, len(means), step):
        k = min(step, len(means) - s)
        means[s : s + k] = v[rng.integers(0, n, size=(k, n))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return (float(lo), float(hi))


def _split_halves(n_seeds: int, n_splits: int, seed: int) -> list[np.ndarray]:
    """Index sets of the first half (``S // 2`` seeds) of each split: all distinct splits when
    there are at most ``n_splits`` (for even ``S`` each unordered split once), else
    ``n_splits`` seeded random ones."""
    a = n_seeds // 2
    combos = [np.array(c) for c in itertools.combinations(range(n_seeds), a)]
    if 2 * a == n_seeds:
        combos = [c for c in combos if c[0] == 0]  # {A, B} and {B, A} are one split
    if len(combos) <= n_splits:
        return combos
    rng = numpy_rng(seed)
    return [np.sort(rng.permutation(n_seeds)[:a]) for _ in range(n_splits)]


def _spearman_brown(r: np.ndarray, a: int, b: int) -> np.ndarray:
    """Reliability of the mean of ``a + b`` seeds from the correlation ``r`` of an ``a``-seed
    mean with a ``b``-seed mean (parallel measurements; see the module docstring)."""
    s = a + b
    out = np.full(r.shape, np.nan)
    ok = np.isfinite(r)
    rr = np.clip(r[ok], 0.0, 1.0) ** 2
    qa = a * b - rr * (a - 1) * (b - 1)
    qb = -rr * (a + b - 2)
    qc = -rr
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(rr >= 1.0, 1.0, (-qb + np.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa))
    out[ok] = s * p / (1 + (s - 1) * p)
    return out


def noise_ceiling(targets: Any, *, kind: str = "loss", n_splits: int = 10,
                  seed: int = 0) -> CeilingResult:
    """Split-half noise ceiling of ``targets`` ``(J, S, n_test)`` with ``S >= 2`` seeds (see the
    module docstring for the formula). ``kind`` is checked only (negating both halves leaves
    their correlation unchanged). ``n_splits`` bounds the half splits averaged (drawn with
    ``seed`` when there are more distinct ones)."""
    _check_kind(kind)
    t = _check_targets(targets)
    n_seeds = t.shape[1]
    if n_seeds < 2:
        raise InputError(f"a noise ceiling needs targets of at least 2 seeds per subset, "
                         f"got {n_seeds}; targets must have shape (J, S, n_test)")
    if len(t) < 3:
        raise InputError(f"a rank correlation over subsets needs at least 3 subsets, "
                         f"got {len(t)}")
    if int(n_splits) < 1:
        raise InputError(f"n_splits must be a positive integer, got {n_splits}")
    halves = _split_halves(n_seeds, int(n_splits), seed)
    a = n_seeds // 2
    rs = []
    for first in halves:
        rest = np.setdiff1d(np.arange(n_seeds), first)
        rs.append(_colwise_corr(t[:, first].mean(1), t[:, rest].mean(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # columns NaN in every split
        r = np.nanmean(np.stack(rs), axis=0)
    rel = _spearman_brown(r, a, n_seeds - a)
    per = np.sqrt(rel)
    ok = np.isfinite(per)
    return CeilingResult(float(per[ok].mean()) if ok.any() else math.nan, per, r, rel,
                         n_seeds, len(halves), int(ok.sum()))


# ------------------------------------------------------------------------------ predictions
def _is_store(scores: Any) -> bool:
    import os

    if isinstance(scores, (str, os.PathLike)):
        return True
    mod = type(scores).__module__
    return mod.startswith("dvl_ooc.store") or mod.startswith("zarr.storage") or (
        mod.startswith("zarr") and type(scores).__name__.endswith("Store"))


def _open_scores(scores: Any, storage_options: Mapping[str, Any] | None) -> Any:
    """The influence store (refused when incomplete, as the queries do)."""
    from ..query import open_store

    return open_store(scores, storage_options=storage_options)


def _predictions(scores: Any, masks: np.ndarray, *, band: int | None, max_in_flight: int,
                 storage_options: Mapping[str, Any] | None, n_test: int | None = None
                 ) -> np.ndarray:
    """``pred = scores @ masks.T`` ``(n_test, J)`` in float64, band by band (float64 copies of
    one ``(n_test, band)`` strip and one ``(J, band)`` slice of the masks per band)."""
    if _is_store(scores):
        from ..query import _map_bands

        src = _open_scores(scores, storage_options)
        nt, nr = src.shape
        _match(nr, masks.shape[1], "train", "the store", "masks")
        if n_test is not None:
            _match(nt, n_test, "test", "the store", "targets")

        def fn(strip: np.ndarray, s: int, e: int) -> np.ndarray:
            strip = strip.astype(np.float64, copy=False)
            if not np.isfinite(strip).all():
                raise NonFiniteError(f"the store {src.path!r} holds NaN/infinite scores in "
                                     f"columns {s}..{e - 1}")
            return strip @ masks[:, s:e].T.astype(np.float64)

        pred = np.zeros((nt, len(masks)))
        for _, _, part in _map_bands(src, fn, band, max_in_flight, None):
            pred += part
        return pred
    a = _to_numpy(scores, "scores")
    if a.ndim != 2:
        raise InputError(f"scores must have shape (n_test, n_train), got {a.shape}")
    if a.dtype.kind not in "fiu":
        raise InputError(f"scores must be numeric, got dtype {a.dtype}")
    _match(a.shape[1], masks.shape[1], "train", "scores", "masks")
    if n_test is not None:
        _match(a.shape[0], n_test, "test", "scores", "targets")
    width = _MEMORY_BAND if band is None else int(band)
    if width < 1:
        raise InputError(f"band must be a positive number of columns, got {band}")
    pred = np.zeros((a.shape[0], len(masks)))
    for s in range(0, a.shape[1], width):
        strip = a[:, s : s + width].astype(np.float64, copy=False)
        if not np.isfinite(strip).all():
            raise NonFiniteError("scores hold NaN/infinite values")
        pred += strip @ masks[:, s : s + width].T.astype(np.float64)
    return pred


def _match(got: int, want: int, axis: str, a: str, b: str) -> None:
    if got != want:
        raise LengthMismatchError(f"{a} has {got} {axis} points but {b} has {want}; they must "
                                  f"describe the same {axis} set (in the same order)")


def _summarise(per: np.ndarray, t: np.ndarray, *, ci: str, n_boot: int, ci_seed: int,
               ceiling: bool, kind: str, method: str) -> LdsResult:
    ok = np.isfinite(per)
    c = noise_ceiling(t, kind=kind) if ceiling and t.shape[1] >= 2 else None
    return LdsResult(
        mean=float(per[ok].mean()) if ok.any() else math.nan, per_test=per,
        ci=_interval(per, ci, n_boot, ci_seed), ceiling=None if c is None else c.mean,
        n_subsets=len(t), n_seeds=t.shape[1], n_valid=int(ok.sum()), ci_method=ci,
        correlation=method, ceiling_per_test=None if c is None else c.per_test)


# ------------------------------------------------------------------------------ public API
def lds(scores: Any, masks: Any, targets: Any, *, kind: str = "loss", ci: str = "bootstrap",
        n_boot: int = 2000, ci_seed: int = 0, ceiling: bool = True, band: int | None = None,
        max_in_flight: int = 2, storage_options: Mapping[str, Any] | None = None) -> LdsResult:
    """Linear datamodeling score of ``scores`` against retrained ``targets``.

    Args:
        scores: ``(n_test, n_train)`` NumPy array or torch tensor, or an influence store (an
            :class:`~dvl_ooc.store.InfluenceStore`, a local path, an fsspec URL with
            ``storage_options``, a Zarr store object); positive = helpful. A store is read in
            tall strips of ``band`` columns (default: its chunk width), ``max_in_flight`` at a
            time; an incomplete store is refused
            (:class:`~dvl_ooc.exceptions.IncompleteStoreError`).
        masks: ``(J, n_train)`` bool, the training subsets (``J >= 3``, none empty).
        targets: ``(J, n_test)`` or ``(J, S, n_test)`` observed targets (seed mean used).
        kind: ``"loss"`` (negated before correlating) or ``"margin"`` (not negated).
        ci, n_boot, ci_seed: the interval of the mean (module docstring).
        ceiling: also compute the noise ceiling (targets with ``S >= 2`` seeds).

    Returns: an :class:`LdsResult` (``correlation="spearman"``).

    Raises: :class:`~dvl_ooc.exceptions.LengthMismatchError` (``J`` of masks and targets,
    ``n_train`` of scores and masks, ``n_test`` of scores and targets),
    :class:`~dvl_ooc.exceptions.InputError` (non-bool masks, an empty subset, fewer than 3
    subsets, bad shapes or options), :class:`~dvl_ooc.exceptions.NonFiniteError` (NaN
    targets or scores).
    """
    _check_kind(kind)
    _check_ci(ci, n_boot)
    m = _check_masks(masks)
    t = _check_targets(targets)
    if len(t) != len(m):
        raise LengthMismatchError(f"masks have {len(m)} subsets but targets have {len(t)}; row "
                                  "j of both must describe subset j")
    pred = _predictions(scores, m, band=band, max_in_flight=max_in_flight,
                        storage_options=storage_options, n_test=t.shape[2])
    y = t.mean(1)
    obs = -y if kind == "loss" else y
    per = _colwise_corr(pred.T, obs, "spearman")
    return _summarise(per, t, ci=ci, n_boot=n_boot, ci_seed=ci_seed, ceiling=ceiling,
                      kind=kind, method="spearman")


def loo_masks(n_train: int, removed: Any) -> np.ndarray:
    """Masks of a leave-one-out ground-truth job: ``(m + 1, n_train)`` bool, row 0 all ``True``
    (the full training set), row ``1 + r`` all ``True`` but ``removed[r]``. Pass them to
    :func:`~dvl_ooc.evaluate.ground_truth` (``masks=``); :func:`loo_deltas` turns the job's
    targets into the ``delta`` of :func:`loo_correlation`."""
    n = int(n_train)
    if n < 2:
        raise InputError(f"n_train must be at least 2, got {n_train}")
    r = _check_removed(removed, n)
    out = np.ones((len(r) + 1, n), dtype=bool)
    out[np.arange(1, len(r) + 1), r] = False
    return out


def loo_deltas(targets: Any) -> np.ndarray:
    """``targets[1:] - targets[0]`` (per seed): the change of each test target when one point
    is removed, from the targets of a :func:`loo_masks` job (``(m + 1, n_test)`` or
    ``(m + 1, S, n_test)``). Paired per seed: the models of one seed share initialisation and
    data-order seed, which removes most of the training noise from the difference."""
    t = _to_numpy(targets, "targets").astype(np.float64)
    if t.ndim not in (2, 3) or len(t) < 2:
        raise InputError(f"targets of a leave-one-out job must have shape (m + 1, n_test) or "
                         f"(m + 1, S, n_test) with row 0 the full training set, got {t.shape}")
    return t[1:] - t[:1]


def _check_removed(removed: Any, n_train: int) -> np.ndarray:
    r = _to_numpy(removed, "removed")
    if r.ndim != 1 or r.dtype.kind not in "iu":
        raise InputError(f"removed must be a 1-D array of training indices, got shape {r.shape} "
                         f"dtype {r.dtype}")
    if len(r) and (r.min() < 0 or r.max() >= n_train):
        raise InputError(f"removed holds indices outside 0..{n_train - 1}")
    if len(np.unique(r)) != len(r):
        raise InputError("removed holds repeated indices; each point is removed once")
    return r.astype(np.int64)


def loo_correlation(scores: Any, removed: Any, delta: Any, *, method: str = "spearman",
                    ci: str = "bootstrap", n_boot: int = 2000, ci_seed: int = 0,
                    ceiling: bool = True, storage_options: Mapping[str, Any] | None = None
                    ) -> LdsResult:
    """Leave-one-out check: per test point ``i``, the correlation over the removed points of
    ``scores[i, removed]`` with ``delta[:, i]`` (see the module docstring), averaged.

    Args:
        scores: as for :func:`lds` (a store: only the ``removed`` columns are read).
        removed: ``(m,)`` distinct training indices (``m >= 3``).
        delta: ``(m, n_test)`` or ``(m, S, n_test)``: loss without ``removed[r]`` minus loss
            with all points (seed mean used; e.g. :func:`loo_deltas`).
        method: ``"spearman"`` or ``"pearson"``.
        ci, n_boot, ci_seed, ceiling: as for :func:`lds` (the ceiling from the seeds of
            ``delta``).

    Returns: an :class:`LdsResult` with ``n_subsets = m``.
    """
    if method not in _METHODS:
        raise InputError(f"method must be 'spearman' or 'pearson', got {method!r}")
    _check_ci(ci, n_boot)
    d = _check_targets(delta, "delta")
    if _is_store(scores):
        src = _open_scores(scores, storage_options)
        n_test, n_train = src.shape
        r = _check_removed(removed, n_train)
        order = np.argsort(r, kind="stable")
        cols = np.empty((n_test, len(r)))
        if len(r):
            from ..store import RESUME_READ, store_io_errors

            with store_io_errors(src.path, "reading the removed columns", RESUME_READ):
                cols[:, order] = src.influences.get_orthogonal_selection(
                    (slice(None), r[order]))
    else:
        a = _to_numpy(scores, "scores")
        if a.ndim != 2:
            raise InputError(f"scores must have shape (n_test, n_train), got {a.shape}")
        n_test = a.shape[0]
        r = _check_removed(removed, a.shape[1])
        cols = a[:, r].astype(np.float64)
    if len(r) < 3:
        raise InputError(f"a correlation over removed points needs at least 3 of them, "
                         f"got {len(r)}")
    if len(d) != len(r):
        raise LengthMismatchError(f"removed has {len(r)} points but delta has {len(d)} rows; "
                                  "row r of delta belongs to removed[r]")
    _match(n_test, d.shape[2], "test", "scores", "delta")
    if not np.isfinite(cols).all():
        raise NonFiniteError("scores hold NaN/infinite values in the removed columns")
    per = _colwise_corr(cols.T, d.mean(1), method)
    return _summarise(per, d, ci=ci, n_boot=n_boot, ci_seed=ci_seed, ceiling=ceiling,
                      kind="loss", method=method)
