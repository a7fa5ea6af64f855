"""The ``dvl-ooc`` command line.

    dvl-ooc demo [--out DIR] [--quick] [--seed N] [--workers N]
    dvl-ooc info STORE [--json]
    dvl-ooc query STORE quantile [--q 0.25 ...] [--same-label] [--method M] [--desc]
    dvl-ooc query STORE topk [--k K] [--test I ...]
    dvl-ooc query STORE mean [--sum] [--same-label] [--desc]
    dvl-ooc query STORE self [--ascending]

Every query takes ``--limit N`` (rows shown; 0 = all), ``--json`` (machine-readable output on
stdout), ``--save NAME`` (store the result in ``STORE/queries/NAME``) and ``--allow-incomplete``.
Errors are one line on stderr and a non-zero exit status (2: bad arguments, 1: anything else).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from .exceptions import DvlOocError, InputError

__all__ = ["main"]

PROG = "dvl-ooc"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Out-of-core data attribution on Dask and Zarr.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="{demo,info,query}")

    d = sub.add_parser("demo", help="mislabelled digits, end to end (train, influence, clean)")
    d.add_argument("--out", default="out", help="output folder (default: out)")
    d.add_argument("--quick", action="store_true", help="smaller, faster run (for tests)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--workers", type=int, default=2, help="Dask worker processes (default: 2)")

    i = sub.add_parser("info", help="shape, chunks, parameters and completeness of a store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print JSON")

    q = sub.add_parser("query", help="quantiles, top-k, mean/sum or self-influence ranking")
    q.add_argument("store")
    qs = q.add_subparsers(dest="query", required=True, parser_class=_Parser,
                          metavar="{quantile,topk,mean,self}")

    def common(a: argparse.ArgumentParser) -> None:
        a.add_argument("--limit", type=int, default=None,
                       help="rows to show (default 20 for tables, all for --json; 0 = all)")
        a.add_argument("--json", action="store_true", help="print JSON records")
        a.add_argument("--save", metavar="NAME", help="also save the result in STORE/queries/NAME")
        a.add_argument("--allow-incomplete", action="store_true",
                       help="query a partly computed store (missing values are NaN)")

    a = qs.add_parser("quantile", help="per training point, quantiles over test points")
    a.add_argument("--q", type=float, action="append", metavar="Q",
                   help="quantile in [0, 1] (repeatable; default 0.25)")
    a.add_argument("--same-label", action="store_true",
                   help="only over test points with the training point's label")
    a.add_argument("--method", default="linear", help="numpy.quantile method (default: linear)")
    a.add_argument("--desc", action="store_true", help="largest first (default: smallest)")
    common(a)
    a = qs.add_parser("topk", help="per test point, most helpful and most harmful training points")
    a.add_argument("--k", type=int, default=5, help="training points per test point (default 5)")
    a.add_argument("--test", type=int, action="append", metavar="I",
                   help="only these test positions (repeatable)")
    common(a)
    a = qs.add_parser("mean", help="per training point, mean (or sum) over test points")
    a.add_argument("--sum", action="store_true", help="sum instead of mean")
    a.add_argument("--same-label", action="store_true",
                   help="only over test points with the training point's label")
    a.add_argument("--desc", action="store_true", help="largest first (default: smallest)")
    common(a)
    a = qs.add_parser("self", help="training points ranked by self-influence")
    a.add_argument("--ascending", action="store_true", help="smallest first (default: largest)")
    common(a)
    return p


# ---------------------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "nan" if np.isnan(v) else f"{float(v):.6g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]
    lines = ["  ".join(s.rjust(w) for s, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return None if np.isnan(v) else float(v)
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.dtype.kind == "f" else v.tolist()
    if isinstance(v, float) and np.isnan(v):
        return None
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _emit(args: argparse.Namespace, header: list[str], rows: list[list[Any]],
          title: str) -> None:
    limit = args.limit if args.limit is not None else (0 if args.json else 20)
    if limit < 0:
        raise _usage("--limit must be >= 0")
    shown = rows if limit == 0 else rows[:limit]
    if args.json:
        print(json.dumps([{h: _jsonable(v) for h, v in zip(header, r)} for r in shown]))
        return
    print(title)
    print(_table(header, shown))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more rows (--limit 0 shows all)")


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


# ---------------------------------------------------------------------------------- commands
def _cmd_info(args: argparse.Namespace) -> None:
    from .query import saved_queries
    from .store import InfluenceStore

    s = InfluenceStore.open(args.store)
    done, n = len(s.done_tiles()), s.n_tiles
    a = s.attrs
    info = {
        "path": str(s.path),
        "method": a.get("method"),
        "shape": list(s.shape),
        "chunks": list(s.chunks),
        "dtype": a.get("dtype"),
        "tiles_done": done,
        "tiles_total": n,
        "complete_percent": round(100.0 * done / n, 2),
        "self_influence": None if s.self_influence is None else
        f"{len(s.done_self_influence())}/{s.grid[1]} chunks",
        "labels": s.train_labels is not None,
        "created": a.get("created"),
        "version": a.get("version"),
        "fingerprint": a.get("fingerprint"),
        "config": a.get("config"),
        "saved_queries": saved_queries(s),
    }
    if args.json:
        print(json.dumps(info))
        return
    w = max(len(k) for k in info)
    for k, v in info.items():
        if k == "config":
            v = json.dumps(v, sort_keys=True)
        elif k in ("shape", "chunks"):
            v = " x ".join(map(str, v))
        elif k == "complete_percent":
            v = f"{v}%"
        print(f"{k.replace('_', ' '):<{w}}  {v}")


def _cmd_query(args: argparse.Namespace) -> None:
    from . import query as Q

    kw = {"allow_incomplete": args.allow_incomplete, "save": args.save}
    if args.query == "quantile":
        qs = args.q or [0.25]
        res = Q.query_quantiles(args.store, qs, same_label=args.same_label,
                                method=args.method, **kw)
        vals = res.values  # (n_q, n_train)
        key = np.where(np.isnan(vals[0]), np.inf, -vals[0] if args.desc else vals[0])
        order = np.argsort(key, kind="stable")
        lab = res.coords.get("train_label")
        header = ["rank", "train", *(["label"] if lab is not None else []),
                  *[f"q{q:g}" for q in qs]]
        rows = [[k, res["train"].values[r], *([lab.values[r]] if lab is not None else []),
                 *vals[:, r]] for k, r in enumerate(order)]
        what = "same-label test points" if args.same_label else "all test points"
        _emit(args, header, rows, f"quantiles of influence over {what}, "
              f"{'largest' if args.desc else 'smallest'} first:")
    elif args.query == "mean":
        res = Q.query_mean(args.store, reduce="sum" if args.sum else "mean",
                           same_label=args.same_label, **kw)
        vals = res.values
        key = np.where(np.isnan(vals), np.inf, -vals if args.desc else vals)
        order = np.argsort(key, kind="stable")
        lab = res.coords.get("train_label")
        name = "sum" if args.sum else "mean"
        header = ["rank", "train", *(["label"] if lab is not None else []), name]
        rows = [[k, res["train"].values[r], *([lab.values[r]] if lab is not None else []),
                 vals[r]] for k, r in enumerate(order)]
        _emit(args, header, rows, f"{name} influence per training point, "
              f"{'largest' if args.desc else 'smallest'} first:")
    elif args.query == "topk":
        if args.k < 1:
            raise _usage("--k must be >= 1")
        ds = Q.query_topk(args.store, args.k, **kw)
        n_test = ds.sizes["test"]
        sel = args.test if args.test else list(range(n_test))
        bad = [t for t in sel if not 0 <= t < n_test]
        if bad:
            raise _usage(f"--test positions {bad} out of range [0, {n_test})")
        lab = ds.coords.get("test_label")
        header = ["test", *(["label"] if lab is not None else []), "helpful train",
                  "helpful influence", "harmful train", "harmful influence"]
        rows = []
        for t in sel:
            h = ds.isel(test=t)
            if args.json:
                rows.append([ds["test"].values[t], *([lab.values[t]] if lab is not None else []),
                             h["helpful_train"].values, h["helpful_influence"].values,
                             h["harmful_train"].values, h["harmful_influence"].values])
            else:
                rows.append([
                    ds["test"].values[t], *([lab.values[t]] if lab is not None else []),
                    " ".join(map(str, h["helpful_train"].values)),
                    " ".join(_fmt(v) for v in h["helpful_influence"].values[:2]) + " ...",
                    " ".join(map(str, h["harmful_train"].values)),
                    " ".join(_fmt(v) for v in h["harmful_influence"].values[:2]) + " ...",
                ])
        _emit(args, header, rows, f"top {ds.sizes['k']} helpful / harmful training points "
              "per test point:")
    else:
        ds = Q.query_self_influence(args.store, ascending=args.ascending, **kw)
        lab = ds.coords.get("train_label")
        header = ["rank", "train", *(["label"] if lab is not None else []), "self_influence"]
        rows = [[k, ds["train"].values[k], *([lab.values[k]] if lab is not None else []),
                 ds["self_influence"].values[k]] for k in range(ds.sizes["train"])]
        _emit(args, header, rows, f"self-influence, "
              f"{'smallest' if args.ascending else 'largest'} first:")
    if args.save and not args.json:
        print(f"saved as {args.store}/queries/{args.save}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if args.workers < 1:
        raise _usage("--workers must be >= 1")
    for mod in ("matplotlib", "sklearn"):
        try:
            __import__(mod)
        except ImportError as e:
            raise InputError(f"the demo needs {mod}: pip install 'dvl-ooc[examples]'") from e
    run_demo(args.out, quick=args.quick, seed=args.seed, n_workers=args.workers)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dvl-ooc`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # bad arguments (2) or --help / --version (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        {"demo": _cmd_demo, "info": _cmd_info, "query": _cmd_query}[args.command](args)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except DvlOocError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
