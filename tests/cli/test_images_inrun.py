"""``dvl-ooc images --inrun``: In-Run values recorded while the recipe trains its BatchNorm
ResNet, stored with file names, ranked in the report; the same values when a finished folder
is rerun with ``--inrun`` (the network is trained again: the same network)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dvl_ooc.cli import main
from dvl_ooc.demo.malaria import make_malaria_folder
from dvl_ooc.exceptions import InputError
from dvl_ooc.query import detection_rates, roc_auc
from dvl_ooc.recipes.images import ImagesJob

ARGS = ["--size", "16", "--width", "2", "--epochs", "2", "--batch-size", "8", "--k", "2",
        "--dense-dim", "4", "--workers", "1", "--train-chunk", "16", "--test-chunk", "8",
        "--no-progress", "--no-pictures", "--flip-train", "0.2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "cells"
    make_malaria_folder(root, 40, seed=3, flip_fraction=0.1, min_size=18, max_size=26,
                        workers=1)
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["images", str(folder), "--out", str(out), *ARGS, "--inrun"]) == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_inrun_values_and_ranking_in_the_report(folder, run):
    rep = json.loads((run / "report.json").read_text())
    n_tr, n_te = rep["n_train"], rep["n_test"]
    assert (n_tr, n_te) == (32, 8)
    assert rep["inrun"]["while_training"] and rep["inrun"]["test_per_step"] == 1  # 8 / 8
    rows = _csv(run / "inrun.csv")
    # every training image once, by file name, lowest value (most harmful) first
    suspects = {r["file"]: r for r in _csv(run / "suspects.csv")}
    assert sorted(r["file"] for r in rows) == sorted(suspects)
    assert all((folder / r["file"]).is_file() for r in rows)
    vals = np.array([float(r["inrun_value"]) for r in rows])
    assert np.isfinite(vals).all() and np.all(np.diff(vals) >= 0) and np.abs(vals).max() > 0
    assert [int(r["rank"]) for r in rows] == list(range(1, n_tr + 1))
    for r in rows:  # labels and known flips as in suspects.csv
        s = suspects[r["file"]]
        assert (r["label"], r["class"], r["known_flipped"]) == (s["label"], s["class"],
                                                                 s["known_flipped"])
    # the stored values (training-split order) are the CSV's
    v = np.load(run / "inrun_values.npy")
    assert np.allclose(np.sort(v), vals, rtol=1e-5, atol=0)
    # one more ranking in the report: detection shares and ROC AUC, recomputed from the CSV
    name = "lowest In-Run value (test set)"
    known = np.array([r["known_flipped"] == "1" for r in rows])
    assert 0 < known.sum() < n_tr
    assert rep["detection"][name] == detection_rates(np.arange(n_tr), known)
    assert rep["detection_auc"][name] == pytest.approx(roc_auc(known, -vals))
    assert list(rep["detection"])[-1] == "random (expected)"
    assert set(rep["detection_auc"]) == set(rep["detection"])
    line = next(ln for ln in (run / "report.txt").read_text().splitlines() if name in ln)
    assert "top 10%" in line and f"ROC AUC {rep['detection_auc'][name]:.3f}" in line
    assert "In-Run values of the 32 training images" in (run / "report.txt").read_text()


def test_inrun_added_to_a_finished_folder(folder, run, tmp_path, capsys):
    """A folder finished without --inrun (here: the run's folder without its In-Run stage and
    files): rerunning with --inrun trains the network again for the values (the same network,
    the same values as recorded while training) and recomputes nothing else."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    state = json.loads((out / "job.json").read_text())
    del state["stages"]["inrun"]
    (out / "job.json").write_text(json.dumps(state))
    for f in ("inrun_values.npy", "inrun.csv"):
        (out / f).unlink()
    model_mtime = (out / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["images", str(folder), "--out", str(out), *ARGS, "--inrun"]) == 0
    log = capsys.readouterr().out
    assert "by training the network again" in log, log
    assert "0 column tasks this run" in log, log
    assert (out / "model.pt").stat().st_mtime_ns == model_mtime
    rep = json.loads((out / "report.json").read_text())
    assert rep["inrun"]["while_training"] is False
    got, ref = np.load(out / "inrun_values.npy"), np.load(run / "inrun_values.npy")
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-9), np.abs(got - ref).max()
    assert _csv(out / "inrun.csv") == _csv(run / "inrun.csv")


def test_tracker_leaves_training_unchanged(folder, run):
    """The recipe's training with and without the tracker gives the same network (model.pt
    of the --inrun run equals a plain training of the same job, in process)."""
    from dvl_ooc.recipes.images import _train_network

    split = json.loads((run / "split.json").read_text())
    import zarr

    g = zarr.open_group(run / "data.zarr", mode="r")
    job = ImagesJob(root=str(folder), out=str(run), size=16, width=2, epochs=2, batch_size=8,
                    progress=False)
    plain, tracker = _train_network(job, 2, 3, np.asarray(g["x_train"]),
                                    np.asarray(split["y_train"]), g["x_test"],
                                    np.asarray(split["y_test"]), "cpu", None)
    assert tracker is None
    a = plain.state_dict()
    b = torch.load(run / "model.pt", weights_only=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inrun_refuses_a_checkpoint(tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(InputError, match="--inrun"):
        ImagesJob(root=str(tmp_path), out=str(tmp_path / "o"), checkpoint=str(ckpt),
                  inrun=True).check()
