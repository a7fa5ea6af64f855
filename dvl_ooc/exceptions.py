"""Exception hierarchy: every error raised on purpose by dvl_ooc derives from `DvlOocError`."""

from __future__ import annotations


class DvlOocError(Exception):
    """Base class of all dvl_ooc errors."""


class InputError(DvlOocError, ValueError):
    """Invalid user input (shapes, values, types, arguments)."""


class LengthMismatchError(InputError):
    """Two inputs that must have the same number of samples do not."""


class NonFiniteError(InputError):
    """NaN or infinite values in inputs, losses or gradients."""


class RegularizationError(InputError):
    """A regularisation value is invalid for the chosen method."""


class NoTrainableParametersError(InputError):
    """The model (or a selected block) has no trainable parameters."""


class UnsupportedModelError(InputError):
    """The model contains layers or structure a method cannot handle."""


class NotFittedError(DvlOocError, RuntimeError):
    """A model was used before `fit` was called."""


class ConvergenceError(DvlOocError, RuntimeError):
    """An iterative solver did not converge within its budget."""


class NegativeCurvatureError(ConvergenceError):
    """An iterative solver met non-positive curvature: H + lambda I is not positive definite
    (use the Gauss-Newton matrix or a larger regularisation)."""


class DivergenceError(ConvergenceError):
    """An iteration diverged (e.g. a LiSSA scale smaller than the top curvature eigenvalue)."""


class ConvergenceWarning(UserWarning):
    """An iterative solver reached its budget before its tolerance."""


class IndefiniteCurvatureWarning(UserWarning):
    """The curvature has negative eigenvalues that the regularisation does not cover
    (use the Gauss-Newton matrix or a larger regularisation)."""


class StoreError(DvlOocError):
    """Problems with a result store on disk."""


class StoreMismatchError(StoreError):
    """An existing store was created with different parameters."""


class StoreExistsError(StoreError, FileExistsError):
    """A result store already exists where a new one was to be created."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No dvl_ooc store exists at the given path."""


class IncompleteStoreError(StoreError):
    """A query needs a complete store and some tiles are not computed yet."""


class UtilityError(DvlOocError, RuntimeError):
    """A valuation utility (model training or scoring) failed on a subset."""


class MainGuardError(DvlOocError, RuntimeError):
    """Worker processes would be started from a script without an
    ``if __name__ == "__main__":`` guard (each spawned worker would re-run the script)."""


class UsageError(InputError):
    """Invalid command-line usage of ``dvl-ooc`` (the command exits with status 2)."""


class MemoryBudgetError(InputError, MemoryError):
    """A computation would need more memory than is available (estimated before allocating)."""


class UnreadableImageError(InputError):
    """An image file cannot be opened or decoded (corrupt, truncated, empty or not an image);
    the message names the file(s)."""


class IndefiniteCurvatureError(RegularizationError):
    """``H + lambda I`` is indefinite (curvature eigenvalues below ``-lambda``) and the model
    was asked to refuse (``raise_on_indefinite=True``); use the Gauss-Newton matrix or a
    regularisation above the measured ``|lambda_min|``."""


class UnfinishedStoreError(StoreNotFoundError):
    """A store whose creation has not finished (interrupted, or in progress in another run):
    never read as a valid store; a mode="a" run with the same parameters finishes it."""


class JobSerializationError(DvlOocError, TypeError):
    """The state a valuation sends to its workers (utility, data, sampler) cannot be pickled;
    raised on the driver before any task is sent, naming the attribute that fails."""


class ClusterStalledError(DvlOocError, RuntimeError):
    """A distributed run made no progress (no task of it running or finishing) for longer than
    its stall timeout: no worker can run its tasks, or their inputs were lost."""


class StoreUnavailableError(StoreError, ConnectionError):
    """A store could not be reached (object storage down, network lost) after the storage
    client's own retries: tiles written before are kept (each whole or absent); rerun the same
    call with ``mode="a"`` once the store is back to compute only the missing tiles."""


class StoreFullError(StoreError, OSError):
    """The disk or quota of a store is full (``ENOSPC`` / ``EDQUOT``): tiles written before are
    kept (each whole or absent); free space and rerun with ``mode="a"`` to resume."""


class EnsembleMismatchError(InputError):
    """Members of an :class:`~dvl_ooc.influence.Ensemble` that cannot be averaged: fitted on
    training sets of different sizes, computing in different dtypes or on different devices,
    or (in ``Ensemble.fit``) a mix of fitted and unfitted members without ``refit=``."""
