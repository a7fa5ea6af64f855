"""Small real image data sets shipped with scikit-learn (no download), and label noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DigitsSplit", "flip_labels", "load_digits_split"]


@dataclass
class DigitsSplit:
    """Train/test split of the 8x8 digits images, ``x`` as float32 ``(n, 1, 8, 8)`` in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_train_clean: np.ndarray
    flipped: np.ndarray  # boolean mask over the training set


def flip_labels(
    y: np.ndarray, fraction: float, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Give a random ``fraction`` of samples a different, random label.

    Returns the noisy labels and the boolean mask of flipped samples.
    """
    if not 0 <= fraction < 1:
        raise ValueError("fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    n = len(y)
    idx = rng.choice(n, size=int(round(fraction * n)), replace=False)
    noisy = y.copy()
    shift = rng.integers(1, n_classes, size=len(idx))
    noisy[idx] = (y[idx] + shift) % n_classes
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return noisy, mask


def load_digits_split(
    test_fraction: float = 0.3, flip_fraction: float = 0.0, seed: int = 0
) -> DigitsSplit:
    """The scikit-learn digits images (1797 samples), stratified split, optional label flips.

    With the default ``test_fraction=0.3`` the split is 1257 train / 540 test.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError(
            "the digits data needs scikit-learn: pip install 'dvl-ooc[examples]'"
        ) from e
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    noisy, mask = flip_labels(y_tr, flip_fraction, 10, seed=seed)
    return DigitsSplit(x_tr, noisy, x_te, y_te, y_tr, mask)
