"""How good are the scores of a ``dvl-ooc images`` run? Its LDS against retraining.

The recipe behind ``dvl-ooc lds OUT`` (:func:`run_lds`): the linear datamodeling score
(:func:`dvl_ooc.evaluate.lds`) of the influence matrix of a finished ``dvl-ooc images`` output
folder, measured against retraining the recipe's own network:

1. **ground truth** (:func:`dvl_ooc.evaluate.ground_truth`, resumable store
   ``OUT/lds/ground_truth.zarr``): ``subsets`` random halves of the training split, each
   trained with ``seeds`` seeds by the recipe's training (:class:`ImagesRetrainer`: the
   network of ``OUT/model.pt`` re-initialised from the seed, :func:`~dvl_ooc.demo.resnet.
   train_resnet` with the run's epochs, learning rate and batch size on the decoded images of
   ``OUT/data.zarr``), every test image's loss recorded; the tasks run on Dask workers;
2. **LDS** of ``OUT/influences.zarr`` (streamed: the matrix is never held whole) and of the
   matrices of other output folders on the same images (``others``: e.g. another method run
   with ``--checkpoint OUT/model.pt --out OTHER``), each with its 95 % interval, beside the
   **noise ceiling** of the ground truth (the correlation a perfect predictor of the expected
   loss could reach against the seeds' noisy mean; :func:`dvl_ooc.evaluate.noise_ceiling`);
3. ``OUT/lds/report.json`` and a printed table.

Cost: ``subsets x seeds`` trainings on half of the training images (the recipe's training
stage takes one training on all of them), spread over the workers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import InputError

__all__ = ["ImagesRetrainer", "run_lds"]


class ImagesRetrainer:
    """``retrainer(masks, seed) -> (m, n_test)`` test losses of the recipe's network trained on
    each training subset (a :func:`dvl_ooc.evaluate.ground_truth` retrainer).

    The network of ``model.pt`` (its architecture and input normalisation) is re-initialised
    from the training seed (``ResNet18._init``; other modules by their ``reset_parameters``)
    and trained by :func:`~dvl_ooc.demo.resnet.train_resnet` with the run's settings, the
    shuffles and flips also from the seed; the test targets are per-image cross-entropy
    losses of the eval-mode network. Images are read from the decode cache by each worker
    (a path travels, not the images) and kept per process."""

    target = "loss"

    def __init__(self, out: str | os.PathLike, *, epochs: int, lr: float, batch_size: int,
                 seed: int = 0, eval_batch_size: int = 256) -> None:
        import torch

        self.out = str(Path(out).resolve())
        self.epochs, self.lr, self.batch_size = int(epochs), float(lr), int(batch_size)
        self.seed, self.eval_batch_size = int(seed), int(eval_batch_size)
        net = torch.load(Path(self.out) / "model.pt", map_location="cpu", weights_only=False)
        self.model = net.eval()
        self._data: dict[str, np.ndarray] | None = None
        d = self._arrays()
        self.n_train, self.n_test = len(d["y_train"]), len(d["y_test"])

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_data"] = None  # workers read the cache themselves
        return d

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._data is None:
            import zarr

            from ..store import InfluenceStore

            g = zarr.open_group(Path(self.out) / "data.zarr", mode="r")
            store = InfluenceStore.open(Path(self.out) / "influences.zarr")
            self._data = {"x_train": np.asarray(g["x_train"][:], dtype=np.float32),
                          "x_test": np.asarray(g["x_test"][:], dtype=np.float32),
                          "y_train": np.asarray(store.train_labels, dtype=np.int64),
                          "y_test": np.asarray(store.test_labels, dtype=np.int64)}
        return self._data

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps([self.epochs, self.lr, self.batch_size, self.seed]).encode())
        return h.hexdigest()[:32]

    def describe(self) -> str:
        return (f"{type(self.model).__name__} of {self.out}/model.pt, train_resnet: "
                f"{self.epochs} epochs, lr {self.lr:g}, batch {self.batch_size}")

    def _fresh(self, seed: int) -> Any:
        """The network re-initialised from training seed ``seed`` (its own ``_init`` when it
        has one, as the recipe's ResNet18; else the modules' ``reset_parameters``)."""
        from ..evaluate import reinitialised
        from ..seeding import derive_seed

        s = derive_seed(self.seed, seed, 1)
        if callable(getattr(self.model, "_init", None)):
            return reinitialised(self.model, s, lambda m, v: m._init(v, False))
        return reinitialised(self.model, s)

    def __call__(self, masks: np.ndarray, seed: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from ..demo.resnet import train_resnet
        from ..seeding import derive_seed

        d = self._arrays()
        out = np.empty((len(masks), self.n_test), dtype=np.float32)
        x_te = torch.as_tensor(d["x_test"])
        y_te = torch.as_tensor(d["y_test"])
        for i, mask in enumerate(np.asarray(masks, dtype=bool)):
            net = self._fresh(seed)
            train_resnet(net, (d["x_train"][mask], d["y_train"][mask]), epochs=self.epochs,
                         lr=self.lr, batch_size=min(self.batch_size, int(mask.sum())),
                         seed=derive_seed(self.seed, seed, 0))
            with torch.no_grad():
                for s in range(0, self.n_test, self.eval_batch_size):
                    sl = slice(s, s + self.eval_batch_size)
                    out[i, sl] = F.cross_entropy(net(x_te[sl]), y_te[sl],
                                                 reduction="none").numpy()
        return out


def run_lds(out: str | os.PathLike, *, subsets: int = 24, seeds: int = 2, alpha: float = 0.5,
            workers: int = 2, others: Sequence[str | os.PathLike] = (),
            epochs: int | None = None, progress: bool = True, restart: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, Any]:
    """LDS of the influence matrices of ``out`` (and of ``others``: folders of other methods
    on the same images) against ``subsets x seeds`` retrainings; see the module docstring.
    ``epochs``: override the run's training epochs for the retrainings (cheaper, but then
    the retrained networks differ from the one the scores explain). Returns the report
    (also ``out/lds/report.json``)."""
    from ..evaluate import ground_truth, lds
    from .explain import ImagesOutput

    t0 = time.perf_counter()
    main = ImagesOutput(out)
    job = main.report.get("job", {})
    if job.get("checkpoint"):
        raise InputError(
            f"{out} scores a network loaded with --checkpoint: `dvl-ooc lds` retrains the "
            "recipe's own network, which would not be the one the scores explain; run "
            "`dvl-ooc images` without --checkpoint (it trains the network) to measure LDS")
    folders = [main] + [ImagesOutput(o) for o in others]
    for o in folders[1:]:
        if o.train_names != main.train_names or o.test_names != main.test_names:
            raise InputError(f"{o.out} holds other images or another split than {out}; LDS "
                             "compares matrices of the same test x train images")
    if subsets < 3 or seeds < 1:
        raise InputError(f"need subsets >= 3 and seeds >= 1, got {subsets} and {seeds}")
    retrainer = ImagesRetrainer(out, epochs=epochs if epochs is not None else job["epochs"],
                                lr=job["lr"], batch_size=job["batch_size"],
                                seed=job.get("seed", 0))
    lds_dir = Path(out) / "lds"
    lds_dir.mkdir(exist_ok=True)
    echo(f"dvl-ooc lds: {retrainer.n_test} test x {retrainer.n_train} training images of {out}; "
         f"ground truth: {subsets} subsets of {alpha:.0%} x {seeds} seeds "
         f"({subsets * seeds} trainings: {retrainer.describe()})")
    t = time.perf_counter()
    gt = ground_truth(retrainer, str(lds_dir / "ground_truth.zarr"), n_subsets=subsets,
                      n_seeds=seeds, alpha=alpha, n_workers=workers, progress=progress,
                      mode="w" if restart else "a")
    echo(f"  ground truth in {lds_dir / 'ground_truth.zarr'}  [{time.perf_counter() - t:.1f} s]")
    ceiling = gt.noise_ceiling() if seeds >= 2 else None
    rows = []
    for o in folders:
        r = lds(o.store, gt.masks, gt.targets, kind=gt.kind)
        method = o.report.get("job", {}).get("method", "?")
        rows.append({"folder": str(o.out), "method": method, "lds": r.mean,
                     "ci": list(r.ci), "n_valid": r.n_valid})
    c = None if ceiling is None else float(ceiling.mean)
    echo(f"  noise ceiling (split-half agreement of the {seeds} seeds): "
         + ("n/a (needs --seeds >= 2)" if c is None else f"{c:.3f}"))
    width = max(len(r["folder"]) for r in rows)
    echo(f"  {'folder':{width}s}  {'method':8s}  {'LDS':>6s}  {'95 % interval':>16s}  "
         f"{'of ceiling':>10s}")
    for r in rows:
        share = f"{r['lds'] / c:.0%}" if c else "-"
        echo(f"  {r['folder']:{width}s}  {r['method']:8s}  {r['lds']:6.3f}  "
             f"[{r['ci'][0]:6.3f}, {r['ci'][1]:6.3f}]  {share:>10s}")
    report = {"subsets": subsets, "seeds": seeds, "alpha": alpha, "kind": gt.kind,
              "noise_ceiling": c, "rows": rows, "ground_truth": str(lds_dir /
                                                                     "ground_truth.zarr"),
              "seconds": round(time.perf_counter() - t0, 2)}
    tmp = lds_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, lds_dir / "report.json")
    return copy.deepcopy(report)
