"""The main job: find mislabelled digits with influence functions, end to end.

1. scikit-learn digits (8x8 images, no download), a fixed fraction of training labels flipped;
2. train a small CNN on the noisy labels, saving 5 checkpoints (evenly spaced epochs);
3. fit :class:`~dvl_ooc.DirectInfluence` (Gauss-Newton curvature of the mean training loss);
4. compute the whole ``test x train`` influence matrix with the Dask calculator into
   ``<out>/influences.zarr`` (plus self-influence);
5. score each training point ``r`` by the 25th percentile of ``I[t, r]`` over the test points
   ``t`` with the same label (a training point that mostly *hurts* test points of its own
   class is suspicious) with an exact streaming query, and rank by self-influence
   ``<(H + lambda I)^-1 g_r, g_r>`` (large = the model finds the point surprising);
6. the recommended score (:func:`~dvl_ooc.query.mislabel_score`, the best of the scores
   measured in ``benchmarks/bench_detection.py``): every training point's loss averaged over
   the checkpoints, ``(1/K) sum_k loss(w_k, z_r)`` (one forward pass per checkpoint: a wrong
   label keeps a large loss for most of the training run, even when the final network has
   memorised it); for comparison also the TracIn self-influence over the checkpoints,
   ``sum_k eta_k ||grad l(w_k, z_r)||^2`` (:class:`~dvl_ooc.influence.TracInCP`), and the
   final training loss;
7. count the flipped labels among the most suspicious 10 / 15 / 20 % by every score, with the
   ROC AUC;
8. drop the 10 % most suspicious by the recommended score, retrain, compare test accuracy (and
   a random drop of equal size), averaged over three training seeds;
9. save pictures (``matplotlib``, Agg backend) and ``report.txt`` / ``report.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo"]



def _train(x, y, *, seed: int, epochs: int, width: int, hidden: int,
           checkpoints: list | None = None, n_checkpoints: int = 5):
    """Adam with a cosine learning-rate decay to 0: the final weights (and so the accuracy
    comparisons of the report) vary little with the seed and the training subset.

    With a list ``checkpoints``, appends ``(state_dict, learning rate)`` after
    ``n_checkpoints`` evenly spaced epochs (the last one: the final model), the rate being the
    mean over that epoch's steps (the weights of TracIn). The loop is
    :func:`dvl_ooc.training.fit_network` (:class:`~dvl_ooc.training.Checkpoints`); the network
    is initialised after ``torch.manual_seed(seed)``, the data order is the ``"randperm"`` one."""
    import torch

    from ..training import Checkpoints, FitConfig, checkpoint_epochs, fit_network
    from .nets import DigitsCNN

    torch.manual_seed(seed)
    model = DigitsCNN(width=width, hidden=hidden)
    cfg = FitConfig(epochs=epochs, lr=1e-2, batch_size=64, weight_decay=1e-3, optimizer="adam",
                    schedule="cosine", seed=seed, order="randperm")
    hook = None if checkpoints is None else Checkpoints(
        checkpoint_epochs(epochs, n_checkpoints), into=checkpoints)
    return fit_network(model, (x, y), cfg, on_epoch_end=hook)


def _checkpoint_losses(x, y, checkpoints: list, *, width: int, hidden: int) -> np.ndarray:
    """Per-point cross-entropy of every training point at every checkpoint, ``(K, n)``."""
    import torch
    import torch.nn.functional as F

    from .nets import DigitsCNN

    net = DigitsCNN(width=width, hidden=hidden).eval()
    xt, yt = torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y)).long()
    rows = []
    with torch.no_grad():
        for state, _ in checkpoints:
            net.load_state_dict(state)
            rows.append(F.cross_entropy(net(xt), yt, reduction="none").double().numpy())
    return np.stack(rows)


def _pictures(out: Path, d: Any, score: np.ndarray, si: np.ndarray,
              rec: np.ndarray) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = np.isfinite(score)
    bins = np.histogram_bin_edges(score[ok], bins=50)
    ax.hist(score[ok & ~d.flipped], bins=bins, alpha=0.7, label="correct label")
    ax.hist(score[ok & d.flipped], bins=bins, alpha=0.8, color="C3", label="flipped label")
    cut = np.quantile(score[ok], 0.2)
    ax.axvline(cut, color="k", ls="--", lw=1, label="lowest 20 %")
    ax.set_xlabel("25th percentile of influence over same-label test points")
    ax.set_ylabel("training points")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "percentile_histogram.png", dpi=110)
    plt.close(fig)
    files.append("percentile_histogram.png")

    for name, order, title in (
        ("suspicious_by_percentile.png", np.argsort(np.where(ok, score, np.inf), kind="stable"),
         "lowest same-label 25th percentile"),
        ("suspicious_by_self_influence.png", np.argsort(-si, kind="stable"),
         "highest self-influence"),
        ("suspicious_by_recommended.png", np.argsort(-rec, kind="stable"),
         "recommended: mean training loss over the checkpoints"),
    ):
        fig, axes = plt.subplots(4, 8, figsize=(10, 5.6))
        for ax, r in zip(axes.flat, order[:32]):
            ax.imshow(d.x_train[r, 0], cmap="gray_r")
            bad = bool(d.flipped[r])
            ax.set_title(f"#{r} y={d.y_train[r]}" + (f" ({d.y_train_clean[r]})" if bad else ""),
                         fontsize=8, color="C3" if bad else "k")
            ax.axis("off")
        fig.suptitle(f"32 most suspicious training images ({title}); "
                     "red = flipped (true label in brackets)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def run_demo(
    out: str | os.PathLike = "out",
    *,
    quick: bool = False,
    seed: int = 0,
    n_workers: int = 2,
    flip_fraction: float = 0.1,
    echo: Any = print,
) -> dict[str, Any]:
    """Run the mislabelled-digits job, print a report, write results to ``out``; returns the
    report as a dict (also in ``<out>/report.json``)."""
    import torch
    import torch.nn.functional as F

    from ..calculator import DaskInfluenceCalculator
    from ..influence import DirectInfluence, TracInCP
    from ..query import DETECTION_FRACTIONS as FRACTIONS
    from ..query import (
        detection_rates,
        mislabel_score,
        query_quantiles,
        query_self_influence,
        roc_auc,
    )
    from .datasets import load_digits_split
    from .nets import accuracy

    lines: list[str] = []
    _echo = echo

    def echo(msg: str) -> None:
        lines.append(msg)
        _echo(msg)

    t_start = time.perf_counter()
    times: dict[str, float] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a ~2k-parameter CNN: threads only add overhead
    try:
        cfg = {"epochs": 12 if quick else 20, "width": 4, "hidden": 32}
        lam = 0.03  # ~1e-3 of the top Gauss-Newton eigenvalue (~10-30)
        d = load_digits_split(test_fraction=0.3, flip_fraction=flip_fraction, seed=seed)
        if quick:  # fewer training points: a smaller matrix and faster training
            d.x_train, d.y_train = d.x_train[:600], d.y_train[:600]
            d.y_train_clean, d.flipped = d.y_train_clean[:600], d.flipped[:600]
        n, n_test, nf = len(d.y_train), len(d.y_test), int(d.flipped.sum())
        echo(f"dvl-ooc demo: digits, {n} training images ({nf} labels flipped, "
             f"{100 * nf / n:.0f} %), {n_test} test images; output in {out}/")

        t = time.perf_counter()
        ckpts: list = []
        model = _train(d.x_train, d.y_train, seed=seed, checkpoints=ckpts, **cfg)
        acc_before = accuracy(model, d.x_test, d.y_test)
        times["train"] = time.perf_counter() - t
        p = sum(q.numel() for q in model.parameters())
        echo(f"  trained DigitsCNN ({p} parameters) on the noisy labels: test accuracy "
             f"{acc_before:.3f}  [{times['train']:.1f} s]")

        t = time.perf_counter()
        x_tr, y_tr = torch.as_tensor(d.x_train), torch.as_tensor(d.y_train)
        inf = DirectInfluence(model, F.cross_entropy, regularization=lam,
                              hessian="gauss-newton", micro_batch_size=256)
        inf.fit((x_tr, y_tr))
        times["fit"] = time.perf_counter() - t
        echo(f"  fitted DirectInfluence (Gauss-Newton, lambda={lam:g})  [{times['fit']:.1f} s]")

        t = time.perf_counter()
        store_path = out / "influences.zarr"
        # closing a LocalCluster may log "worker still alive ... killing": not for this report
        nanny = logging.getLogger("distributed.nanny")
        level = nanny.level
        nanny.setLevel(logging.ERROR)
        try:
            # the digits (22 MiB) travel in the task graph, which makes Dask advise against
            # large graphs: right for big data (use Zarr there), noise for this report
            with warnings.catch_warnings(), DaskInfluenceCalculator(
                    inf, n_workers=n_workers, threads_per_worker=1,
                    dashboard_address=None) as calc:
                warnings.filterwarnings("ignore", message="Sending large graph",
                                        category=UserWarning)
                store = calc.to_zarr(store_path, d.x_test, d.y_test, d.x_train, d.y_train,
                                     test_chunk=n_test, train_chunk=max(64, -(-n // 8)),
                                     mode="w", self_influence=True, progress=False)
        finally:
            nanny.setLevel(level)
        times["influences"] = time.perf_counter() - t
        echo(f"  computed the {n_test} x {n} influence matrix on {n_workers} Dask workers "
             f"into {store_path} (chunks {store.chunks[0]} x {store.chunks[1]})  "
             f"[{times['influences']:.1f} s]")

        t = time.perf_counter()
        q25 = query_quantiles(store, 0.25, same_label=True, save="q25_same_label")
        score = q25.values.astype(np.float64)
        q25_all = query_quantiles(store, 0.25).values.astype(np.float64)
        si_ds = query_self_influence(store, save="self_influence_rank")
        si = np.empty(n)
        si[si_ds["position"].values] = si_ds["self_influence"].values
        times["queries"] = time.perf_counter() - t
        echo(f"  queries: 25th percentiles (same-label and all test points), self-influence "
             "ranking  "
             f"[{times['queries']:.1f} s]")

        t = time.perf_counter()
        tracin = TracInCP(model, F.cross_entropy, [c for c, _ in ckpts], [r for _, r in ckpts],
                          micro_batch_size=256)
        tsi = tracin.self_influence(x_tr, y_tr).double().numpy()
        ck_losses = _checkpoint_losses(d.x_train, d.y_train, ckpts, width=cfg["width"],
                                       hidden=cfg["hidden"])
        final_loss = ck_losses[-1]  # the last checkpoint is the final model
        rec = mislabel_score(ck_losses)
        times["checkpoints"] = time.perf_counter() - t
        echo(f"  at the {len(ckpts)} checkpoints saved during training: every training point's "
             "loss (recommended score: its mean) and the TracIn self-influence  "
             f"[{times['checkpoints']:.1f} s]")

        by_pct = np.argsort(np.where(np.isfinite(score), score, np.inf), kind="stable")
        best = "recommended: mean loss over checkpoints"
        by_rec = np.argsort(-rec, kind="stable")
        det = {
            best: detection_rates(by_rec, d.flipped),
            "training loss, final model": detection_rates(
                np.argsort(-final_loss, kind="stable"), d.flipped),
            "TracIn self-influence (highest first)": detection_rates(
                np.argsort(-tsi, kind="stable"), d.flipped),
            "same-label 25th percentile (lowest first)": detection_rates(by_pct, d.flipped),
            "25th percentile over all test points": detection_rates(
                np.argsort(q25_all, kind="stable"), d.flipped),
            "self-influence (highest first)": detection_rates(np.argsort(-si, kind="stable"),
                                                              d.flipped),
            "self-influence (lowest first)": detection_rates(np.argsort(si, kind="stable"),
                                                             d.flipped),
            "random ranking (expected)": {
                f"{round(f * 100)}%": {"flagged": int(round(f * n)),
                                       "found": round(f * nf, 1), "recall": f}
                for f in FRACTIONS},
        }
        echo("")
        echo(f"  flipped labels found among the most suspicious training points (of {nf}):")
        auc = {  # oriented: higher = more suspicious
            best: roc_auc(d.flipped, rec),
            "training loss, final model": roc_auc(d.flipped, final_loss),
            "TracIn self-influence (highest first)": roc_auc(d.flipped, tsi),
            "same-label 25th percentile (lowest first)": roc_auc(d.flipped, -score),
            "25th percentile over all test points": roc_auc(d.flipped, -q25_all),
            "self-influence (highest first)": roc_auc(d.flipped, si),
            "self-influence (lowest first)": roc_auc(d.flipped, -si),
            "random ranking (expected)": 0.5,
        }
        echo(f"    {'ranking':<44}" + "".join(f"{'top ' + k:>14}" for k in det[
            "self-influence (highest first)"]) + f"{'ROC AUC':>10}")
        for name, r in det.items():
            cells = [f"{v['found']} ({100 * v['recall']:.0f}%)" for v in r.values()]
            echo(f"    {name:<44}" + "".join(f"{c:>14}" for c in cells)
                 + f"{auc[name]:>10.3f}")

        # clean: drop the 10 % most suspicious by the recommended score, retrain; compare
        # with dropping as many random points. Accuracies are means over training seeds (noise on
        # 540 test images is about +-1 %).
        t = time.perf_counter()
        seeds = [seed] if quick else [seed, seed + 1, seed + 2]
        m_drop = int(round(FRACTIONS[0] * n))
        keep = np.ones(n, bool)
        keep[by_rec[:m_drop]] = False
        keep_r = np.ones(n, bool)
        keep_r[np.random.default_rng(seed).choice(n, m_drop, replace=False)] = False

        def acc(mask: np.ndarray) -> list[float]:
            return [accuracy(_train(d.x_train[mask], d.y_train[mask], seed=s, **cfg),
                             d.x_test, d.y_test) for s in seeds]

        accs = {"before": [acc_before] + acc(np.ones(n, bool))[1:], "after_cleaning": acc(keep),
                "after_random_drop": acc(keep_r)}
        times["retrain"] = time.perf_counter() - t
        removed_flipped = int(d.flipped[~keep].sum())
        echo("")
        echo(f"  dropped the {m_drop} most suspicious training points (recommended score; "
             f"{removed_flipped} of them flipped) and retrained  [{times['retrain']:.1f} s]")
        how = f"mean of {len(seeds)} training seeds" if len(seeds) > 1 else "one training seed"
        echo(f"    test accuracy ({how}):  noisy labels {np.mean(accs['before']):.3f}   "
             f"cleaned {np.mean(accs['after_cleaning']):.3f}   "
             f"{m_drop} random points dropped {np.mean(accs['after_random_drop']):.3f}")

        files = _pictures(out, d, score, si, rec)
        times["total"] = time.perf_counter() - t_start
        echo("")
        echo(f"  pictures: {', '.join(str(out / f) for f in files)}")
        echo(f"  query the store: dvl-ooc query {store_path} quantile --q 0.25 --same-label")
        echo(f"  total time {times['total']:.1f} s")
        recall20 = det["same-label 25th percentile (lowest first)"]["20%"]["recall"]
        report = {
            "n_train": n, "n_test": n_test, "n_flipped": nf, "quick": quick, "seed": seed,
            "model": {"class": "DigitsCNN", "parameters": p, **cfg},
            "influence": {"method": "DirectInfluence", "hessian": "gauss-newton",
                          "regularization": lam},
            "store": str(store_path),
            "detection": det,
            "auc": auc,
            "recommended": {"ranking": best, "score": "mislabel_score(checkpoint_losses)",
                            "checkpoints": len(ckpts),
                            "learning_rates": [r for _, r in ckpts],
                            "recall_top20": det[best]["20%"]["recall"], "auc": auc[best]},
            "recall_lowest20_percentile": recall20,
            "accuracy": {**{k: float(np.mean(v)) for k, v in accs.items()},
                         "per_seed": accs, "seeds": seeds, "dropped": m_drop,
                         "dropped_flipped": removed_flipped, "dropped_by": best},
            "pictures": files,
            "seconds": {k: round(v, 2) for k, v in times.items()},
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.txt").write_text("\n".join(lines) + "\n")
        return report
    finally:
        torch.set_num_threads(threads)
