"""Class-per-subfolder image folders, on PNG files written from the digits images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dvl_ooc.data import iter_batches
from dvl_ooc.data.imagefolder import ImageFolder, load_image_folder
from dvl_ooc.exceptions import InputError

CLASSES = ["b_three", "a_one", "c_seven"]  # sorted order: a_one, b_three, c_seven
DIGITS = {"a_one": 1, "b_three": 3, "c_seven": 7}


@pytest.fixture(scope="module")
def folder(digits, tmp_path_factory):
    """root/<class>/<i>.png with 5 digits images per class, plus a non-image file."""
    root = tmp_path_factory.mktemp("imgs")
    x = np.concatenate([digits.x_train, digits.x_test])[:, 0]
    y = np.concatenate([digits.y_train_clean, digits.y_test])
    pixels = {}
    for c in CLASSES:
        (root / c).mkdir()
        idx = np.flatnonzero(y == DIGITS[c])[:5]
        for k, i in enumerate(idx[::-1]):  # written in reverse, read sorted by name
            a = np.round(x[i] * 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"img{k:02d}.png")
            pixels[(c, f"img{k:02d}.png")] = a
    (root / "a_one" / "notes.txt").write_text("not an image")
    return root, pixels


def test_reads_classes_labels_and_pixels(folder):
    root, pixels = folder
    ds = ImageFolder(root, grayscale=True)
    assert ds.classes == sorted(CLASSES)
    assert len(ds) == 15
    np.testing.assert_array_equal(ds.targets, np.repeat([0, 1, 2], 5))
    x, y = ds.to_numpy()
    assert x.shape == (15, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(y, ds.targets)
    for n, (path, lab) in enumerate(ds.samples):
        assert ds.classes[lab] == path.parent.name
        np.testing.assert_allclose(x[n, 0], pixels[(path.parent.name, path.name)] / 255.0,
                                   rtol=0, atol=1e-7)
    img, lab = ds[7]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
    assert int(lab) == 1
    np.testing.assert_array_equal(img.numpy(), x[7])
    x2, y2, classes = load_image_folder(root, grayscale=True)
    np.testing.assert_array_equal(x2, x)
    assert classes == ds.classes


def test_rgb_resize_subset_and_batches(folder):
    root, _ = folder
    ds = ImageFolder(root, size=(12, 16), classes=["c_seven", "a_one"])
    assert ds.classes == ["c_seven", "a_one"] and len(ds) == 10
    x, y = ds.to_numpy([0, 9])
    assert x.shape == (2, 3, 12, 16)
    np.testing.assert_array_equal(y, [0, 1])
    np.testing.assert_array_equal(x[:, 0], x[:, 1])  # gray source: equal channels
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    # a torch Dataset usable wherever dvl_ooc takes data
    batches = list(iter_batches(ds, 4))
    assert sum(len(b[1]) for b in batches) == 10
    assert batches[0][0].shape[1:] == (3, 12, 16)


def test_errors(folder, tmp_path):
    root, _ = folder
    with pytest.raises(InputError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(InputError, match="no class sub-folders"):
        ImageFolder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(InputError, match="no image files"):
        ImageFolder(tmp_path)
    with pytest.raises(InputError, match="not sub-folders"):
        ImageFolder(root, classes=["a_one", "dog"])
    # mixed sizes need size=
    Image.fromarray(np.zeros((10, 9), np.uint8)).save(tmp_path / "empty_class" / "big.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty_class" / "small.png")
    with pytest.raises(InputError, match="size="):
        ImageFolder(tmp_path).to_numpy()
    assert ImageFolder(tmp_path, size=8).to_numpy()[0].shape == (2, 3, 8, 8)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        ImageFolder(tmp_path, size=8).to_numpy()


@pytest.mark.slow
def test_example_workflow_script(tmp_path):
    """examples/image_folder_workflow.py end to end on its generated folder (Dask, ~1 min)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "image_folder_workflow.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "o"), "--epochs",
                        "15", "--workers", "1"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(s for s in r.stdout.splitlines() if "misplaced training images among" in s)
    found, total = (int(v) for v in line.split(":")[1].split(" of "))
    assert total > 0 and found >= 0.4 * total, line
    assert (tmp_path / "o" / "influences.zarr" / "queries" / "q25_same_label").is_dir()


def test_per_channel_normalisation_paths_and_mixed_modes(folder, tmp_path):
    root, pixels = folder
    plain = ImageFolder(root, size=8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    norm = ImageFolder(root, size=8, mean=mean, std=std)
    x0, _ = plain.to_numpy()
    x1, _ = norm.to_numpy()
    m, sd = (np.array(v, np.float32)[:, None, None] for v in (mean, std))
    want = (x0 - m) / sd
    assert np.allclose(x1, want, rtol=1e-6, atol=1e-6)
    gray = ImageFolder(root, grayscale=True, mean=0.5, std=0.5).to_numpy()[0]
    assert np.allclose(gray, ImageFolder(root, grayscale=True).to_numpy()[0] * 2 - 1, atol=1e-6)
    assert norm.paths[0] == "a_one/img00.png" and len(norm.paths) == len(norm)
    for kw, msg in [(dict(mean=[0.5, 0.5]), "both"), (dict(mean=[0.5, 0.5], std=1.0), "3 value"),
                    (dict(mean=0.5, std=[1.0, 0.0, 1.0]), "std must be > 0")]:
        with pytest.raises(InputError, match=msg):
            ImageFolder(root, **kw)
    # mixed modes in one folder (grey, palette, RGBA, RGB) all come out as RGB of one size
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    (mixed / "b").mkdir()
    base = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    Image.fromarray(base).save(mixed / "a" / "rgb.png")
    Image.fromarray(base).convert("L").save(mixed / "a" / "grey.png")
    Image.fromarray(base).convert("P").save(mixed / "b" / "palette.png")
    Image.fromarray(base).convert("RGBA").save(mixed / "b" / "rgba.png")
    x, y = ImageFolder(mixed, size=(6, 5)).to_numpy()
    assert x.shape == (4, 3, 6, 5) and y.tolist() == [0, 0, 1, 1]
    assert np.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()
