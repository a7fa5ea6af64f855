"""``dvl-ooc images``: the whole recipe on a small generated folder (real Dask worker, real
Zarr store, real PNG files), resume after an interruption, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dvl_ooc.cli import main
from dvl_ooc.demo.malaria import make_malaria_folder
from dvl_ooc.store import InfluenceStore

ARGS = ["--size", "16", "--width", "2", "--epochs", "1", "--k", "2", "--dense-dim", "4",
        "--workers", "1", "--train-chunk", "16", "--test-chunk", "8", "--no-progress",
        "--flip-train", "0.2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "cells"
    info = make_malaria_folder(root, 60, seed=3, flip_fraction=0.1, min_size=18, max_size=26,
                               workers=1)
    return root, info


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["images", str(root), "--out", str(out), *ARGS]) == 0
    return out


def _suspects(out: Path) -> list[dict[str, str]]:
    with open(out / "suspects.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_images_end_to_end(folder, run):
    root, info = folder
    out = run
    rep = json.loads((out / "report.json").read_text())
    n_tr, n_te = rep["n_train"], rep["n_test"]
    assert n_tr + n_te == 60 and n_te == 12  # 20 % of each class of 30
    rows = _suspects(out)
    assert len(rows) == n_tr and [int(r["rank"]) for r in rows] == list(range(1, n_tr + 1))
    # every row names an existing file of the folder, with its class as the given label ...
    split = json.loads((out / "split.json").read_text())
    injected = set(split["flipped_injected"])
    for r in rows:
        assert (root / r["file"]).is_file()
    # ... and the store names the same files, in store order, next to the matrix
    s = InfluenceStore.open(out / "influences.zarr")
    assert s.is_complete and s.shape == (n_te, n_tr)
    names = s.train_names
    assert sorted(names) == sorted(r["file"] for r in rows)
    assert set(s.test_names).isdisjoint(names)
    # scores are the same-label 25th percentiles of the stored matrix (exact, recomputed here)
    v = s.influences[:]
    tl, rl = s.test_labels, s.train_labels
    ref = {names[j]: np.quantile(v[tl == rl[j], j], 0.25) for j in range(n_tr)}
    got = {r["file"]: float(r["score_q25_same_label"]) for r in rows}
    for f, q in ref.items():
        assert got[f] == pytest.approx(q, rel=1e-4, abs=1e-6)
    # most suspicious first by the recommended score: the mean training loss over the
    # checkpoints (1 epoch: one checkpoint, the final model), recomputed here from model.pt
    # and the decoded training images
    import torch
    import torch.nn.functional as F
    import zarr

    net = torch.load(out / "model.pt", map_location="cpu", weights_only=False).eval()
    xs = torch.as_tensor(np.asarray(zarr.open_group(out / "data.zarr", mode="r")["x_train"]),
                         dtype=torch.float32)
    with torch.no_grad():
        ce = F.cross_entropy(net(xs), torch.as_tensor(rl).long(), reduction="none").numpy()
    assert np.load(out / "checkpoint_losses.npy").shape == (1, n_tr)
    rec = {r["file"]: float(r["score_recommended"]) for r in rows}
    for j, f in enumerate(names):
        assert rec[f] == pytest.approx(ce[j], rel=1e-4, abs=1e-6)
    assert [float(r["score_recommended"]) for r in rows] == sorted(rec.values(), reverse=True)
    # labels: the given (possibly flipped on purpose) labels, recorded per file
    paths_train = [s.train_names[j] for j in range(n_tr)]
    for j, f in enumerate(paths_train):
        folder_label = 0 if f.startswith("Parasitized/") else 1
        assert (rl[j] != folder_label) == (j in injected)
    # known wrong labels = injected flips + the folder's flipped.csv, reported per fraction
    assert rep["known_flipped_source"] == "injected flips + ROOT/flipped.csv"
    assert any(k.startswith("recommended: mean training loss over 1 checkpoint")
               for k in rep["detection"])
    det = rep["detection"]["lowest same-label 25th percentile"]
    assert set(det) == {"10%", "15%", "20%"}
    assert all(0 <= d["recall"] <= 1 for d in det.values())
    assert {"scan", "decode", "train", "fit", "matrix", "query"} <= set(rep["seconds"])
    assert rep["memory"]["client_peak_rss"] > 0 and len(rep["memory"]["workers_peak_rss"]) == 1
    for pic in ("suspects.png", "score_histogram.png"):
        assert (out / pic).stat().st_size > 1000


def test_images_resumes_a_partial_store(folder, run, capsys):
    root, _ = folder
    out = run
    before = _suspects(out)
    s = InfluenceStore.open(out / "influences.zarr")
    assert s.is_complete
    tile = next(p for p in (out / "influences.zarr" / "influences" / "c").rglob("*")
                if p.is_file())
    tile.unlink()  # an interrupted run: one tile missing
    assert not InfluenceStore.open(out / "influences.zarr").is_complete
    model_mtime = (out / "model.pt").stat().st_mtime
    capsys.readouterr()
    assert main(["images", str(root), "--out", str(out), *ARGS]) == 0
    log = capsys.readouterr().out
    assert "1 column tasks this run" in log  # only the missing tile's column is recomputed
    assert (out / "model.pt").stat().st_mtime == model_mtime  # nothing finished is redone
    assert InfluenceStore.open(out / "influences.zarr").is_complete
    assert _suspects(out) == before


def test_images_refuses_other_options_in_the_same_folder(folder, run, capsys):
    root, _ = folder
    args = [a if a != "2" else "3" for a in ARGS]  # another width and k
    assert main(["images", str(root), "--out", str(run), *args]) == 1
    err = capsys.readouterr().err
    assert "other options" in err and "--restart" in err


def test_images_bad_folders(tmp_path, capsys):
    one = tmp_path / "one"
    (one / "cats").mkdir(parents=True)
    (one / "cats" / "a.png").write_bytes(b"")
    assert main(["images", str(one), "--out", str(tmp_path / "o1"), *ARGS]) == 1
    assert "at least 2" in capsys.readouterr().err
    # an unreadable image: refused before any long stage, naming the file; nothing written
    bad = tmp_path / "bad"
    info = make_malaria_folder(bad, 12, seed=1, min_size=16, max_size=18, workers=1)
    victim = bad / info.paths[3]
    victim.write_bytes(b"not a png at all")
    (bad / info.paths[0]).with_suffix(".txt").write_text("notes")  # ignored: not an image
    assert main(["images", str(bad), "--out", str(tmp_path / "o2"), *ARGS]) == 1
    err = capsys.readouterr().err
    assert info.paths[3] in err
    assert not (tmp_path / "o2" / "influences.zarr").exists()
    assert not (tmp_path / "o2" / "job.json").exists()


def test_checkpoint_forms(tmp_path):
    """A state dict of the recipe's ResNet18 or any pickled nn.Module (e.g. a torchvision
    model) is accepted; a state dict of another shape is refused with what to pass."""
    import torch

    from dvl_ooc.demo.resnet import ResNet18
    from dvl_ooc.exceptions import InputError
    from dvl_ooc.recipes.images import ImagesJob, _load_checkpoint

    net = ResNet18(2, 2, 3, "imagenet", mean=[0.5] * 3, std=[0.2] * 3, seed=1).eval()
    x = torch.rand(3, 3, 16, 16)
    sd = tmp_path / "sd.pt"
    torch.save(net.state_dict(), sd)
    job = ImagesJob(root=str(tmp_path), out=str(tmp_path / "o"), size=16, width=2,
                    checkpoint=str(sd))
    got = _load_checkpoint(job, 2, 3)
    torch.testing.assert_close(got(x), net(x))
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    whole = tmp_path / "module.pt"
    torch.save(other, whole)
    job.checkpoint, job.mean, job.std = str(whole), [0.5] * 3, [0.25] * 3
    got = _load_checkpoint(job, 2, 3)  # normalisation put in front of the user's module
    torch.testing.assert_close(got(x), other((x - 0.5) / 0.25))
    job.checkpoint, job.mean, job.std, job.width = str(sd), None, None, 4
    with pytest.raises(InputError, match="--width"):
        _load_checkpoint(job, 2, 3)
    with pytest.raises(InputError, match=r"expected \(3,\) logits"):
        _load_checkpoint(ImagesJob(root=".", out=".", size=16, checkpoint=str(whole)), 3, 3)
