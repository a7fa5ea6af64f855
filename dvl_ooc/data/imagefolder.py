"""Class-per-subfolder image folders (``root/<class>/*.png``) as data sources.

The layout of many public image sets (e.g. the malaria cell images: ``cell_images/Parasitized``
and ``cell_images/Uninfected``)::

    root/
      class_a/ img001.png img002.png ...
      class_b/ ...

Classes are the sub-folder names in sorted order; label ``i`` is the ``i``-th class. Files are
sorted within a class, so sample order (and therefore store indices) is reproducible.
:attr:`ImageFolder.paths` names each sample's file relative to ``root`` (``class/file``): the
file-path coordinate that stores and reports carry, so a score leads straight to its file.

What counts as an image: regular files directly inside a class folder whose name ends in one of
``extensions`` (case-insensitive). Hidden files and folders (name starting with ``.``, e.g.
``.DS_Store`` or macOS ``._img.png`` resource forks), other files (``.txt``, ``.csv``, ...) and
nested folders are ignored and listed in :attr:`ImageFolder.ignored`. Bad layouts are refused
when the folder is scanned, with an :class:`~dvl_ooc.exceptions.InputError` that names the
folder and what was found: fewer than ``min_classes`` class folders (default 2, since a
classifier needs two classes), a class folder without images, images lying directly in
``root``.

Images are decoded lazily with Pillow, converted to RGB or to grayscale (any mode: palette,
grayscale, RGBA, CMYK; 16-bit integer images are scaled by ``1/65535``, float images are taken
as values in ``[0, 1]``), optionally resized (bilinear), and returned as float tensors ``(C, H,
W)`` in ``[0, 1]``, or normalised per channel, ``(x - mean) / std``, when ``mean`` and ``std``
are given. A file that cannot be decoded (corrupt, truncated, empty, not an image) raises
:class:`~dvl_ooc.exceptions.UnreadableImageError` naming it when it is read; :meth:`ImageFolder.
check` / :meth:`ImageFolder.verify` open every file once beforehand (header and, for PNG,
chunk checksums, without decoding pixels) and report all bad files at once, so a long job can
refuse before it starts. Workers that receive an ``ImageFolder`` read the files themselves: it
pickles as its list of paths and settings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..exceptions import InputError, UnreadableImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: integer modes with more than 8 bits per pixel (scaled by 1/65535, not clipped at 255)
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - only without pillow
        raise ImportError("image folders need Pillow: pip install 'dvl-ooc[examples]'") from e
    return Image


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageFolder(Dataset):
    """A ``torch`` Dataset over ``root/<class>/<image>`` files yielding ``(image, label)``.

    Args:
        root: folder with one sub-folder per class.
        size: resize every image to ``size`` (int: square) or ``(height, width)``; ``None``
            keeps the file size (all images must then have the same size for batching).
        grayscale: convert to one channel (``"L"``); otherwise RGB (3 channels).
        classes: use only these sub-folders, in this order (default: all, sorted).
        extensions: file name endings counted as images (case-insensitive; ``"png"`` and
            ``".png"`` are the same).
        dtype: floating dtype of the returned images.
        mean, std: per-channel normalisation ``(x - mean) / std`` applied after the resize
            (one value per channel, or one for all); ``None``: values in ``[0, 1]``.
        min_classes: the fewest classes accepted (default 2: a classifier needs two; pass 1 to
            read a single class folder).

    Attributes:
        root: the folder (a ``Path``).
        classes: class names; label ``i`` is ``classes[i]``.
        class_to_idx: ``{class name: label}``.
        samples: ``(file path, label)`` per sample, in sample order.
        targets: labels as an ``int64`` array.
        paths: file paths relative to ``root`` (``"class/file"``), in sample order.
        ignored: files and folders inside the class folders that are not images (relative
            paths; hidden entries, other extensions, nested folders).

    Raises:
        InputError: ``root`` is not a folder, has fewer than ``min_classes`` class folders, a
            class folder has no image files, or an argument is invalid.
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
        min_classes: int = 2,
    ) -> None:
        if isinstance(min_classes, bool) or int(min_classes) != min_classes or min_classes < 1:
            raise InputError(f"min_classes must be a positive integer, got {min_classes!r}")
        if isinstance(extensions, str):
            extensions = [extensions]
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not exts:
            raise InputError("extensions must name at least one file ending, e.g. '.png'")
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        entries = sorted(self.root.iterdir())
        found = [p.name for p in entries if p.is_dir() and not _hidden(p)]
        if classes is None:
            classes = found
        else:
            classes = [classes] if isinstance(classes, str) else list(classes)
            missing = [c for c in classes if c not in found]
            if missing:
                raise InputError(f"classes {missing} are not sub-folders of {str(self.root)!r}"
                                 f" (found {found})")
            if len(set(classes)) != len(classes):
                raise InputError(f"classes has duplicates: {classes}")
        if not classes:
            loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in exts
                     and not _hidden(p)]
            hint = (f"; its {len(loose)} image file(s) ({_listing(loose, 3)}) lie directly in "
                    f"it: move them into one sub-folder per class" if loose else "")
            raise InputError(f"image folder {str(self.root)!r} has no class sub-folders; "
                             f"expected root/<class>/<image> files{hint}")
        if len(classes) < min_classes:
            hint = ""
            if len(classes) == 1:
                inner = [p.name for p in (self.root / classes[0]).iterdir()
                         if p.is_dir() and not _hidden(p)]
                if len(inner) >= 2:
                    hint = (f"; {str(self.root / classes[0])!r} has sub-folders "
                            f"{sorted(inner)[:5]}: are the classes one level down?")
            raise InputError(
                f"image folder {str(self.root)!r} has {len(classes)} class sub-folder(s) "
                f"{list(classes)}, but a classifier needs at least {min_classes} (one sub-folder "
                f"per class: root/<class>/<image>; pass min_classes=1 to read a single class)"
                f"{hint}")
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        self.ignored: list[str] = []
        for c in self.classes:
            folder = self.root / c
            files, other = [], []
            for p in sorted(folder.iterdir()):
                if p.is_file() and not _hidden(p) and p.suffix.lower() in exts:
                    files.append(p)
                else:
                    other.append(p.name + ("/" if p.is_dir() else ""))
            self.ignored += [f"{c}/{name}" for name in other]
            if not files:
                what = f"only {len(other)} other entries ({_listing(other)})" if other \
                    else "nothing"
                raise InputError(
                    f"class folder {str(folder)!r} has no image files ({', '.join(exts)}); "
                    f"found {what}. Remove the folder or select classes with classes=[...]")
            self.samples += [(p, self.class_to_idx[c]) for p in files]
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

    @property
    def paths(self) -> list[str]:
        """The image files relative to :attr:`root` (``"class/file"``, POSIX separators), in
        sample order: ``paths[i]`` is the file of sample ``i`` (the file-path coordinate of
        stores and reports; ``root / paths[i]`` opens it)."""
        return [p.relative_to(self.root).as_posix() for p, _ in self.samples]

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as a float32 array ``(C, H, W)`` in [0, 1] (normalised if ``mean`` and
        ``std`` were given).

        Raises:
            UnreadableImageError: the file cannot be opened or decoded (the message names it).
        """
        Image = _pil()
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                a = _decode(Image, im, self.grayscale, self.size)
        except MemoryError:
            raise
        except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, ...
            raise UnreadableImageError(
                f"cannot read image {str(path)!r} ({type(e).__name__}: {e}); remove or replace "
                f"the file (ImageFolder.check() lists every unreadable file)") from e
        a = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
        if self.mean is not None:
            a = (a - self.mean) / self.std
        return a

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.load(int(i))).to(self.dtype),
                torch.tensor(self.targets[int(i)]))

    def check(self, *, decode: bool = False, progress: bool = False) -> list[tuple[str, str]]:
        """Open every file and return the bad ones as ``[(path relative to root, reason)]``
        (empty: all readable).

        Without ``decode`` only the header is parsed, plus Pillow's ``verify`` (for PNG the
        chunk structure and checksums, without decompressing pixels): a few hundred microseconds
        per file, so the whole malaria-size folder takes seconds. It finds empty, foreign,
        truncated and corrupted files; ``decode=True`` also decodes every image (as slow as a
        pass over the data) and finds the rest (e.g. a damaged JPEG body).
        """
        from ..runtime import progress as _progress

        Image = _pil()
        bad = []
        with _progress(progress, total=len(self), unit="file", desc="check images") as bar:
            for (path, _), rel in zip(self.samples, self.paths):
                reason = _check_file(Image, path, decode)
                if reason is not None:
                    bad.append((rel, reason))
                bar.update(1)
        return bad

    def verify(self, *, decode: bool = False, progress: bool = False) -> ImageFolder:
        """:meth:`check` every file and raise one :class:`~dvl_ooc.exceptions.
        UnreadableImageError` listing all bad files (the first 20 in the message, all in its
        ``bad`` attribute); returns ``self`` when every file is readable."""
        bad = self.check(decode=decode, progress=progress)
        if bad:
            lines = "\n".join(f"  {rel}: {why}" for rel, why in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            err = UnreadableImageError(
                f"{len(bad)} of {len(self)} image files under {str(self.root)!r} cannot be "
                f"read; remove or replace them:\n{lines}{more}")
            err.bad = bad
            raise err
        return self

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


def _decode(Image: Any, im: Any, grayscale: bool, size: tuple[int, int] | None) -> np.ndarray:
    """An open PIL image as float32 ``(H, W)`` (grayscale) or ``(H, W, 3)`` in ``[0, 1]``."""
    if im.mode in _WIDE_INT_MODES or im.mode == "F":
        # convert("L"/"RGB") would clip 16-bit values at 255: scale in float instead
        a = np.asarray(im, dtype=np.float32)
        if im.mode != "F":
            a = a / np.float32(65535.0)
        a = np.clip(a, 0.0, 1.0)
        if size is not None:
            a = np.asarray(Image.fromarray(a).resize((size[1], size[0]),
                                                     Image.Resampling.BILINEAR), np.float32)
        return a if grayscale else np.repeat(a[..., None], 3, axis=-1)
    im = im.convert("L" if grayscale else "RGB")
    if size is not None:
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def _check_file(Image: Any, path: Path, decode: bool) -> str | None:
    """Why ``path`` cannot be read as an image, or ``None``."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if min(im.size) < 1:
                return f"image has no pixels (size {im.size})"
            im.verify()
        if decode:
            with Image.open(path) as im:
                im.load()
    except MemoryError:
        raise
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


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
