"""Find suspicious training images in a class-per-subfolder image folder.

The layout is the one of many public image sets, e.g. the malaria cell images
(``cell_images/Parasitized/*.png``, ``cell_images/Uninfected/*.png``)::

    python examples/image_folder_workflow.py --root cell_images --size 32 --out malaria_out

Without ``--root`` a small folder of PNG files is generated from the scikit-learn digits images
(with some files put into the wrong class folder) so that the script runs anywhere:

    python examples/image_folder_workflow.py --out folder_out

Steps: read the folder (:class:`dvl_ooc.data.imagefolder.ImageFolder`), split train/test, train a
small CNN, fit :class:`dvl_ooc.DirectInfluence` (Gauss-Newton, one block per layer), compute the
test x train influence matrix with :class:`dvl_ooc.DaskInfluenceCalculator` into
``<out>/influences.zarr`` (resumable: rerun after an interruption and only missing tiles are
computed), then query per training image the 25th percentile of its influence over test images
of the same class, and list the lowest ones (candidates for wrong labels).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence
from dvl_ooc.data.imagefolder import ImageFolder
from dvl_ooc.demo.nets import accuracy, train_classifier
from dvl_ooc.query import query_quantiles, query_self_influence


class SmallCNN(nn.Module):
    """A few thousand parameters for any image size: two conv blocks, a 4 x 4 adaptive average
    pool and one linear layer."""

    def __init__(self, channels: int, n_classes: int, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(2 * width * 16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = self.pool(torch.tanh(self.conv2(x)))
        return self.fc(x.flatten(1))


def make_digits_folder(root: Path, n_per_class: int = 100, wrong: float = 0.1,
                       seed: int = 0) -> list[Path]:
    """Write digits images 0-4 as ``root/digit_<k>/<i>.png``; a fraction lands in a wrong
    folder. Returns the paths of the misplaced files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    misplaced = []
    for k in range(5):
        (root / f"digit_{k}").mkdir(parents=True, exist_ok=True)
    for k in range(5):
        idx = np.flatnonzero(d.target == k)[:n_per_class]
        for i in idx:
            folder = k
            if rng.random() < wrong:
                folder = (k + rng.integers(1, 5)) % 5
            path = root / f"digit_{folder}" / f"img{i:04d}.png"
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(path)
            if folder != k:
                misplaced.append(path)
    return misplaced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="image folder (default: generate one from the digits)")
    ap.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    ap.add_argument("--rgb", action="store_true", help="keep colour (default: grayscale)")
    ap.add_argument("--out", default="folder_out")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--show", type=int, default=15, help="suspicious images to list")
    args = ap.parse_args()
    torch.manual_seed(0)

    misplaced: set[Path] = set()
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "images"
        misplaced = set(make_digits_folder(root))
        print(f"generated {root} ({len(misplaced)} images in a wrong class folder)")

    ds = ImageFolder(root, size=args.size, grayscale=not args.rgb)
    print(ds)
    x, y = ds.to_numpy()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    n_test = max(len(ds.classes), len(y) // 4)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    x_tr, y_tr, x_te, y_te = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    model = SmallCNN(x.shape[1], len(ds.classes))
    train_classifier(model, x_tr, y_tr, epochs=args.epochs, weight_decay=1e-3)
    print(f"test accuracy {accuracy(model, x_te, y_te):.3f}")

    inf = DirectInfluence(model, F.cross_entropy, regularization=0.1, blocks="layer",
                          hessian="gauss-newton").fit((torch.as_tensor(x_tr), y_tr))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with DaskInfluenceCalculator(inf, n_workers=args.workers) as calc:
        store = calc.to_zarr(out / "influences.zarr", x_te, y_te, x_tr, y_tr,
                             test_chunk=1024, train_chunk=256, self_influence=True,
                             train_index=train_idx, test_index=test_idx, mode="w")
    print(store)

    q25 = query_quantiles(store, 0.25, same_label=True, save="q25_same_label")
    order = np.argsort(np.where(np.isnan(q25.values), np.inf, q25.values))
    si = query_self_influence(store)
    top_self = set(si["train"].values[: args.show].tolist())
    print(f"\n{args.show} most suspicious training images (lowest same-label 25th percentile):")
    for r in order[: args.show]:
        i = int(q25["train"].values[r])
        path, lab = ds.samples[i]
        flag = " <- misplaced" if path in misplaced else ""
        also = " (also top self-influence)" if i in top_self else ""
        print(f"  {q25.values[r]: .4g}  {ds.classes[lab]:>12}  {path}{flag}{also}")
    if misplaced:
        m = int(round(0.2 * len(order)))
        found = sum(ds.samples[int(q25["train"].values[r])][0] in misplaced for r in order[:m])
        n_mis = sum(ds.samples[i][0] in misplaced for i in train_idx)
        print(f"\nmisplaced training images among the lowest 20 %: {found} of {n_mis}")
    print(f"\nstore: {out / 'influences.zarr'}  (dvl-ooc info / dvl-ooc query work on it)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
