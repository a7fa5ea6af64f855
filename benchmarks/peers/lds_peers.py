"""Peer attribution scores for ``benchmarks/bench_lds.py``: dattri's TRAK or kronfluence's EK-FAC.

Runs in the peer's own virtual environment (never dvl_ooc's; the peers are never dependencies
of the package), with the repository on ``PYTHONPATH`` so that the benchmark's network classes
(``dvl_ooc.demo.nets`` / ``dvl_ooc.demo.resnet``, plain torch modules) import::

    PYTHONPATH=. /work/peers/dattri/bin/python benchmarks/peers/lds_peers.py trak WORKDIR \\
        --members 0 1 2 --out scores.npy
    PYTHONPATH=. /work/peers/kron/bin/python benchmarks/peers/lds_peers.py kronfluence WORKDIR \\
        --members 0 --out scores.npy

``WORKDIR`` holds what the benchmark wrote: ``data.npz`` (``x_train``, ``y_train``, ``x_test``,
``y_test``), ``arch.json`` (``{"module", "name", "kwargs", "dtype"}``) and one state dict per
independently trained network, ``member_<m>.pt``.

Scores are written as ``(n_test, n_train)`` float32 in dvl_ooc's convention (positive: the
training point is helpful, i.e. up-weighting it lowers the test loss / raises the margin):

* ``trak``: ``dattri.algorithm.TRAKAttributor`` with the members as its checkpoints (TRAK-M,
  the ensemble is TRAK's own), target and training function the log-odds of the correct class
  (dattri's and TRAK's choice), projection dimension ``--proj-dim``; dattri returns
  ``(n_train, n_test)``, transposed here.
* ``kronfluence``: ``Analyzer.fit_all_factors`` (strategy ``ekfac``) and
  ``compute_pairwise_scores`` per member, measurement = the cross-entropy loss of the test
  point, training loss = cross-entropy (sampled labels for the Fisher, kronfluence's recipe);
  ``--damping`` ``heuristic`` (``damping_factor=None``: 0.1 x the mean eigenvalue) or a number
  (kronfluence 1.0's default is 1e-8). Pairwise scores are ``g_test^T H^-1 g_train``: positive
  = helpful. Several members: the mean of their matrices.

Prints one JSON line: ``{"peer", "members", "seconds", "peak_rss_mb", "versions"}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def load_workdir(workdir: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(workdir / "data.npz") as z:
        data = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    arch = json.loads((workdir / "arch.json").read_text())
    return data, arch


def build(arch: dict, workdir: Path, member: int) -> nn.Module:
    cls = getattr(importlib.import_module(arch["module"]), arch["name"])
    net = cls(**arch.get("kwargs", {}))
    net.load_state_dict(torch.load(workdir / f"member_{member}.pt", map_location="cpu"))
    return net.to(getattr(torch, arch.get("dtype", "float32"))).eval()


def run_trak(data: dict, arch: dict, workdir: Path, members: list[int], proj_dim: int,
             batch: int) -> np.ndarray:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = build(arch, workdir, members[0])
    dtype = next(model.parameters()).dtype

    def margin(params, data_pair):  # TRAK's target: log p / (1 - p) of the correct class
        image, label = data_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        logp = -F.cross_entropy(yhat, label.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, data_pair):
        image, label = data_pair
        yhat = torch.func.functional_call(model, params, image.unsqueeze(0))
        return torch.exp(-F.cross_entropy(yhat, label.unsqueeze(0)))

    checkpoints = [torch.load(workdir / f"member_{m}.pt", map_location="cpu") for m in members]
    task = AttributionTask(loss_func=margin, model=model, checkpoints=checkpoints)
    projector_kwargs = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "device": "cpu"}
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                device="cpu", projector_kwargs=projector_kwargs)

    def loader(x: np.ndarray, y: np.ndarray) -> torch.utils.data.DataLoader:
        ds = torch.utils.data.TensorDataset(torch.as_tensor(x).to(dtype),
                                            torch.as_tensor(y).long())
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)

    attributor.cache(loader(data["x_train"], data["y_train"]))
    with torch.no_grad():
        s = attributor.attribute(loader(data["x_test"], data["y_test"]))
    return s.T.detach().cpu().numpy().astype(np.float32)


def run_kronfluence(data: dict, arch: dict, workdir: Path, members: list[int],
                    damping: str, batch: int) -> np.ndarray:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if not sample:
                return F.cross_entropy(logits, y, reduction="sum")
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                sampled = torch.multinomial(probs, num_samples=1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    total = None
    damping_factor = None if damping == "heuristic" else float(damping)
    with tempfile.TemporaryDirectory() as tmp:
        for m in members:
            model = build(arch, workdir, m)
            dtype = next(model.parameters()).dtype
            train = torch.utils.data.TensorDataset(torch.as_tensor(data["x_train"]).to(dtype),
                                                   torch.as_tensor(data["y_train"]).long())
            test = torch.utils.data.TensorDataset(torch.as_tensor(data["x_test"]).to(dtype),
                                                  torch.as_tensor(data["y_test"]).long())
            task = Classification()
            model = prepare_model(model, task)
            analyzer = Analyzer(analysis_name=f"lds_{m}", model=model, task=task, cpu=True,
                                disable_tqdm=True, output_dir=tmp)
            analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=batch,
                                     factor_args=FactorArguments(strategy="ekfac"),
                                     overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(
                "scores", "ekfac", query_dataset=test, train_dataset=train,
                per_device_query_batch_size=batch, per_device_train_batch_size=batch,
                score_args=ScoreArguments(damping_factor=damping_factor),
                overwrite_output_dir=True)
            s = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
            total = s if total is None else total + s
    return (total / len(members)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("peer", choices=["trak", "kronfluence"])
    p.add_argument("workdir", type=Path)
    p.add_argument("--members", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--proj-dim", type=int, default=512, help="TRAK projection dimension")
    p.add_argument("--damping", default="heuristic",
                   help="kronfluence damping_factor: 'heuristic' (None) or a number")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data, arch = load_workdir(a.workdir)
    t0 = time.perf_counter()
    if a.peer == "trak":
        scores = run_trak(data, arch, a.workdir, a.members, a.proj_dim, a.batch)
        import dattri

        versions = {"dattri": getattr(dattri, "__version__", "?")}
    else:
        scores = run_kronfluence(data, arch, a.workdir, a.members, a.damping, a.batch)
        import kronfluence

        versions = {"kronfluence": getattr(kronfluence, "__version__", "?")}
    seconds = time.perf_counter() - t0
    np.save(a.out, scores)
    versions["torch"] = torch.__version__
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peer": a.peer, "members": a.members, "seconds": round(seconds, 2),
                      "peak_rss_mb": round(rss, 1), "versions": versions,
                      "pid": os.getpid(), "python": sys.executable}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
