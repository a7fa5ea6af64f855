"""``dvl-ooc images --ensemble M``: the stored matrix is the mean of the M networks' influence
matrices (recomputed here, member by member, from the saved networks and the decoded cache),
training resumes per network after an interruption, and bad combinations are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dvl_ooc.cli import main
from dvl_ooc.demo.malaria import make_malaria_folder
from dvl_ooc.store import InfluenceStore

ARGS = ["--size", "16", "--width", "2", "--epochs", "1", "--k", "2", "--dense-dim", "4",
        "--workers", "1", "--train-chunk", "16", "--test-chunk", "8", "--no-progress",
        "--no-pictures", "--explanations", "0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "cells"
    make_malaria_folder(root, 40, seed=5, min_size=18, max_size=24, workers=1)
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "out"
    assert main(["images", str(folder), "--out", str(out), "--ensemble", "2", *ARGS]) == 0
    return out


def _reference(out: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The influence matrices and self-influences of the two saved networks, each from its own
    influence model fitted here on the decoded training cache (float64 results)."""
    import torch
    import zarr

    from dvl_ooc.influence import Relative
    from dvl_ooc.recipes.images import (
        ImagesJob,
        _make_influence,
        choose_method,
        resolved_damping,
    )

    job = ImagesJob(root="", out=str(out), size=16, width=2, k=2, dense_dim=4)
    split = json.loads((out / "split.json").read_text())
    g = zarr.open_group(out / "data.zarr", mode="r")
    x_tr = np.asarray(g["x_train"], dtype=np.float32)
    x_te = np.asarray(g["x_test"], dtype=np.float32)
    y_tr, y_te = np.asarray(split["y_train"]), np.asarray(split["y_test"])
    mats, sis = [], []
    for f in ("model.pt", "member_1.pt"):
        net = torch.load(out / f, map_location="cpu", weights_only=False).eval()
        # the default method "auto" picks EK-FAC for this small job
        chosen, _ = choose_method(job, net, len(x_te), len(x_tr))
        assert chosen == "ekfac"
        job = replace(job, method=chosen)
        factor, of = resolved_damping(job)
        assert (factor, of) == (0.1, "mean")
        m = _make_influence(job, net, Relative(factor, of=of), 2)
        m.fit((x_tr, y_tr))
        mats.append(m.influences(x_te, y_te, x_tr, y_tr).double().numpy())
        sis.append(m.self_influence(x_tr, y_tr).double().numpy())
    return mats, sis


def test_ensemble_store_is_the_mean_of_the_members(run):
    import torch

    out = run
    rep = json.loads((out / "report.json").read_text())
    assert rep["influence"]["class"] == "Ensemble"
    assert rep["model"]["ensemble"] == {"networks": 2, "seeds": [0, 1],
                                        "files": ["model.pt", "member_1.pt"]}
    assert "ensemble of 2 networks (seeds 0..1)" in (out / "report.txt").read_text()
    state = json.loads((out / "job.json").read_text())["stages"]
    assert "train_members" not in state  # replaced by the finished train stage
    # two different networks (seeds 0 and 1)
    a = torch.load(out / "model.pt", weights_only=False).state_dict()
    b = torch.load(out / "member_1.pt", weights_only=False).state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    s = InfluenceStore.open(out / "influences.zarr")
    assert s.is_complete
    mats, sis = _reference(out)
    ref, ref_si = np.mean(mats, axis=0), np.mean(sis, axis=0)
    got = np.asarray(s.influences[:], dtype=np.float64)
    assert got.shape == ref.shape
    tol = dict(rtol=2e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(got, ref, **tol)
    # the check can tell: either member alone is far from the stored mean
    assert not any(np.allclose(got, one, **tol) for one in mats)
    from dvl_ooc.query import query_self_influence

    si_ds = query_self_influence(s)
    si = np.empty(len(ref_si))
    si[si_ds["position"].values] = si_ds["self_influence"].values
    np.testing.assert_allclose(si, ref_si, rtol=2e-4, atol=1e-5 * np.abs(ref_si).max())


def test_ensemble_resumes_per_network(folder, run, tmp_path, monkeypatch):
    from dvl_ooc.recipes import images

    out = tmp_path / "out"
    real = images._train_member

    def interrupted(job, m, *a, **kw):
        if m == 1:
            raise RuntimeError("interrupted while training network 1")
        return real(job, m, *a, **kw)

    monkeypatch.setattr(images, "_train_member", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["images", str(folder), "--out", str(out), "--ensemble", "2", *ARGS])
    assert (out / "model.pt").is_file() and not (out / "member_1.pt").exists()
    state = json.loads((out / "job.json").read_text())["stages"]
    assert state["train_members"]["done"] == [0] and "train" not in state
    mtime = (out / "model.pt").stat().st_mtime_ns
    monkeypatch.setattr(images, "_train_member", real)
    assert main(["images", str(folder), "--out", str(out), "--ensemble", "2", *ARGS]) == 0
    assert (out / "model.pt").stat().st_mtime_ns == mtime  # network 0 not trained again
    s = InfluenceStore.open(out / "influences.zarr")
    assert s.is_complete
    # the resumed run gives the uninterrupted run's matrix (same seeds, same networks)
    full = InfluenceStore.open(run / "influences.zarr").influences[:]
    np.testing.assert_allclose(s.influences[:], full, rtol=1e-5,
                               atol=1e-6 * np.abs(full).max())


def test_ensemble_refusals(folder, run, tmp_path, capsys):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes((run / "model.pt").read_bytes())
    out = tmp_path / "o"
    assert main(["images", str(folder), "--out", str(out), "--ensemble", "2",
                 "--checkpoint", str(ckpt), *ARGS]) == 1
    err = capsys.readouterr().err
    assert "--ensemble 2" in err and "--checkpoint" in err
    assert not out.exists()  # nothing written
    assert main(["images", str(folder), "--out", str(out), "--ensemble", "0", *ARGS]) == 1
    assert "ensemble must be a positive integer" in capsys.readouterr().err
    # another M in a finished folder: refused like any other changed option
    before = (run / "job.json").read_text()
    assert main(["images", str(folder), "--out", str(run), "--ensemble", "3", *ARGS]) == 1
    assert "other options" in capsys.readouterr().err
    assert (run / "job.json").read_text() == before
