"""Write small influence stores in the contract layout directly with zarr (no calculator)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr


def write_store(
    path: Path,
    values: np.ndarray,
    chunks: tuple[int, int],
    *,
    test_label: np.ndarray | None = None,
    train_label: np.ndarray | None = None,
    test_index: np.ndarray | None = None,
    train_index: np.ndarray | None = None,
    self_influence: np.ndarray | None = None,
    skip_tiles: set[tuple[int, int]] = frozenset(),
) -> Path:
    """Store ``values`` (n_test, n_train) tile by tile, leaving out ``skip_tiles``."""
    n_test, n_train = values.shape
    g = zarr.open_group(str(path), mode="w")
    a = g.create_array(
        "influences", shape=values.shape, chunks=chunks, dtype=values.dtype,
        fill_value=np.nan, dimension_names=["test", "train"],
        config={"write_empty_chunks": True},
    )
    coords = []
    for name, dim, v in (
        ("test", "test", np.arange(n_test) if test_index is None else test_index),
        ("train", "train", np.arange(n_train) if train_index is None else train_index),
        ("test_label", "test", test_label),
        ("train_label", "train", train_label),
    ):
        if v is None:
            continue
        z = g.create_array(name, shape=v.shape, dtype=v.dtype, dimension_names=[dim])
        z[:] = v
        if name.endswith("label"):
            coords.append(name)
    if coords:
        a.attrs["coordinates"] = " ".join(coords)
    tc, rc = chunks
    for i in range(0, -(-n_test // tc)):
        for j in range(0, -(-n_train // rc)):
            if (i, j) not in skip_tiles:
                a[i * tc : (i + 1) * tc, j * rc : (j + 1) * rc] = \
                    values[i * tc : (i + 1) * tc, j * rc : (j + 1) * rc]
    if self_influence is not None:
        s = g.create_array("self_influence", shape=(n_train,), dtype=self_influence.dtype,
                           chunks=(chunks[1],), fill_value=np.nan,
                           dimension_names=["train"], config={"write_empty_chunks": True})
        s[:] = self_influence
    g.attrs["dvl_ooc"] = {
        "format": 1, "kind": "influence", "version": "0.1.0", "method": "Test",
        "config": {"method": "Test"}, "fingerprint": "0" * 32, "n_test": n_test,
        "n_train": n_train, "chunks": list(chunks), "dtype": str(values.dtype),
        "created": "2026-01-01T00:00:00", "data_fingerprint": "0" * 32,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(str(path))
    return path
