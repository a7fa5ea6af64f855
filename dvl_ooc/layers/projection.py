"""Per-layer random projection of per-sample gradients: features of dimension ``k``, not ``p``.

Algorithm (the LoGra idea). The per-sample gradient of a ``Linear``/``Conv2d``/``Embedding``
layer is ``G_i^T A_i = sum_l g_il a_il^T`` (output gradient times input, over the ``L``
positions; :mod:`dvl_ooc.layers.base`). With Gaussian matrices ``P_in`` (``k_in x d_in [+1]``)
and ``P_out`` (``k_out x d_out``) its projection is::

    P_out (G_i^T A_i) P_in^T = sum_l (P_out g_il) (P_in a_il)^T          (k_out x k_in)

so the inputs and the output gradients are projected separately and one small product over
the positions follows (:meth:`~dvl_ooc.layers.LayerKind.project`; a ``Conv2d`` projects its
input by a convolution with ``P_in`` as ``k_in`` filters, without unfolding). The
``d_out x d_in`` per-sample gradient is never formed. As ``vec(P_out M P_in^T) = (P_out (x)
P_in) vec(M)`` this is a random projection of the layer gradient by a Kronecker-structured
matrix. Every other selected trainable parameter (BatchNorm's weight and bias, layer types
without a kind, layers whose options a kind refuses) goes through one dense Gaussian projection
``P_dense`` (``dense_dim x p_other``) of its per-sample gradients: eval-mode BatchNorm
gradients come from the same pass (``sum_pixels g * x_hat`` and ``sum_pixels g``), any other
parameter's from a ``torch.func`` per-sample pass (:class:`~dvl_ooc.grads.ModelGradients`)
restricted to those parameters. Features are the per-layer blocks in model order, each
flattened ``(k_out, k_in)`` row-major, then the dense block (:meth:`GradientProjector.layout`).

Entries of every matrix are ``N(0, 1/k)`` (``k`` its number of rows), so ``E[P^T P] = I`` and
``E[<Pu, Pv>] = <u, v>``: inner products of features are unbiased estimates of gradient inner
products (the Kronecker blocks have relative variance about ``1/k_in + 1/k_out``, so a layer's
error falls like ``k^{-1/2}``). ``k`` is capped at the dimension the matrix acts on, and a
capped side is the identity (``k >= d``: nothing to compress, that side is exact; with every
side capped the features are the exact gradients, rearranged).

Cost per sample and per layer with ``L`` positions: ``2 L (k_in d_in + k_out d_out + k_in
k_out)`` FLOPs (vs ``2 L d_in d_out`` to form the gradient, then ``2 d_in d_out k`` to project
it densely), and temporaries of ``L (k_in + k_out)`` elements (vs ``d_in d_out``); the dense
part costs ``2 p_other dense_dim`` FLOPs and ``p_other`` elements. One forward with hooks and
one backward of the summed loss to the layer outputs give all blocks (the backward stops at the
first selected layer; no parameter ``.grad`` is touched).
:meth:`GradientProjector.project_output_vectors` runs the same machinery with the backward
seeded by given output-space vectors ``v_i`` (features of ``J_i^T v_i``; one forward and one
backward per vector), which gives the projected Gauss-Newton matrix
(:class:`~dvl_ooc.grads.ProjectedGradients`).

Measured (CPU, 2 cores shared with other jobs, float32, best of 5; ``Conv2d(64, 64, 3,
padding=1)`` on 32x32 maps, batch 32, ``k_in = k_out = 16``, raw rows captured once):
:meth:`LayerKind.project <dvl_ooc.layers.LayerKind.project>` 35 ms (21.5 MFLOP and 128 KB of
temporaries per sample, 1 KB of features); materialising the per-sample gradients with the
kind's ``per_sample_grads`` (grouped-convolution kernel, no ``im2col``) 142-148 ms (75.6 MFLOP
and 148 KB per sample) plus 2 ms to project them the same way (a dense ``k = 256`` Gaussian
instead: 38-60 ms more and a 37k x 256 matrix). Whole passes on ``conv -> relu -> pool ->
linear``: :meth:`GradientProjector.project` 0.27-0.41 s (of which the forward is 0.12 s), vs
``ModelGradients.per_sample_grads`` (``torch.func``) then :meth:`project_vectors
<GradientProjector.project_vectors>` 0.57-0.64 s. Float32 agreement of the two routes: 5e-7.

State: the model, the selection, ``k_in``/``k_out``/``dense_dim``, ``seed`` and the shapes. The
matrices are generated on the CPU in float64 from the streams ``(seed, module index, 0 | 1)``
(``P_in`` | ``P_out``; the module's position in ``model.named_modules()``, so a layer's matrices
do not depend on which other layers are selected) and ``(seed, number of modules, 2)`` (dense)
of :mod:`dvl_ooc.seeding`, then cast and moved to the model's device on first use and cached;
they are identical in every process, on every worker and in every run, and never pickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import as_tensor, check_xy
from ..exceptions import InputError, NonFiniteError, UnsupportedModelError
from ..grads.functional import (
    MODEL_LOCK,
    LossFn,
    ModelGradients,
    check_batchnorm_eval,
    select_parameters,
)
from ..seeding import torch_generator
from .base import LAYER_KINDS, LayerKind

__all__ = ["GradientProjector", "ProjectionBlock"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class ProjectionBlock:
    """One block of the features: a layer's Kronecker projection, or the dense block.

    ``name``: the module name (``"<dense>"`` for the dense block); ``kind``: ``"nn.Linear"``,
    ``"nn.Conv2d"``, ``"nn.Embedding"`` or ``"dense"``; ``params``: the parameter names it
    covers; ``start``/``stop``: its feature columns; ``shape``: ``(k_out, k_in)`` or
    ``(dense_dim,)``; ``dims``: ``(d_out, d_in [+1])`` or ``(p_other,)``; ``index``: the
    seeding key."""

    name: str
    kind: str
    params: tuple[str, ...]
    start: int
    stop: int
    shape: tuple[int, ...]
    dims: tuple[int, ...]
    index: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def bias(self) -> bool:
        """Whether a layer block includes the layer's bias (the ones column of ``P_in``)."""
        return self.kind != "dense" and len(self.params) == 2


def _kind(module: nn.Module) -> LayerKind | None:
    for t in type(module).__mro__:
        if t in LAYER_KINDS:
            return LAYER_KINDS[t]
    return None


def _inner_loss(out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``mean_i <out_i, v_i>``: as a mean-reduced "loss" its per-sample gradient is
    ``J_i^T v_i`` (the seed of :meth:`GradientProjector.project_output_vectors`)."""
    return (out * v).sum() / len(out)


def _check_finite(out: torch.Tensor, what: str, check: str) -> None:
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out)).reshape(len(out), -1).any(1).nonzero().flatten()
        raise NonFiniteError(f"non-finite {what} for sample(s) {bad[:10].tolist()}; check "
                             f"{check}")


def _gaussian(seed: int, index: int, which: int, rows: int, cols: int) -> torch.Tensor:
    """``rows x cols`` with entries ``N(0, 1/rows)`` from the stream ``(seed, index, which)``;
    the identity when ``rows >= cols`` (nothing to compress: that side stays exact)."""
    if rows >= cols:
        return torch.eye(cols, dtype=torch.float64)
    g = torch_generator(seed, index, which)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)


class GradientProjector:
    """Projected per-sample gradients: ``(n, k)`` features with ``k = sum_layers k_out k_in +
    dense_dim`` (see the module docstring for the algorithm, cost and state).

    Args:
        model: the network (evaluated as is; BatchNorm must be in eval mode).
        layers: module or parameter names whose trainable parameters are projected
            (:func:`~dvl_ooc.grads.functional.select_parameters`); ``None``: all trainable.
        k_in, k_out: rows of ``P_in`` and ``P_out`` per layer (capped at ``d_in [+1]`` and
            ``d_out``; a capped side is the identity).
        dense_dim: rows of the dense projection of the other parameters (capped at their
            count, then the identity; no dense block without other parameters).
        seed: seed of all matrices (non-negative integer).
        dtype: dtype of the returned features (the projection runs in the model's dtype).
        loss: mean-reduced ``loss(outputs, targets)`` used by :meth:`project` when none is
            given there.
        micro_batch_size: samples per forward/backward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        k_in: int = 16,
        k_out: int = 16,
        dense_dim: int = 64,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        loss: LossFn | None = None,
        micro_batch_size: int = 64,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, v in (("k_in", k_in), ("k_out", k_out), ("dense_dim", dense_dim),
                        ("micro_batch_size", micro_batch_size)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputError(f"dtype must be a floating torch dtype, got {dtype!r}")
        if loss is not None and not callable(loss):
            raise InputError("loss must be a callable loss(outputs, targets)")
        self.model = model
        self.layers = None if layers is None else [layers] if isinstance(layers, str) \
            else list(layers)
        self.k_in, self.k_out, self.dense_dim = int(k_in), int(k_out), int(dense_dim)
        self.seed = int(seed)
        self.dtype = dtype
        self.loss = loss
        self.micro_batch_size = int(micro_batch_size)

        params = select_parameters(model, self.layers)
        self.param_names: list[str] = list(params)
        self.param_shapes: dict[str, tuple[int, ...]] = {n: tuple(p.shape)
                                                         for n, p in params.items()}
        blocks: list[ProjectionBlock] = []
        covered: set[str] = set()
        start = 0
        modules = list(model.named_modules())
        for index, (mname, mod) in enumerate(modules):
            kind = _kind(mod)
            prefix = f"{mname}." if mname else ""
            if kind is None or prefix + "weight" not in params:
                continue
            try:
                kind.check(mod, mname)
            except UnsupportedModelError:
                continue  # options the kind cannot factor: the dense block takes the layer
            bias = kind.has_bias(mod) and prefix + "bias" in params
            names = (prefix + "weight",) + ((prefix + "bias",) if bias else ())
            d_out, d_in = kind.projection_dims(mod, bias=bias)
            shape = (min(self.k_out, d_out), min(self.k_in, d_in))
            stop = start + shape[0] * shape[1]
            blocks.append(ProjectionBlock(mname, kind.name, names, start, stop, shape,
                                          (d_out, d_in), index))
            covered.update(names)
            start = stop
        self.other_names: list[str] = [n for n in self.param_names if n not in covered]
        if self.other_names:
            p_other = sum(math.prod(self.param_shapes[n]) for n in self.other_names)
            dim = min(self.dense_dim, p_other)
            blocks.append(ProjectionBlock("<dense>", "dense", tuple(self.other_names), start,
                                          start + dim, (dim,), (p_other,), len(modules)))
        self.blocks: list[ProjectionBlock] = blocks
        self._cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ description
    @property
    def feature_dim(self) -> int:
        """Columns of the features."""
        return self.blocks[-1].stop

    @property
    def num_params(self) -> int:
        """Number of projected parameters ``p``."""
        return sum(math.prod(s) for s in self.param_shapes.values())

    def layout(self) -> list[ProjectionBlock]:
        """Which feature columns belong to which layer (model order; the dense block last)."""
        return list(self.blocks)

    def config(self) -> dict[str, Any]:
        """Plain-data description (for fingerprints): everything the features depend on
        besides the model's weights and the loss."""
        return {
            "projector": "GradientProjector/1",
            "layers": self.layers,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "dense_dim": self.dense_dim,
            "seed": self.seed,
            "dtype": str(self.dtype).replace("torch.", ""),
            "blocks": [[b.name, b.kind, list(b.params), list(b.shape), list(b.dims), b.index]
                       for b in self.blocks],
        }

    def matrix_bytes(self) -> int:
        """Memory of all projection matrices on the device (in the model's dtype)."""
        total = 0
        for b in self.blocks:
            if b.kind == "dense":
                total += b.shape[0] * b.dims[0]
            else:
                total += b.shape[0] * b.dims[0] + b.shape[1] * b.dims[1]
        return total * self._model_dtype().itemsize

    def bytes_per_sample(self, sample: Any = None) -> int:
        """Estimated memory per sample of :meth:`project` beyond the model's own forward and
        backward (activations and output gradients, as in training): the features, the
        per-layer temporaries ``L (k_in + k_out)`` and the dense part's per-sample gradients
        ``p_other`` (times two, for the ``torch.func`` pass). ``L`` (positions per layer)
        is measured by a forward pass on the first input of ``sample`` (a batch of inputs,
        e.g. ``x[:1]``) when given, else taken as 1 (a lower bound for sequences and
        convolutions)."""
        item = self._model_dtype().itemsize
        positions = self._positions(sample) if sample is not None else {}
        total = self.feature_dim * self.dtype.itemsize
        for b in self.blocks:
            if b.kind == "dense":
                total += 2 * b.dims[0] * item
            else:
                total += positions.get(b.name, 1) * (b.shape[0] + b.shape[1]) * item
        return int(total)

    def _positions(self, sample: Any) -> dict[str, int]:
        x = as_tensor(sample, dtype=self._model_dtype(), device=self._device())
        named = dict(self.model.named_modules())
        found: dict[str, int] = {}
        handles = []
        for b in self.blocks:
            if b.kind == "dense":
                continue

            def hook(mod, inputs, output, name=b.name, conv=b.kind == "nn.Conv2d"):
                found[name] = output[0, 0].numel() if conv else \
                    output[0].numel() // output.shape[-1]

            handles.append(named[b.name].register_forward_hook(hook))
        try:
            with MODEL_LOCK, torch.no_grad():
                self.model(x[:1])
        finally:
            for h in handles:
                h.remove()
        return found

    def __repr__(self) -> str:
        n = sum(b.kind != "dense" for b in self.blocks)
        return (f"GradientProjector(layers={n}, dense={len(self.other_names)} params, "
                f"k_in={self.k_in}, k_out={self.k_out}, dense_dim={self.dense_dim}, "
                f"feature_dim={self.feature_dim}, seed={self.seed})")

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_cache"] = {}  # regenerated from the seed where needed
        return d

    # ------------------------------------------------------------------ matrices
    def _model_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def matrices(self, block: ProjectionBlock, device: Any = None,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """``(P_in, P_out)`` of a layer block, ``(P_dense,)`` of the dense block, on ``device``
        in ``dtype`` (default: the model's), cached."""
        device = torch.device(device) if device is not None else self._device()
        dtype = dtype or self._model_dtype()
        key = (block.index, block.kind, str(device), dtype)
        if key not in self._cache:
            if block.kind == "dense":
                mats = [_gaussian(self.seed, block.index, 2, block.shape[0], block.dims[0])]
            else:
                (k_out, k_in), (d_out, d_in) = block.shape, block.dims
                mats = [_gaussian(self.seed, block.index, 0, k_in, d_in),
                        _gaussian(self.seed, block.index, 1, k_out, d_out)]
            self._cache[key] = tuple(m.to(device=device, dtype=dtype) for m in mats)
        return self._cache[key]

    # ------------------------------------------------------------------ projection of vectors
    def project_vectors(self, vectors: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The same projection applied to ordinary parameter-space vectors, ``(m, k)``.

        ``vectors``: a dict ``parameter name -> (m, *shape)`` (or ``shape``) tensors for every
        projected parameter, or a flat ``(m, p)`` (or ``(p,)``) tensor in the order of
        :attr:`param_names` (that of ``ModelGradients(model, loss, layers=...)``). Layer blocks
        are ``P_out M P_in^T`` of each layer's matrix ``M``, the dense block ``P_dense v``.
        Applied to explicit per-sample gradients it gives :meth:`project`'s features."""
        parts = self._split(vectors)
        m = next(iter(parts.values())).shape[0]
        ref = next(iter(parts.values()))
        named = dict(self.model.named_modules())
        feats = []
        for b in self.blocks:
            V = torch.cat([parts[n] for n in b.params], dim=1)
            mats = self.matrices(b, ref.device, ref.dtype)
            if b.kind == "dense":
                feats.append(V @ mats[0].T)
            else:
                mod = named[b.name]
                feats.append(_kind(mod).project_vectors(mod, V, *mats).reshape(m, -1))
        return torch.cat(feats, dim=1).to(self.dtype)

    def _split(self, vectors: Mapping[str, torch.Tensor] | torch.Tensor
               ) -> dict[str, torch.Tensor]:
        sizes = {n: math.prod(s) for n, s in self.param_shapes.items()}
        if isinstance(vectors, Mapping):
            unknown = sorted(set(vectors) - set(sizes))
            missing = [n for n in self.param_names if n not in vectors]
            if unknown or missing:
                raise InputError(f"project_vectors: unknown parameters {unknown}, missing "
                                 f"{missing}; expected {self.param_names}")
            out = {}
            for n in self.param_names:
                t = torch.as_tensor(vectors[n])
                if tuple(t.shape) == self.param_shapes[n]:
                    t = t.unsqueeze(0)
                if tuple(t.shape[1:]) != self.param_shapes[n]:
                    raise InputError(f"project_vectors: {n!r} has shape {tuple(t.shape)}, "
                                     f"expected (m, *{self.param_shapes[n]})")
                out[n] = t.reshape(len(t), -1)
            ms = {len(t) for t in out.values()}
            if len(ms) != 1:
                raise InputError(f"project_vectors: different numbers of vectors {sorted(ms)}")
            return out
        V = torch.as_tensor(vectors)
        if V.ndim == 1:
            V = V.unsqueeze(0)
        if V.ndim != 2 or V.shape[1] != self.num_params:
            raise InputError(f"project_vectors: expected (m, {self.num_params}) vectors, got "
                             f"{tuple(V.shape)}")
        return dict(zip(self.param_names, V.split([sizes[n] for n in self.param_names], 1)))

    # ------------------------------------------------------------------ projection of samples
    def _check_model(self) -> None:
        check_batchnorm_eval(self.model)

    def project(self, x: Any, y: Any, loss: LossFn | None = None) -> torch.Tensor:
        """Projected per-sample gradients of ``loss(model(x_i), y_i)``, ``(n, feature_dim)``
        in :attr:`dtype`, in micro-batches of :attr:`micro_batch_size` samples.

        ``loss`` is mean-reduced (the package convention); the backward pass runs on
        ``loss * n``, the sum of per-sample losses. Holds
        :data:`~dvl_ooc.grads.MODEL_LOCK`."""
        loss = loss if loss is not None else self.loss
        if loss is None or not callable(loss):
            raise InputError("project needs a loss: pass loss= here or to GradientProjector")
        with MODEL_LOCK:
            self._check_model()
            xt = as_tensor(x, dtype=self._model_dtype(), device=self._device())
            yt = as_tensor(y, device=self._device())
            if yt.is_floating_point():
                yt = yt.to(self._model_dtype())
            check_xy(xt, yt)
            out = torch.empty(len(xt), self.feature_dim, dtype=self.dtype, device=xt.device)
            step = self.micro_batch_size
            for s in range(0, len(xt), step):
                ys = yt[s : s + step]
                out[s : s + step] = self._project_batch(xt[s : s + step], [(ys, loss)])[0]
        _check_finite(out, "projected gradient", "the inputs, labels and loss")
        return out

    def project_output_vectors(
        self,
        x: Any,
        vectors: torch.Tensor | Sequence[torch.Tensor] | Callable[..., Sequence[torch.Tensor]],
        y: Any = None,
    ) -> torch.Tensor:
        """Projected features of output-space vectors pulled back through the network:
        ``P J_i^T v_i`` with ``J_i = d model(x_i) / d theta`` (``vectors`` for the samples of
        ``x``), without forming ``J_i`` or ``J_i^T v_i``.

        This is :meth:`project` with the backward pass seeded by ``v_i`` instead of the loss
        gradient (the per-sample "loss" ``<out_i, v_i>``): with ``v_i = d l_i / d out_i`` it
        gives :meth:`project`'s features; with the columns of a factor ``L_i`` of the output
        Hessian (:func:`~dvl_ooc.grads.functional.output_hessian_factors`) it gives the
        projected pseudo-gradients whose outer products sum to the projected Gauss-Newton
        matrix ``P J_i^T H_out,i J_i P^T``.

        ``vectors``: one tensor ``(n, *out_shape)`` (result ``(n, feature_dim)``), a sequence
        of ``c`` such tensors (result ``(c, n, feature_dim)``), or a callable ``vectors(out,
        y)`` returning such a sequence, evaluated per micro-batch on the detached outputs of
        the same forward pass (and the matching rows of ``y``, or ``None``): one forward and
        ``c`` backward passes per micro-batch. Holds :data:`~dvl_ooc.grads.MODEL_LOCK`."""
        with MODEL_LOCK:
            self._check_model()
            xt = as_tensor(x, dtype=self._model_dtype(), device=self._device())
            if xt.ndim == 0 or len(xt) == 0:
                raise InputError("project_output_vectors: x needs a non-empty sample axis")
            yt = None
            if y is not None:
                yt = as_tensor(y, device=self._device())
                if yt.is_floating_point():
                    yt = yt.to(self._model_dtype())
                check_xy(xt, yt)
            single = isinstance(vectors, torch.Tensor)
            if not callable(vectors):
                vs = [vectors] if single else list(vectors)
                vs = [as_tensor(v, dtype=self._model_dtype(), device=self._device())
                      for v in vs]
                for v in vs:
                    check_xy(xt, v, what="project_output_vectors")
            step = self.micro_batch_size
            parts = []
            for s in range(0, len(xt), step):
                xb = xt[s : s + step]
                yb = None if yt is None else yt[s : s + step]
                if callable(vectors):
                    def targets(out, yb=yb, fn=vectors):
                        return [(v, _inner_loss) for v in fn(out, yb)]
                else:
                    targets = [(v[s : s + step], _inner_loss) for v in vs]
                parts.append(self._project_batch(xb, targets))
            c = {len(p) for p in parts}
            if len(c) != 1:
                raise InputError(f"project_output_vectors: the callable returned different "
                                 f"numbers of vectors per micro-batch {sorted(c)}; use one "
                                 "micro-batch or a fixed number")
            rows = [torch.cat([p[j] for p in parts]) for j in range(c.pop())]
            out = torch.stack(rows).to(self.dtype) if rows else \
                torch.zeros(0, len(xt), self.feature_dim, dtype=self.dtype, device=xt.device)
        _check_finite(out.transpose(0, 1), "projected output-vector feature",
                      "the inputs and vectors")
        return out[0] if single else out

    def _project_batch(self, x: torch.Tensor, targets: Any) -> list[torch.Tensor]:
        """Features of one micro-batch for each ``(y_j, loss_j)`` of ``targets`` (a list, or
        a callable of the detached outputs returning one): one forward pass with hooks, then
        one backward of ``loss_j(out, y_j) * n`` per target to the captured layer outputs."""
        n = len(x)
        named = dict(self.model.named_modules())
        other = set(self.other_names)
        hooked = {b.name: named[b.name] for b in self.blocks if b.kind != "dense"}
        bn_params: dict[str, str] = {}  # dense parameter -> its BatchNorm module
        for mname, mod in named.items():
            prefix = f"{mname}." if mname else ""
            if isinstance(mod, _BatchNorm):
                for pn in ("weight", "bias"):
                    if prefix + pn in other:
                        bn_params[prefix + pn] = mname
                        hooked[mname] = mod
        generic = [p for p in self.other_names if p not in bn_params]

        calls: dict[str, int] = dict.fromkeys(hooked, 0)
        rec: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def make_hook(name):
            def hook(mod, inputs, output):
                calls[name] += 1
                rec[name] = (inputs[0].detach(), output)
            return hook

        handles = [m.register_forward_hook(make_hook(k)) for k, m in hooked.items()]
        out = None
        try:
            if hooked:  # else only torch.func parameters: no pass of our own
                with torch.enable_grad():
                    out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if callable(targets):
            if out is None:
                with torch.no_grad():
                    out = self.model(x)
            targets = targets(out.detach())
        shared = {k: c for k, c in calls.items() if c > 1}
        if shared:
            k, c = next(iter(shared.items()))
            raise UnsupportedModelError(
                f"layer {k!r} was called {c} times in one forward pass (weight sharing); its "
                "per-sample gradient is not a sum over one call's positions, so it cannot be "
                "projected from captured rows; leave it out with layers=[...]")
        names = [k for k, (_, o) in rec.items() if o.requires_grad]
        dtype = self._model_dtype()
        result = []
        for j, (y, loss) in enumerate(targets):
            grads: dict[str, Any] = {}
            if names:
                with torch.enable_grad():  # also when the caller is under torch.no_grad()
                    total = loss(out, y) * n
                grads = dict(zip(names, torch.autograd.grad(
                    total, [rec[k][1] for k in names], allow_unused=True,
                    retain_graph=j + 1 < len(targets))))
            feats = []
            for b in self.blocks:
                if b.kind == "dense":
                    feats.append(self._dense(b, x, y, loss, rec, grads, bn_params, generic))
                    continue
                g = grads.get(b.name)
                if g is None:  # layer not reached by this loss
                    feats.append(torch.zeros(n, b.stop - b.start, dtype=dtype,
                                             device=x.device))
                    continue
                mod = named[b.name]
                P_in, P_out = self.matrices(b, g.device, g.dtype)
                feats.append(_kind(mod).project(mod, rec[b.name][0], g, P_in, P_out)
                             .reshape(n, -1))
            result.append(torch.cat(feats, dim=1))
        return result

    def _dense(self, b: ProjectionBlock, x: torch.Tensor, y: torch.Tensor, loss: LossFn,
               rec: dict, grads: dict, bn_params: dict[str, str],
               generic: list[str]) -> torch.Tensor:
        """Per-sample gradients of the other parameters (BatchNorm from the captured rows,
        the rest by ``torch.func``) times ``P_dense^T``."""
        n = len(x)
        named = dict(self.model.named_modules())
        cols: dict[str, torch.Tensor] = {}
        for pname, mname in bn_params.items():
            g = grads.get(mname)
            size = math.prod(self.param_shapes[pname])
            if g is None:
                cols[pname] = torch.zeros(n, size, dtype=x.dtype, device=x.device)
                continue
            mod = named[mname]
            G = g.reshape(n, g.shape[1], -1)
            if pname.endswith("weight"):
                a = rec[mname][0].reshape(n, g.shape[1], -1)
                xhat = (a - mod.running_mean[:, None]) * torch.rsqrt(
                    mod.running_var[:, None] + mod.eps)
                cols[pname] = (G * xhat).sum(2)
            else:
                cols[pname] = G.sum(2)
        if generic:
            mg = ModelGradients(self.model, loss, layers=generic,
                                micro_batch_size=self.micro_batch_size)
            sizes = [math.prod(self.param_shapes[p]) for p in mg.param_names]
            cols.update(zip(mg.param_names, mg.per_sample_grads(x, y).split(sizes, 1)))
        V = torch.cat([cols[p] for p in b.params], dim=1)
        return V @ self.matrices(b, V.device, V.dtype)[0].T
