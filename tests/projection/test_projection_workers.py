"""Projection determinism across worker processes and runs, on the project's ResNet18.

The projected features of the same samples must be bitwise identical wherever they are
computed, since a store mixes tiles from many workers and resumed runs:

* (a) in this process;
* (b) in a spawned worker process (``ProcessPoolExecutor``; spawn is the start method of
  Dask's ``LocalCluster``) that receives the pickled projector (data-free, no matrices: the
  worker regenerates them from the seed);
* (c) in that fresh interpreter (another run: its own hash seed, its own global torch seed)
  rebuilding network, data and projector from seeds alone.

Another projection seed gives other matrices and other features. All processes use one torch
thread (as this suite does), so that the arithmetic, not only the matrices, is the same.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from dvl_ooc.demo.resnet import ResNet18
from dvl_ooc.layers import GradientProjector

SEED, OTHER = 7, 8


def build(seed: int) -> tuple[GradientProjector, torch.Tensor, torch.Tensor]:
    """Network, 8 samples and projector, from seeds only (importable by the worker)."""
    model = ResNet18(n_classes=2, width=2, stem="cifar", seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 2, (8,), generator=g)
    proj = GradientProjector(model, k_in=4, k_out=3, dense_dim=24, seed=seed,
                             loss=F.cross_entropy, micro_batch_size=5)
    return proj, x, y


def _matrices(proj: GradientProjector) -> dict[str, list[bytes]]:
    return {b.name: [m.numpy().tobytes() for m in proj.matrices(b)] for b in proj.layout()}


def _in_worker(blob: bytes) -> dict:
    """Runs in the spawned worker: the shipped projector, one rebuilt there from seeds, and
    one with the other seed."""
    torch.set_num_threads(1)
    torch.manual_seed(12345)  # the global stream must not matter
    proj, x, y = pickle.loads(blob)
    assert proj._cache == {}  # no matrices travelled
    shipped = proj.project(x, y).numpy()
    own, _, _ = build(SEED)
    return {"pid": os.getpid(), "shipped": shipped, "own": own.project(x, y).numpy(),
            "other": build(OTHER)[0].project(x, y).numpy(), "matrices": _matrices(proj)}


def test_features_are_bitwise_identical_across_processes_and_runs(monkeypatch):
    # (a) here
    proj, x, y = build(SEED)
    blob = pickle.dumps((proj, x, y))  # before any matrix exists, as a scheduler ships it
    here = proj.project(x, y)
    assert here.shape == (8, proj.feature_dim) and proj.feature_dim > 100
    assert len(proj.layout()) == 22  # 20 convs + head + the dense BatchNorm block
    assert torch.equal(build(SEED)[0].project(x, y), here)  # another instance
    other = build(OTHER)[0]
    other_feats = other.project(x, y)
    assert not torch.allclose(other_feats, here, rtol=0.1, atol=0)
    mats, other_mats = _matrices(proj), _matrices(other)
    # every block has a side that is not capped (capped sides are the identity)
    assert all(any(a != b for a, b in zip(mats[n], other_mats[n])) for n in mats)
    # (b) + (c): a spawned interpreter with another hash seed and another global torch seed
    monkeypatch.setenv("PYTHONHASHSEED", "123")
    with cf.ProcessPoolExecutor(max_workers=1,
                                mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(_in_worker, blob).result(timeout=300)
    assert got["pid"] != os.getpid()
    want = here.numpy().tobytes()
    assert got["shipped"].tobytes() == want  # the pickled projector
    assert got["own"].tobytes() == want  # rebuilt from seeds in the other process
    assert got["matrices"] == mats
    assert got["other"].tobytes() == other_feats.numpy().tobytes()
    assert not np.array_equal(got["other"], got["shipped"])
