"""One seeding scheme for the whole package.

Every random stream is derived from the user's integer ``seed`` and a tuple of integer keys
that say what it is for (block index, checkpoint, batch, sample ...), through NumPy's
``SeedSequence``: streams for different keys are independent, and the same ``(seed, keys)``
gives the same numbers in every process, on every worker and in every run.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["derive_seed", "numpy_rng", "torch_generator"]


def _entropy(seed: int, keys: tuple[int, ...]) -> list[int]:
    return [int(seed), *(int(k) for k in keys)]


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed for the stream ``(seed, *keys)``."""
    return int(np.random.SeedSequence(_entropy(seed, keys)).generate_state(2, np.uint64)[0] >> 1)


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(_entropy(seed, keys))


def torch_generator(seed: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator (on ``device``) for the stream ``(seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *keys))
