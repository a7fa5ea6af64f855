"""InfluenceStore: layout contract, done-tile bookkeeping, parameter checks (real Zarr v3 stores
on disk, no cluster)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from dvl_ooc import InfluenceStore
from dvl_ooc.exceptions import (
    InputError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
    StoreNotFoundError,
)

PARAMS = dict(n_test=5, n_train=7, test_chunk=2, train_chunk=3, method="DirectInfluence",
              config={"method": "DirectInfluence", "regularization": {"model": 0.1}},
              fingerprint="f" * 32, data_fingerprint="d" * 32)


def _create(path, **kw):
    return InfluenceStore.create(path, **{**PARAMS, **kw})


def test_create_layout_and_xarray(tmp_path):
    s = _create(tmp_path / "s", test_labels=np.arange(5) % 2, train_labels=np.linspace(0, 1, 7),
                train_index=np.arange(7) + 100, self_influence=True)
    assert s.shape == (5, 7) and s.chunks == (2, 3) and s.grid == (3, 3) and s.n_tiles == 9
    assert s.influences.dtype == np.float32 and np.isnan(s.influences.fill_value)
    assert s.influences.metadata.dimension_names == ("test", "train")
    assert s.done_tiles() == set() and not s.is_complete
    ds = xr.open_zarr(tmp_path / "s")
    assert ds["influences"].dims == ("test", "train")
    assert set(ds.coords) == {"test", "train", "test_label", "train_label"}
    np.testing.assert_array_equal(ds["train"].values, np.arange(7) + 100)
    np.testing.assert_array_equal(ds["test_label"].values, np.arange(5) % 2)
    assert ds["test_label"].dtype == np.int64 and ds["train_label"].dtype == np.float64
    assert np.isnan(ds["influences"].values).all()  # nothing written yet: NaN, not 0
    meta = ds.attrs["dvl_ooc"]
    for k in ("format", "kind", "version", "method", "config", "fingerprint", "n_test",
              "n_train", "chunks", "dtype", "created", "data_fingerprint"):
        assert k in meta, k
    assert meta["chunks"] == [2, 3] and meta["dtype"] == "float32" and meta["kind"] == "influence"
    assert ds["self_influence"].dims == ("train",)


def test_labels_omitted_when_not_one_scalar_per_sample(tmp_path):
    s = _create(tmp_path / "s", test_labels=np.zeros((5, 3)), train_labels=None)
    assert s.test_labels is None and s.train_labels is None
    ds = xr.open_zarr(tmp_path / "s")
    assert set(ds.coords) == {"test", "train"}


def test_done_tiles_are_chunk_keys_including_zero_tiles(tmp_path):
    s = _create(tmp_path / "s", self_influence=True)
    a = s.influences
    a[0:2, 0:3] = np.zeros((2, 3), np.float32)  # an all-zero tile must still count as done
    a[4:5, 6:7] = np.ones((1, 1), np.float32)  # the ragged corner tile
    (tmp_path / "s" / "influences" / "c" / "1").mkdir(parents=True)
    (tmp_path / "s" / "influences" / "c" / "1" / "tmpabc.partial").write_bytes(b"x")
    s.self_influence[3:6] = np.zeros(3, np.float32)
    assert s.done_tiles() == {(0, 0), (2, 2)}
    assert s.done_self_influence() == {1}
    assert s.tile_slices(2, 2) == (slice(4, 5), slice(6, 7))
    for i in range(3):
        for j in range(3):
            s.influences[s.tile_slices(i, j)] = np.full((len(range(5)[s.tile_slices(i, j)[0]]),
                                                         len(range(7)[s.tile_slices(i, j)[1]])),
                                                        i * 3 + j, np.float32)
    assert len(s.done_tiles()) == 9 and not s.is_complete  # self-influence still missing
    s.self_influence[:] = np.ones(7, np.float32)
    assert s.is_complete
    np.testing.assert_array_equal(s.to_dask().compute()[4], [6, 6, 6, 7, 7, 7, 8])


def test_reopen_matching_parameters_keeps_data(tmp_path):
    s = _create(tmp_path / "s")
    s.influences[0:2, 0:3] = np.arange(6, dtype=np.float32).reshape(2, 3)
    again = _create(tmp_path / "s")
    assert again.done_tiles() == {(0, 0)}
    np.testing.assert_array_equal(again.influences[0:2, 0:3], np.arange(6).reshape(2, 3))
    # asking for self-influence later adds the array without touching the tiles
    with_self = _create(tmp_path / "s", self_influence=True)
    assert with_self.self_influence is not None and with_self.done_tiles() == {(0, 0)}


@pytest.mark.parametrize("change,field", [
    (dict(config={"method": "DirectInfluence", "regularization": {"model": 0.2}}), "config"),
    (dict(method="CgInfluence"), "method"),
    (dict(fingerprint="e" * 32), "fingerprint"),
    (dict(n_train=8), "n_train"),
    (dict(train_chunk=4), "chunks"),
    (dict(dtype="float64"), "dtype"),
    (dict(data_fingerprint="x"), "data_fingerprint"),
    (dict(test_index=np.arange(5) + 1), "test_index"),
])
def test_mismatch_refused_unless_mode_w(tmp_path, change, field):
    s = _create(tmp_path / "s")
    s.influences[0:2, 0:3] = np.ones((2, 3), np.float32)
    with pytest.raises(StoreMismatchError, match=field) as e:
        _create(tmp_path / "s", **change)
    assert "mode='w'" in str(e.value)
    kept = InfluenceStore.open(tmp_path / "s")
    assert kept.done_tiles() == {(0, 0)} and kept.attrs["method"] == "DirectInfluence"
    new = _create(tmp_path / "s", mode="w", **change)
    assert new.done_tiles() == set()


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFoundError):
        InfluenceStore.open(tmp_path / "missing")
    g = zarr.open_group(str(tmp_path / "g"), mode="w")
    g.create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(StoreNotFoundError, match="not a dvl_ooc influence store"):
        InfluenceStore.open(tmp_path / "g")
    with pytest.raises(StoreMismatchError, match="not a dvl_ooc influence store"):
        _create(tmp_path / "g")
    assert "x" in zarr.open_group(str(tmp_path / "g"), mode="r")  # untouched


def test_bad_parameters_and_paths(tmp_path):
    with pytest.raises(StoreError, match="test_chunk"):
        _create(tmp_path / "a", test_chunk=0)
    with pytest.raises(StoreError, match="floating point"):
        _create(tmp_path / "b", dtype="int32")
    with pytest.raises(StoreError, match="train_index"):
        _create(tmp_path / "c", train_index=np.arange(3))
    with pytest.raises(StoreError, match="unknown compressor"):
        _create(tmp_path / "d", compressor="snappy9")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="cannot write a store"):
        _create(f / "s")


@pytest.mark.parametrize("compressor", [None, "lz4", "zstd"])
def test_compressors_roundtrip(tmp_path, compressor):
    s = _create(tmp_path / "s", compressor=compressor)
    v = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    s.influences[:] = v
    np.testing.assert_array_equal(InfluenceStore.open(tmp_path / "s").influences[:], v)
    assert len(s.done_tiles()) == 9


def test_write_modes(tmp_path):
    """"a" creates or resumes, "w-" creates only, "w" replaces; a directory that is not a
    Zarr store is never touched in any mode."""
    p = tmp_path / "s"
    s = _create(p, mode="w-")
    s.influences[0:2, 0:3] = np.ones((2, 3), np.float32)
    with pytest.raises(StoreExistsError, match="mode='w-'"):
        _create(p, mode="w-")
    with pytest.raises(StoreExistsError):  # whatever the parameters
        _create(p, mode="w-", n_train=8)
    assert _create(p, mode="a").done_tiles() == {(0, 0)}  # resumed, data kept
    assert _create(p).done_tiles() == {(0, 0)}  # "a" is the default
    assert _create(p, mode="w").done_tiles() == set()  # replaced
    assert _create(tmp_path / "new", mode="w").done_tiles() == set()  # "w" also creates
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _create(empty, mode="w-").shape == (5, 7)  # an empty directory is no store
    g = zarr.open_group(str(tmp_path / "g"), mode="w")  # a Zarr store, not ours
    g.create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(StoreExistsError):
        _create(tmp_path / "g", mode="w-")
    assert _create(tmp_path / "g", mode="w").shape == (5, 7)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for mode in ("a", "w-", "w"):
        with pytest.raises(StoreError, match="not a Zarr store"):
            _create(foreign, mode=mode)
    assert [f.name for f in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="mode must be"):
        _create(tmp_path / "x", mode="r+")
    with pytest.raises(TypeError, match="unexpected keyword"):
        _create(tmp_path / "x", overwrites=True)


def test_overwrite_is_deprecated(tmp_path):
    s = _create(tmp_path / "s")
    s.influences[0:2, 0:3] = np.ones((2, 3), np.float32)
    with pytest.warns(DeprecationWarning, match="overwrite= is deprecated, use mode='w'"):
        assert _create(tmp_path / "s", overwrite=False).done_tiles() == {(0, 0)}  # mode "a"
    with pytest.warns(DeprecationWarning, match="overwrite= is deprecated"):
        assert _create(tmp_path / "s", overwrite=True).done_tiles() == set()  # mode "w"
