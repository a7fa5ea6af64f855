"""Normalising user data into (x, y) tensor batches.

Accepted sources everywhere a method takes ``data``:

* an ``(x, y)`` pair of tensors / NumPy arrays / array-likes with a leading sample axis; a
  lazy array (Zarr, Dask, h5py: anything with ``shape``, ``dtype`` and slicing) as ``x`` is
  read one batch at a time, never whole,
* a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs,
* a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` batches (any batch size, any last batch).

Batch sizes of the source never control memory: computations split batches further into
micro-batches of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..exceptions import InputError, LengthMismatchError, NonFiniteError

DataLike = tuple | list | Dataset | DataLoader

__all__ = [
    "DataLike",
    "IndexedDataset",
    "as_tensor",
    "check_xy",
    "is_lazy_array",
    "iter_batches",
    "num_samples",
    "split_micro_batches",
    "to_numpy",
]


def as_tensor(a: Any, *, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    """Convert an array-like to a tensor; floating arrays are cast to ``dtype`` if given."""
    if isinstance(a, torch.Tensor):
        t = a
    else:
        arr = np.asarray(a)
        if arr.dtype == object:
            raise InputError(f"cannot convert an object array of shape {arr.shape} to a tensor")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy view/copy of a tensor (any device) or array-like; object arrays are refused."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise InputError(f"cannot use an object array of shape {arr.shape} as numeric input")
    return arr


def check_xy(x: torch.Tensor, y: torch.Tensor, *, what: str = "data") -> None:
    """Raise a specific error for mismatched lengths, empty input or non-finite values."""
    if x.ndim == 0 or y.ndim == 0:
        raise InputError(f"{what}: x and y need a leading sample axis (got 0-d arrays)")
    if len(x) != len(y):
        raise LengthMismatchError(
            f"{what}: x has {len(x)} samples but y has {len(y)}; pass one label per sample"
        )
    if len(x) == 0:
        raise InputError(f"{what}: no samples (empty x and y)")
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())
            raise NonFiniteError(
                f"{what}: {name} contains NaN or inf in {bad} sample(s); clean or impute them first"
            )


def is_lazy_array(a: Any) -> bool:
    """True for array objects read by slicing (Zarr, Dask, h5py), not NumPy or torch."""
    return (not isinstance(a, (np.ndarray, torch.Tensor)) and hasattr(a, "shape")
            and hasattr(a, "dtype") and hasattr(a, "__getitem__") and len(a.shape) > 0)


def _pair(data: Any) -> tuple[Any, torch.Tensor] | None:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x = data[0] if is_lazy_array(data[0]) else as_tensor(data[0])
        return x, as_tensor(data[1])
    return None


def num_samples(data: DataLike) -> int:
    """Number of samples in a data source."""
    pair = _pair(data)
    if pair is not None:
        return int(pair[0].shape[0])
    if isinstance(data, DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    if isinstance(data, Dataset):
        return len(data)  # type: ignore[arg-type]
    raise InputError(
        f"unsupported data source {type(data).__name__}: pass (x, y), a Dataset or a DataLoader"
    )


def iter_batches(
    data: DataLike,
    batch_size: int = 256,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    check: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield validated ``(x, y)`` tensor batches from any supported data source."""
    pair = _pair(data)
    if pair is not None:
        x, y = pair
        if is_lazy_array(x):  # read and check one batch at a time
            if int(x.shape[0]) != len(y):
                raise LengthMismatchError(
                    f"data: x has {x.shape[0]} samples but y has {len(y)}; pass one label per "
                    "sample")
            for s in range(0, int(x.shape[0]), batch_size):
                xb = as_tensor(np.asarray(x[s : s + batch_size]), dtype=dtype, device=device)
                yb = as_tensor(y[s : s + batch_size], device=device)
                if check:
                    check_xy(xb, yb)
                yield xb, yb
            return
        if check:
            check_xy(x, y)
        for s in range(0, len(x), batch_size):
            yield as_tensor(x[s : s + batch_size], dtype=dtype, device=device), as_tensor(
                y[s : s + batch_size], device=device
            )
        return
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        raise InputError(
            f"unsupported data source {type(data).__name__}: pass (x, y), a Dataset or a DataLoader"
        )
    seen = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InputError("a DataLoader/Dataset must yield (x, y) pairs")
        xb, yb = as_tensor(batch[0]), as_tensor(batch[1])
        if check:
            check_xy(xb, yb)
        seen += len(xb)
        yield as_tensor(xb, dtype=dtype, device=device), as_tensor(yb, device=device)
    if seen == 0:
        raise InputError("the data source yielded no samples")


def split_micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batch into micro-batches of at most ``size`` samples."""
    for s in range(0, len(x), size):
        yield x[s : s + size], y[s : s + size]


class IndexedDataset(Dataset):
    """``(index, x, y)`` items from a map-style dataset of ``(x, y)`` items, so that a shuffling
    ``DataLoader`` hands the in-run tracker the dataset index of every sample in its batch::

        loader = DataLoader(IndexedDataset(train_ds), batch_size=64, shuffle=True)
        for idx, xb, yb in loader:
            tracker.step(xb, yb, idx, lr=lr)
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise InputError(
                f"IndexedDataset needs a map-style dataset with __getitem__ and __len__, got "
                f"{type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InputError(
                f"IndexedDataset expects (x, y) items, got {type(item).__name__} of length "
                f"{len(item) if isinstance(item, (tuple, list)) else '-'} at index {i}"
            )
        return i, item[0], item[1]
