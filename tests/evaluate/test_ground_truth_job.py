"""Ground-truth jobs in process: the store's layout and values, reproducible subsets, resume of
missing tasks only with identical bytes, write modes, and bad input refused before writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from dvl_ooc.evaluate import GroundTruth, TorchRetrainer, draw_masks, ground_truth, loo_masks
from dvl_ooc.exceptions import (
    InputError,
    LengthMismatchError,
    NonFiniteError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
)
from dvl_ooc.valuation import TrainingConfig

CFG = TrainingConfig(epochs=2, lr=0.05, batch_size=32, seed=3)
KW = dict(n_subsets=7, n_seeds=2, alpha=0.5, seed=5, subsets_per_task=3, client="sync",
          progress=False)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))


@pytest.fixture(scope="module")
def retrainer(digits):
    return TorchRetrainer(_net(), (digits.x_train[:60], digits.y_train[:60]),
                          (digits.x_test[:20], digits.y_test[:20]), config=CFG)


def chunk_files(path: Path) -> dict[str, bytes]:
    root = path / "targets" / "c"
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and not f.name.endswith(".partial")}


def test_store_holds_the_retrainer_targets_of_reproducible_subsets(tmp_path, retrainer):
    gt = ground_truth(retrainer, tmp_path / "gt.zarr", **KW)
    masks = gt.masks
    # subset j: numpy's default_rng([seed, j]).permutation(n)[:round(alpha n)], as documented
    for j in range(7):
        ref = np.zeros(60, bool)
        ref[np.random.default_rng([5, j]).permutation(60)[:30]] = True
        np.testing.assert_array_equal(masks[j], ref)
    np.testing.assert_array_equal(draw_masks(60, 7, 0.5, 5), masks)
    t = gt.targets
    assert t.shape == (7, 2, 20) and t.dtype == np.float32
    for a, e in [(0, 3), (3, 6), (6, 7)]:
        for s in range(2):  # each chunk is the retrainer's block at that seed, in float32
            np.testing.assert_array_equal(t[a:e, s], retrainer(masks[a:e], s).astype(np.float32))
    assert not np.array_equal(t[:, 0], t[:, 1])  # seeds differ
    assert gt.kind == "loss" and gt.is_complete and len(gt.done_tasks()) == 6
    assert (gt.n_subsets, gt.n_seeds, gt.n_train, gt.n_test, gt.subsets_per_task) == \
        (7, 2, 60, 20, 3)
    assert gt.fingerprint == retrainer.fingerprint() and gt.alpha == 0.5 and gt.seed == 5
    assert sorted(gt.info["tasks_run"]) == gt.all_tasks() and gt.info["trainings"] == 14
    again = GroundTruth.open(str(tmp_path / "gt.zarr"))
    np.testing.assert_array_equal(again.targets, t)
    ds = xr.open_zarr(tmp_path / "gt.zarr")
    assert ds["targets"].dims == ("subset", "seed", "test")
    np.testing.assert_array_equal(ds["masks"].values, masks)
    # a complete store: a rerun trains nothing
    assert ground_truth(retrainer, tmp_path / "gt.zarr", **KW).info["tasks_run"] == []


def test_resume_runs_only_the_missing_tasks_and_gives_the_same_bytes(tmp_path, retrainer):
    full = tmp_path / "full.zarr"
    ground_truth(retrainer, full, **KW)
    ref = chunk_files(full)
    # interrupted by a task budget, then resumed
    part = tmp_path / "part.zarr"
    gt = ground_truth(retrainer, part, max_tasks=2, **KW)
    assert gt.info["tasks_run"] == [(0, 0), (0, 1)] and not gt.is_complete
    assert np.isnan(gt.targets[3:]).all() and not np.isnan(gt.targets[:3]).any()
    gt = ground_truth(retrainer, part, **KW)
    assert gt.info["tasks_before"] == 2 and len(gt.info["tasks_run"]) == 4
    assert chunk_files(part) == ref
    # chunks lost afterwards: only they are recomputed, the others are not touched
    lost = ["1/0/0", "2/1/0"]
    stamps = {k: os.stat(full / "targets" / "c" / k).st_mtime_ns for k in ref if k not in lost}
    for k in lost:
        (full / "targets" / "c" / k).unlink()
    gt = ground_truth(retrainer, full, **KW)
    assert sorted(gt.info["tasks_run"]) == [(1, 0), (2, 1)]
    assert chunk_files(full) == ref
    assert stamps == {k: os.stat(full / "targets" / "c" / k).st_mtime_ns for k in stamps}


def test_given_masks_and_plain_callables(tmp_path):
    w = np.random.default_rng(0).normal(size=(9, 4))

    def fn(masks, seed):  # a linear "model": no n_train / n_test attributes
        return masks @ w + 0.5 * seed

    masks = loo_masks(9, [0, 4, 8])
    gt = ground_truth(fn, tmp_path / "loo.zarr", masks=masks, n_seeds=2, client="sync",
                      progress=False, subsets_per_task=2)
    assert gt.n_test == 4 and gt.alpha is None and gt.seed is None and gt.kind == "loss"
    np.testing.assert_array_equal(gt.masks, masks)
    np.testing.assert_allclose(gt.targets, np.stack([masks @ w, masks @ w + 0.5], 1),
                               rtol=1e-6)
    assert gt.fingerprint.endswith("fn")
    # the probe task (run first to learn n_test) is not run twice
    assert sorted(gt.info["tasks_run"]) == gt.all_tasks()
    with pytest.raises(InputError, match="masks="):
        ground_truth(fn, tmp_path / "x.zarr", client="sync", progress=False)
    margin = ground_truth(fn, tmp_path / "m.zarr", masks=masks, kind="margin", n_seeds=1,
                          client="sync", progress=False, fingerprint="linear-v1")
    assert margin.kind == "margin" and margin.fingerprint == "linear-v1"


def test_a_diverged_training_writes_nothing_for_its_task(tmp_path):
    def fn(masks, seed):
        out = masks[:, :3].astype(float)
        if seed == 1:
            out[0, 0] = np.nan
        return out

    masks = draw_masks(6, 4, seed=0)
    with pytest.raises(NonFiniteError, match="seed 1"):
        ground_truth(fn, tmp_path / "nan.zarr", masks=masks, n_seeds=2, client="sync",
                     progress=False, subsets_per_task=4)
    gt = GroundTruth.open(tmp_path / "nan.zarr")
    assert gt.done_tasks() == {(0, 0)}
    assert np.isnan(gt.targets[:, 1]).all()


def test_write_modes_and_mismatches_leave_the_store_untouched(tmp_path, retrainer):
    path = tmp_path / "gt.zarr"
    ground_truth(retrainer, path, **KW)
    before = chunk_files(path)
    attrs = (path / "zarr.json").read_bytes()
    with pytest.raises(StoreExistsError, match="w-"):
        ground_truth(retrainer, path, mode="w-", **KW)
    for change in ({"n_seeds": 3}, {"alpha": 0.4}, {"seed": 6}, {"subsets_per_task": 2},
                   {"n_subsets": 8}):
        with pytest.raises(StoreMismatchError, match=next(iter(change))):
            ground_truth(retrainer, path, **{**KW, **change})
    other = TorchRetrainer(_net(), (retrainer.x, retrainer.y),
                           (retrainer.x_test, retrainer.y_test), config=CFG.replace(epochs=3))
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        ground_truth(other, path, **KW)
    margin = TorchRetrainer(_net(), (retrainer.x, retrainer.y),
                            (retrainer.x_test, retrainer.y_test), config=CFG, target="margin")
    with pytest.raises(StoreMismatchError, match="target"):
        ground_truth(margin, path, **KW)
    assert chunk_files(path) == before and (path / "zarr.json").read_bytes() == attrs
    # mode "w" replaces it
    gt = ground_truth(other, path, mode="w", **{**KW, "n_seeds": 1})
    assert gt.n_seeds == 1 and gt.fingerprint == other.fingerprint()
    assert len(chunk_files(path)) == 3
    # a resume without subsets_per_task takes the store's chunking
    kw = {k: v for k, v in KW.items() if k != "subsets_per_task"}
    assert ground_truth(other, path, **{**kw, "n_seeds": 1}).subsets_per_task == 3


def test_bad_input_is_refused_before_anything_is_written(tmp_path, retrainer):
    path = tmp_path / "never.zarr"
    masks = draw_masks(60, 5, seed=0)
    empty = masks.copy()
    empty[2] = False
    with pytest.raises(InputError, match=r"subset\(s\) \[2\]"):
        ground_truth(retrainer, path, masks=empty, client="sync", progress=False)
    with pytest.raises(LengthMismatchError, match="60"):
        ground_truth(retrainer, path, masks=masks[:, :50], client="sync", progress=False)
    with pytest.raises(InputError, match="boolean"):
        ground_truth(retrainer, path, masks=masks.astype(np.int8), client="sync",
                     progress=False)
    with pytest.raises(InputError, match="alpha"):
        ground_truth(retrainer, path, alpha=1.0, client="sync", progress=False)
    with pytest.raises(InputError, match="n_seeds"):
        ground_truth(retrainer, path, n_seeds=0, client="sync", progress=False)
    with pytest.raises(InputError, match="mode"):
        ground_truth(retrainer, path, mode="r", client="sync", progress=False)
    with pytest.raises(InputError, match="kind"):
        ground_truth(retrainer, path, kind="margin", client="sync", progress=False)
    with pytest.raises(InputError, match="retrainer"):
        ground_truth("not a function", path, client="sync", progress=False)
    assert not path.exists()
    with pytest.raises(StoreNotFoundError):
        GroundTruth.open(path)
    # a directory that is not a Zarr store is never touched
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a Zarr store"):
        ground_truth(retrainer, other, **{**KW, "mode": "w"})
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_url_stores_resume_and_unfinished_creations_are_finished():
    import uuid

    import fsspec
    import zarr

    from dvl_ooc.exceptions import UnfinishedStoreError

    w = np.random.default_rng(1).normal(size=(9, 4))

    def fn(masks, seed):
        return masks @ w + seed

    url = f"memory://gt-{uuid.uuid4().hex}.zarr"
    masks = draw_masks(9, 6, seed=0)
    kw = dict(masks=masks, n_seeds=2, subsets_per_task=2, client="sync", progress=False)
    gt = ground_truth(fn, url, **kw)
    ref = gt.targets
    np.testing.assert_allclose(ref, np.stack([masks @ w, masks @ w + 1], 1), rtol=1e-6)
    fs = fsspec.filesystem("memory")
    root = url[len("memory://"):]
    fs.rm(f"/{root}/targets/c/1/0/0")
    again = ground_truth(fn, url, **kw)
    assert again.info["tasks_run"] == [(1, 0)]
    np.testing.assert_array_equal(again.targets, ref)
    # a creation interrupted before its state flip is refused, and finished by a rerun
    group = zarr.open_group(url, mode="r+")
    group.attrs["dvl_ooc"] = {**group.attrs["dvl_ooc"], "state": "creating"}
    with pytest.raises(UnfinishedStoreError, match="mode='a'"):
        GroundTruth.open(url)
    done = ground_truth(fn, url, **kw)
    assert done.info["tasks_run"] == [] and done.attrs["state"] == "complete"
    np.testing.assert_array_equal(done.targets, ref)
