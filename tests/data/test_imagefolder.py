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
        ImageFolder(tmp_path, min_classes=1)
    with pytest.raises(InputError, match="not sub-folders"):
        ImageFolder(root, classes=["a_one", "dog"])
    # mixed sizes need size=
    Image.fromarray(np.zeros((10, 9), np.uint8)).save(tmp_path / "empty_class" / "big.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty_class" / "small.png")
    with pytest.raises(InputError, match="size="):
        ImageFolder(tmp_path, min_classes=1).to_numpy()
    assert ImageFolder(tmp_path, size=8, min_classes=1).to_numpy()[0].shape == (2, 3, 8, 8)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        ImageFolder(tmp_path, size=8, min_classes=1).to_numpy()


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


# ---------------------------------------------------------------------- bad input
def _png(path, shape=(6, 5), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def test_one_class_folder_is_refused_unless_allowed(tmp_path):
    one = tmp_path / "one"
    for k in range(3):
        _png(one / "cats" / f"{k}.png")
    with pytest.raises(InputError, match=r"1 class sub-folder\(s\) \['cats'\].*at least 2") as e:
        ImageFolder(one)
    assert str(one) in str(e.value) and "min_classes=1" in str(e.value)
    ds = ImageFolder(one, min_classes=1)
    assert ds.classes == ["cats"] and len(ds) == 3 and ds.targets.tolist() == [0, 0, 0]
    # a selection of one class out of two is refused the same way
    _png(one / "dogs" / "0.png")
    with pytest.raises(InputError, match="at least 2"):
        ImageFolder(one, classes=["dogs"])
    assert len(ImageFolder(one, classes=["dogs"], min_classes=1)) == 1
    with pytest.raises(InputError, match="at least 3"):
        ImageFolder(one, min_classes=3)
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="min_classes"):
            ImageFolder(one, min_classes=bad)
    with pytest.raises(InputError, match="duplicates"):
        ImageFolder(one, classes=["dogs", "dogs"])
    # the classes one level down (root/cell_images/<class>): the message says so
    nested = tmp_path / "nested"
    _png(nested / "cell_images" / "Parasitized" / "0.png")
    _png(nested / "cell_images" / "Uninfected" / "0.png")
    with pytest.raises(InputError, match="one level down") as e:
        ImageFolder(nested)
    assert "cell_images" in str(e.value)
    assert ImageFolder(nested / "cell_images").classes == ["Parasitized", "Uninfected"]
    # images directly in root, no class folders
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    with pytest.raises(InputError, match="no class sub-folders.*'a.png'.*directly"):
        ImageFolder(flat)


def test_empty_class_folder_is_refused(tmp_path):
    _png(tmp_path / "good" / "0.png")
    (tmp_path / "bad").mkdir()
    with pytest.raises(InputError, match="has no image files.*found nothing") as e:
        ImageFolder(tmp_path)
    assert str(tmp_path / "bad") in str(e.value)
    (tmp_path / "bad" / "notes.txt").write_text("x")
    (tmp_path / "bad" / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(InputError, match=r"/bad'.*only 2 other entries.*'.DS_Store', "
                                         r"'notes.txt'"):
        ImageFolder(tmp_path)
    assert ImageFolder(tmp_path, classes=["good"], min_classes=1).paths == ["good/0.png"]


def test_non_image_hidden_and_nested_entries_are_ignored(tmp_path):
    for c in ("a", "b"):
        _png(tmp_path / c / "img0.png", value=10)
        _png(tmp_path / c / "img1.PNG", value=20)  # extensions are case-insensitive
        (tmp_path / c / "notes.txt").write_text("not an image")
        (tmp_path / c / "labels.csv").write_text("a,b\n")
        (tmp_path / c / ".DS_Store").write_bytes(b"\0garbage")
        (tmp_path / c / "._img0.png").write_bytes(b"\0\5\26\7AppleDouble")  # hidden, .png
        _png(tmp_path / c / ".thumbs" / "t.png")  # hidden folder
        _png(tmp_path / c / "nested" / "deep.png")  # not recursive
    _png(tmp_path / ".cache" / "x.png")  # hidden class folder is not a class
    (tmp_path / "flipped.csv").write_text("path\n")  # files in root are not classes
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["a", "b"] and len(ds) == 4
    assert ds.paths == ["a/img0.png", "a/img1.PNG", "b/img0.png", "b/img1.PNG"]
    assert all((tmp_path / p).is_file() for p in ds.paths)
    assert sorted(ds.ignored) == sorted(f"{c}/{n}" for c in "ab" for n in (
        "notes.txt", "labels.csv", ".DS_Store", "._img0.png", ".thumbs/", "nested/"))
    x, y = ds.to_numpy()  # nothing ignored is ever decoded
    assert x.shape == (4, 3, 6, 5) and y.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([10, 20, 10, 20]) / 255.0, rtol=1e-6)
    assert ds.check() == []
    # extensions with or without the dot; a narrower list counts fewer files
    assert len(ImageFolder(tmp_path, extensions=["png"])) == 4
    assert ImageFolder(tmp_path, extensions=[".txt", ".png"]).paths[:2] == ["a/img0.png",
                                                                            "a/img1.PNG"]
    assert len(ImageFolder(tmp_path, extensions=[".txt", ".png"])) == 6


def _corrupt_idat(good: bytes) -> bytes:
    """The PNG with its IDAT payload replaced by garbage and the CRC recomputed: the header and
    checksums are valid, only decoding fails."""
    import struct
    import zlib

    i = good.index(b"IDAT") - 4
    n = struct.unpack(">I", good[i : i + 4])[0]
    junk = bytes((7 * k + 3) % 256 for k in range(n))
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + junk) & 0xFFFFFFFF)
    return good[: i + 8] + junk + crc + good[i + 12 + n :]


def test_unreadable_files_name_the_file_and_check_lists_them_all(tmp_path):
    import pickle

    from dvl_ooc.exceptions import UnreadableImageError

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / c / f"ok{k}.png")
    good = (tmp_path / "a" / "ok0.png").read_bytes()
    (tmp_path / "a" / "garbage.png").write_bytes(b"this is not a png at all")
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "text.jpg").write_text("hello")
    (tmp_path / "b" / "baddata.png").write_bytes(_corrupt_idat(good))
    ds = ImageFolder(tmp_path, size=8)  # scanning does not open files
    assert len(ds) == 11
    bad = {"a/garbage.png", "a/zero.png", "b/truncated.png", "b/text.jpg", "b/baddata.png"}
    for i, rel in enumerate(ds.paths):
        if rel in bad:
            with pytest.raises(UnreadableImageError, match=str(tmp_path / rel)) as e:
                ds[i]
            assert isinstance(e.value, InputError) and e.value.__cause__ is not None
        else:
            assert ds[i][0].shape == (3, 8, 8)
    # header check: everything but the valid-checksum, undecodable file, in one report
    found = dict(ds.check())
    assert set(found) == bad - {"b/baddata.png"}, found
    assert found["a/zero.png"] == "empty file (0 bytes)"
    assert "UnidentifiedImageError" in found["a/garbage.png"]
    assert set(dict(ds.check(decode=True))) == bad
    with pytest.raises(UnreadableImageError, match=r"5 of 11 image files") as e:
        ds.verify(decode=True)
    assert sorted(r for r, _ in e.value.bad) == sorted(bad)
    assert all(r in str(e.value) for r in bad)
    with pytest.raises(UnreadableImageError, match="garbage.png"):
        ds.to_numpy()
    # a clean folder passes and workers get the same samples (pickled paths)
    for rel in bad:
        (tmp_path / rel).unlink()
    clean = ImageFolder(tmp_path, size=8)
    assert clean.verify(decode=True) is clean
    clone = pickle.loads(pickle.dumps(clean))
    assert clone.paths == clean.paths and np.array_equal(clone.load(3), clean.load(3))


def test_16_bit_and_other_modes_are_scaled_not_clipped(tmp_path):
    v = np.array([[0, 1000], [30000, 65535]], np.uint16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(v).save(tmp_path / "a" / "wide.png")
    assert Image.open(tmp_path / "a" / "wide.png").mode.startswith("I")
    Image.fromarray(np.array([[0, 255], [128, 64]], np.uint8)).convert("LA").save(
        tmp_path / "b" / "la.png")
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(
        tmp_path / "b" / "bits.png")
    grey = ImageFolder(tmp_path, grayscale=True).to_numpy()[0]
    np.testing.assert_allclose(grey[0, 0], v / 65535.0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grey[1, 0], [[0, 1], [1, 0]])  # bits.png sorts first in b
    np.testing.assert_allclose(grey[2, 0], np.array([[0, 255], [128, 64]]) / 255.0, atol=1e-7)
    rgb = ImageFolder(tmp_path).to_numpy()[0]
    assert rgb.shape == (3, 3, 2, 2)
    np.testing.assert_allclose(rgb[0], np.repeat(grey[0], 3, axis=0), atol=1e-7)
    resized = ImageFolder(tmp_path, size=4).to_numpy()[0]
    assert resized.shape == (3, 3, 4, 4) and 0.2 < resized[0].mean() < 0.6
