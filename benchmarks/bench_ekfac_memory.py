"""EK-FAC fit + in-memory influences: dvl_ooc vs kronfluence, side by side (time, peak RSS).

    python benchmarks/bench_ekfac_memory.py                  # 2,000 train x 500 test, 64 px
    python benchmarks/bench_ekfac_memory.py --quick          # smoke run (small sizes, ~1 min)
    python benchmarks/bench_ekfac_memory.py --kron-python /work/peers/kron/bin/python

Workload: ``ResNet18(width=16)`` (cifar stem, 700,434 parameters) on 64 x 64 images of the
synthetic malaria layout (:func:`dvl_ooc.demo.malaria.malaria_image`, resized with Pillow,
classes alternating), trained briefly from a fixed seed (``--epochs``) so that gradients are
realistic. Model and data are saved to a work folder (``--work``; reused when its
``workload.json`` matches the options); every measured run is a fresh subprocess, so its
peak RSS (``ru_maxrss`` of the child, read by the parent through
``resource.getrusage(RUSAGE_CHILDREN)`` after each child) is its own:

* ``ours``: ``EkfacInfluence(layers="supported", regularization=Relative(0.1, of="mean"))``,
  ``fit`` on the training set, then ``influences(x_test, y_test, x_train, y_train)``
  (streamed, :meth:`dvl_ooc.influence.base.InfluenceModel.influences`).
* ``kron``: kronfluence in its own virtual environment (``--kron-python``; never a
  dependency of dvl_ooc): ``fit_all_factors`` with its default ``FactorArguments`` (EK-FAC,
  sampled Fisher, damping 0.1 x mean eigenvalue), then ``compute_pairwise_scores`` with
  ``--kron-query-batch`` query and ``--kron-train-batch`` train rows per batch. The model's
  BatchNorm layers are not tracked by kronfluence (it tracks ``Linear``/``Conv2d`` only): the
  same selection as ``layers="supported"``.

Both use the same damping rule, so the two score matrices are two estimates of one quantity;
the table prints the Pearson and Spearman correlations of the flattened matrices (the
Fisher differs: kronfluence samples labels, ours uses the exact Gauss-Newton factors by
default, ``--fisher``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB = 1 << 30


# ---------------------------------------------------------------------- workload
def _images(n: int, size: int, seed: int, offset: int):
    import numpy as np
    from PIL import Image

    from dvl_ooc.demo.malaria import malaria_image

    x = np.empty((n, 3, size, size), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    for j in range(n):
        i = offset + j
        par = i % 2 == 0
        a = malaria_image(seed, i, par)
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
        x[j] = a.transpose(2, 0, 1) / np.float32(255.0)
        y[j] = 0 if par else 1
    return x, y


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Images, a briefly trained ResNet18 and the options, saved under ``work``."""
    import torch

    from dvl_ooc.demo.resnet import ResNet18, count_parameters, train_resnet

    spec = {"n_train": args.n_train, "n_test": args.n_test, "size": args.size,
            "width": args.width, "stem": args.stem, "epochs": args.epochs, "seed": args.seed}
    meta = work / "workload.json"
    if meta.exists() and json.loads(meta.read_text()).get("spec") == spec:
        return json.loads(meta.read_text())
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_tr, y_tr = _images(args.n_train, args.size, args.seed, 0)
    x_te, y_te = _images(args.n_test, args.size, args.seed, args.n_train)
    t_data = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    model = ResNet18(n_classes=2, width=args.width, stem=args.stem, seed=args.seed)
    t0 = time.perf_counter()
    if args.epochs > 0:
        train_resnet(model, (x_tr, y_tr), epochs=args.epochs, seed=args.seed, lr=2e-3)
    model.eval()
    t_train = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    torch.save(model.state_dict(), work / "model.pt")
    torch.save({"x_train": torch.from_numpy(x_tr), "y_train": torch.from_numpy(y_tr),
                "x_test": torch.from_numpy(x_te), "y_test": torch.from_numpy(y_te)},
               work / "data.pt")
    info = {"spec": spec, "parameters": count_parameters(model), "test_accuracy": acc,
            "t_data": t_data, "t_train": t_train}
    meta.write_text(json.dumps(info, indent=1))
    return info


def _load(work: Path):
    import torch

    sys.path.insert(0, str(ROOT))  # the kronfluence venv imports the network from the source
    from dvl_ooc.demo.resnet import ResNet18

    spec = json.loads((work / "workload.json").read_text())["spec"]
    model = ResNet18(n_classes=2, width=spec["width"], stem=spec["stem"])
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    model.eval()
    data = torch.load(work / "data.pt", weights_only=True)
    return model, data


# ---------------------------------------------------------------------- measured children
def _peak_rss_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def child_ours(work: Path, out: Path, opts: dict) -> None:
    """dvl_ooc EK-FAC: fit + streamed in-memory influences; writes the scores and timings."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(opts["threads"])
    from dvl_ooc import EkfacInfluence
    from dvl_ooc.influence import Relative

    model, d = _load(work)
    rss0 = _peak_rss_self()
    m = EkfacInfluence(model, F.cross_entropy, layers="supported", fisher=opts["fisher"],
                       regularization=Relative(0.1, of="mean"), rank=opts.get("rank"),
                       micro_batch_size=opts["batch"])
    if opts.get("memory_budget"):
        m.memory_budget = int(opts["memory_budget"])
    t0 = time.perf_counter()
    m.fit((d["x_train"], d["y_train"]))
    t1 = time.perf_counter()
    scores = m.influences(d["x_test"], d["y_test"], d["x_train"], d["y_train"])
    t2 = time.perf_counter()
    torch.save(scores.float(), out / "scores_ours.pt")
    (out / "ours.json").write_text(json.dumps({
        "t_fit": t1 - t0, "t_scores": t2 - t1, "rss_loaded_gib": rss0,
        "stream": m.info.get("stream")}, default=str))


def child_kron(work: Path, out: Path, opts: dict) -> None:
    """kronfluence EK-FAC (its default FactorArguments), pairwise scores with damping
    ``0.1 x mean eigenvalue`` (``ScoreArguments(damping_factor=None)``)."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    torch.set_num_threads(opts["threads"])
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the sampled (true) Fisher: labels from the model's distribution
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model, d = _load(work)
    rss0 = _peak_rss_self()
    task = Classification()
    model = prepare_model(model, task)
    train = TensorDataset(d["x_train"], d["y_train"])
    query = TensorDataset(d["x_test"], d["y_test"])
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer(analysis_name="bench", model=model, task=task, cpu=True,
                      disable_tqdm=True, output_dir=tmp, disable_model_save=True)
        t0 = time.perf_counter()
        an.fit_all_factors(factors_name="ekfac", dataset=train,
                           per_device_batch_size=opts["batch"],
                           factor_args=FactorArguments(strategy="ekfac"),
                           overwrite_output_dir=True)
        t1 = time.perf_counter()
        an.compute_pairwise_scores(scores_name="scores", factors_name="ekfac",
                                   query_dataset=query, train_dataset=train,
                                   per_device_query_batch_size=opts["query_batch"],
                                   per_device_train_batch_size=opts["batch"],
                                   score_args=ScoreArguments(damping_factor=None),
                                   overwrite_output_dir=True)
        t2 = time.perf_counter()
        scores = an.load_pairwise_scores("scores")["all_modules"]
    torch.save(scores.float().contiguous(), out / "scores_kron.pt")
    (out / "kron.json").write_text(json.dumps({"t_fit": t1 - t0, "t_scores": t2 - t1,
                                               "rss_loaded_gib": rss0}))


# ---------------------------------------------------------------------- driver
def _run_child(python: str, which: str, work: Path, out: Path, opts: dict) -> dict:
    """Run one measured child; its wall time and peak RSS (``os.wait4``: this child's own
    ``ru_maxrss``, not the maximum over all children)."""
    cmd = [python, str(Path(__file__).resolve()), "--child", which, "--work", str(work),
           "--out", str(out), "--child-opts", json.dumps(opts)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"])}
    log = out / f"{which}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{which} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    res = json.loads((out / f"{which}.json").read_text())
    res.update(wall=wall, cpu=usage.ru_utime + usage.ru_stime,
               peak_rss_gib=usage.ru_maxrss * 1024 / GIB)
    return res


def _agreement(a, b) -> dict:
    """Pearson and Spearman correlations of two flattened score matrices."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return {"pearson": float(pearsonr(x, y)[0]), "spearman": float(spearmanr(x, y)[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 train x 40 test")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--width", type=int, default=16, help="ResNet18 width (16: 0.7 M params)")
    ap.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    ap.add_argument("--batch", type=int, default=64,
                    help="micro-batch (ours) and factor/train batch (kronfluence)")
    ap.add_argument("--kron-query-batch", type=int, default=64,
                    help="kronfluence's per_device_query_batch_size")
    ap.add_argument("--fisher", default="ggn", choices=["ggn", "empirical", "sampled"])
    ap.add_argument("--rank", type=int, default=None, help="ours: compressed test factors")
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="ours: InfluenceModel.memory_budget in GiB (default: none set)")
    ap.add_argument("--kron-python", default="/work/peers/kron/bin/python")
    ap.add_argument("--skip", choices=["ours", "kron"], action="append", default=[])
    ap.add_argument("--work", default=None, help="workload folder (default: /tmp/...)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["ours", "kron"], help=argparse.SUPPRESS)
    ap.add_argument("--child-opts", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = child_ours if args.child == "ours" else child_kron
        fn(Path(args.work), Path(args.out), json.loads(args.child_opts))
        return 0
    if args.quick:
        args.n_train, args.n_test, args.epochs = 200, 40, 1
    work = Path(args.work or f"/tmp/bench_ekfac_{args.n_train}x{args.n_test}_{args.stem}"
                                f"_w{args.width}_{args.size}px")
    out = Path(args.out or work / "results")
    out.mkdir(parents=True, exist_ok=True)
    info = prepare(work, args)
    print(f"workload: ResNet18(width={args.width}, stem={args.stem!r}), "
          f"{info['parameters']:,} parameters, {args.size} px, {args.n_train} train x "
          f"{args.n_test} test, trained {args.epochs} epoch(s) (test accuracy "
          f"{info['test_accuracy']:.3f}); {args.threads} threads per process")
    opts = {"threads": args.threads, "batch": args.batch, "query_batch": args.kron_query_batch,
            "fisher": args.fisher, "rank": args.rank,
            "memory_budget": None if args.memory_budget is None
            else int(args.memory_budget * GIB)}
    rows = {}
    if "kron" not in args.skip:
        rows["kronfluence"] = _run_child(args.kron_python, "kron", work, out, opts)
    if "ours" not in args.skip:
        rows["dvl_ooc"] = _run_child(sys.executable, "ours", work, out, opts)
    print(f"\n{'':12s} {'wall s':>8s} {'fit s':>8s} {'scores s':>9s} {'CPU s':>8s} "
          f"{'peak RSS GiB':>13s}")
    for name, r in rows.items():
        print(f"{name:12s} {r['wall']:8.1f} {r['t_fit']:8.1f} {r['t_scores']:9.1f} "
              f"{r['cpu']:8.1f} {r['peak_rss_gib']:13.2f}")
    if len(rows) == 2:
        import torch

        k, o = rows["kronfluence"], rows["dvl_ooc"]
        print(f"ratios dvl_ooc / kronfluence: wall {o['wall'] / k['wall']:.2f}, fit + scores "
              f"{(o['t_fit'] + o['t_scores']) / (k['t_fit'] + k['t_scores']):.2f}, CPU "
              f"{o['cpu'] / k['cpu']:.2f}, peak RSS "
              f"{o['peak_rss_gib'] / k['peak_rss_gib']:.2f}")
        agree = _agreement(torch.load(out / "scores_ours.pt"), torch.load(out / "scores_kron.pt"))
        print(f"agreement of the score matrices: Pearson {agree['pearson']:.3f}, "
              f"Spearman {agree['spearman']:.3f}")
        rows["agreement"] = agree
    if "dvl_ooc" in rows and rows["dvl_ooc"].get("stream"):
        print(f"dvl_ooc streaming: {rows['dvl_ooc']['stream']}")
    (out / "summary.json").write_text(json.dumps({"workload": info, "options": vars(args),
                                                  "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
