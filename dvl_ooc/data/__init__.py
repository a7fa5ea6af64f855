"""Data sources: normalising user data into ``(x, y)`` tensor batches, and image folders."""

from .core import (
    DataLike,
    IndexedDataset,
    as_tensor,
    check_xy,
    iter_batches,
    num_samples,
    split_micro_batches,
    to_numpy,
)
from .imagefolder import ImageFolder, load_image_folder

__all__ = [
    "DataLike",
    "ImageFolder",
    "IndexedDataset",
    "as_tensor",
    "check_xy",
    "iter_batches",
    "load_image_folder",
    "num_samples",
    "split_micro_batches",
    "to_numpy",
]
