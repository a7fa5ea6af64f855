"""The ``dvl-ooc`` command line.

    dvl-ooc demo [--out DIR] [--quick] [--seed N] [--workers N]
    dvl-ooc images ROOT --out DIR [--method M] [--k K] [--width W] [--epochs E] [--workers N]
                   [--cluster local|cuda|ADDRESS] [--checkpoint FILE] [--flip-train F]
                   [--explanations N] [--explain FILE ...] [--explain-k K] [--inrun]
                   [--ensemble M] ...
    dvl-ooc lds OUT_DIR [--also OTHER ...] [--subsets 24] [--seeds 2] [--workers N] [--json]
    dvl-ooc explain OUT_DIR TEST_FILE [--k 8] [--out PNG] [--json] | dvl-ooc explain OUT_DIR --list
    dvl-ooc info STORE [--json] [--storage-options JSON]
    dvl-ooc query STORE quantile [--q 0.25 ...] [--same-label] [--method M] [--desc]
    dvl-ooc query STORE topk [--k K] [--test I ...]
    dvl-ooc query STORE mean [--sum] [--same-label] [--desc]
    dvl-ooc query STORE self [--ascending]

STORE is a local path or an fsspec URL (``s3://bucket/run.zarr``); ``--storage-options`` (info
and every query, before or after the query name) gives
fsspec's options for a URL as JSON, e.g. ``'{"endpoint_url": "http://host:9000", "key": "...",
"secret": "..."}'`` (credentials may instead come from the environment, e.g. ``AWS_*``).
Every query takes ``--limit N`` (rows shown; 0 = all), ``--json`` (machine-readable output on
stdout), ``--save NAME`` (store the result in ``STORE/queries/NAME``) and ``--allow-incomplete``.
Errors are one line on stderr and a non-zero exit status (2: bad arguments, 1: anything else).

Extending it: a command is one function registered with :func:`command` (its name, help and
arguments) in :data:`COMMANDS`; a query is declared once in :mod:`dvl_ooc.query` with
:func:`~dvl_ooc.query.register_query`, and ``dvl-ooc query STORE <name>`` follows from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from .exceptions import DvlOocError, InputError, UsageError
from .query import QUERIES, Option, format_cell, option

__all__ = ["COMMANDS", "Command", "command", "main"]

PROG = "dvl-ooc"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Command:
    """A ``dvl-ooc`` subcommand: ``run(args)`` with the arguments declared in ``arguments``
    (and, for nested subcommands, added by ``configure(parser)``)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], None]
    arguments: tuple[Option, ...] = ()
    configure: Callable[[argparse.ArgumentParser], None] | None = None


#: every subcommand, by name, in registration (and ``--help``) order
COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Sequence[Option] = (),
            configure: Callable[[argparse.ArgumentParser], None] | None = None
            ) -> Callable[[Callable[[argparse.Namespace], None]],
                          Callable[[argparse.Namespace], None]]:
    """Decorator registering ``fn(args)`` as the subcommand ``name`` in :data:`COMMANDS`."""

    def deco(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        if name in COMMANDS:
            raise InputError(f"a command named {name!r} is already registered")
        COMMANDS[name] = Command(name, help, fn, tuple(arguments), configure)
        return fn

    return deco


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Out-of-core data attribution on Dask and Zarr.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="{" + ",".join(COMMANDS) + "}")
    for c in COMMANDS.values():
        a = sub.add_parser(c.name, help=c.help)
        for o in c.arguments:
            a.add_argument(*o.flags, **o.kwargs)
        if c.configure is not None:
            c.configure(a)
    return p


# ---------------------------------------------------------------------------------- output
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[format_cell(v) for v in r] for r in rows]
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
        raise UsageError("--limit must be >= 0")
    shown = rows if limit == 0 else rows[:limit]
    if args.json:
        print(json.dumps([{h: _jsonable(v) for h, v in zip(header, r)} for r in shown]))
        return
    print(title)
    print(_table(header, shown))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more rows (--limit 0 shows all)")


# ---------------------------------------------------------------------------------- commands
@command("demo", help="mislabelled digits, end to end (train, influence, clean)", arguments=[
    option("--out", default="out", help="output folder (default: out)"),
    option("--quick", action="store_true", help="smaller, faster run (for tests)"),
    option("--seed", type=int, default=0, help="random seed (default: 0)"),
    option("--workers", type=int, default=2, help="Dask worker processes (default: 2)"),
])
def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    for mod in ("matplotlib", "sklearn"):
        try:
            __import__(mod)
        except ImportError as e:
            raise InputError(f"the demo needs {mod}: pip install 'dvl-ooc[examples]'") from e
    run_demo(args.out, quick=args.quick, seed=args.seed, n_workers=args.workers)


def _storage_options(v: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object (fsspec's options for a store URL)."""
    try:
        d = json.loads(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(d).__name__}")
    return d


_STORAGE_HELP = ("fsspec options for a STORE URL as a JSON object, e.g. "
                 "'{\"endpoint_url\": \"http://host:9000\", \"key\": \"...\", "
                 "\"secret\": \"...\"}'")


def _floats(v: str) -> list[float]:
    try:
        return [float(t) for t in v.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {v!r}") from e


@command("images", help="suspicious training images of a class-per-subfolder image folder "
         "(train a ResNet or load one, fit, influence matrix, scores, report)", arguments=[
    option("root", help="image folder: ROOT/<class>/<image> (>= 2 classes)"),
    option("--out", required=True, help="output folder (resumed when it exists)"),
    option("--size", type=int, default=64, help="input size in pixels (default: 64)"),
    option("--test-fraction", type=float, default=0.2, help="test split (default: 0.2)"),
    option("--flip-train", type=float, default=0.0,
           help="flip this fraction of training labels on purpose, to measure detection "
                "(default: 0)"),
    option("--seed", type=int, default=0, help="random seed (default: 0)"),
    option("--width", type=int, default=16,
           help="ResNet18 width: 16 ~ 0.7 M, 20 ~ 1.1 M, 64 ~ 11 M parameters (default: 16)"),
    option("--stem", choices=["imagenet", "cifar"], default="imagenet",
           help="ResNet18 stem (default: imagenet, 4x cheaper at 64 px)"),
    option("--epochs", type=int, default=8, help="training epochs (default: 8)"),
    option("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)"),
    option("--batch-size", type=int, default=64, help="training batch size (default: 64)"),
    option("--checkpoint", help="use this model instead of training: a state dict of the "
           "ResNet18 (same --width/--stem) or a torch.save'd nn.Module taking [0, 1] inputs"),
    option("--mean", type=_floats, help="per-channel input mean for --checkpoint, e.g. "
           "0.485,0.456,0.406"),
    option("--std", type=_floats, help="per-channel input std for --checkpoint"),
    option("--method", choices=["auto", "ekfac", "direct", "arnoldi", "nystroem"],
           default="auto",
           help="influence method (default: auto = ekfac where its matrix is cheap, i.e. "
           "n_test x n_train x parameters <= 2e13 and test factors <= 4 GiB, else direct; "
           "direct/arnoldi/nystroem work on projected gradients)"),
    option("--k", type=int, default=16,
           help="projection size per layer side: k x k features per layer (default: 16)"),
    option("--dense-dim", type=int, default=64,
           help="projected size of the other parameters, e.g. BatchNorm (default: 64)"),
    option("--rank", type=int, default=64,
           help="rank of arnoldi/nystroem, test-factor rank of ekfac (default: 64)"),
    option("--damping", type=float,
           help="lambda = DAMPING x the --damping-of eigenvalue of each curvature block "
           "(default: the method's recommended value, chosen by LDS: ekfac and direct 0.1 x "
           "mean, arnoldi/nystroem 1e-3 x largest)"),
    option("--blocks", choices=["model", "layer"],
           help="curvature blocks of direct/arnoldi/nystroem: one for the whole network or one "
           "per layer (default: layer for direct, model for arnoldi/nystroem)"),
    option("--damping-of", choices=["top", "mean"],
           help="the eigenvalue --damping refers to: top (largest; the default with "
           "--damping) or mean"),
    option("--fisher", choices=["auto", "ggn", "sampled"], default="auto",
           help="EK-FAC's curvature: ggn (exact Gauss-Newton factors, classes - 1 backward "
           "passes per image), sampled (labels drawn from the model, one pass) or auto "
           "(default: ggn up to 16 classes, else sampled)"),
    option("--layers", nargs="+", help="attribute through these modules only (e.g. layer4 fc)"),
    option("--fit-samples", type=int, help="fit the curvature on this many training images "
           "(default: all)"),
    option("--workers", type=int, default=2, help="Dask worker processes (default: 2)"),
    option("--cluster", default="local",
           help="local (default), cuda (one GPU per worker) or a scheduler address"),
    option("--train-chunk", type=int, help="train images per tile (default: the largest of "
           "4096, 2048, ... that fits the memory budget)"),
    option("--test-chunk", type=int, help="test images per tile (default: as --train-chunk, "
           "from 1024)"),
    option("--memory-limit", default="4GiB",
           help="memory limit of each local worker (default: 4GiB; tasks plan for half)"),
    option("--test-feature-budget",
           help="bound on the test features one task holds, e.g. 16GiB (default: 1GiB); "
           "larger bounds mean fewer passes over the training set; tasks still fit the "
           "workers' --memory-limit"),
    option("--restart", action="store_true", help="recompute everything in --out"),
    option("--no-progress", action="store_true", help="no progress bars"),
    option("--no-pictures", action="store_true", help="skip the pictures"),
    option("--inrun", action="store_true",
           help="also value every training image while the network trains (In-Run Data "
                "Shapley for the summed loss of the test images; about 2x the training time "
                "on CPU): OUT/inrun.csv and one more ranking in the report"),
    option("--ensemble", type=int, default=1, metavar="M",
           help="train M networks (seeds SEED, SEED+1, ...; OUT/model.pt and "
                "OUT/member_<m>.pt, resumable per network), fit one influence model each and "
                "average their influences (default: 1; not with --checkpoint)"),
    option("--explanations", type=int, default=8, metavar="N",
           help="explanation pictures of the N most uncertain test images (smallest margin "
                "between the two top predicted probabilities; default: 8, 0: none)"),
    option("--explain", nargs="+", metavar="FILE",
           help="draw the explanations of these test images instead (class/file as listed by "
                "'dvl-ooc explain OUT --list', a path, or a unique file name)"),
    option("--explain-k", type=int, default=8, metavar="K",
           help="most helpful and most harmful training images per explanation (default: 8)"),
])
def _cmd_images(args: argparse.Namespace) -> None:
    from .recipes import ImagesJob, run_images

    try:
        __import__("matplotlib")
    except ImportError as e:
        if not args.no_pictures:
            raise InputError("the pictures need matplotlib: pip install 'dvl-ooc[examples]' "
                             "or pass --no-pictures") from e
    job = ImagesJob(
        root=args.root, out=args.out, size=args.size, test_fraction=args.test_fraction,
        flip_train=args.flip_train, seed=args.seed, width=args.width, stem=args.stem,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, checkpoint=args.checkpoint,
        mean=args.mean, std=args.std, method=args.method, k=args.k, dense_dim=args.dense_dim,
        rank=args.rank, damping=args.damping, damping_of=args.damping_of, blocks=args.blocks,
        layers=args.layers, fisher=args.fisher, fit_samples=args.fit_samples,
        workers=args.workers, cluster=args.cluster, test_chunk=args.test_chunk,
        memory_limit=args.memory_limit, test_feature_budget=args.test_feature_budget,
        train_chunk=args.train_chunk, progress=not args.no_progress, restart=args.restart,
        pictures=not args.no_pictures, inrun=args.inrun, ensemble=args.ensemble,
        explain_n=args.explanations, explain_k=args.explain_k, explain=args.explain,
    )
    run_images(job)


@command("explain", help="picture of the most helpful and most harmful training images of one "
         "test image, from a finished 'dvl-ooc images' output folder", arguments=[
    option("out_dir", metavar="OUT_DIR", help="the --out folder of a finished 'dvl-ooc images'"),
    option("test_file", metavar="TEST_FILE", nargs="?",
           help="a test image: class/file as listed by --list, a path to it, or a unique file "
                "name"),
    option("--k", type=int, default=8, help="training images per row (default: 8)"),
    option("--out", metavar="PNG", help="where to write the picture (default: "
           "OUT_DIR/explanations/<class>_<file>.png)"),
    option("--list", action="store_true", help="list the test images (file, label) and exit"),
    option("--json", action="store_true", help="print the explanation as JSON"),
])
def _cmd_explain(args: argparse.Namespace) -> None:
    from .recipes.explain import ImagesOutput, explain_file

    if args.list:
        o = ImagesOutput(args.out_dir)
        rows = [[n, o.classes[int(lab)]] for n, lab in zip(o.test_names, o.test_labels)]
        if args.json:
            print(json.dumps([{"file": f, "class": c} for f, c in rows]))
        else:
            print(f"{len(rows)} test images in {args.out_dir} (with predictions and margins, "
                  f"most uncertain first: {args.out_dir}/test_predictions.csv):")
            print(_table(["file", "label"], rows))
        return
    if args.test_file is None:
        raise UsageError("give a TEST_FILE, or --list to see the test images")
    if args.k < 1:
        raise UsageError("--k must be >= 1")
    rec, path = explain_file(args.out_dir, args.test_file, k=args.k, png=args.out)
    if args.json:
        print(json.dumps(rec))
        return
    print(f"test image {rec['test_file']}: label {rec['class']}, predicted "
          f"{rec['predicted_class']} (probability {rec['probability']:.3f}, margin "
          f"{rec['margin']:.3f})")
    for side in ("helpful", "harmful"):
        print(f"most {side} training images (given label, influence):")
        print(_table(["file", "label", "influence"],
                     [[r["file"], r["class"], r["influence"]] for r in rec[side]]))
    print(f"picture: {path}")


@command("lds", help="how good are the scores of a finished 'dvl-ooc images' run: linear "
         "datamodeling score against retraining on random halves, with its interval and the "
         "noise ceiling", arguments=[
    option("out_dir", metavar="OUT_DIR", help="the --out folder of a finished 'dvl-ooc images'"),
    option("--also", nargs="+", metavar="OTHER", default=[],
           help="output folders of other methods on the same images (e.g. run with "
                "--checkpoint OUT_DIR/model.pt --method direct --out OTHER), scored against the "
                "same ground truth"),
    option("--subsets", type=int, default=24,
           help="random halves of the training set to retrain on (default: 24)"),
    option("--seeds", type=int, default=2,
           help="trainings per subset; >= 2 gives the noise ceiling (default: 2)"),
    option("--alpha", type=float, default=0.5, help="subset fraction (default: 0.5)"),
    option("--epochs", type=int, help="training epochs of the retrainings (default: the run's)"),
    option("--workers", type=int, default=2,
           help="Dask worker processes (default: 2; 0: in this process)"),
    option("--restart", action="store_true", help="recompute the ground truth"),
    option("--no-progress", action="store_true", help="no progress bar"),
    option("--json", action="store_true", help="print the report as JSON"),
])
def _cmd_lds(args: argparse.Namespace) -> None:
    from .recipes.lds import run_lds

    rep = run_lds(args.out_dir, subsets=args.subsets, seeds=args.seeds, alpha=args.alpha,
                  workers=args.workers, others=args.also, epochs=args.epochs,
                  progress=not args.no_progress, restart=args.restart,
                  echo=(lambda _m: None) if args.json else print)
    if args.json:
        print(json.dumps(rep))


@command("info", help="shape, chunks, parameters and completeness of a store", arguments=[
    option("store"),
    option("--json", action="store_true", help="print JSON"),
    option("--storage-options", type=_storage_options, metavar="JSON", help=_STORAGE_HELP),
])
def _cmd_info(args: argparse.Namespace) -> None:
    from .query import saved_queries
    from .store import InfluenceStore

    s = InfluenceStore.open(args.store, storage_options=args.storage_options)
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
        "curvature": a.get("diagnostics"),
    }
    if args.json:
        print(json.dumps(info))
        return
    w = max(len(k) for k in info)
    for k, v in info.items():
        if k == "curvature":
            continue
        if k == "config":
            v = json.dumps(v, sort_keys=True)
        elif k in ("shape", "chunks"):
            v = " x ".join(map(str, v))
        elif k == "complete_percent":
            v = f"{v}%"
        print(f"{k.replace('_', ' '):<{w}}  {v}")
    if info["curvature"]:
        _print_curvature(info["curvature"])


def _print_curvature(d: dict[str, Any]) -> None:
    """The model's curvature diagnostics, one row per block (``model.diagnostics()``)."""

    def val(b: dict[str, Any], key: str, kind: str | None = None) -> str:
        v = b.get(key)
        if v is None:
            return "-"
        k = b.get(kind or "", "")
        mark = {"estimate": "~", "lower bound": ">=", "lower_bound": ">="}.get(k, "")
        return mark + format_cell(v)

    rows = [[b.get("block"), b.get("size"), val(b, "regularization"),
             val(b, "top_eigenvalue", "top_kind"), val(b, "min_eigenvalue", "min_kind"),
             val(b, "condition_number", "condition_kind"),
             val(b, "effective_rank", "effective_rank_kind"),
             "yes" if b.get("indefinite") else "no", val(b, "approximation_error")]
            for b in d.get("blocks", [])]
    print(f"\ncurvature ({d.get('method')}, {d.get('hessian')}; ~ estimate, >= lower bound):")
    print(_table(["block", "size", "lambda", "top eig", "min eig", "cond(H+lI)", "eff. rank",
                  "indefinite", "approx. err"], rows))
    if d.get("advice"):
        print(f"advice: {d['advice']}")


def _query_subcommands(q: argparse.ArgumentParser) -> None:
    """``query STORE <name>``: one subcommand per registered query (:data:`QUERIES`)."""
    q.add_argument("store")
    q.add_argument("--storage-options", type=_storage_options, metavar="JSON",
                   help=_STORAGE_HELP, default=None)
    qs = q.add_subparsers(dest="query", required=True, parser_class=_Parser,
                          metavar="{" + ",".join(QUERIES) + "}")
    for spec in QUERIES.values():
        a = qs.add_parser(spec.name, help=spec.help)
        for o in spec.options:
            a.add_argument(*o.flags, **o.kwargs)
        a.add_argument("--limit", type=int, default=None,
                       help="rows to show (default 20 for tables, all for --json; 0 = all)")
        a.add_argument("--json", action="store_true", help="print JSON records")
        a.add_argument("--save", metavar="NAME", help="also save the result in STORE/queries/NAME")
        a.add_argument("--allow-incomplete", action="store_true",
                       help="query a partly computed store (missing values are NaN)")
        # also accepted after the query name (a default here would hide the one given before)
        a.add_argument("--storage-options", type=_storage_options, metavar="JSON",
                       help=_STORAGE_HELP, default=argparse.SUPPRESS)


@command("query", help="quantiles, top-k, mean/sum or self-influence ranking",
         configure=_query_subcommands)
def _cmd_query(args: argparse.Namespace) -> None:
    spec = QUERIES[args.query]
    # (passed only when given: a registered query without the keyword still serves local paths)
    so = {} if args.storage_options is None else {"storage_options": args.storage_options}
    res = spec.function(args.store, **spec.keywords(args),
                        allow_incomplete=args.allow_incomplete, save=args.save, **so)
    _emit(args, *spec.table(res, args))
    if args.save and not args.json:
        print(f"saved as {args.store}/queries/{args.save}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dvl-ooc`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # bad arguments (2) or --help / --version (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        COMMANDS[args.command].run(args)
    except UsageError as e:
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
