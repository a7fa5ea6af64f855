"""Suspicious training images of a class-per-subfolder image folder, end to end, out of core.

The recipe behind ``dvl-ooc images ROOT --out OUT`` (:func:`run_images`). Stages, each with
its own progress bar, each resumable (rerunning the same command after an interruption
continues where it stopped; nothing finished is recomputed):

1. **scan**: list ``ROOT/<class>/<image>`` (:class:`~dvl_ooc.data.ImageFolder`, >= 2 classes),
   check every file header (all bad files are reported at once, before any long stage), and
   split the images into train/test, stratified by class and seeded (``OUT/split.json``).
   ``flip_train`` flips that fraction of the training labels on purpose (seeded, recorded):
   a known ground truth that shows how well the recipe finds wrong labels on *your* data.
2. **decode**: Dask workers read and resize the image files themselves (nothing decoded goes
   through the scheduler) and write them as float16 ``(n, C, size, size)`` arrays in
   ``OUT/data.zarr`` (train and test, chunked by ``decode_chunk`` images). Every later pass
   (training epochs, curvature fit, gradient features) reads this cache chunk by chunk.
3. **train** the project's :class:`~dvl_ooc.demo.resnet.ResNet18` (BatchNorm, residual
   blocks; ``width`` sets its size: 16 ~ 0.7 M, 20 ~ 1.1 M, 64 ~ 11 M parameters) on the
   training split, or load ``checkpoint`` (a state dict of that network, or any pickled
   ``torch.nn.Module``, e.g. a torchvision model, expecting ``[0, 1]`` inputs unless
   ``mean``/``std`` are given) -> ``OUT/model.pt``. With ``ensemble=M > 1`` (not with a
   checkpoint) ``M`` networks are trained, network ``m`` with seed ``seed + m`` (its
   initialisation and data order): network 0 is the one of ``M = 1`` (``OUT/model.pt``, with
   the training losses and In-Run values), the others go to ``OUT/member_<m>.pt``; every
   finished network is recorded in ``OUT/job.json``, so a rerun after an interruption trains
   only the missing ones. Accuracies, predictions and the recommended score stay network 0's.
4. **fit** the influence model on the training split (or its first ``fit_samples`` points:
   the split order is random). ``method="auto"`` (default, :func:`choose_method`):
   :class:`~dvl_ooc.EkfacInfluence` on the supported layers with rank-``rank`` test factors
   when its matrix is cheap (``n_test x n_train x p <=`` :data:`AUTO_MAX_MACS`, test factors
   ``<=`` :data:`AUTO_MAX_TEST_BYTES`), else ``"direct"``: :class:`~dvl_ooc.DirectInfluence`
   on per-layer Kronecker-projected gradients of dimension k (see
   :class:`~dvl_ooc.GradientProjector`); ``"arnoldi"`` and ``"nystroem"`` on the same
   features. The damping is relative to the fitted spectrum of every curvature block ``b``:
   ``lambda_b = damping x`` its mean (``damping_of="mean"``) or largest (``"top"``)
   eigenvalue; damping and blocks default to the method's recommendation,
   :data:`RECOMMENDED` (chosen by the LDS benchmark: EK-FAC and Direct with per-layer blocks
   at 0.1 x mean, Arnoldi/Nystroem one block at 1e-3 x largest); EK-FAC's curvature
   ``fisher="auto"`` is the exact Gauss-Newton factorisation up to
   :data:`AUTO_GGN_MAX_CLASSES` classes, labels sampled from the model above ->
   ``OUT/influence.pt``.
   With ``ensemble=M > 1`` one influence model per network (same method and options,
   damping relative to its own spectrum), stored together as the state of
   :class:`~dvl_ooc.influence.Ensemble`: the matrix is the mean of the ``M`` members'
   influences (one store; its fingerprint is the ensemble's).
5. **matrix**: the full ``test x train`` influence matrix with the Dask calculator into the
   resumable Zarr store ``OUT/influences.zarr`` (with self-influence; the store names every
   image file: coordinates ``test_name`` / ``train_name``).
6. **query** (chunked, exact): every training image's 25th percentile of influence over the
   test images of its own label, and its self-influence.
7. **report**: ``OUT/suspects.csv`` (every training image, most suspicious first by the
   recommended wrong-label score, :func:`dvl_ooc.query.mislabel_score`: the image's training
   loss averaged over up to 5 evenly spaced epochs of training, recorded while training into
   ``OUT/checkpoint_losses.npy``; with a ``--checkpoint`` model, which has no training run
   here, its self-influence. Columns: rank, file, label, recommended score, same-label 25th
   percentile, self-influence, flipped), ``report.txt`` / ``report.json`` (stage times, peak
   memory of the client and of every worker, detection rates of the three rankings when flips
   are known: injected ones, or ``ROOT/flipped.csv`` of a generated folder), and the pictures
   ``suspects.png`` (image grid) and ``score_histogram.png``. The same-label percentile is not
   the detector (README, "Which recipe finds wrong labels?"); it stays in the store for the
   question it answers: which training images hurt the test images of their class.
8. **explain** (:mod:`dvl_ooc.recipes.explain`): ``OUT/test_predictions.csv`` (every test image
   with the final model's prediction and its margin ``p_(1) - p_(2)`` between the two largest
   softmax probabilities, most uncertain first) and, for the ``explain_n`` (default 8) most
   uncertain test images or the files named in ``explain``, a picture each in
   ``OUT/explanations/`` (the test image with its file, label and prediction above its
   ``explain_k`` most helpful and most harmful training images with files, given labels and
   influences, from the stored matrix), indexed under ``"explanations"`` in ``report.json``.
   ``dvl-ooc explain OUT TEST_FILE`` draws any other test image's from the finished folder.

Memory: the client holds the labels, file names, the fitted state and one batch; training
holds the float16 training cache (``n_train * C * size^2 * 2`` bytes: 0.54 GB for 22k images
at 64 px); workers hold one chunk of images, gradients and features (bounded by the
calculator, see :mod:`dvl_ooc.calculator.plan`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import InputError, StoreMismatchError

__all__ = ["METHODS", "ImagesJob", "run_images"]

#: influence methods of the recipe (the iterative CG / LiSSA solve per test point and are
#: left to the Python API at this scale)
METHODS = ("auto", "ekfac", "direct", "arnoldi", "nystroem")
_STATE = "job.json"


@dataclass
class ImagesJob:
    """Options of :func:`run_images` (all recorded in ``OUT/job.json``; a rerun with other
    options that change a finished stage is refused unless ``restart=True``)."""

    root: str
    out: str
    size: int = 64
    test_fraction: float = 0.2
    flip_train: float = 0.0
    seed: int = 0
    # model
    width: int = 16
    stem: str = "imagenet"
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 64
    checkpoint: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    # influence
    method: str = "auto"
    k: int = 16
    dense_dim: int = 64
    rank: int = 64
    #: lambda relative to the fitted spectrum: ``damping x`` the ``damping_of`` eigenvalue
    #: (``"top"``: largest, the default with an explicit ``damping``; ``"mean"``) of each
    #: curvature block; ``damping=None``: the method's recommended value (:data:`DAMPING`)
    damping: float | None = None
    damping_of: str | None = None
    #: curvature blocks (``"model"``: one block; ``"layer"``: one per layer; ``None``: the
    #: method's recommendation, :data:`RECOMMENDED`; EK-FAC's blocks are always its layers)
    blocks: str | None = None
    layers: Sequence[str] | None = None
    #: EK-FAC's curvature: ``"ggn"`` (exact Gauss-Newton factors: ``classes - 1`` backward
    #: passes per image), ``"sampled"`` (one label drawn from the model per image, one pass) or
    #: ``"auto"``: ggn up to :data:`AUTO_GGN_MAX_CLASSES` classes, else sampled
    fisher: str = "auto"
    fit_samples: int | None = None
    micro_batch_size: int = 32
    # execution
    workers: int = 2
    cluster: str = "local"
    test_chunk: int | None = None
    train_chunk: int | None = None
    memory_limit: str = "4GiB"
    #: bound on the test features one column task holds (``max_test_feature_bytes`` of the
    #: calculator, e.g. ``"16GiB"``; ``None``: its default, 1 GiB). Larger bounds mean fewer
    #: test groups, so fewer passes over the training set (EK-FAC's ImageNet plan: 249 h at
    #: 1 GiB, 58 h at 16 GiB); each task still fits half a worker's memory
    test_feature_budget: str | None = None
    decode_chunk: int = 256
    progress: bool = True
    restart: bool = False
    pictures: bool = True
    inrun: bool = False
    #: independently trained networks (seeds seed, seed + 1, ...) whose influences are averaged
    ensemble: int = 1
    # explanations (pictures of the most helpful / harmful training images per test image)
    explain_n: int = 8
    explain_k: int = 8
    explain: Sequence[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.test_fraction < 1:
            raise InputError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.flip_train < 0.5:
            raise InputError(f"flip_train must be in [0, 0.5), got {self.flip_train}")
        for name in ("size", "width", "epochs", "batch_size", "k", "dense_dim", "rank",
                     "micro_batch_size", "workers", "ensemble", "test_chunk", "train_chunk",
                     "decode_chunk"):
            v = getattr(self, name)
            if v is None and name in ("test_chunk", "train_chunk"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs"
                                                                      else 1):
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if self.damping is not None and (isinstance(self.damping, bool)
                                         or not self.damping > 0):
            raise InputError(f"damping must be > 0 (relative to the fitted spectrum), got "
                             f"{self.damping}")
        if self.blocks not in (None, "model", "layer"):
            raise InputError(f"blocks must be 'model' or 'layer', got {self.blocks!r}")
        if self.test_feature_budget is not None:
            try:
                ok = _calculator_options(self)["max_test_feature_bytes"] > 0
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise InputError(f"test_feature_budget must be a positive size such as '16GiB', "
                                 f"got {self.test_feature_budget!r}")
        if self.fisher not in ("auto", "ggn", "sampled"):
            raise InputError(f"fisher must be 'auto', 'ggn' or 'sampled', got {self.fisher!r}")
        if self.damping_of not in (None, "top", "mean"):
            raise InputError(f"damping_of must be 'top' (largest eigenvalue) or 'mean' (mean "
                             f"eigenvalue), got {self.damping_of!r}")
        if self.fit_samples is not None and self.fit_samples < 2:
            raise InputError(f"fit_samples must be >= 2, got {self.fit_samples}")
        if self.stem not in ("cifar", "imagenet"):
            raise InputError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise InputError(f"checkpoint {self.checkpoint!r} is not a file")
        if (self.mean is None) != (self.std is None):
            raise InputError("pass both mean and std, or neither")
        if self.inrun and self.checkpoint is not None:
            raise InputError("--inrun values the training run of the recipe's own network; a "
                             "--checkpoint model is not trained here: drop one of the two")
        if self.ensemble > 1 and self.checkpoint is not None:
            raise InputError(f"--ensemble {self.ensemble} trains {self.ensemble} networks from "
                             "seeds; a --checkpoint model is one network that is not trained "
                             "here: drop --checkpoint or use --ensemble 1 (for an ensemble of "
                             "your own networks use dvl_ooc.influence.Ensemble in Python)")
        for name, low in (("explain_n", 0), ("explain_k", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name} must be an integer >= {low}, got {v!r}")


# ------------------------------------------------------------------------------- state file
def _key(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    """``OUT/job.json``: per stage the key of the options it depends on and its results."""

    def __init__(self, out: Path, restart: bool) -> None:
        self.path = out / _STATE
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.exists() and not restart:
            self.data = json.loads(self.path.read_text())

    def done(self, stage: str, key: str) -> dict[str, Any] | None:
        s = self.data["stages"].get(stage)
        if s is None:
            return None
        if s.get("key") != key:
            raise StoreMismatchError(
                f"{self.path.parent} holds a {stage!r} stage made with other options; rerun "
                "with the same options to resume, --restart to recompute everything, or "
                "choose another --out folder (to try another method on the same network: "
                f"--checkpoint {self.path.parent / 'model.pt'} --out OTHER)")
        return s

    def finish(self, stage: str, key: str, **result: Any) -> dict[str, Any]:
        self.data["stages"][stage] = {"key": key, **result}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)
        return self.data["stages"][stage]

    def drop_after(self, stage: str, order: Sequence[str]) -> None:
        for s in order[order.index(stage) + 1:]:
            self.data["stages"].pop(s, None)


_ORDER = ("split", "decode", "train", "fit", "matrix")

#: recommended settings per method, ``(damping factor, of, blocks)``, chosen by the LDS
#: benchmark (``benchmarks/bench_lds.py``, malaria-layout ResNet; README "Answers you can
#: check"): EK-FAC at 0.1 x the mean eigenvalue of each layer (kronfluence's heuristic) matched
#: kronfluence's LDS (at 1e-3 x the largest eigenvalue: 0.8x of it); projected Direct with
#: per-layer blocks at 0.1 x mean scored 1.6x the whole-network block at 1e-3 x top, in less
#: time and memory; Arnoldi and Nystroem keep one block at 1e-3 x top
RECOMMENDED: dict[str, tuple[float, str, str]] = {
    "ekfac": (0.1, "mean", "layer"), "direct": (0.1, "mean", "layer"),
    "arnoldi": (1e-3, "top", "model"), "nystroem": (1e-3, "top", "model")}

#: ``method="auto"`` uses EK-FAC when its matrix costs at most this many multiply-adds
#: (``n_test x n_train x p``; ~20 minutes on two CPU cores at the measured 1.5e10/s) ...
AUTO_MAX_MACS = 2e13
#: ... and its test factors (``n_test x k_test`` float32) at most this many bytes (4 test
#: groups of the calculator's default 1 GiB bound: every training gradient computed <= 4
#: times); otherwise projected Direct, whose cost hardly grows with the network's width
AUTO_MAX_TEST_BYTES = 4 << 30


#: ``fisher="auto"``: EK-FAC's exact Gauss-Newton factors (``classes - 1`` backward passes per
#: image in the fit) up to this many classes, labels sampled from the model (one pass) above.
#: LDS (``benchmarks/bench_lds.py``): 2 classes (malaria ResNet) 0.171 ggn vs 0.170 sampled;
#: 10 classes: digits MLP 0.693 ggn vs 0.673 sampled at 3.4x the fit time (4.1 s vs 1.2 s),
#: digits CNN 0.326 vs 0.323 at 2.6x
AUTO_GGN_MAX_CLASSES = 16


def resolved_fisher(job: ImagesJob, n_classes: int) -> str:
    """EK-FAC's ``fisher`` for a job on ``n_classes`` classes (see :data:`AUTO_GGN_MAX_CLASSES`)."""
    if job.fisher != "auto":
        return job.fisher
    return "ggn" if n_classes <= AUTO_GGN_MAX_CLASSES else "sampled"


def resolved_damping(job: ImagesJob) -> tuple[float, str]:
    """``(factor, of)`` of the job's damping: its own values, else :data:`RECOMMENDED` (for
    ``method="auto"``: call after :func:`choose_method`)."""
    if job.damping is None:
        factor, of, _ = RECOMMENDED[job.method]
        return factor, job.damping_of or of
    return float(job.damping), job.damping_of or "top"  # an explicit factor: of the largest


def resolved_blocks(job: ImagesJob) -> str:
    """The job's curvature blocks: its own, else the method's recommendation."""
    return job.blocks or RECOMMENDED[job.method][2]


def choose_method(job: ImagesJob, model: Any, n_test: int, n_train: int
                  ) -> tuple[str, dict[str, float]]:
    """The method of ``method="auto"`` (an explicit method is returned as it is): EK-FAC
    (the best LDS at the benchmark's scale) when the matrix stays cheap, ``n_test x n_train x
    p <=`` :data:`AUTO_MAX_MACS` multiply-adds with test factors of at most
    :data:`AUTO_MAX_TEST_BYTES`; otherwise projected Direct. Depends only on the network and
    the split sizes, so a resumed job chooses the same. Returns the method and its numbers."""
    if job.method != "auto":
        return job.method, {}
    import torch.nn.functional as F

    from ..influence import EkfacInfluence

    ek = EkfacInfluence(model, F.cross_entropy, rank=job.rank,
                        layers=job.layers if job.layers is not None else "supported")
    k_test = ek.feature_dims()[0]
    why = {"macs": float(n_test) * n_train * ek.grads.num_params,
           "test_bytes": 4.0 * n_test * k_test}
    ok = why["macs"] <= AUTO_MAX_MACS and why["test_bytes"] <= AUTO_MAX_TEST_BYTES
    return ("ekfac" if ok else "direct"), why


def _stage_keys(job: ImagesJob, files_key: str, n_classes: int) -> dict[str, str]:
    """The key of every stage: a hash of the options it and the stages before it depend on
    (computable before anything runs, so a changed option is refused up front)."""
    keys = {"split": _key({"files": files_key, "size": job.size,
                           "test_fraction": job.test_fraction, "flip_train": job.flip_train,
                           "seed": job.seed})}
    keys["decode"] = _key({"split": keys["split"], "chunk": job.decode_chunk})
    mkey: dict[str, Any] = {k: getattr(job, k) for k in ("width", "stem", "epochs", "lr",
                                                          "batch_size", "mean", "std", "seed")}
    if job.checkpoint:
        mkey = {"checkpoint": hashlib.sha256(Path(job.checkpoint).read_bytes()).hexdigest(),
                "mean": job.mean, "std": job.std}
    if job.ensemble != 1:  # M = 1 keeps the keys of a single network
        mkey["ensemble"] = job.ensemble
    keys["train"] = _key({"decode": keys["decode"], **mkey})
    keys["inrun"] = _key({"train": keys["train"], "test_per_batch": INRUN_TEST_PER_BATCH})
    fkey: dict[str, Any] = {k: getattr(job, k) for k in (
        "method", "k", "dense_dim", "rank", "layers", "fit_samples", "seed")}
    if job.method == "auto":  # resolved from the network and the split: both in the keys
        fkey.update(damping=job.damping, damping_of=job.damping_of, blocks=job.blocks)
    else:
        factor, of = resolved_damping(job)
        fkey["damping"] = factor
        if of != "top":  # one block at 1e-3 x top keeps the keys of earlier versions
            fkey["damping_of"] = of
        if resolved_blocks(job) != "model":
            fkey["blocks"] = resolved_blocks(job)
    if job.method in ("auto", "ekfac") and resolved_fisher(job, n_classes) != "ggn":
        fkey["fisher"] = resolved_fisher(job, n_classes)  # (ggn keeps the earlier keys)
    keys["fit"] = _key({"train": keys["train"], **fkey})
    return keys


# ------------------------------------------------------------------------------- workers
def _peak_rss() -> int:
    """Peak resident memory of this process (bytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _decode_task(folder: Any, indices: Sequence[int], path: str, name: str, start: int) -> int:
    """Decode ``folder[indices]`` and write them at ``start`` of ``path/name`` (float16)."""
    import zarr

    x = np.stack([folder.load(int(i)) for i in indices]).astype(np.float16)
    arr = zarr.open_array(store=path, path=name, mode="r+")
    arr[start : start + len(x)] = x
    return len(x)


# ------------------------------------------------------------------------------- stages
def _split(ds: Any, job: ImagesJob) -> dict[str, Any]:
    """Stratified, seeded train/test split and the injected label flips."""
    from ..seeding import numpy_rng

    y = np.asarray(ds.targets)
    rng = numpy_rng(job.seed, 11)
    train, test = [], []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(job.test_fraction * len(idx)))
        if n_test < 1 or n_test >= len(idx):
            raise InputError(
                f"class {ds.classes[c]!r} has {len(idx)} images: too few for a "
                f"{job.test_fraction:.0%} test split (each class needs >= 1 train and test)")
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    y_train = y[train_idx].copy()
    flipped = np.zeros(len(train_idx), bool)
    if job.flip_train > 0:
        frng = numpy_rng(job.seed, 12)
        which = frng.choice(len(train_idx), int(round(job.flip_train * len(train_idx))),
                            replace=False)
        shift = frng.integers(1, len(ds.classes), size=len(which))
        y_train[which] = (y_train[which] + shift) % len(ds.classes)
        flipped[which] = True
    return {"train": train_idx.tolist(), "test": test_idx.tolist(),
            "y_train": y_train.tolist(), "y_test": y[test_idx].tolist(),
            "flipped_injected": np.flatnonzero(flipped).tolist()}


def _known_flips(root: Path, paths: list[str], train_idx: np.ndarray,
                 injected: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Training points known to carry a wrong label: injected flips, or the files listed in
    ``ROOT/flipped.csv`` (a generated folder's ground truth)."""
    mask = np.zeros(len(train_idx), bool)
    src = []
    if len(injected):
        mask[injected] = True
        src.append("injected flips")
    f = root / "flipped.csv"
    if f.is_file():
        with open(f, newline="") as fh:
            listed = {r["path"] for r in csv.DictReader(fh) if r.get("path")}
        if listed:
            mask |= np.array([paths[i] in listed for i in train_idx])
            src.append("ROOT/flipped.csv")
    return (mask, " + ".join(src)) if src else (None, "")


def _load_checkpoint(job: ImagesJob, n_classes: int, in_channels: int) -> Any:
    import torch
    from torch import nn

    from ..demo.resnet import InputNorm, ResNet18

    blob = torch.load(job.checkpoint, map_location="cpu", weights_only=False)
    if isinstance(blob, nn.Module):
        model = blob
        if job.mean is not None:
            model = nn.Sequential(InputNorm(job.mean, job.std), model)
    else:
        if isinstance(blob, dict) and "state_dict" in blob:
            blob = blob["state_dict"]
        if not isinstance(blob, dict):
            raise InputError(f"checkpoint {job.checkpoint!r} holds a {type(blob).__name__}; "
                             "expected a torch.nn.Module or a state dict of the recipe's ResNet18")
        has_norm = any(k.startswith("norm.") for k in blob)
        model = ResNet18(n_classes, job.width, in_channels, job.stem,
                         mean=[0.0] * in_channels if has_norm else None,
                         std=[1.0] * in_channels if has_norm else None)
        try:
            model.load_state_dict(blob)
        except RuntimeError as e:
            raise InputError(
                f"checkpoint {job.checkpoint!r} does not fit ResNet18(width={job.width}, "
                f"stem={job.stem!r}, {n_classes} classes): {str(e).splitlines()[0]}; pass the "
                "matching --width/--stem, or save the whole module with torch.save(model)"
            ) from e
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, in_channels, job.size, job.size))
    if out.ndim != 2 or out.shape[1] != n_classes:
        raise InputError(f"the checkpoint's model maps a {job.size}x{job.size} image to outputs "
                         f"of shape {tuple(out.shape[1:])}, expected ({n_classes},) logits")
    return model


def _calculator_options(job: ImagesJob) -> dict[str, Any]:
    """Keyword arguments of the recipe's :class:`~dvl_ooc.DaskInfluenceCalculator` (they
    change how the matrix is computed, not its values: no stage key depends on them)."""
    if job.test_feature_budget is None:
        return {}
    from dask.utils import parse_bytes

    return {"max_test_feature_bytes": int(parse_bytes(job.test_feature_budget))}


def _make_influence(job: ImagesJob, model: Any, reg: Any, n_classes: int) -> Any:
    import torch.nn.functional as F

    from .. import influence as inf

    proj = dict(k_in=job.k, k_out=job.k, dense_dim=job.dense_dim, seed=job.seed)
    common = dict(regularization=reg, layers=job.layers, micro_batch_size=job.micro_batch_size)
    if job.method != "ekfac":
        common["blocks"] = resolved_blocks(job)
    if job.method == "direct":
        return inf.DirectInfluence(model, F.cross_entropy, projection=proj, **common)
    if job.method == "arnoldi":
        return inf.ArnoldiInfluence(model, F.cross_entropy, rank=job.rank, seed=job.seed,
                                    projection=proj, **common)
    if job.method == "nystroem":
        return inf.NystroemSketchInfluence(model, F.cross_entropy, rank=job.rank,
                                           seed=job.seed, projection=proj, **common)
    kw = dict(common, layers=job.layers if job.layers is not None else "supported")
    fisher = resolved_fisher(job, n_classes)
    if fisher == "sampled":  # (ggn: no seed, the state of earlier fits)
        kw["seed"] = job.seed
    return inf.EkfacInfluence(model, F.cross_entropy, rank=job.rank, fisher=fisher, **kw)


# ------------------------------------------------------------------------------- the job
def run_images(job: ImagesJob, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the recipe; returns the report (also ``OUT/report.json``)."""
    import torch

    from ..data import ImageFolder
    from ..runtime import format_bytes

    job.check()
    out, root = Path(job.out), Path(job.root)
    out.mkdir(parents=True, exist_ok=True)
    if job.restart:  # asked for: remove this recipe's own outputs (nothing else in OUT)
        import shutil

        for name in ("influences.zarr", "data.zarr"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("model.pt", "influence.pt", "split.json", _STATE):
            (out / name).unlink(missing_ok=True)
        for f in out.glob("member_*.pt"):
            f.unlink()
    state = _State(out, job.restart)
    lines: list[str] = []

    def say(msg: str) -> None:
        lines.append(msg)
        echo(msg)

    times: dict[str, float] = {}
    t_all = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))

    # 1. scan + split -------------------------------------------------------------
    t = time.perf_counter()
    ds = ImageFolder(root, size=job.size)
    paths = ds.paths
    keys = _stage_keys(job, _key({"p": paths, "y": ds.targets.tolist()}), len(ds.classes))
    for stage in _ORDER[:-1]:  # refuse changed options before any work
        state.done(stage, keys[stage])
    key = keys["split"]
    s = state.done("split", key)
    if s is None:
        bad = ds.check(progress=job.progress) if hasattr(ds, "check") else []
        if bad:
            shown = "; ".join(f"{p}: {why}" for p, why in bad[:5])
            raise InputError(f"{len(bad)} unreadable image file(s) under {root}: {shown}"
                             f"{' ...' if len(bad) > 5 else ''}. Remove or fix them and rerun")
        state.drop_after("split", _ORDER)
        (out / "split.json").write_text(json.dumps(_split(ds, job)))
        s = state.finish("split", key)
    split = json.loads((out / "split.json").read_text())
    tr_idx, te_idx = np.asarray(split["train"]), np.asarray(split["test"])
    y_tr, y_te = np.asarray(split["y_train"]), np.asarray(split["y_test"])
    injected = np.asarray(split["flipped_injected"], dtype=np.int64)
    explain_pos = None
    if job.explain:  # test files named for explanations: refused before any long stage
        from .explain import resolve_test_files

        explain_pos = resolve_test_files(job.explain, [paths[i] for i in te_idx],
                                         [paths[i] for i in tr_idx], root=str(root), out=str(out))
    n_tr, n_te, C = len(tr_idx), len(te_idx), len(ds.classes)
    times["scan"] = time.perf_counter() - t
    say(f"dvl-ooc images: {len(paths)} images in {C} classes ({', '.join(ds.classes)}) under "
        f"{root}; {n_tr} train / {n_te} test (stratified, seed {job.seed})"
        + (f"; {len(injected)} training labels flipped on purpose" if len(injected) else ""))

    # cluster (decode + matrix) ---------------------------------------------------------
    client, cluster = _client(job)
    try:
        report = _run_stages(job, state, keys, ds, paths, tr_idx, te_idx, y_tr, y_te,
                             injected, client, say, times)
        report["memory"]["workers_peak_rss"] = {
            a: v for a, v in client.run(_peak_rss).items()}
    finally:
        client.close()
        if cluster is not None:
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                cluster.close()
            finally:
                nanny.setLevel(level)
        torch.set_num_threads(threads)
    # 8. explanations (after the cluster is closed: one streaming top-k pass on threads)
    t = time.perf_counter()
    from .explain import recipe_explanations

    ex = recipe_explanations(out, ds.classes, n=job.explain_n, k=job.explain_k,
                             files=explain_pos, pictures=job.pictures)
    report["explanations"] = ex
    times["explain"] = time.perf_counter() - t
    say(f"  test predictions, most uncertain first: {out / ex['predictions_csv']}")
    if ex["n"]:
        say(f"  explanations of {ex['n']} test images ({ex['selection']}; {ex['k']} most "
            f"helpful / harmful training images each): {out / ex['folder']}  "
            f"[{times['explain']:.1f} s]")
    times["total"] = time.perf_counter() - t_all
    report["seconds"] = {k: round(v, 2) for k, v in times.items()}
    report["memory"]["client_peak_rss"] = _peak_rss()
    w = report["memory"]["workers_peak_rss"]
    say(f"  peak memory: client {format_bytes(report['memory']['client_peak_rss'])}, workers "
        + ", ".join(format_bytes(v) for v in w.values()))
    say(f"  total {times['total']:.1f} s; report in {out / 'report.txt'}")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    return report


def _client(job: ImagesJob) -> tuple[Any, Any]:
    from distributed import Client

    from ..runtime import local_cluster

    if job.cluster in ("local", "cuda"):
        cluster = local_cluster(job.workers, threads_per_worker=1, kind=job.cluster,
                                what="dvl-ooc images", dashboard_address=":0",
                                memory_limit=job.memory_limit)
        return Client(cluster), cluster
    if "://" in job.cluster or ":" in job.cluster:
        return Client(job.cluster), None
    raise InputError(f"cluster must be 'local', 'cuda' or a scheduler address "
                     f"(tcp://host:8786), got {job.cluster!r}")


def _run_stages(job: ImagesJob, state: _State, keys: dict[str, str], ds: Any, paths: list[str],
                tr_idx: np.ndarray,
                te_idx: np.ndarray, y_tr: np.ndarray, y_te: np.ndarray, injected: np.ndarray,
                client: Any, say: Callable[[str], None], times: dict[str, float]
                ) -> dict[str, Any]:
    import torch
    import zarr

    from ..calculator import DaskInfluenceCalculator
    from ..demo.resnet import count_parameters
    from ..influence import Relative
    from ..query import DETECTION_FRACTIONS as FRACTIONS
    from ..query import (
        detection_rates,
        mislabel_score,
        query_quantiles,
        query_self_influence,
        roc_auc,
    )
    from ..runtime import format_bytes, progress
    from ..training import checkpoint_epochs

    out = Path(job.out)
    C, n_tr, n_te = len(ds.classes), len(tr_idx), len(te_idx)
    ch = 1 if ds.grayscale else 3
    data_path = str(out / "data.zarr")
    device = "cuda:0" if job.cluster == "cuda" else None
    # the client trains and fits on a GPU when the job runs on GPU workers and one is visible
    local = "cuda" if job.cluster == "cuda" and torch.cuda.is_available() else "cpu"

    # 2. decode ------------------------------------------------------------------------
    t = time.perf_counter()
    key = keys["decode"]
    if state.done("decode", key) is None:
        state.drop_after("decode", _ORDER)
        g = zarr.open_group(data_path, mode="w", zarr_format=3)
        for name, idx in (("x_train", tr_idx), ("x_test", te_idx)):
            g.create_array(name, shape=(len(idx), ch, job.size, job.size), dtype="float16",
                           chunks=(job.decode_chunk, ch, job.size, job.size))
        fut_folder = client.scatter(ds, broadcast=True)
        futs = [client.submit(_decode_task, fut_folder, idx[s : s + job.decode_chunk].tolist(),
                              data_path, name, s, pure=False)
                for name, idx in (("x_train", tr_idx), ("x_test", te_idx))
                for s in range(0, len(idx), job.decode_chunk)]
        from distributed import as_completed

        with progress(job.progress, total=n_tr + n_te, unit="img", desc="decode") as bar:
            for f in as_completed(futs):
                bar.update(f.result())
        state.finish("decode", key, seconds=time.perf_counter() - t)
    g = zarr.open_group(data_path, mode="r")
    x_tr, x_te = g["x_train"], g["x_test"]
    times["decode"] = time.perf_counter() - t
    rate = (n_tr + n_te) / max(state.data["stages"]["decode"]["seconds"], 1e-9)
    say(f"  decoded {n_tr + n_te} images to {job.size}x{job.size} float16 in {data_path} "
        f"on {len(client.scheduler_info()['workers'])} workers ({rate:.0f} images/s)  "
        f"[{times['decode']:.1f} s]")

    # 3. train -------------------------------------------------------------------------
    t = time.perf_counter()
    key = keys["train"]
    model_file = out / "model.pt"
    losses_file = out / "checkpoint_losses.npy"
    done = state.done("train", key)
    inrun_file = out / "inrun_values.npy"
    tracker = None
    M = job.ensemble
    finished: set[int] = set()
    if done is None:
        state.drop_after("train", _ORDER)
        finished = _members_finished(state, key) if M > 1 else set()
    if done is None and 0 in finished:  # network 0 of an interrupted ensemble run
        model = torch.load(model_file, map_location="cpu", weights_only=False).eval()
    elif done is None:
        losses_file.unlink(missing_ok=True)
        if job.checkpoint:
            model = _load_checkpoint(job, C, ch)
            how = f"loaded {job.checkpoint}"
        else:
            x_np = np.asarray(x_tr[:])
            # every training image's loss at up to 5 evenly spaced epochs (5 were enough
            # in benchmarks/bench_detection.py)
            ckpt_epochs = checkpoint_epochs(job.epochs)
            ckpt_losses: list[np.ndarray] = []

            def record(epoch: int, net: Any) -> None:
                if epoch in ckpt_epochs:
                    ckpt_losses.append(_per_point_losses(net.eval(), x_np, y_tr))

            model, tracker = _train_network(job, C, ch, x_np, y_tr, x_te, y_te, local,
                                            record)
            del x_np
            how = f"trained ResNet18(width={job.width}, stem={job.stem!r}) for {job.epochs} epochs"
            if ckpt_losses:
                _save_atomic_npy(np.stack(ckpt_losses), losses_file)
            if tracker is not None:
                _save_atomic_npy(tracker.values, inrun_file)
        model.eval().cpu()
        _save_atomic(model, model_file)
        if M > 1:
            if tracker is not None:
                state.finish("inrun", keys["inrun"], test_per_step=tracker.val_sample or n_te,
                             seconds=time.perf_counter() - t, while_training=True)
            _member_finished(state, key, 0)
    if done is None:
        if M > 1:
            seeds = [job.seed + m for m in range(M)]
            todo = [m for m in range(1, M) if m not in _members_finished(state, key)]
            x_np = np.asarray(x_tr[:]) if todo else None
            for m in todo:
                _train_member(job, m, C, ch, x_np, y_tr, local, _member_file(out, m))
                _member_finished(state, key, m)
            del x_np
            how = (f"trained an ensemble of {M} networks (seeds {seeds[0]}..{seeds[-1]}), "
                   f"ResNet18(width={job.width}, stem={job.stem!r}) for {job.epochs} epochs "
                   "each")
        acc_tr = _accuracy(model, x_tr, y_tr)
        acc_te = _accuracy(model, x_te, y_te)
        state.data["stages"].pop("train_members", None)  # the finished stage replaces it
        done = state.finish("train", key, how=how, parameters=count_parameters(model),
                            train_accuracy=acc_tr, test_accuracy=acc_te,
                            seconds=time.perf_counter() - t,
                            **({"ensemble": {"networks": M, "seeds": seeds, "files": [
                                _member_file(out, m).name for m in range(M)]}}
                               if M > 1 else {}))
        if tracker is not None and M == 1:
            state.finish("inrun", keys["inrun"], test_per_step=tracker.val_sample or n_te,
                         seconds=done["seconds"], while_training=True)
    model = torch.load(model_file, map_location="cpu", weights_only=False).eval()
    times["train"] = time.perf_counter() - t
    say(f"  {done['how']}{'; network 0' if M > 1 else ''}: {done['parameters']:,} parameters; "
        f"accuracy train {done['train_accuracy']:.3f} (given labels), test "
        f"{done['test_accuracy']:.3f}  "
        f"[{times['train']:.1f} s]")
    if job.inrun:  # In-Run values: recorded while training, or (the network was trained
        # without --inrun) by training it again, which gives the same network
        t = time.perf_counter()
        idone = state.done("inrun", keys["inrun"])
        if idone is None:
            _, tracker = _train_network(job, C, ch, np.asarray(x_tr[:]), y_tr, x_te, y_te,
                                        local, None, inrun=True)
            _save_atomic_npy(tracker.values, inrun_file)
            idone = state.finish("inrun", keys["inrun"],
                                 test_per_step=tracker.val_sample or n_te,
                                 seconds=time.perf_counter() - t, while_training=False)
        times["inrun"] = time.perf_counter() - t
        say(f"  In-Run values of the {n_tr} training images for the sum over the {n_te} test "
            f"images ({idone['test_per_step']} test images per step), "
            + ("recorded while training" if idone["while_training"] else
               f"by training the network again [{times['inrun']:.1f} s]")
            + f" -> {out / 'inrun.csv'}")

    # 4. fit ---------------------------------------------------------------------------
    t = time.perf_counter()
    key = keys["fit"]
    inf_file = out / "influence.pt"
    done = state.done("fit", key)
    auto = job.method == "auto"
    chosen, why = choose_method(job, model, n_te, n_tr)
    job = replace(job, method=chosen)
    if auto:
        say(f"  method auto -> {chosen}: EK-FAC's matrix {why['macs']:.2g} multiply-adds "
            f"(limit {AUTO_MAX_MACS:.0e}), its test factors {format_bytes(why['test_bytes'])} "
            f"(limit {format_bytes(AUTO_MAX_TEST_BYTES)})")
    if chosen == "ekfac":
        say(f"  EK-FAC curvature: fisher={resolved_fisher(job, C)} ({C} classes"
            + (f"; auto: ggn up to {AUTO_GGN_MAX_CLASSES})" if job.fisher == "auto" else ")"))
    factor, of = resolved_damping(job)
    nets = [model] + [torch.load(_member_file(out, i), map_location="cpu",
                                 weights_only=False).eval() for i in range(1, M)]
    if done is None:
        state.drop_after("fit", _ORDER)
        nf = n_tr if job.fit_samples is None else min(job.fit_samples, n_tr)
        fitted, regs = [], []
        for net in nets:  # one influence model per network, damping from its own spectrum
            m = _make_influence(job, net.to(local), Relative(factor, of=of), C)
            m.fit((x_tr if nf == n_tr else _Rows(x_tr, nf), y_tr[:nf]))
            fitted.append(m)
            regs.append(dict(m.regularization))  # resolved per block from the fitted spectrum
        if M == 1:
            blob = {"blocks": fitted[0].state(), "regularization": regs[0]}
        else:
            from ..influence import Ensemble

            blob = {"blocks": Ensemble(fitted).state(), "regularization": regs[0],
                    "members_regularization": regs}
        _save_atomic(blob, inf_file)
        done = state.finish("fit", key, n_fit=nf, method=chosen, regularization=regs[0],
                            **({"members_regularization": regs} if M > 1 else {}),
                            seconds=time.perf_counter() - t)
    blob = torch.load(inf_file, map_location="cpu", weights_only=False)
    # shipped to the workers from the CPU (each moves it to its device once)
    members = [_make_influence(job, net.cpu(), Relative(factor, of=of), C)
               for net in nets]
    if M == 1:
        m = members[0].load_state(blob["blocks"])
    else:
        from ..influence import Ensemble

        m = Ensemble(members).load_state(blob["blocks"])
    times["fit"] = time.perf_counter() - t
    k_test, k_train = m.feature_dims()
    lam = [v for r in done.get("members_regularization", [done["regularization"]])
           for v in r.values()]
    say(f"  fitted {type(m).__name__}"
        + (f" of {M} influence models" if M > 1 else "")
        + f" ({job.method}"
        + (f", {resolved_blocks(job)} blocks" if job.method != "ekfac" else "")
        + f"; features of dimension {k_test}"
        + (f" test / {k_train} train" if k_test != k_train else "")
        + f") on {done['n_fit']} training images; lambda = {factor:g} x {of} eigenvalue "
        f"({min(lam):.3g}..{max(lam):.3g} over {len(lam)} block(s))  [{times['fit']:.1f} s]")

    # 5. matrix ------------------------------------------------------------------------
    t = time.perf_counter()
    store_path = out / "influences.zarr"
    calc = DaskInfluenceCalculator(m, client, device=device, **_calculator_options(job))
    chunks = dict(test_chunk=job.test_chunk, train_chunk=job.train_chunk)
    plan = calc.plan(x_te, y_te, x_tr, y_tr, **chunks, self_influence=True, path=store_path,
                     mode="a")
    for line in plan.summary().splitlines():
        say(f"  plan: {line.strip()}")
    with _quiet("distributed"):
        store = calc.to_zarr(store_path, x_te, y_te, x_tr, y_tr, **chunks, mode="a",
                             self_influence=True, progress=job.progress,
                             test_index=te_idx, train_index=tr_idx,
                             test_names=[paths[i] for i in te_idx],
                             train_names=[paths[i] for i in tr_idx])
    times["matrix"] = time.perf_counter() - t
    nbytes = sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file())
    say(f"  influence matrix {n_te} x {n_tr} (chunks {store.chunks[0]} x {store.chunks[1]}, "
        f"{len(calc.info['columns'])} column tasks this run) -> {store_path} "
        f"({format_bytes(nbytes)})  [{times['matrix']:.1f} s]")

    # 6. query -------------------------------------------------------------------------
    t = time.perf_counter()
    q = query_quantiles(store, 0.25, same_label=True, save="q25_same_label")
    score = np.asarray(q.values, dtype=np.float64).reshape(-1)
    si_ds = query_self_influence(store)
    si = np.empty(n_tr)
    si[si_ds["position"].values] = si_ds["self_influence"].values
    times["query"] = time.perf_counter() - t
    say(f"  scored every training image by the 25th percentile of its influence over "
        f"same-label test images, and its self-influence  [{times['query']:.1f} s]")

    # the recommended wrong-label score (README "Which recipe finds wrong labels?"): the mean
    # training loss over the checkpoints saved while training; without them (a --checkpoint
    # model) the self-influence, which ranks like the final training loss
    if losses_file.is_file():
        ckpt = np.load(losses_file)
        rec = mislabel_score(ckpt)
        rec_name = (f"mean training loss over {len(ckpt)} checkpoint"
                    f"{'s' if len(ckpt) != 1 else ''}")
    else:
        rec = mislabel_score(self_influence=si)
        rec_name = "self-influence (no training checkpoints: --checkpoint model)"
    order = np.argsort(np.where(np.isfinite(rec), -rec, np.inf), kind="stable")

    # 7. report ------------------------------------------------------------------------
    known, src = _known_flips(Path(job.root), paths, tr_idx, injected)
    train_paths = [paths[i] for i in tr_idx]
    with open(out / "suspects.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "file", "label", "class", "score_recommended",
                    "score_q25_same_label", "self_influence"]
                   + (["known_flipped"] if known is not None else []))
        for r, j in enumerate(order):
            w.writerow([r + 1, train_paths[j], int(y_tr[j]), ds.classes[int(y_tr[j])],
                        f"{rec[j]:.6g}", f"{score[j]:.6g}", f"{si[j]:.6g}"]
                       + ([int(known[j])] if known is not None else []))
    say(f"  most suspicious first (recommended score: {rec_name}): {out / 'suspects.csv'}; "
        "e.g.")
    for j in order[:5]:
        say(f"    {train_paths[j]}  label {ds.classes[int(y_tr[j])]}  score {rec[j]:.3g}")
    iv = i_order = None
    if job.inrun:  # lowest In-Run value first: the images whose steps raised the test loss most
        iv = np.load(out / "inrun_values.npy")
        i_order = np.argsort(np.where(np.isfinite(iv), iv, np.inf), kind="stable")
        _write_inrun_csv(out / "inrun.csv", i_order, iv, train_paths, y_tr, ds.classes, known)
    det = auc = None
    if known is not None:
        nf = int(known.sum())
        q_order = np.argsort(np.where(np.isfinite(score), score, np.inf), kind="stable")
        i_name = "lowest In-Run value (test set)"
        det = {f"recommended: {rec_name}": detection_rates(order, known),
               "lowest same-label 25th percentile": detection_rates(q_order, known),
               "highest self-influence": detection_rates(np.argsort(-si, kind="stable"),
                                                         known),
               **({i_name: detection_rates(i_order, known)} if iv is not None else {}),
               "random (expected)": {f"{round(f * 100)}%": {"recall": f} for f in FRACTIONS}}
        auc = {f"recommended: {rec_name}": roc_auc(known, rec),  # higher = more suspicious
               "lowest same-label 25th percentile": roc_auc(known, -score),
               "highest self-influence": roc_auc(known, si),
               **({i_name: roc_auc(known, -iv)} if iv is not None else {}),
               "random (expected)": 0.5}
        say(f"  known wrong labels ({src}): {nf}; found among the most suspicious:")
        for name, r in det.items():
            say(f"    {name:<36}" + "".join(
                f"  top {k}: {100 * v['recall']:5.1f}%" for k, v in r.items())
                + f"  ROC AUC {auc[name]:.3f}")
    pics = _pictures(out, x_tr, order, rec, rec_name, known, train_paths, y_tr, ds.classes) \
        if job.pictures else []
    if pics:
        say(f"  pictures: {', '.join(str(out / p) for p in pics)}")
    return {
        "root": str(job.root), "out": str(out), "job": asdict(job),
        "classes": ds.classes, "n_train": n_tr, "n_test": n_te,
        "model": state.data["stages"]["train"], "fit": state.data["stages"]["fit"],
        "influence": {"class": type(m).__name__, "config": m.config(),
                      "feature_dims": [k_test, k_train],
                      "method": job.method, "requested": "auto" if auto else job.method,
                      **({"auto": why} if auto else {})},
        "store": str(store_path), "store_bytes": nbytes, "plan": plan.as_dict(),
        "detection": det, "detection_auc": auc, "known_flipped_source": src or None,
        "inrun": None if iv is None else {**state.data["stages"]["inrun"],
                                          "csv": str(out / "inrun.csv")},
        "suspects_csv": str(out / "suspects.csv"), "pictures": pics,
        "memory": {},
    }


def _write_inrun_csv(path: Path, order: np.ndarray, values: np.ndarray, names: list[str],
                     y: np.ndarray, classes: list[str], known: Any) -> None:
    """``OUT/inrun.csv``: every training image with its In-Run value, lowest (most harmful to
    the test loss) first."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "file", "label", "class", "inrun_value"]
                   + (["known_flipped"] if known is not None else []))
        for r, j in enumerate(order):
            w.writerow([r + 1, names[j], int(y[j]), classes[int(y[j])], f"{values[j]:.6g}"]
                       + ([int(known[j])] if known is not None else []))
    os.replace(tmp, path)


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed into place: an interrupted stage never
    leaves a half-written file that a rerun would load."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_atomic_npy(a: np.ndarray, path: Path) -> None:
    """``np.save`` to a temporary file renamed into place (see :func:`_save_atomic`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, a)
    os.replace(tmp, path)


#: test images per training step of the In-Run test gradient, as a fraction of the batch (1/16:
#: 4 at batch 64). ``benchmarks/bench_inrun.py --resnet`` (one thread, CPU time, 2 epochs):
#: training with the tracker cost 1.9x plain training on 1,600 images and 2.1x on 4,000 with 4
#: test images per step, 2.0x / 2.3x with 8
INRUN_TEST_PER_BATCH = 1 / 16


def inrun_tracker(model: Any, x_test: Any, y_test: Any, n_train: int, *, batch_size: int,
                  seed: int = 0, test_per_batch: float = INRUN_TEST_PER_BATCH) -> Any:
    """The In-Run Data Shapley tracker of ``--inrun`` (:class:`~dvl_ooc.inrun.InRunShapley`,
    BatchNorm in training mode with the batch statistics frozen per sample, see
    :mod:`dvl_ooc.inrun.batchnorm`): every training image's value for the **whole test set**,
    ``phi_i = sum_t (lr_t / b) <g_i(w_t), sum_j grad l_j(w_t)>`` summed over the steps ``t``
    that saw image ``i`` and over all test images ``j`` (eval mode), positive = lowered the test
    loss. ``g_i`` is the plain gradient (the SGD direction at the step's learning rate; the
    recipe trains with AdamW). The summed test gradient is estimated at each step from
    ``test_per_batch * batch_size`` test images (all of them when there are fewer), a seeded
    rotation through the test set scaled up to all of it (``val_sample``): unbiased, exact with
    a small test set, at a small part of a training step instead of the ``n_test / batch_size``
    steps of the whole test set."""
    import torch
    import torch.nn.functional as F

    from ..inrun import InRunShapley

    p = next(model.parameters())
    k = max(1, round(batch_size * test_per_batch))
    return InRunShapley(model, F.cross_entropy,
                        torch.as_tensor(np.asarray(x_test), dtype=p.dtype, device=p.device),
                        torch.as_tensor(np.asarray(y_test), device=p.device).long(),
                        n_train=n_train, val_sample=k, seed=seed)


def _train_network(job: ImagesJob, n_classes: int, channels: int, x: np.ndarray, y: np.ndarray,
                   x_test: Any, y_test: np.ndarray, device: str,
                   on_epoch_end: Callable[[int, Any], None] | None, *,
                   inrun: bool | None = None) -> tuple[Any, Any]:
    """Train the recipe's ResNet18 on ``(x, y)``; with In-Run (``inrun``, default
    ``job.inrun``) also the :func:`inrun_tracker` that valued every image while it trained
    (training is the same with or without it)."""
    from ..demo.resnet import ResNet18, channel_stats, train_resnet

    mean, std = (job.mean, job.std) if job.mean is not None else \
        channel_stats((x, y), background=None)
    model = ResNet18(n_classes, job.width, channels, job.stem, mean=mean, std=std,
                     seed=job.seed).to(device)
    tracker = None
    if job.inrun if inrun is None else inrun:
        tracker = inrun_tracker(model, x_test[:], y_test, len(x), batch_size=job.batch_size,
                                seed=job.seed)
    train_resnet(model, (x, y), epochs=job.epochs, lr=job.lr, batch_size=job.batch_size,
                 seed=job.seed, progress=job.progress, on_epoch_end=on_epoch_end,
                 backward=None if tracker is None else tracker.step)
    return model, tracker


def _member_file(out: Path, m: int) -> Path:
    """The network of ensemble member ``m``: ``OUT/model.pt`` (``m = 0``), else
    ``OUT/member_<m>.pt``."""
    return out / ("model.pt" if m == 0 else f"member_{m}.pt")


def _members_finished(state: _State, key: str) -> set[int]:
    """Ensemble members whose networks were trained and saved under the train stage's ``key``
    (``job.json``'s ``train_members``; a record of other options is ignored)."""
    rec = state.data["stages"].get("train_members")
    return set(rec["done"]) if rec is not None and rec.get("key") == key else set()


def _member_finished(state: _State, key: str, m: int) -> None:
    """Record member ``m``'s network as saved (after its file was written atomically)."""
    state.finish("train_members", key, done=sorted(_members_finished(state, key) | {m}))


def _train_member(job: ImagesJob, m: int, n_classes: int, channels: int, x: np.ndarray,
                  y: np.ndarray, device: str, path: Path) -> None:
    """Train ensemble member ``m >= 1``: the recipe's network with seed ``job.seed + m`` (its
    initialisation and data order; no training losses, no In-Run values), saved atomically
    to ``path`` in eval mode on the CPU."""
    sub = replace(job, seed=job.seed + m, inrun=False)
    model, _ = _train_network(sub, n_classes, channels, x, y, None, y[:0], device, None,
                              inrun=False)
    _save_atomic(model.eval().cpu(), path)


def _per_point_losses(model: Any, x: Any, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of every row of ``(x, y)`` under ``model`` (eval mode), float64."""
    import torch
    import torch.nn.functional as F

    from ..data import iter_batches

    p = next(model.parameters())
    out = []
    with torch.no_grad():
        for xb, yb in iter_batches((x, y), 256, dtype=p.dtype, device=p.device):
            out.append(F.cross_entropy(model(xb), yb.long(), reduction="none").double().cpu())
    return torch.cat(out).numpy()


def _accuracy(model: Any, x: Any, y: np.ndarray) -> float:
    """Accuracy on a lazy array, one batch at a time."""
    import torch

    from ..data import iter_batches

    dtype = next(model.parameters()).dtype
    hit = 0
    with torch.no_grad():
        for xb, yb in iter_batches((x, y), 256, dtype=dtype):
            hit += int((model(xb).argmax(1) == yb).sum())
    return hit / len(y)


class _Rows:
    """The first ``n`` rows of a lazy array (sliced, never read whole)."""

    def __init__(self, a: Any, n: int) -> None:
        self.a, self.n = a, n
        self.shape = (n, *a.shape[1:])
        self.dtype = a.dtype

    def __getitem__(self, sl: slice) -> Any:
        start, stop, _ = sl.indices(self.n)
        return self.a[start:stop]


class _quiet:
    """Silence a logger's warnings (closing clusters logs 'killing worker')."""

    def __init__(self, name: str) -> None:
        self.log = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.log.level
        self.log.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.log.setLevel(self.level)


def _pictures(out: Path, x: Any, order: np.ndarray, score: np.ndarray, score_name: str,
              known: Any, names: list[str], y: np.ndarray, classes: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = np.isfinite(score)
    bins = np.histogram_bin_edges(score[ok], bins=60)
    if known is not None:
        ax.hist(score[ok & ~known], bins=bins, alpha=0.7, label="label believed correct")
        ax.hist(score[ok & known], bins=bins, alpha=0.8, color="C3", label="known wrong label")
    else:
        ax.hist(score[ok], bins=bins, alpha=0.8, label="training images")
    ax.axvline(np.quantile(score[ok], 0.8), color="k", ls="--", lw=1, label="highest 20 %")
    ax.set_xlabel(f"recommended wrong-label score: {score_name}")
    ax.set_ylabel("training images")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "score_histogram.png", dpi=110)
    plt.close(fig)
    files.append("score_histogram.png")

    top = order[:32]
    imgs = np.asarray(x.get_orthogonal_selection((np.sort(top),))
                      if hasattr(x, "get_orthogonal_selection") else x[np.sort(top)],
                      dtype=np.float32)
    pos = {int(j): i for i, j in enumerate(np.sort(top))}
    fig, axes = plt.subplots(4, 8, figsize=(12, 7.2))
    for ax, j in zip(axes.flat, top):
        im = imgs[pos[int(j)]].transpose(1, 2, 0)
        ax.imshow(np.clip(im[..., 0] if im.shape[2] == 1 else im, 0, 1),
                  cmap="gray" if im.shape[2] == 1 else None)
        bad = known is not None and bool(known[j])
        ax.set_title(f"{Path(names[j]).name}\n{classes[int(y[j])]}", fontsize=6,
                     color="C3" if bad else "k")
        ax.axis("off")
    for ax in list(axes.flat)[len(top):]:
        ax.axis("off")
    fig.suptitle("32 most suspicious training images (highest recommended score); "
                 "title: file, given label" + ("; red = known wrong label" if known is not None
                                               else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "suspects.png", dpi=110)
    plt.close(fig)
    files.append("suspects.png")
    return files
