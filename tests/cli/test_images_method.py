"""``dvl-ooc images``: the default method (``auto``), the recommended damping and blocks per
method, keys of earlier versions, and ``--method direct`` end to end against an independent
in-memory influence model (per-layer blocks, 0.1 x the mean eigenvalue of each block)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc.cli import main
from dvl_ooc.demo.malaria import make_malaria_folder
from dvl_ooc.demo.resnet import ResNet18
from dvl_ooc.exceptions import InputError
from dvl_ooc.recipes import images as rec
from dvl_ooc.recipes.images import ImagesJob, choose_method, resolved_blocks, resolved_damping
from dvl_ooc.store import InfluenceStore

ARGS = ["--size", "16", "--width", "2", "--epochs", "1", "--k", "2", "--dense-dim", "4",
        "--workers", "1", "--train-chunk", "16", "--test-chunk", "8", "--no-progress",
        "--no-pictures", "--explanations", "0"]


def _factored_params(net: nn.Module) -> int:
    """Parameters of the Linear / Conv2d layers (EK-FAC's ``layers="supported"``)."""
    return sum(p.numel() for mod in net.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
               for p in mod.parameters())


def test_auto_picks_ekfac_for_small_jobs_and_direct_for_large_ones():
    small = ResNet18(n_classes=2, width=8, stem="cifar").eval()
    job = ImagesJob(root=".", out=".")
    method, why = choose_method(job, small, 150, 600)
    assert method == "ekfac"
    assert why["macs"] == 150 * 600 * _factored_params(small)
    # an 11 M-parameter network on the malaria split: n_test n_train p ~ 1.4e15 multiply-adds
    big = ResNet18(n_classes=2, width=64, stem="imagenet").eval()
    method, why = choose_method(job, big, 5512, 22046)
    assert method == "direct" and why["macs"] == 5512 * 22046 * _factored_params(big)
    assert why["macs"] > rec.AUTO_MAX_MACS
    # the test-factor limit alone: cheap in multiply-adds, but many test points
    method, why = choose_method(job, small, 10 ** 6, 1)
    assert why["macs"] <= rec.AUTO_MAX_MACS and why["test_bytes"] > rec.AUTO_MAX_TEST_BYTES
    assert method == "direct"
    # an explicit method is kept as it is
    assert choose_method(replace(job, method="nystroem"), big, 5512, 22046) == ("nystroem", {})


def test_recommended_damping_and_blocks():
    job = ImagesJob(root=".", out=".")
    for method, want in (("ekfac", (0.1, "mean")), ("direct", (0.1, "mean")),
                         ("arnoldi", (1e-3, "top")), ("nystroem", (1e-3, "top"))):
        assert resolved_damping(replace(job, method=method)) == want
    assert resolved_blocks(replace(job, method="direct")) == "layer"
    assert resolved_blocks(replace(job, method="arnoldi")) == "model"
    # explicit values: a factor alone refers to the largest eigenvalue (as before)
    assert resolved_damping(replace(job, method="ekfac", damping=1e-3)) == (1e-3, "top")
    assert resolved_damping(replace(job, method="direct", damping=0.3, damping_of="mean")) \
        == (0.3, "mean")
    assert resolved_blocks(replace(job, method="direct", blocks="model")) == "model"
    for bad in (dict(blocks="rows"), dict(damping_of="median"), dict(damping=0.0),
                dict(method="trak")):
        with pytest.raises(InputError):
            replace(job, **bad).check()


def test_explicit_old_options_keep_the_keys_of_earlier_versions():
    """``--method direct --damping 1e-3 --blocks model`` (the default before) hashes the fit
    stage as earlier versions did, so their output folders resume; the new defaults do not."""
    job = ImagesJob(root=".", out=".", method="direct", damping=1e-3, blocks="model")
    keys = rec._stage_keys(job, "files", 2)
    old = rec._key({"train": keys["train"], "method": "direct", "k": 16, "dense_dim": 64,
                    "rank": 64, "layers": None, "fit_samples": None, "seed": 0,
                    "damping": 1e-3})
    assert keys["fit"] == old
    assert rec._stage_keys(replace(job, damping=None, blocks=None), "files", 2)["fit"] != old
    auto = rec._stage_keys(ImagesJob(root=".", out="."), "files", 2)["fit"]
    assert auto not in (old, rec._stage_keys(replace(job, method="ekfac"), "files", 2)["fit"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "cells"
    make_malaria_folder(root, 40, seed=7, min_size=18, max_size=24, workers=1)
    return root


def test_direct_end_to_end_equals_per_layer_direct_in_memory(folder, tmp_path):
    """The default run reports ``auto -> ekfac``; ``--method direct`` on its network stores the
    matrix of a DirectInfluence with per-layer blocks at 0.1 x each block's mean eigenvalue,
    built and fitted here on the decoded cache."""
    import zarr

    from dvl_ooc import DirectInfluence
    from dvl_ooc.influence import Relative

    out = tmp_path / "auto"
    assert main(["images", str(folder), "--out", str(out), *ARGS]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["influence"]["requested"] == "auto" and rep["influence"]["method"] == "ekfac"
    assert rep["influence"]["class"] == "EkfacInfluence" and rep["job"]["method"] == "ekfac"
    assert rep["fit"]["method"] == "ekfac"

    d = tmp_path / "direct"
    assert main(["images", str(folder), "--out", str(d), *ARGS, "--method", "direct",
                 "--checkpoint", str(out / "model.pt")]) == 0
    rep = json.loads((d / "report.json").read_text())
    assert rep["influence"]["class"] == "DirectInfluence"
    assert rep["influence"]["config"]["blocks"] != "model"
    split = json.loads((d / "split.json").read_text())
    g = zarr.open_group(d / "data.zarr", mode="r")
    x_tr = torch.as_tensor(np.asarray(g["x_train"], dtype=np.float32))
    x_te = torch.as_tensor(np.asarray(g["x_test"], dtype=np.float32))
    y_tr = torch.as_tensor(split["y_train"])
    y_te = torch.as_tensor(split["y_test"])
    net = torch.load(d / "model.pt", map_location="cpu", weights_only=False).eval()
    ref = DirectInfluence(net, F.cross_entropy, blocks="layer",
                          regularization=Relative(0.1, of="mean"),
                          projection=dict(k_in=2, k_out=2, dense_dim=4, seed=0))
    ref.fit((x_tr, y_tr))
    assert len(ref.blocks) > 1  # one block per layer
    want = ref.influences(x_te, y_te, x_tr, y_tr).double().numpy()
    got = InfluenceStore.open(d / "influences.zarr").influences[:].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5 * np.abs(want).max())


def test_fisher_rule_options_and_keys():
    """``fisher="auto"``: exact Gauss-Newton factors up to AUTO_GGN_MAX_CLASSES classes (the
    keys of earlier versions), labels sampled from the model above (a new key); explicit
    values are kept; the recipe's EK-FAC gets the resolved value; bad values are refused."""
    from torch import nn

    from dvl_ooc.influence import Relative

    job = ImagesJob(root=".", out=".")
    cut = rec.AUTO_GGN_MAX_CLASSES
    assert rec.resolved_fisher(job, 2) == rec.resolved_fisher(job, cut) == "ggn"
    assert rec.resolved_fisher(job, cut + 1) == rec.resolved_fisher(job, 1000) == "sampled"
    assert rec.resolved_fisher(replace(job, fisher="ggn"), 1000) == "ggn"
    assert rec.resolved_fisher(replace(job, fisher="sampled"), 2) == "sampled"
    k = {c: rec._stage_keys(job, "files", c)["fit"] for c in (2, cut, cut + 1)}
    assert k[2] == k[cut] != k[cut + 1]
    assert rec._stage_keys(replace(job, fisher="ggn"), "files", cut + 1)["fit"] == k[2]
    assert rec._stage_keys(replace(job, fisher="sampled"), "files", 2)["fit"] == k[cut + 1]
    # Direct does not use it: its key does not move
    d = replace(job, method="direct")
    assert rec._stage_keys(d, "files", 2)["fit"] == rec._stage_keys(d, "files", 100)["fit"]
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 20))
    ek = replace(job, method="ekfac", seed=3)
    assert rec._make_influence(ek, net, Relative(0.1, of="mean"), 2).fisher == "ggn"
    sampled = rec._make_influence(ek, net, Relative(0.1, of="mean"), 20)
    assert (sampled.fisher, sampled.seed) == ("sampled", 3)
    with pytest.raises(InputError, match="fisher"):
        replace(job, fisher="empirical").check()


def test_test_feature_budget_reaches_the_calculator():
    """``--test-feature-budget`` becomes the calculator's ``max_test_feature_bytes`` (fewer
    test groups, same values: no stage key moves); bad sizes are refused up front."""
    import inspect

    from dvl_ooc import DaskInfluenceCalculator

    job = ImagesJob(root=".", out=".")
    assert rec._calculator_options(job) == {}
    big = replace(job, test_feature_budget="16GiB")
    big.check()
    assert rec._calculator_options(big) == {"max_test_feature_bytes": 16 * 2**30}
    assert "max_test_feature_bytes" in inspect.signature(DaskInfluenceCalculator).parameters
    assert rec._stage_keys(big, "files", 2) == rec._stage_keys(job, "files", 2)
    for bad in ("lots", "0B", "-1GiB"):
        with pytest.raises(InputError, match="test_feature_budget"):
            replace(job, test_feature_budget=bad).check()
