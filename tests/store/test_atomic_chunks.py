"""Local chunk writes are atomic (zarr >= ``MIN_ZARR_ATOMIC`` = 3.1.3: a temporary file, then
a rename), which "a tile is done iff its chunk exists" relies on: a reader polling the chunk
files while another process rewrites them sees each file absent or whole, never half-written.
The same reader catches an in-place writer (zarr <= 3.1.2's ``open(path, "wb")``), so the
check can fail. Older zarr versions are refused before a local store is written."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from dvl_ooc import store as store_mod
from dvl_ooc.exceptions import StoreError
from dvl_ooc.store import MIN_ZARR_ATOMIC, InfluenceStore

CHUNK = 1 << 15  # float32 values per chunk: 128 KiB files
N_CHUNKS = 6

WRITER = r"""
import sys, time
from pathlib import Path
import numpy as np, zarr
path, how, rounds, chunk, n = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
a = zarr.open_array(path, mode="r+")
(Path(path) / "c").mkdir(exist_ok=True)
for r in range(rounds):
    for k in range(n):
        v = np.full(chunk, r * n + k + 1, dtype="<f4")
        if how == "zarr":  # what the calculator's tasks do: one whole chunk per assignment
            a[k * chunk:(k + 1) * chunk] = v
        else:  # zarr <= 3.1.2's LocalStore: the key itself opened and written in place
            b = v.tobytes()
            with open(Path(path) / "c" / str(k), "wb") as f:
                f.write(b[:len(b) // 2]); f.flush(); time.sleep(0.001); f.write(b[len(b) // 2:])
"""


def _poll_while_written(tmp_path: Path, how: str, rounds: int) -> dict:
    path = tmp_path / f"{how}.zarr"
    zarr.create_array(path, shape=(CHUNK * N_CHUNKS,), chunks=(CHUNK,), dtype="<f4",
                      compressors=None, fill_value=0.0)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), how, str(rounds),
                             str(CHUNK), str(N_CHUNKS)])
    seen = {"reads": 0, "torn": 0}
    try:
        while proc.poll() is None:
            for k in range(N_CHUNKS):
                try:
                    b = (path / "c" / str(k)).read_bytes()
                except FileNotFoundError:
                    continue
                seen["reads"] += 1
                v = np.frombuffer(b, dtype="<f4")
                if len(b) != 4 * CHUNK or not (v == v[0]).all():
                    seen["torn"] += 1
            time.sleep(0.0005)
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    return seen


def test_chunk_files_are_never_seen_half_written(tmp_path):
    seen = _poll_while_written(tmp_path, "zarr", rounds=60)
    assert seen["reads"] > 100
    assert seen["torn"] == 0, seen


def test_the_reader_catches_an_in_place_writer(tmp_path):
    seen = _poll_while_written(tmp_path, "in-place", rounds=15)
    assert seen["torn"] > 0, seen  # the check above can fail


def test_older_zarr_refused_for_local_stores(tmp_path, monkeypatch):
    assert store_mod._version_tuple(zarr.__version__) >= store_mod._version_tuple(
        MIN_ZARR_ATOMIC)
    assert MIN_ZARR_ATOMIC == "3.1.3"
    kw = dict(n_test=2, n_train=2, test_chunk=1, train_chunk=1, method="M", config={},
              fingerprint="f")
    monkeypatch.setattr(zarr, "__version__", "3.1.2")
    with pytest.raises(StoreError, match=r"zarr >= 3\.1\.3 for local stores"):
        InfluenceStore.create(tmp_path / "old.zarr", **kw)
    assert not (tmp_path / "old.zarr" / "zarr.json").exists()
    InfluenceStore.create("memory://atomic-old-zarr.zarr", **kw)  # object stores: whole PUTs
    monkeypatch.setattr(zarr, "__version__", "3.1.3")
    assert InfluenceStore.create(tmp_path / "new.zarr", **kw).shape == (2, 2)
