"""A synthetic image folder in the layout of the NIH malaria cell images (no download).

The real data set (``cell_images/Parasitized``, ``cell_images/Uninfected``; 27,558 RGB PNGs of
about 100-150 px a side, segmented cells on a black background) cannot be downloaded here, so
:func:`make_malaria_folder` draws a look-alike::

    root/
      Parasitized/ cell_00000.png cell_00003.png ...
      Uninfected/  cell_00001.png ...
      flipped.csv                  files put in the wrong class folder (written last)
      .dvl_ooc_synthetic.json      generator parameters; marks the folder as generated

Each image is a roundish stained cell (soft, wobbly edge; pink, mauve, purple or orange stain;
central pallor, rim shading, low-frequency texture and pixel noise) on a black background.
Parasitised cells carry 1-3 dark purple rings or dots of varying size and contrast, some of
them faint and small; some uninfected cells carry light spots, and a few a faint dark speck
(debris or a platelet). The task is learnable but not trivial: a small CNN reaches about
90-97 % accuracy, not 100 % (measured at 64x64 input, 80/20 split of 2,000 images, 20 epochs:
96.0 % for ``resnet_small(stem="imagenet")`` (177k parameters), 95.5 % at width 16 (0.7 M)).

Image ``i`` depends only on ``(seed, i)`` and its class (streams from
:func:`dvl_ooc.seeding.numpy_rng`); classes and flips come from separate streams of ``seed``.
The same arguments give byte-identical files (with the same Pillow/zlib build), in any number
of worker processes. File names carry a global index, never the class, so a flipped file is
found only through ``flipped.csv``.

Speed: 6.7 ms of CPU per image (4.5 ms drawing, 2 ms PNG at zlib level 1), i.e. ~150
images/s per free core; each spawned worker pays ~5 s of imports once. Measured on the shared
2-core machine under a background load: 100-140 images/s in one process, 63 images/s with
``workers=2`` (3,000 images, cores busy); on two free cores the full 27,558 images take ~1.5
min and ~0.5 GB of disk (19 KB per file). ``dvl_ooc.data.ImageFolder(root, size=64)`` decodes
and resizes them at ~850 images/s in one process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..exceptions import InputError
from ..runtime import check_main_guard
from ..runtime import progress as _progress
from ..seeding import numpy_rng

__all__ = ["CLASSES", "MalariaFolderInfo", "main", "make_malaria_folder", "malaria_image",
           "read_flipped"]

#: class folder names; ``ImageFolder`` labels them 0 and 1 (sorted order)
CLASSES = ("Parasitized", "Uninfected")
PARASITIZED, UNINFECTED = 0, 1
FLIPPED_CSV = "flipped.csv"
MARKER = ".dvl_ooc_synthetic.json"
_LAYOUT_KEY = 2**31 - 1  # streams for labels and flips, apart from the per-image streams
_PNG_LEVEL = 1  # zlib level: 1 is ~3x faster to write than 6 and ~15 % larger

# stain colours (RGB in [0, 1]) of the cell body: pink, mauve, purple-pink, orange, salmon
_STAINS = np.array([[0.86, 0.55, 0.60], [0.80, 0.58, 0.68], [0.74, 0.50, 0.70],
                    [0.90, 0.64, 0.46], [0.88, 0.60, 0.52]], dtype=np.float32)
_PARASITE = np.array([0.33, 0.13, 0.42], dtype=np.float32)  # dark purple chromatin
_SPOT = np.array([0.97, 0.85, 0.88], dtype=np.float32)  # light artefact

# difficulty: fractions of faint parasites and of uninfected cells with a dark speck
_FAINT_PARASITE = 0.10
_DARK_SPECK = 0.06
_LIGHT_SPOTS = 0.35


@dataclass
class MalariaFolderInfo:
    """What :func:`make_malaria_folder` wrote.

    ``paths[i]`` is image ``i``'s path relative to ``root`` (``"<given class>/cell_<i>.png"``);
    ``true_labels`` / ``given_labels`` index :data:`CLASSES` (``0`` Parasitized, ``1``
    Uninfected, as :class:`dvl_ooc.data.ImageFolder` labels them); ``flipped`` holds the sorted
    indices of the images put in the wrong folder.
    """

    root: Path
    paths: list[str]
    true_labels: np.ndarray
    given_labels: np.ndarray
    flipped: np.ndarray
    flipped_csv: Path
    seconds: float
    classes: tuple[str, ...] = field(default=CLASSES)

    @property
    def n_images(self) -> int:
        return len(self.paths)

    @property
    def images_per_second(self) -> float:
        return self.n_images / max(self.seconds, 1e-9)

    def flipped_mask(self, files: Sequence[str | os.PathLike]) -> np.ndarray:
        """Boolean mask over ``files`` (absolute or relative to ``root``; e.g. the paths of an
        ``ImageFolder``'s ``samples``): True where the file is in the wrong class folder."""
        return _mask(self.root, {self.paths[i] for i in self.flipped}, files)


def _mask(root: Path, wrong: set[str], files: Sequence[str | os.PathLike]) -> np.ndarray:
    root = Path(root).resolve()
    out = np.zeros(len(files), dtype=bool)
    for k, f in enumerate(files):
        p = Path(f)
        if p.is_absolute():
            p = p.resolve().relative_to(root)
        out[k] = p.as_posix() in wrong
    return out


def read_flipped(root: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Rows ``(relative path, true class, given class)`` of ``root/flipped.csv``."""
    path = Path(root) / FLIPPED_CSV
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist: not a complete generated folder")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [(r[0], r[1], r[2]) for r in rows[1:]]


def _interp_matrix(n: int, g: int) -> np.ndarray:
    """``(n, g)`` linear interpolation weights from ``g`` grid points onto ``n`` pixels."""
    pos = np.linspace(0.0, g - 1.0, n, dtype=np.float32)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(g, dtype=np.float32)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, g: int) -> np.ndarray:
    """Low-frequency noise ``(h, w)`` with unit-order amplitude from a ``g x g`` grid."""
    grid = rng.standard_normal((g, g)).astype(np.float32)
    return _interp_matrix(h, g) @ grid @ _interp_matrix(w, g).T


def _blend(img: np.ndarray, prof: np.ndarray, colour: np.ndarray, strength: float) -> None:
    """In place: pull ``img`` toward ``colour`` with weight ``strength * prof``."""
    a = (strength * prof)[..., None]
    img *= 1.0 - a
    img += a * colour


def malaria_image(seed: int, index: int, parasitized: bool, min_size: int = 100,
                  max_size: int = 150) -> np.ndarray:
    """Image ``index`` of the stream ``seed``: ``uint8 (h, w, 3)``, ``h, w`` in
    ``[min_size, max_size]``; a parasitised cell when ``parasitized``."""
    rng = numpy_rng(seed, index)
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    cy = h / 2 + rng.normal(0, 0.03 * h)
    cx = w / 2 + rng.normal(0, 0.03 * w)
    ry = h * rng.uniform(0.38, 0.47)
    rx = w * rng.uniform(0.38, 0.47)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    rho = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    edge = np.ones_like(rho)
    for k in range(2, 6):  # wobbly outline
        edge += rng.normal(0, 0.05 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    m = rho / edge  # < 1 inside the cell
    soft = rng.uniform(0.03, 0.08)
    alpha = np.clip((1.0 - m) / soft + 0.5, 0.0, 1.0)

    stain = _STAINS[rng.integers(len(_STAINS))] + rng.normal(0, 0.035, 3).astype(np.float32)
    bright = (rng.uniform(0.78, 1.04) * (1.0 + rng.uniform(0.0, 0.14) * np.exp(-(m / 0.45) ** 2)
              - rng.uniform(0.05, 0.22) * np.minimum(m, 1.0) ** 4))
    bright = bright + rng.uniform(0.02, 0.06) * _smooth_noise(rng, h, w, 7)
    bright = bright + 0.02 * _smooth_noise(rng, h, w, 16)
    img = bright[..., None] * stain
    img += rng.uniform(0.008, 0.02) * _smooth_noise(rng, h, w, 5)[..., None] * \
        rng.normal(0, 1, 3).astype(np.float32)  # slight hue drift

    def spot(rad_max: float) -> tuple[float, float]:
        r, a = rad_max * float(np.sqrt(rng.uniform())), rng.uniform(0, 2 * np.pi)
        return float(cy + r * ry * np.sin(a)), float(cx + r * rx * np.cos(a))

    if parasitized:
        faint = rng.uniform() < _FAINT_PARASITE
        for _ in range(int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))):
            py, px = spot(0.75)
            d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2)
            size = rng.uniform(1.3, 2.6) if faint else rng.uniform(2.2, 6.5)
            strength = rng.uniform(0.12, 0.3) if faint else rng.uniform(0.4, 0.9)
            colour = _PARASITE + rng.normal(0, 0.04, 3).astype(np.float32)
            if rng.uniform() < 0.5:  # ring form with a chromatin dot on it
                ring = np.exp(-((d - size) ** 2) / (2 * (0.35 * size + 0.4) ** 2))
                a = rng.uniform(0, 2 * np.pi)
                qy, qx = py + size * float(np.sin(a)), px + size * float(np.cos(a))
                dd = (yy - qy) ** 2 + (xx - qx) ** 2
                prof = np.maximum(ring, np.exp(-dd / (2 * (0.45 * size) ** 2)))
            else:
                prof = np.exp(-(d * d) / (2 * (0.6 * size) ** 2))
            _blend(img, prof, colour, strength)
    else:
        if rng.uniform() < _LIGHT_SPOTS:
            for _ in range(int(rng.integers(1, 3))):
                py, px = spot(0.8)
                d2 = (yy - py) ** 2 + (xx - px) ** 2
                size = rng.uniform(1.5, 5.0)
                _blend(img, np.exp(-d2 / (2 * size**2)), _SPOT, rng.uniform(0.2, 0.5))
        if rng.uniform() < _DARK_SPECK:
            py, px = spot(0.9)
            d2 = (yy - py) ** 2 + (xx - px) ** 2
            size = rng.uniform(1.2, 2.4)
            _blend(img, np.exp(-d2 / (2 * (0.6 * size) ** 2)), _PARASITE, rng.uniform(0.12, 0.3))

    img += 0.018 * rng.standard_normal(img.shape, dtype=np.float32)
    img *= alpha[..., None]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _write_images(seed: int, root: str, jobs: list[tuple[int, bool, str]], min_size: int,
                  max_size: int) -> int:
    """Worker task: render and write ``(index, parasitized, relative path)`` jobs."""
    from PIL import Image

    for i, par, rel in jobs:
        a = malaria_image(seed, i, par, min_size, max_size)
        Image.fromarray(a, "RGB").save(os.path.join(root, rel), format="PNG",
                                       compress_level=_PNG_LEVEL)
    return len(jobs)


def _prepare_root(root: Path, mode: str) -> None:
    """Check ``mode`` against what is at ``root``; in ``"w"`` remove a generated folder."""
    if mode not in ("w-", "w"):
        raise InputError(f"mode must be 'w-' (create only) or 'w' (replace), got {mode!r}")
    if root.exists() and not root.is_dir():
        raise InputError(f"{str(root)!r} is a file, not a folder")
    entries = sorted(p.name for p in root.iterdir()) if root.exists() else []
    if not entries:
        return
    if mode == "w-":
        raise InputError(f"{str(root)!r} is not empty ({', '.join(entries[:5])}...); choose an "
                         "empty folder or pass mode='w' to replace a generated one")
    ours = {*CLASSES, FLIPPED_CSV, MARKER}
    if MARKER not in entries or set(entries) - ours:
        raise InputError(f"{str(root)!r} holds files this generator did not write "
                         f"({', '.join(sorted(set(entries) - ours) or ['no marker'])}); "
                         "mode='w' replaces only a generated folder: remove it yourself")
    for name in entries:
        p = root / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def make_malaria_folder(
    root: str | os.PathLike,
    n_images: int = 27558,
    *,
    seed: int = 0,
    flip_fraction: float = 0.0,
    min_size: int = 100,
    max_size: int = 150,
    parasitized_fraction: float = 0.5,
    workers: int | None = None,
    progress: bool = False,
    mode: Literal["w-", "w"] = "w-",
) -> MalariaFolderInfo:
    """Write a synthetic malaria-style image folder (see the module docstring).

    Args:
        root: the folder to create (``root/Parasitized``, ``root/Uninfected``).
        n_images: number of PNG files (the real set has 27,558).
        seed: the generator's seed; the same arguments give byte-identical files.
        flip_fraction: fraction of files put in the other class folder, listed in
            ``root/flipped.csv`` (``path,true_class,given_class``).
        min_size, max_size: bounds of each image's height and width (drawn independently).
        parasitized_fraction: fraction of parasitised cells (true classes, before flips).
        workers: processes (spawned; call from under ``if __name__ == "__main__":``); ``None``
            uses one per CPU from 2,000 images on and the calling process below that.
        progress: show a progress bar.
        mode: ``"w-"`` refuses a non-empty ``root`` (:class:`InputError`); ``"w"`` replaces a
            folder written by this function (and refuses any other).

    ``flipped.csv`` is written last, so a folder without it is incomplete.
    """
    if n_images < 2:
        raise InputError(f"n_images must be at least 2, got {n_images}")
    if not 0 <= flip_fraction < 1:
        raise InputError(f"flip_fraction must be in [0, 1), got {flip_fraction}")
    if not 0 < parasitized_fraction < 1:
        raise InputError(f"parasitized_fraction must be in (0, 1), got {parasitized_fraction}")
    if not 8 <= min_size <= max_size:
        raise InputError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(root)
    _prepare_root(root, mode)
    t0 = time.perf_counter()

    n_par = int(round(parasitized_fraction * n_images))
    true = np.full(n_images, UNINFECTED, dtype=np.int64)
    true[numpy_rng(seed, _LAYOUT_KEY, 0).permutation(n_images)[:n_par]] = PARASITIZED
    flipped = np.sort(numpy_rng(seed, _LAYOUT_KEY, 1).choice(
        n_images, size=int(round(flip_fraction * n_images)), replace=False))
    given = true.copy()
    given[flipped] = 1 - true[flipped]
    digits = max(5, len(str(n_images - 1)))
    paths = [f"{CLASSES[g]}/cell_{i:0{digits}d}.png" for i, g in enumerate(given)]

    params = {"generator": "dvl_ooc.demo.malaria", "n_images": n_images, "seed": seed,
              "flip_fraction": flip_fraction, "min_size": min_size, "max_size": max_size,
              "parasitized_fraction": parasitized_fraction, "complete": False}
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(params, indent=1))
    for c in CLASSES:
        (root / c).mkdir()

    jobs = [(i, bool(true[i] == PARASITIZED), paths[i]) for i in range(n_images)]
    if workers is None:
        workers = (os.cpu_count() or 1) if n_images >= 2000 else 1
    with _progress(progress, total=n_images, unit="img", desc="malaria images") as bar:
        if workers <= 1:
            for s in range(0, n_images, 256):
                bar.update(_write_images(seed, str(root), jobs[s:s + 256], min_size, max_size))
        else:
            import multiprocessing

            check_main_guard("make_malaria_folder(workers > 1)")
            size = max(32, min(512, n_images // (8 * workers)))
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) \
                    as ex:
                futs = [ex.submit(_write_images, seed, str(root), jobs[s:s + size], min_size,
                                  max_size) for s in range(0, n_images, size)]
                for f in futs:
                    bar.update(f.result())

    csv_path = root / FLIPPED_CSV
    tmp = root / (FLIPPED_CSV + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["path", "true_class", "given_class"])
        for i in flipped:
            wr.writerow([paths[i], CLASSES[true[i]], CLASSES[given[i]]])
    os.replace(tmp, csv_path)
    seconds = time.perf_counter() - t0
    (root / MARKER).write_text(json.dumps({**params, "complete": True}, indent=1))
    return MalariaFolderInfo(root, paths, true, given, flipped, csv_path, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dvl_ooc.demo.malaria OUT [--n N] [--flip F] [--seed S] ...``"""
    p = argparse.ArgumentParser(prog="python -m dvl_ooc.demo.malaria",
                                description="Write a synthetic malaria-style image folder.")
    p.add_argument("out", help="folder to create (must be empty unless --replace)")
    p.add_argument("--n", type=int, default=27558, help="number of images (default 27558)")
    p.add_argument("--flip", type=float, default=0.0, help="fraction of files in the wrong "
                   "class folder, listed in OUT/flipped.csv (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=100)
    p.add_argument("--max-size", type=int, default=150)
    p.add_argument("--parasitized-fraction", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=None, help="processes (default: auto)")
    p.add_argument("--replace", action="store_true", help="replace a generated folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        info = make_malaria_folder(
            a.out, a.n, seed=a.seed, flip_fraction=a.flip, min_size=a.min_size,
            max_size=a.max_size, parasitized_fraction=a.parasitized_fraction,
            workers=a.workers, progress=not a.quiet, mode="w" if a.replace else "w-")
    except InputError as e:
        print(f"error: {e}")
        return 2
    print(f"{info.n_images} images in {info.seconds:.1f} s ({info.images_per_second:.0f}/s) "
          f"under {info.root}; {len(info.flipped)} flipped, listed in {info.flipped_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
