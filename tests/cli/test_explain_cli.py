"""Explanation pictures of ``dvl-ooc images`` and the ``dvl-ooc explain`` command, end to end on
a small generated malaria-layout folder (real Dask worker, real Zarr store, real PNG files); and
the run's output without Dask's "Sending large graph" warning while its fitted state is larger
than the (lowered) warning threshold."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import dask
import distributed  # noqa: F401 - before dask.config.set: its exit restores only what it saw
import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dvl_ooc.cli import main
from dvl_ooc.demo.malaria import make_malaria_folder
from dvl_ooc.query import query_topk
from dvl_ooc.recipes.explain import explanation_figure, figure_pixels, recipe_explanations
from dvl_ooc.store import InfluenceStore

N_EXPLAIN, K = 3, 4
ARGS = ["--size", "16", "--width", "2", "--epochs", "1", "--k", "2", "--dense-dim", "4",
        "--workers", "1", "--train-chunk", "16", "--test-chunk", "8", "--no-progress",
        "--explanations", str(N_EXPLAIN), "--explain-k", str(K)]
THRESHOLD = "20kB"  # below the recipe's fitted state here (~170 kB)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One recipe run (40 images: 32 train / 8 test) with the large-graph threshold lowered,
    its stdout/stderr and the warnings raised in this process."""
    base = tmp_path_factory.mktemp("explain")
    root, out = base / "cells", base / "out"
    make_malaria_folder(root, 40, seed=3, flip_fraction=0.1, min_size=18, max_size=26,
                        workers=1)
    so, se = io.StringIO(), io.StringIO()
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": THRESHOLD}), \
            warnings.catch_warnings(record=True) as w, contextlib.redirect_stdout(so), \
            contextlib.redirect_stderr(se):
        warnings.simplefilter("always")
        rc = main(["images", str(root), "--out", str(out), *ARGS])
    assert rc == 0, se.getvalue()
    return root, out, so.getvalue(), se.getvalue(), [str(x.message) for x in w]


def _margins(out: Path) -> np.ndarray:
    """p_(1) - p_(2) of every test image under model.pt, recomputed here."""
    net = torch.load(out / "model.pt", map_location="cpu", weights_only=False).eval()
    x = torch.as_tensor(np.asarray(zarr.open_group(out / "data.zarr", mode="r")["x_test"]),
                        dtype=torch.float32)
    with torch.no_grad():
        p = torch.softmax(net(x).double(), 1).numpy()
    s = np.sort(p, 1)
    return s[:, -1] - s[:, -2]


def _check_png(path: Path, k: int) -> None:
    with Image.open(path) as im:
        im.verify()  # a whole, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == figure_pixels(k)
        assert np.asarray(im.convert("L")).std() > 10  # images drawn, not a blank page


def test_no_large_graph_warning_while_the_state_exceeds_the_threshold(run):
    _, out, stdout, stderr, warned = run
    assert not [m for m in warned if "Sending large graph" in m]
    assert "Sending large graph" not in stdout + stderr
    # the fitted state travelled through the store, and is above the threshold: as the literal
    # of one task (the shipping before) it would have printed the warning
    files = list((out / "influences.zarr" / ".dvl_ooc_state").glob("*.model.pkl"))
    assert len(files) == 1
    assert files[0].stat().st_size > dask.utils.parse_bytes(THRESHOLD)


def test_recipe_draws_the_most_uncertain_test_images(run):
    _, out, stdout, _, _ = run
    rep = json.loads((out / "report.json").read_text())
    ex = rep["explanations"]
    assert ex["k"] == K and ex["n"] == N_EXPLAIN and "smallest margin" in ex["selection"]
    store = InfluenceStore.open(out / "influences.zarr")
    names_te, names_tr = list(store.test_names), list(store.train_names)
    rl = np.asarray(store.train_labels)
    # the chosen ones are the N smallest margins of the final model, recorded as such
    m = _margins(out)
    chosen = [it["test_position"] for it in ex["items"]]
    assert chosen == np.argsort(m, kind="stable")[:N_EXPLAIN].tolist()
    np.testing.assert_allclose([it["margin"] for it in ex["items"]], m[chosen], atol=1e-6)
    # the predictions file lists every test image, most uncertain first
    lines = (out / "test_predictions.csv").read_text().splitlines()
    assert len(lines) == 1 + len(names_te)
    assert [ln.split(",")[1] for ln in lines[1:N_EXPLAIN + 1]] == [names_te[t] for t in chosen]
    # every picture's training images and scores are query_topk's on the store
    top = query_topk(store, K)
    for it in ex["items"]:
        t = it["test_position"]
        assert it["test_file"] == names_te[t] and it["label"] == int(store.test_labels[t])
        for side in ("helpful", "harmful"):
            pos = top[f"{side}_position"].values[t]
            assert [r["position"] for r in it[side]] == pos.tolist()
            assert [r["file"] for r in it[side]] == [names_tr[j] for j in pos]
            assert [r["label"] for r in it[side]] == rl[pos].tolist()
            np.testing.assert_array_equal([r["influence"] for r in it[side]],
                                          top[f"{side}_influence"].values[t])
        png = out / it["png"]
        assert png.parent == out / "explanations"
        _check_png(png, K)
        assert it["panels"] == 1 + 2 * K
    assert sorted(p.name for p in (out / "explanations").iterdir() if p.name[:2].isdigit()) \
        == sorted(Path(it["png"]).name for it in ex["items"])
    assert str(out / "explanations") in stdout


def test_figure_panels_name_the_files_labels_and_scores(run):
    """The picture's panels: the test image, then k helpful and k harmful training images whose
    titles carry their files, given labels and influences (in query_topk's order)."""
    _, out, _, _, _ = run
    from dvl_ooc.recipes.explain import ImagesOutput

    o = ImagesOutput(out)
    t = 0
    ex = o.explain(t, K)
    fig = explanation_figure(ex, o.x_test, o.x_train, o.train_names, o.train_labels,
                             o.classes, K)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 1 + 2 * K
    assert o.test_names[t] in panels[0].get_title().replace("\n", "")
    top = query_topk(o.store, K)
    for side, axes in (("helpful", panels[1:1 + K]), ("harmful", panels[1 + K:])):
        for ax, j, v in zip(axes, top[f"{side}_position"].values[t],
                            top[f"{side}_influence"].values[t]):
            title = ax.get_title().replace("\n", "")
            assert o.train_names[j] in title
            assert o.classes[int(o.train_labels[j])] in title and f"{v:+.3g}" in title
        # the image shown is the cached training image
        for ax, j in zip(axes, top[f"{side}_position"].values[t]):
            shown = np.asarray(ax.images[0].get_array())
            want = np.clip(np.asarray(o.x_train[j], dtype=np.float32).transpose(1, 2, 0), 0, 1)
            np.testing.assert_allclose(shown, want)


def test_explain_command_on_a_finished_folder(run, tmp_path, capsys):
    _, out, _, _, _ = run
    store = InfluenceStore.open(out / "influences.zarr")
    t = 5
    name = str(store.test_names[t])
    png = tmp_path / "one.png"
    assert main(["explain", str(out), name, "--k", "3", "--out", str(png), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["test_position"] == t and rec["png"] == str(png) and rec["panels"] == 7
    top = query_topk(store, 3)
    for side in ("helpful", "harmful"):
        assert [r["position"] for r in rec[side]] == top[f"{side}_position"].values[t].tolist()
        np.testing.assert_array_equal([r["influence"] for r in rec[side]],
                                      top[f"{side}_influence"].values[t])
    _check_png(png, 3)
    # the same image named by its path in the folder, or by its file name alone; default PNG
    root = Path(json.loads((out / "report.json").read_text())["root"])
    assert main(["explain", str(out), str(root / name)]) == 0
    text = capsys.readouterr().out
    assert name in text and "most helpful" in text and "most harmful" in text
    default = out / "explanations" / (name.replace("/", "_").removesuffix(".png") + ".png")
    assert f"picture: {default}" in text
    _check_png(default, 8)
    assert main(["explain", str(out), Path(name).name, "--json", "--out", str(png)]) == 0
    assert json.loads(capsys.readouterr().out)["test_position"] == t
    # --list: every test image
    assert main(["explain", str(out), "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in listed] == list(store.test_names)


def test_explain_command_refuses_what_is_not_a_test_image(run, tmp_path, capsys):
    _, out, _, _, _ = run
    store = InfluenceStore.open(out / "influences.zarr")
    name = str(store.test_names[2])
    typo = name.replace("cell_", "cel_")
    png = tmp_path / "x.png"
    assert main(["explain", str(out), typo, "--out", str(png)]) == 1
    err = capsys.readouterr().err
    assert "not a test image" in err and name in err and "--list" in err  # a close match
    train = str(store.train_names[0])
    assert main(["explain", str(out), train, "--out", str(png)]) == 1
    assert "training image" in capsys.readouterr().err
    assert main(["explain", str(out), "nothing-like-it.jpg", "--out", str(png)]) == 1
    assert "--list" in capsys.readouterr().err
    assert main(["explain", str(out), name, "--out", str(tmp_path / "x.jpg")]) == 1
    assert ".png" in capsys.readouterr().err
    assert main(["explain", str(out)]) == 2  # neither a file nor --list
    assert not png.exists()


def test_explain_command_refuses_unfinished_folders(run, tmp_path, capsys):
    _, out, _, _, _ = run
    name = str(InfluenceStore.open(out / "influences.zarr").test_names[0])
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(tmp_path / "empty"), name]) == 1
    err = capsys.readouterr().err
    assert "not a finished" in err and "dvl-ooc images" in err
    assert main(["explain", str(tmp_path / "absent"), name]) == 1
    assert "not a folder" in capsys.readouterr().err
    # an interrupted run: no report yet, or a tile missing from the store
    part = tmp_path / "partial"
    shutil.copytree(out, part)
    tile = next(p for p in (part / "influences.zarr" / "influences" / "c").rglob("*")
                if p.is_file())
    tile.unlink()
    assert main(["explain", str(part), name]) == 1
    assert "not complete" in capsys.readouterr().err
    (part / "report.json").unlink()
    assert main(["explain", str(part), name]) == 1
    assert "report.json" in capsys.readouterr().err
    assert not (part / "explanations" / "x.png").exists()


def test_images_refuses_an_unknown_explain_file_before_any_long_stage(run, tmp_path, capsys):
    root, out, _, _, _ = run
    store = InfluenceStore.open(out / "influences.zarr")
    train = str(store.train_names[0])
    fresh = tmp_path / "o"
    assert main(["images", str(root), "--out", str(fresh), *ARGS, "--explain", train,
                 "nope.png"]) == 1
    err = capsys.readouterr().err
    assert "training image" in err and "nope.png" in err
    assert not (fresh / "data.zarr").exists() and not (fresh / "influences.zarr").exists()


def test_named_test_files_are_drawn(run, tmp_path):
    """The recipe's step with test files named (``--explain``): those, in the order given."""
    _, out, _, _, _ = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rep = json.loads((copy / "report.json").read_text())
    (copy / "explanations" / "mine.png").write_bytes(b"")  # e.g. from `dvl-ooc explain`
    ex = recipe_explanations(copy, rep["classes"], n=N_EXPLAIN, k=2, files=[6, 1])
    assert [it["test_position"] for it in ex["items"]] == [6, 1]
    assert ex["selection"] == "named with --explain" and ex["k"] == 2
    for it in ex["items"]:
        _check_png(copy / it["png"], 2)
    # the recipe's earlier numbered pictures are replaced, others left alone
    names = {p.name for p in (copy / "explanations").iterdir()}
    assert {n for n in names if n[:2].isdigit()} == {Path(it["png"]).name for it in ex["items"]}
    assert "mine.png" in names
