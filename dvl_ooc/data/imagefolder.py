"""Class-per-subfolder image folders (``root/<class>/*.png``) as data sources.

The layout of many public image sets (e.g. the malaria cell images: ``cell_images/Parasitized``
and ``cell_images/Uninfected``)::

    root/
      class_a/ img001.png img002.png ...
      class_b/ ...

Classes are the sub-folder names in sorted order; label ``i`` is the ``i``-th class. Files are
sorted within a class, so sample order (and therefore store indices) is reproducible. Images are
decoded lazily with Pillow, converted to RGB (any mode: palette, grayscale, RGBA, 16-bit) or to
grayscale, optionally resized, and returned as float tensors ``(C, H, W)`` in ``[0, 1]``, or
normalised per channel, ``(x - mean) / std``, when ``mean`` and ``std`` are given. Workers that
receive an ``ImageFolder`` read the files themselves: it pickles as its list of paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..exceptions import InputError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - only without pillow
        raise ImportError("image folders need Pillow: pip install 'dvl-ooc[examples]'") from e
    return Image


class ImageFolder(Dataset):
    """A ``torch`` Dataset over ``root/<class>/<image>`` files yielding ``(image, label)``.

    Args:
        root: folder with one sub-folder per class.
        size: resize every image to ``size`` (int: square) or ``(height, width)``; ``None``
            keeps the file size (all images must then have the same size for batching).
        grayscale: convert to one channel (``"L"``); otherwise RGB (3 channels).
        classes: use only these sub-folders, in this order (default: all, sorted).
        extensions: file name endings counted as images (case-insensitive).
        dtype: floating dtype of the returned images.
        mean, std: per-channel normalisation ``(x - mean) / std`` applied after the resize
            (one value per channel, or one for all); ``None``: values in ``[0, 1]``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        size: int | tuple[int, int] | None = None,
        grayscale: bool = False,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        dtype: torch.dtype = torch.float32,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir()
                       and not p.name.startswith("."))
        if classes is None:
            classes = found
        else:
            classes = list(classes)
            missing = [c for c in classes if c not in found]
            if missing:
                raise InputError(f"classes {missing} are not sub-folders of {str(self.root)!r}")
        if not classes:
            raise InputError(
                f"{str(self.root)!r} has no class sub-folders; expected root/<class>/<image> files"
            )
        exts = tuple(e.lower() for e in extensions)
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).iterdir()
                           if p.is_file() and p.suffix.lower() in exts)
            self.samples += [(p, self.class_to_idx[c]) for p in files]
        if not self.samples:
            raise InputError(f"no image files ({', '.join(exts)}) found under {str(self.root)!r}")
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, int | np.integer) else \
                (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise InputError(f"size must be positive, got {size}")
        self.size = size
        self.grayscale = grayscale
        self.mean, self.std = _normalisation(mean, std, 1 if grayscale else 3)
        self.dtype = dtype
        self.targets = np.array([lab for _, lab in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as a float32 array ``(C, H, W)`` in [0, 1]."""
        Image = _pil()
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.grayscale else "RGB")
                if self.size is not None:
                    im = im.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read image {str(path)!r}: {e}") from e
        a = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
        if self.mean is not None:
            a = (a - self.mean) / self.std
        return a

    @property
    def paths(self) -> list[str]:
        """The image files relative to :attr:`root` (``class/file``), in sample order."""
        return [p.relative_to(self.root).as_posix() for p, _ in self.samples]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.load(int(i))).to(self.dtype),
                torch.tensor(self.targets[int(i)]))

    def to_numpy(self, indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decode (a subset of) the images into arrays ``x (n, C, H, W)`` float32, ``y (n,)``."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise InputError("no indices given")
        imgs = [self.load(int(i)) for i in idx]
        shapes = {a.shape for a in imgs}
        if len(shapes) > 1:
            raise InputError(
                f"images have different sizes {sorted(shapes)[:3]}...; pass size=(h, w) to resize"
            )
        return np.stack(imgs), self.targets[idx].copy()

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, {len(self)} images, classes={self.classes}, "
                f"size={self.size}, grayscale={self.grayscale})")


def _normalisation(mean: Any, std: Any, channels: int
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(mean, std)`` as ``(C, 1, 1)`` float32 arrays, or ``(None, None)``."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise InputError("pass both mean and std for per-channel normalisation, or neither")
    out = []
    for name, v in (("mean", mean), ("std", std)):
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        if a.size == 1:
            a = np.repeat(a, channels)
        if a.size != channels:
            raise InputError(f"{name} needs {channels} value(s) (one per channel), got {a.size}")
        if not np.isfinite(a).all():
            raise InputError(f"{name} must be finite, got {a.tolist()}")
        out.append(a.astype(np.float32).reshape(channels, 1, 1))
    if (out[1] <= 0).any():
        raise InputError(f"std must be > 0 in every channel, got {out[1].ravel().tolist()}")
    return out[0], out[1]


def load_image_folder(
    root: str | os.PathLike, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a whole class-per-subfolder image folder into memory: ``(x, y, classes)``.

    Keyword arguments go to :class:`ImageFolder` (``size``, ``grayscale``, ``classes``, ...).
    """
    ds = ImageFolder(root, **kwargs)
    x, y = ds.to_numpy()
    return x, y, ds.classes
