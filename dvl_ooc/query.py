"""Exact streaming queries on influence stores.

A store holds ``I[t, r]`` (test ``t`` x train ``r``, see :mod:`dvl_ooc.store`). The queries
read it in **tall strips**: all test rows x one column band (by default the stored chunk width
``train_chunk``), so that every stored chunk is read exactly once and memory is bounded by
``n_test * band * itemsize`` per strip in flight (``max_in_flight`` strips at a time):

* quantiles, per training point ``r`` and each ``q``::

      Q_q(r) = quantile_q { I[t, r] : t in T(r) }

  with ``T(r)`` all test points, or (``same_label=True``) the test points whose label equals
  ``r``'s label. Computed with ``numpy.quantile(strip[T, cols], q, axis=0, method=...)`` on
  the very values stored, so the result is identical to ``numpy.quantile`` on the dense
  matrix. A class without test points gives NaN.
* top-k per test point: ``k`` largest (most helpful) and ``k`` smallest (most harmful)
  ``I[t, :]``; ``argpartition`` inside each strip keeps ``k`` candidates per row, and the
  candidates of all strips are merged into a running top-k (ties broken by the lower
  train position). Cost ``O(n_test * n_train)`` time, ``O(n_test * k)`` extra memory.
* mean / sum per training point over (all or same-label) test points, accumulated in float64.
* ranking by the stored self-influence ``<(H + lambda I)^-1 g_r, g_r>``.

Strips are computed with Dask (``dask.delayed`` per strip, ``max_in_flight`` at a time, on the
current scheduler: threads by default, or a ``distributed`` client when one is active).
Results are labelled xarray objects (coordinates ``train`` / ``test`` indices and labels) and can
be saved into the store as ``<store>/queries/<name>`` (a Zarr group; reopen with
:func:`load_query` or ``xarray.open_zarr(store, group="queries/<name>")``).

Every query reads a store wherever it lives: a local path, an fsspec URL (``s3://...``) with
``storage_options=``, a Zarr store object, or an open :class:`~dvl_ooc.store.InfluenceStore`.

Adding a query touches this module only: write the function (store first, keywords after, and
``allow_incomplete=`` / ``save=`` / ``storage_options=`` like the others) and declare it once with
:func:`register_query`, giving its command-line options, how they map to the function's keywords
and how its result prints as a table. ``dvl-ooc query STORE <name>`` is generated from
:data:`QUERIES`. Per-class reductions (``same_label=True``) go through :func:`_per_label`.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from .exceptions import (
    IncompleteStoreError,
    InputError,
    StoreError,
    StoreFullError,
    StoreNotFoundError,
    StoreUnavailableError,
    UsageError,
)
from .store import InfluenceStore, _mapped_io_error, store_io_errors

__all__ = [
    "DETECTION_FRACTIONS",
    "QUERIES",
    "Option",
    "QuerySpec",
    "format_cell",
    "load_query",
    "mislabel_score",
    "open_store",
    "option",
    "query_mean",
    "query_quantiles",
    "query_self_influence",
    "query_topk",
    "register_query",
    "detection_rates",
    "detection_score",
    "rank_average",
    "roc_auc",
    "saved_queries",
]

StoreLike = str | Path | InfluenceStore

_QUANTILE_METHODS = (
    "inverted_cdf", "averaged_inverted_cdf", "closest_observation", "interpolated_inverted_cdf",
    "hazen", "weibull", "linear", "median_unbiased", "normal_unbiased",
    "lower", "higher", "midpoint", "nearest",
)


def _open(store: StoreLike, storage_options: Mapping[str, Any] | None) -> InfluenceStore:
    if isinstance(store, InfluenceStore):
        return store
    return InfluenceStore.open(store, storage_options=storage_options)


def open_store(store: StoreLike, *, allow_incomplete: bool = False,
               storage_options: Mapping[str, Any] | None = None) -> InfluenceStore:
    """Open (or pass through) an influence store (a local path, an fsspec URL with
    ``storage_options``, a Zarr store object or an :class:`InfluenceStore`); refuse an
    incomplete one unless allowed."""
    src = _open(store, storage_options)
    if not allow_incomplete and not src.is_complete:
        done = len(src.done_tiles())
        raise IncompleteStoreError(
            f"store {getattr(src, 'path', '')} is incomplete ({done} of {src.n_tiles} tiles "
            "done); finish the computation (rerunning it resumes) or pass allow_incomplete=True "
            "(missing values are NaN)"
        )
    return src


# ---------------------------------------------------------------------------------- helpers
def _bands(n_train: int, width: int) -> list[tuple[int, int]]:
    return [(s, min(s + width, n_train)) for s in range(0, n_train, width)]


def _band_width(src: InfluenceStore, band: int | None) -> int:
    if band is None:
        return int(src.chunks[1])
    if int(band) < 1:
        raise InputError(f"band must be a positive number of columns, got {band}")
    return int(band)


def _map_bands(
    src: InfluenceStore,
    fn: Callable[[np.ndarray, int, int], Any],
    band: int | None,
    max_in_flight: int,
    scheduler: str | None,
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(start, stop, fn(strip, start, stop))`` for every column band, in order.

    Each strip ``influences[:, start:stop]`` is read inside its task, so at most
    ``max_in_flight`` strips are in memory at once.
    """
    if max_in_flight < 1:
        raise InputError(f"max_in_flight must be >= 1, got {max_in_flight}")
    arr = src.influences

    def task(s: int, e: int) -> Any:
        return fn(np.asarray(arr[:, s:e]), s, e)

    bands = _bands(src.shape[1], _band_width(src, band))
    for i in range(0, len(bands), max_in_flight):
        batch = bands[i : i + max_in_flight]
        results = dask.compute(
            *[dask.delayed(task, pure=False)(s, e) for s, e in batch], scheduler=scheduler
        )
        for (s, e), res in zip(batch, results):
            yield s, e, res


def _labels(src: InfluenceStore, same_label: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    tl, rl = src.test_labels, src.train_labels
    if same_label and (tl is None or rl is None):
        raise InputError(
            "same_label=True needs scalar labels for the test and training points, and this "
            "store has none (labels are stored only when there is one scalar label per sample)"
        )
    return (None if tl is None else np.asarray(tl)), (None if rl is None else np.asarray(rl))


def _train_coords(src: InfluenceStore) -> dict[str, Any]:
    c: dict[str, Any] = {"train": np.asarray(src.train_index)}
    if src.train_labels is not None:
        c["train_label"] = ("train", np.asarray(src.train_labels))
    if src.train_names is not None:
        c["train_name"] = ("train", src.train_names)
    return c


def _test_coords(src: InfluenceStore) -> dict[str, Any]:
    c: dict[str, Any] = {"test": np.asarray(src.test_index)}
    if src.test_labels is not None:
        c["test_label"] = ("test", np.asarray(src.test_labels))
    if src.test_names is not None:
        c["test_name"] = ("test", src.test_names)
    return c


def _per_label(strip: np.ndarray, s: int, e: int, tl: np.ndarray, rl: np.ndarray,
               reduce: Callable[[np.ndarray], np.ndarray], out: np.ndarray) -> np.ndarray:
    """Same-label reduction of one strip: for each class ``c`` of the band's training points
    (columns ``s:e``), ``out[..., cols_c] = reduce(strip[test rows of class c][:, cols_c])``
    (reduced over axis 0). Columns of a class without test points keep ``out``'s values."""
    band_labels = rl[s:e]
    for c in np.unique(band_labels):
        cols = np.flatnonzero(band_labels == c)
        rows = np.flatnonzero(tl == c)
        if rows.size:
            out[..., cols] = reduce(strip[np.ix_(rows, cols)])
    return out


def _check_q(q: float | Sequence[float]) -> tuple[np.ndarray, bool]:
    qa = np.asarray(q, dtype=np.float64)
    scalar = qa.ndim == 0
    qa = np.atleast_1d(qa)
    if qa.ndim != 1 or qa.size == 0:
        raise InputError(f"q must be a number or a 1-d sequence of numbers, got {q!r}")
    if not np.all((qa >= 0) & (qa <= 1)):
        raise InputError(f"quantiles must lie in [0, 1], got {qa.tolist()}")
    return qa, scalar


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Option:
    """One command-line option: the arguments of ``argparse.ArgumentParser.add_argument``."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def option(*flags: str, **kwargs: Any) -> Option:
    """``option("--k", type=int, default=5, help=...)``: an :class:`Option`."""
    return Option(tuple(flags), kwargs)


Table = tuple[list[str], list[list[Any]], str]


@dataclass(frozen=True)
class QuerySpec:
    """A query, declared once: the Python function and its ``dvl-ooc query STORE <name>``
    subcommand.

    Attributes:
        name: the subcommand.
        help: one line for ``--help``.
        function: the query, ``function(store, **keywords, allow_incomplete=, save=)``.
        options: its own command-line options (``--limit``, ``--json``, ``--save`` and
            ``--allow-incomplete`` are added to every query by the CLI).
        keywords: parsed arguments -> the function's keywords (raises :class:`UsageError` for
            an invalid argument: exit status 2).
        table: (result, parsed arguments) -> (header, rows, title) for the CLI's output; with
            ``--json`` each row becomes one record keyed by the header.
    """

    name: str
    help: str
    function: Callable[..., Any]
    options: tuple[Option, ...]
    keywords: Callable[[Any], dict[str, Any]]
    table: Callable[[Any, Any], Table]


#: every query, by subcommand name, in registration order
QUERIES: dict[str, QuerySpec] = {}


def register_query(name: str, *, help: str, options: Sequence[Option] = (),
                   keywords: Callable[[Any], dict[str, Any]] = lambda args: {},
                   table: Callable[[Any, Any], Table]) -> Callable[[Callable], Callable]:
    """Decorator declaring a query function and its command-line subcommand (see
    :class:`QuerySpec`); returns the function unchanged."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in QUERIES:
            raise InputError(f"a query named {name!r} is already registered")
        QUERIES[name] = QuerySpec(name, help, fn, tuple(options), keywords, table)
        return fn

    return deco


#: how to go on after a query met an unreachable or full store
_RESUME_QUERY = ("A query only reads the store (and writes its saved result, when asked to): "
                 "run it again once the store is {state} again")


def _reads_store(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An unreachable store (or a full one, when saving a result) during the query raises
    :class:`~dvl_ooc.exceptions.StoreUnavailableError` / ``StoreFullError`` naming the store and
    the query, not the storage client's own error from inside a Dask task, nor the writers'
    advice to resume with ``mode='a'`` (errors mapped deeper, e.g. while listing the done
    tiles, are mapped again from their cause)."""

    @functools.wraps(fn)
    def wrapper(store: StoreLike, *args: Any, **kwargs: Any) -> Any:
        where = str(getattr(store, "path", store))
        doing = f"running the query {fn.__name__}"
        try:
            with store_io_errors(where, doing, _RESUME_QUERY):
                return fn(store, *args, **kwargs)
        except (StoreUnavailableError, StoreFullError) as e:
            cause = e.__cause__
            mapped = None if cause is None else _mapped_io_error(where, doing, cause,
                                                                 _RESUME_QUERY)
            if mapped is None or str(mapped) == str(e):
                raise
            raise mapped from cause

    return wrapper


def format_cell(v: Any) -> str:
    """A table cell: floats with 6 significant digits ("nan" for NaN), anything else str()."""
    if isinstance(v, float | np.floating):
        return "nan" if np.isnan(v) else f"{float(v):.6g}"
    return str(v)


def _rank_order(values: np.ndarray, desc: bool) -> np.ndarray:
    """Positions sorted by value (largest first with ``desc``), NaN last, ties stable."""
    key = np.where(np.isnan(values), np.inf, -values if desc else values)
    return np.argsort(key, kind="stable")


def _label(res: Any, name: str) -> Any:
    return res.coords.get(name)


_SAME_LABEL = option("--same-label", action="store_true",
                     help="only over test points with the training point's label")
_DESC = option("--desc", action="store_true", help="largest first (default: smallest)")


# ---------------------------------------------------------------------------------- queries
def _quantile_table(res: xr.DataArray, args: Any) -> Table:
    qs = args.q or [0.25]
    vals = res.values  # (n_q, n_train)
    order = _rank_order(vals[0], args.desc)
    lab = _label(res, "train_label")
    header = ["rank", "train", *(["label"] if lab is not None else []), *[f"q{q:g}" for q in qs]]
    rows = [[k, res["train"].values[r], *([lab.values[r]] if lab is not None else []),
             *vals[:, r]] for k, r in enumerate(order)]
    what = "same-label test points" if args.same_label else "all test points"
    return header, rows, (f"quantiles of influence over {what}, "
                          f"{'largest' if args.desc else 'smallest'} first:")


@register_query(
    "quantile", help="per training point, quantiles over test points",
    options=[
        option("--q", type=float, action="append", metavar="Q",
               help="quantile in [0, 1] (repeatable; default 0.25)"),
        _SAME_LABEL,
        option("--method", default="linear", help="numpy.quantile method (default: linear)"),
        _DESC,
    ],
    keywords=lambda a: {"q": a.q or [0.25], "same_label": a.same_label, "method": a.method},
    table=_quantile_table,
)
@_reads_store
def query_quantiles(
    store: StoreLike,
    q: float | Sequence[float],
    *,
    same_label: bool = False,
    method: str = "linear",
    band: int | None = None,
    max_in_flight: int = 2,
    scheduler: str | None = None,
    allow_incomplete: bool = False,
    save: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Per training point, the ``q``-quantile(s) of its influences over the test points.

    Args:
        store: local path, fsspec URL, Zarr store object or
            :class:`~dvl_ooc.store.InfluenceStore`.
        q: one quantile or a sequence, each in [0, 1].
        same_label: only over test points with the same label as the training point
            (training points of a class with no test point get NaN).
        method: passed to ``numpy.quantile`` (``"linear"``, ``"lower"``, ``"nearest"``, ...).
        band: columns per strip (default: the stored chunk width).
        max_in_flight: strips computed (and held in memory) at once.
        scheduler: Dask scheduler name (default: the current one).
        allow_incomplete: work on a partly computed store (missing tiles are NaN and give NaN).
        save: if given, also write the result to ``<store>/queries/<save>``.
        storage_options: fsspec options when ``store`` is a URL (``endpoint_url``, ``key``...).

    Returns:
        ``DataArray`` with dims ``("quantile", "train")`` (``("train",)`` for a scalar ``q``),
        coordinates ``quantile``, ``train`` and ``train_label``.
    """
    if method not in _QUANTILE_METHODS:
        raise InputError(f"unknown quantile method {method!r}; use one of {_QUANTILE_METHODS}")
    qa, scalar = _check_q(q)
    src = open_store(store, allow_incomplete=allow_incomplete,
                     storage_options=storage_options)
    tl, rl = _labels(src, same_label)

    def fn(strip: np.ndarray, s: int, e: int) -> np.ndarray:
        if not same_label:
            return np.quantile(strip, qa, axis=0, method=method)
        out = np.full((len(qa), e - s), np.nan, dtype=np.result_type(strip.dtype, np.float64)
                      if strip.dtype.kind != "f" else strip.dtype)
        return _per_label(strip, s, e, tl, rl,  # type: ignore[arg-type]
                          lambda b: np.quantile(b, qa, axis=0, method=method), out)

    n = src.shape[1]
    res = None
    for s, e, part in _map_bands(src, fn, band, max_in_flight, scheduler):
        if res is None:
            res = np.empty((len(qa), n), dtype=part.dtype)
        res[:, s:e] = part
    da = xr.DataArray(
        res, dims=("quantile", "train"), coords={"quantile": qa, **_train_coords(src)},
        name="quantile_influence",
        attrs={"same_label": int(same_label), "method": method, "query": "quantile"},
    )
    if scalar:
        da = da.isel(quantile=0)
    if save:
        _save(src, save, da.to_dataset())
    return da


def _merge_top(
    best_v: np.ndarray | None, best_i: np.ndarray | None, v: np.ndarray, i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` largest values per row of the union of two candidate sets, sorted by
    value (descending), ties by position (ascending)."""
    if best_v is not None:
        v = np.concatenate([best_v, v], axis=1)
        i = np.concatenate([best_i, i], axis=1)
    order = np.lexsort((i, -v), axis=1)[:, :k]
    return np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)


def _topk_keywords(args: Any) -> dict[str, Any]:
    if args.k < 1:
        raise UsageError("--k must be >= 1")
    return {"k": args.k}


def _topk_table(ds: xr.Dataset, args: Any) -> Table:
    n_test = ds.sizes["test"]
    sel = args.test if args.test else list(range(n_test))
    bad = [t for t in sel if not 0 <= t < n_test]
    if bad:
        raise UsageError(f"--test positions {bad} out of range [0, {n_test})")
    lab = _label(ds, "test_label")
    header = ["test", *(["label"] if lab is not None else []), "helpful train",
              "helpful influence", "harmful train", "harmful influence"]
    rows = []
    for t in sel:
        h = ds.isel(test=t)
        first = [ds["test"].values[t], *([lab.values[t]] if lab is not None else [])]
        if args.json:
            rows.append([*first, h["helpful_train"].values, h["helpful_influence"].values,
                         h["harmful_train"].values, h["harmful_influence"].values])
        else:
            rows.append([
                *first,
                " ".join(map(str, h["helpful_train"].values)),
                " ".join(format_cell(v) for v in h["helpful_influence"].values[:2]) + " ...",
                " ".join(map(str, h["harmful_train"].values)),
                " ".join(format_cell(v) for v in h["harmful_influence"].values[:2]) + " ...",
            ])
    return header, rows, f"top {ds.sizes['k']} helpful / harmful training points per test point:"


@register_query(
    "topk", help="per test point, most helpful and most harmful training points",
    options=[
        option("--k", type=int, default=5, help="training points per test point (default 5)"),
        option("--test", type=int, action="append", metavar="I",
               help="only these test positions (repeatable)"),
    ],
    keywords=_topk_keywords,
    table=_topk_table,
)
@_reads_store
def query_topk(
    store: StoreLike,
    k: int = 10,
    *,
    band: int | None = None,
    max_in_flight: int = 2,
    scheduler: str | None = None,
    allow_incomplete: bool = False,
    save: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Per test point, the ``k`` most helpful (largest influence) and ``k`` most harmful
    (smallest) training points.

    Returns a ``Dataset`` with dims ``("test", "k")`` and variables ``helpful_train`` /
    ``harmful_train`` (training sample indices from the store's ``train`` coordinate),
    ``helpful_position`` / ``harmful_position`` (column numbers), ``helpful_influence`` /
    ``harmful_influence``. Missing values (incomplete stores) are never selected; when fewer
    than ``k`` values are known the rest is position -1 and value NaN.
    """
    src = open_store(store, allow_incomplete=allow_incomplete,
                     storage_options=storage_options)
    n_test, n_train = src.shape
    if not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    k = int(min(k, n_train))

    def fn(strip: np.ndarray, s: int, e: int) -> tuple[np.ndarray, ...]:
        strip = strip.astype(np.float64)
        out = []
        for sign in (1.0, -1.0):
            v = sign * strip
            v[np.isnan(v)] = -np.inf
            kk = min(k, v.shape[1])
            idx = np.argpartition(-v, kk - 1, axis=1)[:, :kk] if kk < v.shape[1] else \
                np.broadcast_to(np.arange(v.shape[1]), v.shape).copy()
            out += [np.take_along_axis(v, idx, 1), idx + s]
        return tuple(out)

    hv = hi = lv = li = None
    for _, _, (v1, i1, v2, i2) in _map_bands(src, fn, band, max_in_flight, scheduler):
        hv, hi = _merge_top(hv, hi, v1, i1, k)
        lv, li = _merge_top(lv, li, v2, i2, k)
    assert hv is not None and lv is not None and hi is not None and li is not None
    lv = -lv
    train_index = np.asarray(src.train_index)
    data: dict[str, Any] = {}
    for name, v, pos in (("helpful", hv, hi), ("harmful", lv, li)):
        missing = ~np.isfinite(v)
        pos = np.where(missing, -1, pos)
        data[f"{name}_position"] = (("test", "k"), pos)
        data[f"{name}_train"] = (("test", "k"), np.where(missing, -1, train_index[pos]))
        data[f"{name}_influence"] = (("test", "k"), np.where(missing, np.nan, v))
    ds = xr.Dataset(
        data, coords={**_test_coords(src), "k": np.arange(k)},
        attrs={"query": "topk", "k": k},
    )
    if save:
        _save(src, save, ds)
    return ds


def _mean_table(res: xr.DataArray, args: Any) -> Table:
    vals = res.values
    order = _rank_order(vals, args.desc)
    lab = _label(res, "train_label")
    name = "sum" if args.sum else "mean"
    header = ["rank", "train", *(["label"] if lab is not None else []), name]
    rows = [[k, res["train"].values[r], *([lab.values[r]] if lab is not None else []),
             vals[r]] for k, r in enumerate(order)]
    return header, rows, (f"{name} influence per training point, "
                          f"{'largest' if args.desc else 'smallest'} first:")


@register_query(
    "mean", help="per training point, mean (or sum) over test points",
    options=[option("--sum", action="store_true", help="sum instead of mean"), _SAME_LABEL,
             _DESC],
    keywords=lambda a: {"reduce": "sum" if a.sum else "mean", "same_label": a.same_label},
    table=_mean_table,
)
@_reads_store
def query_mean(
    store: StoreLike,
    *,
    reduce: str = "mean",
    same_label: bool = False,
    band: int | None = None,
    max_in_flight: int = 2,
    scheduler: str | None = None,
    allow_incomplete: bool = False,
    save: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Per training point, the mean (``reduce="mean"``) or sum (``"sum"``) of its influences
    over all (or same-label) test points, accumulated in float64. Missing tiles of an incomplete
    store (``allow_incomplete=True``) are skipped (NaN-ignoring reduction)."""
    if reduce not in ("mean", "sum"):
        raise InputError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    src = open_store(store, allow_incomplete=allow_incomplete,
                     storage_options=storage_options)
    tl, rl = _labels(src, same_label)
    red = (np.nanmean if reduce == "mean" else np.nansum) if allow_incomplete else (
        np.mean if reduce == "mean" else np.sum)

    def fn(strip: np.ndarray, s: int, e: int) -> np.ndarray:
        strip = strip.astype(np.float64)
        if not same_label:
            return red(strip, axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return _per_label(strip, s, e, tl, rl,  # type: ignore[arg-type]
                              lambda b: red(b, axis=0), np.full(e - s, np.nan))

    res = np.empty(src.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of incomplete stores
        for s, e, part in _map_bands(src, fn, band, max_in_flight, scheduler):
            res[s:e] = part
    da = xr.DataArray(
        res, dims=("train",), coords=_train_coords(src), name=f"{reduce}_influence",
        attrs={"same_label": int(same_label), "reduce": reduce, "query": "mean"},
    )
    if save:
        _save(src, save, da.to_dataset())
    return da


def _self_table(ds: xr.Dataset, args: Any) -> Table:
    lab = _label(ds, "train_label")
    header = ["rank", "train", *(["label"] if lab is not None else []), "self_influence"]
    rows = [[k, ds["train"].values[k], *([lab.values[k]] if lab is not None else []),
             ds["self_influence"].values[k]] for k in range(ds.sizes["train"])]
    return header, rows, f"self-influence, {'smallest' if args.ascending else 'largest'} first:"


@register_query(
    "self", help="training points ranked by self-influence",
    options=[option("--ascending", action="store_true",
                    help="smallest first (default: largest)")],
    keywords=lambda a: {"ascending": a.ascending},
    table=_self_table,
)
@_reads_store
def query_self_influence(
    store: StoreLike,
    *,
    ascending: bool = False,
    allow_incomplete: bool = False,
    save: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Training points ranked by their stored self-influence (largest first by default).

    Returns a ``Dataset`` over ``train`` (in ranked order) with ``self_influence``, ``rank``
    (0 = first) and ``position`` (column in the store). NaN values (not computed) rank last.
    """
    src = open_store(store, allow_incomplete=allow_incomplete,
                     storage_options=storage_options)
    if src.self_influence is None:
        raise StoreError(
            "this store has no self-influence; compute it with "
            "DaskInfluenceCalculator.to_zarr(..., self_influence=True)"
        )
    si = np.asarray(src.self_influence[:], dtype=np.float64)
    if not allow_incomplete and np.isnan(si).any():
        raise IncompleteStoreError(
            f"{int(np.isnan(si).sum())} self-influence values are missing; finish the "
            "computation or pass allow_incomplete=True"
        )
    key = np.where(np.isnan(si), np.inf, si if ascending else -si)
    order = np.lexsort((np.arange(len(si)), key))
    coords = _train_coords(src)
    ds = xr.Dataset(
        {
            "self_influence": ("train", si[order]),
            "rank": ("train", np.arange(len(si))),
            "position": ("train", order),
        },
        coords={kk: (v[0], v[1][order]) if isinstance(v, tuple) else v[order]
                for kk, v in coords.items()},
        attrs={"query": "self", "ascending": int(ascending)},
    )
    if save:
        _save(src, save, ds)
    return ds


# ---------------------------------------------------------------------------------- saving
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _save(src: InfluenceStore, name: str, ds: xr.Dataset) -> None:
    import zarr

    if not _NAME.match(name) or name in (".", ".."):
        raise InputError(f"query name {name!r} must be letters, digits, '_', '-' or '.'")
    zs = src.location.zarr_store(read_only=False)  # the store's own location, writable
    zarr.open_group(store=zs, mode="a").require_group("queries")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # consolidated metadata is not in the spec
        ds.to_zarr(zs, group=f"queries/{name}", mode="w", consolidated=True)


@_reads_store
def saved_queries(store: StoreLike, *,
                  storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the query results saved in a store."""
    import zarr

    src = _open(store, storage_options)
    try:
        g = zarr.open_group(store=src.store, mode="r", path="queries", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return []
    return sorted(g.group_keys())


@_reads_store
def load_query(store: StoreLike, name: str, *,
               storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Load a query result saved with ``save=name`` (fully into memory)."""
    src = _open(store, storage_options)
    if name not in saved_queries(src):
        raise StoreNotFoundError(f"no saved query {name!r} in {src.path}; "
                                 f"saved: {saved_queries(src)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return xr.open_zarr(src.store, group=f"queries/{name}").load()


#: the fractions of most suspicious points that reports count known wrong labels in
DETECTION_FRACTIONS = (0.10, 0.15, 0.20)


def detection_rates(order: Any, known: Any, fractions: Any = DETECTION_FRACTIONS
                    ) -> dict[str, dict[str, Any]]:
    """Known wrong labels among the first fractions of ``order`` (indices, most suspicious
    first): ``{"10%": {"flagged", "found", "recall"}, ...}`` with recall = found / known."""
    order, known = np.asarray(order), np.asarray(known, dtype=bool)
    n, nk = len(order), int(known.sum())
    out = {}
    for f in fractions:
        m = int(round(f * n))
        found = int(known[order[:m]].sum())
        out[f"{round(f * 100)}%"] = {"flagged": m, "found": found, "recall": found / max(nk, 1)}
    return out


# ---------------------------------------------------------------------------------- detection
def _fractional_ranks(score: Any) -> np.ndarray:
    """Ranks of ``score`` scaled to [0, 1] (ties averaged; largest = 1); NaN gets 0."""
    from scipy.stats import rankdata

    v = np.asarray(score, dtype=np.float64).reshape(-1)
    ok = np.isfinite(v)
    out = np.zeros(len(v))
    if ok.sum() > 1:
        out[ok] = (rankdata(v[ok]) - 1) / (ok.sum() - 1)
    elif ok.sum() == 1:
        out[ok] = 1.0
    return out


def rank_average(*scores: Any, weights: Sequence[float] | None = None) -> np.ndarray:
    """Combine suspicion scores (each: higher = more suspicious) by averaging their ranks::

        rank_average(s_1, ..., s_m)[r] = sum_j w_j R_j(r) / sum_j w_j,
        R_j(r) = (rank of s_j[r] among the finite values of s_j, 0-based, ties averaged)
                 / (number of finite values - 1)                       in [0, 1]

    so scores on different scales (a loss, a self-influence) count equally (``weights``: equal
    by default). A NaN value counts as least suspicious (``R_j = 0``). Higher = more
    suspicious."""
    if not scores:
        raise InputError("rank_average needs at least one score")
    ranks = [_fractional_ranks(s) for s in scores]
    if len({len(r) for r in ranks}) != 1:
        raise InputError(f"scores have different lengths: {[len(r) for r in ranks]}")
    w = np.ones(len(ranks)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(ranks),) or not np.all(w >= 0) or w.sum() <= 0:
        raise InputError(f"weights must be {len(ranks)} non-negative numbers, not all 0, "
                         f"got {weights!r}")
    return np.tensordot(w / w.sum(), np.stack(ranks), axes=1)


def detection_score(percentile: Any, self_influence: Any, how: str = "relative"
                    ) -> np.ndarray:
    """Combine a per-training-point influence summary (e.g. the same-label 25th percentile
    ``q_r``, low = suspicious) with the self-influence ``s_r = <(H + lambda I)^-1 g_r, g_r>``
    (high = suspicious).

    * ``how="relative"`` (RelatIF-like; low = suspicious, like ``q_r``)::

          q_r / sqrt(max(s_r, 0))      (NaN where s_r <= 0)

      the influence on test points measured in units of the point's own influence scale,
      so points that influence everything strongly (large gradients) do not dominate.
    * ``how="rank"`` (high = suspicious): :func:`rank_average` of ``s_r`` and ``-q_r``.
    """
    q = np.asarray(percentile, dtype=np.float64).reshape(-1)
    s = np.asarray(self_influence, dtype=np.float64).reshape(-1)
    if q.shape != s.shape:
        raise InputError(f"percentile and self_influence differ in length: {len(q)} vs {len(s)}")
    if how == "relative":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s > 0, q / np.sqrt(np.where(s > 0, s, 1.0)), np.nan)
    if how == "rank":
        return rank_average(s, -q)
    raise InputError(f"how must be 'relative' or 'rank', got {how!r}")


def roc_auc(known: Any, score: Any) -> float:
    """ROC AUC of ``score`` (higher = more suspicious) for the boolean ``known`` (positives:
    the known wrong labels): the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U / (n_pos n_neg)); NaN scores count as
    the least suspicious. NaN when one of the two groups is empty."""
    known = np.asarray(known, dtype=bool).reshape(-1)
    v = np.asarray(score, dtype=np.float64).reshape(-1)
    if known.shape != v.shape:
        raise InputError(f"known and score differ in length: {len(known)} vs {len(v)}")
    n_pos, n_neg = int(known.sum()), int((~known).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    v = np.where(np.isfinite(v), v, -np.inf)
    r = rankdata(v)  # average ranks for ties, 1-based
    return float((r[known].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mislabel_score(checkpoint_losses: Any | None = None, *, loss: Any | None = None,
                   self_influence: Any | None = None) -> np.ndarray:
    """The recommended wrong-label score (higher = more suspicious), measured in
    ``benchmarks/bench_detection.py`` (issue 13; numbers in the README, "Which recipe finds
    wrong labels?")::

        score[r] = (1 / K) sum_k loss(w_k, z_r)        with K checkpoints saved during training
        score[r] = loss(w_final, z_r)                    without (or self_influence[r])

    ``checkpoint_losses``: the per-point training losses at ``K`` checkpoints, shape ``(K, n)``
    (or a sequence of ``K`` arrays of length ``n``; e.g. a few evenly spaced epochs, the last
    one the final model). A wrong label keeps a large loss for most of the training run, also
    when the final network has memorised it; the mean over the run is the area under its loss
    curve (the loss form of AUM, Pleiss et al. 2020). NaN (a checkpoint that did not score the
    point) is ignored in the mean.

    Measured (``bench_detection.py``, full run, 10 checkpoints, 10 % of the labels flipped;
    share of the flipped labels in the top 20 % / ROC AUC; in brackets: flipped labels the
    final network fits)::

        workload                      mean ckpt loss  final loss    self-infl. GN  TracIn
        digits CNN, Adam (77 %)       98 % / 0.995    75 % / 0.895  74 % / 0.891   95 % / 0.964
        digits CNN, SGD + wd (3 %)   100 % / 0.997   100 % / 0.997 100 % / 0.996  100 % / 0.990
        digits, demo training (2 %)  100 % / 0.997    98 % / 0.997  98 % / 0.995  100 % / 0.984
        synthetic cells CNN (12 %)    98 % / 0.969    96 % / 0.972  97 % / 0.973   93 % / 0.941

    the best or tied (AUC within 0.004) on every workload; no combination with influence
    scores did better (e.g. the rank average with the self-influence: AUC 0.967 on the
    memorising workload).

    Without checkpoints (e.g. a network trained elsewhere) the best final-model score is
    used: the final training ``loss`` if given, else the final ``self_influence``
    ``<(H + lambda I)^-1 g_r, g_r>`` (Gauss-Newton, ``lambda = Relative(1e-3)``), which ranks
    like the loss (AUC within 0.01 on every workload). Same-label influence percentiles are
    not detectors: they measure how a point moves the test losses of its class, which depends
    on the curvature approximation and the damping, and ranked below the training loss on
    every workload (AUC 0.34-0.98; README, "Which recipe finds wrong labels?"). Returned as
    float64."""
    if checkpoint_losses is not None:
        if isinstance(checkpoint_losses, np.ndarray):
            L = np.asarray(checkpoint_losses, dtype=np.float64)
        else:
            L = np.stack([np.asarray(v, dtype=np.float64).reshape(-1)
                          for v in checkpoint_losses]) if len(checkpoint_losses) else \
                np.empty((0, 0))
        if L.ndim == 1:
            L = L[None]
        if L.ndim != 2 or L.shape[0] == 0:
            raise InputError("checkpoint_losses must be a (checkpoints, points) array or a "
                             f"non-empty sequence of per-point losses, got shape {L.shape}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN
            return np.nanmean(L, axis=0)
    final = loss if loss is not None else self_influence
    if final is None:
        raise InputError("mislabel_score needs checkpoint_losses (per-point training losses "
                         "at checkpoints saved during training) or, without checkpoints, the "
                         "final training loss or self-influence")
    return np.asarray(final, dtype=np.float64).reshape(-1).copy()
