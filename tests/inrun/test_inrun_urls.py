"""The In-Run score store anywhere: an ``s3://`` URL with ``storage_options=`` on a real S3
server (moto), and Zarr store objects; the same scores as in memory, resume with mode='a',
refusals and the clear error of an unreachable store."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from dvl_ooc.exceptions import (
    InputError,
    StoreExistsError,
    StoreMismatchError,
    StoreUnavailableError,
)
from dvl_ooc.inrun import InRunShapley, ScoreStore

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from s3_server import s3_server  # noqa: E402

N, N_VAL = 12, 3


@pytest.fixture(scope="module")
def s3():
    with s3_server() as srv:
        yield srv


def _train(store, *, mode="w-", steps=3, **kw) -> InRunShapley:
    """A few SGD steps of a linear classifier on fixed random data, scores into ``store``."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    xv = torch.randn(N_VAL, 5, generator=g, dtype=torch.float64)
    yv = torch.randint(0, 3, (N_VAL,), generator=g)
    tr = InRunShapley(model, F.cross_entropy, xv, yv, n_train=N, store=store, mode=mode,
                      per_validation_point=True, flush_every=2,
                      chunk_bytes=4 * 8 * N_VAL, **kw)  # 4 rows per chunk: 3 chunks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        idx = np.arange(s * 4, s * 4 + 4) % N
        opt.zero_grad()
        tr.step(x[idx], y[idx], idx, lr=0.1)
        opt.step()
    tr.close()
    return tr


def test_scores_on_s3_equal_memory_and_resume(s3):
    so, url = s3.storage_options, s3.url("scores.zarr")
    mem = _train(None).values
    assert np.abs(mem).sum() > 0
    tr = _train(url, storage_options=so)
    assert tr.store.path == url and url in repr(tr)
    assert np.array_equal(tr.values, mem)
    assert np.array_equal(ScoreStore.open(url, storage_options=so), mem)
    keys = s3.fs().find(f"{s3.bucket}/scores.zarr/c")
    assert len(keys) == 3  # the chunks are objects on the server
    # resume: keep accumulating into the same URL
    again = _train(url, mode="a", storage_options=so)
    assert again.steps == 6
    np.testing.assert_allclose(ScoreStore.open(url, storage_options=so), 2 * mem, rtol=1e-12)
    with pytest.raises(StoreExistsError, match="mode='a'"):
        _train(url, storage_options=so)
    with pytest.raises(StoreMismatchError):
        ScoreStore(N + 1, N_VAL, url, mode="a", storage_options=so)
    with pytest.raises(InputError, match="storage_options"):
        ScoreStore(N, N_VAL, None, storage_options=so)


def test_unreachable_score_store_is_a_clear_error(s3):
    so = {**s3.storage_options, "endpoint_url": "http://127.0.0.1:9",  # nothing listens
          "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                            "connect_timeout": 1}}
    with pytest.raises(StoreUnavailableError, match="unreachable.*try again") as err:
        ScoreStore.open(s3.url("scores.zarr"), storage_options=so)
    assert "mode='a'" not in str(err.value)  # a read has nothing to resume


def test_zarr_store_objects(tmp_path):
    mem = _train(None).values
    for target in (zarr.storage.MemoryStore(), zarr.storage.LocalStore(tmp_path / "ls.zarr")):
        tr = _train(target)
        assert np.array_equal(tr.values, mem)
        assert np.array_equal(ScoreStore.open(target), mem)
    assert (tmp_path / "ls.zarr" / "zarr.json").is_file()
