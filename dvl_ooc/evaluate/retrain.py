r"""Retrainers: ``retrainer(masks, seed) -> targets``, the unit of work of a ground-truth job.

A retrainer trains one model per row of a boolean ``masks`` block ``(m, n_train)`` (row ``j``:
the training subset) with training seed ``seed`` and returns each model's target on every test
point, ``(m, n_test)`` float64. :func:`~dvl_ooc.evaluate.ground_truth` calls it once per block of
subsets and seed; any callable with this signature works (see there).

:class:`TorchRetrainer` builds on the valuation machinery and does not re-implement training:
the stacked path is :class:`~dvl_ooc.valuation.TorchBatchUtility` (``m`` models trained in one
pass, for networks without BatchNorm / Dropout), the one-at-a-time path is
:func:`~dvl_ooc.valuation.training.train_module` (any network), both with the schedule of one
:class:`~dvl_ooc.valuation.TrainingConfig`. For the same subset and seed they give the same
model up to floating-point rounding (tested at float64), hence the same targets.

Seeds. Training seed ``s`` fixes both sources of training randomness, the same for every
subset (which removes most of the noise of a counterfactual comparison between subsets):

* initialisation: every submodule with a ``reset_parameters`` method is re-initialised, in
  ``model.modules()`` order, from torch's CPU generator seeded with
  ``derive_seed(config.seed, s, 1)`` (:func:`dvl_ooc.seeding.derive_seed`; the global RNG
  state is restored afterwards): PyTorch's default initialisation. A network with its own
  initialisation passes ``reinit=fn``, ``fn(model, seed)`` re-initialising ``model`` in place
  (called with the same seeded generator state); ``reinit=False`` keeps the model's weights
  for every seed.
* data order: ``config.replace(seed=derive_seed(config.seed, s, 0))`` (the per-epoch shuffles).

Targets, from the trained model's logits ``z`` (eval mode) for test point ``(x, y)``:

* ``"loss"``: ``loss(z, y, reduction="none")`` (cross-entropy by default);
* ``"margin"``: ``z_y - logsumexp_{c != y} z_c`` (the log-odds of the correct class, dattri's
  and TRAK's model output; higher is better).

Cost per call: training ``m`` models (``epochs * ceil(|S_j| / batch_size)`` steps each) plus
one forward pass of each over the test set (in chunks of ``eval_batch_size``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import InputError, LengthMismatchError, UnsupportedModelError
from ..seeding import derive_seed
from ..valuation.tasks import torch_threads
from ..valuation.torch_utility import TorchBatchUtility
from ..valuation.training import TrainingConfig, check_stackable, resolve_config, train_module
from ..valuation.utility import as_xy

__all__ = ["TARGETS", "TorchRetrainer", "model_targets", "reinitialised"]

#: target kinds: the loss (lower is better) and the margin (higher is better)
TARGETS = ("loss", "margin")


def reinitialised(model: nn.Module, seed: int,
                  init: Callable[[nn.Module, int], Any] | None = None) -> nn.Module:
    """A copy of ``model`` re-initialised from torch's CPU generator seeded with ``seed`` (the
    global RNG state is restored): by ``init(copy, seed)`` when given, else by the
    ``reset_parameters`` of every submodule that has one (``model.modules()`` order).
    Deterministic: the same ``seed`` gives the same weights in every process."""
    m = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        if init is not None:
            init(m, int(seed))
            return m
        for mod in m.modules():
            reset = getattr(mod, "reset_parameters", None)
            if callable(reset):
                reset()
    return m


def _fixed_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that no ``reset_parameters`` re-initialises (owned
    directly by a module without that method)."""
    out = []
    for name, mod in model.named_modules():
        if callable(getattr(mod, "reset_parameters", None)):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                out.append(f"{name}.{pname}" if name else pname)
    return out


def _name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def model_targets(logits: torch.Tensor, y: torch.Tensor, target: str,
                  loss: Callable = F.cross_entropy) -> torch.Tensor:
    """Per-sample targets from ``logits`` ``(..., B, C)`` and labels ``y`` ``(B,)``: the loss
    ``loss(z, y, reduction="none")`` or the margin ``z_y - logsumexp_{c != y} z_c``; shape
    ``(..., B)``."""
    lead, (b, c) = logits.shape[:-2], logits.shape[-2:]
    yy = y.expand(*lead, b)
    if target == "loss":
        return loss(logits.reshape(-1, c), yy.reshape(-1), reduction="none").view(*lead, b)
    correct = logits.gather(-1, yy.unsqueeze(-1)).squeeze(-1)
    others = logits.masked_fill(F.one_hot(yy, c).bool(), float("-inf")).logsumexp(-1)
    return correct - others


class TorchRetrainer:
    """Train a torch classifier on subsets and return each model's per-test-point targets.

    Args:
        model: the network (its architecture; its weights are the initialisation only with
            ``reinit=False``). Never modified.
        train_data, test_data: ``(x, y)`` pairs (arrays / tensors), or anything
            :func:`dvl_ooc.valuation.utility.as_xy` takes; held in memory and shipped with the
            retrainer (once per worker in a ground-truth job).
        config: the :class:`~dvl_ooc.valuation.TrainingConfig` (default ``TrainingConfig()``);
            its ``seed`` is the base of the training seeds (module docstring).
        target: ``"loss"`` or ``"margin"``.
        stacked: ``"auto"`` (stacked training when the network allows it: no BatchNorm /
            Dropout), ``True`` (refused with :class:`~dvl_ooc.exceptions.UnsupportedModelError`
            when it does not) or ``False`` (one model at a time).
        loss: per-sample loss ``loss(logits, y, reduction="none")``, trained on (its mean per
            minibatch) and returned as the ``"loss"`` target.
        reinit: ``True``: re-initialise the weights from each training seed with the modules'
            ``reset_parameters`` (PyTorch's default initialisation); a callable
            ``fn(model, seed)``: re-initialise with it (a network's own initialisation, e.g.
            ``lambda m, s: m._init(s, False)`` for :class:`~dvl_ooc.demo.resnet.ResNet18`);
            ``False``: keep the model's weights for every seed.
        models_per_pass: models trained together in one stacked pass.
        eval_batch_size: test points per forward pass when computing targets.
        dtype, device: where training runs.
        num_threads: torch intra-op threads inside a call (``None``: as set; a ground-truth job
            sets its ``threads_per_task`` around each call).

    Attributes: ``n_train``, ``n_test``, ``target``, ``stacked`` (the resolved path),
    ``config``.
    """

    def __init__(self, model: nn.Module, train_data: Any, test_data: Any, *,
                 config: TrainingConfig | None = None, target: str = "loss",
                 stacked: bool | str = "auto", loss: Callable = F.cross_entropy,
                 reinit: bool | Callable[[nn.Module, int], Any] = True,
                 models_per_pass: int = 32, eval_batch_size: int = 1024,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 num_threads: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"TorchRetrainer needs a torch.nn.Module, not {type(model)}")
        if target not in TARGETS:
            raise InputError(f"target must be 'loss' or 'margin', got {target!r}")
        self.config = resolve_config(config)
        if stacked == "auto":
            try:
                check_stackable(model)
                stacked = True
            except UnsupportedModelError:
                stacked = False
        elif stacked is True:
            check_stackable(model)
        elif stacked is not False:
            raise InputError(f"stacked must be 'auto', True or False, got {stacked!r}")
        if int(models_per_pass) < 1 or int(eval_batch_size) < 1:
            raise InputError("models_per_pass and eval_batch_size must be positive integers")
        if not any(p.requires_grad for p in model.parameters()):
            raise InputError("the model has no trainable parameters")
        self.model = copy.deepcopy(model).cpu()
        self.x, self.y = as_xy(train_data, what="train_data")
        self.x_test, self.y_test = as_xy(test_data, what="test_data")
        if self.x.shape[1:] != self.x_test.shape[1:]:
            raise LengthMismatchError(f"train and test samples differ in shape: "
                                      f"{self.x.shape[1:]} vs {self.x_test.shape[1:]}")
        self.target, self.stacked, self.loss, self.reinit = target, bool(stacked), loss, reinit
        self.models_per_pass, self.eval_batch_size = int(models_per_pass), int(eval_batch_size)
        self.dtype, self.device = dtype, torch.device(device)
        self.num_threads = num_threads
        if reinit is not True and reinit is not False and not callable(reinit):
            raise InputError(f"reinit must be True, False or a function fn(model, seed), got "
                             f"{reinit!r}")
        if reinit is True:
            fixed = _fixed_parameters(self.model)
            if fixed:
                warnings.warn(f"TorchRetrainer: parameters {fixed[:4]} belong to modules without "
                              "reset_parameters and keep their values for every seed",
                              UserWarning, stacklevel=2)
        self._init_local()

    # -- process-local state (rebuilt after unpickling, never shipped) ------------------
    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._data: tuple[torch.Tensor, ...] | None = None
        self._utilities: OrderedDict[int, TorchBatchUtility] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_lock", "_data", "_utilities"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_local()

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        """``(x, y, x_test, y_test)`` as tensors in fresh (aligned) torch memory: arrays
        unpickled on a worker may sit at any offset, and BLAS kernels round differently for
        other alignments (see :func:`dvl_ooc.calculator.tasks._aligned`)."""
        with self._lock:
            if self._data is None:
                dev = self.device

                def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
                    return torch.as_tensor(a).to(device=dev, dtype=dtype).clone()

                self._data = (t(self.x, self.dtype), t(self.y, torch.long),
                              t(self.x_test, self.dtype), t(self.y_test, torch.long))
            return self._data

    # -- properties --------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return len(self.x)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    @property
    def kind(self) -> str:
        """The target kind (``"loss"`` or ``"margin"``), as ground-truth stores record it."""
        return self.target

    def seeded(self, seed: int) -> tuple[nn.Module, TrainingConfig]:
        """The initial network (CPU, the model's dtype) and training configuration of training
        seed ``seed`` (module docstring)."""
        cfg = self.config.replace(seed=derive_seed(self.config.seed, int(seed), 0))
        if self.reinit is False:
            return copy.deepcopy(self.model), cfg
        init = None if self.reinit is True else self.reinit
        return reinitialised(self.model, derive_seed(self.config.seed, int(seed), 1), init), cfg

    def fingerprint(self) -> str:
        """Hash of everything the targets depend on: the architecture, initial weights,
        training configuration, target, loss, paths and batching, dtype, device and the
        data. A ground-truth store records it and refuses to be resumed with another."""
        h = hashlib.sha256()
        h.update(repr(self.model).encode())
        for n, t in sorted(self.model.state_dict().items()):
            h.update(n.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        cfg = dataclasses.asdict(self.config)
        loss, reinit = _name(self.loss), self.reinit if isinstance(self.reinit, bool) else \
            _name(self.reinit)
        h.update(repr((sorted(cfg.items()), self.target, loss, reinit, self.stacked,
                       self.models_per_pass, self.eval_batch_size, str(self.dtype),
                       self.device.type)).encode())
        for a in (self.x, self.y, self.x_test, self.y_test):
            h.update(f"{a.shape}|{a.dtype.str}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (recorded in ground-truth stores, informational)."""
        return {"class": type(self).__name__, "model": type(self.model).__name__,
                "config": {k: v for k, v in dataclasses.asdict(self.config).items()},
                "target": self.target, "stacked": self.stacked,
                "reinit": self.reinit if isinstance(self.reinit, bool) else _name(self.reinit),
                "dtype": str(self.dtype), "n_train": self.n_train, "n_test": self.n_test}

    def __repr__(self) -> str:
        path = "stacked" if self.stacked else "one at a time"
        return (f"TorchRetrainer({type(self.model).__name__}, n_train={self.n_train}, "
                f"n_test={self.n_test}, target={self.target!r}, {path})")

    # -- training ----------------------------------------------------------------------
    def _check_masks(self, masks: Any) -> np.ndarray:
        m = np.asarray(masks)
        if m.dtype != np.bool_ or m.ndim != 2:
            raise InputError(f"masks must be a 2-D boolean array (m, n_train), got "
                             f"{m.dtype} {m.shape}")
        if m.shape[1] != self.n_train:
            raise LengthMismatchError(f"masks have {m.shape[1]} columns but the retrainer has "
                                      f"{self.n_train} training points")
        empty = np.flatnonzero(~m.any(1))
        if len(empty):
            raise InputError(f"mask row(s) {empty[:5].tolist()} select no training point; "
                             "every subset needs at least one")
        return m

    def __call__(self, masks: Any, seed: int) -> np.ndarray:
        """Targets ``(m, n_test)`` float64 of the models trained on each row of ``masks`` with
        training seed ``seed``."""
        m = self._check_masks(masks)
        with torch_threads(self.num_threads):
            if self.stacked:
                return self._stacked_targets(m, int(seed))
            return self._single_targets(m, int(seed))

    def _utility(self, seed: int) -> TorchBatchUtility:
        with self._lock:
            u = self._utilities.get(seed)
        if u is None:
            x, y, xt, yt = self._tensors()
            net, cfg = self.seeded(seed)
            u = TorchBatchUtility(net, (xt, yt), config=cfg, loss=self.loss, dtype=self.dtype,
                                  device=self.device, models_per_pass=self.models_per_pass,
                                  num_threads=None).with_data(x, y)
            with self._lock:
                self._utilities[seed] = u
                while len(self._utilities) > 4:
                    self._utilities.popitem(last=False)
        return u

    @torch.no_grad()
    def _eval(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        _, _, xt, yt = self._tensors()
        parts = []
        for a in range(0, len(xt), self.eval_batch_size):
            b = a + self.eval_batch_size
            parts.append(model_targets(forward(xt[a:b]), yt[a:b], self.target, self.loss))
        return torch.cat(parts, dim=-1)

    def _stacked_targets(self, masks: np.ndarray, seed: int) -> np.ndarray:
        u = self._utility(seed)
        out = np.empty((len(masks), self.n_test))
        for s in range(0, len(masks), self.models_per_pass):
            params = u.train(masks[s : s + self.models_per_pass])
            meta = copy.deepcopy(u._meta).eval()
            fwd = u._forward(meta, shared=True)
            out[s : s + self.models_per_pass] = self._eval(
                lambda xb, p=params, f=fwd: f(p, xb)).cpu().numpy()
        return out

    def _single_targets(self, masks: np.ndarray, seed: int) -> np.ndarray:
        x, y, _, _ = self._tensors()
        net0, cfg = self.seeded(seed)
        net0 = net0.to(dtype=self.dtype, device=self.device)
        out = np.empty((len(masks), self.n_test))
        for r, row in enumerate(masks):
            idx = torch.as_tensor(np.flatnonzero(row), device=self.device)
            net = train_module(copy.deepcopy(net0), x[idx], y[idx], cfg, loss=self.loss)
            out[r] = self._eval(net).cpu().numpy()
        return out
