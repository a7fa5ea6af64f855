"""``dvl-ooc lds``: the LDS of a finished ``dvl-ooc images`` run against retraining (real PNG
files, real Dask job and Zarr stores), recomputed here with SciPy; resume; bad folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from dvl_ooc.cli import main
from dvl_ooc.demo.malaria import make_malaria_folder
from dvl_ooc.evaluate import GroundTruth
from dvl_ooc.store import InfluenceStore

ARGS = ["--size", "16", "--width", "2", "--epochs", "1", "--k", "2", "--dense-dim", "4",
        "--workers", "1", "--train-chunk", "16", "--test-chunk", "8", "--no-progress",
        "--no-pictures", "--explanations", "0"]
LDS = ["--subsets", "4", "--seeds", "2", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "cells"
    make_malaria_folder(root, 40, seed=5, min_size=18, max_size=24, workers=1)
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["images", str(root), "--out", str(out), *ARGS]) == 0
    return root, out


def test_lds_of_a_finished_run_equals_scipy_on_the_stored_matrix(run, capsys):
    _, out = run
    capsys.readouterr()
    assert main(["lds", str(out), *LDS]) == 0
    text = capsys.readouterr().out
    assert "noise ceiling" in text and "LDS" in text
    rep = json.loads((out / "lds" / "report.json").read_text())
    gt = GroundTruth.open(out / "lds" / "ground_truth.zarr")
    assert gt.is_complete and gt.targets.shape == (4, 2, gt.n_test)
    masks, targets = gt.masks, gt.targets
    assert masks.sum(1).tolist() == [round(0.5 * gt.n_train)] * 4
    v = InfluenceStore.open(out / "influences.zarr").influences[:].astype(np.float64)
    pred = v @ masks.T.astype(np.float64)  # (n_test, J)
    obs = -targets.mean(1)  # (J, n_test)
    rho = np.array([spearmanr(pred[i], obs[:, i]).statistic for i in range(gt.n_test)])
    assert rep["rows"][0]["lds"] == pytest.approx(np.nanmean(rho), abs=1e-6)
    assert rep["rows"][0]["n_valid"] == int(np.isfinite(rho).sum())
    # the stored targets are what the recipe's retrainer gives for that subset and seed
    from dvl_ooc.recipes.lds import ImagesRetrainer

    job = json.loads((out / "report.json").read_text())["job"]
    r = ImagesRetrainer(out, epochs=job["epochs"], lr=job["lr"], batch_size=job["batch_size"],
                        seed=job["seed"])
    np.testing.assert_allclose(r(masks[2:3], 1)[0], targets[2, 1], rtol=1e-5, atol=1e-6)
    # rerun: nothing to retrain, same report
    assert main(["lds", str(out), *LDS, "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["rows"] == rep["rows"]


def test_lds_refuses_folders_it_cannot_measure(run, tmp_path, capsys):
    root, out = run
    assert main(["lds", str(tmp_path), *LDS]) == 1
    assert "not a finished" in capsys.readouterr().err
    ck = tmp_path / "ck"
    assert main(["images", str(root), "--out", str(ck), *ARGS,
                 "--checkpoint", str(out / "model.pt")]) == 0
    capsys.readouterr()
    assert main(["lds", str(ck), *LDS]) == 1
    assert "--checkpoint" in capsys.readouterr().err
    assert not (ck / "lds" / "ground_truth.zarr").exists()
