"""Explanations of test images, as pictures: which training images helped or hurt each one.

For a test image ``t`` the explanation is row ``t`` of the stored influence matrix
``I[t, r] = <(H + lambda I)^-1 grad l(z_t), grad l(z_r)>`` (positive: training image ``r`` is
helpful, up-weighting it lowers ``t``'s loss): the ``k`` training images with the largest values
(most helpful) and the ``k`` with the smallest (most harmful), ties broken by the lower train
position, exactly as :func:`dvl_ooc.query.query_topk` ranks them (:func:`row_topk` reads the one
row, ``test_chunk x n_train`` values of the store, instead of the whole matrix).

The picture (:func:`explanation_figure`, matplotlib's Agg backend): the test image with its
file name, label and the final model's prediction, above a row of the ``k`` most helpful and a
row of the ``k`` most harmful training images, each titled with its file name, its given
(training) label and its influence. Each panel is :data:`PANEL_INCHES` at :data:`DPI` dots per
inch, so a picture is ``max(k, 3) * 150`` x ``580`` pixels (:func:`figure_pixels`).

Which test images: ``dvl-ooc images`` draws the ``N`` most uncertain ones (smallest margin
``p_(1) - p_(2)`` between the two largest softmax probabilities of the final model, recorded in
``OUT/test_predictions.csv`` and ``report.json``) or the files named with ``--explain``;
``dvl-ooc explain OUT TEST_FILE`` draws one from a finished output folder
(:func:`explain_file`). Images come from the recipe's decode cache ``OUT/data.zarr``
(``x_train`` / ``x_test``: float16 ``(n, C, size, size)`` in ``[0, 1]``, rows in store order).
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import DvlOocError, InputError

__all__ = ["DPI", "PANEL_INCHES", "Explanation", "ImagesOutput", "explain_file",
           "explanation_figure", "figure_pixels", "prediction_margins", "recipe_explanations",
           "resolve_test_files", "row_topk", "save_explanation"]

#: width x height of one image panel (inches) and the resolution of the pictures
PANEL_INCHES = (1.5, 1.6)
DPI = 100
_TOP_INCHES = 1.0  # the suptitle band


def figure_pixels(k: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of an explanation picture with rows of ``k`` images:
    ``max(k, 3)`` panels wide, three panel rows plus a title band high."""
    w, h = PANEL_INCHES
    return round(max(k, 3) * w * DPI), round((3 * h + _TOP_INCHES) * DPI)


# ------------------------------------------------------------------------ scores and ranking
def prediction_margins(model: Any, x: Any, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(predicted class, its probability, margin)`` per row of ``x`` (a lazy array read one
    batch at a time) under ``model`` in eval mode: softmax probabilities ``p`` in float64,
    ``margin = p_(1) - p_(2)`` (the two largest; small = uncertain, 0 = a tie)."""
    import torch

    p0 = next(model.parameters())
    preds, probs, margins = [], [], []
    model.eval()
    with torch.no_grad():
        for s in range(0, int(x.shape[0]), batch_size):
            xb = torch.as_tensor(np.asarray(x[s:s + batch_size]), dtype=p0.dtype,
                                 device=p0.device)
            p = torch.softmax(model(xb).double(), dim=1).cpu().numpy()
            top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.c_[np.zeros(len(p)), p]
            preds.append(p.argmax(1))
            probs.append(top2[:, 1])
            margins.append(top2[:, 1] - top2[:, 0])
    return np.concatenate(preds), np.concatenate(probs), np.concatenate(margins)


def row_topk(store: Any, t: int, k: int) -> dict[str, np.ndarray]:
    """The ``k`` most helpful and most harmful training points of test point (row) ``t`` of an
    :class:`~dvl_ooc.store.InfluenceStore`: ``helpful_position`` / ``helpful_influence`` (largest
    values first), ``harmful_position`` / ``harmful_influence`` (smallest first); ties by the
    lower position, NaN (missing) values never chosen; as :func:`dvl_ooc.query.query_topk`."""
    v = np.asarray(store.influences[int(t), :], dtype=np.float64)
    pos = np.flatnonzero(np.isfinite(v))
    out = {}
    for name, sign in (("helpful", -1.0), ("harmful", 1.0)):
        order = pos[np.lexsort((pos, sign * v[pos]))][:k]
        out[f"{name}_position"] = order
        out[f"{name}_influence"] = v[order]
    return out


# ------------------------------------------------------------------------ the explanation
@dataclass
class Explanation:
    """One test image's explanation (positions are rows/columns of the store and of the decode
    cache; influences as stored)."""

    test_position: int
    test_file: str
    test_label: int
    predicted: int
    probability: float
    margin: float
    helpful_position: np.ndarray
    helpful_influence: np.ndarray
    harmful_position: np.ndarray
    harmful_influence: np.ndarray

    def as_dict(self, train_names: Sequence[str], train_labels: np.ndarray,
                classes: Sequence[str]) -> dict[str, Any]:
        """Plain JSON-able record, training images named with their files and given labels."""

        def rows(pos: np.ndarray, val: np.ndarray) -> list[dict[str, Any]]:
            return [{"file": str(train_names[j]), "position": int(j),
                     "label": int(train_labels[j]), "class": classes[int(train_labels[j])],
                     "influence": float(v)} for j, v in zip(pos, val)]

        return {"test_file": self.test_file, "test_position": self.test_position,
                "label": self.test_label, "class": classes[self.test_label],
                "predicted": self.predicted, "predicted_class": classes[self.predicted],
                "probability": self.probability, "margin": self.margin,
                "helpful": rows(self.helpful_position, self.helpful_influence),
                "harmful": rows(self.harmful_position, self.harmful_influence)}


def _rows(a: Any, positions: Sequence[int]) -> dict[int, np.ndarray]:
    """Rows ``positions`` of a lazy ``(n, C, H, W)`` array as float32 ``(H, W, C)`` images."""
    pos = np.unique(np.asarray(positions, dtype=np.int64))
    if not len(pos):
        return {}
    got = np.asarray(a.get_orthogonal_selection((pos,)) if hasattr(a, "get_orthogonal_selection")
                     else a[pos], dtype=np.float32)
    return {int(p): g.transpose(1, 2, 0) for p, g in zip(pos, got)}


def _show(ax: Any, im: np.ndarray, title: str, color: str = "k") -> None:
    gray = im.shape[2] == 1
    ax.imshow(np.clip(im[..., 0] if gray else im, 0, 1), cmap="gray" if gray else None,
              vmin=0, vmax=1)
    ax.set_title(title, fontsize=6, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def _wrap(name: str, width: int = 26) -> str:
    return "\n".join(textwrap.wrap(name, width, break_on_hyphens=False) or [name])


def explanation_figure(ex: Explanation, x_test: Any, x_train: Any, train_names: Sequence[str],
                       train_labels: np.ndarray, classes: Sequence[str], k: int) -> Any:
    """The matplotlib ``Figure`` of one explanation (Agg backend; close it after saving):
    ``1 + len(helpful) + len(harmful)`` image panels on a ``3 x max(k, 3)`` grid of
    :data:`PANEL_INCHES` panels (:func:`figure_pixels`)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = max(k, 3)
    w, h = PANEL_INCHES
    fig = Figure(figsize=(cols * w, 3 * h + _TOP_INCHES), dpi=DPI)
    top = 1 - _TOP_INCHES / (3 * h + _TOP_INCHES)
    gs = fig.add_gridspec(3, cols, left=0.04, right=0.99, bottom=0.01, top=top,
                          hspace=0.55, wspace=0.15)
    test_img = _rows(x_test, [ex.test_position])[ex.test_position]
    imgs = _rows(x_train, [*ex.helpful_position, *ex.harmful_position])
    ok = ex.predicted == ex.test_label
    _show(fig.add_subplot(gs[0, 0]), test_img,
          f"TEST {_wrap(ex.test_file)}\nlabel {classes[ex.test_label]}\npredicted "
          f"{classes[ex.predicted]} (p {ex.probability:.2f})", "k" if ok else "C3")
    info = fig.add_subplot(gs[0, 1:])
    info.axis("off")
    info.text(0.0, 0.5, f"margin p(1) - p(2) = {ex.margin:.3f}\n"
              "row 2: most helpful training images\n(largest influence: up-weighting\n"
              "them lowers this test loss)\nrow 3: most harmful (smallest)\n"
              "titles: file, given label, influence", fontsize=7, va="center")
    for row, (name, pos, val) in enumerate((
            ("helpful", ex.helpful_position, ex.helpful_influence),
            ("harmful", ex.harmful_position, ex.harmful_influence)), start=1):
        for c, (j, v) in enumerate(zip(pos, val)):
            lab = int(train_labels[j])
            ax = fig.add_subplot(gs[row, c])
            _show(ax, imgs[int(j)], f"{_wrap(str(train_names[j]))}\n{classes[lab]}  {v:+.3g}",
                  "C2" if name == "helpful" else "C3")
            if c == 0:
                ax.set_ylabel(f"most {name}", fontsize=7)
    title = (f"{ex.test_file} (label {classes[ex.test_label]}, predicted "
             f"{classes[ex.predicted]}): the {len(ex.helpful_position)} most helpful and "
             f"{len(ex.harmful_position)} most harmful training images")
    fig.suptitle("\n".join(textwrap.wrap(title, int(cols * w * 15))), fontsize=8)
    return fig


def save_explanation(path: str | os.PathLike, ex: Explanation, x_test: Any, x_train: Any,
                     train_names: Sequence[str], train_labels: np.ndarray,
                     classes: Sequence[str], k: int) -> int:
    """Draw :func:`explanation_figure` into the PNG ``path`` (through a temporary file renamed
    into place: never a half-written picture); returns the number of image panels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = explanation_figure(ex, x_test, x_train, train_names, train_labels, classes, k)
    n = sum(1 for ax in fig.axes if ax.images)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    return n


def png_name(rank: int | None, test_file: str) -> str:
    """A file name for the picture of ``test_file`` (path separators and odd characters
    become ``_``), prefixed with its rank when given."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(test_file).with_suffix("").as_posix())
    return f"{rank:02d}_{stem}.png" if rank is not None else f"{stem}.png"


# ------------------------------------------------------------------------ naming test files
def _candidates(given: str, names: Sequence[str], root: str | None) -> list[int]:
    """Positions of ``names`` that ``given`` designates: the stored name itself, a path to the
    file (absolute, or ending with the stored name), or a unique file name."""
    idx = {n: i for i, n in enumerate(names)}
    g = given.replace(os.sep, "/")
    if g in idx:
        return [idx[g]]
    if root:
        try:
            rel = Path(given).resolve().relative_to(Path(root).resolve()).as_posix()
            if rel in idx:
                return [idx[rel]]
        except (ValueError, OSError):
            pass
    hits = [i for n, i in idx.items() if g.endswith("/" + n)]
    if hits:
        return hits
    base = Path(g).name
    return [i for n, i in idx.items() if Path(n).name == base]


def resolve_test_files(given: Sequence[str], test_names: Sequence[str],
                       train_names: Sequence[str], *, root: str | None = None,
                       out: str | None = None) -> list[int]:
    """Test positions of the files ``given`` (each: its name as stored, ``class/file``; a path
    to it; or its file name when unique). Raises :class:`~dvl_ooc.exceptions.InputError` naming
    every file that is not a test image: a training image, several matches, or no match (with
    the closest test file names and how to list them all)."""
    found, bad = [], []
    listing = (f"`dvl-ooc explain {out} --list` lists them (also in "
               f"{Path(out) / 'test_predictions.csv'})" if out
               else "the test files are the store's test_name coordinate")
    for g in given:
        hits = _candidates(g, test_names, root)
        if len(hits) == 1:
            found.append(hits[0])
            continue
        if len(hits) > 1:
            bad.append(f"{g!r} matches {len(hits)} test images "
                       f"({', '.join(test_names[i] for i in hits[:3])}); give the class folder too")
        elif _candidates(g, train_names, root):
            bad.append(f"{g!r} is a training image (in the train split), not a test image")
        else:
            close = difflib.get_close_matches(g.replace(os.sep, "/"), list(test_names), n=3,
                                              cutoff=0.5)
            bad.append(f"{g!r} is not a test image" + (
                f"; close matches: {', '.join(close)}" if close else ""))
    if bad:
        raise InputError("; ".join(bad) + f". Explanations are drawn for test images: {listing}")
    return found


# ------------------------------------------------------------------------ output folders
class ImagesOutput:
    """A finished ``dvl-ooc images`` output folder, read only: ``report.json`` (classes, root),
    the complete influence store ``influences.zarr`` (file names and given labels of every
    image, in store order), the decode cache ``data.zarr`` and ``model.pt``.

    Raises :class:`~dvl_ooc.exceptions.InputError` when ``out`` is not such a folder (missing
    or unfinished: what is missing and how to finish it)."""

    def __init__(self, out: str | os.PathLike) -> None:
        import zarr

        from ..store import InfluenceStore

        self.out = Path(out)
        hint = (f"run `dvl-ooc images ROOT --out {self.out}` first (rerunning it resumes an "
                "interrupted run)")
        if not self.out.is_dir():
            raise InputError(f"{str(self.out)!r} is not a folder; {hint}")
        rep = self.out / "report.json"
        missing = [n for n in ("report.json", "influences.zarr", "data.zarr", "model.pt")
                   if not (self.out / n).exists()]
        if missing:
            raise InputError(f"{str(self.out)!r} is not a finished `dvl-ooc images` output "
                             f"folder (no {', '.join(missing)}); {hint}")
        try:
            self.report = json.loads(rep.read_text())
            self.classes: list[str] = list(self.report["classes"])
            self.store = InfluenceStore.open(self.out / "influences.zarr")
            g = zarr.open_group(self.out / "data.zarr", mode="r")
            self.x_train, self.x_test = g["x_train"], g["x_test"]
        except (ValueError, KeyError, DvlOocError, OSError) as e:
            raise InputError(f"{str(self.out)!r} is not a readable `dvl-ooc images` output "
                             f"folder ({type(e).__name__}: {e}); {hint}") from e
        if not self.store.is_complete:
            raise InputError(f"the influence matrix in {str(self.out)!r} is not complete (an "
                             f"interrupted run); {hint}")
        self.test_names = [str(n) for n in self.store.test_names]
        self.train_names = [str(n) for n in self.store.train_names]
        self.test_labels = np.asarray(self.store.test_labels)
        self.train_labels = np.asarray(self.store.train_labels)
        if (self.x_test.shape[0], self.x_train.shape[0]) != self.store.shape:
            raise InputError(f"{str(self.out)!r}: data.zarr and influences.zarr disagree "
                             f"({self.x_test.shape[0]} x {self.x_train.shape[0]} images vs a "
                             f"{self.store.shape} matrix); {hint} with --restart")
        self._model: Any = None

    def model(self) -> Any:
        """The final network (``model.pt``), in eval mode on the CPU."""
        if self._model is None:
            import torch

            self._model = torch.load(self.out / "model.pt", map_location="cpu",
                                     weights_only=False).eval()
        return self._model

    def explain(self, t: int, k: int) -> Explanation:
        """The explanation of test position ``t`` (one row of the store; the prediction of
        ``model.pt`` on the cached image)."""
        pred, prob, margin = prediction_margins(self.model(), np.asarray(self.x_test[t:t + 1]))
        top = row_topk(self.store, t, k)
        return Explanation(t, self.test_names[t], int(self.test_labels[t]), int(pred[0]),
                           float(prob[0]), float(margin[0]), **top)


def explain_file(out: str | os.PathLike, test_file: str, *, k: int = 8,
                 png: str | os.PathLike | None = None) -> tuple[dict[str, Any], Path]:
    """Draw the explanation of ``test_file`` (see :func:`resolve_test_files`) from the finished
    output folder ``out`` into ``png`` (default ``out/explanations/<file>.png``); returns its
    record (:meth:`Explanation.as_dict`, with ``png``) and the picture's path."""
    if not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if png is not None and Path(png).suffix.lower() != ".png":
        raise InputError(f"the picture is a PNG file: give a path ending in .png, got {str(png)!r}")
    o = ImagesOutput(out)
    (t,) = resolve_test_files([test_file], o.test_names, o.train_names,
                              root=o.report.get("root"), out=str(out))
    k = int(min(k, len(o.train_names)))
    ex = o.explain(t, k)
    path = Path(png) if png is not None else o.out / "explanations" / png_name(None,
                                                                                 ex.test_file)
    panels = save_explanation(path, ex, o.x_test, o.x_train, o.train_names, o.train_labels,
                              o.classes, k)
    rec = ex.as_dict(o.train_names, o.train_labels, o.classes)
    rec.update(png=str(path), panels=panels, k=k)
    return rec, path


def write_predictions(path: Path, names: Sequence[str], labels: np.ndarray, pred: np.ndarray,
                      prob: np.ndarray, margin: np.ndarray, classes: Sequence[str]) -> None:
    """``test_predictions.csv``: every test image, most uncertain (smallest margin) first."""
    order = np.argsort(margin, kind="stable")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "file", "label", "class", "predicted", "predicted_class",
                    "probability", "margin"])
        for r, t in enumerate(order):
            w.writerow([r + 1, names[t], int(labels[t]), classes[int(labels[t])], int(pred[t]),
                        classes[int(pred[t])], f"{prob[t]:.6g}", f"{margin[t]:.6g}"])
    os.replace(tmp, path)


def recipe_explanations(out: str | os.PathLike, classes: Sequence[str], *, n: int, k: int,
                        files: Sequence[int] | None = None, pictures: bool = True
                        ) -> dict[str, Any]:
    """The explanation step of ``dvl-ooc images``, on its output folder ``out`` (store,
    decode cache and ``model.pt`` written): the margin of every test image under the final
    model (``out/test_predictions.csv``, most uncertain first), then, with ``pictures``, one
    picture per chosen test image under ``out/explanations/``: the ``n`` smallest margins, or
    the test positions ``files``. The top-k of every test image come from one streaming pass
    over the store (:func:`dvl_ooc.query.query_topk`). Returns the index recorded in
    ``report.json`` (selection rule, k, and per picture its file and the test image's and
    training images' files, labels, scores)."""
    import torch
    import zarr

    from ..query import query_topk
    from ..store import InfluenceStore

    out = Path(out)
    store = InfluenceStore.open(out / "influences.zarr")
    g = zarr.open_group(out / "data.zarr", mode="r")
    x_test, x_train = g["x_test"], g["x_train"]
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=False).eval()
    test_names = [str(v) for v in store.test_names]
    train_names = [str(v) for v in store.train_names]
    tl, rl = np.asarray(store.test_labels), np.asarray(store.train_labels)
    pred, prob, margin = prediction_margins(model, x_test)
    write_predictions(out / "test_predictions.csv", test_names, tl, pred, prob, margin, classes)
    if files:
        chosen = list(dict.fromkeys(int(t) for t in files))
        how = "named with --explain"
    else:
        chosen = np.argsort(margin, kind="stable")[:n].tolist()
        how = (f"the {len(chosen)} most uncertain test images: smallest margin p(1) - p(2) "
               "between the two largest softmax probabilities of the final model")
    k = int(min(k, len(train_names)))
    items = []
    if chosen and pictures:
        top = query_topk(store, k)
        d = out / "explanations"
        for rank, t in enumerate(chosen, start=1):
            row = top.isel(test=t)
            sel = {}
            for side in ("helpful", "harmful"):
                pos = np.asarray(row[f"{side}_position"].values)
                keep = pos >= 0  # (-1: fewer than k known values; not in a complete store)
                sel[f"{side}_position"] = pos[keep]
                sel[f"{side}_influence"] = np.asarray(row[f"{side}_influence"].values)[keep]
            ex = Explanation(t, test_names[t], int(tl[t]), int(pred[t]), float(prob[t]),
                             float(margin[t]), **sel)
            name = png_name(rank, ex.test_file)
            panels = save_explanation(d / name, ex, x_test, x_train, train_names, rl, classes, k)
            rec = ex.as_dict(train_names, rl, classes)
            rec.update(png=f"explanations/{name}", panels=panels)
            items.append(rec)
    # a rerun replaces the recipe's numbered pictures (those of `dvl-ooc explain` stay)
    drawn = {Path(it["png"]).name for it in items}
    for f in (out / "explanations").glob("[0-9][0-9]_*.png"):
        if f.name not in drawn:
            f.unlink(missing_ok=True)
    return {"selection": how, "k": k, "n": len(items), "folder": "explanations",
            "predictions_csv": "test_predictions.csv", "items": items}
