"""Ensembles of influence models: the (weighted) mean of the influences of ``M`` members.

Members are fitted influence models (any method: Direct, CG, LiSSA, Arnoldi, Nystroem, EK-FAC
with or without compressed ``rank=``, TracInCP; with or without ``projection=``) of networks
trained on the same training set (independently trained seeds, or checkpoints of one run)::

    influences[t, r]     = sum_m w_m influences_m[t, r]          (w_m = 1/M by default)
    self_influence[r]    = sum_m w_m self_influence_m[r]

(weights are normalised to sum to 1; the sign convention of every member is kept: positive =
training point ``r`` is helpful to test point ``t``). Averaging over independently trained
networks is the largest single lever on attribution quality (TRAK).

To the calculators an ensemble is one influence model in the feature-space split they use
(:mod:`dvl_ooc.calculator.plan`), as :class:`~dvl_ooc.influence.tracin.TracInCP` presents its
sum over checkpoints: with member widths ``p_m`` (gradients), ``kt_m`` / ``kr_m`` (test /
train features)::

    gradients(x, y)    = [g_1 | ... | g_M]                    (n, sum p_m): M gradient passes,
                                                             each member on its own network
    test_features(g)   = [test_features_m(g_m)]_m             (n, sum kt_m)
    train_features(g)  = [train_features_m(g_m)]_m            (n, sum kr_m); ``g`` itself when
                                                             every member's is the identity
    tile(T, R)         = sum_m w_m tile_m(T_m, R_m)           (n_test, n_train)
    paired(T, R)       = sum_m w_m paired_m(T_m, R_m)         (n,)

so ONE store is written, each tile averaged on the worker that computes it (never ``M``
matrices), and structured members keep their own tiles (EK-FAC's low-rank test factors are
contracted by EK-FAC's ``tile``). The weights are applied to each member's tile, not to its
features (a compressed EK-FAC row ``(U S, V)`` is not linear in a scale factor).
Costs: the sums of the members' costs (gradient passes, solves, features, tile products); the
calculators' memory plan (:class:`~dvl_ooc.calculator.InfluencePlan`) sees ``p = sum p_m``
and ``k = sum k_m`` (a column task holds every member's train gradients and test features of
its chunks: ``M`` times one member's, so chunks shrink accordingly), no train features when
every member's are its gradients (they are then ``g`` itself), and on top one member's rows
in flight (its gradients or features, before they are copied into the ensemble's array) and,
with two or more members, the running sum of a tile next to the member's tile.

Usage (``nets``: networks trained on ``(x, y)`` from different seeds)::

    ens = Ensemble.from_models(nets, lambda net: EkfacInfluence(net, F.cross_entropy, rank=8))
    ens.fit((x, y), client=client)            # one task per member; or in process
    DaskInfluenceCalculator(ens, client).to_zarr("run.zarr", x_test, y_test, x, y)

Shipping: the ensemble pickles as its members do (data-free: CG / LiSSA members drop their fit
data). Members that need their fit data to precondition get it re-attached together: all
members were fitted on the same training set, so ``attach_data(data)`` and the calculators'
``fit_data=`` serve every one of them.

Fitting: :meth:`Ensemble.fit` fits the members in this process or, with ``client=``, on the
workers of a Dask cluster, one task per member (the member, with its network, is the task's
argument; the fit data one task whose result the workers fetch; each task returns the member's
data-free fitted state, loaded into the local member).

Errors: :class:`~dvl_ooc.exceptions.InputError` for an empty member list or bad weights,
:class:`~dvl_ooc.exceptions.EnsembleMismatchError` for members that cannot be averaged
(fitted on training sets of different sizes, features of different dtypes or devices, a mix
of fitted and unfitted members in :meth:`Ensemble.fit` unless told), and
:class:`~dvl_ooc.exceptions.NotFittedError` where a fitted member is needed.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import DataLike, num_samples
from ..exceptions import (
    EnsembleMismatchError,
    InputError,
    LengthMismatchError,
    NotFittedError,
)
from ..grads import ParamBlock
from .base import Damping, InfluenceModel
from .tracin import TracInCP

__all__ = ["Ensemble"]

Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike


# ---------------------------------------------------------------------- member widths
def _fit_free(m: InfluenceModel) -> bool:
    """Members with nothing to estimate from data (TracIn: identity curvature; always
    fitted, ``n_fit == 0``): neutral for the fit-state and training-set-size checks."""
    return isinstance(m, TracInCP)


def _grad_width(m: InfluenceModel) -> int:
    """Columns of ``m.gradients(x, y)`` (TracInCP: its features over checkpoints)."""
    if isinstance(m, TracInCP):
        return int(m.feature_dim)
    return int(m.grads.num_params)


def _feature_widths(m: InfluenceModel) -> tuple[int, int]:
    """``m.feature_dims()``; the gradient width for a member that cannot tell without its
    fit data but whose features are its gradients (CG / LiSSA: the gradients and their
    solves). A member whose widths come from its fit (Arnoldi, Nystroem) raises
    :class:`NotFittedError`."""
    try:
        kt, kr = m.feature_dims()
    except NotFittedError:
        if type(m).train_features is not InfluenceModel.train_features:
            raise NotFittedError(
                f"ensemble member {type(m).__name__}: the width of its features comes from its "
                "fit; fit the ensemble first (a few samples do for a plan: the width does not "
                "depend on how many)") from None
        kt = kr = _grad_width(m)
    return int(kt), int(kr)


def _split(t: torch.Tensor, widths: Sequence[int], what: str) -> tuple[torch.Tensor, ...]:
    if t.ndim != 2 or t.shape[1] != sum(widths):
        raise InputError(f"expected {what} of shape (n, {sum(widths)}) (members' widths "
                         f"{list(widths)}), got {tuple(t.shape)}")
    return t.split(list(widths), dim=1)


def _accumulate(out: torch.Tensor | None, part: torch.Tensor, w: float) -> torch.Tensor:
    """``out + w * part`` (in place; ``w * part`` for the first member). Callers pass the
    member's result without keeping a name for it, so that it is freed here: one member's
    result in flight next to the sum, never two."""
    if out is None:
        return part if w == 1.0 else part * w
    return out.add_(part, alpha=w)


def _batch(batch_size: int | None) -> dict[str, int]:
    """``batch_size=`` for the members' in-memory paths, passed only when given."""
    if batch_size is None:
        return {}
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    return {"batch_size": batch_size}


def _load_checkpoint(c: Checkpoint) -> Mapping[str, torch.Tensor]:
    """A state dict from a mapping or a file (a dict with ``"state_dict"`` or
    ``"model_state_dict"`` works too, as for :class:`TracInCP`)."""
    if isinstance(c, Mapping):
        return c
    path = os.fspath(c)
    if not os.path.exists(path):
        raise InputError(f"checkpoint file {path!r} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict"):
        if isinstance(blob, Mapping) and isinstance(blob.get(key), Mapping):
            blob = blob[key]
    return blob


# ---------------------------------------------------------------------- worker task
def _hold(obj: Any) -> Any:
    """A task whose result is its argument (the fit data, fetched by the fit tasks)."""
    return obj


def _fit_member_task(member: InfluenceModel, data: DataLike
                     ) -> tuple[dict[str, Any], dict[str, Any], list[tuple[type, str]]]:
    """Fit one member on a worker; return its data-free fitted state, its ``info`` (plain
    data) and the warnings the fit raised (re-raised on the client)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        member.fit(data)
        state = member.state()
    return state, member.info, [(w.category, str(w.message)) for w in caught]


# ---------------------------------------------------------------------- gradients view
class EnsembleGradients:
    """What the calculators read from ``model.grads`` of an ensemble: the members' gradient
    passes side by side (a view of the members, holds nothing of its own)."""

    def __init__(self, members: Sequence[InfluenceModel]) -> None:
        self.members = members

    @property
    def widths(self) -> list[int]:
        """Per member, the width ``p_m`` of its gradients."""
        return [_grad_width(m) for m in self.members]

    @property
    def num_params(self) -> int:
        """``sum p_m``: the width of :meth:`per_sample_grads` rows."""
        return sum(self.widths)

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].grads.dtype

    @property
    def device(self) -> torch.device:
        return self.members[0].grads.device

    @property
    def micro_batch_size(self) -> int:
        """For memory plans: the micro-batch of one ``sum p_m``-wide gradient pass whose
        transient memory equals that of the largest member pass (members run one after
        another): ``max_m(mb_m p_m) // sum p_m``, at least 1."""
        w = self.widths
        peak = max(int(getattr(m.grads, "micro_batch_size", 64)) * p
                   for m, p in zip(self.members, w))
        return max(1, peak // max(1, sum(w)))

    @property
    def blocks(self) -> list[ParamBlock]:
        return [b for m in self.members for b in m.blocks]

    @property
    def layers(self) -> None:
        return None

    def per_sample_grads(self, x: Any, y: Any) -> torch.Tensor:
        """``[g_1 | ... | g_M]``: each member's gradients (on its own network), copied into
        one ``(n, sum p_m)`` array as they come (one member's in flight, not ``M``)."""
        out: torch.Tensor | None = None
        o = 0
        for m, p in zip(self.members, self.widths):
            g = m.gradients(x, y)
            if out is None:
                out = torch.empty(g.shape[0], self.num_params, dtype=g.dtype, device=g.device)
            out[:, o : o + p] = g
            o += p
            del g
        assert out is not None
        return out


# ---------------------------------------------------------------------- the model
class Ensemble(InfluenceModel):
    """The (weighted) mean of the influences of ``M`` fitted influence models.

    Args:
        members: influence models (any method, mixed methods allowed) of networks trained on
            the same training set, fitted or not (then call :meth:`fit`). Their features must
            share one dtype and device. They are used as they are (not copied). A member that
            is itself an ``Ensemble`` contributes its members, with its weights multiplied by
            its own weight (the ensemble is flat).
        weights: ``None`` (the plain mean, ``w_m = 1/M``) or one non-negative number per
            member, normalised to sum to 1.

    Build one from trained networks and a method factory with :meth:`from_models`, or from
    checkpoints of one run with :meth:`from_checkpoints`.

    Raises:
        InputError: no members, a member that is not an influence model, bad weights.
        LengthMismatchError: as many weights as members are needed.
        EnsembleMismatchError: members fitted on different numbers of training samples, or
            computing in different dtypes or on different devices.
    """

    def __init__(self, members: Sequence[InfluenceModel], *,
                 weights: Sequence[float] | None = None) -> None:
        if isinstance(members, InfluenceModel) or not isinstance(members, Sequence):
            raise InputError("members must be a list of influence models (a list of one "
                             "for a single model)")
        members = list(members)
        if not members:
            raise InputError("an Ensemble needs at least one member influence model")
        for i, m in enumerate(members):
            if not isinstance(m, InfluenceModel):
                raise InputError(f"member {i} is a {type(m).__name__}, not a dvl_ooc influence "
                                 "model (DirectInfluence, EkfacInfluence, TracInCP, ...)")
        w = self._normalised(weights, len(members))
        flat: list[InfluenceModel] = []
        self._weights: list[float] = []
        for m, wm in zip(members, w):  # nested ensembles: their members, weights multiplied
            inner = m.members if isinstance(m, Ensemble) else [m]
            inner_w = m.weights if isinstance(m, Ensemble) else [1.0]
            flat += inner
            self._weights += [wm * v for v in inner_w]
        self.members: list[InfluenceModel] = flat
        self._curvature: dict[str, Any] | None = None
        self._check_compatible()

    @property
    def weights(self) -> list[float]:
        """``w_m``, normalised to sum to 1; assigning one number per member normalises them."""
        return list(self._weights)

    @weights.setter
    def weights(self, weights: Sequence[float]) -> None:
        self._weights = self._normalised(weights, len(self.members))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(cls, models: Sequence[nn.Module],
                    make_member: Callable[[nn.Module], InfluenceModel], *,
                    weights: Sequence[float] | None = None) -> Ensemble:
        """One member per trained network: ``make_member(model)`` builds the (unfitted or
        fitted) influence model of each, e.g.
        ``Ensemble.from_models(nets, lambda m: EkfacInfluence(m, F.cross_entropy, rank=8))
        .fit(train)``."""
        models = list(models)
        if not models:
            raise InputError("from_models needs at least one network")
        if not callable(make_member):
            raise InputError("make_member must be a callable nn.Module -> InfluenceModel")
        return cls([make_member(m) for m in models], weights=weights)

    @classmethod
    def from_checkpoints(cls, model: nn.Module, checkpoints: Sequence[Checkpoint],
                         make_member: Callable[[nn.Module], InfluenceModel], *,
                         weights: Sequence[float] | None = None) -> Ensemble:
        """One member per checkpoint (a state dict or the path of a file holding one): each
        is loaded into its own copy of ``model`` (the caller's is untouched) and given to
        ``make_member``. Holds ``M`` copies of the network."""
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not checkpoints:
            raise InputError("checkpoints must be a non-empty list of state dicts or paths")
        nets = []
        for i, c in enumerate(checkpoints):
            net = copy.deepcopy(model)
            try:
                net.load_state_dict(_load_checkpoint(c))
            except RuntimeError as e:
                raise InputError(f"checkpoint {i} does not match the model architecture: "
                                 f"{str(e).splitlines()[0]}") from e
            nets.append(net)
        return cls.from_models(nets, make_member, weights=weights)

    @staticmethod
    def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
        if weights is None:
            return [1.0 / n] * n
        try:
            w = [float(v) for v in weights]
        except (TypeError, ValueError) as e:
            raise InputError(f"weights must be numbers, got {weights!r}") from e
        if len(w) != n:
            raise LengthMismatchError(f"{n} members but {len(w)} weights; pass one weight per "
                                      "member (or none for the plain mean)")
        if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
            raise InputError(f"weights must be finite, >= 0 and not all 0, got {w}")
        s = math.fsum(w)
        return [v / s for v in w]

    def _check_compatible(self) -> None:
        """Members that cannot be averaged: different dtypes, devices or training-set sizes."""
        ms = self.members
        dtypes = [m.grads.dtype for m in ms]
        if len(set(dtypes)) > 1:
            raise EnsembleMismatchError(
                f"members compute in different dtypes {[str(d) for d in dtypes]}; build every "
                "member on networks of one dtype (e.g. model.double()) and one projection dtype")
        devices = [torch.device(m.grads.device) for m in ms]
        if len(set(devices)) > 1:
            raise EnsembleMismatchError(
                f"members live on different devices {[str(d) for d in devices]}; move every "
                "member to one device first (member.to(device))")
        sizes = {i: m.n_fit for i, m in enumerate(ms) if m.is_fitted and not _fit_free(m)}
        if len(set(sizes.values())) > 1:
            raise EnsembleMismatchError(
                f"members were fitted on training sets of different sizes (member: n_fit "
                f"{sizes}); an ensemble averages models of ONE training set: refit them on "
                "the same data (Ensemble.fit(data, refit=True))")

    # ------------------------------------------------------------------ configuration
    @property
    def grads(self) -> EnsembleGradients:  # type: ignore[override]
        """The members' gradient passes side by side (:class:`EnsembleGradients`)."""
        return EnsembleGradients(self.members)

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        """Not defined: an ensemble has one network per member (:attr:`models`)."""
        raise AttributeError("an Ensemble has one network per member: use .models (or "
                             ".members[i].model)")

    @property
    def models(self) -> list[nn.Module]:
        """The members' networks."""
        return [m.model for m in self.members]

    @property
    def loss(self) -> Any:  # type: ignore[override]
        """Not defined: each member has its own loss (``members[i].loss``)."""
        raise AttributeError("an Ensemble has one loss per member: use .members[i].loss")

    @property
    def blocks(self) -> list[ParamBlock]:  # type: ignore[override]
        """The members' curvature blocks, member after member."""
        return self.grads.blocks

    @property
    def layers(self) -> None:  # type: ignore[override]
        return None

    @property
    def hessian_mode(self) -> str:  # type: ignore[override]
        """The members' common curvature mode, or ``"mixed"``."""
        modes = {m.hessian_mode for m in self.members}
        return modes.pop() if len(modes) == 1 else "mixed"

    @property
    def projector(self) -> Any:
        """The first member's projector when every member projects its gradients (the
        calculators only ask whether features are projected), else ``None``."""
        ps = [m.projector for m in self.members]
        return ps[0] if all(p is not None for p in ps) else None

    @property
    def is_fitted(self) -> bool:
        return all(m.is_fitted for m in self.members)

    @property
    def n_fit(self) -> int | None:  # type: ignore[override]
        """The members' common number of fit samples (0 when every member is fit-free, like
        TracIn); ``None`` while a member is unfitted."""
        if not self.is_fitted:
            return None
        sizes = [m.n_fit for m in self.members if not _fit_free(m)]
        return int(sizes[0]) if sizes else 0

    @property
    def needs_data_to_precondition(self) -> bool:  # type: ignore[override]
        """Whether a member (CG, LiSSA) needs the fit data to precondition."""
        return any(m.needs_data_to_precondition for m in self.members)

    @property
    def _fit_data(self) -> Any:  # type: ignore[override]
        """The fit data attached to the members that need it (``None`` unless every one of
        them has it): what the calculators ship to their workers."""
        need = [m for m in self.members if m.needs_data_to_precondition]
        if not need or any(m._fit_data is None for m in need):
            return None
        return need[0]._fit_data

    def attach_data(self, data: DataLike) -> Ensemble:
        """Re-attach the fit data to the members that need it to precondition (CG, LiSSA)."""
        for m in self.members:
            if m.needs_data_to_precondition:
                m.attach_data(data)
        return self

    @property
    def regularization(self) -> dict[str, Any]:  # type: ignore[override]
        """``lambda`` per member block, keyed ``"<member>/<block>"``. Assigning a value (a
        float, a :class:`~dvl_ooc.influence.Relative` or its string) sets it on every member
        (each re-resolves it from its own spectrum); a mapping with those keys sets each."""
        return {f"{i}/{k}": v for i, m in enumerate(self.members)
                for k, v in m.regularization.items()}

    @regularization.setter
    def regularization(self, value: Damping | Mapping[str, Damping]) -> None:
        if not isinstance(value, Mapping):
            for m in self.members:
                if not _fit_free(m):
                    m.regularization = value  # type: ignore[assignment]
            return
        have = set(self.regularization)
        if set(value) != have:
            raise InputError(f"regularization mapping must have exactly the keys {sorted(have)}"
                             f"; missing {sorted(have - set(value))}, unknown "
                             f"{sorted(set(value) - have)}")
        for i, m in enumerate(self.members):
            mine = {k.split("/", 1)[1]: v for k, v in value.items()
                    if k.split("/", 1)[0] == str(i)}
            if mine and not _fit_free(m):
                m.regularization = mine  # type: ignore[assignment]

    @property
    def info(self) -> dict[str, Any]:  # type: ignore[override]
        """Diagnostics as plain data (read-only): ``fit`` and ``solve`` (the members' entries,
        each with its ``member`` index), ``curvature`` (the last :meth:`diagnostics` report)
        and ``members`` (each member's own ``info``)."""
        return {
            "fit": [{**d, "member": i} for i, m in enumerate(self.members)
                    for d in m.info.get("fit", [])],
            "solve": [{**d, "member": i} for i, m in enumerate(self.members)
                      for d in m.info.get("solve", [])],
            "curvature": self._curvature,
            "members": [m.info for m in self.members],
        }

    def config(self) -> dict[str, Any]:
        """Plain data: ``{"method": "Ensemble", "weights": [...], "members": [member
        configs]}`` (what stores record and match on resume)."""
        return {"method": type(self).__name__, "weights": list(self.weights),
                "members": [m.config() for m in self.members]}

    def fingerprint(self) -> str:
        """Hash of the weights and of every member's fingerprint (configuration, network
        weights, fitted state): it changes when any member changes."""
        h = hashlib.sha256()
        h.update(f"Ensemble|{self.weights!r}".encode())
        for m in self.members:
            h.update(m.fingerprint().encode())
        return h.hexdigest()[:32]

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.members)
        fitted = f"fitted on {self.n_fit}" if self.is_fitted else "not fitted"
        w = "" if len(set(self.weights)) == 1 else f", weights={self.weights}"
        return f"Ensemble([{names}]{w}, {fitted})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()  # members pickle data-free themselves

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    # ------------------------------------------------------------------ fitting
    def fit(self, data: DataLike, *, client: Any = None, refit: bool | None = None,
            progress: bool = False) -> Ensemble:
        """Fit the members on ``data`` (the training set of every member's network).

        Args:
            data: ``(x, y)``, a Dataset or a DataLoader (as for any influence model).
            client: a ``distributed.Client``: fit the members on its workers, one task per
                member (the member and its network are the task's argument, the data one
                task fetched by the workers); each returns the member's data-free state,
                loaded into the member here. ``None``: one after another in this process.
            refit: ``None`` (default): fit the unfitted members when none is fitted; when all
                are, nothing is estimated (the data is checked and attached where needed);
                a mix raises :class:`~dvl_ooc.exceptions.EnsembleMismatchError`.
                ``False``: fit only the unfitted members (the fitted ones must have been fitted
                on as many samples). ``True``: fit every member again.
            progress: show each member's fit progress bar (in this process; with ``client``
                a bar over the member tasks).
        """
        n = num_samples(data)
        ms = self.members
        unfitted = [i for i, m in enumerate(ms) if not m.is_fitted]
        fitted = [i for i, m in enumerate(ms) if m.is_fitted and not _fit_free(m)]
        if refit:
            todo = [i for i, m in enumerate(ms) if not _fit_free(m)]
        else:
            if refit is None and unfitted and fitted:
                raise EnsembleMismatchError(
                    f"members {fitted} are fitted and members {unfitted} are not; pass "
                    "refit=False to fit only the unfitted ones (keeping the others) or "
                    "refit=True to fit every member again")
            todo = unfitted
            wrong = {i: ms[i].n_fit for i in fitted if ms[i].n_fit != n}
            if wrong:
                raise EnsembleMismatchError(
                    f"members {sorted(wrong)} were fitted on {sorted(set(wrong.values()))} "
                    f"samples, the data has {n}; pass refit=True to fit every member on it")
        if todo:
            if client is None:
                for i in todo:
                    ms[i].fit(data, **({"progress": True} if progress else {}))
            else:
                self._fit_on_workers(client, todo, data, progress)
        for m in ms:
            if m.needs_data_to_precondition and m._fit_data is None:
                m.attach_data(data)
        self._curvature = None
        self._check_compatible()
        return self

    def _fit_on_workers(self, client: Any, todo: Sequence[int], data: DataLike,
                        progress: bool = False) -> None:
        token = uuid.uuid4().hex
        data_f = client.submit(_hold, data, pure=False, key=f"dvl-ensemble-data-{token}")
        futures = [client.submit(_fit_member_task, self.members[i], data_f, pure=False,
                                 key=f"dvl-ensemble-fit-{i}-{token}") for i in todo]
        try:
            if progress:
                from distributed import as_completed

                from ..runtime import progress as _progress

                with _progress(True, total=len(futures), unit="member",
                               desc="Ensemble.fit") as bar:
                    for _ in as_completed(futures):
                        bar.update(1)
            results = client.gather(futures)
        finally:
            client.cancel([*futures, data_f])
        for i, (state, info, caught) in zip(todo, results):
            m = self.members[i]
            m.load_state(state)
            m.info = info
            for category, message in caught:
                warnings.warn(f"ensemble member {i} ({type(m).__name__}): {message}",
                              category, stacklevel=3)

    # ------------------------------------------------------------------ checks
    def _check_fitted(self) -> None:
        """Every member fitted (with its fit data where needed), all still compatible (a
        member moved or converted after construction is refused here, not mid-tile)."""
        self._check_compatible()
        for i, m in enumerate(self.members):
            try:
                m._check_fitted()
            except NotFittedError as e:
                raise NotFittedError(f"ensemble member {i}: {e}") from None

    # ------------------------------------------------------------------ influence
    def gradients(self, x: Any, y: Any) -> torch.Tensor:
        """``[g_1 | ... | g_M]`` of shape ``(n, sum p_m)``: each member's gradients (or
        features, with ``projection=`` / TracIn) on its own network."""
        return self.grads.per_sample_grads(x, y)

    def _dims(self) -> tuple[list[int], list[int], list[int]]:
        ws = [_feature_widths(m) for m in self.members]
        return self.grads.widths, [w[0] for w in ws], [w[1] for w in ws]

    def _apply(self, fn: Callable[[InfluenceModel, torch.Tensor], torch.Tensor],
               g: torch.Tensor, out_widths: Sequence[int], scale: bool) -> torch.Tensor:
        """``[fn(member_m, g_m) (* w_m)]_m`` written into one ``(n, sum out_widths)`` array."""
        parts = _split(g, self.grads.widths, "gradients")
        out = torch.empty(g.shape[0], sum(out_widths), dtype=g.dtype, device=g.device)
        o = 0
        for m, w, part, k in zip(self.members, self._weights, parts, out_widths):
            r = fn(m, part)
            out[:, o : o + k] = r * w if scale else r
            o += k
        return out

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``[w_m (H_m + lambda_m I)^{-1} g_m]_m``: each member's preconditioning of its
        segment, weighted, so that ``<precondition(g_t), g_r>`` is the ensemble's influence
        (for uncompressed members)."""
        self._check_fitted()
        return self._apply(lambda m, p: m.precondition(p), g, self.grads.widths, True)

    def test_features(self, g: torch.Tensor) -> torch.Tensor:
        """``[test_features_m(g_m)]_m``, ``(n, sum kt_m)`` (unweighted: :meth:`tile` weights
        each member's tile)."""
        self._check_fitted()
        return self._apply(lambda m, p: m.test_features(p), g, self._dims()[1], False)

    def train_features(self, g: torch.Tensor) -> torch.Tensor:
        """``[train_features_m(g_m)]_m``, ``(n, sum kr_m)``; ``g`` itself (no copy) when every
        member's train features are its gradients (Direct, CG, LiSSA, EK-FAC, TracIn)."""
        self._check_fitted()
        if all(type(m).train_features is InfluenceModel.train_features for m in self.members):
            _split(g, self.grads.widths, "gradients")
            return g
        return self._apply(lambda m, p: m.train_features(p), g, self._dims()[2], False)

    def feature_dims(self) -> tuple[int, int]:
        """``(sum kt_m, sum kr_m)``."""
        _, kt, kr = self._dims()
        return sum(kt), sum(kr)

    def _reduce(self, name: str, test_features: torch.Tensor, train_features: torch.Tensor
                ) -> torch.Tensor:
        _, kt, kr = self._dims()
        Ts = _split(test_features, kt, "test features")
        Rs = _split(train_features, kr, "train features")
        out: torch.Tensor | None = None
        for m, w, T, R in zip(self.members, self._weights, Ts, Rs):
            out = _accumulate(out, getattr(m, name)(T, R), w)
        assert out is not None
        return out

    def tile_multiply_adds(self, n_test: int, n_train: int, k_train: int | None = None) -> int:
        """The members' tile costs, summed (``k_train`` is ignored: each member's own)."""
        _, _, kr = self._dims()
        return sum(m.tile_multiply_adds(n_test, n_train, k) for m, k in zip(self.members, kr))

    def tile(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """``sum_m w_m tile_m(T_m, R_m)``: ``(n_test, n_train)``, one member's tile in flight."""
        return self._reduce("tile", test_features, train_features)

    def paired(self, test_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
        """``sum_m w_m paired_m(T_m, R_m)``: the diagonal of :meth:`tile`, ``(n,)``."""
        return self._reduce("paired", test_features, train_features)

    def influence_factors(self, x: Any, y: Any, *, batch_size: int | None = None
                          ) -> torch.Tensor:
        """``[w_m factors_m(x, y)]_m`` of shape ``(n, sum p_m)``: each member's influence
        factors (EK-FAC ``rank=``: its expanded compressed factors), weighted, so that
        :meth:`influences_from_factors` gives the ensemble's influences. ``batch_size``
        (when given) goes to each member."""
        self._check_fitted()
        kw = _batch(batch_size)
        parts = [w * m.influence_factors(x, y, **kw)
                 for m, w in zip(self.members, self._weights)]
        return torch.cat(parts, dim=1)

    def influences_from_factors(self, factors: torch.Tensor, x: Any, y: Any, *,
                                batch_size: int | None = None) -> torch.Tensor:
        """``sum_m factors_m @ g_m(x, y).T`` for factors from :meth:`influence_factors`."""
        self._check_fitted()
        parts = _split(factors, self.grads.widths, "factors")
        kw = _batch(batch_size)
        out: torch.Tensor | None = None
        for m, F in zip(self.members, parts):
            out = _accumulate(out, m.influences_from_factors(F, x, y, **kw), 1.0)
        assert out is not None
        return out

    def influences(self, x_test: Any, y_test: Any, x: Any | None = None, y: Any | None = None,
                   *, batch_size: int | None = None) -> torch.Tensor:
        """``sum_m w_m influences_m`` ``(n_test, n_train)``, each member's own
        :meth:`~InfluenceModel.influences` (``batch_size``, when given, goes to each), one
        member's matrix in flight; with ``x=y=None`` the test set against itself."""
        if (x is None) != (y is None):
            raise InputError("pass both x and y, or neither")
        self._check_fitted()
        kw = _batch(batch_size)
        out: torch.Tensor | None = None
        for m, w in zip(self.members, self._weights):
            out = _accumulate(out, m.influences(x_test, y_test, x, y, **kw), w)
        assert out is not None
        return out

    def self_influence(self, x: Any, y: Any, *, batch_size: int | None = None
                       ) -> torch.Tensor:
        """``sum_m w_m self_influence_m(x, y)``, shape ``(n,)``."""
        self._check_fitted()
        kw = _batch(batch_size)
        out: torch.Tensor | None = None
        for m, w in zip(self.members, self._weights):
            out = _accumulate(out, m.self_influence(x, y, **kw), w)
        assert out is not None
        return out

    def _solve_bytes(self, block: ParamBlock, n_rows: int, rows: int) -> int:
        """For memory plans: the work of the member owning ``block`` when it preconditions
        ``n_rows`` gradients (its own ``_solve_bytes`` with its ``rhs_chunk``; 0 for direct
        members), on top of the ensemble's ``(n_rows, sum kt_m)`` result."""
        item = self.grads.dtype.itemsize
        k_all = self.feature_dims()[0]
        for m in self.members:
            if any(b is block for b in m.blocks):
                solve = getattr(m, "_solve_bytes", None)
                if solve is None:
                    break
                r = min(int(getattr(m, "rhs_chunk", None) or n_rows), n_rows)
                own = solve(block, n_rows, r) - n_rows * _feature_widths(m)[0] * item
                return max(0, own) + n_rows * k_all * item
        return n_rows * k_all * item

    # ------------------------------------------------------------------ diagnostics, state
    def diagnostics(self, data: DataLike | None = None, *, estimate: bool = True,
                    **kwargs: Any) -> dict[str, Any]:
        """The members' curvature reports in the format of
        :meth:`InfluenceModel.diagnostics`: ``blocks`` lists every member's blocks (named
        ``"<member>/<block>"``, with ``member``), ``indefinite`` is True when a member's is,
        ``members`` holds the members' own reports. ``data`` and ``estimate`` go to each."""
        self._check_fitted_states()
        reports = [m.diagnostics(data, estimate=estimate, **kwargs) for m in self.members]
        blocks = [{**b, "block": f"{i}/{b.get('block')}", "member": i}
                  for i, r in enumerate(reports) for b in r.get("blocks", [])]
        flags = [r.get("indefinite") for r in reports]
        advice = next((f"member {i}: {r['advice']}" for i, r in enumerate(reports)
                       if r.get("advice")), None)
        self._curvature = {
            "method": type(self).__name__,
            "hessian": self.hessian_mode,
            "indefinite": True if any(f is True for f in flags) else (
                False if all(f is False for f in flags) else None),
            "advice": advice,
            "blocks": blocks,
            "members": reports,
        }
        return copy.deepcopy(self._curvature)

    def _check_fitted_states(self) -> None:
        """Every member has its fitted state (its fit data is not needed)."""
        for i, m in enumerate(self.members):
            if not m.is_fitted:
                raise NotFittedError(f"ensemble member {i} ({type(m).__name__}) is not "
                                     "fitted; call ensemble.fit(train_data)")

    def state(self) -> dict[str, Any]:
        """Data-free fitted state: the configuration, the weights and every member's state."""
        self._check_fitted()
        return {"config": self.config(), "n_fit": self.n_fit, "weights": list(self.weights),
                "members": [m.state() for m in self.members]}

    def load_state(self, state: Mapping[str, Any]) -> Ensemble:
        """Restore a state from :meth:`state` into an ensemble of like-configured members."""
        cfg = state.get("config", {})
        if cfg.get("method") != type(self).__name__:
            raise InputError(f"not an Ensemble state (method {cfg.get('method')!r})")
        states = state["members"]
        if len(states) != len(self.members):
            raise EnsembleMismatchError(f"the state has {len(states)} members, this ensemble "
                                        f"{len(self.members)}")
        if list(state["weights"]) != list(self.weights):
            raise InputError(f"the state has weights {state['weights']}, this ensemble "
                             f"{self.weights}")
        for m, s in zip(self.members, states):
            m.load_state(s)
        self._curvature = None
        self._check_compatible()
        return self

    def save(self, path: str) -> None:
        """Save the fitted state and every member's network weights (``torch.save``)."""
        torch.save({"state": self.state(),
                    "models": [m.model.state_dict() for m in self.members]}, path)

    def load(self, path: str) -> Ensemble:
        """Load a file written by :meth:`save` into this (like-configured) ensemble."""
        blob = torch.load(path, map_location=self.grads.device, weights_only=False)
        if len(blob["models"]) != len(self.members):
            raise EnsembleMismatchError(f"the file has {len(blob['models'])} members, this "
                                        f"ensemble {len(self.members)}")
        for m, sd in zip(self.members, blob["models"]):
            m.model.load_state_dict(sd)
        return self.load_state(blob["state"])

    def to(self, device: str | torch.device) -> Ensemble:
        """Move every member (network and fitted state) to ``device``."""
        for m in self.members:
            m.to(device)
        return self
